"""Small numeric helpers shared by the tests."""

import torch
import torch.nn as nn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``out`` against ``ref``."""
    return ((out - ref).norm() / ref.norm()).item()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids``, without gradients."""
    with torch.no_grad():
        return model(input_ids=ids).logits
