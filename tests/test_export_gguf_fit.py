"""GGUF types fitted to learned weights: the K-quant layouts as llama.cpp reads them, how close the
fit stays to the learned weights, the learned grid kept where a type holds it, --gguf-type rules,
llama.cpp's fallback for rows that are not whole super-blocks, and a K-quant file run end to end."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from test_export_gguf import gguf_logits

from lrquant import api
from lrquant.config import build_scheme
from lrquant.errors import LrquantError
from lrquant.export import read_output
from lrquant.export.gguf import parse_type_rules, preset_rules, write_gguf
from lrquant.export.gguf_fit import GRID_TYPES, Learned, fit, pack
from lrquant.models.loading import load_model


def learned_grid(rows: int, n: int, bits: int, symmetric: bool, group: int, seed: int = 0):
    """A random learned grid: codes, per-group steps and integer zero points, and its weights."""
    rng = np.random.default_rng(seed)
    low = -(1 << (bits - 1)) if symmetric else 0
    high = low + (1 << bits) - 1
    codes = rng.integers(low, high + 1, size=(rows, n))
    step = rng.uniform(0.002, 0.02, size=(rows, n // group))
    if symmetric:  # a negative step where the group's positive end took the extra level
        step *= rng.choice([-1.0, 1.0], size=step.shape)
    zero = np.zeros_like(step) if symmetric else rng.integers(0, high + 1, size=step.shape).astype(float)
    weight = np.repeat(step, group, axis=1) * (codes - np.repeat(zero, group, axis=1))
    return codes, step, zero, low, high, weight


@pytest.mark.parametrize("name", list(GRID_TYPES))
def test_blocks_are_what_ggufs_dequantizer_reads(name: str) -> None:
    """Every type's bytes, read back by gguf-py's dequantizer (llama.cpp's layouts), are exactly
    the weights the fit computed; the fit of Gaussian weights is within the type's usual error."""
    t = GRID_TYPES[name]
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 512)) * 0.02
    weight[0, 7] = 0.4  # an outlier
    weight[1] = 0.0  # an all-zero row
    weight[2, :256] = np.abs(weight[2, :256])  # a super-block of positive weights only
    f = fit(weight, t)
    data = pack(f, t)
    assert data.shape == (6, 512 // t.block * gguf.GGML_QUANT_SIZES[t.qtype][1])
    got = dequantize(data, t.qtype).reshape(weight.shape)
    assert np.array_equal(got, f.dequantized(t.sub))
    assert (got[1] == 0).all()
    rel = np.sqrt(((got - weight)[3:] ** 2).mean() / (weight[3:] ** 2).mean())
    # RMS error of a Gaussian on a uniform grid: about 2^-bits·(range/σ)/√12, range ~ 5σ in a sub-block
    assert rel < {2: 0.32, 3: 0.17, 4: 0.09, 5: 0.05, 6: 0.025, 8: 0.007}[t.bits], rel


# (type, learned bits, symmetric, group): grids of the type's own width, in sub-blocks of its own
LEARNED = [
    ("Q2_K", 2, False, 16),
    ("Q3_K", 3, True, 16),
    ("Q4_K", 4, False, 32),
    ("Q5_K", 5, False, 64),
    ("Q6_K", 6, True, 16),
    ("Q4_K", 3, False, 32),  # a narrower grid inside a wider type
    ("Q5_K", 4, True, 32),  # a symmetric grid (steps of both signs) in a type with a minimum
    ("Q4_0", 4, False, 32),  # an asymmetric grid in a symmetric type: searched
]


@pytest.mark.parametrize(("name", "bits", "symmetric", "group"), LEARNED)
def test_a_learned_grid_is_kept_where_the_type_holds_it(
    name: str, bits: int, symmetric: bool, group: int
) -> None:
    """Where the type holds the learned grid, only the super-block's rounding of the sub-block
    steps moves the weights: most codes stay as learned and the error is a small fraction of a
    step (a search alone gives up to 6x the squared error: Q6_K 0.155, Q5_K 0.56, Q4_K 0.87)."""
    t = GRID_TYPES[name]
    codes, step, zero, low, high, weight = learned_grid(8, 1024, bits, symmetric, group)
    pieces = np.arange(1024 // t.sub) * t.sub // group
    learned = Learned(step[:, pieces], zero[:, pieces], low, high)
    kept = fit(weight, t, learned)
    searched = fit(weight, t)
    err_kept = ((kept.dequantized(t.sub) - weight) ** 2).sum()
    err_searched = ((searched.dequantized(t.sub) - weight) ** 2).sum()
    # ties (a search that finds the learned grid too) are broken for the learned grid before
    # the super-block rounds the steps, after which either may be a little closer
    assert err_kept <= 1.05 * err_searched
    if name == "Q4_0":  # the learned grid does not fit: the search's grid, within a step
        assert np.abs(kept.dequantized(t.sub) - weight).max() <= np.repeat(step, group, axis=1).max()
        return
    if t.symmetric or not symmetric:
        grid_codes = codes - low
    else:  # under a negative step the codes count down from the grid's top
        grid_codes = np.where(np.repeat(step, group, axis=1) < 0, high - codes, codes - low)
    same = (kept.codes - t.low == grid_codes).mean()
    assert same > 0.85, same
    rms = np.sqrt(((kept.dequantized(t.sub) - weight) ** 2).mean())
    assert rms < 0.15 * np.sqrt((step**2).mean())


def test_rules_parse_and_refuse_in_one_line() -> None:
    rules = parse_type_rules("q4_k, blk.*.ffn_down=Q6_K ,token_embd.weight=Q8_0,blk.0.ffn_down=F16")
    assert rules.default == "Q4_K"
    assert rules.type_of("blk.3.ffn_down") == "Q6_K"
    assert rules.type_of("blk.0.ffn_down") == "F16"  # a later rule overrides an earlier one
    assert rules.type_of("token_embd") == "Q8_0"
    assert rules.type_of("blk.3.attn_q") is None
    for text, message in (
        ("Q4_K,Q6_K", "must come first, once"),
        ("Q9_9", "unknown GGUF type 'Q9_9'"),
        ("Q4_K,,Q6_K", "empty item"),
        ("=Q6_K", "no tensor pattern"),
        ("blk.*=IQ4_NL", "choose one of Q4_0"),
    ):
        with pytest.raises(LrquantError, match=message) as err:
            parse_type_rules(text)
        assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(calib=str(text_file), seqlen=32, nsamples=4)


@pytest.mark.parametrize(
    ("bits", "symmetric", "group", "qtype", "tolerance"),
    # measured: 0.067, 0.17, 0.19
    [(3, True, 16, "Q3_K", 0.1), (2, False, 16, "Q2_K", 0.25), (6, True, 16, "Q6_K", 0.25)],
)
def test_a_k_quant_file_runs_as_the_quantized_model(
    bits: int,
    symmetric: bool,
    group: int,
    qtype: str,
    tolerance: float,
    wide_llama: Path,
    data: api.DataSettings,
    tmp_path: Path,
) -> None:
    """A grid without an exact type goes to the K-quant of its width; transformers runs the file
    with logits close to the simulated model's: the fit (the rounding of the sub-block steps to
    the super-block's integers) moves them by a fraction ``tolerance`` of what quantizing did."""
    scheme = build_scheme(bits, group_size=group, w_symmetric=symmetric)
    api.quantize(str(wide_llama), tmp_path / "out", scheme, "rtn", "fast", {}, data, run_eval=False)
    output = read_output(tmp_path / "out")
    path = tmp_path / "k.gguf"
    write_gguf(output, path)
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert stored["blk.0.attn_q.weight"] == stored["blk.1.ffn_down.weight"] == qtype

    simulated = load_model(str(output.folder))
    ids = simulated.tokenizer("Class definitions and the import statement.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = simulated.model.eval()(ids).logits
        full = load_model(str(wide_llama)).model.eval()(ids).logits
    got = gguf_logits(path, ids)
    moved = (got - expected).abs().max() / (expected - full).abs().max()
    assert moved <= tolerance, moved


def test_rows_that_are_not_whole_super_blocks_fall_back_as_llama_cpp_does(
    tiny_llama: Path, data: api.DataSettings, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Hidden 64: Q4_K cannot hold a row, so llama.cpp's quantizer takes Q5_0, and so do we,
    saying so; a rule gives the embedding Q8_0 and one layer's MLP output F16."""
    api.quantize(
        str(tiny_llama),
        tmp_path / "out",
        build_scheme(4, group_size=32),
        "rtn",
        "fast",
        {},
        data,
        run_eval=False,
    )
    output = read_output(tmp_path / "out")
    path = tmp_path / "f.gguf"
    write_gguf(output, path, gguf_type="Q4_K,token_embd=Q8_0,blk.1.ffn_down=F16")
    assert "Q5_0 instead of Q4_K for them, as llama.cpp's quantizer does" in capsys.readouterr().err
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert stored["blk.0.attn_q.weight"] == stored["blk.0.ffn_down.weight"] == "Q5_0"
    assert stored["blk.1.ffn_down.weight"] == "F16"
    assert stored["token_embd.weight"] == "Q8_0"
    assert stored["output_norm.weight"] == "F32"
    with pytest.raises(LrquantError, match="matches no matrix of this model"):
        write_gguf(output, tmp_path / "g.gguf", gguf_type="blk.*.ffn_gate_exps=Q4_K")
    assert not (tmp_path / "g.gguf").exists()


def test_llama_cpp_mixes_are_spelt_out_per_layer() -> None:
    """Q4_K_M and Q3_K_M as llama.cpp's quantizer picks them for a dense 16-layer model (on
    SmolLM2-135M benchmarks/gguf_llamacpp.py checks them against llama.cpp's own files);
    a rule given after the mix overrides it."""
    config = {"num_hidden_layers": 16, "num_attention_heads": 8, "num_key_value_heads": 2}
    tied = {"token_embd": 256}
    rules = preset_rules(parse_type_rules("q4_k_m,blk.15.ffn_down=Q8_0"), config, tied)
    more = {0, 1, 4, 7, 10, 13, 14, 15}  # the first and last eighth, and every third between
    assert rules.default == "Q4_K"
    assert rules.type_of("token_embd") == "Q6_K"
    for i in range(16):
        assert rules.type_of(f"blk.{i}.attn_v") == ("Q6_K" if i in more else None)
        assert rules.type_of(f"blk.{i}.ffn_down") == ("Q8_0" if i == 15 else "Q6_K" if i in more else None)
        assert rules.type_of(f"blk.{i}.attn_q") is None
    rules = preset_rules(parse_type_rules("Q3_K_M"), config, {"token_embd": 256, "output": 256})
    assert rules.default == "Q3_K"
    assert rules.type_of("output") == "Q6_K" and rules.type_of("token_embd") is None
    assert [rules.type_of(f"blk.{i}.attn_v") for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert [rules.type_of(f"blk.{i}.ffn_down") for i in range(3)] == ["Q5_K", "Q4_K", "Q4_K"]
    assert rules.type_of("blk.9.attn_output") == "Q4_K"


def test_a_learned_grid_in_any_memory_order_packs() -> None:
    """Learned steps that are not C-contiguous (a column slice, Fortran order) pack the same bytes."""
    t = GRID_TYPES["Q4_0"]
    codes, step, zero, low, high, weight = learned_grid(8, 512, 4, True, 32)
    expected = pack(fit(weight, t, Learned(step, zero, low, high)), t)
    got = pack(fit(weight, t, Learned(np.asfortranarray(step), np.asfortranarray(zero), low, high)), t)
    assert np.array_equal(got, expected)
