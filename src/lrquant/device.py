"""Where the arithmetic runs.

The model stays in host memory; during block-wise learning each block visits the compute device
for its turn (with both chains' activations), then goes back, so a GPU needs room for one block
and the calibration activations, not for the whole model. Evaluation moves the whole model to
the device for its duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from lrquant.errors import LrquantError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is the first CUDA GPU when PyTorch sees one, else the CPU; ``cpu``, ``cuda`` and
    ``cuda:N`` are taken as asked, after checking that they exist."""
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LrquantError(
                f"device '{name}' was asked for, but this PyTorch ({torch.__version__}) sees no CUDA GPU; "
                "use --device cpu, or install a CUDA build of PyTorch"
            )
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise LrquantError(
                f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device(name)
    raise LrquantError(f"unknown device '{name}'; use {DEVICE_CHOICES}")


def to_device(value, device: torch.device):
    """``value`` with every tensor inside it (dicts, lists, tuples) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


@contextmanager
def placed(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Run the body with ``module`` on ``device``; it goes back to the CPU afterwards, also on errors."""
    if device.type == "cpu":
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        torch.cuda.empty_cache()


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without any)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
