"""The cost estimate printed before a run: its parts move the way the run's cost does, and the
report puts it beside what was measured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrquant import api, cost
from lrquant.arch import get_arch_spec
from lrquant.config import build_scheme
from lrquant.cost import estimate
from lrquant.methods.activations import AT_ONCE
from lrquant.models.tiny import tiny_model
from lrquant.recipes import build_recipe

SCHEME = build_scheme(4, 16, group_size=32)
CPU = torch.device("cpu")


def test_the_estimate_grows_with_the_work_and_shrinks_when_streamed(monkeypatch) -> None:
    # one speed for every estimate: timed anew each call, it would follow whatever else runs
    monkeypatch.setattr(cost, "_matmul_rate", lambda *args: 1e10)
    model, arch = tiny_model("llama", num_layers=8), get_arch_spec("llama")
    learned = build_recipe("lrquant_plus", "fast", {"compile": False})
    base = estimate(model, arch, SCHEME, learned, 8, 64, CPU)
    assert base.blocks == 8 and base.seconds_per_block > 0 and base.gflop_per_second > 0
    more = estimate(model, arch, SCHEME, learned, 32, 64, CPU)
    assert 3 < more.seconds_per_block / base.seconds_per_block < 5  # four times the windows
    longer = build_recipe("lrquant_plus", "fast", {"compile": False, "epochs": 8})
    assert estimate(model, arch, SCHEME, longer, 8, 64, CPU).seconds_per_block > 2 * base.seconds_per_block
    rtn = estimate(model, arch, SCHEME, None, 8, 64, CPU)
    assert rtn.seconds_per_block < base.seconds_per_block / 10
    streamed = estimate(model, arch, SCHEME, learned, 8, 64, CPU, streamed=True)
    weights_mb = 4 * sum(p.numel() for p in model.parameters()) / 2**20
    blocks_mb = 4 * sum(p.numel() for b in arch.block_list(model) for p in b.parameters()) / 2**20
    head = model.get_output_embeddings().weight
    assert head is not model.get_input_embeddings().weight  # untied: on disk while the blocks learn
    head_mb = 4 * head.numel() / 2**20
    assert base.peak_memory_mb - streamed.peak_memory_mb == pytest.approx(blocks_mb * 6 / 8 + head_mb)
    assert streamed.peak_memory_mb < base.peak_memory_mb < base.peak_memory_mb + weights_mb
    shared = estimate(model, arch, SCHEME, learned, 8, 64, CPU, processes=2)
    assert shared.seconds_per_block < 0.6 * base.seconds_per_block  # each process learns on half
    assert (
        base.once_seconds == 0
        and estimate(model, arch, SCHEME, build_recipe("lrquant_plus", "fast"), 8, 64, CPU).once_seconds > 0
    )


def test_the_report_holds_the_estimate_and_what_was_measured(
    tiny_llama: Path, text_file: Path, tmp_path: Path
) -> None:
    data = api.DataSettings(calib=str(text_file), eval=str(text_file), seqlen=32, nsamples=4, eval_windows=2)
    report = api.quantize(
        str(tiny_llama), tmp_path / "out", SCHEME, "lrquant_plus", "fast", {"epochs": 1}, data
    )
    cost = report["estimate"]
    assert cost["blocks"] == 2 and cost["seconds"] >= cost["seconds_per_block"] * 2
    assert cost["measured"]["seconds_per_block"] > 0
    assert cost["measured"]["peak_memory_mb"] == report["peak_rss_mb"]


def test_the_estimate_counts_the_chains_as_they_are_kept() -> None:
    """bf16 chains take half the bytes; chains past the budget live in files and are not counted."""
    model, arch = tiny_model("llama", num_layers=2), get_arch_spec("llama")
    fp32 = build_recipe("lrquant_plus", "fast", {"compile": False})
    bf16 = build_recipe("lrquant_plus", "fast", {"compile": False, "chain_dtype": "bfloat16"})
    hidden, windows, tokens = model.config.hidden_size, 64, 128
    chains_mb = AT_ONCE * 4 * windows * tokens * hidden / 2**20
    full = estimate(model, arch, SCHEME, fp32, windows, tokens, CPU, max_memory=2**40).peak_memory_mb
    half = estimate(model, arch, SCHEME, bf16, windows, tokens, CPU, max_memory=2**40).peak_memory_mb
    spilled = estimate(model, arch, SCHEME, fp32, windows, tokens, CPU, max_memory=1).peak_memory_mb
    assert full - half == pytest.approx(chains_mb / 2) and full - spilled == pytest.approx(chains_mb)


def test_the_estimate_counts_the_end_to_end_step(monkeypatch) -> None:
    """Its time grows with its epochs and streamed (the blocks recomputed and read back), its
    memory is the model's backward on one window, or streamed a block's."""
    monkeypatch.setattr(cost, "_matmul_rate", lambda *args: 1e10)
    model, arch = tiny_model("llama", num_layers=8), get_arch_spec("llama")

    def with_epochs(epochs: int, streamed: bool = False) -> cost.Estimate:
        recipe = build_recipe("lrquant_plus", "fast", {"compile": False, "e2e_epochs": epochs})
        return estimate(model, arch, SCHEME, recipe, 8, 64, CPU, streamed=streamed)

    none, one, two = with_epochs(0), with_epochs(1), with_epochs(2)
    assert none.e2e_seconds == 0 and one.e2e_seconds > 0
    assert two.e2e_seconds == pytest.approx(2 * one.e2e_seconds)
    assert two.seconds == pytest.approx(none.seconds + two.e2e_seconds)
    assert two.seconds_per_block == none.seconds_per_block
    assert with_epochs(2, streamed=True).e2e_seconds > two.e2e_seconds
    assert "end-to-end step" in two.words() and "end-to-end" not in none.words()
    big = tiny_model("llama", num_layers=32)
    recipe = build_recipe("lrquant_plus", "fast", {"compile": False, "e2e_epochs": 2})
    deep = [
        estimate(big, arch, SCHEME, recipe, 8, 512, CPU, streamed=s).peak_memory_mb for s in (False, True)
    ]
    assert deep[1] < deep[0]  # one block's activations at a time, not every block's
    assert two.peak_memory_mb >= none.peak_memory_mb
