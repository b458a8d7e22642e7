"""Tiny random vision transformers, built offline in milliseconds, for tests and demos.

Every family in :data:`TINY_VISION_ARCHS` is built from its own transformers config class:
32x32 images, patches of 8 (4 for Swin, whose two stages use shifted 2x2 windows and patch
merging), hidden 64, 4 heads, seeded weights and perturbed norms so equivalence transforms are
really tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, PretrainedConfig

from lrquant.errors import LrquantError
from lrquant.models.tiny import HEADS, HIDDEN, INTERMEDIATE, _perturb_norms

TINY_VISION_ARCHS: tuple[str, ...] = (
    "vit",
    "deit",
    "dinov2",
    "swin",
    "clip_vision_model",
    "siglip_vision_model",
)
IMAGE_SIZE = 32
NUM_LABELS = 3


def _arch_kwargs(model_type: str) -> dict[str, Any]:
    common = {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "image_size": IMAGE_SIZE, "patch_size": 8}
    if model_type in ("vit", "deit"):
        return {**common, "intermediate_size": INTERMEDIATE, "qkv_bias": True}
    if model_type == "dinov2":
        return {**common, "mlp_ratio": INTERMEDIATE // HIDDEN, "layerscale_value": 0.7}
    if model_type in ("clip_vision_model", "siglip_vision_model", "idefics3_vision"):  # SmolVLM's: SigLIP's
        return {**common, "intermediate_size": INTERMEDIATE}
    if model_type == "swin":
        return {
            "image_size": IMAGE_SIZE,
            "patch_size": 4,
            "embed_dim": HIDDEN // 2,
            "num_heads": [2, 4],
            "window_size": 2,
            "mlp_ratio": 2.0,
        }
    raise LrquantError(f"no tiny vision model for '{model_type}'; available: {', '.join(TINY_VISION_ARCHS)}")


def tiny_vision_config(model_type: str, num_layers: int = 2, classifier: bool = False) -> PretrainedConfig:
    """The config of a tiny ``model_type`` vision transformer (a classifier of 3 labels if asked)."""
    kwargs = _arch_kwargs(model_type)
    if model_type == "swin":
        kwargs["depths"] = [num_layers, num_layers]
    else:
        kwargs["num_hidden_layers"] = num_layers
    if classifier:
        kwargs["num_labels"] = NUM_LABELS
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "sdpa"
    return config


def tiny_vision_model(
    model_type: str, seed: int = 0, num_layers: int = 2, classifier: bool = False
) -> nn.Module:
    """A tiny random backbone (or ``*ForImageClassification``) of ``model_type`` in fp32, eval mode."""
    config = tiny_vision_config(model_type, num_layers, classifier)
    torch.manual_seed(seed)
    auto = AutoModelForImageClassification if classifier else AutoModel
    model = auto.from_config(config, dtype=torch.float32)
    _perturb_norms(model, plus_one=False, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def save_tiny_vision_model(
    model_type: str, path: str | Path, seed: int = 0, num_layers: int = 2, classifier: bool = False
) -> Path:
    """Write a tiny vision model (safetensors, no image processor config) to ``path``; return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_vision_model(model_type, seed, num_layers, classifier).save_pretrained(path)
    return path
