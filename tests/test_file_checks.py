"""Damaged input files: each is refused where it enters, in one line naming the file and saying what
to do, through the command line (``quantize`` and ``eval``) with nothing written anywhere. The
damaged model folders are in the bad-input corpus (tests/test_bad_inputs.py); here are the file
checks themselves, sharded checkpoints, GGUF conversions, resume folders and empty texts."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from test_cli import error_line, run
from test_output_safety import snapshot

from lrquant import cli
from lrquant.errors import LrquantError
from lrquant.file_checks import check_gguf, check_safetensors, read_json, read_json_object
from lrquant.methods.resume import ResumeStore
from lrquant.models.loading import load_model
from lrquant.models.tiny import tiny_model, tiny_tokenizer


def quantize(model: Path, text: Path, *extra: str) -> list[str | Path]:
    return [
        *("quantize", "--model", model, "--output", "out", "--method", "rtn", "--seqlen", "32"),
        *("--eval-windows", "2", "--calib-data", text, "--eval-data", text, *extra),
    ]


def evaluate(model: Path, text: Path) -> list[str | Path]:
    return ["eval", "--model", model, "--data", text, "--seqlen", "32", "--eval-windows", "2"]


def refused(capsys: pytest.CaptureFixture[str], argv: list[str | Path], *fragments: str) -> str:
    """Run ``argv``; check it is refused with one error line holding every fragment; return it."""
    line = error_line(*run(capsys, *argv))
    for fragment in fragments:
        assert fragment in line, line
    return line


# --- damaged model folders ------------------------------------------------------------------------


def copy_model(tiny_llama: Path, work: Path) -> Path:
    return Path(shutil.copytree(tiny_llama, work / "model"))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def overwrite_start(path: Path) -> None:
    with path.open("r+b") as fh:
        fh.write(b"\xff" * 8)


def drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def remove_key(path: Path, key: str) -> None:
    data = json.loads(path.read_text())
    del data[key]
    path.write_text(json.dumps(data))


DAMAGED = ("truncated or damaged", "copy or re-create it")


def sharded(work: Path) -> Path:
    """The tiny llama saved in several shards with a ``model.safetensors.index.json``."""
    folder = work / "sharded"
    tiny_model("llama").save_pretrained(folder, max_shard_size="200KB")
    tiny_tokenizer().save_pretrained(folder)
    assert not (folder / "model.safetensors").exists()
    return folder


def test_sharded_checkpoint(work: Path, text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = sharded(work)
    assert load_model(str(folder)).model_type == "llama"  # a complete one loads
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) >= 2
    capsys.readouterr()

    truncate(folder / shards[-1])
    refused(capsys, evaluate(folder, text_file), f"{shards[-1]}' is not a valid safetensors file", *DAMAGED)
    (folder / shards[-1]).unlink()
    refused(capsys, quantize(folder, text_file), "index.json' names 1 shard(s) missing", shards[-1])
    index.write_text("{")
    refused(capsys, quantize(folder, text_file), "model.safetensors.index.json' is not valid JSON")
    index.write_text('{"metadata": {}}')
    refused(capsys, evaluate(folder, text_file), "index.json' has no weight_map")
    assert sorted(p.name for p in work.iterdir()) == ["sharded"]


def test_mismatch_prints_no_transformers_report(work: Path, tiny_llama: Path) -> None:
    """transformers' own loading report table stays off the console when lrquant refuses."""
    from transformers import AutoModelForCausalLM

    model = copy_model(tiny_llama, work)
    drop_tensor(model / "model.safetensors", "model.norm.weight")
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        AutoModelForCausalLM.from_pretrained(model)  # plain transformers: a report, a random tensor
        assert any("LOAD REPORT" in m for m in messages)
        messages.clear()
        with pytest.raises(LrquantError, match=r"lack model\.norm\.weight \(1 tensor missing\)"):
            load_model(str(model))
        assert not any("LOAD REPORT" in m for m in messages)
    finally:
        logger.removeHandler(handler)


def test_unused_pooler_may_be_missing(work: Path) -> None:
    """A ViT backbone saved without its pooler (as DINO's are) loads: lrquant never uses it."""
    from lrquant.models.tiny_vision import save_tiny_vision_model

    folder = save_tiny_vision_model("vit", work / "vit")
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "pooler" not in k}, folder / "model.safetensors")
    assert type(load_model(str(folder)).model).__name__ == "ViTModel"
    drop_tensor(folder / "model.safetensors", "layernorm.weight")
    with pytest.raises(LrquantError, match=r"lack layernorm\.weight"):
        load_model(str(folder))


# --- check_safetensors and the JSON readers ---------------------------------------------------


def test_check_safetensors(tiny_llama: Path, tmp_path: Path) -> None:
    check_safetensors(tiny_llama / "model.safetensors")
    for name, damage, reason in [
        ("half", truncate, "incomplete metadata, file not fully covered"),
        ("empty", lambda p: p.write_bytes(b""), "header too small"),
        ("ff", overwrite_start, "header too large"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        shutil.copy(tiny_llama / "model.safetensors", path)
        damage(path)
        with pytest.raises(LrquantError) as err:
            check_safetensors(path)
        assert str(err.value) == (
            f"'{path}' is not a valid safetensors file ({reason}): it is truncated or damaged; "
            "copy or re-create it"
        )
    with pytest.raises(LrquantError, match="truncated or damaged; delete it$"):
        check_safetensors(path, advice="delete it")


def test_json_readers(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('{"a": [1]}')
    assert read_json(path) == read_json_object(path, "a thing") == {"a": [1]}
    path.write_text("")
    with pytest.raises(LrquantError, match=r"a\.json' is not valid JSON \(the file is empty\)"):
        read_json(path)
    path.write_text('{"a": ')
    with pytest.raises(LrquantError, match=r"not valid JSON \(Expecting value: line 1 column 7 \(char 6\)\)"):
        read_json(path)
    path.write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(LrquantError, match=r"not valid JSON \(not UTF-8 at byte 10\)"):
        read_json(path)
    path.write_text("null")
    with pytest.raises(LrquantError, match=r"is not a thing: it holds null, not a JSON object; start again"):
        read_json_object(path, "a thing", "start again")


# --- GGUF files -----------------------------------------------------------------------------------


def write_gguf(path: Path) -> Path:
    """A small, complete GGUF: some metadata and two float32 tensors (no tokenizer: it does not
    convert to a model)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(64 * 16, dtype=np.float32).reshape(64, 16))
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def zero_tensor_past_the_end() -> bytes:
    """A GGUF whose one (empty) tensor claims to start 1 MiB past the end of the file."""
    name = b"w"
    info = struct.pack("<Q", len(name)) + name + struct.pack("<IQIQ", 1, 0, 0, 1 << 20)
    data = struct.pack("<4sIQQ", b"GGUF", 3, 1, 0) + info
    return data + b"\x00" * (-len(data) % 32)


def gguf_cases(good: bytes) -> list[tuple[str, bytes, str]]:
    header_only = struct.pack("<4sI", b"GGUF", 3)
    cut_in_table = struct.pack("<4sIQQ", b"GGUF", 3, 1, 0) + struct.pack("<Q", 4) + b"w.0\x00"
    return [
        ("empty", b"", "(0 bytes, shorter than a GGUF header)"),
        ("header-only", header_only, "(8 bytes, shorter than a GGUF header)"),
        ("not-gguf", bytes(range(256)) * 4, "(it does not start with 'GGUF')"),
        ("cut-in-the-tensor-table", cut_in_table, "(metadata or tensors unreadable: "),
        ("cut-in-the-metadata", good[:60], "(metadata or tensors unreadable: "),
        ("half", good[: len(good) // 2], "(metadata or tensors unreadable: "),
        ("last-bytes-missing", good[:-10], "(metadata or tensors unreadable: "),
        ("tensor-past-the-end", zero_tensor_past_the_end(), "(tensor 'w' ends at byte"),
    ]


def test_check_gguf(tmp_path: Path) -> None:
    good = write_gguf(tmp_path / "good.gguf")
    check_gguf(good)
    for name, content, reason in gguf_cases(good.read_bytes()):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(LrquantError) as err:
            check_gguf(path)
        message = str(err.value)
        assert message.startswith(f"'{path}' is not a valid GGUF file {reason}"), message
        assert message.endswith("): it is truncated or damaged; copy or re-create it"), message


@pytest.mark.parametrize("case", ["empty", "header-only", "half", "tensor-past-the-end"])
def test_damaged_gguf_leaves_the_cache_alone(
    case: str,
    work: Path,
    tmp_path: Path,
    text_file: Path,
    private_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    path = work / "model.gguf"
    path.write_bytes(next(content for name, content, _ in gguf_cases(good) if name == case))
    before = snapshot(work), snapshot(private_cache)
    refused(capsys, quantize(path, text_file), f"'{path}' is not a valid GGUF file (", *DAMAGED)
    refused(capsys, evaluate(path, text_file), f"'{path}' is not a valid GGUF file (")
    assert (snapshot(work), snapshot(private_cache)) == before


def test_failed_gguf_conversion_leaves_the_cache_alone(
    work: Path,
    text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A sound GGUF that does not convert (no tokenizer) leaves no folder in a new cache."""
    cache = tmp_path / "new-cache"
    monkeypatch.setenv("LRQUANT_CACHE", str(cache))
    path = write_gguf(work / "model.gguf")
    before = snapshot(work)
    refused(capsys, quantize(path, text_file), f"cannot convert '{path}' (", "a GGUF of a supported model")
    assert not cache.exists() and snapshot(work) == before


# --- damaged resume folders ------------------------------------------------------------------------


def learned(model: Path, text: Path) -> list[str | Path]:
    return [
        *("quantize", "--model", model, "--output", "out", "--method", "omniquant", "--preset", "fast"),
        *("--set", "epochs=1", "--nsamples", "2", "--seqlen", "32", "--calib-data", text, "--no-eval"),
    ]


@pytest.fixture
def interrupted(
    work: Path,
    tiny_llama: Path,
    text_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Path:
    """The resume folder of a learned run stopped after its first block (of two)."""
    original = ResumeStore.save_block

    def save_then_stop(self, index, block, state, report) -> None:
        original(self, index, block, state, report)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ResumeStore, "save_block", save_then_stop)
        assert cli.main([str(a) for a in learned(tiny_llama, text_file)]) == 130
    capsys.readouterr()
    folder = work / ".out.resume"
    assert {"progress.json", "block-0.safetensors"} <= {p.name for p in folder.iterdir()}
    return folder


def chain_file(folder: Path) -> Path:
    return next(folder.glob("chain*.safetensors"))


def other_tensors(path: Path) -> None:
    """Replace the tensors of ``path`` by one the block has no place for."""
    save_file({"x": next(iter(load_file(path).values()))}, path)


RESUME_CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    (
        "progress-not-json",
        lambda f: (f / "progress.json").write_text('{"fingerprint": '),
        ("progress.json' is not valid JSON",),
    ),
    (
        "progress-an-array",
        lambda f: (f / "progress.json").write_text("[]"),
        ("progress.json' is not a progress file",),
    ),
    (
        "progress-without-done",
        lambda f: remove_key(f / "progress.json", "done"),
        ("progress.json does not say which",),
    ),
    ("progress-ahead", lambda f: edit_json(f / "progress.json", done=2), ("block-1.safetensors is missing",)),
    (
        "block-truncated",
        lambda f: truncate(f / "block-0.safetensors"),
        ("block-0.safetensors' is not a valid",),
    ),
    ("block-empty", lambda f: (f / "block-0.safetensors").write_bytes(b""), ("header too small",)),
    (
        "block-of-other-tensors",
        lambda f: other_tensors(f / "block-0.safetensors"),
        ("its tensors do not fit",),
    ),
    (
        "chain-truncated",
        lambda f: truncate(chain_file(f)),
        ("is not a valid safetensors file", "truncated or damaged"),
    ),
    ("chain-missing", lambda f: chain_file(f).unlink(), ("is missing",)),
    (
        "integers-truncated",
        lambda f: truncate(f / "integers-0.safetensors"),
        ("integers-0.safetensors' is not a valid",),
    ),
    (
        "integers-of-other-tensors",
        lambda f: other_tensors(f / "integers-0.safetensors"),
        ("its tensors do not fit",),
    ),
    (
        "store-of-an-older-lrquant",  # block-relative keys, grids beside the weights
        lambda f: remove_key(f / "progress.json", "version"),
        ("written by an older lrquant", "delete that folder to start over"),
    ),
]


@pytest.mark.parametrize("damage, expected", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_damaged_resume_folder(
    damage: Callable[[Path], None],
    expected: tuple[str, ...],
    interrupted: Path,
    work: Path,
    tiny_llama: Path,
    text_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    damage(interrupted)
    before = snapshot(work)
    line = refused(capsys, learned(tiny_llama, text_file), *expected)
    assert str(interrupted) in line
    assert "the run cannot resume from" in line and "delete that folder to start over" in line
    assert snapshot(work) == before  # the folder is kept for the user to look at


# --- text sources without text ---------------------------------------------------------------------


def blank_folder(work: Path) -> None:
    (work / "texts").mkdir()
    (work / "texts" / "a.txt").write_text("\n")


TEXT_CASES = [
    ("empty.txt", lambda w: (w / "empty.txt").write_text(""), "give a file with text"),
    ("blank.txt", lambda w: (w / "blank.txt").write_text(" \n\n\t\n"), "give a file with text"),
    ("texts", blank_folder, "give files with text"),
    (
        "d.jsonl",
        lambda w: (w / "d.jsonl").write_text('{"text": ""}\n{"text": "  "}\n'),
        "give records with text in their 'text' field",
    ),
]


@pytest.mark.parametrize("source, make, hint", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_empty_text_source(
    source: str,
    make: Callable[[Path], None],
    hint: str,
    work: Path,
    tiny_llama: Path,
    text_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make(work)
    before = snapshot(work)
    expected = (f"the text source is empty: '{source}' holds no text; {hint}",)
    refused(capsys, quantize(tiny_llama, text_file, "--eval-data", source), *expected)
    refused(capsys, evaluate(tiny_llama, Path(source)), *expected)
    assert snapshot(work) == before
