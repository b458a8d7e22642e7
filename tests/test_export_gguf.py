"""GGUF export: the blocks hold lrquant's integer codes bit for bit, the steps and minimums up to
fp16 rounding, and transformers' GGUF loader (which dequantizes and undoes the q/k row order)
gives the logits of the simulated quantized model; what GGUF cannot hold exactly is refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from lrquant import api
from lrquant.config import QuantScheme, build_scheme
from lrquant.errors import LrquantError
from lrquant.export import QuantizedOutput, read_output
from lrquant.export.gguf import write_gguf
from lrquant.models.loading import load_model

# offset of the _0 types (w = d·(q − offset)); None for the _1 types (w = d·q + m)
OFFSETS = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 0, "Q4_1": None, "Q5_1": None}

# transformers runs the file in float32; the logits differ from the simulated model's only by the
# fp16 rounding of each block's step and minimum and of the F16 embedding and head (at most 1.3e-3
# of the largest logit here; the q/k rows left in HF's order give 1.2e-2)
LOGIT_TOLERANCE = 3e-3

CASES = {
    "rtn-w4g32-Q4_1": ("llama", "rtn", build_scheme(4, group_size=32), {}, "Q4_1"),
    "rtn-w4g32-sym-Q4_0": ("llama", "rtn", build_scheme(4, group_size=32, w_symmetric=True), {}, "Q4_0"),
    "rtn-w4g96-ragged-Q4_1": ("llama", "rtn", build_scheme(4, group_size=96), {}, "Q4_1"),
    "rtn-w4g32-head-Q4_1": ("llama", "rtn", build_scheme(4, group_size=32, head=True), {}, "Q4_1"),
    "rtn-w4-channel-Q4_1": ("llama", "rtn", build_scheme(4), {}, "Q4_1"),
    "rtn-w5g64-sym-Q5_0": ("llama", "rtn", build_scheme(5, group_size=64, w_symmetric=True), {}, "Q5_0"),
    "rtn-w5g32-Q5_1": ("llama", "rtn", build_scheme(5, group_size=32), {}, "Q5_1"),
    "rtn-w8-sym-Q8_0": ("llama", "rtn", build_scheme(8, w_symmetric=True), {}, "Q8_0"),
    "lrquant_plus-w4g32-Q4_1": (
        "llama",
        "lrquant_plus",
        build_scheme(4, group_size=32),
        {"epochs": 1},
        "Q4_1",
    ),
    "qwen2-rtn-w4g32-Q4_1": ("qwen2", "rtn", build_scheme(4, group_size=32), {}, "Q4_1"),
    "mistral-rtn-w4g32-sym-Q4_0": (
        "mistral",
        "rtn",
        build_scheme(4, group_size=32, w_symmetric=True),
        {},
        "Q4_0",
    ),
}


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(calib=str(text_file), seqlen=32, nsamples=4)


def quantize(
    model: Path, out: Path, method: str, scheme: QuantScheme, overrides: dict, data: api.DataSettings
) -> QuantizedOutput:
    api.quantize(
        str(model), out, scheme, method, "fast", {"compile": False, **overrides}, data, run_eval=False
    )
    return read_output(out)


@pytest.fixture(scope="module")
def w4_output(
    tiny_llama: Path, data: api.DataSettings, tmp_path_factory: pytest.TempPathFactory
) -> QuantizedOutput:
    """An RTN W4 g32 output that the refusals alter."""
    return quantize(
        tiny_llama, tmp_path_factory.mktemp("w4") / "out", "rtn", build_scheme(4, group_size=32), {}, data
    )


def llama_cpp_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's ``LlamaModel.permute`` of q/k rows, as llama.cpp's rope wants them."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def fp16(values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded once to fp16 (torch rounds float64 through float32, twice)."""
    return torch.from_numpy(values.numpy().astype(np.float16)).double()


def check_blocks(output: QuantizedOutput, path: Path, qtype: str) -> None:
    """Every quantized linear's blocks: the codes recovered bit for bit, each step the fp16 of its
    group's step, the weights lrquant's within the fp16 rounding of step and minimum."""
    config = output.config
    arch = gguf.MODEL_ARCH.QWEN2 if output.model_type == "qwen2" else gguf.MODEL_ARCH.LLAMA
    names = gguf.TensorNameMap(arch, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    offset = OFFSETS[qtype]
    for name, linear in output.linears.items():
        tensor = stored[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        assert tensor.tensor_type.name == qtype, name
        codes, scale, zero = linear.codes.long(), linear.scale.double(), linear.zero.double()
        weight = linear.dequantized().double()
        role = name.rsplit(".", 1)[-1]
        if arch == gguf.MODEL_ARCH.LLAMA and role in heads:
            codes, scale, zero, weight = (
                llama_cpp_rows(t, heads[role]) for t in (codes, scale, zero, weight)
            )
        out, inputs = codes.shape
        blocks = np.asarray(tensor.data).reshape(out, inputs // 32, -1)
        deq = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)).double().reshape(out, -1, 32)
        d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0]).double()
        group_of_block = torch.arange(inputs // 32) * 32 // (linear.group_size or inputs)
        s, z = scale[:, group_of_block], zero[:, group_of_block]
        assert torch.equal(d, fp16(s)), name
        if offset is None:
            lowest = -(1 << (linear.bits - 1)) if linear.symmetric else 0
            m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]).double()
            assert torch.equal(m, fp16(s * (lowest - z))), name
            q = (deq - m[..., None]) / d[..., None]
            expected = codes.reshape(out, -1, 32) - lowest
        else:
            m = torch.zeros_like(d)
            q = deq / d[..., None] + offset
            expected = codes.reshape(out, -1, 32) - z[..., None].long() + offset
        assert torch.equal(q.round(), expected.double()), name
        assert (q - q.round()).abs().max() < 1e-4, name
        # |w| rounds with d and m: at most 2^-11 of |d·(q − offset)| + |m|
        bound = 2**-11 * (s.abs()[..., None] * (expected - (offset or 0)).abs() + m.abs()[..., None])
        assert ((deq - weight.reshape(out, -1, 32)).abs() <= bound * 1.001 + 1e-12).all(), name


def gguf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the file as transformers runs it: its GGUF config, tokenizer and dequantized tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(
        str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    result = model.load_state_dict(tensors["tensors"], strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("case", CASES)
def test_blocks_hold_the_codes_and_run_as_the_quantized_model(
    case: str, tiny_models, data: api.DataSettings, tmp_path: Path
) -> None:
    model_type, method, scheme, overrides, qtype = CASES[case]
    output = quantize(tiny_models(model_type), tmp_path / "out", method, scheme, overrides, data)
    path = tmp_path / "model.gguf"
    write_gguf(output, path)

    reader = gguf.GGUFReader(path)
    assert reader.fields["general.quantized_by"].contents() == "lrquant"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    # lrquant saves a Qwen2 tokenizer with Qwen2's own split regex
    pre = "qwen2" if model_type == "qwen2" else "gpt-2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == pre
    check_blocks(output, path, qtype)

    simulated = load_model(str(output.folder))
    ids = simulated.tokenizer("Class definitions and the import statement.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = simulated.model.eval()(ids).logits
    got = gguf_logits(path, ids)
    assert (got - expected).abs().max() <= LOGIT_TOLERANCE * expected.abs().max()


def test_a_wider_type_holds_the_grid_exactly(w4_output: QuantizedOutput, tmp_path: Path) -> None:
    """A 4-bit asymmetric grid also fits Q5_1 (codes 0..15 of 0..31), on request."""
    path = tmp_path / "wide.gguf"
    write_gguf(w4_output, path, gguf_type="Q5_1")
    check_blocks(w4_output, path, "Q5_1")


def test_matrices_are_f16_or_bf16_and_norms_f32(w4_output: QuantizedOutput, tmp_path: Path) -> None:
    """Float32 embedding and head become F16 (what convert_hf_to_gguf.py writes for a float32
    model), bf16 ones stay BF16 exactly; norms are F32, as llama.cpp wants them."""
    for dtype, qtype, kept_as in (
        (torch.float32, "F16", torch.float16),
        (torch.bfloat16, "BF16", torch.bfloat16),
    ):
        tensors = {key: t.to(dtype) for key, t in w4_output.tensors.items()}
        path = tmp_path / f"{qtype}.gguf"
        write_gguf(_altered(w4_output, tensors=tensors), path)
        stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
        embedding = stored["token_embd.weight"]
        assert embedding.tensor_type.name == qtype
        got = torch.from_numpy(dequantize(embedding.data, embedding.tensor_type))
        assert torch.equal(got, tensors["model.embed_tokens.weight"].to(kept_as).float())
        assert stored["output_norm.weight"].tensor_type.name == "F32"


def test_a_w4_export_is_a_third_of_bf16(w4_output: QuantizedOutput, tmp_path: Path) -> None:
    """Q4_1 is 5 bits a weight (4-bit codes, fp16 step and minimum per 32); the tiny model's
    embedding and head, half its weights, stay 16-bit."""
    path = tmp_path / "small.gguf"
    write_gguf(w4_output, path)
    quantized = sum(lin.codes.numel() for lin in w4_output.linears.values())
    rest = sum(t.numel() for t in w4_output.tensors.values())
    tokenizer = 32_000  # tokens, types and merges of the 512-token vocabulary, and the metadata
    assert path.stat().st_size <= quantized * 5 / 8 + rest * 2 + tokenizer
    assert path.stat().st_size < 0.75 * 2 * (quantized + rest)


def _altered(output: QuantizedOutput, **changes) -> QuantizedOutput:
    return dataclasses.replace(output, **changes)


REFUSALS = {
    "architecture": (lambda o: _altered(o, config={**o.config, "model_type": "opt"}), "supports llama"),
    "activations": (lambda o: _altered(o, scheme=build_scheme(4, 8, group_size=32)), "weights only"),
    "rope-scaling": (
        lambda o: _altered(o, config={**o.config, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}),
        "rope scaling",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_fix_and_write_nothing(
    case: str, w4_output: QuantizedOutput, tmp_path: Path
) -> None:
    alter, message = REFUSALS[case]
    path = tmp_path / "refused.gguf"
    with pytest.raises(LrquantError, match=message) as err:
        write_gguf(alter(w4_output), path)
    assert "\n" not in str(err.value)
    assert not path.exists()


def test_a_type_that_cannot_hold_the_grid_is_fitted(
    w4_output: QuantizedOutput, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Q4_0 (symmetric) cannot hold an asymmetric grid's codes: asked for, it is fitted to the
    learned weights, said in one line, about a third of a learned step away from them (RMS)."""
    path = tmp_path / "fitted.gguf"
    write_gguf(w4_output, path, gguf_type="Q4_0")
    assert "Q4_0 cannot hold the W4A16g32 grid code for code" in capsys.readouterr().err
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    weight = w4_output.linears["model.layers.0.mlp.down_proj"]
    tensor = stored["blk.0.ffn_down.weight"]
    assert tensor.tensor_type.name == "Q4_0"
    got = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)).reshape(weight.codes.shape)
    step = weight.scale.repeat_interleave(32, dim=1)
    rms = (got - weight.dequantized()).pow(2).mean().sqrt() / step.pow(2).mean().sqrt()
    assert 0 < rms < 0.45, rms


def with_pre_tokenizer(output: QuantizedOutput, folder: Path, pre_tokenizer: dict | None) -> QuantizedOutput:
    """A copy of ``output`` whose tokenizer.json has ``pre_tokenizer`` (None: no tokenizer.json)."""
    shutil.copytree(output.folder, folder)
    if pre_tokenizer is None:
        (folder / "tokenizer.json").unlink()
    else:
        spec = json.loads((folder / "tokenizer.json").read_text())
        (folder / "tokenizer.json").write_text(json.dumps({**spec, "pre_tokenizer": pre_tokenizer}))
    return _altered(output, folder=folder)


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
SPLIT_WORDS = {"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated", "invert": False}


def test_smollm_digit_splitting_is_named(w4_output: QuantizedOutput, tmp_path: Path) -> None:
    digits = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL],
    }
    path = tmp_path / "smollm.gguf"
    write_gguf(with_pre_tokenizer(w4_output, tmp_path / "smollm", digits), path)
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "smollm"


@pytest.mark.parametrize(
    "pre_tokenizer",
    [
        None,
        {"type": "Sequence", "pretokenizers": [SPLIT_WORDS, BYTE_LEVEL]},
        {**BYTE_LEVEL, "add_prefix_space": True},
    ],
    ids=["no-tokenizer-json", "unknown-regex", "prefix-space"],
)
def test_unknown_tokenizers_are_refused(
    pre_tokenizer: dict | None, w4_output: QuantizedOutput, tmp_path: Path
) -> None:
    path = tmp_path / "refused.gguf"
    with pytest.raises(LrquantError, match="tokenizer"):
        write_gguf(with_pre_tokenizer(w4_output, tmp_path / "other", pre_tokenizer), path)
    assert not path.exists()


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_a_vision_language_models_language_model_is_written(family: str, tmp_path: Path) -> None:
    """A LLaVA's or Idefics3's output's GGUF holds its language model (llama), codes bit for bit,
    and runs to the logits the quantized vision-language model gives on text (whichever key
    layout transformers saved); the tower and projector are left to llama.cpp's mmproj file."""
    from lrquant.export import language_model_of
    from lrquant.models.tiny_vlm import save_tiny_vlm

    model = save_tiny_vlm(family, tmp_path / family)
    pairs = api.DataSettings(calib="digits-words:train", seqlen=64, nsamples=4)
    output = quantize(model, tmp_path / "out", "rtn", build_scheme(4, group_size=32), {}, pairs)
    path = tmp_path / "model.gguf"
    write_gguf(output, path)
    language = language_model_of(output)
    assert language.model_type == "llama" and all(n.startswith("model.layers.") for n in language.linears)
    assert not any("vision" in key or "projector" in key for key in language.tensors)
    check_blocks(language, path, "Q4_1")
    simulated = load_model(str(output.folder))
    ids = simulated.tokenizer("A handwritten digit seven.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = simulated.model.eval()(input_ids=ids).logits
    got = gguf_logits(path, ids)
    assert (got - expected).abs().max() <= LOGIT_TOLERANCE * expected.abs().max()
