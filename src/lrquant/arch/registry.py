"""Per-architecture maps, keyed by ``config.model_type``: decoder LLMs and vision transformers.

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
    (``kind="linear"``, e.g. v_proj -> o_proj, one scale per key/value channel). ``source_rows``
    selects the rows of a fused source projection that feed the targets (Phi-3's qkv_proj holds
    v in its last rows).
    """

    name: str
    source: str
    targets: tuple[str, ...]
    kind: Literal["norm", "linear"] = "norm"
    source_rows: Literal["all", "v_of_fused_qkv"] = "all"


Modality = Literal["text", "image", "image-text"]


@dataclass(frozen=True)
class ArchSpec:
    """How one family of transformer models is laid out (names relative to the model or a block).

    ``blocks`` lists where the block list may sit, first match wins (a bare backbone and a model
    with a head nest it differently). A ``*`` in the path stands for every entry of a list of
    stages (Swin); ``transition`` then names the stage's module that runs after its last block
    (Swin's patch merging), kept in full precision. ``mlp_out`` names the linear that reads the
    MLP's activation function output (GELU/SiLU), whose input can get its own activation bits.
    ``heads`` names the output heads (relative to the model) that ``--quantize-head`` quantizes.
    ``embedding``, ``final_norm``, ``residual_writers`` (the block's linears that add into the
    residual stream) and ``stream_writers`` say how to rotate it (``--set hadamard=...``); left
    empty, it is refused.
    ``feature_norm`` lists where an image model's norm between the last block and its features
    (``last_hidden_state``) may sit, first match wins; empty: the features are the last block's
    output (CLIP's vision tower).
    """

    model_types: tuple[str, ...]
    blocks: tuple[str, ...]
    attention: str
    smooth_pairs: tuple[SmoothPair, ...]
    norm_kind: NormKind
    mlp_out: tuple[str, ...]
    q_proj: str | None = None
    k_proj: str | None = None
    rope: bool = True
    qk_norm: bool = False
    fused_qkv: str | None = None
    modality: Modality = "text"
    cls_token: bool = False
    transition: str | None = None
    heads: tuple[str, ...] = ("lm_head",)
    embedding: str | None = None
    final_norm: str | None = None
    residual_writers: tuple[str, ...] = ()
    # linears outside the blocks that write token embeddings into the residual stream beside the
    # embedding (a vision-language model's projector, relative to the whole model)
    stream_writers: tuple[str, ...] = ()
    # a vision-language model's projector (relative to the whole model), whose linears
    # ``--quantize-projector`` quantizes; None: the model has none
    projector: str | None = None
    feature_norm: tuple[str, ...] = ()
    # blocks that take the tokens of all samples packed in one unbatched sequence, delimited by
    # ``cu_seqlens`` (Qwen2-VL's vision tower): :func:`lrquant.methods.capture.batch_packed_blocks`
    packed: bool = False
    # where the config of the mapped part sits in the model's (a vision-language model's
    # "text_config"); None: the model's own config
    config: str | None = None

    def config_of(self, model: nn.Module):
        """The config of the mapped part of ``model`` (attention heads, sizes)."""
        return model.config if self.config is None else getattr(model.config, self.config)

    def named_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every transformer block in execution order, with its name relative to the model."""
        for path in self.blocks:
            found = _resolve(model, path)
            if found is not None:
                return found
        raise LrquantError(
            f"model of type {type(model).__name__} has none of {', '.join(self.blocks)}: "
            f"is it a {self.modality} model of a supported architecture?"
        )

    def block_list(self, model: nn.Module) -> list[nn.Module]:
        """Every transformer block of the model, in execution order."""
        return [block for _, block in self.named_blocks(model)]

    def feature_norm_module(self, model: nn.Module) -> nn.Module | None:
        """The norm that turns the last block's output into the features, where the model has one."""
        for path in self.feature_norm:
            try:
                return model.get_submodule(path)
            except AttributeError:
                continue
        return None

    def transitions(self, model: nn.Module) -> dict[int, nn.Module]:
        """Modules that run between blocks, keyed by the index of the block they follow."""
        if self.transition is None:
            return {}
        out: dict[int, nn.Module] = {}
        names = [name for name, _ in self.named_blocks(model)]
        for index, name in enumerate(names):
            stage = name.rsplit(".", 2)[0]  # "<stages>.<i>.<blocks>.<j>" -> "<stages>.<i>"
            last = index + 1 == len(names) or not names[index + 1].startswith(stage + ".")
            module = getattr(model.get_submodule(stage), self.transition, None)
            if last and module is not None:
                out[index] = module
        return out


def _resolve(model: nn.Module, path: str) -> list[tuple[str, nn.Module]] | None:
    """The blocks at ``path`` (``*`` expands a list of stages), or None where it does not exist."""
    head, star, tail = path.partition(".*.")
    try:
        base = model.get_submodule(head)
    except AttributeError:
        return None
    if not isinstance(base, nn.ModuleList):
        return None
    if not star:
        return [(f"{head}.{i}", block) for i, block in enumerate(base)]
    found: list[tuple[str, nn.Module]] = []
    for i, stage in enumerate(base):
        inner = _resolve(stage, tail)
        if inner is None:
            return None
        found += [(f"{head}.{i}.{name}", block) for name, block in inner]
    return found


def _llama_like(*model_types: str, qk_norm: bool = False) -> ArchSpec:
    return ArchSpec(
        model_types=model_types,
        blocks=("model.layers",),
        attention="self_attn",
        norm_kind="rms",
        mlp_out=("mlp.down_proj",),
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        qk_norm=qk_norm,
        embedding="model.embed_tokens",
        final_norm="model.norm",
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
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
        blocks=("model.layers",),
        attention="self_attn",
        norm_kind="rms_plus_one",
        mlp_out=("mlp.down_proj",),
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


def _vit_like(
    *model_types: str,
    blocks: tuple[str, ...],
    norms: tuple[str, str] = ("layernorm_before", "layernorm_after"),
    attention: str = "attention",
    out_proj: str = "o_proj",
    cls_token: bool = True,
    transition: str | None = None,
    feature_norm: tuple[str, ...] = (),
) -> ArchSpec:
    # Pre-norm encoder blocks: norm -> q/k/v, v -> attention output, norm -> MLP up. The MLP's
    # second linear reads GELU outputs (no linear equivalence there) and is not smoothed. Dinov2's
    # layer scale multiplies the attention/MLP outputs after these linears, so it needs nothing.
    q, k, v = (f"{attention}.{p}_proj" for p in "qkv")
    return ArchSpec(
        model_types=model_types,
        blocks=blocks,
        attention=attention,
        norm_kind="layer",
        mlp_out=("mlp.fc2",),
        q_proj=q,
        k_proj=k,
        rope=False,
        modality="image",
        cls_token=cls_token,
        transition=transition,
        feature_norm=feature_norm,
        heads=("classifier",),
        smooth_pairs=(
            SmoothPair("qkv", norms[0], (q, k, v)),
            SmoothPair("mlp_in", norms[1], ("mlp.fc1",)),
            SmoothPair("out", v, (f"{attention}.{out_proj}",), kind="linear"),
        ),
    )


_VISION_SPECS: tuple[ArchSpec, ...] = (
    _vit_like(
        "vit",
        "deit",
        blocks=("vit.layers", "deit.layers", "layers"),
        feature_norm=("vit.layernorm", "deit.layernorm", "layernorm"),
    ),
    _vit_like(
        "dinov2",
        blocks=("dinov2.encoder.layer", "encoder.layer"),
        norms=("norm1", "norm2"),
        feature_norm=("dinov2.layernorm", "layernorm"),
    ),
    _vit_like(
        "clip_vision_model",
        "clip",
        blocks=("vision_model.encoder.layers", "encoder.layers"),
        norms=("layer_norm1", "layer_norm2"),
        attention="self_attn",
        out_proj="out_proj",
    ),
    _vit_like(
        "siglip_vision_model",
        "siglip",
        "idefics3_vision",  # SmolVLM's tower: SigLIP's layout
        blocks=("vision_model.encoder.layers", "encoder.layers"),
        norms=("layer_norm1", "layer_norm2"),
        attention="self_attn",
        out_proj="out_proj",
        cls_token=False,
        feature_norm=("vision_model.post_layernorm", "post_layernorm"),
    ),
    _vit_like(
        "swin",
        blocks=("swin.encoder.layers.*.blocks", "encoder.layers.*.blocks"),
        cls_token=False,
        transition="downsample",
        feature_norm=("swin.layernorm", "layernorm"),
    ),
)


def _qwen_vl_tower(model_type: str, norm_kind: NormKind, mlp_in: tuple[str, ...], mlp_out: str) -> ArchSpec:
    # Qwen2-VL's and Qwen2.5-VL's vision towers: pre-norm blocks with a fused q/k/v (v last) and
    # 2-D rotary embeddings; each block reads every image's patches packed in one unbatched
    # sequence (``packed``). The tower's own last norm is the projector's (``merger.ln_q``).
    return ArchSpec(
        model_types=(model_type,),
        blocks=("blocks",),
        attention="attn",
        norm_kind=norm_kind,
        mlp_out=(mlp_out,),
        fused_qkv="attn.qkv",
        modality="image",
        heads=(),
        packed=True,
        smooth_pairs=(
            SmoothPair("qkv", "norm1", ("attn.qkv",)),
            SmoothPair("mlp_in", "norm2", mlp_in),
            SmoothPair("out", "attn.qkv", ("attn.proj",), kind="linear", source_rows="v_of_fused_qkv"),
        ),
    )


_SPECS: tuple[ArchSpec, ...] = (
    _qwen_vl_tower("qwen2_vl_vision", "layer", ("mlp.fc1",), "mlp.fc2"),
    _qwen_vl_tower("qwen2_5_vl_vision", "rms", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    # Qwen2-VL's and Qwen2.5-VL's language models: Qwen2's layers with 3-D rotary positions
    _llama_like("llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text"),
    _llama_like("qwen3", qk_norm=True),
    _gemma("gemma2", qk_norm=False),
    _gemma("gemma3_text", qk_norm=True),
    ArchSpec(
        model_types=("opt",),
        blocks=("model.decoder.layers",),
        attention="self_attn",
        norm_kind="layer",
        mlp_out=("fc2",),
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
        blocks=("model.layers",),
        attention="self_attn",
        norm_kind="rms",
        mlp_out=("mlp.down_proj",),
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

_BY_TYPE: dict[str, ArchSpec] = {t: spec for spec in _SPECS + _VISION_SPECS for t in spec.model_types}


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
