"""Learnable equivalent transforms: channel-wise smoothing scales and shifts.

For a pair "source feeds targets", the source's output channel j is replaced by
``(y_j - δ_j) / s_j`` and every target's input column j is multiplied by ``s_j`` (its bias gains
``W·δ``), so the pair computes exactly what it computed before, while the tensor between them
(which is what gets quantized) has its outliers divided away.
"""

from __future__ import annotations

import torch
import torch.nn as nn

MIN_SCALE = 1e-2


def _truncate(scale: torch.Tensor) -> torch.Tensor:
    # |s| below 1e-2 is pushed to ±1e-2 in the forward pass (the gradient passes straight through),
    # so that dividing by s cannot blow up.
    sign = torch.where(scale < 0, -1.0, 1.0).to(scale.dtype)
    safe = torch.where(scale.abs() < MIN_SCALE, sign * MIN_SCALE, scale)
    return (safe - scale).detach() + scale


def log_activation_equivalent(act_absmax: torch.Tensor) -> torch.Tensor:
    """LAE initial scale ``s = max|X| / log2(2 + max|X|)`` per channel (clamped away from 0)."""
    amax = act_absmax.clamp(min=1e-5)
    return (amax / torch.log2(2 + amax)).clamp(min=1e-5)


def smoothquant_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = max|X|^α / max|W|^(1-α)`` per input channel."""
    return (act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)).clamp(
        min=1e-5
    )


class SmoothingFactor(nn.Module):
    """The learnable scale ``s`` (and optional shift ``δ``) of one smoothing pair in one block.

    ``scale`` may have fewer entries than the channels it acts on (one per key/value channel, or
    per half of a rotary head); the wiring in :mod:`lrquant.transforms.block` spreads it over the
    channels, so every place it acts sees the same shared parameter.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone().float())
        self.shift = None if shift is None else nn.Parameter(shift.detach().clone().float())

    def value(self) -> torch.Tensor:
        """The scale as used in the forward pass (truncated away from zero)."""
        return _truncate(self.scale)


class SmoothedNorm(nn.Module):
    """A norm followed by the smoothing of its output: ``(norm(x) - δ) / s``.

    Used while training; :func:`fold_into_norm` writes the same function into the norm's own
    weight and bias afterwards.
    """

    def __init__(self, norm: nn.Module, factor: SmoothingFactor) -> None:
        super().__init__()
        self.norm = norm
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if self.factor.shift is not None:
            y = y - self.factor.shift.to(y.dtype)
        return y / self.factor.value().to(y.dtype)


@torch.no_grad()
def fold_into_norm(norm: nn.Module, factor: SmoothingFactor, plus_one: bool) -> None:
    """Fold ``(norm(x) - δ) / s`` into the norm's parameters in place.

    ``plus_one`` is for norms that compute ``x̂ · (1 + w)`` (Gemma). A shift needs a norm bias,
    which LayerNorm has and RMSNorm has not (recipes only use shifts on LayerNorm models).
    """
    scale = factor.value().to(norm.weight.dtype)
    if plus_one:
        norm.weight.copy_((1 + norm.weight) / scale - 1)
    else:
        norm.weight.div_(scale)
    if factor.shift is not None:
        shift = factor.shift.to(norm.weight.dtype)
        bias = getattr(norm, "bias", None)
        if bias is None:
            raise ValueError("shifts need a norm with a bias; RMSNorm models use scales only")
        bias.copy_((bias - shift) / scale)
