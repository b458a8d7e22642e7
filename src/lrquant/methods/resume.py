"""Crash-safe progress of a block-wise run: every finished block is saved, a rerun resumes.

The store lives beside the output folder (``.<name>.resume``). After each block it holds the
block's finished weights, the inputs of the next block on both chains, and the per-block
reports, each file written atomically and the progress file last. A rerun of the same command
with the same settings picks up at the first unfinished block and computes bit for bit what an
uninterrupted run computes.

A finished block is stored as the output will hold it: ``block-N.safetensors`` is the block's
shard of the output checkpoint (keys named as in the model, the quantizers' keys those of plain
linears) and ``integers-N.safetensors`` its part of the integer codes, steps and zero points
(:func:`lrquant.checkpoint.integer_tensors`; the steps and zero points are also the grids the
restored linears get back). A streamed run's output links these files instead of writing
the model again (:func:`lrquant.checkpoint.save_streamed`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lrquant import distributed
from lrquant.arch import ArchSpec
from lrquant.checkpoint import SHARD_METADATA, grid_shaped, integer_tensors
from lrquant.config import QuantScheme
from lrquant.errors import LrquantError
from lrquant.file_checks import check_safetensors, read_json_object
from lrquant.methods.blockwise import BlockReport, ChainState, report_dict
from lrquant.output_dir import disk_space_for, write_json
from lrquant.quant.apply import attach_block_quantizers
from lrquant.quant.linear import QuantLinear

META = "progress.json"
FOLDED, FOLDED_DONE = "e2e", "done"  # a streamed run's blocks after the end-to-end step
VERSION = 2  # 1: block-relative keys with the grids beside the weights (refused: start over)


def _atomic_save(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a write cut short (full disk) leaves nothing behind


def _chain_file(done: int) -> str:
    """The chain inputs after ``done`` finished blocks: one file per count, so the progress file
    never points at a chain that is one block ahead of it (a crash between the two writes)."""
    return f"chain-{done - 1}.safetensors"


def block_file(index: int) -> str:
    """The finished block ``index``'s weights: a shard of the output checkpoint."""
    return f"block-{index}.safetensors"


def integers_file(index: int) -> str:
    """The integer codes, steps and zero points of block ``index``'s quantized linears (absent
    when none lies on a known grid)."""
    return f"integers-{index}.safetensors"


class ResumeStore:
    """Per-block checkpoints for one run, identified by a fingerprint of all its settings."""

    def __init__(self, output: Path, fingerprint: dict, part: str = "") -> None:
        """``part`` names a second store of the same output (``vision``: a vision-language
        model's tower, ``.<name>.vision.resume``)."""
        self.folder = output.parent / (f".{output.name}.{part}.resume" if part else f".{output.name}.resume")
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.reports: list[dict] = []
        self.prefixes: list[str] = []  # each block's name in the model (:meth:`bind`)

    def bind(self, model: nn.Module, arch: ArchSpec) -> None:
        """Name the blocks of ``model`` as the saved files will (before the first
        :meth:`save_block`)."""
        self.prefixes = [prefix for prefix, _ in arch.named_blocks(model)]

    def load(
        self, model: nn.Module, arch: ArchSpec, scheme: QuantScheme, restore: bool = True
    ) -> tuple[int, ChainState] | None:
        """Restore finished blocks into ``model``; return where to continue, or ``None`` to start.
        A streamed model (``restore=False``) leaves them here, to be read back one at a time
        (:meth:`restore_block`).

        A damaged store (a file cut short or edited) is refused in one line: the run cannot resume
        from it. Its files are checked before any block is restored.
        """
        self.bind(model, arch)
        meta_path = self.folder / META
        if not meta_path.is_file():
            return None
        restart = f"the run cannot resume from '{self.folder}': delete that folder to start over"
        meta = read_json_object(meta_path, "a progress file", restart)
        if meta.get("version") != VERSION:
            raise LrquantError(
                f"'{self.folder}' holds progress written by an older lrquant: the run cannot resume "
                "from it; delete that folder to start over"
            )
        if meta.get("fingerprint") != self.fingerprint:
            raise LrquantError(
                f"'{self.folder}' holds progress of a run with other settings: rerun that command, "
                "or delete the folder to start over"
            )
        named = arch.named_blocks(model)
        done, blocks = meta.get("done"), [block for _, block in named]
        if (
            not isinstance(done, int)
            or not 1 <= done <= len(blocks)
            or not isinstance(meta.get("reports"), list)
        ):
            raise _damaged(self.folder, f"{META} does not say which of the {len(blocks)} blocks are done")
        files = [self.folder / block_file(index) for index in range(done)]
        files.append(self.folder / _chain_file(done))
        for file in files:
            if not file.is_file():
                raise _damaged(self.folder, f"{file.name} is missing")
            check_safetensors(file, restart)
        for index in range(done):
            if (self.folder / integers_file(index)).is_file():
                check_safetensors(self.folder / integers_file(index), restart)
        try:
            for index, (prefix, block) in enumerate(named[:done] if restore else []):
                self.restore_block(index, block, arch, scheme, prefix)
            chain = load_file(files[-1])
            state = ChainState(fp=chain["fp"], quant=chain["quant"])
        except (KeyError, AttributeError, RuntimeError) as err:  # tensors of other names or shapes
            raise _damaged(self.folder, f"its tensors do not fit the model: {type(err).__name__}") from None
        self.reports = meta["reports"]
        return done, state

    def restore_block(
        self, index: int, block: nn.Module, arch: ArchSpec, scheme: QuantScheme, prefix: str
    ) -> None:
        """Give ``block`` (weightless or not) the finished weights of block ``index``, with its
        quantizers and grids."""
        attach_block_quantizers(block, arch, scheme, weights_on_grid=True, prefix=prefix)
        integers = self.folder / integers_file(index)
        _load_block(
            block,
            _relative(load_file(self.folder / block_file(index)), prefix),
            _relative(load_file(integers), prefix) if integers.is_file() else {},
        )

    def block_files(self, index: int) -> tuple[Path, Path | None]:
        """The files of finished block ``index``: its output shard and its integer codes (None
        when it has none); after a finished end-to-end step, its folded block's."""
        folder = self.folder / FOLDED if (self.folder / FOLDED / FOLDED_DONE).is_file() else self.folder
        codes = folder / integers_file(index)
        return folder / block_file(index), codes if codes.is_file() else None

    def _block_tensors(self, index: int, block: nn.Module) -> tuple[dict, dict]:
        """Block ``index``'s weights as its output shard holds them, and its integer codes."""
        prefix = self.prefixes[index]
        weights = {f"{prefix}.{k}": v.detach().cpu() for k, v in block.state_dict().items()}
        linears = [(f"{prefix}.{n}", m) for n, m in block.named_modules() if isinstance(m, QuantLinear)]
        return weights, integer_tensors(linears)

    def clear_folded(self) -> None:
        """Forget the folded blocks of an end-to-end step (before it runs, again, in full)."""
        shutil.rmtree(self.folder / FOLDED, ignore_errors=True)

    def save_folded(self, index: int, block: nn.Module) -> None:
        """Keep block ``index`` with the end-to-end step's step sizes folded in, beside the
        block-wise result it started from (which a rerun starts from again)."""
        weights, integers = self._block_tensors(index, block)
        folder = self.folder / FOLDED
        with disk_space_for(
            f"block {index + 1} after the end-to-end step",
            self.folder.parent,
            sum(t.numel() * t.element_size() for t in [*weights.values(), *integers.values()]),
            "the block-wise result is kept: free space and rerun the same command to resume",
        ):
            folder.mkdir(parents=True, exist_ok=True)
            if integers:
                _atomic_save(integers, folder / integers_file(index))
            _atomic_save(weights, folder / block_file(index), SHARD_METADATA)

    def finish_folded(self) -> None:
        """Mark every block as folded: the output is written from the folded blocks."""
        (self.folder / FOLDED / FOLDED_DONE).touch()

    def save_block(
        self, index: int, block: nn.Module, state: ChainState | None, report: BlockReport | None = None
    ) -> None:
        """Record that block ``index`` is finished (call after it is folded and quantized); a
        run without calibration (``state`` None) keeps no chain."""
        weights, integers = self._block_tensors(index, block)
        chain = {} if state is None else {"fp": state.fp.cpu(), "quant": state.quant.cpu()}
        needed = sum(
            t.numel() * t.element_size() for t in [*weights.values(), *integers.values(), *chain.values()]
        )
        reports = [*self.reports, *([report_dict(report)] if report is not None else [])]
        if not distributed.is_main():  # process 0 writes the store (:mod:`lrquant.distributed`)
            self.reports = reports
            return
        with disk_space_for(
            f"the checkpoint of block {index + 1}",
            self.folder.parent,
            needed,
            "the blocks before it are kept: free space and rerun the same command to resume",
        ):
            self.folder.mkdir(parents=True, exist_ok=True)
            written = [self.folder / integers_file(index), self.folder / block_file(index)]
            try:
                if integers:
                    _atomic_save(integers, written[0])
                _atomic_save(weights, written[1], SHARD_METADATA)
                if chain:
                    _atomic_save(chain, self.folder / _chain_file(index + 1))
            except BaseException:  # the progress file does not count this block: nor does the folder
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            meta = {
                "version": VERSION,
                "fingerprint": self.fingerprint,
                "done": index + 1,
                "reports": reports,
            }
            write_json(self.folder / META, meta)
        self.reports = reports
        if index:
            (self.folder / _chain_file(index)).unlink(missing_ok=True)  # the chain before this block

    def clear(self) -> None:
        """Delete the store (after the output folder was written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _damaged(folder: Path, reason: str) -> LrquantError:
    return LrquantError(
        f"'{folder}' is damaged ({reason}): the run cannot resume from it; delete that folder to start over"
    )


def _relative(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``tensors`` named in the model, renamed within the block called ``prefix``."""
    start = f"{prefix}."
    if not all(key.startswith(start) for key in tensors):
        raise KeyError(prefix)  # another model's blocks
    return {key[len(start) :]: tensor for key, tensor in tensors.items()}


def _load_block(
    block: nn.Module, tensors: dict[str, torch.Tensor], integers: dict[str, torch.Tensor]
) -> None:
    for key in tensors:
        module_name, _, attr = key.rpartition(".")
        module = block.get_submodule(module_name)
        # A fold may have given a linear a bias it did not have (shifts); create it before loading.
        if attr == "bias" and getattr(module, "bias", None) is None:
            module.bias = nn.Parameter(torch.zeros_like(tensors[key]))
    for key, scale in integers.items():  # the grid a finished linear's weight is on
        module_name, _, attr = key.rpartition(".")
        if attr == "scale":
            module = block.get_submodule(module_name)
            module.set_grid(*grid_shaped(scale, integers[f"{module_name}.zero"], module.weight_spec))
    weightless = any(t.is_meta for t in block.parameters())  # a streamed model's skeleton
    block.load_state_dict(tensors, strict=True, assign=weightless)
