"""The public API on tiny models: quantize, save, reload and evaluate, for every tiny architecture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from lrquant import api
from lrquant.arch import get_arch_spec
from lrquant.checkpoint import QUANT_FILE, REPORT_FILE
from lrquant.config import QuantScheme, build_scheme
from lrquant.errors import LrquantError
from lrquant.models.loading import load_model
from lrquant.models.tiny import TINY_ARCHS, tiny_model, tiny_tokenizer

SEQLEN = 32
WINDOWS = 3


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(
        calib=str(text_file),
        eval=str(text_file),
        seqlen=SEQLEN,
        nsamples=4,
        eval_windows=WINDOWS,
        batch_size=2,
    )


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    arch = get_arch_spec(model.config.model_type)
    found = []
    for index, block in enumerate(arch.block_list(model)):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                found.append((f"{arch.blocks[0]}.{index}.{name}", module))
    return found


def _distinct_per_group(weight: torch.Tensor, group: int) -> torch.Tensor:
    """Number of distinct values in each group of ``group`` consecutive input columns."""
    rows = weight.detach().reshape(-1, group).sort(dim=1).values
    return 1 + (rows.diff(dim=1) != 0).sum(dim=1)


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_quantize_w4a16_g32(model_type: str, tiny_models, data: api.DataSettings, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = tiny_models(model_type)
    out = tmp_path / "out"
    report = api.quantize(
        str(source), out, scheme=build_scheme(wbits=4, group_size=32), method="rtn", data=data
    )

    # the folder: a plain HF checkpoint plus the quantization settings and the report
    for name in ("config.json", "model.safetensors", QUANT_FILE, REPORT_FILE):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".out.*")), "temporary folders left behind"
    assert json.loads((out / REPORT_FILE).read_text()) == json.loads(json.dumps(report))
    settings = json.loads((out / QUANT_FILE).read_text())
    assert settings["format_version"] == 1 and settings["method"] == "rtn"
    assert settings["model_type"] == model_type
    assert settings["scheme"]["weight"] == {
        "bits": 4,
        "symmetric": False,
        "granularity": "group",
        "group_size": 32,
        "clip_ratio": 1.0,
    }
    # folders written before activation clipping existed have no clip_ratio: they read as 1
    older = {**settings["scheme"], "activation": {"bits": 16, "symmetric": False, "granularity": "token"}}
    assert QuantScheme.model_validate(older).activation.clip_ratio == 1.0

    # the report
    assert report["method"] == "rtn" and report["scheme"] == "W4A16g32"
    assert report["model"]["model_type"] == model_type
    assert report["model"]["parameters"] == sum(p.numel() for p in tiny_model(model_type).parameters())
    assert report["seed"] == 0
    assert report["data"]["seqlen"] == SEQLEN and report["data"]["eval_windows"] == WINDOWS
    ppl = report["perplexity"]
    assert set(ppl) == {"fp", "quantized"}
    for value in ppl.values():
        assert math.isfinite(value) and value > 1
    # a random model over a 512-token vocabulary: near-uniform predictions
    assert 100 < ppl["fp"] < 5000
    assert ppl["quantized"] != ppl["fp"]
    assert set(report["seconds"]) >= {"load", "eval_fp", "quantize", "eval_quantized", "save", "total"}
    assert all(v >= 0 for v in report["seconds"].values())
    assert report["seconds"]["total"] == pytest.approx(
        sum(v for k, v in report["seconds"].items() if k != "total"), abs=0.02
    )
    assert report["peak_rss_mb"] > 50

    # transformers alone loads plain Linear layers whose weights sit on a 4-bit grid per group of 32
    plain = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(source)
    linears = _block_linears(plain)
    assert linears
    originals = dict(_block_linears(original))
    for name, linear in linears:
        assert type(linear) is nn.Linear, name
        distinct = _distinct_per_group(linear.weight, 32)
        assert distinct.max() <= 16, name
        assert _distinct_per_group(originals[name].weight, 32).min() == 32, name
        err = (linear.weight - originals[name].weight).abs()
        assert 0 < err.max() < 0.2 * originals[name].weight.abs().max(), name
    assert max(_distinct_per_group(lin.weight, 32).max().item() for _, lin in linears) == 16
    # embeddings and the head stay in full precision
    assert torch.equal(plain.get_input_embeddings().weight, original.get_input_embeddings().weight)

    # the saved folder evaluates to the in-run quantized perplexity
    result = api.evaluate(str(out), data)
    assert result["perplexity"] == pytest.approx(ppl["quantized"], rel=1e-5)
    assert result["scheme"] == "W4A16g32" and result["windows"] == WINDOWS
    assert result["model_type"] == model_type
    # and the source folder to the in-run full-precision one
    assert api.evaluate(str(source), data)["perplexity"] == pytest.approx(ppl["fp"], rel=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_weight_activation_schemes_reload(
    model_type: str, tiny_models, data: api.DataSettings, tmp_path: Path
) -> None:
    source = str(tiny_models(model_type))
    results = {}
    for abits in (16, 8, 4):
        out = tmp_path / f"a{abits}"
        report = api.quantize(source, out, scheme=build_scheme(wbits=4, abits=abits), method="rtn", data=data)
        ppl = report["perplexity"]["quantized"]
        assert math.isfinite(ppl) and ppl > 1
        assert report["scheme"] == f"W4A{abits}"
        saved = json.loads((out / QUANT_FILE).read_text())["scheme"]
        assert saved["activation"]["bits"] == abits and saved["qkv"]["bits"] == abits
        # re-evaluation rebuilds activation quantization from lrquant_quant.json
        again = api.evaluate(str(out), data)
        assert again["perplexity"] == pytest.approx(ppl, rel=1e-5)
        assert again["scheme"] == f"W4A{abits}"
        results[abits] = ppl
    assert results[8] != pytest.approx(results[16], rel=1e-6)
    assert results[4] != pytest.approx(results[16], rel=1e-3)
    assert results[4] != pytest.approx(results[8], rel=1e-3)


def test_load_model_reattaches_quantizers(tiny_llama: Path, data: api.DataSettings, tmp_path: Path) -> None:
    out = tmp_path / "w4a4"
    api.quantize(
        str(tiny_llama),
        out,
        scheme=build_scheme(wbits=4, abits=4),
        method="rtn",
        data=data,
        run_eval=False,
    )
    loaded = load_model(str(out))
    assert loaded.scheme is not None and loaded.scheme.name == "W4A4"
    assert loaded.scheme.quantizes_activations
    plain_types = {type(m).__name__ for _, m in _block_linears(loaded.model)}
    assert plain_types and "Linear" not in plain_types  # every block linear is a quantizing wrapper
    assert load_model(str(tiny_llama)).scheme is None


def test_no_eval_writes_empty_perplexity(tiny_llama: Path, data: api.DataSettings, tmp_path: Path) -> None:
    out = tmp_path / "noeval"
    report = api.quantize(
        str(tiny_llama), out, scheme=build_scheme(wbits=3), method="rtn", data=data, run_eval=False
    )
    assert report["perplexity"] == {}
    assert report["data"]["eval_windows"] is None
    assert "eval_fp" not in report["seconds"] and "eval_quantized" not in report["seconds"]
    on_disk = json.loads((out / REPORT_FILE).read_text())
    assert on_disk["perplexity"] == {} and on_disk["scheme"] == "W3A16"
    assert (out / "model.safetensors").is_file()


def test_quantize_is_deterministic(tiny_llama: Path, data: api.DataSettings, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    scheme = build_scheme(wbits=4, group_size=16)
    for name in ("a", "b"):
        api.quantize(
            str(tiny_llama),
            tmp_path / name,
            scheme=scheme,
            method="rtn",
            data=data,
            run_eval=False,
        )
    ta, tb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_unknown_method_writes_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(LrquantError, match="unknown method 'awq'; available: auto, rtn"):
        api.quantize(str(tiny_llama), tmp_path / "out", scheme=build_scheme(), method="awq")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_windows_and_batch_size(tiny_llama: Path, text_file: Path) -> None:
    one = api.evaluate(str(tiny_llama), api.DataSettings(eval=str(text_file), seqlen=SEQLEN, eval_windows=4))
    four = api.evaluate(
        str(tiny_llama), api.DataSettings(eval=str(text_file), seqlen=SEQLEN, eval_windows=4, batch_size=3)
    )
    assert one["windows"] == four["windows"] == 4 and one["seqlen"] == SEQLEN
    assert one["perplexity"] == pytest.approx(four["perplexity"], rel=1e-5)
    assert one["scheme"] == "fp" and one["data"] == str(text_file)


# --- a user's .gguf file ---------------------------------------------------------------------------


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (transformers undoes it when reading a GGUF)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_tiny_llama_gguf(path: Path) -> nn.Module:
    """Write the tiny llama and its byte-level BPE tokenizer as an F32 GGUF; return the model."""
    gguf = pytest.importorskip("gguf")
    model = tiny_model("llama")
    cfg = model.config
    tok = tiny_tokenizer()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_unk_token_id(tok.unk_token_id)
    writer.add_add_bos_token(True)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute(weight, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _permute(weight, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_gguf_file(tmp_path: Path, data: api.DataSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LRQUANT_CACHE", str(cache))
    path = tmp_path / "tiny-llama.gguf"
    model = _write_tiny_llama_gguf(path)

    loaded = load_model(str(path))
    assert loaded.model_type == "llama"
    converted = loaded.path
    assert converted.parent == cache / "models" and converted.name.startswith("gguf-tiny-llama-")
    assert (converted / "lrquant_source.json").is_file()
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, model(ids).logits, atol=1e-5)
    text = "The quick brown fox jumps over 13 lazy dogs.\n\nIt's here."
    assert loaded.tokenizer(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]

    report = api.quantize(
        str(path), tmp_path / "out", scheme=build_scheme(wbits=4, group_size=32), method="rtn", data=data
    )
    assert report["model"]["path"] == str(converted)
    assert math.isfinite(report["perplexity"]["quantized"])
    assert sorted(p.name for p in (cache / "models").iterdir()) == [converted.name]  # converted once
