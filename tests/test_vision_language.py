"""Vision-language models as data: each family's language model and vision tower found through
the parts map, and LRQuant+'s transforms exact on both, run on image and text together."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from test_transforms import first_projection, perturb, random_stats

from lrquant.arch.vision_language import get_vision_language_spec
from lrquant.config import build_scheme
from lrquant.errors import LrquantError
from lrquant.models.tiny_vlm import IMAGE_TOKEN, TINY_VLMS, tiny_vlm_inputs, tiny_vlm_model
from lrquant.quant.apply import attach_block_quantizers, use_quantized_attention
from lrquant.transforms.block import (
    AttentionLayout,
    TransformOptions,
    attach_block_transforms,
    fold_block_transforms,
)

FP = build_scheme(16, 16)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", sorted(TINY_VLMS))
def test_parts_are_found_where_the_spec_says(name: str) -> None:
    model = tiny_vlm_model(name)
    spec = get_vision_language_spec(model.config.model_type)
    language, vision = spec.language_arch(model.config), spec.vision_arch(model.config)
    assert [n for n, _ in language.named_blocks(model)] == [f"{spec.language}.layers.{i}" for i in range(2)]
    assert all(n.startswith(spec.vision + ".") for n, _ in vision.named_blocks(model))
    assert len(vision.block_list(model)) == 2
    if language.final_norm is not None:  # where the text map names them (not Gemma's)
        assert model.get_submodule(language.final_norm) is model.get_submodule(spec.language).norm
        assert model.get_submodule(language.embedding).num_embeddings == model.config.text_config.vocab_size
    assert isinstance(model.get_submodule(spec.projector), torch.nn.Module)
    assert language.modality == "text" and vision.modality == "image" and vision.heads == ()


@pytest.mark.parametrize("name", sorted(TINY_VLMS))
def test_transforms_are_exact_on_language_model_and_vision_tower(name: str) -> None:
    """LRQuant+'s smoothing (LAE start, then moved as training would) and its fold leave the
    logits of image+text inputs unchanged, with both parts transformed."""
    model = tiny_vlm_model(name)
    generator = torch.Generator().manual_seed(1)
    inputs = tiny_vlm_inputs(name, batch=2, text_tokens=40, generator=generator)
    assert (inputs["input_ids"] == IMAGE_TOKEN).sum() == 2 * TINY_VLMS[name].image_tokens
    ref = _logits(model, inputs)
    spec = get_vision_language_spec(model.config.model_type)
    parts = [
        (spec.language_arch(model.config), model.config.text_config),
        (spec.vision_arch(model.config), model.config.vision_config),
    ]
    before = [
        first_projection(b, arch).weight.detach().clone() for arch, _ in parts for b in arch.block_list(model)
    ]
    use_quantized_attention(model)
    transforms = []
    for arch, config in parts:
        layout = AttentionLayout.from_config(config)
        shifts = arch.norm_kind == "layer"
        options = TransformOptions(shifts=shifts, clipping=False, rotation_vectors=False)
        for block in arch.block_list(model):
            attach_block_quantizers(block, arch, FP)
            transforms.append(
                attach_block_transforms(block, arch, layout, random_stats(block, arch, generator), options)
            )
    assert rel_err(_logits(model, inputs), ref) < 1e-5  # the LAE start alone
    for bt in transforms:
        perturb(bt, generator)
    assert rel_err(_logits(model, inputs), ref) < 1e-5
    for arch, _ in parts:
        for block in arch.block_list(model):
            fold_block_transforms(block, arch)
    assert rel_err(_logits(model, inputs), ref) < 1e-5
    after = [first_projection(b, arch).weight for arch, _ in parts for b in arch.block_list(model)]
    assert all(rel_err(a, b) > 0.3 for a, b in zip(after, before, strict=True))  # not vacuous


def test_unknown_family_is_refused_in_one_line() -> None:
    with pytest.raises(
        LrquantError, match="unsupported vision-language architecture 'blip'; supported: gemma3, idefics3"
    ):
        get_vision_language_spec("blip")
