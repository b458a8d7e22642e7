"""Progress of the long loops: a bar on a terminal, periodic lines in a log."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrquant import console
from lrquant.eval.perplexity import perplexity
from lrquant.models.loading import load_model


def test_lines_come_at_their_pace_with_the_time_left(capsys: pytest.CaptureFixture) -> None:
    """Without a terminal (pytest captures stderr), a line at most every PROGRESS_EVERY seconds:
    items done, seconds so far and the time left at the pace so far; none once the loop is done."""
    now = [0.0]
    with console.Progress(4, "fp perplexity", "windows", clock=lambda: now[0]) as progress:
        for t in (10.0, 40.0, 50.0, 90.0):
            now[0] = t
            progress.update()
    assert capsys.readouterr().err.splitlines() == [
        "lrquant: fp perplexity: 2/4 windows, 40 s, about 0.7 min left"
    ]


def test_perplexity_reports_its_windows(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(console, "PROGRESS_EVERY", 0.0)
    model = load_model(str(tiny_llama)).model
    capsys.readouterr()
    windows = torch.randint(3, 500, (3, 16), generator=torch.Generator().manual_seed(0))
    perplexity(model, windows, desc="quantized perplexity")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(", ")[0] for line in lines] == [
        "lrquant: quantized perplexity: 1/3 windows",
        "lrquant: quantized perplexity: 2/3 windows",
    ]


def test_progress_goes_through_logging_and_the_cli_prints_it(capsys, caplog) -> None:
    """A program that imports lrquant decides what it sees: without the command line's handler
    nothing reaches stderr, while logging's records carry every line."""
    import logging

    from lrquant.console import LOGGER, log, show_progress_lines

    handler = show_progress_lines()
    assert show_progress_lines() is handler  # once, however often asked
    log("with the handler")
    assert capsys.readouterr().err == "lrquant: with the handler\n"
    LOGGER.removeHandler(handler)
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="lrquant"):
            log("without it")
        assert capsys.readouterr().err == ""
        assert [r.getMessage() for r in caplog.records] == ["without it"]
    finally:
        LOGGER.addHandler(handler)
