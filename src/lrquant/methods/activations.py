"""Where the calibration chains live during the block-wise pass.

The pass keeps, for every calibration window, the hidden states entering the current block on
the full-precision and the quantized chains, the two targets and the next block's inputs: five
tensors ``[windows, tokens, hidden]`` at once. :class:`Activations` holds them in a chosen dtype
(``Recipe.chain_dtype``: bf16 halves them) and, past a memory budget (``--max-memory``, or half
the memory available when the pass starts), in memory-mapped files under the run's resume
folder. The files are unlinked as soon as they are mapped: the operating system frees their
space when the tensor goes, and a stopped run leaves none behind. Computation always takes
float32 batches of them on the learning device (:func:`lrquant.methods.capture.batches`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrquant.errors import LrquantError
from lrquant.models.streaming import available_memory

# chain-sized tensors the pass holds at once: both chains' inputs, both branches' targets (the
# full-precision one is the next full-precision input) and the quantized chain's next inputs
AT_ONCE = 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def memory_budget(max_memory: int | None) -> int | None:
    """The bytes the chains may hold in memory: ``max_memory``, or half the memory available
    now (None when that is unknown: no limit)."""
    if max_memory is not None:
        return max_memory
    available = available_memory()
    return None if available is None else available // 2


def spills(chains_bytes: int, budget: int | None) -> bool:
    """Whether chains of ``chains_bytes`` in all go to files under ``budget``."""
    return budget is not None and chains_bytes > budget


@dataclass
class Activations:
    """How the chains are stored: ``dtype``, in memory on ``device``; or, when :data:`AT_ONCE`
    chains would take more than ``budget`` bytes and there is a ``spill`` folder, in
    memory-mapped files there (on the host). Decided at the first chain, from its size."""

    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    spill: Path | None = None
    budget: int | None = None  # bytes the chains may hold in memory (None: no limit)
    folder: Path | None = None  # where they went (set at the first chain when they spill)
    chain_bytes: int = 0  # one chain's size (0 until the first)

    @classmethod
    def of(
        cls, dtype: str, device: torch.device, spill: Path | None = None, budget: int | None = None
    ) -> Activations:
        """Chains in ``dtype`` (a ``Recipe.chain_dtype``) that spill to files in ``spill`` past
        ``budget`` bytes (None: half the memory available now, when known)."""
        return cls(DTYPES[dtype], device, spill, memory_budget(budget) if spill is not None else budget)

    def _decide(self, shape: tuple[int, ...]) -> None:
        self.chain_bytes = int(torch.Size(shape).numel()) * self.dtype.itemsize
        self.folder = self.spill if spills(AT_ONCE * self.chain_bytes, self.budget) else None

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised chain tensor of ``shape``."""
        if not self.chain_bytes:
            self._decide(shape)
        if self.folder is None:
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        numel = int(torch.Size(shape).numel())
        nbytes = numel * self.dtype.itemsize
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.folder, prefix="chain-", suffix=".bin")
        try:
            try:  # reserve the blocks now: a full disk under a mapping would kill the process
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            except OSError as err:
                raise LrquantError(
                    f"no room for {nbytes / 2**20:.0f} MiB of calibration activations in '{self.folder}' "
                    f"({err.strerror}): free disk space there, or raise --max-memory to keep them in memory"
                ) from None
            tensor = torch.from_file(name, shared=True, size=numel, dtype=self.dtype)
        finally:
            os.close(fd)
            os.unlink(name)  # the mapping stays valid; the space is freed with the tensor
        return tensor.view(shape)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """A stored copy of ``tensor`` ``[windows, ...]``."""
        out = self.empty(tuple(tensor.shape))
        for window in range(tensor.shape[0]):  # one window at a time: no second full copy
            out[window] = tensor[window]
        return out

    def as_dict(self) -> dict:
        """For the report: the dtype, where the chains lived and their bytes (all held at once)."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "where": f"files in {self.folder}" if self.folder else f"memory ({self.device.type})",
            "bytes": AT_ONCE * self.chain_bytes,
            "budget_bytes": self.budget,
        }

    def words(self) -> str:
        where = f"in memory-mapped files in '{self.folder}'" if self.folder else "in memory"
        limit = f" (limit {self.budget / 2**20:.0f} MiB)" if self.budget is not None else ""
        size = AT_ONCE * self.chain_bytes / 2**20
        return f"calibration activations: {size:.0f} MiB in {self.as_dict()['dtype']}, {where}{limit}"


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"8G"``, ``"512MiB"``, ``"1.5TB"`` or a number of bytes -> bytes (powers of 1024)."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in units else ""
    number = value[: len(value) - len(unit)] if unit else value
    try:
        size = float(number) * units[unit]
    except ValueError:
        size = -1.0
    if not size > 0:
        raise LrquantError(f"--max-memory expects a size such as 8GiB, 512MiB or 4e9 (bytes), got '{text}'")
    return int(size)
