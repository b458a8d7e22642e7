"""Run a model up to its first block and record what each block is called with."""

from __future__ import annotations

import torch
import torch.nn as nn

from lrquant.arch import ArchSpec


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: ArchSpec, windows: torch.Tensor) -> torch.Tensor:
    """The hidden states entering block 0 for each window, ``[n, seqlen, hidden]`` in float32."""
    first = arch.block_list(model)[0]
    rows: list[torch.Tensor] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rows.append(hidden.detach().float())
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(input_ids=window[None], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(rows)


@torch.no_grad()
def capture_block_kwargs(model: nn.Module, arch: ArchSpec, window: torch.Tensor) -> list[dict]:
    """The keyword arguments (mask, rotary embeddings, positions) each block receives.

    They differ between blocks in some models (sliding-window and global layers), and they do
    not depend on the window's content, only its length: one window is enough.
    """
    calls: list[dict] = []

    def grab(_module, _args, kwargs):
        calls.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in arch.block_list(model)]
    try:
        model(input_ids=window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict, batch_size: int = 1) -> torch.Tensor:
    """Apply ``block`` to ``inputs`` ``[n, seqlen, hidden]`` in batches; returns float32 outputs."""
    outs = []
    for start in range(0, inputs.shape[0], batch_size):
        out = block(inputs[start : start + batch_size], **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out).float())
    return torch.cat(outs)
