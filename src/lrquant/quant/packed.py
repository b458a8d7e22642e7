"""Linears that compute with the integer codes on real low-bit CPU kernels.

:class:`Int4WeightLinear` keeps 4-bit codes packed two per byte and multiplies a float input with
``aten._weight_int4pack_mm_for_cpu`` (W4A16); :class:`Int8Linear` quantizes its input per token to
int8 as lrquant's activation quantizer does and multiplies with ``torch._int_mm`` (W8A8).
:func:`pack_linears` puts them into a model in place of its quantized linears.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrquant.arch import get_arch_spec
from lrquant.config import QuantSpec
from lrquant.errors import LrquantError
from lrquant.export import IntegerLinear, QuantizedOutput
from lrquant.quant.apply import replace_module
from lrquant.quant.linear import QuantLinear
from lrquant.quant.quantizer import group_grid, integer_codes, integer_range, weight_groups_grid

# The CPU int4 kernel takes only these group sizes, K a multiple of the group and N of 16.
INT4_GROUPS = (256, 128, 64, 32)
INT4_N_MULTIPLE = 16
INT4_CENTER = 8  # the kernel computes (q - 8) · scale + zero
BACKENDS = ("packed", "fake")  # real kernels, or lrquant's simulated (fake-quantized) linears
SIMULATED = "run it simulated with --backend fake"


def _kernel_group(group: int) -> int | None:
    """The largest group size the int4 kernel takes that divides ``group``: a grid with groups of
    ``group`` is the same grid with groups of it, each step repeated."""
    return next((size for size in INT4_GROUPS if group % size == 0), None)


def centred(linear: IntegerLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear``'s codes (int16) and zero points moved by the same integer so that the codes are
    centred on 0 (signed codes already are; unsigned ones on ``[0, 2^b)`` move to
    ``[-2^(b-1), 2^(b-1))``): the same weights, ``scale · (codes - zero)``, on a signed grid."""
    offset = 0 if linear.symmetric else 2 ** (linear.bits - 1)
    return linear.codes.to(torch.int16) - offset, linear.zero - offset


@torch.no_grad()  # a weight that requires grad would keep its graph alive in the codes and steps
def round_to_nearest(
    weight: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None = None
) -> IntegerLinear:
    """``weight`` rounded to nearest on the grid ``spec`` gives it, as the integers a quantized output
    keeps (for models quantized in memory, without an output folder)."""
    scale, zero = weight_groups_grid(weight, spec)
    codes = integer_codes(weight, spec, scale, zero)
    return IntegerLinear(
        codes=codes.to(torch.int8 if spec.symmetric else torch.uint8),
        scale=scale.reshape(weight.shape[0], -1),
        zero=zero.reshape(weight.shape[0], -1),
        bias=None if bias is None else bias.detach().float(),
        bits=spec.bits,
        symmetric=spec.symmetric,
        group_size=spec.group_size,
    )


def int4_refusal(linear: IntegerLinear) -> str | None:
    """Why :class:`Int4WeightLinear` cannot run ``linear`` (with 16-bit inputs), or None."""
    if linear.bits > 4:
        return f"{linear.bits}-bit weights with 16-bit activations have no packed CPU kernel here"
    group = linear.group_size
    if group is not None and group < linear.codes.shape[1] and _kernel_group(group) is None:
        return f"group size {group}: the CPU int4 kernel takes groups of 32, 64, 128 or 256 (or multiples)"
    return None


class Int4WeightLinear(nn.Module):
    """A linear with weights of at most 4 bits packed for ``aten._weight_int4pack_mm_for_cpu``.

    The input is cast to ``dtype`` (bfloat16, float16 or float32; the steps and zero points are
    kept in it too, so bfloat16 rounds them to 8 significant bits). Inputs and outputs the kernel
    cannot take (K not a multiple of the group, N not of 16, a shorter last group) are padded
    with zeros, which changes no result.
    """

    @torch.no_grad()
    def __init__(self, linear: IntegerLinear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        reason = int4_refusal(linear)
        if reason is not None:
            raise LrquantError(f"cannot pack this linear for the int4 kernel: {reason}")
        out_features, in_features = linear.codes.shape
        self.in_features, self.out_features, self.bits = in_features, out_features, linear.bits
        # one group per row: any size the kernel takes that tiles the (padded) row
        row = -(-in_features // INT4_GROUPS[-1]) * INT4_GROUPS[-1]
        group = linear.group_size if linear.group_size and linear.group_size < in_features else row
        self.group = _kernel_group(group)
        padded_in = -(-in_features // group) * group
        padded_out = -(-out_features // INT4_N_MULTIPLE) * INT4_N_MULTIPLE
        codes, zero = centred(linear)
        codes = codes.to(torch.int32) + INT4_CENTER
        codes = F.pad(codes, (0, padded_in - in_features, 0, padded_out - out_features), value=INT4_CENTER)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
        # each kernel group's lrquant group; with centred codes c and kernel codes u = c + 8,
        # w = scale·(c - z) = (u - 8)·scale - scale·z: small terms, so bfloat16 rounds them little
        columns = torch.arange(0, padded_in, self.group) // (linear.group_size or padded_in)
        scale = F.pad(linear.scale[:, columns], (0, 0, 0, padded_out - out_features))
        zero = F.pad(zero[:, columns], (0, 0, 0, padded_out - out_features))
        pairs = torch.stack([scale, -scale * zero], dim=-1).transpose(0, 1)
        self.register_buffer("scales_and_zeros", pairs.contiguous().to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.scales_and_zeros.dtype
        flat = x.reshape(-1, self.in_features).to(dtype)
        padded_in = self.packed.shape[1] * 2
        if padded_in != self.in_features:
            flat = F.pad(flat, (0, padded_in - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.contiguous(), self.packed, self.group, self.scales_and_zeros
        )
        y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        size = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{size}, w{self.bits} on the 4-bit kernel, groups of {self.group}"


def int8_refusal(linear: IntegerLinear, activation: QuantSpec) -> str | None:
    """Why :class:`Int8Linear` cannot run ``linear`` with input ``activation``, or None."""
    if activation.bits != 8:
        return f"{activation.bits}-bit activations: the int8 kernel takes 8-bit activations only"
    if linear.group_size is not None and linear.group_size < linear.codes.shape[1]:
        return f"weight groups of {linear.group_size}: the int8 kernel takes one step per output channel"
    return None


class Int8Linear(nn.Module):
    """A linear with weights of at most 8 bits (one step per output channel) whose input is quantized
    per token to 8 bits, dynamically, exactly as :func:`lrquant.quant.quantizer.fake_quantize` does
    with ``activation``; the integer product runs on ``torch._int_mm``.

    With input codes ``a - za`` and weight codes ``c - zw`` (both centred into int8), the product is
    ``Σ (a - za)(c - zw) = a·c - zw·Σa - za·Σ(c - zw)``: the kernel computes ``a·c`` and the zero
    points enter as two corrections (zero when the grids are symmetric), then the steps rescale.
    """

    @torch.no_grad()
    def __init__(self, linear: IntegerLinear, activation: QuantSpec) -> None:
        super().__init__()
        reason = int8_refusal(linear, activation)
        if reason is not None:
            raise LrquantError(f"cannot pack this linear for the int8 kernel: {reason}")
        self.out_features, self.in_features = linear.codes.shape
        self.bits, self.activation = linear.bits, activation
        codes, zero = centred(linear)
        zero = zero[:, 0]
        self.register_buffer("codes", codes.to(torch.int8))  # [out, in]; the kernel reads its transpose
        self.register_buffer("weight_scale", linear.scale[:, 0].float())
        self.register_buffer("weight_zero", zero.float())
        self.register_buffer(
            "code_sums", (codes.double().sum(dim=1) - zero.double() * self.in_features).float()
        )
        self.register_buffer("bias", None if linear.bias is None else linear.bias.float())
        self.weight_asymmetric = bool(zero.any())

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int8 codes ``[tokens, in]`` of ``x`` with each token's step and (centred) zero point."""
        scale, zero = group_grid(x, self.activation, None, None)
        zero = zero.round()
        qmin, qmax = integer_range(self.activation.bits, self.activation.symmetric)
        codes = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
        offset = 0 if self.activation.symmetric else 2 ** (self.activation.bits - 1)
        return (codes - offset).to(torch.int8), scale, zero - offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        codes, scale, zero = self.quantize_input(flat)
        acc = torch._int_mm(codes, self.codes.t()).float()
        if not self.activation.symmetric:
            acc = acc - zero * self.code_sums
        if self.weight_asymmetric:
            acc = acc - codes.sum(dim=1, keepdim=True, dtype=torch.int32).float() * self.weight_zero
        y = acc * scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w{self.bits}a8"


def _activation(model: nn.Module, name: str, output: QuantizedOutput) -> QuantSpec:
    """The input quantizer of the linear ``name``: its own on lrquant's simulated model, else the
    scheme's (the MLP's second linear may have its own, ``post_act``)."""
    module = model.get_submodule(name)
    if isinstance(module, QuantLinear):
        return module.act_spec
    mlp_out = get_arch_spec(output.model_type).mlp_out
    return output.scheme.mlp_out_activation if name.endswith(mlp_out) else output.scheme.activation


def pack_linears(model: nn.Module, output: QuantizedOutput, backend: str = "packed") -> int:
    """With ``backend="packed"``, replace each quantized linear of ``model`` (the keys of
    ``output.linears``; plain ``nn.Linear`` or lrquant's ``QuantLinear``) with one that computes on a
    real low-bit kernel, and return how many were replaced (``"fake"`` replaces none):
    :class:`Int4WeightLinear` for weights of at most 4 bits with 16-bit activations, in bfloat16
    whatever the model's dtype (the kernel's float32 path is about 70x slower), and
    :class:`Int8Linear` for 8-bit activations (an exact integer product, rescaled in float32).
    The rest of the model keeps its dtype; quantizers of Q, K, V or the softmax that the model
    carries stay simulated.

    Every linear is checked before any is replaced: a scheme with no kernel here is refused in one
    line, and the model is left as it was.
    """
    if backend not in BACKENDS:
        raise LrquantError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    if backend == "fake":
        return 0
    plans = []
    for name, linear in output.linears.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:  # a model of another architecture than the output's
            module = None
        if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != tuple(linear.codes.shape):
            raise LrquantError(
                f"'{name}' of the model is not the {tuple(linear.codes.shape)} linear of '{output.folder}'"
            )
        activation = _activation(model, name, output)
        reason = int8_refusal(linear, activation) if activation.enabled else int4_refusal(linear)
        if reason is not None:
            raise LrquantError(f"{output.scheme.name} has no packed CPU kernel ({reason}): {SIMULATED}")
        plans.append((name, linear, activation))
    for name, linear, activation in plans:
        packed = Int8Linear(linear, activation) if activation.enabled else Int4WeightLinear(linear)
        replace_module(model, name, packed)
    return len(plans)
