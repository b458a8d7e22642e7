"""Quantized outputs keep the integers: every quantized linear's codes, steps and zero points, on
the grid the run ended on, so packed export needs no re-quantization of dequantized floats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrquant import api
from lrquant.checkpoint import INTEGERS_FILE, read_integer_weights
from lrquant.config import build_scheme
from lrquant.quant.quantizer import dequantize_codes, integer_range

CASES = [
    ("rtn", build_scheme(4), {}),
    ("rtn", build_scheme(3, group_size=24, w_symmetric=True, head=True), {}),
    ("gptq", build_scheme(4, group_size=16), {}),
    ("lrquant_plus", build_scheme(4, 4, group_size=16), {"epochs": 2}),
    ("lrquant_plus", build_scheme(3, group_size=16), {"epochs": 2, "rounding": True, "clip_init": "search"}),
    ("lrquant_plus", build_scheme(4), {"epochs": 1, "gptq": True}),
    ("lrquant_plus", build_scheme(4, group_size=32), {"epochs": 1, "e2e_epochs": 1}),
    ("omniquant", build_scheme(2, group_size=16), {"epochs": 1}),
]


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(calib=str(text_file), seqlen=32, nsamples=4)


@pytest.mark.parametrize(
    "method, scheme, overrides",
    CASES,
    ids=[
        "rtn-w4",
        "rtn-w3g24-sym-head",
        "gptq",
        "lrquant_plus-w4a4",
        "rounding",
        "lrquant_plus-gptq",
        "e2e",
        "omni-w2",
    ],
)
def test_every_quantized_weight_is_stored_as_its_integers(
    method: str, scheme, overrides: dict, tiny_llama: Path, data: api.DataSettings, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    api.quantize(
        str(tiny_llama), out, scheme, method, "fast", {"compile": False, **overrides}, data, run_eval=False
    )
    weights = load_file(out / "model.safetensors")
    integers = read_integer_weights(out)
    expected = {key[: -len(".weight")] for key in weights if ".layers." in key and "proj.weight" in key}
    if scheme.head:
        expected.add("lm_head")
    assert set(integers) == expected
    qmin, qmax = integer_range(scheme.weight.bits, scheme.weight.symmetric)
    for name, grid in integers.items():
        codes, scale, zero = grid["codes"], grid["scale"], grid["zero"]
        assert codes.dtype == (torch.int8 if scheme.weight.symmetric else torch.uint8)
        assert qmin <= int(codes.min()) and int(codes.max()) <= qmax
        assert torch.equal(zero, zero.round())
        if scheme.weight.granularity == "group":  # stored [out, groups]; the quantizer's [out, groups, 1]
            scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
        weight = weights[f"{name}.weight"]
        deq = dequantize_codes(codes, scheme.weight, scale, zero)
        # the same values up to the float rounding of a step folded with the rotation vector
        assert (deq - weight).abs().max() <= 1e-6 * weight.abs().max(), name
    assert (out / INTEGERS_FILE).is_file()


def test_integers_survive_an_interrupted_run(
    tiny_llama: Path, data: api.DataSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lrquant.methods.resume import ResumeStore

    settings = ("lrquant_plus", "fast", {"epochs": 1, "compile": False})
    api.quantize(str(tiny_llama), tmp_path / "whole", build_scheme(4, group_size=16), *settings, data, False)
    original = ResumeStore.save_block

    def stop_after_first(self, index, *args) -> None:
        original(self, index, *args)
        if index == 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ResumeStore, "save_block", stop_after_first)
        with pytest.raises(KeyboardInterrupt):
            api.quantize(
                str(tiny_llama), tmp_path / "parts", build_scheme(4, group_size=16), *settings, data, False
            )
    api.quantize(str(tiny_llama), tmp_path / "parts", build_scheme(4, group_size=16), *settings, data, False)
    whole, parts = read_integer_weights(tmp_path / "whole"), read_integer_weights(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    for name in whole:
        for part in ("codes", "scale", "zero"):
            assert torch.equal(whole[name][part], parts[name][part]), (name, part)


def test_sixteen_bit_weights_store_no_integers(
    tiny_llama: Path, data: api.DataSettings, tmp_path: Path
) -> None:
    api.quantize(str(tiny_llama), tmp_path / "a8", build_scheme(16, 8), "rtn", "fast", None, data, False)
    assert read_integer_weights(tmp_path / "a8") == {}
    assert not (tmp_path / "a8" / INTEGERS_FILE).exists()
