"""Typed, validated quantization settings.

Every field is checked where it enters (``extra="forbid"``: a misspelt key is an error, not a
silent default), so the rest of the package can trust these objects.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from lrquant.errors import LrquantError

Granularity = Literal["tensor", "channel", "group", "token"]
FULL_PRECISION_BITS = 16


def _check_bits(value: int) -> int:
    if value != FULL_PRECISION_BITS and not 2 <= value <= 8:
        raise ValueError(f"must be 2 to 8, or {FULL_PRECISION_BITS} for full precision (got {value})")
    return value


class QuantSpec(BaseModel):
    """How one tensor is fake-quantized: a uniform affine grid of ``bits`` bits.

    Statistics are reduced over the last dimension: per output channel for a ``[out, in]``
    weight, per token for a ``[..., tokens, features]`` activation, per group of ``group_size``
    consecutive input columns for ``granularity="group"``, or over the whole tensor.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = FULL_PRECISION_BITS
    symmetric: bool = False
    granularity: Granularity = "channel"
    group_size: int | None = None
    # the grid spans this fraction of each group's [min, max] (values beyond it are clamped):
    # activation clipping, which trades a few large values for a finer grid everywhere else
    clip_ratio: float = 1.0

    @field_validator("bits")
    @classmethod
    def _valid_bits(cls, value: int) -> int:
        return _check_bits(value)

    @field_validator("group_size")
    @classmethod
    def _positive_group(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1 (got {value})")
        return value

    @field_validator("clip_ratio")
    @classmethod
    def _valid_clip(cls, value: float) -> float:
        if not 0.5 <= value <= 1.0:
            raise ValueError(f"must be between 0.5 and 1 (got {value})")
        return value

    @model_validator(mode="after")
    def _group_needs_size(self) -> QuantSpec:
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs a group_size")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity 'group', not '{self.granularity}'")
        return self

    @property
    def enabled(self) -> bool:
        """Whether this spec changes the tensor at all (16 bits is the identity)."""
        return self.bits < FULL_PRECISION_BITS


class QuantScheme(BaseModel):
    """The whole model's quantization settings: weights, linear inputs and attention tensors.

    ``post_act``, when set, replaces ``activation`` for the input of the MLP's second linear
    (the GELU/SiLU output: the hardest activation of vision transformers). ``head`` also
    quantizes the output head (LM head or classifier; round-to-nearest, it is not learned);
    ``patch_embed`` the weight of a vision model's patch embedding (round-to-nearest; its input,
    the normalised pixels, stays in full precision). ``projector`` the linears of a
    vision-language model's projector, between its vision tower and its language model (weights
    round-to-nearest, inputs at the activation grid; not learned). ``rotate_qkv`` multiplies each head of Q, K
    and V by a fixed Hadamard matrix before they are quantized, and the attention output back
    (exact without quantization; :mod:`lrquant.quant.attention`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: QuantSpec = QuantSpec(bits=4, granularity="channel")
    activation: QuantSpec = QuantSpec(bits=FULL_PRECISION_BITS, granularity="token")
    qkv: QuantSpec = QuantSpec(bits=FULL_PRECISION_BITS, granularity="token")
    softmax: QuantSpec = QuantSpec(bits=FULL_PRECISION_BITS, granularity="token")
    post_act: QuantSpec | None = None
    head: bool = False
    patch_embed: bool = False
    projector: bool = False
    rotate_qkv: bool = False
    weight_grids: dict[str, QuantSpec] = {}
    gguf_type: str | None = None

    def weight_for(self, name: str) -> QuantSpec:
        """The weight grid of the linear called ``name`` (relative to the model)."""
        return self.weight_grids.get(name, self.weight)

    @property
    def weight_specs(self) -> list[QuantSpec]:
        """Every weight grid the scheme uses."""
        return [self.weight, *self.weight_grids.values()]

    @property
    def mlp_out_activation(self) -> QuantSpec:
        """The input quantizer of the MLP's second linear."""
        return self.activation if self.post_act is None else self.post_act

    @property
    def quantized_linear_inputs(self) -> list[QuantSpec]:
        """The enabled input quantizers of linears (where activation clipping applies)."""
        return [s for s in (self.activation, self.mlp_out_activation) if s.enabled]

    @property
    def name(self) -> str:
        """Short label such as ``W4A16g128`` or ``W4A4``."""
        label = f"W{self.weight.bits}A{self.activation.bits}"
        if self.weight.granularity == "group":
            label += f"g{self.weight.group_size}"
        if self.post_act is not None and self.post_act != self.activation:
            label += f"p{self.post_act.bits}"
        clipped = [s.clip_ratio for s in self.quantized_linear_inputs]
        if clipped and min(clipped) < 1:
            label += f"c{min(clipped):g}"
        if self.weight_grids:  # a type or mix by name, else rules per tensor
            simple = self.gguf_type and not any(c in self.gguf_type for c in ",=")
            label += f"+{self.gguf_type if simple else 'GGUF types'}"
        return label

    @property
    def quantizes_activations(self) -> bool:
        """True when anything besides the weights is quantized at run time."""
        specs = (self.activation, self.qkv, self.softmax, self.mlp_out_activation)
        return any(spec.enabled for spec in specs)


def build_scheme(
    wbits: int = 4,
    abits: int = FULL_PRECISION_BITS,
    group_size: int | None = None,
    w_symmetric: bool = False,
    a_symmetric: bool = False,
    w_granularity: Granularity | None = None,
    qkv_bits: int | None = None,
    softmax_bits: int = FULL_PRECISION_BITS,
    post_act_bits: int | None = None,
    head: bool = False,
    patch_embed: bool = False,
    projector: bool = False,
    a_clip: float = 1.0,
    rotate_qkv: bool = False,
) -> QuantScheme:
    """Build a scheme from flat settings, as the command line gives them.

    Weights are per output channel, or per group when ``group_size`` is given. Linear inputs are
    quantized per token. Q, K and V (after rotary embedding) follow ``abits`` unless ``qkv_bits``
    says otherwise; the softmax output stays in full precision unless ``softmax_bits`` is set;
    the MLP activation output (input of its second linear) follows ``abits`` unless
    ``post_act_bits`` is given. ``a_clip`` shrinks each token's range of every linear input
    (not Q, K, V) to that fraction of its min and max. ``rotate_qkv`` rotates each head of Q, K
    and V before they are quantized.
    Raises :class:`LrquantError` naming the bad setting.
    """
    if w_granularity is None:
        w_granularity = "group" if group_size is not None else "channel"
    scheme = QuantScheme(
        weight=_spec(
            "weight", bits=wbits, symmetric=w_symmetric, granularity=w_granularity, group_size=group_size
        ),
        activation=_spec(
            "activation", bits=abits, symmetric=a_symmetric, granularity="token", clip_ratio=a_clip
        ),
        qkv=_spec(
            "qkv", bits=abits if qkv_bits is None else qkv_bits, symmetric=a_symmetric, granularity="token"
        ),
        softmax=_spec("softmax", bits=softmax_bits, granularity="token"),
        post_act=None
        if post_act_bits is None
        else _spec(
            "post_act", bits=post_act_bits, symmetric=a_symmetric, granularity="token", clip_ratio=a_clip
        ),
        head=head,
        patch_embed=patch_embed,
        projector=projector,
        rotate_qkv=rotate_qkv,
    )
    if a_clip != 1.0 and not scheme.quantized_linear_inputs:
        raise LrquantError(
            f"activation clipping ({a_clip}) only changes quantized linear inputs: set --abits "
            "(or --post-act-bits) below 16, or leave the clipping at 1"
        )
    if rotate_qkv and not scheme.qkv.enabled:
        raise LrquantError(
            "rotating Q, K and V (--rotate-qkv) only changes how they are quantized: set --abits "
            "(or --qkv-bits) below 16, or leave the rotation off"
        )
    return scheme


def _spec(label: str, **fields: object) -> QuantSpec:
    try:
        return QuantSpec(**fields)
    except ValidationError as err:
        raise LrquantError(describe_validation_error(err, f"invalid {label} quantization")) from None


def describe_validation_error(err: ValidationError, what: str = "invalid settings") -> str:
    """One line naming each bad field and why, from a pydantic error."""
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"])  # empty for a check across fields
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where} {message}" if where else message)
    return f"{what}: " + "; ".join(parts)
