"""Output folders: ``--overwrite`` replaces only lrquant's own folders, one run per output at a
time, ordinary file permissions, stale temporaries removed, and a full disk loses nothing."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_cli import error_line, quantize_args, run

from lrquant import checkpoint
from lrquant.methods import resume
from lrquant.models.tiny import save_tiny_model
from lrquant.output_dir import MANIFEST_FILE

NUM_LAYERS = 3


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): a folder marker or the file's SHA-256."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with 3 blocks, so a learned run has a middle."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama3") / "model", num_layers=NUM_LAYERS)


def learned_args(model: Path, out: Path, text: Path, *extra: str) -> list[str | Path]:
    """A learned run of a few seconds that saves a resume checkpoint after every block."""
    return [
        *quantize_args(model, out, text, "--no-eval", "--nsamples", "4"),
        *("--method", "lrquant_plus", "--preset", "fast", "--set", "epochs=1", "--set", "compile=false"),
        *extra,
    ]


def rtn_output(model: Path, out: Path, text: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, _, err = run(capsys, *quantize_args(model, out, text, "--no-eval"))
    assert code == 0, err
    return out


# --- what --overwrite may replace ---------------------------------------------------------------


def _user_folder(work: Path, model: Path, text: Path, capsys) -> tuple[Path, list[str]]:
    folder = work / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not really a photo")
    return folder, ["was not written by lrquant", f"no {MANIFEST_FILE}"]


def _output_with_a_note(work: Path, model: Path, text: Path, capsys) -> tuple[Path, list[str]]:
    out = rtn_output(model, work / "out", text, capsys)
    (out / "notes.txt").write_text("my notes")
    return out, ["holds files lrquant did not write (notes.txt)"]


def _input_model_folder(work: Path, model: Path, text: Path, capsys) -> tuple[Path, list[str]]:
    copy = rtn_output(model, work / "model", text, capsys)  # an lrquant folder: only the input rule holds
    return copy, ["is '", "which this run reads or runs in"]


def _parent_of_the_model(work: Path, model: Path, text: Path, capsys) -> tuple[Path, list[str]]:
    rtn_output(model, work / "models" / "m", text, capsys)
    return work / "models", ["contains '", "which this run reads or runs in"]


def _current_folder(work: Path, model: Path, text: Path, capsys) -> tuple[Path, list[str]]:
    return Path("."), ["which this run reads or runs in"]


@pytest.mark.parametrize(
    "make",
    [_user_folder, _output_with_a_note, _input_model_folder, _parent_of_the_model, _current_folder],
    ids=["user-folder", "foreign-file", "input-model", "model-parent", "current-folder"],
)
def test_overwrite_refuses_what_lrquant_did_not_write(
    make, work: Path, tiny_llama: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, expected = make(work, tiny_llama, text_file, capsys)
    model = target if make is _input_model_folder else tiny_llama
    if make is _parent_of_the_model:
        model = work / "models" / "m"
    capsys.readouterr()
    before = snapshot(work)
    line = error_line(*run(capsys, *quantize_args(model, target, text_file, "--overwrite", "--no-eval")))
    for fragment in expected:
        assert fragment in line
    assert snapshot(work) == before


def test_data_file_inside_the_output_is_refused(
    work: Path, tiny_llama: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rtn_output(tiny_llama, work / "out", text_file, capsys)
    data = out / "calibration.txt"
    data.write_text(text_file.read_text())
    # the text file makes the folder foreign too; the input rule is checked (and said) first
    before = snapshot(work)
    line = error_line(*run(capsys, *quantize_args(tiny_llama, out, data, "--overwrite")))
    assert f"contains '{data}'" in line
    assert snapshot(work) == before


def test_empty_output_path_is_refused(work: Path, tiny_llama: Path, text_file: Path, capsys) -> None:
    line = error_line(*run(capsys, *quantize_args(tiny_llama, "", text_file, "--overwrite")))
    assert "the output path is empty" in line
    assert snapshot(work) == {}


def test_output_symlink_is_refused(work: Path, tiny_llama: Path, text_file: Path, capsys) -> None:
    real = rtn_output(tiny_llama, work / "real", text_file, capsys)
    (work / "link").symlink_to(real)
    before = snapshot(work)
    line = error_line(*run(capsys, *quantize_args(tiny_llama, work / "link", text_file, "--overwrite")))
    assert "is a symbolic link" in line
    assert snapshot(work) == before


def test_overwrite_replaces_its_own_output_and_clears_stale_temporaries(
    work: Path, tiny_llama: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The old folder goes only once the new one is in place; what a ``kill -9`` left beside the
    output (a temporary folder, a set-aside old folder) is removed by the next successful run;
    files get the umask's permissions, not the 0600 some writers use."""
    out = rtn_output(tiny_llama, work / "out", text_file, capsys)
    first = json.loads((out / "report.json").read_text())
    for stale in (".out.tmp-k9x2", ".out.old-4242"):
        (work / stale).mkdir()
        (work / stale / "model.safetensors").write_bytes(b"half")
    umask = os.umask(0o022)
    try:
        code, _, err = run(capsys, *quantize_args(tiny_llama, out, text_file, "--overwrite", "--seed", "1"))
    finally:
        os.umask(umask)
    assert code == 0, err
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    second = json.loads((out / "report.json").read_text())
    assert (first["seed"], second["seed"]) == (0, 1)
    listed = json.loads((out / MANIFEST_FILE).read_text())["files"]
    assert sorted(listed + [MANIFEST_FILE]) == sorted(p.name for p in out.iterdir())
    assert {"model.safetensors", "report.json", "lrquant_quant.json", "tokenizer.json"} <= set(listed)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
    assert oct(out.stat().st_mode & 0o777) == "0o755"


# --- one run per output ---------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lrquant.output_dir import OutputLock
    OutputLock(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_second_run_on_the_same_output_fails_at_once_and_a_dead_holder_is_taken_over(
    work: Path, tiny_llama: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(work)
        line = error_line(*run(capsys, *quantize_args(tiny_llama, out, text_file, "--no-eval")))
        assert f"is being written by another lrquant run (process {holder.pid}," in line
        assert "wait for it to finish or stop it" in line
        assert snapshot(work) == before
    finally:
        holder.kill()  # as kill -9 would: the lock file stays, naming a dead process
        holder.wait()
    assert (work / ".out.lock").read_text().startswith(f"{holder.pid} ")
    code, _, err = run(capsys, *quantize_args(tiny_llama, out, text_file, "--no-eval"))
    assert code == 0, err
    assert f"taking over the lock of process {holder.pid}, which is no longer running" in err
    assert sorted(p.name for p in work.iterdir()) == ["out"]


# --- a full disk ------------------------------------------------------------------------------------


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_keeps_the_old_output_and_the_finished_blocks(
    work: Path,
    llama3: Path,
    text_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = work / "out"
    code, _, err = run(capsys, *learned_args(llama3, out, text_file))
    assert code == 0, err
    before = snapshot(out)
    real_save = checkpoint.save_quantized

    def save_half(folder: Path, *args, **kwargs) -> None:  # writes some files, then the disk is full
        real_save(folder, *args, **kwargs)
        (folder / "model.safetensors").unlink()
        _disk_full()

    monkeypatch.setattr("lrquant.api.save_quantized", save_half)
    line = error_line(*run(capsys, *learned_args(llama3, out, text_file, "--overwrite", "--seed", "1")))
    assert f"the disk is full while writing the quantized model to '{work}': it needs about" in line
    assert "MiB free); any earlier output is unchanged" in line
    assert "the finished blocks are kept in" in line and "rerun the same command" in line
    assert snapshot(out) == before
    progress = json.loads((work / ".out.resume" / resume.META).read_text())
    assert progress["done"] == NUM_LAYERS
    assert sorted(p.name for p in work.iterdir()) == [".out.resume", "out"]

    monkeypatch.undo()  # space again: the rerun only writes
    code, _, err = run(capsys, *learned_args(llama3, out, text_file, "--overwrite", "--seed", "1"))
    assert code == 0, err
    assert "resuming at block 4" in err
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    assert snapshot(out) != before


def test_disk_full_while_checkpointing_a_block_keeps_the_earlier_blocks(
    work: Path,
    llama3: Path,
    text_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = work / "out"
    real_save = resume.save_file
    calls = []

    def full_on_block_1(tensors, path, *args, **kwargs) -> None:
        calls.append(Path(path).name)
        if Path(path).name.startswith("block-1"):
            Path(path).write_bytes(b"partial")  # what a write cut short leaves
            _disk_full()
        real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(resume, "save_file", full_on_block_1)
    line = error_line(*run(capsys, *learned_args(llama3, out, text_file)))
    assert "the disk is full while writing the checkpoint of block 2" in line
    assert "it needs about" in line and "rerun the same command to resume" in line
    store = work / ".out.resume"
    assert json.loads((store / resume.META).read_text())["done"] == 1
    assert sorted(p.name for p in store.iterdir()) == [
        "block-0.safetensors",
        "chain-0.safetensors",
        "integers-0.safetensors",
        "progress.json",
    ]
    assert sorted(p.name for p in work.iterdir()) == [".out.resume"]
