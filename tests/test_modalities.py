"""Each kind of model is one Modality: the registry, its data defaults, its inputs and its rules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lrquant.api import DataSettings
from lrquant.arch import get_arch_spec
from lrquant.errors import LrquantError
from lrquant.modalities import MODALITIES, Situation, modality_named, modality_of
from lrquant.modalities.image import feature_error


def test_every_architecture_has_a_registered_modality() -> None:
    assert modality_of(get_arch_spec("llama")).name == "text"
    assert modality_of(get_arch_spec("dinov2")).name == "image"
    with pytest.raises(LrquantError, match="unknown modality .audio.; known: text, image, image-text"):
        modality_named("audio")


def test_data_defaults_come_from_the_modality() -> None:
    text = SimpleNamespace(arch=get_arch_spec("llama"), name="m")
    image = SimpleNamespace(arch=get_arch_spec("dinov2"), name="v")
    assert (DataSettings().for_model(text).calib, DataSettings().for_model(text).eval) == (
        "wikipedia:train",
        "wikipedia:test",
    )
    filled = DataSettings(eval="digits").for_model(image)
    assert (filled.calib, filled.eval) == ("photos", "digits")  # given values win
    assert (MODALITIES["text"].default_samples, MODALITIES["image"].default_samples) == (None, 32)
    with pytest.raises(LrquantError, match="--image-size sets a vision model's input resolution; 'm'"):
        DataSettings(image_size=224).for_model(text)


def test_model_inputs_and_report_keys() -> None:
    ids, pixels = torch.arange(5), torch.zeros(3, 8, 8)
    assert modality_named("text").model_inputs(ids)["input_ids"].shape == (1, 5)
    assert modality_named("image").model_inputs(pixels)["pixel_values"].shape == (1, 3, 8, 8)
    assert {m.report_key for m in MODALITIES.values()} == {"perplexity", "images"}


@pytest.mark.parametrize("name", sorted(MODALITIES))
def test_each_modality_owns_rules_that_cover_every_setting(name: str) -> None:
    rules = modality_named(name).rules
    for wbits, abits in ((2, 16), (4, 4), (6, 6), (8, 8), (16, 16)):
        assert any(rule.applies(Situation(name, wbits, abits)) for rule in rules)
    assert rules[-1].applies(Situation(name, 16, 16, packed=True, rotatable=False))  # a catch-all last


def test_feature_error_is_relative_and_weights_the_class_token_half() -> None:
    target = torch.ones(1, 3, 4)
    out = target.clone()
    out[:, 0] = 2.0  # only the class token is off, by its own size
    assert feature_error(target, target, None, cls_token=True) == 0
    # without a norm both are standardized per token: a constant token stays 0 after it
    norm = torch.nn.Identity()
    assert feature_error(out, target, norm, cls_token=True).item() == pytest.approx(0.5)
    assert feature_error(out, target, norm, cls_token=False).item() == pytest.approx(1 / 3)
