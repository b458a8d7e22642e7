"""Quantization of attention's Q, K, V (after rotary embedding) and softmax output.

Rather than re-implementing each model's attention, we register wrappers in transformers'
attention-function registry. The model's own attention module computes the projections, norms
and rotary embedding as the installed library version does, then hands Q, K and V to the
registered function, which quantizes them and calls the original implementation.

With ``rotate`` (``--rotate-qkv``) each head of Q, K and V is first multiplied by one fixed
orthogonal matrix ``H`` (:func:`lrquant.quant.hadamard.head_rotation`), which spreads a head's
outlier dimensions over all of them before the per-token grids are drawn, and the attention output
by ``Hᵀ``: ``(QH)(KH)ᵀ = QKᵀ`` and ``P (VH) Hᵀ = P V``, so without quantization nothing changes
(as QuaRot does for the key/value cache; here for Q too, as the scheme quantizes it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lrquant.config import QuantSpec
from lrquant.quant.hadamard import head_rotation
from lrquant.quant.quantizer import fake_quantize

PREFIX = "lrquant_"
ATTR = "lrquant_attention"


@dataclass
class AttentionQuant:
    """Quantization settings attached to one attention module."""

    qkv: QuantSpec
    softmax: QuantSpec
    rotate: bool = False


def _rotated(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    return (x.float() @ rotation).to(x.dtype)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _eager_with_softmax_quant(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    softmax_spec: QuantSpec,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose probabilities are fake-quantized before multiplying V."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if attention_mask is None and is_causal and query.shape[2] > 1:
        # sdpa's mask function leaves out a purely causal mask (sdpa then sets is_causal): rebuild it,
        # aligned top-left as torch's is_causal is.
        attention_mask = torch.ones(
            query.shape[2], key.shape[2], dtype=torch.bool, device=query.device
        ).tril()
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = fake_quantize(probs, softmax_spec)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _model_eager(module: nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to wrap")
    return fn


def _wrapper(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        settings: AttentionQuant | None = getattr(module, ATTR, None)
        rotation = None
        if settings is not None and settings.qkv.enabled:
            if settings.rotate:
                rotation = head_rotation(query.shape[-1], query.device)
                query, key, value = (_rotated(x, rotation) for x in (query, key, value))
            query = fake_quantize(query, settings.qkv)
            key = fake_quantize(key, settings.qkv)
            value = fake_quantize(value, settings.qkv)
        if settings is not None and settings.softmax.enabled:
            output, probs = _eager_with_softmax_quant(
                module, query, key, value, attention_mask, settings.softmax, **kwargs
            )
        else:
            fn = _model_eager(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
            output, probs = fn(module, query, key, value, attention_mask, **kwargs)
        if rotation is not None:  # (batch, tokens, heads, head_dim): back to the value heads' basis
            output = _rotated(output, rotation.T)
        return output, probs

    return attention


def quantized_implementation(base: str) -> str:
    """Register (once) and return the name of the quantizing wrapper around ``base``."""
    if base.startswith(PREFIX):
        return base
    if base not in ("sdpa", "eager"):
        base = "sdpa"
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapper(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def base_implementation(name: str) -> str:
    """The implementation a quantizing wrapper name stands for."""
    return name.removeprefix(PREFIX)
