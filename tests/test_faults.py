"""Injected faults, with real processes and a real file system: ``kill -9`` at a seeded random
block, two runs on one output at once, and a disk that fills up. Each must leave the earlier
output and the finished blocks intact, and the rerun must finish the job bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import error_line, run

from lrquant.methods.resume import META
from lrquant.models.tiny import save_tiny_model

NUM_LAYERS = 4
FAULT_SEED = 35  # which block the kill lands after


@pytest.fixture(scope="module")
def llama4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama4") / "model", num_layers=NUM_LAYERS)


def argv(model: Path, out: Path, text: Path, epochs: int = 40, *extra: str) -> list[str]:
    """A learned W4A4 run; ``epochs`` steps per block keep each block busy for about a second."""
    return [
        *("quantize", "--model", str(model), "--output", str(out), "--wbits", "4", "--abits", "4"),
        *("--group-size", "16", "--preset", "fast", "--seqlen", "32", "--nsamples", "4"),
        *("--calib-data", str(text), "--no-eval", "--set", "compile=false", "--set", f"epochs={epochs}"),
        *extra,
    ]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process runs (tests run one thread)
    return subprocess.Popen(
        [sys.executable, "-m", "lrquant", *args], stderr=subprocess.PIPE, text=True, env=env
    )


def wait_for(condition, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the run ended too early:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def blocks_done(out: Path) -> int:
    try:
        return json.loads((out.parent / f".{out.name}.resume" / META).read_text())["done"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def same_weights(a: Path, b: Path) -> None:
    expected, got = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_kill_9_at_a_random_block_then_the_rerun_finishes_bit_for_bit(
    llama4: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stop_after = random.Random(FAULT_SEED).randint(1, NUM_LAYERS - 1)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(capsys, *argv(llama4, whole, text_file))[0] == 0

    proc = start(argv(llama4, killed, text_file))
    wait_for(lambda: blocks_done(killed) >= stop_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    done = blocks_done(killed)
    assert stop_after <= done < NUM_LAYERS
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not killed.exists() and ".killed.resume" in left and ".killed.lock" in left
    assert any(name.startswith(".killed.tmp-") for name in left)  # what kill -9 leaves

    code, _, err = run(capsys, *argv(llama4, killed, text_file))
    assert code == 0, err
    assert f"resuming at block {done + 1}" in err
    assert "taking over the lock of process" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "whole"]  # stale folders gone
    same_weights(whole, killed)


def test_two_runs_on_one_output_the_second_fails_at_once(
    llama4: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    first = start(argv(llama4, out, text_file))
    wait_for(lambda: blocks_done(out) >= 1, first)
    began = time.monotonic()
    line = error_line(*run(capsys, *argv(llama4, out, text_file)))
    assert time.monotonic() - began < 30  # refused at the start, not after learning
    assert f"is being written by another lrquant run (process {first.pid}," in line
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert json.loads((out / "report.json").read_text())["blocks"][-1]["index"] == NUM_LAYERS - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 4 MiB file system (tmpfs), for root; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_up_keeps_the_old_output_and_the_finished_blocks(
    small_disk: Path, llama4: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first run fits; its replacement does not (old and new output side by side, as the
    atomic swap needs): refused with the space needed, old output and checkpoints intact; with
    more space the same command resumes and finishes."""
    out = small_disk / "out"
    assert run(capsys, *argv(llama4, out, text_file, 1))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    size = sum(len(b) for b in before.values())
    # Room for the checkpoints of every block but not for a second copy of the output.
    subprocess.run(["mount", "-o", f"remount,size={int(size * 1.7)}", str(small_disk)], check=True)

    line = error_line(*run(capsys, *argv(llama4, out, text_file, 1, "--overwrite", "--seed", "1")))
    assert "the disk is full while writing" in line and "it needs about" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    done = blocks_done(out)
    assert done >= 1
    assert not any(p.name.startswith(".out.tmp-") for p in small_disk.iterdir())

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    code, _, err = run(capsys, *argv(llama4, out, text_file, 1, "--overwrite", "--seed", "1"))
    assert code == 0, err
    assert f"resuming at block {done + 1}" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before
    assert sorted(p.name for p in small_disk.iterdir()) == ["out"]
