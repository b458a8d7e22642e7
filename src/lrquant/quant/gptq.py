"""GPTQ: round a weight column by column, pushing each column's rounding error onto the columns
not yet rounded, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2023,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Here it rounds on a grid fixed beforehand (each group's step and zero point from its clipped
min/max, "static groups"), so it composes with learned clipping bounds and rotation vectors: they
choose the grid, GPTQ chooses which grid point each weight takes. Columns are visited in order of
falling input energy (``diag(H)``, "act order"), which the fixed grid makes free for group-wise
quantization.

Inside the block-wise learner, :class:`GPTQStatistics` holds what one block's linears are rounded
against (their input Hessians and the damping): collected after the block is learned, passed to
its folding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lrquant.config import QuantSpec
from lrquant.console import log
from lrquant.quant.quantizer import group_for_stats, group_grid, integer_range, ungroup

BLOCK_COLUMNS = 128  # columns updated together (the lazy batch update of the paper)

# rounds a weight onto the grid ``scale``/``zero`` (both shaped like it); returns the dequantized weight
WeightRounding = Callable[[torch.Tensor, QuantSpec, torch.Tensor, torch.Tensor], torch.Tensor]


class HessianAccumulator:
    """``H = mean over tokens of x xᵀ`` for one linear's inputs, summed in float32."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().flatten(0, -2).float()
        gram = x.T @ x
        self.sum = gram if self.sum is None else self.sum + gram
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.sum is None:
            raise ValueError("no inputs were recorded for this linear")
        return self.sum / self.tokens


def weight_grid(
    weight: torch.Tensor,
    spec: QuantSpec,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and zero point of every weight, shaped like ``weight``: what
    :func:`~lrquant.quant.quantizer.fake_quantize` would use for it with the same bounds."""
    wg, pad = group_for_stats(weight, spec)
    scale, zero = group_grid(wg, spec, upper, lower)
    return (
        ungroup(scale.expand_as(wg).contiguous(), weight, pad),
        ungroup(zero.expand_as(wg).contiguous(), weight, pad),
    )


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``H⁻¹`` after damping, raising the damping until it exists.
    Holds at most three matrices of ``H``'s size at once (``H``, the damped copy or the factor,
    the inverse or its factor)."""
    mean_diag = hessian.diagonal().mean().clamp(min=1e-12)
    for attempt in range(6):
        damped = hessian.clone()
        damped.diagonal().add_(
            torch.ones((), dtype=hessian.dtype, device=hessian.device) * (damp * 10**attempt) * mean_diag
        )
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                if attempt:
                    log(f"GPTQ: the input Hessian needed damping {damp * 10**attempt:g} (asked {damp:g})")
                return upper
    raise torch.linalg.LinAlgError("the input Hessian is not positive definite even after damping")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor,
    zero: torch.Tensor,
    damp: float = 0.01,
) -> torch.Tensor:
    """``weight`` rounded onto the grid ``scale``/``zero`` (both shaped like it) so as to minimise
    ``tr((Q - W) H (Q - W)ᵀ)`` greedily, column by column; returns the dequantized weight.

    ``hessian`` is the mean ``x xᵀ`` of the layer's inputs. Input channels that never fire (zero
    diagonal) are rounded to nearest and pass no error on.
    """
    scale, zero = scale.float(), zero.float()
    qmin, qmax = integer_range(spec.bits, spec.symmetric)
    diagonal = hessian.detach().float().diagonal().clone()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    order = torch.argsort(diagonal, descending=True)
    h = hessian.detach().float()[order][:, order]  # a copy, in the order GPTQ rounds the columns
    h.diagonal()[dead[order]] = 1.0  # channels that never fire: rounded to nearest, no error passed on
    hinv = _inverse_hessian_factor(h, damp)
    del h
    w, scale, zero = weight.detach().float()[:, order], scale[:, order], zero[:, order]
    out = torch.empty_like(w)
    columns = w.shape[1]
    for start in range(0, columns, BLOCK_COLUMNS):
        end = min(start + BLOCK_COLUMNS, columns)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = block[:, i]
            s, z = scale[:, start + i], zero[:, start + i]
            q = (torch.clamp(torch.round(col / s) + z, qmin, qmax) - z) * s
            out[:, start + i] = q
            err = (col - q) / hinv_block[i, i]
            block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    restore = torch.argsort(order)
    return out[:, restore].to(weight.dtype)


@dataclass(frozen=True)
class GPTQStatistics:
    """What GPTQ rounds one block's folded weights against (``gptq``): the input Hessian of each
    quantized linear (the mean ``x xᵀ`` of its inputs, by the linear's name in the block) and
    GPTQ's relative damping (``gptq_damp``)."""

    hessians: dict[str, torch.Tensor]
    damp: float = 0.01

    def rounding(self, name: str) -> WeightRounding | None:
        """How folding rounds the weight of the linear ``name``: by :func:`gptq_quantize` against its
        Hessian; None (round to nearest) for a linear without one."""
        hessian = self.hessians.get(name)
        if hessian is None:
            return None

        def round_onto(weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor):
            return gptq_quantize(weight, hessian, spec, scale, zero, self.damp)

        return round_onto
