"""Fidelity to the full-precision model: mean KL divergence of the next-token distributions and
top-1 agreement, beside perplexity, in `quantize` reports and `eval`."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lrquant import api
from lrquant.config import build_scheme
from lrquant.eval.perplexity import perplexity, score_windows
from lrquant.models.loading import load_model


class FixedLogits(torch.nn.Module):
    """A causal LM stand-in whose logits at each position are given (the same for every window)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1))


def test_known_divergence_and_agreement() -> None:
    """Two tokens; the reference gives (0.25, 0.75) at every position, the model (0.6, 0.4) at the
    first and the reference's own distribution at the second: KL 0.25 ln(0.25/0.6) + 0.75
    ln(0.75/0.4) at one of the two predicted positions, 0 at the other; top-1 agrees at one."""
    ref = torch.log(torch.tensor([[0.25, 0.75]] * 3))
    mine = torch.log(torch.tensor([[0.6, 0.4], [0.25, 0.75], [0.5, 0.5]]))
    windows = torch.tensor([[0, 1, 1], [1, 0, 1]])
    scores = score_windows(FixedLogits(mine), windows, batch_size=1, reference=FixedLogits(ref))
    expected_kl = (0.25 * math.log(0.25 / 0.6) + 0.75 * math.log(0.75 / 0.4)) / 2
    assert scores["kl"] == pytest.approx(expected_kl, rel=1e-6)
    assert scores["top1_agreement"] == 0.5
    # targets 1, 1 and 0, 1 at positions 1 and 2: -ln 0.4, -ln 0.75, -ln 0.6, -ln 0.75
    nll = -(math.log(0.4) + 2 * math.log(0.75) + math.log(0.6)) / 4
    assert scores["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)


def test_a_model_against_itself_diverges_by_nothing(tiny_llama: Path) -> None:
    model = load_model(str(tiny_llama)).model
    windows = torch.randint(3, 500, (3, 24), generator=torch.Generator().manual_seed(0))
    scores = score_windows(model, windows, batch_size=2, reference=model)
    assert abs(scores["kl"]) < 1e-6 and scores["top1_agreement"] == 1.0
    assert scores["perplexity"] == perplexity(model, windows, batch_size=2)


def test_the_report_and_eval_give_the_same_fidelity(
    tiny_llama: Path, text_file: Path, tmp_path: Path
) -> None:
    """`quantize` scores the quantized model against the full-precision one (loaded again), and
    `eval` of the output against the model it was made from: the same windows, the same numbers."""
    data = api.DataSettings(calib=str(text_file), eval=str(text_file), seqlen=32, eval_windows=3)
    scoring = api.DataSettings(eval=str(text_file), seqlen=32, eval_windows=3)
    report = api.quantize(str(tiny_llama), tmp_path / "out", build_scheme(3), "rtn", data=data)
    fidelity = report["fidelity"]
    assert 0 < fidelity["kl"] < 5 and 0 < fidelity["top1_agreement"] < 1
    result = api.evaluate(
        str(tmp_path / "out"), api.DataSettings(eval=str(text_file), seqlen=32, eval_windows=3)
    )
    assert result["reference"] == str(tiny_llama.resolve())
    assert result["kl"] == pytest.approx(fidelity["kl"], rel=1e-5)
    assert result["top1_agreement"] == fidelity["top1_agreement"]
    assert result["perplexity"] == pytest.approx(report["perplexity"]["quantized"], rel=1e-6)
    alone = api.evaluate(str(tiny_llama), scoring)
    assert "kl" not in alone and alone["reference"] is None
