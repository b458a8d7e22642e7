"""Run a model up to its first block and record what each block (and each transition) is called with."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from lrquant.arch import ArchSpec
from lrquant.methods.activations import Activations
from lrquant.modalities import modality_of
from lrquant.models.streaming import StopForward, stand_ins, streamed


class _Stop(Exception):
    pass


def model_inputs(arch: ArchSpec, sample: torch.Tensor) -> dict:
    """The keyword arguments that run the model on one calibration sample (its modality's)."""
    return modality_of(arch).model_inputs(sample)


def call_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Everything a module was called with except its first argument (the hidden states), by name.

    Positional extras (Swin passes ``input_dimensions`` positionally) are named from the
    module's signature, so a recorded call can be replayed as ``module(hidden, **kwargs)``.
    """
    signature = inspect.signature(module.forward)
    params = signature.parameters
    first = next(iter(params), "hidden_states")
    out: dict = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        if name == first:
            continue
        if params[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, arch: ArchSpec, samples: torch.Tensor, into: Activations | None = None
) -> torch.Tensor:
    """The hidden states entering block 0 for each sample, ``[n, tokens, hidden]`` in float32 (or
    stored as ``into`` says)."""
    first = arch.block_list(model)[0]
    rows: list[torch.Tensor] = []
    out: torch.Tensor | None = None  # with ``into``: filled one sample (a batch of one) at a time
    done = 0

    def grab(_module, args, kwargs):
        nonlocal out, done
        hidden = (args[0] if args else kwargs["hidden_states"]).detach()
        if arch.packed:  # one sample's tokens, unbatched
            hidden = hidden[None]
        if into is None:
            rows.append(hidden.float())
        else:
            if out is None:
                out = into.empty((samples.shape[0], *hidden.shape[1:]))
            out[done] = hidden[0]
            done += 1
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for sample in samples:
            try:
                model(**model_inputs(arch, sample))
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(rows) if into is None else out


@torch.no_grad()
def capture_block_kwargs(
    model: nn.Module, arch: ArchSpec, sample: torch.Tensor
) -> tuple[list[dict], dict[int, dict]]:
    """The keyword arguments (mask, rotary embeddings, positions, grid size) each block receives,
    and those of each transition between blocks (keyed by the block it follows).

    They differ between blocks in some models (sliding-window and global layers, Swin stages),
    and they do not depend on the sample's content, only its size: one sample is enough.
    """
    calls: list[dict] = []
    transition_calls: dict[int, dict] = {}

    def grab(module, args, kwargs):
        calls.append(call_kwargs(module, args, kwargs))

    def grab_transition(index: int):
        def hook(module, args, kwargs):
            transition_calls[index] = call_kwargs(module, args, kwargs)

        return hook

    if streamed(model, arch):  # blocks without weights: stand-ins record their calls instead
        with stand_ins(model, arch, lambda _index, block, args, kwargs: grab(block, args, kwargs), stop=True):
            try:
                model(**model_inputs(arch, sample))
            except StopForward:  # the head (perhaps still on disk) need not run
                pass
        return calls, transition_calls
    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in arch.block_list(model)]
    handles += [
        module.register_forward_pre_hook(grab_transition(index), with_kwargs=True)
        for index, module in arch.transitions(model).items()
    ]
    try:
        model(**model_inputs(arch, sample))
    finally:
        for handle in handles:
            handle.remove()
    return calls, transition_calls


PACKED_HOOKS = "_lrquant_packed_hooks"


def batch_packed_blocks(model: nn.Module, arch: ArchSpec) -> None:
    """Let ``arch``'s packed blocks (:attr:`ArchSpec.packed`) take a batch ``[b, tokens, hidden]``
    as every other block does: the batch is packed into one sequence of ``b * tokens``, with the
    recorded call's ``cu_seqlens`` (one sample's) repeated for each sample and its per-token
    rotary embeddings tiled, and the output unpacked. The model's own unbatched calls pass
    through unchanged. Installed once per block (forward hooks, not a wrapper: names and
    checkpoints stay the model's)."""
    if not arch.packed:
        return
    for block in arch.block_list(model):
        if not hasattr(block, PACKED_HOOKS):
            setattr(block, PACKED_HOOKS, (
                block.register_forward_pre_hook(_pack, with_kwargs=True),
                block.register_forward_hook(_unpack),
            ))  # fmt: skip


def _pack(block: nn.Module, args: tuple, kwargs: dict):
    hidden = args[0] if args else kwargs.pop("hidden_states")
    if hidden.dim() != 3:  # the model's own call
        block._lrquant_batch = None
        return None
    n, tokens = hidden.shape[:2]
    block._lrquant_batch = (n, tokens)
    kwargs = dict(kwargs)
    bounds = kwargs["cu_seqlens"]
    kwargs["cu_seqlens"] = torch.cat([bounds[:1], *(bounds[1:] + i * tokens for i in range(n))])

    def tiled(value):  # a per-token tensor (rotary embeddings) of one sample, for each
        if isinstance(value, tuple):
            return tuple(tiled(t) for t in value)
        if isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[0] == tokens:
            return value.repeat(n, *([1] * (value.dim() - 1)))
        return value

    kwargs = {name: value if name == "cu_seqlens" else tiled(value) for name, value in kwargs.items()}
    return (hidden.reshape(n * tokens, *hidden.shape[2:]), *args[1:]), kwargs


def _unpack(block: nn.Module, _args: tuple, output):
    if block._lrquant_batch is None:
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    hidden = hidden.reshape(*block._lrquant_batch, *hidden.shape[1:])
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def batches(inputs: torch.Tensor, batch_size: int, device: torch.device):
    """``inputs`` ``[n, ...]`` (any dtype) in batches of ``batch_size``, as float32 on ``device``."""
    for start in range(0, inputs.shape[0], batch_size):
        yield inputs[start : start + batch_size].to(device=device, dtype=torch.float32)


def run_block(
    block: nn.Module, inputs: torch.Tensor, kwargs: dict, batch_size: int = 1, into: Activations | None = None
) -> torch.Tensor:
    """Apply ``block`` to ``inputs`` ``[n, tokens, hidden]`` in batches (each as float32 on the
    block's device); returns the outputs in float32, or stored as ``into`` says."""
    out: torch.Tensor | None = None
    outs, done = [], 0
    for x in batches(inputs, batch_size, next(block.parameters(), inputs).device):
        y = block(x, **kwargs)
        y = (y[0] if isinstance(y, tuple) else y).float()
        if into is None:
            outs.append(y)
            continue
        if out is None:
            out = into.empty((inputs.shape[0], *y.shape[1:]))
        out[done : done + y.shape[0]] = y
        done += y.shape[0]
    return torch.cat(outs) if into is None else out
