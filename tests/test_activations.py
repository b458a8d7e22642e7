"""The calibration chains' storage: their dtype, and memory-mapped files past a memory budget
that give the very result of chains in memory and leave nothing behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from helpers import TEST_DEVICE, interrupt_after_block
from safetensors.torch import load_file

from lrquant import api, cli
from lrquant.config import build_scheme
from lrquant.errors import LrquantError
from lrquant.methods.activations import AT_ONCE, Activations, parse_size

SCHEME = build_scheme(4, 8, group_size=16)


@pytest.fixture(scope="module")
def data(text_file: Path) -> api.DataSettings:
    return api.DataSettings(calib=str(text_file), eval=str(text_file), seqlen=32, nsamples=4, eval_windows=2)


def _run(model: Path, out: Path, data: api.DataSettings, method: str = "lrquant_plus", **more) -> dict:
    overrides = {"epochs": 1, "bf16": False, **more.pop("overrides", {})}
    return api.quantize(
        str(model), out, scheme=SCHEME, method=method, preset="fast", overrides=overrides, data=data,
        run_eval=False, device=TEST_DEVICE, **more,
    )  # fmt: skip


@pytest.mark.parametrize(
    "text, size",
    [
        ("8GiB", 8 * 2**30),
        ("8g", 8 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5t", int(1.5 * 2**40)),
        ("4e9", 4 * 10**9),
    ],
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "8 parsecs"])
def test_a_bad_size_is_one_clear_message(text: str) -> None:
    with pytest.raises(LrquantError, match="--max-memory expects a size such as 8GiB"):
        parse_size(text)


def test_chains_spill_to_unlinked_files_past_the_budget(tmp_path: Path) -> None:
    shape = (4, 8, 16)
    one = 4 * 8 * 16 * 2  # bf16 bytes
    small = Activations.of("bfloat16", torch.device("cpu"), tmp_path / "spill", budget=AT_ONCE * one)
    chain = small.empty(shape)  # exactly the budget: kept in memory
    assert not small.on_disk and chain.dtype == torch.bfloat16 and small.as_dict()["where"] == "memory (cpu)"

    acts = Activations.of("bfloat16", torch.device("cpu"), tmp_path / "spill", budget=AT_ONCE * one - 1)
    values = torch.randn(shape)
    kept = acts.keep(values)
    assert acts.on_disk and acts.as_dict()["bytes"] == AT_ONCE * one
    assert acts.as_dict()["where"] == f"files in {tmp_path / 'spill'}"
    assert torch.equal(kept.float(), values.to(torch.bfloat16).float())
    assert list((tmp_path / "spill").iterdir()) == []  # mapped, then unlinked: nothing to clean up
    kept[1] = 0  # writable, like a tensor in memory
    assert kept[1].abs().sum() == 0 and torch.equal(kept[0].float(), values[0].to(torch.bfloat16).float())


def test_a_full_disk_for_the_chains_is_one_clear_message(tmp_path: Path, monkeypatch) -> None:
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    acts = Activations.of("float32", torch.device("cpu"), tmp_path, budget=1)
    with pytest.raises(LrquantError, match="no room for .* calibration activations .* raise --max-memory"):
        acts.empty((2, 3, 4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "method, more", [("lrquant_plus", {}), ("gptq", {}), ("lrquant_plus", {"e2e_epochs": 1})]
)
def test_chains_in_files_give_the_result_of_chains_in_memory(
    method: str, more: dict, llama3: Path, data: api.DataSettings, tmp_path: Path, monkeypatch
) -> None:
    """Over a one-byte budget every chain lives in a memory-mapped file: the output is the in-memory
    run's bit for bit, the report says where they lived, and the files are gone after."""
    spilled: list[Path] = []
    original = Activations.empty

    def record(self, shape):
        out = original(self, shape)
        if self.folder is not None:
            spilled.append(self.folder)
        return out

    monkeypatch.setattr(Activations, "empty", record)
    memory = _run(llama3, tmp_path / "memory", data, method, overrides=more)
    assert not spilled and memory["activations"]["where"] == "memory (cpu)"
    disk = _run(llama3, tmp_path / "disk", data, method, overrides=more, max_memory=1)
    resume = tmp_path / ".disk.resume"
    assert spilled and set(spilled) == {resume / "activations"}
    assert disk["activations"] == {
        "dtype": "float32",
        "where": f"files in {resume / 'activations'}",
        "bytes": memory["activations"]["bytes"],
        "budget_bytes": 1,
    }
    assert memory["activations"]["bytes"] == AT_ONCE * data.nsamples * data.seqlen * 64 * 4  # hidden 64
    assert not resume.exists()
    expected, got = (
        load_file(tmp_path / "memory" / "model.safetensors"),
        load_file(tmp_path / "disk" / "model.safetensors"),
    )
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_an_interrupted_run_with_chains_in_files_resumes_to_the_same_output(
    llama3: Path, data: api.DataSettings, tmp_path: Path, monkeypatch
) -> None:
    _run(llama3, tmp_path / "whole", data, max_memory=1)
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            _run(llama3, tmp_path / "again", data, max_memory=1)
    assert list((tmp_path / ".again.resume" / "activations").iterdir()) == []  # no chain files left
    _run(llama3, tmp_path / "again", data, max_memory=1)
    expected, got = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "again" / "model.safetensors"),
    )
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_bf16_chains_halve_the_bytes_and_stay_close(
    llama3: Path, data: api.DataSettings, tmp_path: Path
) -> None:
    full = _run(llama3, tmp_path / "fp32", data, overrides={"chain_dtype": "float32"})
    half = _run(llama3, tmp_path / "bf16", data, overrides={"chain_dtype": "bfloat16"})
    assert half["activations"]["dtype"] == "bfloat16"
    assert half["activations"]["bytes"] * 2 == full["activations"]["bytes"]
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("fp32", "bf16"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the chains' rounding reaches the weights ...
    for ours, theirs in zip(half["blocks"], full["blocks"], strict=True):  # ... not their fidelity
        assert 1 - ours["cosine"] < 1.25 * (1 - theirs["cosine"]), (ours["cosine"], theirs["cosine"])


def test_cli_max_memory_reaches_the_run(llama3: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    code = cli.main(
        ["quantize", "--model", str(llama3), "--output", str(tmp_path / "out"), "--method", "gptq",
         "--wbits", "4", "--group-size", "16", "--calib-data", str(text_file), "--seqlen", "32",
         "--nsamples", "4", "--no-eval", "--device", "cpu", "--max-memory", "1KiB"]
    )  # fmt: skip
    assert code == 0
    assert "in memory-mapped files" in capsys.readouterr().err
    code = cli.main(
        ["quantize", "--model", str(llama3), "--output", str(tmp_path / "o2"), "--max-memory", "lots"]
    )
    assert code != 0
    assert "--max-memory expects a size" in capsys.readouterr().err
