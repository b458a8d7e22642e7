"""Running outputs on real low-bit CPU kernels: ``lrquant eval --backend`` and ``lrquant generate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import error_line, run

from lrquant import api
from lrquant.config import build_scheme


@pytest.fixture(scope="module")
def outputs(tiny_llama: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    data = api.DataSettings(calib=str(text_file), seqlen=32, nsamples=4)
    schemes = {"w4g32": build_scheme(4, group_size=32), "w8a8": build_scheme(8, 8, w_symmetric=True)}
    schemes["w4a4"] = build_scheme(4, 4, group_size=32)
    for name, scheme in schemes.items():
        api.quantize(str(tiny_llama), root / name, scheme, "rtn", data=data, run_eval=False)
    return {name: root / name for name in schemes}


def evaluate(capsys, model: Path, text: Path, backend: str) -> dict:
    argv = ["eval", "--model", model, "--data", text, "--seqlen", "32", "--eval-windows", "4"]
    code, out, err = run(capsys, *argv, "--backend", backend, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", ["w4g32", "w8a8"])
def test_packed_perplexity_is_the_simulated_one(name: str, outputs, text_file: Path, capsys) -> None:
    fake = evaluate(capsys, outputs[name], text_file, "fake")
    packed = evaluate(capsys, outputs[name], text_file, "packed")
    assert (fake["backend"], packed["backend"]) == ("fake", "packed")
    # bf16 steps (int4) or one grid step where an input lands on a rounding boundary (int8)
    assert packed["perplexity"] == pytest.approx(fake["perplexity"], rel=0.02)


def test_a_scheme_without_kernels_is_refused_or_simulated(outputs, tiny_llama: Path, capsys) -> None:
    line = error_line(*run(capsys, "eval", "--model", outputs["w4a4"], "--backend", "packed"))
    assert "W4A4g32 has no packed CPU kernel" in line and "--backend fake" in line
    code, out, err = run(capsys, "generate", "--model", outputs["w4a4"], "--prompt", "The", "--json")
    assert code == 0, err
    assert json.loads(out)["backend"] == "fake" and "running simulated" in err
    line = error_line(*run(capsys, "eval", "--model", tiny_llama, "--backend", "packed"))
    assert "is not a quantized output: --backend packed has nothing to pack" in line


def test_generate_streams_text_and_reports_speeds(outputs, tiny_llama: Path, capsys) -> None:
    argv = ["generate", "--model", outputs["w4g32"], "--prompt", "The function", "--max-new-tokens", "6"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "W4A16g32 on packed: prefill" in err and "tokens/s" in err
    result = api.generate(str(outputs["w4g32"]), "The function", 6, echo=False)
    assert out.strip() == result["text"].strip()  # what streamed is the continuation
    assert result["backend"] == "packed" and 1 <= result["new_tokens"] <= 6
    assert result["prefill_tokens_per_s"] > 0
    dense = api.generate(str(tiny_llama), "The function", 3, echo=False)
    assert dense["backend"] == "dense" and dense["scheme"] == "fp"
