"""``lrquant export``: what every format shares. The source is read from the integer codes a run
kept; the destination is written atomically and replaced only when lrquant wrote it; what cannot
be exported says why in one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import error_line, run
from test_output_safety import snapshot

from lrquant import api, export
from lrquant.checkpoint import INTEGERS_FILE, QUANT_FILE
from lrquant.config import build_scheme
from lrquant.export import ExportFormat, read_output


def write_listing(output: export.QuantizedOutput, path: Path) -> None:
    """A stand-in format: the linears' names and code ranges, as JSON (a folder format)."""
    rows = {name: [int(lin.codes.min()), int(lin.codes.max())] for name, lin in output.linears.items()}
    (path / "codes.json").write_text(json.dumps(rows))


def write_failing(output: export.QuantizedOutput, path: Path) -> None:
    (path / "half-written").write_text("x")
    raise RuntimeError("the writer broke")


@pytest.fixture
def formats(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = {
        "listing": ExportFormat("listing", False, "-listing", "test_export:write_listing", "tests"),
        "failing": ExportFormat("failing", False, "-failing", "test_export:write_failing", "tests"),
    }
    monkeypatch.setattr(export, "FORMATS", {**export.FORMATS, **extra})


@pytest.fixture(scope="module")
def output(tiny_llama: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "w4g16"
    data = api.DataSettings(calib=str(text_file), seqlen=32, nsamples=4)
    api.quantize(str(tiny_llama), out, build_scheme(4, group_size=16), "rtn", data=data, run_eval=False)
    return out


def test_export_reads_the_integers_and_writes_atomically(output: Path, work: Path, formats, capsys) -> None:
    code, stdout, err = run(capsys, "export", output, "--format", "listing", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    packed = output.with_name("w4g16-listing")
    assert result["path"] == str(packed) and result["format"] == "listing" and result["scheme"] == "W4A16g16"
    rows = json.loads((packed / "codes.json").read_text())
    assert set(rows) == set(read_output(output).linears) and len(rows) == 14
    assert all(0 <= low <= high <= 15 for low, high in rows.values())
    # an earlier export lrquant wrote is replaced with --overwrite, and only with it
    line = error_line(*run(capsys, "export", output, "--format", "listing"))
    assert "already exists as a folder: pass --overwrite" in line
    assert run(capsys, "export", output, "--format", "listing", "--overwrite")[0] == 0


def test_a_failing_writer_leaves_nothing(output: Path, work: Path, formats, capsys) -> None:
    before = snapshot(output.parent)
    with pytest.raises(RuntimeError, match="the writer broke"):
        api.export(output, "failing", work / "packed")
    assert snapshot(output.parent) == before and list(work.iterdir()) == []


def test_outputs_without_integers_name_the_command_that_recreates_them(
    output: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    old = Path(shutil.copytree(output, tmp_path / "old"))
    (old / INTEGERS_FILE).unlink()
    quant = json.loads((old / QUANT_FILE).read_text())
    del quant["integer_weights"]  # as an older lrquant wrote it
    (old / QUANT_FILE).write_text(json.dumps(quant))
    line = error_line(*run(capsys, "export", old, "--format", "gguf"))
    assert "has no integer weights (written by an older lrquant)" in line
    assert "lrquant quantize --model" in line and "--method rtn" in line and "--group-size 16" in line


def test_an_output_is_read_one_tensor_at_a_time(tmp_path: Path) -> None:
    """The lazy views export reads through: keys, shapes and dtypes from the headers, a tensor
    when asked for; renaming carries a linear's bias along; hidden keys stay hidden."""
    import torch
    from safetensors.torch import save_file

    from lrquant.config import QuantSpec
    from lrquant.export.lazy import LazyLinears, LazyTensors

    weights = {"a.x.weight": torch.ones(3, 4, dtype=torch.bfloat16), "a.x.bias": torch.arange(3.0)}
    parts = {"a.x.codes": torch.zeros(3, 4, dtype=torch.uint8), "a.x.scale": torch.ones(3, 1),
             "a.x.zero": torch.zeros(3, 1)}  # fmt: skip
    save_file(weights, tmp_path / "w.safetensors")
    save_file(parts, tmp_path / "i.safetensors")
    tensors = LazyTensors.of([tmp_path / "w.safetensors"])
    assert set(tensors) == set(weights) and tensors.shape("a.x.weight") == (3, 4)
    assert tensors.dtype("a.x.weight") == torch.bfloat16 and torch.equal(
        tensors["a.x.bias"], weights["a.x.bias"]
    )
    spec = QuantSpec(bits=4, granularity="channel")
    linears = LazyLinears(LazyTensors.of([tmp_path / "i.safetensors"]), lambda _: spec, tensors)
    assert list(linears) == ["a.x"] and linears.shape("a.x") == (3, 4) and linears.has_bias("a.x")
    moved = linears.renamed(lambda key: key.replace("a.", "b.", 1))
    assert list(moved) == ["b.x"] and torch.equal(moved["b.x"].bias, weights["a.x.bias"])
    assert moved["b.x"].bits == 4 and moved["b.x"].codes.shape == (3, 4)
    assert list(tensors.without(["a.x.weight"])) == ["a.x.bias"]
    with pytest.raises(KeyError):
        tensors.without(["a.x.weight"])["a.x.weight"]
