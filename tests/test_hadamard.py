"""Hadamard rotations of the residual stream, the value heads and the down projection's input:
exact without quantization, saved and reloaded with the quantized model, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import interrupt_after_block, logits, rel_err
from safetensors.torch import load_file
from test_transforms import perturb, random_stats
from transformers import AutoModelForCausalLM

from lrquant import api
from lrquant.arch import get_arch_spec
from lrquant.checkpoint import QUANT_FILE, ROTATIONS_FILE
from lrquant.config import build_scheme
from lrquant.errors import LrquantError
from lrquant.models.loading import load_model
from lrquant.models.tiny import save_tiny_model, tiny_model
from lrquant.models.tiny_vision import IMAGE_SIZE, TINY_VISION_ARCHS, tiny_vision_model
from lrquant.quant.apply import (
    attach_block_quantizers,
    attach_quantizers,
    quant_linears,
    use_quantized_attention,
)
from lrquant.quant.hadamard import hadamard, randomized_hadamard
from lrquant.transforms.block import (
    AttentionLayout,
    TransformOptions,
    attach_block_transforms,
    fold_block_transforms,
)
from lrquant.transforms.hadamard import apply_hadamard

IDS = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dim", [1, 2, 64, 96, 576, 1536])
def test_randomized_hadamard_is_orthogonal_and_seeded(dim: int) -> None:
    q = randomized_hadamard(dim, torch.Generator().manual_seed(3))
    assert torch.allclose(q @ q.T, torch.eye(dim, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, randomized_hadamard(dim, torch.Generator().manual_seed(3)))
    if dim >= 64:  # spread: no entry carries more than a few times the flat 1/sqrt(dim)
        assert q.abs().max() < 4 / dim**0.5
        assert not torch.equal(q, randomized_hadamard(dim, torch.Generator().manual_seed(4)))


def test_sylvester_hadamard() -> None:
    h = hadamard(8) * 8**0.5
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("mode", ["folded", "online"])
def test_rotation_without_quantization_is_exact(model_type: str, mode: str) -> None:
    model = tiny_model(model_type, num_layers=2)
    arch = get_arch_spec(model_type)
    ref = logits(model, IDS)
    apply_hadamard(model, arch, mode, seed=0)
    assert rel_err(logits(model, IDS), ref) < 1e-5
    attach_quantizers(model, arch, build_scheme(wbits=16, abits=16))  # the wrappers keep the rotations
    assert rel_err(logits(model, IDS), ref) < 1e-5
    rotated = [name for name, linear in quant_linears(model, arch) if linear.input_rotation is not None]
    assert rotated == (
        ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"] if mode == "online" else []
    )
    # the norms hold 1 now and their gains moved into the linears
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones(64)) for layer in model.model.layers)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "opt", "phi3"])
@pytest.mark.parametrize("mode", ["down", "inputs"])
def test_run_time_input_rotations_are_exact_for_any_decoder(model_type: str, mode: str) -> None:
    """``down`` rotates the two down projections' inputs, ``inputs`` every quantized linear's."""
    model = tiny_model(model_type, num_layers=2)
    arch = get_arch_spec(model_type)
    ref = logits(model, IDS)
    apply_hadamard(model, arch, mode, seed=0)
    assert rel_err(logits(model, IDS), ref) < 1e-5
    attach_quantizers(model, arch, build_scheme(wbits=16, abits=16))
    assert rel_err(logits(model, IDS), ref) < 1e-5
    linears = list(quant_linears(model, arch))
    rotated = sum(linear.input_rotation is not None for _, linear in linears)
    assert linears and rotated == (2 if mode == "down" else len(linears))


@pytest.mark.parametrize("model_type", ["dinov2", "vit", "swin"])
def test_down_rotation_of_vision_mlps_is_exact(model_type: str) -> None:
    model = tiny_vision_model(model_type)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
        apply_hadamard(model, get_arch_spec(model_type), "down")
        assert rel_err(model(pixel_values=pixels).last_hidden_state, ref) < 1e-5


@pytest.mark.parametrize("model_type", TINY_VISION_ARCHS)
def test_smoothing_before_every_input_rotation_is_exact(model_type: str) -> None:
    """With every linear input rotated at run time, each smoothing pair scales the channels before
    the rotation (norm -> q/k/v, norm -> MLP, v -> o, q -> k): perturbed factors still compute
    the original model."""
    model = tiny_vision_model(model_type, seed=0)
    arch = get_arch_spec(model.config.model_type)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    apply_hadamard(model, arch, "inputs", seed=0)
    use_quantized_attention(model)
    generator = torch.Generator().manual_seed(1)
    options = TransformOptions(shifts=True, clipping=False, rotation_vectors=False)
    for block in arch.block_list(model):
        attach_block_quantizers(block, arch, build_scheme(16, 16))
        layout = AttentionLayout.of_block(block, arch, model.config)
        bt = attach_block_transforms(block, arch, layout, random_stats(block, arch, generator), options)
        assert set(bt.factors) == {"qkv", "mlp_in", "out", "qk"}
        perturb(bt, generator)
    with torch.no_grad():
        assert rel_err(model(pixel_values=x).last_hidden_state, ref) < 1e-5
        for block in arch.block_list(model):
            fold_block_transforms(block, arch)
        assert rel_err(model(pixel_values=x).last_hidden_state, ref) < 1e-5


def test_tied_head_is_untied() -> None:
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    ref = logits(model, IDS)
    apply_hadamard(model, get_arch_spec("llama"), "folded")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert rel_err(logits(model, IDS), ref) < 1e-5


@pytest.mark.parametrize("model_type", ["gemma2", "opt", "phi3", "dinov2"])
def test_other_layouts_are_refused(model_type: str) -> None:
    with pytest.raises(
        LrquantError, match="hadamard rotations cover decoders with plain RMSNorm.*hadamard=off"
    ):
        model = tiny_vision_model(model_type) if model_type == "dinov2" else tiny_model(model_type)
        apply_hadamard(model, get_arch_spec(model_type), "folded")


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(calib=str(text_file), eval=str(text_file), seqlen=32, nsamples=4, eval_windows=2)


def _quantize(
    source: Path,
    out: Path,
    data: api.DataSettings,
    hadamard: str,
    method: str = "lrquant_plus",
    abits: int = 4,
):
    return api.quantize(
        str(source),
        out,
        scheme=build_scheme(wbits=4, abits=abits),
        method=method,
        preset="fast",
        overrides={"epochs": 1, "hadamard": hadamard},
        data=data,
    )


@pytest.mark.parametrize("method", ["rtn", "lrquant_plus"])
def test_online_rotation_is_saved_and_reloaded(
    tiny_llama: Path, data: api.DataSettings, tmp_path: Path, method: str
) -> None:
    out = tmp_path / "online"
    report = _quantize(tiny_llama, out, data, "online", method)
    names = json.loads((out / QUANT_FILE).read_text())["input_rotations"]
    assert sorted(names) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert list(load_file(out / ROTATIONS_FILE)) == ["rotation_0"]  # one matrix, shared
    again = api.evaluate(str(out), data)
    assert again["perplexity"] == pytest.approx(report["perplexity"]["quantized"], rel=1e-5)
    # without the saved rotation the down projections read the wrong basis
    loaded = load_model(str(out))
    ref = logits(loaded.model, IDS)
    for _, linear in quant_linears(loaded.model, loaded.arch):
        linear.input_rotation = None
    assert rel_err(logits(loaded.model, IDS), ref) > 0.05


def test_folded_rotation_leaves_an_ordinary_checkpoint(
    tiny_llama: Path, data: api.DataSettings, tmp_path: Path
) -> None:
    out = tmp_path / "folded"
    _quantize(tiny_llama, out, data, "folded", "rtn", abits=16)
    assert not (out / ROTATIONS_FILE).exists()
    assert "input_rotations" not in json.loads((out / QUANT_FILE).read_text())
    # plain transformers computes what lrquant's loader computes (weight-only: nothing at run time)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_model(str(out)).model
    assert rel_err(logits(ours, IDS), logits(plain, IDS)) < 1e-5


def test_damaged_rotation_file_is_a_clear_error(
    tiny_llama: Path, data: api.DataSettings, tmp_path: Path
) -> None:
    out = tmp_path / "online"
    _quantize(tiny_llama, out, data, "online", "rtn")
    (out / ROTATIONS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(LrquantError, match="input_rotations.safetensors' is not a valid safetensors file"):
        load_model(str(out))
    (out / ROTATIONS_FILE).unlink()
    with pytest.raises(LrquantError, match="input rotations of .* missing or damaged"):
        load_model(str(out))


def test_rotated_run_resumes_to_the_same_checkpoint(
    data: api.DataSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = save_tiny_model("llama", tmp_path / "model", num_layers=3)
    _quantize(source, tmp_path / "a", data, "online")
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            _quantize(source, tmp_path / "b", data, "online")
    _quantize(source, tmp_path / "b", data, "online")
    expected, got = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(
        load_file(tmp_path / "a" / ROTATIONS_FILE)["rotation_0"],
        load_file(tmp_path / "b" / ROTATIONS_FILE)["rotation_0"],
    )


@pytest.mark.parametrize("mode", ["folded", "online"])
def test_learned_rotated_run_targets_the_original_model(
    tiny_llama: Path, data: api.DataSettings, tmp_path: Path, mode: str
) -> None:
    """At 8 bits the rotated, learned model stays next to the unrotated full-precision one, block by
    block (the learning targets come from the rotated full-precision blocks) and in perplexity."""
    report = api.quantize(
        str(tiny_llama),
        tmp_path / "w8a8",
        scheme=build_scheme(wbits=8, abits=8),
        method="lrquant_plus",
        preset="fast",
        overrides={"epochs": 1, "hadamard": mode},
        data=data,
    )
    assert min(block["cosine"] for block in report["blocks"]) > 0.99
    assert report["perplexity"]["quantized"] == pytest.approx(report["perplexity"]["fp"], rel=0.02)
