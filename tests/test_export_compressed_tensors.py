"""compressed-tensors export: the checkpoint holds lrquant's integers exactly, and transformers loads
it on CPU to the logits of the simulated lrquant model.

The tiny models are float32, so the scales are stored unrounded and the loaded weights equal
lrquant's bit for bit: logits agree to 1e-5, float32 summation noise (a model in float16 or bfloat16
would add the rounding of its scales to that dtype, the only change export makes to a weight).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrquant import api
from lrquant.config import build_scheme
from lrquant.errors import LrquantError
from lrquant.export import QuantizedOutput, read_output
from lrquant.export.compressed_tensors import write_compressed_tensors
from lrquant.models.loading import load_model

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(calib=str(text_file), seqlen=32, nsamples=4)


def quantized(model: Path, folder: Path, data: api.DataSettings, method: str = "rtn", **scheme) -> Path:
    """An lrquant output folder of ``model`` quantized with ``build_scheme(**scheme)``."""
    overrides = {"compile": False, "epochs": 1}
    api.quantize(str(model), folder, build_scheme(**scheme), method, "fast", overrides, data, run_eval=False)
    return folder


def exported(output: QuantizedOutput, folder: Path) -> Path:
    folder.mkdir()
    write_compressed_tensors(output, folder)
    return folder


def load_exported(folder: Path) -> torch.nn.Module:
    """The exported model as plain transformers loads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(40).reshape(2, 20) * 7 % 500
    with torch.no_grad():
        return model(ids).logits


def assert_codes_round_trip(folder: Path, output: QuantizedOutput) -> None:
    """Unpacking with compressed-tensors gives back exactly lrquant's codes and zero points."""
    tensors = load_file(folder / "model.safetensors")
    for name, linear in output.linears.items():
        offset = 0 if linear.symmetric else 2 ** (linear.bits - 1)
        packed = tensors[f"{name}.weight_packed"]
        out, columns = linear.codes.shape
        assert packed.dtype == torch.int32 and packed.shape == (out, math.ceil(columns * linear.bits / 32))
        assert tensors[f"{name}.weight_shape"].tolist() == [out, columns]
        codes = unpack_from_int32(packed, linear.bits, linear.codes.shape)
        assert torch.equal(codes.to(torch.int16) + offset, linear.codes.to(torch.int16)), name
        assert torch.equal(tensors[f"{name}.weight_scale"], linear.scale), name
        if linear.symmetric:
            assert f"{name}.weight_zero_point" not in tensors
        else:
            zero = unpack_from_int32(tensors[f"{name}.weight_zero_point"], linear.bits, linear.zero.shape, 0)
            assert torch.equal(zero.float() + offset, linear.zero), name


CASES = [
    (model, group, symmetric)
    for model in ("llama", "qwen2", "opt")
    for group in (16, None)
    for symmetric in (True, False)
]


@pytest.mark.parametrize("model_type, group_size, symmetric", CASES)
def test_rtn_w4a16_loads_to_the_lrquant_logits(
    model_type: str, group_size: int | None, symmetric: bool, tiny_models, data, tmp_path: Path
) -> None:
    out = quantized(tiny_models(model_type), tmp_path / "out", data, wbits=4, group_size=group_size,
                    w_symmetric=symmetric)  # fmt: skip
    output = read_output(out)
    folder = exported(output, tmp_path / "ct")
    assert_codes_round_trip(folder, output)
    config = json.loads((folder / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["symmetric"] == symmetric and weights["type"] == "int"
    assert weights["strategy"] == ("group" if group_size else "channel")
    assert weights["group_size"] == group_size
    assert qconfig["config_groups"]["group_0"]["input_activations"] is None
    assert qconfig["ignore"] == ["lm_head"]
    # plain transformers loads packed asymmetric zero points only when it decompresses on load
    assert qconfig.get("dequantize", False) == (not symmetric)
    assert config["tie_word_embeddings"] == output.config["tie_word_embeddings"]
    assert (folder / "tokenizer.json").is_file() and (folder / "generation_config.json").is_file()
    reference = logits(load_model(str(out)).model)
    assert (logits(load_exported(folder)) - reference).abs().max() <= TOLERANCE


def test_a_large_checkpoint_is_written_in_shards(
    llama_output: QuantizedOutput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the shard size the packed tensors go to shards with their index, one shard in memory
    at a time; transformers loads them to the same logits as the one-file checkpoint."""
    import lrquant.export.compressed_tensors as ct

    whole = exported(llama_output, tmp_path / "whole")
    monkeypatch.setattr(ct, "SHARD_BYTES", 16 * 2**10)
    sharded = exported(llama_output, tmp_path / "sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (sharded / "model.safetensors").exists()
    assert all((sharded / shard).is_file() for shard in shards) and shards[0].endswith(
        f"-of-{len(shards):05d}.safetensors"
    )
    expected = load_file(whole / "model.safetensors")
    got = {key: value for shard in shards for key, value in load_file(sharded / shard).items()}
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in expected.values())
    assert torch.equal(logits(load_exported(sharded)), logits(load_exported(whole)))


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_every_weight_width_is_pack_quantized(bits: int, tiny_llama: Path, data, tmp_path: Path) -> None:
    out = quantized(tiny_llama, tmp_path / "out", data, wbits=bits, group_size=32, w_symmetric=bits != 3)
    output = read_output(out)
    folder = exported(output, tmp_path / "ct")
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "pack-quantized"
    assert qconfig["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    assert_codes_round_trip(folder, output)
    reference = logits(load_model(str(out)).model)
    assert (logits(load_exported(folder)) - reference).abs().max() <= TOLERANCE


def test_a_quantized_head_is_packed_and_not_ignored(tiny_llama: Path, data, tmp_path: Path) -> None:
    out = quantized(tiny_llama, tmp_path / "out", data, wbits=4, group_size=16, w_symmetric=True, head=True)
    output = read_output(out)
    assert "lm_head" in output.linears
    folder = exported(output, tmp_path / "ct")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"] == []
    assert_codes_round_trip(folder, output)
    assert (logits(load_exported(folder)) - logits(load_model(str(out)).model)).abs().max() <= TOLERANCE


def test_lrquant_plus_w4a16_loads_to_the_lrquant_logits(tiny_llama: Path, data, tmp_path: Path) -> None:
    out = quantized(tiny_llama, tmp_path / "out", data, "lrquant_plus", wbits=4, group_size=16)
    output = read_output(out)
    folder = exported(output, tmp_path / "ct")
    assert_codes_round_trip(folder, output)
    reference = logits(load_model(str(out)).model)
    assert (logits(load_exported(folder)) - reference).abs().max() <= TOLERANCE


INPUT_CASES = [(8, None, True, False), (8, None, True, True), (8, None, False, False), (4, 16, False, False)]


@pytest.mark.parametrize("wbits, group_size, w_symmetric, a_symmetric", INPUT_CASES,
                         ids=["w8a8", "w8a8-a-sym", "w8a8-w-asym", "w4a8g16-asym"])  # fmt: skip
def test_quantized_inputs_are_int_quantized_and_dynamic_per_token(
    wbits: int, group_size: int | None, w_symmetric: bool, a_symmetric: bool, tiny_llama, data, tmp_path
) -> None:
    scheme = {"group_size": group_size, "w_symmetric": w_symmetric, "a_symmetric": a_symmetric}
    out = quantized(tiny_llama, tmp_path / "out", data, wbits=wbits, abits=8, qkv_bits=16, **scheme)
    output = read_output(out)
    folder = exported(output, tmp_path / "ct")
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = qconfig["config_groups"]["group_0"]
    assert qconfig["format"] == group["format"] == "int-quantized"
    inputs = group["input_activations"]
    assert (inputs["num_bits"], inputs["strategy"], inputs["dynamic"]) == (8, "token", True)
    assert inputs["symmetric"] == a_symmetric
    tensors = load_file(folder / "model.safetensors")
    offset = 0 if w_symmetric else 2 ** (wbits - 1)
    for name, linear in output.linears.items():
        assert tensors[f"{name}.weight"].dtype == torch.int8
        assert torch.equal(tensors[f"{name}.weight"].to(torch.int16) + offset, linear.codes.to(torch.int16))
        if not w_symmetric:
            assert torch.equal(tensors[f"{name}.weight_zero_point"].float() + offset, linear.zero)
    # transformers quantizes each linear input per token on CPU as it runs. Its asymmetric grid is
    # lrquant's whenever a token has values of both signs (it stretches the range to hold 0), but it
    # rounds x/Δ + z where lrquant rounds x/Δ, so a value at a float rounding tie can land one step
    # away; its symmetric step is max|x|/127.5 where lrquant's is max|x|/127.
    gap = (logits(load_exported(folder)) - logits(load_model(str(out)).model)).abs().max()
    assert gap <= (0.02 if a_symmetric else 0.005)


def test_a_separate_mlp_activation_grid_is_its_own_group(tiny_llama: Path, data, tmp_path: Path) -> None:
    out = quantized(tiny_llama, tmp_path / "out", data, wbits=4, group_size=16, w_symmetric=True,
                    post_act_bits=8)  # fmt: skip
    folder = exported(read_output(out), tmp_path / "ct")
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "mixed-precision"
    groups = qconfig["config_groups"]
    assert groups["group_0"]["format"] == "pack-quantized" and groups["group_0"]["input_activations"] is None
    assert groups["group_1"]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert groups["group_1"]["format"] == "int-quantized"
    assert groups["group_1"]["input_activations"]["num_bits"] == 8
    assert (logits(load_exported(folder)) - logits(load_model(str(out)).model)).abs().max() <= TOLERANCE


def test_a_vision_classifier_loads_to_the_lrquant_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForImageClassification

    from lrquant.models.tiny_vision import save_tiny_vision_model

    model = save_tiny_vision_model("vit", tmp_path / "vit", classifier=True)
    out = quantized(model, tmp_path / "out", api.DataSettings(nsamples=4), wbits=4, group_size=16,
                    w_symmetric=True)  # fmt: skip
    folder = exported(read_output(out), tmp_path / "ct")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"] == ["classifier"]
    # the float copies of the quantized weights (ViT's checkpoint names differ from its modules) are gone
    assert not any(key.endswith("query.weight") for key in load_file(folder / "model.safetensors"))
    loaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    size = loaded.config.image_size
    pixels = torch.linspace(-1, 1, 2 * 3 * size * size).reshape(2, 3, size, size)
    with torch.no_grad():
        gap = loaded(pixel_values=pixels).logits - load_model(str(out)).model(pixel_values=pixels).logits
    assert gap.abs().max() <= TOLERANCE


@pytest.fixture(scope="module")
def llama_output(tiny_models, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> QuantizedOutput:
    folder = tmp_path_factory.mktemp("llama-g16") / "out"
    data = api.DataSettings(calib=str(text_file), seqlen=32, nsamples=4)
    return read_output(quantized(tiny_models("llama"), folder, data, wbits=4, group_size=16))


def test_a_bias_the_architecture_lacks_switches_it_on(llama_output: QuantizedOutput, tmp_path: Path) -> None:
    linears = dict(llama_output.linears)
    name = "model.layers.0.self_attn.o_proj"
    bias = torch.linspace(-1, 1, linears[name].codes.shape[0])
    linears[name] = dataclasses.replace(linears[name], bias=bias)
    folder = exported(dataclasses.replace(llama_output, linears=linears), tmp_path / "ct")
    assert json.loads((folder / "config.json").read_text())["attention_bias"] is True
    model = load_exported(folder)
    assert torch.equal(model.get_submodule(name).bias, bias)
    assert not model.get_submodule("model.layers.0.self_attn.q_proj").bias.any()


def test_scales_take_the_model_dtype(llama_output: QuantizedOutput, tmp_path: Path) -> None:
    config = {**llama_output.config, "dtype": "bfloat16"}
    folder = exported(dataclasses.replace(llama_output, config=config), tmp_path / "ct")
    tensors = load_file(folder / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16


def _scheme(output: QuantizedOutput, **changes) -> QuantizedOutput:
    return dataclasses.replace(output, scheme=output.scheme.model_copy(update=changes))


def _spec(output: QuantizedOutput, field: str, **changes) -> QuantizedOutput:
    return _scheme(output, **{field: getattr(output.scheme, field).model_copy(update=changes)})


def _zero_outside(output: QuantizedOutput) -> QuantizedOutput:
    linears = dict(output.linears)
    name = "model.layers.1.mlp.down_proj"
    zero = linears[name].zero.clone()
    zero[0, :3] = torch.tensor([-1.0, 16.0, 40.0])
    linears[name] = dataclasses.replace(linears[name], zero=zero)
    return dataclasses.replace(output, linears=linears)


def _bias_without_switch(output: QuantizedOutput) -> QuantizedOutput:
    """A biased o_proj in a llama config that has no attention_bias switch to turn on."""
    linears = dict(output.linears)
    name = "model.layers.0.self_attn.o_proj"
    linears[name] = dataclasses.replace(linears[name], bias=torch.ones(linears[name].codes.shape[0]))
    config = {key: value for key, value in output.config.items() if key != "attention_bias"}
    return dataclasses.replace(output, linears=linears, config=config)


def _ragged(output: QuantizedOutput) -> QuantizedOutput:
    return _spec(output, "weight", group_size=24)


REFUSALS = [
    (_ragged, r"group size 24 leaves a ragged last group on rows of 64 columns.*--group-size 64 or 32 or 16"),
    (_zero_outside, r"3 group\(s\) have a zero point outside the codes 0\.\.15"),
    (lambda o: _spec(o, "qkv", bits=8), r"Q/K/V quantization"),
    (lambda o: _spec(o, "softmax", bits=8), r"softmax quantization"),
    (lambda o: _spec(o, "activation", bits=8, clip_ratio=0.9), r"--a-clip 0\.9"),
    (lambda o: _scheme(o, rotate_qkv=True), r"--rotate-qkv"),
    (lambda o: _scheme(o, patch_embed=True), r"patch-embedding quantization"),
    (lambda o: _spec(o, "weight", bits=12), r"12-bit weights \(it packs 1 to 8 bits\)"),
    (_bias_without_switch, r"'model.layers.0.self_attn.o_proj' has a bias that a llama model cannot load"),
]


@pytest.mark.parametrize("change, message", REFUSALS, ids=[
    "ragged", "zero-point", "qkv", "softmax", "a-clip", "rotate-qkv", "patch-embed", "12-bit",
    "bias"])  # fmt: skip
def test_refusals_name_the_fix_and_write_nothing(
    change, message: str, llama_output: QuantizedOutput, tmp_path: Path
) -> None:
    with pytest.raises(LrquantError, match=message):
        exported(change(llama_output), tmp_path / "ct")
    assert not any((tmp_path / "ct").iterdir())


def test_a_missing_package_names_the_install(
    llama_output: QuantizedOutput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(LrquantError, match=r"pip install 'compressed-tensors>=0\.20\.1'"):
        exported(llama_output, tmp_path / "ct")
    assert not any((tmp_path / "ct").iterdir())
