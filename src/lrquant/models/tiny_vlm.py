"""Tiny random vision-language models, built offline in milliseconds, for tests.

Each joins a tiny decoder of :mod:`lrquant.models.tiny` and a tiny vision tower of
:mod:`lrquant.models.tiny_vision` through its family's own transformers classes (32x32 images,
patches of 8), with seeded weights and perturbed norms so equivalence transforms are really tested.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig

from lrquant.errors import LrquantError
from lrquant.models.tiny import _perturb_norms, tiny_config, tiny_tokenizer
from lrquant.models.tiny_vision import IMAGE_SIZE, tiny_vision_config


@dataclass(frozen=True)
class TinyVLM:
    """One tiny vision-language family: its transformers ``model_type``, the parts it joins, how
    many tokens stand for one image, config fields of its own, and the special tokens its
    processor needs (the image token first), numbered after the tiny tokenizer's 512."""

    model_type: str
    text: str
    vision: str
    image_tokens: int
    extra: tuple[tuple[str, object], ...] = ()
    markers: tuple[str, ...] = ("<image>",)


IMAGE_TOKEN = 512  # the image token's id: the tiny tokenizer's 512 tokens, then the markers
GEMMA3_MARKERS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
}
TINY_VLMS: dict[str, TinyVLM] = {
    # every patch of the SigLIP tower becomes a token (4 x 4 patches)
    "llava": TinyVLM(
        "llava", "llama", "siglip_vision_model", 16, (("vision_feature_select_strategy", "full"),)
    ),
    # CLIP's class token dropped ("default" strategy), the patches kept
    "llava_clip": TinyVLM("llava", "llama", "clip_vision_model", 16),
    # the patches pooled 2 x 2 into 4 tokens, between a begin- and an end-of-image token
    "gemma3": TinyVLM(
        "gemma3",
        "gemma3_text",
        "siglip_vision_model",
        4,
        (
            ("mm_tokens_per_image", 4),
            ("boi_token_index", IMAGE_TOKEN + 1),
            ("eoi_token_index", IMAGE_TOKEN + 2),
        ),
        tuple(GEMMA3_MARKERS.values()),
    ),
    # pixel shuffle by 2: 16 patches -> 4 tokens, wrapped in <fake_token_around_image><global-img>
    "idefics3": TinyVLM(
        "idefics3",
        "llama",
        "idefics3_vision",
        4,
        (("scale_factor", 2),),
        ("<image>", "<fake_token_around_image>", "<end_of_utterance>", "<global-img>"),
    ),
}


def tiny_vlm_config(name: str) -> PretrainedConfig:
    """The config of the tiny vision-language model ``name`` (a key of :data:`TINY_VLMS`)."""
    if name not in TINY_VLMS:
        raise LrquantError(f"no tiny vision-language model '{name}'; available: {', '.join(TINY_VLMS)}")
    spec = TINY_VLMS[name]
    token_key = "image_token_id" if spec.model_type == "idefics3" else "image_token_index"
    text = tiny_config(spec.text).to_dict()
    text["vocab_size"] = IMAGE_TOKEN + len(spec.markers)
    config = AutoConfig.for_model(
        spec.model_type,
        text_config=text,
        vision_config=tiny_vision_config(spec.vision).to_dict(),
        vision_feature_layer=-1,
        **{token_key: IMAGE_TOKEN},
        **dict(spec.extra),
    )
    config._attn_implementation = "sdpa"
    return config


def tiny_vlm_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny random ``*ForConditionalGeneration`` of ``name`` in fp32, eval mode.

    Matrices that transformers starts at zero (Gemma 3's projection of image features) are made
    random, so that the image reaches the logits and a change in the tower is seen there."""
    config = tiny_vlm_config(name)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2 and not param.any():
                param.normal_(0.0, 0.5, generator=generator)
    gemma = TINY_VLMS[name].text.startswith("gemma")  # Gemma's norms compute x * (1 + w)
    for module in model.model.children():
        _perturb_norms(module, plus_one=gemma and "Vision" not in type(module).__name__, generator=generator)
    return model.eval()


def tiny_vlm_processor(name: str):
    """The processor of the tiny vision-language model ``name``: the tiny tokenizer with the
    family's special tokens added, and its own image processing at 32 x 32 (one image, not split)."""
    from transformers import (
        CLIPImageProcessor,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlavaProcessor,
        SiglipImageProcessorPil,
    )

    spec = TINY_VLMS[name]
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.add_special_tokens({"additional_special_tokens": list(spec.markers)})
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if spec.model_type == "gemma3":
        # Gemma3Processor reads these names off the tokenizer, as a Gemma 3 checkpoint's has them
        tokenizer._set_model_specific_special_tokens(special_tokens=GEMMA3_MARKERS)
        images = Gemma3ImageProcessorPil(size=size)
        return Gemma3Processor(
            image_processor=images, tokenizer=tokenizer, image_seq_length=spec.image_tokens
        )
    if spec.model_type == "idefics3":
        edge = {"longest_edge": IMAGE_SIZE}
        images = Idefics3ImageProcessorPil(size=edge, max_image_size=edge, do_image_splitting=False)
        return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=spec.image_tokens)
    if spec.vision == "clip_vision_model":
        images = CLIPImageProcessor(size=size, crop_size=size, do_center_crop=False)
        strategy, extra = "default", 1  # CLIP's class token is made, then dropped
    else:
        images = SiglipImageProcessorPil(size=size)
        strategy, extra = "full", 0
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
        image_token=spec.markers[0],
    )


def save_tiny_vlm(name: str, path: str | Path, seed: int = 0) -> Path:
    """Write the tiny vision-language model ``name`` (safetensors) and its processor to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor = tiny_vlm_processor(name)
    tiny_vlm_model(name, seed).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_vlm_inputs(name: str, batch: int, text_tokens: int, generator: torch.Generator) -> dict:
    """Model inputs of ``batch`` samples: a BOS, one image's tokens, then ``text_tokens`` random
    text tokens; and a random image per sample."""
    spec = TINY_VLMS[name]
    text = torch.randint(3, IMAGE_TOKEN, (batch, text_tokens), generator=generator)
    image = torch.full((batch, spec.image_tokens), IMAGE_TOKEN)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], dim=1)
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    if spec.model_type == "idefics3":  # one image per sample, in a list of images
        pixels = pixels[:, None]
    return {"input_ids": ids, "pixel_values": pixels}
