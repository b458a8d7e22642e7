"""A linear layer that fake-quantizes its weight and, per token, its input."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrquant.config import QuantSpec
from lrquant.quant.gptq import WeightRounding
from lrquant.quant.quantizer import fake_quantize, weight_groups_grid
from lrquant.transforms.weight import WeightTransform


def rotate_input(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x`` times the fixed orthogonal ``rotation`` (``None``: ``x`` unchanged)."""
    return x if rotation is None else x @ rotation.to(x.dtype)


class RotatedInputLinear(nn.Linear):
    """``nn.Linear`` that first multiplies its input by a fixed orthogonal ``input_rotation``
    (``hadamard=online``: the down projection's input). State-dict keys are those of a plain linear;
    the rotation is saved beside the checkpoint (see :mod:`lrquant.checkpoint`)."""

    def __init__(self, linear: nn.Linear, rotation: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("input_rotation", rotation, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rotate_input(x, self.input_rotation), self.weight, self.bias)


@contextmanager
def weights_held(module: nn.Module) -> Iterator[None]:
    """Within, every :class:`QuantLinear` of ``module`` that still learns (has a transform) uses
    the weight and bias it computed on entry, instead of computing them again at every forward:
    for passes that change no transform and take no gradients (statistics, scores). Enter it
    inside the pass's autocast, so the held weights are those its forwards would compute."""
    linears = [m for m in module.modules() if isinstance(m, QuantLinear) and m.transform is not None]
    with torch.no_grad():
        for m in linears:
            m.held = m.weight_and_bias()
    try:
        yield
    finally:
        for m in linears:
            m.held = None


class QuantLinear(nn.Linear):
    """Drop-in ``nn.Linear`` that shares the original ``weight``/``bias`` parameters.

    The forward quantizes the input with ``act_spec`` (dynamic: statistics of this very input)
    and the weight with ``weight_spec``. After :meth:`freeze_weight` the stored weight already lies
    on the grid and is used as it is. While a block is being learned, ``transform`` (smoothing,
    clipping, rotation vector) decides the weight; :meth:`fold_transform` writes its result in place.
    State-dict keys are those of the wrapped linear. A wrapped :class:`RotatedInputLinear` keeps its
    ``input_rotation``, applied before the input is quantized.
    """

    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.weight_frozen = not weight_spec.enabled
        self.transform: WeightTransform | None = None
        self.held: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see weights_held
        self.register_buffer("input_rotation", getattr(linear, "input_rotation", None), persistent=False)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses (dequantized values on the quantization grid)."""
        if self.weight_frozen:
            return self.weight
        return fake_quantize(self.weight, self.weight_spec)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the forward computes with."""
        if self.held is not None:
            return self.held
        if self.transform is not None:
            return self.transform.weight_and_bias(self.weight, self.bias, self.weight_spec)
        return self.quantized_weight(), self.bias

    @property
    def grid(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Step size and zero point of each weight group once the weight is on its final grid
        (``weight = scale · (q - zero)``, integer ``q``), else ``None``. Buffers outside the
        state dict (``weight_scale``, ``weight_zero``): they move with the module, its keys stay
        those of the wrapped linear."""
        scale = getattr(self, "weight_scale", None)
        return None if scale is None else (scale, self.weight_zero)

    def set_grid(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Record the grid the weight was put on (see :attr:`grid`)."""
        self.register_buffer("weight_scale", scale.detach().float().contiguous(), persistent=False)
        self.register_buffer("weight_zero", zero.detach().float().contiguous(), persistent=False)

    @torch.no_grad()
    def fold_transform(self, round_weight: WeightRounding | None = None) -> None:
        """Write what the transform computes into ``weight``/``bias``, record its grid and drop
        the transform. ``round_weight`` (GPTQ's) rounds the weight onto that grid instead of
        rounding to nearest."""
        if self.transform is None:
            return
        if self.weight_spec.enabled:
            self.set_grid(*self.transform.final_grid(self.weight, self.weight_spec, self.grid))
        weight, bias = self.transform.final_weight_and_bias(
            self.weight, self.bias, self.weight_spec, round_weight
        )
        self.weight.copy_(weight)
        if bias is not None:
            if self.bias is None:
                self.bias = nn.Parameter(bias.to(self.weight.dtype))
            else:
                self.bias.copy_(bias)
        self.transform = None
        self.weight_frozen = True

    @torch.no_grad()
    def freeze_weight(self) -> None:
        """Write the quantized weight into ``weight`` once, so later forwards skip quantizing it."""
        if not self.weight_frozen:
            self.set_grid(*weight_groups_grid(self.weight, self.weight_spec))
            self.weight.copy_(fake_quantize(self.weight, self.weight_spec))
            self.weight_frozen = True

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` (or :class:`RotatedInputLinear`) with the current weight, for saving."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear if self.input_rotation is None else RotatedInputLinear(linear, self.input_rotation)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the weight multiplies: ``x`` rotated (where the linear has an input rotation) and
        fake-quantized per token."""
        return fake_quantize(rotate_input(x, self.input_rotation), self.act_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight_and_bias()
        return F.linear(self.quantized_input(x), weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"w{self.weight_spec.bits}, a{self.act_spec.bits}"
            + (", input rotated" if self.input_rotation is not None else "")
        )
