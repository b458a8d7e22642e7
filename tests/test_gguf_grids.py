"""Quantizing for GGUF: each linear learns the grid of the GGUF type it will be written as (a mix
gives some tensors more bits than others), the learned codes reach the file, and such a run
resumes like any other."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from helpers import interrupt_after_block
from safetensors.torch import load_file
from test_export_gguf import gguf_logits

from lrquant import api
from lrquant.config import QuantSpec, build_scheme
from lrquant.errors import LrquantError
from lrquant.export import read_output
from lrquant.export.gguf import learned_grids
from lrquant.models.loading import load_model

LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
ROLES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def linear_rows(hidden: int, mlp: int, layers: int = 2) -> dict[str, int]:
    """The row length of every linear of a llama with these widths, by module name."""
    return {
        f"model.layers.{i}.{part}.{role}": mlp if role == "down_proj" else hidden
        for i in range(layers)
        for part, roles in ROLES.items()
        for role in roles
    }


def grid(bits: int, symmetric: bool, group: int | None) -> QuantSpec:
    return QuantSpec(
        bits=bits, symmetric=symmetric, granularity="group" if group else "channel", group_size=group
    )


def test_each_linear_takes_the_grid_its_type_stores() -> None:
    """Rows of 256: the K-quants hold them. A linear keeps the scheme's grid where its type holds it
    code for code (Q2_K: 2-bit asymmetric groups of 16), takes its type's grid elsewhere (Q6_K:
    6-bit symmetric groups of 16; Q8_0: 8-bit symmetric), and a float type leaves it unquantized."""
    rows = linear_rows(256, 512)
    floats = {"model.embed_tokens.weight": 256, "lm_head.weight": 256}
    scheme = build_scheme(2, group_size=16)
    rules = "Q2_K,blk.0.ffn_down=Q6_K,blk.1.attn_output=Q8_0,blk.1.attn_v=F16"
    grids = learned_grids(scheme, LLAMA, rows, floats, rules)
    assert grids.weight_grids == {
        "model.layers.0.mlp.down_proj": grid(6, True, 16),
        "model.layers.1.self_attn.o_proj": grid(8, True, 32),
        "model.layers.1.self_attn.v_proj": QuantSpec(),
    }
    assert grids.weight_for("model.layers.0.self_attn.q_proj") == scheme.weight
    assert grids.gguf_type == rules and grids.name == "W2A16g16+GGUF types"

    # Q4_K_M on a 2-layer model: attn_v and ffn_down of the last layer (its last eighth) in Q6_K,
    # the rest in Q4_K, 4-bit asymmetric groups of 32 (the scheme's own grid there)
    mix = learned_grids(build_scheme(4, group_size=32), LLAMA, rows, floats, "Q4_K_M")
    six = {
        name for name in rows if name.startswith("model.layers.1.") and name.endswith(("v_proj", "down_proj"))
    }
    assert mix.weight_grids == dict.fromkeys(sorted(six), grid(6, True, 16))
    assert mix.name == "W4A16g32+Q4_K_M"


def test_rows_that_fall_back_learn_the_fallback_type() -> None:
    """Rows of 576 (SmolLM2): llama.cpp writes Q4_K as Q5_0 and Q2_K as Q4_0 there, so those
    linears learn 5 and 4 bits, not the 4 and 2 that the mix's name suggests."""
    rows = linear_rows(576, 1536)
    floats = {"model.embed_tokens.weight": 576}
    mix = learned_grids(build_scheme(4, group_size=32), LLAMA, rows, floats, "Q4_K")
    for name, spec in mix.weight_grids.items():
        assert spec == grid(5, True, 32), name
    assert set(mix.weight_grids) == {name for name in rows if not name.endswith("down_proj")}
    low = learned_grids(build_scheme(2, group_size=16), LLAMA, rows, floats, "Q2_K")
    assert {spec for spec in low.weight_grids.values()} == {grid(4, True, 32)}
    assert low.weight_for("model.layers.0.mlp.down_proj") == grid(2, False, 16)


def test_what_gguf_cannot_hold_is_refused_before_any_work() -> None:
    rows = linear_rows(256, 512)
    with pytest.raises(LrquantError, match="GGUF holds weights only"):
        learned_grids(build_scheme(4, 8), LLAMA, rows, {}, None)
    with pytest.raises(LrquantError, match="not 'opt'"):
        learned_grids(build_scheme(4), {**LLAMA, "model_type": "opt"}, rows, {}, None)
    with pytest.raises(LrquantError, match="matches no matrix"):
        learned_grids(build_scheme(4), LLAMA, rows, {}, "Q4_0,blk.*.ffn_gate_exps=Q8_0")


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(calib=str(text_file), seqlen=32, nsamples=4)


MIX = "Q4_0,blk.0.ffn_down=Q6_K,blk.1.attn_output=Q8_0,blk.1.attn_v=F16"


@pytest.fixture(scope="module")
def mixed(wide_llama: Path, data: api.DataSettings, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """LRQuant+ (one epoch) quantizing for a GGUF mix, and the file it wrote."""
    out = tmp_path_factory.mktemp("mixed") / "out"
    scheme = build_scheme(4, group_size=32, w_symmetric=True)
    return api.quantize(
        str(wide_llama),
        out,
        scheme,
        "lrquant_plus",
        "fast",
        {"epochs": 1},
        data,
        run_eval=False,
        format="gguf",
        gguf_type=MIX,
    )


def test_the_learner_uses_the_bits_of_each_type(mixed: dict) -> None:
    """Every linear's integer codes span its own type's range: the 8-bit and 6-bit linears use
    codes a 4-bit grid has not, the F16 one has none (it stays in full precision)."""
    output = read_output(Path(mixed["export"]["source"]))
    assert mixed["scheme"] == output.scheme.name == "W4A16g32+GGUF types"
    widths = {name: (linear.bits, linear.group_size) for name, linear in output.linears.items()}
    assert widths.pop("model.layers.0.mlp.down_proj") == (6, 16)
    assert widths.pop("model.layers.1.self_attn.o_proj") == (8, 32)
    assert "model.layers.1.self_attn.v_proj" not in widths
    assert set(widths.values()) == {(4, 32)}
    for name, top in (("model.layers.0.mlp.down_proj", 32), ("model.layers.1.self_attn.o_proj", 128)):
        codes = output.linears[name].codes.int()
        assert -top <= codes.min() and codes.max() < top
        assert codes.abs().max() > 8, name  # more than 4 bits were used
    for linear in output.linears.values():
        if linear.bits == 4:
            assert -8 <= linear.codes.min() and linear.codes.max() <= 7


def test_the_file_holds_the_learned_codes_and_runs_as_the_quantized_model(
    mixed: dict, wide_llama: Path, tmp_path: Path
) -> None:
    """The legacy types copy the learned codes (the weights differ by the fp16 rounding of the
    steps), the Q6_K one is fitted, the F16 one is the learned transform's full-precision weight;
    transformers runs the file as the simulated model within a small part of what quantizing
    moved; a later export without --gguf-type writes the types the grids were learned for."""
    path = Path(mixed["export"]["path"])
    output = read_output(Path(mixed["export"]["source"]))
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    expected_types = {
        "blk.0.ffn_down.weight": "Q6_K",
        "blk.1.attn_output.weight": "Q8_0",
        "blk.1.attn_v.weight": "F16",
        "blk.0.attn_output.weight": "Q4_0",
        "blk.1.ffn_down.weight": "Q4_0",
    }
    for name, qtype in expected_types.items():
        assert stored[name].tensor_type.name == qtype, name
    for gguf_name, module in (
        ("blk.1.attn_output.weight", "model.layers.1.self_attn.o_proj"),
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj"),
    ):
        tensor = stored[gguf_name]
        got = dequantize(tensor.data, tensor.tensor_type).reshape(output.linears[module].codes.shape)
        want = output.linears[module].dequantized().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    v = stored["blk.1.attn_v.weight"]
    np.testing.assert_allclose(
        np.asarray(v.data, dtype=np.float32).reshape(-1),
        output.tensors["model.layers.1.self_attn.v_proj.weight"].half().float().numpy().reshape(-1),
    )

    simulated = load_model(str(output.folder))
    ids = simulated.tokenizer("Class definitions and the import statement.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = simulated.model.eval()(ids).logits
        full = load_model(str(wide_llama)).model.eval()(ids).logits
    moved = (gguf_logits(path, ids) - expected).abs().max() / (expected - full).abs().max()
    assert moved <= 0.1, moved

    again = api.export(output.folder, "gguf", tmp_path / "again.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(again["path"]).tensors}
    assert types == {name: t.tensor_type.name for name, t in stored.items()}


def test_compressed_tensors_refuses_grids_per_tensor(mixed: dict, tmp_path: Path) -> None:
    with pytest.raises(LrquantError, match="a weight grid per tensor") as err:
        api.export(mixed["export"]["source"], "compressed-tensors", tmp_path / "ct")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ct").exists()


def test_what_cannot_be_packed_is_refused_before_any_work(
    wide_llama: Path, data: api.DataSettings, tmp_path: Path
) -> None:
    with pytest.raises(LrquantError, match="give it with --format gguf"):
        api.quantize(str(wide_llama), tmp_path / "o", build_scheme(4), "rtn", data=data, gguf_type="Q4_0")
    with pytest.raises(LrquantError, match="but the format is compressed-tensors"):
        api.quantize(
            str(wide_llama), tmp_path / "o", build_scheme(4), "rtn", data=data, format="compressed-tensors",
            gguf_type="Q4_0",
        )  # fmt: skip
    with pytest.raises(LrquantError, match="use --set hadamard=folded"):
        api.quantize(
            str(wide_llama), tmp_path / "o", build_scheme(4), "lrquant_plus", "fast", {"hadamard": "online"},
            data, format="gguf",
        )  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_a_run_for_gguf_types_resumes_to_the_same_output(
    wide_llama: Path, data: api.DataSettings, mixed: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after block 0 and rerun, the finished block is restored on its own grids and the
    output equals the uninterrupted run's bit for bit."""
    out = tmp_path / "out"
    scheme = build_scheme(4, group_size=32, w_symmetric=True)
    run = (str(wide_llama), out, scheme, "lrquant_plus", "fast", {"epochs": 1}, data)
    options = {"run_eval": False, "format": "gguf", "gguf_type": MIX}
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            api.quantize(*run, **options)
    assert not out.exists()
    api.quantize(*run, **options)
    expected = load_file(Path(mixed["export"]["source"]) / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert Path(mixed["export"]["path"]).read_bytes() == (tmp_path / "out.gguf").read_bytes()
