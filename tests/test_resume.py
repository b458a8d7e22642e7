"""Crash-safe learned runs: an interrupted ``quantize`` leaves no output but keeps its finished blocks,
and rerunning the same command resumes to bit-for-bit the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TEST_DEVICE, interrupt_after_block
from safetensors.torch import load_file

from lrquant import api, cli
from lrquant.checkpoint import REPORT_FILE
from lrquant.config import build_scheme
from lrquant.errors import LrquantError
from lrquant.methods.resume import META

NUM_LAYERS = 3  # the blocks of the llama3 fixture (conftest.py)
SCHEME = build_scheme(4, 4, group_size=16)
OVERRIDES = {"epochs": 1}


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(calib=str(text_file), eval=str(text_file), seqlen=32, nsamples=4, eval_windows=2)


@pytest.fixture(scope="module")
def uninterrupted(llama3: Path, data: api.DataSettings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "out_a"
    _run(llama3, out, data)
    return out


def _run(
    model: Path,
    out: Path,
    data: api.DataSettings,
    overrides: dict | None = None,
    method: str = "lrquant_plus",
) -> dict:
    return api.quantize(
        str(model),
        out,
        scheme=SCHEME,
        method=method,
        preset="fast",
        overrides=overrides or OVERRIDES,
        data=data,
        run_eval=False,
        device=TEST_DEVICE,
    )


def _resume_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.resume"


def test_interrupted_run_resumes_to_the_same_checkpoint(
    llama3: Path, data: api.DataSettings, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out_b"
    resume = _resume_folder(out)
    with monkeypatch.context() as patch:
        saved = interrupt_after_block(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            _run(llama3, out, data)
    assert saved == [0]
    assert not out.exists()  # no half-written output
    assert [p.name for p in tmp_path.iterdir()] == [resume.name]  # and no temporary folder left behind
    progress = json.loads((resume / META).read_text())
    assert progress["done"] == 1
    assert [r["index"] for r in progress["reports"]] == [0]
    assert (resume / "block-0.safetensors").is_file() and (resume / "chain-0.safetensors").is_file()

    with monkeypatch.context() as patch:
        saved = interrupt_after_block(patch, -1)  # only records
        report = _run(llama3, out, data)
    assert saved == [1, 2]  # resumed: block 0 was not learned again
    assert out.is_dir() and not resume.exists()
    assert [b["index"] for b in report["blocks"]] == list(range(NUM_LAYERS))
    on_disk = json.loads((out / REPORT_FILE).read_text())
    assert [b["index"] for b in on_disk["blocks"]] == list(range(NUM_LAYERS))
    assert all(len(b["losses"]) == 1 for b in on_disk["blocks"])

    expected = load_file(uninterrupted / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert got.keys() == expected.keys()
    assert any(".layers.2." in key for key in got)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # The block reports of the resumed run match the uninterrupted ones too.
    reference = json.loads((uninterrupted / REPORT_FILE).read_text())["blocks"]
    assert [b["losses"] for b in on_disk["blocks"]] == [b["losses"] for b in reference]


@pytest.mark.parametrize(
    "method, overrides, stop_after",
    [
        ("gptq", {}, 0),
        ("lrquant_plus", {"epochs": 1, "gptq": True}, 0),
        # after the last block, before the end-to-end step: the rerun does that step alone
        ("lrquant_plus", {"epochs": 1, "e2e_epochs": 1}, NUM_LAYERS - 1),
    ],
    ids=["gptq", "lrquant_plus-gptq", "lrquant_plus-e2e"],
)
def test_optional_finishing_steps_resume_to_the_same_checkpoint(
    method: str,
    overrides: dict,
    stop_after: int,
    llama3: Path,
    data: api.DataSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GPTQ rounding (its Hessians rebuilt from the saved chain) and end-to-end step sizes:
    interrupted and rerun, bit for bit the uninterrupted result."""
    whole, parts = tmp_path / "a", tmp_path / "b"
    _run(llama3, whole, data, overrides, method)
    with monkeypatch.context() as patch:
        saved = interrupt_after_block(patch, stop_after)
        with pytest.raises(KeyboardInterrupt):
            _run(llama3, parts, data, overrides, method)
    assert saved[-1] == stop_after
    report = _run(llama3, parts, data, overrides, method)
    if overrides.get("e2e_epochs"):
        assert len(report["blocks"][-1]["e2e_kl"]) == overrides["e2e_epochs"]
        on_disk = json.loads((parts / REPORT_FILE).read_text())
        assert on_disk["blocks"][-1]["e2e_kl"] == report["blocks"][-1]["e2e_kl"]
    expected, got = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_rerun_with_other_settings_refuses_the_resume_folder(
    llama3: Path, data: api.DataSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out_c"
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            _run(llama3, out, data)
    resume = _resume_folder(out)
    with pytest.raises(LrquantError, match="delete the folder") as err:
        _run(llama3, out, data, overrides={"epochs": 2})
    assert "rerun that command" in str(err.value) and resume.name in str(err.value)
    assert resume.is_dir() and not out.exists()  # nothing was lost or written
    assert json.loads((resume / META).read_text())["done"] == 1


def test_cli_interrupt_exits_130_with_a_resume_hint(
    llama3: Path,
    text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out_cli"
    # This test ends with the resume folder in place; it lives in tmp_path.
    interrupt_after_block(monkeypatch, 1)
    argv = [
        "quantize", "--model", str(llama3), "--output", str(out),
        "--method", "lrquant_plus", "--preset", "fast", "--set", "epochs=1",
        "--wbits", "4", "--abits", "4", "--group-size", "16",
        "--calib-data", str(text_file), "--eval-data", str(text_file),
        "--seqlen", "32", "--nsamples", "4", "--no-eval",
    ]  # fmt: skip
    status = cli.main(argv)
    assert status == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert not out.exists()
    assert json.loads((_resume_folder(out) / META).read_text())["done"] == 2


def test_swin_resumes_across_the_patch_merging_between_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after the last block of Swin's first stage: the saved chain is the input of the
    next stage (after the patch merging), and the resumed run equals an uninterrupted one."""
    from lrquant.models.tiny_vision import save_tiny_vision_model

    model = save_tiny_vision_model("swin", tmp_path / "swin", num_layers=2)
    data = api.DataSettings(calib="photos", nsamples=4)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(model, whole, data)
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            _run(model, resumed, data)
    chain = load_file(_resume_folder(resumed) / "chain-1.safetensors")
    assert all(t.shape[1:] == (16, 64) for t in chain.values())  # stage 2: a 4x4 grid of 64 channels
    _run(model, resumed, data)
    expected, got = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_sigterm_stops_like_ctrl_c_and_the_rerun_resumes(
    llama3: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kill``/``timeout``/a scheduler's SIGTERM mid-run: exit 143, one line, no temporary output
    folder left, the finished blocks kept; the same command then resumes after them."""
    out = tmp_path / "out_term"
    argv = ["quantize", "--model", str(llama3), "--output", str(out), "--wbits", "4", "--abits", "4"]
    argv += ["--group-size", "16", "--preset", "fast", "--seqlen", "32", "--nsamples", "4"]
    argv += ["--calib-data", str(text_file), "--no-eval", "--set", "compile=false"]
    # Enough steps per block that the run is still learning block 1 when the signal comes.
    argv += ["--set", "epochs=40"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrquant", *argv], stderr=subprocess.PIPE, text=True, env=env
    )
    progress = _resume_folder(out) / META
    deadline = time.monotonic() + 240
    while not progress.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before its first block was saved:\n{proc.stderr.read()}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("lrquant: stopped by SIGTERM; no output was written")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [_resume_folder(out).name]  # no temporary folder
    done = json.loads(progress.read_text())["done"]
    assert 1 <= done < NUM_LAYERS

    with monkeypatch.context() as patch:
        saved = interrupt_after_block(patch, -1)  # only records
        assert cli.main(argv) == 0
    assert saved == list(range(done, NUM_LAYERS))  # resumed after the blocks already saved
    assert out.is_dir() and not _resume_folder(out).exists()
