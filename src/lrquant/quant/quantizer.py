"""Uniform affine fake quantization with a straight-through estimator.

``x̂ = (clamp(round(x / Δ) + z, qmin, qmax) - z) · Δ``, with Δ and z from the min and max of each
statistics group (the last dimension, a group of columns, or the whole tensor). Rounding passes
gradients straight through, so Δ, z and anything upstream of ``x`` can be learned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from lrquant.config import QuantSpec
from lrquant.console import log

MIN_SCALE = 1e-5


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass; identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid ``[qmin, qmax]``: signed for symmetric, unsigned for asymmetric."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _row_group(x: torch.Tensor, spec: QuantSpec) -> int:
    """The group size of ``spec`` on rows of ``x``: never longer than a row."""
    assert spec.group_size is not None
    return min(spec.group_size, x.shape[-1])


def group_for_stats(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """Reshape ``x`` so that each statistics group is one row of the last dimension.

    Returns the view and the number of padding columns added. A group size that does not divide
    the row leaves a shorter last group; it is padded with copies of its own last element, which
    changes neither its minimum nor its maximum, so it gets its own scale and zero point. A group
    size of at least the row's length makes the whole row one group (no padding).
    """
    if spec.granularity == "tensor":
        return x.reshape(1, -1), 0
    if spec.granularity != "group":
        return x, 0
    size = _row_group(x, spec)
    pad = -x.shape[-1] % size
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.unflatten(-1, (x.shape[-1] // size, size)), pad


def group_sums(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The sum of ``x`` over each statistics group of ``spec``, shaped like the per-group statistics
    (``[..., groups, 1]`` for group granularity, ``[..., 1]`` otherwise). A ragged last group sums
    its own columns only."""
    if spec.granularity == "group":
        size = _row_group(x, spec)
        x = torch.nn.functional.pad(x, (0, -x.shape[-1] % size))
        return x.unflatten(-1, (x.shape[-1] // size, size)).sum(dim=-1, keepdim=True)
    return group_for_stats(x, spec)[0].sum(dim=-1, keepdim=True)


def ungroup(xg: torch.Tensor, like: torch.Tensor, pad: int) -> torch.Tensor:
    """Undo :func:`group_for_stats`: back to the shape of ``like``.

    A padded last group is cut to its own columns before the groups are joined, not after: the
    cut after joining (``flatten(-2)[..., :n]``) compiled wrong in torch 2.13's inductor on the
    CPU when fused with what follows (per-group clipping factors, a row multiplier), leaving the
    last group's columns zero or garbage (tests/test_quantizer.py).
    """
    if xg.shape == like.shape:
        return xg
    if xg.dim() != like.dim() + 1:
        return xg.reshape(like.shape)
    if not pad:
        return xg.flatten(-2).reshape(like.shape)
    tail = xg[..., -1, : xg.shape[-1] - pad]
    return torch.cat([xg[..., :-1, :].flatten(-2), tail], dim=-1).reshape(like.shape)


def quant_params(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size Δ and zero point z (on the integer grid) for a range ``[xmin, xmax]``."""
    qmin, qmax = integer_range(bits, symmetric)
    if symmetric:
        # The end of larger magnitude goes on the grid's extra negative level, qmin = -2^(bits-1)
        # (as llama.cpp's Q4_0 puts it): a step of max|x| / 2^(bits-1) rather than
        # max|x| / (2^(bits-1) - 1), negative when that end is positive. Values beyond
        # qmax steps on the other side are clamped.
        top = torch.where(xmax >= -xmin, xmax, xmin)
        scale = (top.abs() / -qmin).clamp(min=MIN_SCALE) * torch.where(top > 0, -1.0, 1.0)
        return scale, torch.zeros_like(scale)
    scale = ((xmax - xmin) / (qmax - qmin)).clamp(min=MIN_SCALE)
    # No clamp on z: a narrow range far from 0 (a constant group, a one-element ragged tail)
    # needs |z| >> 1e4, and clamping it moved the whole grid away from the data.
    zero = round_ste(-xmin / scale)
    return scale, zero


class _GroupRange(torch.autograd.Function):
    """The maximum and minimum of each row of the last dimension, with the gradient of
    ``amax``/``amin`` (shared evenly between the elements that equal the extreme).

    Computed here rather than by autograd's ``amax`` so that, under ``torch.compile``, the
    backward finds the extremes' positions again from the saved input instead of the forward
    storing them as boolean masks: inductor's CPU kernels store booleans slowly, which made the
    compiled fake quantization of a training step several times slower than this (measured in
    docs/results.md, "Cheaper training steps"). The positions are ``sign(x - max) + 1`` and
    ``1 - sign(x - min)``: 1 exactly where ``x`` equals the extreme, else 0.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xmax, xmin = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
        ctx.save_for_backward(x, xmax, xmin)
        return xmax, xmin

    @staticmethod
    def backward(ctx, grad_max: torch.Tensor, grad_min: torch.Tensor) -> torch.Tensor:
        x, xmax, xmin = ctx.saved_tensors
        at_max, at_min = torch.sign(x - xmax) + 1, 1 - torch.sign(x - xmin)
        return at_max * (grad_max / at_max.sum(dim=-1, keepdim=True)) + at_min * (
            grad_min / at_min.sum(dim=-1, keepdim=True)
        )


def group_grid(
    xg: torch.Tensor, spec: QuantSpec, upper: torch.Tensor | None, lower: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and zero point of each statistics group of ``xg`` (grouped by
    :func:`group_for_stats`), its range shrunk by ``upper`` and ``lower`` when given."""
    xmax, xmin = _GroupRange.apply(xg)
    if spec.clip_ratio != 1.0:
        xmax, xmin = xmax * spec.clip_ratio, xmin * spec.clip_ratio
    if upper is not None:
        xmax = xmax * upper
    if lower is not None:
        xmin = xmin * lower
    return quant_params(xmin, xmax, spec.bits, spec.symmetric)


def weight_groups_grid(
    weight: torch.Tensor,
    spec: QuantSpec,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and zero point of each statistics group of ``weight`` (shaped ``[..., groups, 1]``
    for group granularity, ``[..., 1]`` otherwise): the grid :func:`fake_quantize` puts it on."""
    return group_grid(group_for_stats(weight.float(), spec)[0], spec, upper, lower)


def integer_codes(
    weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """The integer codes ``q`` of a weight that lies on the grid ``scale``/``zero`` (per group, as
    :func:`weight_groups_grid` shapes them): ``weight = scale · (q - zero)``, as int16."""
    qmin, qmax = integer_range(spec.bits, spec.symmetric)
    wg, pad = group_for_stats(weight.float(), spec)
    q = torch.clamp(torch.round(wg / scale) + zero, qmin, qmax)
    return ungroup(q, weight, pad).to(torch.int16)


def dequantize_codes(
    codes: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """``scale · (codes - zero)`` per group, in float32: the inverse of :func:`integer_codes`."""
    qg, pad = group_for_stats(codes.float(), spec)
    return ungroup((qg - zero) * scale, codes, pad)


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` on the grid ``spec`` describes; identity at 16 bits.

    ``upper`` and ``lower`` optionally shrink each group's range (``xmax·upper``, ``xmin·lower``,
    learnable weight clipping); they broadcast against the per-group statistics, shape
    ``[..., groups, 1]`` for group granularity or ``[..., 1]`` otherwise. ``offset`` (shaped like
    ``x``, in grid steps) is added before rounding: ``round(x / Δ + offset)``, learnable rounding.

    Inside :func:`compiled_quantizer` the same computation runs as one fused kernel.
    """
    if not spec.enabled:
        return x
    return fused(quantize_dequantize, x, spec, upper, lower, offset)


def quantize_dequantize(
    x: torch.Tensor,
    spec: QuantSpec,
    upper: torch.Tensor | None,
    lower: torch.Tensor | None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fake_quantize` for a quantizing ``spec``, as it runs (fused or not): for callers
    that fuse it into a longer computation of their own (:func:`fused`)."""
    xg, pad = group_for_stats(x, spec)
    scale, zero = group_grid(xg, spec, upper, lower)
    qmin, qmax = integer_range(spec.bits, spec.symmetric)
    steps = xg / scale if offset is None else xg / scale + group_for_stats(offset, spec)[0]
    q = torch.clamp(round_ste(steps) + zero, qmin, qmax)
    return ungroup((q - zero) * scale, x, pad)


# Fake quantization is a chain of a dozen elementwise ops and reductions, forward and backward;
# eager PyTorch runs each as its own pass over memory. Fusing them with torch.compile (with the
# smoothing of the weight before it, :mod:`lrquant.transforms.weight`) makes a block-training step
# faster on CPU (docs/results.md, "Cheaper training steps"). Compiled once per process and
# function (shapes are static).
COMPILE_ALLOWED = True  # a process-wide off switch (the test suite runs eager)
_compiled: dict[Callable, Callable] = {}  # each function's compiled version, built on first use
_compiled_depth = 0  # how many compiled_quantizer contexts are open
_compile_failed = False
_COMPILE_VARIANTS = 64  # tensor shapes x specs x clipping on/off seen in one model


def fused(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)``, through ``torch.compile`` inside :func:`compiled_quantizer` (one fused
    kernel forward and one backward), eagerly elsewhere or where compiling failed."""
    global _compile_failed
    if not _compiled_depth or _compile_failed:
        return fn(*args)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    try:
        return _compiled[fn](*args)
    except Exception as error:  # no C++ compiler, unsupported platform, ...
        log(f"torch.compile is unavailable here ({type(error).__name__}); quantizing without it")
        _compile_failed = True
        return fn(*args)


@contextlib.contextmanager
def compiled_quantizer(enabled: bool = True) -> Iterator[None]:
    """Run :func:`fake_quantize` (and what else goes through :func:`fused`) through
    ``torch.compile`` inside this context (if ``enabled``).

    Falls back to the eager version, with one log line, where compiling fails.
    """
    global _compiled_depth
    if not (enabled and COMPILE_ALLOWED) or _compile_failed:
        yield
        return
    _compiled_depth += 1
    try:
        # Compiling happens lazily, at calls inside this context: the limit applies there.
        with torch._dynamo.config.patch(recompile_limit=_COMPILE_VARIANTS):
            yield
    finally:
        _compiled_depth -= 1
