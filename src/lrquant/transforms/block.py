"""Wire the learnable transforms of one block from its architecture map, and fold them back.

Each smoothing pair of the map becomes one :class:`SmoothingFactor`; each quantized linear gets a
:class:`WeightTransform` listing the factors acting on its columns and rows, its clipping bounds
and its rotation vector (a learned per-row multiplier). Grouped-query attention and rotary
embeddings decide how a factor's entries map onto channels, so that every transform stays an
exact equivalence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from lrquant.arch import ArchSpec, SmoothPair
from lrquant.quant.apply import replace_module
from lrquant.quant.gptq import GPTQStatistics
from lrquant.quant.linear import QuantLinear
from lrquant.transforms.smoothing import (
    SmoothedNorm,
    SmoothingFactor,
    fold_into_norm,
    log_activation_equivalent,
    smoothquant_scale,
)
from lrquant.transforms.weight import ROUNDING_LIMIT, LearnableClipping, WeightTransform

ScaleInit = Literal["lae", "smoothquant", "ones", "best"]
SEARCHED_INITS: tuple[str, ...] = ("lae", "smoothquant", "ones")


@dataclass(frozen=True)
class AttentionLayout:
    """Head counts of a model's attention: query heads, key/value heads, head size."""

    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> AttentionLayout:
        heads = config.num_attention_heads
        # Qwen2-VL's tower is embed_dim wide (its hidden_size is the language model's)
        width = config.embed_dim if config.model_type == "qwen2_vl_vision" else config.hidden_size
        head_dim = getattr(config, "head_dim", None) or width // heads
        return cls(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)

    @classmethod
    def of_block(cls, block: nn.Module, arch: ArchSpec, config) -> AttentionLayout:
        """The layout of one block's attention: from the config, or from the attention module where
        heads differ between stages (Swin lists one head count per stage)."""
        if isinstance(getattr(config, "num_attention_heads", None), int):
            return cls.from_config(config)
        attention = block.get_submodule(arch.attention)
        heads = attention.num_attention_heads
        return cls(heads, heads, attention.head_dim)

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def kv_to_query(self, v: torch.Tensor) -> torch.Tensor:
        """Spread a per-(kv channel) vector over the query heads that read that kv head."""
        return v.view(self.kv_heads, self.head_dim).repeat_interleave(self.groups, dim=0).flatten()

    def query_to_kv_max(self, x: torch.Tensor) -> torch.Tensor:
        """Reduce a per-(query channel) statistic to its kv head by the maximum over the group."""
        return x.view(self.kv_heads, self.groups, self.head_dim).amax(dim=1).flatten()


@dataclass
class ChannelStats:
    """Per-channel minimum and maximum of one linear's input over the calibration tokens."""

    min: torch.Tensor
    max: torch.Tensor

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())

    @property
    def mid(self) -> torch.Tensor:
        return (self.min + self.max) / 2


@dataclass(frozen=True)
class TransformOptions:
    """Which transforms to build for a block (a recipe's switches)."""

    smoothing: ScaleInit | None = "lae"
    alpha: float = 0.5
    shifts: bool = False
    qk_smoothing: bool = True
    clipping: bool = True
    rotation_vectors: bool = True  # the recipe's ``rotation``
    rounding: bool = False


class BlockTransforms(nn.Module):
    """All learnable transform parameters of one block, grouped for the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.factors = nn.ModuleDict()
        self.clipping = nn.ModuleDict()
        self.rotation_vectors = nn.ParameterDict()
        self.rounding = nn.ParameterDict()
        # smoothing="best": each pair's candidate initial scales, by initialisation name
        self.inits: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def use_init(self, how: str) -> None:
        """Set every smoothing pair's scale to its ``how`` candidate (see ``smoothing="best"``)."""
        for name, candidates in self.inits.items():
            self.factors[name].scale.copy_(candidates[how])

    def smoothing_parameters(self) -> list[nn.Parameter]:
        """Scales, shifts and rotation vectors (trained at the transform learning rate)."""
        params = [p for p in self.factors.parameters() if p.requires_grad]
        return params + list(self.rotation_vectors.values())

    def clipping_parameters(self) -> list[nn.Parameter]:
        """Clipping bounds (trained at the clipping learning rate)."""
        return list(self.clipping.parameters())

    def rounding_parameters(self) -> list[nn.Parameter]:
        """Rounding offsets (trained at the rounding learning rate)."""
        return list(self.rounding.values())

    @torch.no_grad()
    def project_(self) -> None:
        """Keep every rounding offset within ±ROUNDING_LIMIT (called after each optimizer step)."""
        for offset in self.rounding.values():
            offset.clamp_(-ROUNDING_LIMIT, ROUNDING_LIMIT)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _init_scale(
    how: ScaleInit, act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    if how in ("lae", "best"):  # "best" starts from LAE; the learner then tries each candidate
        return log_activation_equivalent(act_absmax)
    if how == "smoothquant":
        return smoothquant_scale(act_absmax, weight_absmax, alpha)
    return torch.ones_like(act_absmax)


def attach_block_transforms(
    block: nn.Module,
    arch: ArchSpec,
    layout: AttentionLayout,
    stats: dict[str, ChannelStats],
    options: TransformOptions,
) -> BlockTransforms:
    """Give every quantized linear of ``block`` a :class:`WeightTransform` and wrap smoothed norms.

    ``stats`` holds the input statistics of each pair's first target (keyed by its name in the
    block). The block computes exactly what it computed before until the parameters move, apart
    from quantization itself.
    """
    bt = BlockTransforms()
    linears = {name: m for name, m in block.named_modules() if isinstance(m, QuantLinear)}
    transforms = {name: WeightTransform() for name in linears}
    for name, linear in linears.items():
        linear.transform = transforms[name]
        transforms[name].input_rotation = linear.input_rotation
    if options.smoothing is not None:
        for pair in active_pairs(arch, options):
            _wire_pair(block, pair, arch, layout, stats[pair.targets[0]], options, linears, transforms, bt)
        if options.qk_smoothing and not arch.qk_norm and (arch.q_proj or arch.fused_qkv):
            _wire_qk(arch, layout, transforms, bt, next(iter(linears.values())).weight.device)
    for name, linear in linears.items():
        if not linear.weight_spec.enabled:
            continue
        if options.clipping:
            transforms[name].clipping = bt.clipping[_key(name)] = LearnableClipping(
                linear.weight, linear.weight_spec
            )
        if options.rotation_vectors:
            ones = torch.ones(linear.out_features, 1, device=linear.weight.device)
            bt.rotation_vectors[_key(name)] = nn.Parameter(ones)
            transforms[name].rotation_vector = bt.rotation_vectors[_key(name)]
        if options.rounding:
            zeros = torch.zeros_like(linear.weight, dtype=torch.float32)
            transforms[name].rounding = bt.rounding[_key(name)] = nn.Parameter(zeros)
    return bt


def active_pairs(arch: ArchSpec, options: TransformOptions) -> tuple[SmoothPair, ...]:
    """The smoothing pairs that ``options`` wires: all of them, or none without smoothing."""
    return () if options.smoothing is None else arch.smooth_pairs


def _wire_pair(block, pair: SmoothPair, arch, layout, stat, options, linears, transforms, bt) -> None:
    act_absmax, mid = stat.absmax, stat.mid
    weight_absmax = torch.cat(
        [transforms[t].unrotated(linears[t].weight.detach()).abs() for t in pair.targets]
    ).amax(dim=0)
    if pair.kind == "linear":  # v -> o: one scale per kv channel, shared by the query heads reading it
        act_absmax, mid = layout.query_to_kv_max(act_absmax), layout.query_to_kv_max(mid)
        weight_absmax = layout.query_to_kv_max(weight_absmax)
    shift = mid if options.shifts else None
    factor = SmoothingFactor(_init_scale(options.smoothing, act_absmax, weight_absmax, options.alpha), shift)
    bt.factors[pair.name] = factor
    if options.smoothing == "best":
        bt.inits[pair.name] = {
            how: _init_scale(how, act_absmax, weight_absmax, options.alpha) for how in SEARCHED_INITS
        }
    spread = layout.kv_to_query if pair.kind == "linear" else (lambda v: v)
    for target in pair.targets:
        transforms[target].col_scale.append(lambda f=factor: spread(f.value()))
        if factor.shift is not None:
            transforms[target].col_shift = lambda f=factor: spread(f.shift)
    if pair.kind == "norm":
        replace_module(block, pair.source, SmoothedNorm(block.get_submodule(pair.source), factor))
        return
    source = transforms[pair.source]
    if pair.source_rows == "all":
        source.row_scale.append(factor.value)
        if factor.shift is not None:
            source.row_shift = lambda f=factor: f.shift
        return
    # A fused source ([q; k; v], v last): the rows before the ones that feed the targets keep scale
    # 1 and shift 0.
    lead = (layout.heads + layout.kv_heads) * layout.head_dim
    source.row_scale.append(lambda f=factor: torch.cat([f.value().new_ones(lead), f.value()]))
    if factor.shift is not None:
        source.row_shift = lambda f=factor: torch.cat([f.shift.new_zeros(lead), f.shift])


def _wire_qk(
    arch: ArchSpec, layout: AttentionLayout, transforms, bt: BlockTransforms, device: torch.device
) -> None:
    # q·k is unchanged when q's channel is divided and k's multiplied by the same s. Rotary
    # embeddings mix channel i with i + head_dim/2, so those share one entry; a key head is read
    # by every query head of its group, so they share one too.
    width = layout.head_dim // 2 if arch.rope else layout.head_dim
    factor = SmoothingFactor(torch.ones(layout.kv_heads, width, device=device))
    bt.factors["qk"] = factor

    def k_rows(f: SmoothingFactor = factor) -> torch.Tensor:
        s = f.value()
        return (torch.cat([s, s], dim=-1) if arch.rope else s).flatten()

    def q_rows(f: SmoothingFactor = factor) -> torch.Tensor:
        return layout.kv_to_query(k_rows(f))

    if arch.fused_qkv:
        v_rows = layout.kv_heads * layout.head_dim
        transforms[arch.fused_qkv].row_scale.append(
            lambda: torch.cat([q_rows(), 1 / k_rows(), q_rows().new_ones(v_rows)])
        )
        return
    transforms[arch.q_proj].row_scale.append(q_rows)
    transforms[arch.k_proj].row_scale.append(lambda: 1 / k_rows())


@torch.no_grad()
def fold_block_transforms(block: nn.Module, arch: ArchSpec, gptq: GPTQStatistics | None = None) -> None:
    """Write every transform into the block's own weights, quantized (rounded to nearest, or by
    GPTQ against ``gptq``'s statistics where it has a linear's), and unwrap the norms."""
    for name, module in list(block.named_modules()):
        if isinstance(module, SmoothedNorm):
            fold_into_norm(module.norm, module.factor, plus_one=arch.norm_kind == "rms_plus_one")
            replace_module(block, name, module.norm)
    for name, module in block.named_modules():
        if isinstance(module, QuantLinear):
            module.fold_transform(None if gptq is None else gptq.rounding(name))
