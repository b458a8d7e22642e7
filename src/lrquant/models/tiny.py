"""Tiny random decoder LLMs and a tiny BPE tokenizer, built offline in milliseconds.

They exist for tests and demos: every architecture in :data:`TINY_ARCHS` is built from its own
transformers config class (hidden 64, 4 query heads, 2 key/value heads where the family has GQA),
with seeded weights and perturbed norm weights so that equivalence transforms are really tested.
"""

from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from lrquant.errors import LrquantError

TINY_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "opt", "phi3")

HIDDEN = 64
INTERMEDIATE = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
MAX_POSITIONS = 512
SLIDING_WINDOW = 32
TOKENIZER_VOCAB = 512

# The family's usual choice (the default of its transformers config class).
_TIED: dict[str, bool] = {
    "llama": False, "qwen2": False, "qwen3": False, "mistral": False,
    "gemma2": True, "gemma3_text": True, "opt": True, "phi3": False,
}  # fmt: skip

_tokenizer: PreTrainedTokenizerFast | None = None


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Return a byte-level BPE tokenizer (512 tokens) trained offline on CPython's ``pydoc_data`` text.

    Special tokens: ``<unk>`` = 0, ``<s>`` = 1 (BOS, prepended by default like LLaMA), ``</s>`` = 2.
    Training is deterministic for a given Python version and takes about 0.1 s; the result is cached.
    """
    global _tokenizer
    if _tokenizer is None:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TOKENIZER_VOCAB,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)]
        )
        _tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            model_max_length=MAX_POSITIONS,
        )
    return _tokenizer


def _arch_kwargs(model_type: str) -> dict[str, Any]:
    rope_gqa = {"num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "intermediate_size": INTERMEDIATE}
    if model_type in ("llama", "qwen2", "qwen3", "mistral"):
        kw: dict[str, Any] = {**rope_gqa, "rms_norm_eps": 1e-6}
        if model_type == "mistral":
            kw["sliding_window"] = None  # Mistral >= v0.2 has no sliding window
        return kw
    if model_type in ("gemma2", "gemma3_text"):
        return {
            **rope_gqa,
            "query_pre_attn_scalar": HEAD_DIM,  # scaling = head_dim**-0.5, as in the real Gemma checkpoints
            "sliding_window": SLIDING_WINDOW,
            "layer_types": None,  # filled per layer count in tiny_config
        }
    if model_type == "phi3":
        return {
            "num_key_value_heads": KV_HEADS,
            "intermediate_size": INTERMEDIATE,
            "original_max_position_embeddings": MAX_POSITIONS,
            "sliding_window": None,
        }
    if model_type == "opt":
        return {
            "ffn_dim": INTERMEDIATE,
            "word_embed_proj_dim": HIDDEN,
            "do_layer_norm_before": True,
            "dropout": 0.0,
            "activation_function": "relu",
        }
    raise LrquantError(f"no tiny model for '{model_type}'; available: {', '.join(TINY_ARCHS)}")


def tiny_config(model_type: str, num_layers: int = 2) -> PretrainedConfig:
    """Build the config of a tiny ``model_type`` decoder (hidden 64, vocab of :func:`tiny_tokenizer`).

    Gemma-2/3 alternate sliding (window 32) and full attention layers and keep their softcapping
    defaults; Gemma-2 runs with eager attention because transformers' Gemma-2 has no SDPA path.
    """
    kwargs = _arch_kwargs(model_type)
    if "layer_types" in kwargs:
        kwargs["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
        ]
    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=_TIED[model_type],
        attention_dropout=0.0,
        **kwargs,
    )
    config._attn_implementation = "eager" if model_type == "gemma2" else "sdpa"
    return config


def _perturb_norms(model: nn.Module, plus_one: bool, generator: torch.Generator) -> None:
    """Give every norm a non-trivial scale (and shift), so that folding a scale into it is visible."""
    with torch.no_grad():
        for module in model.modules():
            if not (isinstance(module, nn.LayerNorm) or "RMSNorm" in type(module).__name__):
                continue
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                noise = 0.1 * torch.randn(weight.shape, generator=generator)
                weight.copy_(noise if plus_one else 1.0 + noise)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))


def tiny_model(model_type: str, seed: int = 0, num_layers: int = 2) -> nn.Module:
    """Return a tiny random ``*ForCausalLM`` of ``model_type`` in fp32 and eval mode.

    The same ``seed`` gives the same weights. Norm weights are ``1 + 0.1 * randn`` (Gemma's
    ``x * (1 + w)`` norms get ``w = 0.1 * randn``) and norm biases ``0.1 * randn``.
    """
    config = tiny_config(model_type, num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    _perturb_norms(model, plus_one=model_type.startswith("gemma"), generator=generator)
    return model.eval()


def save_tiny_model(model_type: str, path: str | Path, seed: int = 0, num_layers: int = 2) -> Path:
    """Write a tiny model (safetensors) and its tokenizer to ``path``; return the path.

    ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``
    load the result offline.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(model_type, seed=seed, num_layers=num_layers).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
