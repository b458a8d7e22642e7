"""What a linear layer's weight becomes while its block is being learned.

``W' = diag(1/r) · W · diag(c)``, ``b' = (b + W·δc - δr) / r`` for the smoothing factors acting
on its input columns (``c``, ``δc``) and output rows (``r``, ``δr``); a linear that rotates its
input at run time by ``R`` stores ``W R`` and gets ``diag(1/r) · W · diag(c) · R`` (its input is
smoothed, then rotated); then the learnable clipping
bounds pick the quantization range, the learnable rounding offsets (optional, ``rounding``) move
each weight's rounding point, and the rotation vector (LRQuant+'s learned per-row multiplier, not
a Hadamard rotation) multiplies each dequantized row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from lrquant.config import QuantSpec
from lrquant.quant.gptq import WeightRounding, weight_grid
from lrquant.quant.quantizer import (
    fake_quantize,
    fused,
    group_for_stats,
    group_sums,
    quantize_dequantize,
    weight_groups_grid,
)

Vector = Callable[[], torch.Tensor]
CLIP_INIT = 4.0  # sigmoid(4) ≈ 0.982: start just inside the min/max range
CLIP_SEARCH_LOWEST = 0.5  # the search tries shrink factors from here up to sigmoid(CLIP_INIT)
CLIP_SEARCH_STEPS = 20
ROUNDING_LIMIT = 0.5  # a rounding offset moves a weight at most one grid step from round-to-nearest


class LearnableClipping(nn.Module):
    """Per-group bounds ``xmax·σ(γ)`` and ``xmin·σ(β)`` for one weight (γ = β = 4 at start)."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec) -> None:
        super().__init__()
        stats_shape = group_for_stats(weight.detach(), spec)[0].shape[:-1] + (1,)
        self.upper = nn.Parameter(torch.full(stats_shape, CLIP_INIT, device=weight.device))
        self.lower = nn.Parameter(torch.full(stats_shape, CLIP_INIT, device=weight.device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.upper), torch.sigmoid(self.lower)

    @torch.no_grad()
    def search(self, weight: torch.Tensor, spec: QuantSpec, importance: torch.Tensor) -> torch.Tensor:
        """Start each group's bounds at the shrink factor (one for both bounds) with the lowest
        rounding error ``Σ_j h_j (Q(W)_ij - W_ij)²`` over the group, where ``h_j`` is the mean
        square of input channel ``j``: the expected squared output error of the group's row, up to
        the correlations between channels. ``weight`` is the (smoothed) weight being quantized.
        The factors tried run from σ(4), the fixed start, down to 1/2 (a tie keeps the larger), so
        the error never grows. Returns the chosen factors.
        """
        w = weight.detach().float()
        top = torch.sigmoid(torch.tensor(CLIP_INIT)).item()
        best = torch.full_like(self.upper, top)
        best_err = torch.full_like(self.upper, float("inf"))
        for factor in torch.linspace(top, CLIP_SEARCH_LOWEST, CLIP_SEARCH_STEPS).tolist():
            shrink = torch.full_like(self.upper, factor)
            err = group_sums((fake_quantize(w, spec, shrink, shrink) - w).square() * importance, spec)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, shrink, best)
        self.upper.copy_(torch.logit(best))
        self.lower.copy_(torch.logit(best))
        return best


class WeightTransform:
    """The learnable pieces acting on one linear; the parameters are owned elsewhere."""

    def __init__(self) -> None:
        self.col_scale: list[Vector] = []
        self.col_shift: Vector | None = None
        self.row_scale: list[Vector] = []
        self.row_shift: Vector | None = None
        self.clipping: LearnableClipping | None = None
        self.rotation_vector: nn.Parameter | None = None  # per output row, shape (out_features, 1)
        self.rounding: nn.Parameter | None = None  # per weight, in grid steps, within ±ROUNDING_LIMIT
        # the linear's run-time Hadamard rotation of its input (``hadamard``), which the column
        # factors act before
        self.input_rotation: torch.Tensor | None = None

    def unrotated(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` in the basis of the linear's input before its run-time rotation (if any)."""
        if self.input_rotation is None:
            return weight
        return weight @ self.input_rotation.to(weight.dtype).T

    def _factors(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor | None]:
        """The column and row factors, and the run-time input rotation that the column factors
        act before (a rotation without column factors or shift leaves the stored weight as it is)."""
        smoothed_columns = bool(self.col_scale) or self.col_shift is not None
        rotation = self.input_rotation if smoothed_columns else None
        return tuple(col() for col in self.col_scale), tuple(row() for row in self.row_scale), rotation

    def _bias(
        self, weight: torch.Tensor, bias: torch.Tensor | None, rows: tuple[torch.Tensor, ...], rotation
    ) -> torch.Tensor | None:
        b = None if bias is None else bias.float()
        if self.col_shift is not None:
            w = weight.float() if rotation is None else self.unrotated(weight.float())
            shifted = w @ self.col_shift()
            b = shifted if b is None else b + shifted
        if self.row_shift is not None:
            b = -self.row_shift() if b is None else b - self.row_shift()
        for r in rows:
            b = None if b is None else b / r
        return b

    def transformed(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The smoothed, still unquantized weight and bias."""
        cols, rows, rotation = self._factors()
        return _smoothed(weight.float(), cols, rows, rotation), self._bias(weight, bias, rows, rotation)

    def _clip_factors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The learned clipping factors (upper, lower), or ``None`` for both without clipping."""
        return self.clipping.factors() if self.clipping is not None else (None, None)

    def weight_and_bias(
        self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the linear computes with: the transformed weight fake-quantized with the learned
        clipping range and rounding offsets, times the rotation vector; the transformed bias. The
        weight's chain runs as one fused kernel inside :func:`compiled_quantizer`."""
        cols, rows, rotation = self._factors()
        w = fused(
            _smoothed_quantized,
            weight,
            cols,
            rows,
            rotation,
            spec,
            *self._clip_factors(),
            self.rounding,
            self.rotation_vector,
        )
        return w, self._bias(weight, bias, rows, rotation)

    @torch.no_grad()
    def final_grid(
        self, weight: torch.Tensor, spec: QuantSpec, _current: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step size and zero point of each group of the folded weight
        (:meth:`final_weight_and_bias`): the learned clipping range of the transformed weight, the
        step times the row's rotation vector."""
        w, _ = self.transformed(weight, None)
        scale, zero = weight_groups_grid(w, spec, *self._clip_factors())
        if self.rotation_vector is not None:
            scale = scale * self.rotation_vector.reshape(-1, *[1] * (scale.dim() - 1))
        return scale, zero

    @torch.no_grad()
    def final_weight_and_bias(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: QuantSpec,
        round_weight: WeightRounding | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What folding writes: :meth:`weight_and_bias`, or, with ``round_weight`` (GPTQ's, from
        :meth:`lrquant.quant.gptq.GPTQStatistics.rounding`), the transformed weight rounded by it
        on the same grid (learned clipping bounds, step times the rotation vector) instead of to
        nearest."""
        if round_weight is None or not spec.enabled:
            return self.weight_and_bias(weight, bias, spec)
        w, b = self.transformed(weight, bias)
        scale, zero = weight_grid(w, spec, *self._clip_factors())
        if self.rotation_vector is not None:
            scale = scale * self.rotation_vector
        return round_weight(w, spec, scale, zero), b


def _smoothed(
    w: torch.Tensor,
    cols: tuple[torch.Tensor, ...],
    rows: tuple[torch.Tensor, ...],
    rotation: torch.Tensor | None,
) -> torch.Tensor:
    """``diag(1/r) · W · diag(c)``, with the columns taken before a run-time input rotation
    ``R`` (``W`` stores ``W R``): ``diag(1/r) · W Rᵀ · diag(c) · R``."""
    if rotation is not None:
        w = w @ rotation.to(w.dtype).T
    for c in cols:
        w = w * c
    if rotation is not None:
        w = w @ rotation.to(w.dtype)
    for r in rows:
        w = w / r[:, None]
    return w


def _smoothed_quantized(
    weight: torch.Tensor,
    cols: tuple[torch.Tensor, ...],
    rows: tuple[torch.Tensor, ...],
    rotation: torch.Tensor | None,
    spec: QuantSpec,
    upper: torch.Tensor | None,
    lower: torch.Tensor | None,
    offset: torch.Tensor | None,
    rotation_vector: torch.Tensor | None,
) -> torch.Tensor:
    """The weight a learned linear computes with (:meth:`WeightTransform.weight_and_bias`)."""
    w = _smoothed(weight.float(), cols, rows, rotation)
    if spec.enabled:
        w = quantize_dequantize(w, spec, upper, lower, offset)
    return w if rotation_vector is None else w * rotation_vector
