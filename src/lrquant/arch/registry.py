"""Per-architecture maps, keyed by ``config.model_type``.

Everything the quantizer must know about a model family is written here as data: the path of the
block list, the attention module inside a block, and the smoothing pairs ("this module's output
feeds these linears"). No attention or block code is re-implemented anywhere in the package; the
models run through transformers' own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from lrquant.errors import LrquantError

NormKind = Literal["rms", "rms_plus_one", "layer"]


@dataclass(frozen=True)
class SmoothPair:
    """A channel-wise equivalence: ``source``'s output channels are the input channels of ``targets``.

    ``source`` is a norm (``kind="norm"``) or a linear whose output rows feed the targets
    (``kind="linear"``, e.g. v_proj -> o_proj). ``source_rows`` selects the rows of a fused source
    projection that feed the targets (Phi-3's qkv_proj holds v in its last rows).
    """

    name: str
    source: str
    targets: tuple[str, ...]
    kind: Literal["norm", "linear"] = "norm"
    source_rows: Literal["all", "v_of_fused_qkv"] = "all"


@dataclass(frozen=True)
class ArchSpec:
    """How one family of decoder models is laid out (names relative to the model or a block)."""

    model_types: tuple[str, ...]
    blocks: str
    attention: str
    smooth_pairs: tuple[SmoothPair, ...]
    norm_kind: NormKind
    q_proj: str | None = None
    k_proj: str | None = None
    rope: bool = True
    qk_norm: bool = False
    fused_qkv: str | None = None

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        """Return the model's list of transformer blocks."""
        base = model
        for part in self.blocks.split("."):
            if not hasattr(base, part):
                raise LrquantError(
                    f"model of type {type(model).__name__} has no '{self.blocks}': "
                    "is it a decoder model of a supported architecture?"
                )
            base = getattr(base, part)
        if not isinstance(base, nn.ModuleList):
            raise LrquantError(f"'{self.blocks}' is not a list of blocks in {type(model).__name__}")
        return base


def _llama_like(*model_types: str, qk_norm: bool = False) -> ArchSpec:
    return ArchSpec(
        model_types=model_types,
        blocks="model.layers",
        attention="self_attn",
        norm_kind="rms",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        qk_norm=qk_norm,
        smooth_pairs=(
            SmoothPair(
                "qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            ),
            SmoothPair("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            SmoothPair("out", "self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ),
    )


def _gemma(*model_types: str, qk_norm: bool) -> ArchSpec:
    # Gemma norms compute x * (1 + w); the MLP input norm is pre_feedforward_layernorm, while
    # post_attention_layernorm normalises the attention *output* before the residual add.
    return ArchSpec(
        model_types=model_types,
        blocks="model.layers",
        attention="self_attn",
        norm_kind="rms_plus_one",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        qk_norm=qk_norm,
        smooth_pairs=(
            SmoothPair(
                "qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            ),
            SmoothPair("mlp_in", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            SmoothPair("out", "self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ),
    )


_SPECS: tuple[ArchSpec, ...] = (
    _llama_like("llama", "mistral", "qwen2"),
    _llama_like("qwen3", qk_norm=True),
    _gemma("gemma2", qk_norm=False),
    _gemma("gemma3_text", qk_norm=True),
    ArchSpec(
        model_types=("opt",),
        blocks="model.decoder.layers",
        attention="self_attn",
        norm_kind="layer",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        rope=False,
        smooth_pairs=(
            SmoothPair(
                "qkv", "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            ),
            SmoothPair("mlp_in", "final_layer_norm", ("fc1",)),
            SmoothPair("out", "self_attn.v_proj", ("self_attn.out_proj",), kind="linear"),
        ),
    ),
    ArchSpec(
        model_types=("phi3",),
        blocks="model.layers",
        attention="self_attn",
        norm_kind="rms",
        fused_qkv="self_attn.qkv_proj",
        smooth_pairs=(
            SmoothPair("qkv", "input_layernorm", ("self_attn.qkv_proj",)),
            SmoothPair("mlp_in", "post_attention_layernorm", ("mlp.gate_up_proj",)),
            SmoothPair(
                "out",
                "self_attn.qkv_proj",
                ("self_attn.o_proj",),
                kind="linear",
                source_rows="v_of_fused_qkv",
            ),
        ),
    ),
)

_BY_TYPE: dict[str, ArchSpec] = {t: spec for spec in _SPECS for t in spec.model_types}


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values that have an architecture map."""
    return sorted(_BY_TYPE)


def get_arch_spec(model_type: str) -> ArchSpec:
    """Return the map for ``model_type`` or raise a clear error naming the supported ones."""
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise LrquantError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(supported_model_types())}"
        ) from None
