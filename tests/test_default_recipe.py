"""The default recipe (no --method): which rule each setting and model kind resolves to, that
--method lrquant_plus stays the paper's method, and how overrides meet the rules."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from lrquant import api
from lrquant.cli import main
from lrquant.config import build_scheme
from lrquant.errors import LrquantError
from lrquant.modalities import modality_named
from lrquant.recipes import (
    PRESETS,
    RECIPES,
    RETIRED,
    Recipe,
    Situation,
    build_recipe,
    default_rule,
)
from lrquant.transforms.hadamard import RUN_TIME_HADAMARD

WEIGHT_ONLY = dict(smoothing=None, rounding=True, clip_init="search", lr_clipping=0.1, e2e_epochs=2)
WEIGHT_ONLY_4BIT_GROUPS = {k: v for k, v in WEIGHT_ONLY.items() if k != "e2e_epochs"}  # no end-to-end step
# a vision-language model's language model keeps the rule measured on tiny-llava (LAE smoothing)
WEIGHT_ONLY_VLM = dict(rounding=True, clip_init="search", lr_clipping=0.1, e2e_epochs=2)
W4A4_UNPACKED = dict(
    hadamard="down", clip_init="search", lr_clipping=0.1, lr_transform=1e-2, rounding=True, e2e_epochs=2
)
W4A4_PACKED = dict(clip_init="search", lr_clipping=0.1, lr_transform=1e-2)


@pytest.mark.parametrize(
    ("situation", "fields"),
    [
        (Situation("image", 4, 4), dict(smoothing="best", lr_by_bits=True)),
        (Situation("image", 4, 16), dict(smoothing="best", lr_by_bits=True)),
        (Situation("text", 4, 16), WEIGHT_ONLY),
        (Situation("text", 4, 16, group_size=64), WEIGHT_ONLY_4BIT_GROUPS),
        (Situation("text", 4, 16, packed=True, group_size=32), WEIGHT_ONLY_4BIT_GROUPS),
        (Situation("text", 4, 16, group_size=128), WEIGHT_ONLY),
        (Situation("text", 3, 16, group_size=64), WEIGHT_ONLY),
        (Situation("text", 4, 8, group_size=64), dict(lr_clipping=0.1)),
        (Situation("image-text", 4, 16, group_size=64), WEIGHT_ONLY_VLM),  # not measured on one: as before
        (Situation("text", 3, 16), WEIGHT_ONLY),
        (Situation("text", 2, 16, packed=True), WEIGHT_ONLY),
        (Situation("text", 8, 16), {}),
        (Situation("text", 4, 4), W4A4_UNPACKED),
        (Situation("text", 4, 4, rotatable=False), W4A4_UNPACKED),  # "down" needs no residual rotation
        (Situation("text", 4, 4, packed=True), W4A4_PACKED),
        (Situation("text", 6, 6), dict(hadamard="online", lr_by_bits=True)),
        (Situation("text", 6, 6, packed=True), {}),
        (Situation("text", 6, 6, rotatable=False), {}),
        (Situation("text", 4, 8), dict(lr_clipping=0.1)),
        (Situation("text", 8, 8), dict(hadamard="online", lr_by_bits=True)),
        (Situation("text", 8, 8, packed=True), {}),
        (Situation("text", 8, 8, rotatable=False), {}),
        (Situation("image-text", 4, 16), WEIGHT_ONLY_VLM),
        (Situation("image-text", 4, 4), W4A4_UNPACKED),
        (Situation("image-text", 4, 8), dict(lr_clipping=0.1)),
        (Situation("image-text", 6, 6), dict(hadamard="online", lr_by_bits=True)),
        (Situation("image-text", 6, 6, rotatable=False), {}),  # Gemma 3's stream
        (Situation("image-text", 8, 8), {}),
    ],
)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_setting_resolves_to_its_documented_recipe(situation: Situation, fields: dict, preset: str):
    recipe = build_recipe("auto", preset, situation=situation)
    assert recipe == Recipe(**{**PRESETS[preset], **fields})
    assert default_rule(situation).fields == fields


def test_the_situation_carries_the_weights_group(tiny_llama: Path) -> None:
    grouped = api.situation(str(tiny_llama), build_scheme(wbits=4, group_size=16))
    assert grouped.group_size == 16 and default_rule(grouped).fields == WEIGHT_ONLY_4BIT_GROUPS
    per_channel = api.situation(str(tiny_llama), build_scheme(wbits=4))
    assert per_channel.group_size is None and default_rule(per_channel).fields == WEIGHT_ONLY


def test_lrquant_plus_is_the_papers_method_whatever_the_model() -> None:
    for preset, modality in itertools.product(PRESETS, ("text", "image")):
        for wbits, abits in ((4, 4), (2, 16), (6, 6)):
            where = Situation(modality, wbits, abits)
            assert build_recipe("lrquant_plus", preset, modality=modality, situation=where) == Recipe(
                **PRESETS[preset]
            )
    paper = build_recipe("lrquant_plus", "paper")
    assert (paper.smoothing, paper.clip_init, paper.hadamard, paper.rounding, paper.gptq) == (
        "lae",
        "minmax",
        "off",
        False,
        False,
    )
    assert (paper.e2e_epochs, paper.lr_clipping, paper.lr_transform) == (0, 1e-2, 5e-3)
    assert RECIPES["lrquant_plus"] == {}


def test_every_situation_has_a_rule_and_packed_ones_rotate_nothing_at_run_time() -> None:
    for modality, wbits, abits, packed, rotatable in itertools.product(
        ("text", "image"), (2, 3, 4, 6, 8, 16), (4, 6, 8, 16), (False, True), (False, True)
    ):
        where = Situation(modality, wbits, abits, packed, rotatable)
        rule = default_rule(where)
        recipe = build_recipe("auto", "fast", situation=where)
        assert rule in modality_named(modality).rules
        if packed:
            assert recipe.hadamard not in RUN_TIME_HADAMARD
        if not rotatable:
            assert recipe.hadamard not in ("folded", "online")


def test_overrides_win_and_clashing_rule_fields_yield() -> None:
    text = Situation("text", 3, 16)
    assert build_recipe("auto", "fast", {"e2e_epochs": 0}, situation=text).e2e_epochs == 0
    with_gptq = build_recipe("auto", "fast", {"gptq": True}, situation=text)
    assert with_gptq.gptq and not with_gptq.rounding and with_gptq.clip_init == "search"
    unclipped = build_recipe("auto", "fast", {"clipping": False}, situation=text)
    assert (unclipped.clip_init, unclipped.lr_clipping) == ("minmax", 1e-2) and unclipped.rounding
    one_shot = build_recipe("auto", "fast", {"learn": False}, situation=text)
    assert not one_shot.learn and not one_shot.rounding and one_shot.e2e_epochs == 0
    # a switch set to the value that does not clash drops nothing; words read as the recipe reads them
    assert build_recipe("auto", "fast", {"gptq": "false"}, situation=text).rounding
    assert build_recipe("auto", "fast", {"clipping": "true"}, situation=text).clip_init == "search"
    assert not build_recipe("auto", "fast", {"learn": "off"}, situation=text).rounding
    assert not build_recipe("auto", "fast", {"gptq": "on"}, situation=text).rounding


@pytest.mark.parametrize("key", sorted(RETIRED))
def test_retired_settings_are_refused_with_what_to_use_instead(key: str) -> None:
    assert key not in Recipe.model_fields
    with pytest.raises(LrquantError, match=f"the recipe setting {key} was retired: ") as err:
        build_recipe("auto", "fast", {key: "true"})
    assert RETIRED[key] in str(err.value)


def test_unknown_method_names_the_default_too() -> None:
    with pytest.raises(LrquantError, match="available: auto, rtn"):
        build_recipe("best", "fast")


def test_explain_prints_the_recipe_and_writes_nothing(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["quantize", "--model", str(tiny_llama), "--wbits", "2", "--group-size", "16", "--preset", "fast"]
    assert main([*args, "--explain"]) == 0
    text = capsys.readouterr().out
    assert "rule: language model, weights of 4 bits or fewer only" in text
    assert "rounding=True" in text and "e2e_epochs=2" in text
    assert main([*args, "--explain", "--json", "--method", "lrquant_plus"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "lrquant_plus" and "rule" not in plan
    assert plan["differs_from_lrquant_plus"] == {}
    assert main([*args, "--explain", "--abits", "4", "--format", "gguf", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["rule"]["when"] == "language model, activations of 4 bits or fewer, packed"
    assert plan["differs_from_lrquant_plus"] == W4A4_PACKED
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(args) == 2  # no --output, no --explain
    assert "needs --output" in capsys.readouterr().err


def test_the_report_names_the_rule(tiny_llama: Path, text_file: Path, tmp_path: Path) -> None:
    data = api.DataSettings(calib=str(text_file), seqlen=32, nsamples=2)
    report = api.quantize(
        str(tiny_llama),
        tmp_path / "out",
        build_scheme(wbits=3, group_size=16),
        preset="fast",
        overrides={"epochs": 1, "e2e_epochs": 1, "compile": False},
        data=data,
        run_eval=False,
    )
    assert report["method"] == "auto"
    assert report["rule"]["when"] == "language model, weights of 4 bits or fewer only"
    assert report["rule"]["fields"]["rounding"] is True  # the rule's own fields, beside the recipe
    recipe = report["recipe"]
    assert (recipe["rounding"], recipe["clip_init"], recipe["lr_clipping"], recipe["e2e_epochs"]) == (
        True,
        "search",
        0.1,
        1,
    )
