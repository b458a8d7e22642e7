"""Vision-language models: each family's language model and vision tower found through the parts
map, LRQuant+'s transforms exact on both under image and text together; a tiny LLaVA quantized on
image-text pairs (language model alone, and with its vision tower), saved, reloaded, evaluated and
resumed; bad pairs refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rel_err
from PIL import Image
from safetensors.torch import load_file
from test_transforms import first_projection, perturb, random_stats

from lrquant import api
from lrquant.arch.vision_language import get_vision_language_spec
from lrquant.cli import main
from lrquant.config import build_scheme
from lrquant.errors import LrquantError
from lrquant.methods.capture import capture_block_inputs, capture_block_kwargs, model_inputs, run_block
from lrquant.methods.resume import ResumeStore
from lrquant.models.loading import load_model
from lrquant.models.tiny import save_tiny_model
from lrquant.models.tiny_vlm import IMAGE_TOKEN, TINY_VLMS, save_tiny_vlm, tiny_vlm_inputs, tiny_vlm_model
from lrquant.quant.apply import attach_block_quantizers, use_quantized_attention
from lrquant.quant.linear import QuantLinear
from lrquant.transforms.block import (
    AttentionLayout,
    TransformOptions,
    attach_block_transforms,
    fold_block_transforms,
)
from lrquant.transforms.hadamard import apply_hadamard

FP = build_scheme(16, 16)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", sorted(TINY_VLMS))
def test_parts_are_found_where_the_spec_says(name: str) -> None:
    model = tiny_vlm_model(name)
    spec = get_vision_language_spec(model.config.model_type)
    language = spec.language_arch(model.config)
    assert [n for n, _ in language.named_blocks(model)] == [f"{spec.language}.layers.{i}" for i in range(2)]
    assert isinstance(model.get_submodule(spec.projector), torch.nn.Module)
    vision = spec.vision_arch(model.config)
    assert all(n.startswith(spec.vision + ".") for n, _ in vision.named_blocks(model))
    assert len(vision.block_list(model)) == 2
    if language.final_norm is not None:  # where the text map names them (not Gemma's)
        assert model.get_submodule(language.final_norm) is model.get_submodule(spec.language).norm
        assert model.get_submodule(language.embedding).num_embeddings == model.config.text_config.vocab_size
    # both parts learn on what image-text pairs give (the whole model runs up to their blocks)
    assert language.modality == "image-text" and vision.modality == "image-text" and vision.heads == ()


@pytest.mark.parametrize("name", sorted(TINY_VLMS))
def test_transforms_are_exact_on_language_model_and_vision_tower(name: str) -> None:
    """LRQuant+'s smoothing (LAE start, then moved as training would) and its fold leave the
    logits of image+text inputs unchanged, with both parts transformed."""
    model = tiny_vlm_model(name)
    generator = torch.Generator().manual_seed(1)
    inputs = tiny_vlm_inputs(name, batch=2, text_tokens=40, generator=generator)
    assert (inputs["input_ids"] == IMAGE_TOKEN).sum() == 2 * TINY_VLMS[name].image_tokens
    ref = _logits(model, inputs)
    other_image = {**inputs, "pixel_values": torch.randn(inputs["pixel_values"].shape, generator=generator)}
    assert rel_err(_logits(model, other_image), ref) > 0.1  # the image reaches the logits
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


@pytest.mark.parametrize("mode", ["folded", "online"])
@pytest.mark.parametrize("name", sorted(TINY_VLMS))
def test_residual_stream_rotations_cover_the_projector(name: str, mode: str) -> None:
    """The language model's residual-stream rotations (hadamard=folded, online) rotate the
    projector's output as the token embeddings, so the logits of image and text are unchanged;
    a projector that is not a linear (Gemma 3's) is refused, as Gemma's stream is."""
    model = tiny_vlm_model(name)
    inputs = tiny_vlm_inputs(name, batch=2, text_tokens=20, generator=torch.Generator().manual_seed(2))
    ref = _logits(model, inputs)
    language = get_vision_language_spec(model.config.model_type).language_arch(model.config)
    if name == "gemma3":
        with pytest.raises(LrquantError, match="hadamard rotations cover decoders with plain RMSNorm"):
            apply_hadamard(model, language, mode)
        return
    (writer,) = language.stream_writers
    before = model.get_submodule(writer).weight.detach().clone()
    apply_hadamard(model, language, mode)
    assert rel_err(_logits(model, inputs), ref) < 1e-5
    assert rel_err(model.get_submodule(writer).weight, before) > 0.5  # rotated, not left alone


def test_unknown_family_is_refused_in_one_line() -> None:
    with pytest.raises(
        LrquantError, match="unsupported vision-language architecture 'blip'; supported: gemma3, idefics3"
    ):
        get_vision_language_spec("blip")


# ------------------------------------------------------------------ the pipeline on a tiny LLaVA


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 8 image-text pairs (random images, texts of words)."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    words = "a red cat sits on the mat while the dog sleeps near a blue door".split()
    for i in range(8):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(" ".join(rng.choice(words, 6 + i)))
    return folder


@pytest.fixture(scope="module", params=sorted(TINY_VLMS))
def vlm(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each tiny vision-language family, saved with its processor."""
    return save_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vlm("llava", tmp_path_factory.mktemp("llava") / "model")


def _data(pairs: Path, **kw) -> api.DataSettings:
    return api.DataSettings(calib=str(pairs), eval=str(pairs), nsamples=4, seqlen=64, **kw)


def test_blocks_learn_on_the_hidden_states_of_image_and_text(vlm: Path, pairs: Path) -> None:
    loaded = load_model(str(vlm))
    assert loaded.arch.modality == "image-text" and loaded.processor is not None
    calibration = api.calibration_data(loaded, _data(pairs), 4)
    ids = calibration["input_ids"]
    image_tokens = {spec.model_type: spec.image_tokens for spec in TINY_VLMS.values()}[loaded.model_type]
    if "image_grid_thw" in calibration.fields:  # Qwen2-VL: as many as the image's size gives, merged 2 x 2
        assert (calibration["image_grid_thw"] == calibration["image_grid_thw"][0]).all()  # one size for all
        image_tokens = calibration["image_grid_thw"].prod(dim=-1) // 4
    assert ((ids == IMAGE_TOKEN).sum(dim=1) == image_tokens).all()  # every sample holds its image's tokens
    hidden = capture_block_inputs(loaded.model, loaded.arch, calibration)
    assert hidden.shape == (4, ids.shape[1], loaded.model.config.text_config.hidden_size)
    # the image tokens' hidden states are the projected image features, not the marker's embedding
    marker = loaded.model.get_input_embeddings().weight[IMAGE_TOKEN]
    assert not torch.allclose(hidden[0, 1], marker)


def test_quantize_save_reload_and_evaluate(vlm: Path, pairs: Path, tmp_path: Path) -> None:
    report = api.quantize(
        str(vlm), tmp_path / "out", build_scheme(4, 4), "auto", "fast", {"epochs": 1, "compile": False},
        _data(pairs),
    )  # fmt: skip
    assert report["model"]["modality"] == "image-text"
    assert report["rule"]["when"] == "vision-language model, activations of 4 bits or fewer, unpacked"
    assert report["recipe"]["hadamard"] == "down"  # the W4A4 rule: the down projections
    assert report["data"]["eval_pairs"] == 8 and report["data"]["seqlen"] < 64
    ppl = report["perplexity"]
    assert ppl["quantized"] != ppl["fp"] and 0 < report["fidelity"]["kl"] < 1
    assert [b["index"] for b in report["blocks"]] == [0, 1]
    again = api.evaluate(str(tmp_path / "out"), api.DataSettings(eval=str(pairs)))
    assert again["scheme"] == "W4A4" and again["reference"] == str(vlm)
    assert again["perplexity"] == pytest.approx(ppl["quantized"], rel=1e-5)
    assert again["kl"] == pytest.approx(report["fidelity"]["kl"], rel=1e-4)
    reloaded = load_model(str(tmp_path / "out"))
    assert isinstance(reloaded.model.get_submodule(f"{reloaded.arch.blocks[0]}.0.mlp.up_proj"), QuantLinear)


def test_an_interrupted_run_resumes_to_the_same_checkpoint(
    llava: Path, pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(out: Path) -> dict:
        return api.quantize(
            str(llava), out, build_scheme(4, 16), "lrquant_plus", "fast", {"epochs": 1, "compile": False},
            _data(pairs), run_eval=False,
        )  # fmt: skip

    run(tmp_path / "a")
    original = ResumeStore.save_block

    def save_then_stop(self, i, block, state, report) -> None:
        original(self, i, block, state, report)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ResumeStore, "save_block", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "b")
    assert not (tmp_path / "b").exists()
    run(tmp_path / "b")
    expected, got = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], value) for key, value in expected.items())


def _write(folder: Path, files: dict[str, str | None]) -> Path:
    folder.mkdir()
    for name, text in files.items():
        if text is None:
            Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / name)
        else:
            (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a.png": None}, "image '.*a.png' has no text: add 'a.txt' beside it"),
        ({"a.png": None, "a.txt": "a cat", "b.txt": "a dog"}, "text '.*b.txt' has no image of the same name"),
        ({"a.png": "not an image", "a.txt": "a cat"}, "cannot read image '.*a.png'"),
        ({"a.png": None, "a.txt": "  "}, "'.*a.txt' is empty"),
        ({"p.jsonl": '{"image": "gone.png", "text": "a cat"}'}, "line 1: image '.*gone.png' not found"),
        ({"p.jsonl": '{"image": "x.png"}'}, "line 1 needs an \"image\" path and a \"text\""),
        ({"p.jsonl": "{oops"}, "line 1 is not JSON"),
    ],
    ids=["image-without-text", "text-without-image", "corrupt-image", "empty-text", "jsonl-missing-image",
         "jsonl-no-text", "jsonl-not-json"],
)  # fmt: skip
def test_bad_pairs_are_refused_in_one_line_and_nothing_is_written(
    llava: Path, tmp_path: Path, files: dict, message: str
) -> None:
    folder = _write(tmp_path / "pairs", files)
    source = folder / "p.jsonl" if "p.jsonl" in files else folder
    with pytest.raises(LrquantError, match=message):
        data = api.DataSettings(calib=str(source))
        api.quantize(
            str(llava), tmp_path / "out", build_scheme(4, 16), "lrquant_plus", data=data, run_eval=False
        )
    assert not (tmp_path / "out").exists()


def test_built_in_pairs_are_the_default_and_too_short_windows_are_refused(
    llava: Path, pairs: Path, tmp_path: Path
) -> None:
    data = api.DataSettings(nsamples=2, eval_windows=4)  # no --calib-data, no --eval-data
    report = api.quantize(str(llava), tmp_path / "out", build_scheme(4, 16), "lrquant_plus", "fast",
                          {"epochs": 1, "compile": False}, data)  # fmt: skip
    assert report["data"]["calibration"] == "digits-words:train"
    assert report["data"]["evaluation"] == "digits-words:test" and report["data"]["eval_pairs"] == 4
    with pytest.raises(LrquantError, match="--seqlen 8 cuts into the image's tokens"):
        api.quantize(str(llava), tmp_path / "short", build_scheme(4, 16), "lrquant_plus",
                     data=api.DataSettings(calib=str(pairs), seqlen=8), run_eval=False)  # fmt: skip
    assert not (tmp_path / "short").exists()
    with pytest.raises(LrquantError, match="image-text pairs 'nowhere' not found: .* or the built-in"):
        api.quantize(str(llava), tmp_path / "short", build_scheme(4, 16), "rtn",
                     data=api.DataSettings(eval="nowhere"))  # fmt: skip
    assert not (tmp_path / "short").exists()


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_packed_tower_blocks_run_a_batch_as_the_model_runs_each_image(
    name: str, pairs: Path, tmp_path: Path
) -> None:
    """Qwen2-VL's tower blocks read one unbatched sequence (Qwen2.5-VL's in windows, block 0):
    given a batch of samples, they give what the model's own pass gives for each image."""
    loaded = load_model(str(save_tiny_vlm(name, tmp_path / "model")))
    tower = api._vision_tower(loaded)  # the batching hooks
    samples = api.calibration_data(loaded, _data(pairs), 3)
    hidden = capture_block_inputs(loaded.model, tower.arch, samples)
    calls, _ = capture_block_kwargs(loaded.model, tower.arch, next(iter(samples)))
    blocks = tower.arch.block_list(loaded.model)
    expected = []
    handle = blocks[-1].register_forward_hook(
        lambda _m, _a, out: expected.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        for sample in samples:
            loaded.model(**model_inputs(tower.arch, sample))
    handle.remove()
    assert hidden.shape[0] == 3 and hidden.dim() == 3
    with torch.no_grad():
        for block, kwargs in zip(blocks, calls, strict=True):
            hidden = run_block(block, hidden, kwargs, batch_size=3)
    assert rel_err(hidden, torch.stack(expected)) < 1e-5
    if name == "qwen2_5_vl":  # block 0 attends within windows, block 1 over the whole image
        assert len(calls[0]["cu_seqlens"]) > len(calls[1]["cu_seqlens"]) == 2


def test_qwen2_vl_images_of_other_sizes_are_packed_at_the_first_ones(tmp_path: Path) -> None:
    """Qwen2-VL's processor packs each image's patches in rows, as many as its size gives: the
    pairs' images are brought to the first one's size so that every sample has as many. Its
    processor is built without torchvision and saved under the family's own class."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate([(40, 48), (64, 32), (20, 90)]):
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a cat sits on the mat")
    model = save_tiny_vlm("qwen2_vl", tmp_path / "model")
    loaded = load_model(str(model))
    samples = api.calibration_data(loaded, _data(folder), 3)
    grids = samples["image_grid_thw"]
    assert grids.shape == (3, 3) and (grids == grids[0]).all()
    assert samples["pixel_values"].shape[:2] == (3, int(grids[0].prod()))  # every patch, not the first
    assert ((samples["input_ids"] == IMAGE_TOKEN).sum(dim=1) == grids[0].prod() // 4).all()
    saved = json.loads((model / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor"


def test_command_line_quantizes_and_evaluates_a_vision_language_model(
    llava: Path, pairs: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    flags = ["--nsamples", "4", "--seqlen", "64", "--preset", "fast", "--set", "epochs=1"]
    assert main(["quantize", "--model", str(llava), "--output", str(out), "--wbits", "4",
                 "--quantize-vision", "--vision-wbits", "8",
                 "--calib-data", str(pairs), "--eval-data", str(pairs), *flags]) == 0  # fmt: skip
    assert "auto W4A16, vision tower W8A16: perplexity fp" in capsys.readouterr().out
    assert main(["eval", "--model", str(out), "--data", str(pairs)]) == 0
    printed = capsys.readouterr().out
    assert (
        "(W4A16, vision tower W8A16): perplexity" in printed
        and "on the texts of 8 image-text pairs" in printed
        and "KL" in printed
    )


# ------------------------------------------------------------------ the vision tower too


def _tower_linears(model: torch.nn.Module) -> dict[str, QuantLinear]:
    spec = get_vision_language_spec(model.config.model_type)
    tower = spec.vision_arch(model.config)
    return {
        f"{prefix}.{name}": module
        for prefix, block in tower.named_blocks(model)
        for name, module in block.named_modules()
        if isinstance(module, QuantLinear)
    }


def test_vision_tower_quantized_saved_reloaded_and_evaluated(vlm: Path, pairs: Path, tmp_path: Path) -> None:
    """--quantize-vision: the tower learns first, with a vision transformer's default rule and
    its own scheme; the reloaded output has its quantizers and scores as the run did."""
    recipe = {"epochs": 1, "compile": False}
    language_only = api.quantize(str(vlm), tmp_path / "lm", build_scheme(4, 8), "auto", "fast", recipe,
                                 _data(pairs))  # fmt: skip
    report = api.quantize(
        str(vlm), tmp_path / "out", build_scheme(4, 8), "auto", "fast", recipe, _data(pairs),
        vision_scheme=build_scheme(3, 6),
    )  # fmt: skip
    vision = report["vision"]
    assert vision["scheme"] == "W3A6" and vision["rule"]["when"] == "vision transformer"
    assert vision["recipe"]["smoothing"] == "best" and vision["recipe"]["e2e_epochs"] == 0
    assert [b["index"] for b in vision["blocks"]] == [b["index"] for b in report["blocks"]] == [0, 1]
    # the tower's error reaches the output: further from full precision than the language model alone
    assert report["fidelity"]["kl"] > language_only["fidelity"]["kl"]
    again = api.evaluate(str(tmp_path / "out"), api.DataSettings(eval=str(pairs)))
    assert again["scheme"] == "W4A8" and again["vision_scheme"] == "W3A6"
    assert again["perplexity"] == pytest.approx(report["perplexity"]["quantized"], rel=1e-5)
    assert again["kl"] == pytest.approx(report["fidelity"]["kl"], rel=1e-4)
    linears = _tower_linears(load_model(str(tmp_path / "out")).model)
    # in each of the 2 blocks: q, k, v, o and the MLP's two (Qwen2-VL: q/k/v fused; Qwen2.5-VL's
    # MLP gated)
    assert len(linears) == 2 * {"qwen2_vl": 4, "qwen2_5_vl": 5}.get(report["model"]["model_type"], 6)
    for linear in linears.values():
        assert linear.act_spec.bits == 6 and linear.weight_spec.bits == 3
        rows = linear.weight.detach()
        assert max(len(torch.unique(row)) for row in rows) <= 8  # 3-bit codes per row
    assert not (tmp_path / ".out.vision.resume").exists() and not (tmp_path / ".out.resume").exists()


@pytest.mark.parametrize("stop_at", [1, 3], ids=["in-the-tower", "in-the-language-model"])
def test_a_run_interrupted_in_either_part_resumes_to_the_same_checkpoint(
    vlm: Path, pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: int
) -> None:
    """Finished blocks of each part are saved in its own store; the rerun skips them."""

    def run(out: Path) -> dict:
        return api.quantize(
            str(vlm), out, build_scheme(4, 16), "lrquant_plus", "fast", {"epochs": 1, "compile": False},
            _data(pairs), run_eval=False, vision_scheme=build_scheme(4, 8),
        )  # fmt: skip

    run(tmp_path / "a")
    original, saved = ResumeStore.save_block, []

    def save_then_stop(self, i, block, state, report) -> None:
        original(self, i, block, state, report)
        saved.append(self.folder.name)
        if len(saved) == stop_at:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ResumeStore, "save_block", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "b")
    assert saved[0] == ".b.vision.resume" and not (tmp_path / "b").exists()
    assert (tmp_path / ".b.resume").exists() == (stop_at == 3)
    report = run(tmp_path / "b")
    assert [b["index"] for b in report["vision"]["blocks"]] == [0, 1]
    expected, got = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], value) for key, value in expected.items())


def test_quantize_vision_is_refused_where_it_does_not_apply(tmp_path: Path, capsys) -> None:
    text = save_tiny_model("llama", tmp_path / "llama")
    with pytest.raises(
        LrquantError, match="--quantize-vision applies to a vision-language model; .* is a language"
    ):
        api.quantize(str(text), tmp_path / "out", build_scheme(4, 16), "rtn", run_eval=False,
                     vision_scheme=build_scheme(4, 16))  # fmt: skip
    assert not (tmp_path / "out").exists()
    argv = ["quantize", "--model", str(text), "--output", str(tmp_path / "out"), "--vision-wbits", "8"]
    assert main(argv) == 2
    assert (
        "--vision-wbits sets the vision tower's bits: give it with --quantize-vision"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_explain_names_the_vision_towers_recipe(llava: Path, capsys) -> None:
    argv = ["quantize", "--model", str(llava), "--wbits", "4", "--abits", "8", "--quantize-vision",
            "--vision-wbits", "8", "--explain"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rule: vision-language model" in printed
    tower = printed.split("vision tower at W8A8:")[1]
    assert "rule: vision transformer" in tower and "smoothing=best lr_by_bits=True" in tower


@pytest.mark.parametrize(
    "name, vision_bits",
    [("llava", None), ("llava_clip", 8), ("qwen2_vl", None)],
    ids=["language-only", "with-the-tower", "qwen2-vl"],
)
def test_compressed_tensors_export_loads_to_the_lrquant_logits(
    name: str, vision_bits: int | None, tmp_path: Path
) -> None:
    """The packed checkpoint of a vision-language output: the language model's linears on its grid,
    a quantized tower's on its own (a config group naming them), the rest kept; transformers
    loads it to the logits lrquant computes. (transformers 5.25 cannot load a packed SigLIP
    tower: its weight initialisation reads the float weight a packed linear no longer has.)"""
    from transformers import AutoModelForImageTextToText

    model = save_tiny_vlm(name, tmp_path / "model")
    vision = None if vision_bits is None else build_scheme(vision_bits, 16, group_size=16, w_symmetric=True)
    out = tmp_path / "out"
    report = api.quantize(
        str(model), out, build_scheme(4, 16, group_size=16, w_symmetric=True), "rtn", run_eval=False,
        vision_scheme=vision, format="compressed-tensors",
    )  # fmt: skip
    folder = Path(report["export"]["path"])
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]
    assert groups["group_0"]["targets"] == ["Linear"] and groups["group_0"]["weights"]["num_bits"] == 4
    if vision_bits is not None:
        assert groups["group_1"]["weights"]["num_bits"] == vision_bits
        assert len(groups["group_1"]["targets"]) == 12 and all(
            t.startswith("model.vision_tower.") for t in groups["group_1"]["targets"]
        )
    inputs = tiny_vlm_inputs(name, batch=2, text_tokens=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = load_model(str(out)).model(**inputs).logits
        packed = AutoModelForImageTextToText.from_pretrained(folder).eval()(**inputs).logits
        full = load_model(str(model)).model(**inputs).logits
    assert (packed - reference).abs().max() <= 1e-5 < (full - reference).abs().max()


# ------------------------------------------------------------------ the projector too


def test_projector_quantized_saved_reloaded_and_evaluated(
    vlm: Path, pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--quantize-projector: the projector's linears are rounded to the language model's grid
    before its blocks learn, whose quantized chain then starts from the quantized projector's
    image tokens (the text tokens' inputs unchanged); the reloaded output has the quantizers and
    scores as the run did. Gemma 3's projector is a matrix, not a linear: refused in one line."""
    from lrquant.methods import blockwise

    scheme = build_scheme(4, 8, projector=True)
    model_type = load_model(str(vlm)).model_type
    if model_type == "gemma3":
        with pytest.raises(LrquantError, match="holds no linear layer .*leave out --quantize-projector"):
            api.quantize(str(vlm), tmp_path / "out", scheme, "rtn", run_eval=False)
        assert not (tmp_path / "out").exists()
        return
    captured = []
    capture = blockwise.capture_block_inputs
    monkeypatch.setattr(
        blockwise, "capture_block_inputs", lambda *a: captured.append(capture(*a)) or captured[-1]
    )
    report = api.quantize(
        str(vlm), tmp_path / "out", scheme, "lrquant_plus", "fast", {"epochs": 1, "compile": False},
        _data(pairs),
    )  # fmt: skip
    fp, quant = captured  # the full-precision chain's inputs, then the quantized chain's
    calibration = api.calibration_data(load_model(str(vlm)), _data(pairs), 4)
    image = (calibration["input_ids"] == IMAGE_TOKEN)[..., None].expand_as(fp)
    assert torch.equal(fp[~image], quant[~image]) and not torch.equal(fp[image], quant[image])
    assert report["fidelity"]["kl"] > 0
    again = api.evaluate(str(tmp_path / "out"), api.DataSettings(eval=str(pairs)))
    assert again["perplexity"] == pytest.approx(report["perplexity"]["quantized"], rel=1e-5)
    assert again["kl"] == pytest.approx(report["fidelity"]["kl"], rel=1e-4)
    reloaded = load_model(str(tmp_path / "out"))
    spec = get_vision_language_spec(model_type)
    projector = reloaded.model.get_submodule(spec.projector)
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, QuantLinear) for m in linears)
    for linear in linears:
        assert linear.weight_spec.bits == 4 and linear.act_spec.bits == 8
        assert max(len(torch.unique(row)) for row in linear.weight.detach()) <= 16  # 4-bit codes per row
    codes = load_file(tmp_path / "out" / "integer_weights.safetensors")
    assert any(key.startswith(spec.projector + ".") for key in codes)


def test_quantize_projector_is_refused_where_it_does_not_apply(llava: Path, tmp_path: Path, capsys) -> None:
    text = save_tiny_model("llama", tmp_path / "llama")
    argv = ["quantize", "--model", str(text), "--output", str(tmp_path / "out"), "--method", "rtn",
            "--quantize-projector", "--no-eval"]  # fmt: skip
    assert main(argv) == 2
    assert (
        "--quantize-projector applies to a vision-language model's projector; this text model has none"
        in (capsys.readouterr().err)
    )
    with pytest.raises(LrquantError, match="GGUF holds the language model alone .*--quantize-projector"):
        api.quantize(str(llava), tmp_path / "out", build_scheme(4, 16, projector=True), "rtn", format="gguf")
    with pytest.raises(LrquantError, match="quantized with the language model's scheme"):
        api.quantize(str(llava), tmp_path / "out", build_scheme(4, 16), "rtn", run_eval=False,
                     vision_scheme=build_scheme(4, 16, projector=True))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_qwen2_vl_projector_is_exported_on_the_language_models_grid(tmp_path: Path) -> None:
    """Qwen2-VL's projector (the merger) sits inside the vision tower's module: quantized with
    the language model, its linears belong to the language model's grid, not the tower's."""
    from lrquant.export import read_output
    from lrquant.export.compressed_tensors import quantization_schemes

    model = save_tiny_vlm("qwen2_vl", tmp_path / "model")
    out = tmp_path / "out"
    api.quantize(str(model), out, build_scheme(4, 16, group_size=16, projector=True), "rtn", run_eval=False,
                 vision_scheme=build_scheme(8, 16, group_size=16))  # fmt: skip
    output = read_output(out)
    merger = [name for name in output.linears if name.startswith("model.visual.merger.")]
    assert len(merger) == 2 and not any(output.in_tower(name) for name in merger)
    assert all(output.scheme_of(name).weight.bits == 4 for name in merger)
    groups = quantization_schemes(output)
    assert groups["group_1"].weights.num_bits == 8 and not set(merger) & set(groups["group_1"].targets)
