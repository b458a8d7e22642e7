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
from lrquant.models.processors import IMAGES_ONLY, images_only
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
    # Qwen2-VL's own tower: patches of 8 over 2 frames, merged 2 x 2 into 4 tokens, between a
    # begin- and an end-of-image token; 3-D rotary positions in the language model
    **{
        model_type: TinyVLM(
            model_type,
            "qwen2",
            f"{model_type}_vision",
            4,
            (("vision_start_token_id", IMAGE_TOKEN + 1), ("vision_end_token_id", IMAGE_TOKEN + 2)),
            ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"),
        )
        for model_type in ("qwen2_vl", "qwen2_5_vl")
    },
}
QWEN_PATCH = 8  # the Qwen towers' patch size here; frames of 2, merged 2 x 2


def _qwen_parts(model_type: str, text: dict) -> tuple[dict, dict]:
    """The text and vision configs of a tiny Qwen2-VL or Qwen2.5-VL: the text's rotary
    dimensions split over time, height and width (``mrope_section``), and the family's tower (2
    blocks; Qwen2.5-VL's with windowed attention of one merged patch in block 0, full in 1)."""
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    text = {key: value for key, value in text.items() if key != "model_type"}
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [half // 2, half // 4, half - half // 2 - half // 4],
    }
    vision = dict(depth=2, num_heads=2, patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2)
    vision["initializer_range"] = 0.1  # blocks that change the patches as much as the others' towers do
    if model_type == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=text["hidden_size"], mlp_ratio=2)
    else:
        windows = 2 * QWEN_PATCH  # in pixels: one merged patch
        vision.update(
            hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"],
            window_size=windows, fullatt_block_indexes=[1],
        )  # fmt: skip
    return text, vision


def tiny_vlm_config(name: str) -> PretrainedConfig:
    """The config of the tiny vision-language model ``name`` (a key of :data:`TINY_VLMS`)."""
    if name not in TINY_VLMS:
        raise LrquantError(f"no tiny vision-language model '{name}'; available: {', '.join(TINY_VLMS)}")
    spec = TINY_VLMS[name]
    token_key = "image_token_id" if spec.model_type == "idefics3" else "image_token_index"
    text = tiny_config(spec.text).to_dict()
    text["vocab_size"] = IMAGE_TOKEN + len(spec.markers)
    if spec.model_type in IMAGES_ONLY:
        text, vision = _qwen_parts(spec.model_type, text)
        token_key = "image_token_id"
    else:
        vision = tiny_vision_config(spec.vision).to_dict()
    config = AutoConfig.for_model(
        spec.model_type,
        text_config=text,
        vision_config=vision,
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
    if spec.model_type in IMAGES_ONLY:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        pixels = IMAGE_SIZE * IMAGE_SIZE  # every image resized to 32 x 32
        images = Qwen2VLImageProcessorPil(
            patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
        )
        return images_only(spec.model_type)(image_processor=images, tokenizer=tokenizer)
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
    """Model inputs of ``batch`` samples: a BOS, one image's tokens (Qwen2-VL's between its
    begin and end tokens), then ``text_tokens`` random text tokens; and a random image per sample."""
    spec = TINY_VLMS[name]
    text = torch.randint(3, IMAGE_TOKEN, (batch, text_tokens), generator=generator)
    image = torch.full((batch, spec.image_tokens), IMAGE_TOKEN)
    if spec.model_type in IMAGES_ONLY:
        begin, end = torch.full((batch, 1), IMAGE_TOKEN + 1), torch.full((batch, 1), IMAGE_TOKEN + 2)
        image = torch.cat([begin, image, end], dim=1)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], dim=1)
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    if spec.model_type == "idefics3":  # one image per sample, in a list of images
        pixels = pixels[:, None]
    if spec.model_type in IMAGES_ONLY:  # each image's patches (2 frames of 3 x 8 x 8), a row each
        side = IMAGE_SIZE // QWEN_PATCH
        pixels = torch.randn(batch, side * side, 2 * 3 * QWEN_PATCH**2, generator=generator)
        grid = torch.tensor([[1, side, side]]).expand(batch, 3)
        return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid,
                "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}  # fmt: skip
    return {"input_ids": ids, "pixel_values": pixels}
