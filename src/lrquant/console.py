"""Progress lines for people: one place that decides their words and pace.

They go through Python's :mod:`logging` (the ``lrquant`` logger, level INFO): the command line
prints them on stderr as ``lrquant: <message>`` (:func:`show_progress_lines`); a program that
imports :mod:`lrquant.api` sees them only if it configures logging itself.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm

# seconds between the progress lines of a long loop when no terminal shows its bar
PROGRESS_EVERY = 30.0


LOGGER = logging.getLogger("lrquant")


def log(message: str) -> None:
    """Report progress: an INFO record of the ``lrquant`` logger."""
    LOGGER.info(message)


def show_progress_lines() -> logging.Handler:
    """Print the ``lrquant`` logger's records on stderr as ``lrquant: <message>`` (stdout stays
    free for ``--json`` output), as the command line does; returns the handler."""
    handler = next((h for h in LOGGER.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("lrquant: %(message)s"))
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    return handler


class _Stderr(logging.Handler):
    """Whatever ``sys.stderr`` is when a record comes (a test may have swapped it since)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


class Progress:
    """Progress of a loop over ``total`` items: a bar on a terminal, else (a log file, a pipe) a
    line every :data:`PROGRESS_EVERY` seconds with the items done and the time left.

    ``with Progress(32, "fp perplexity", "windows") as progress: ... progress.update(n)``
    """

    def __init__(self, total: int, desc: str, unit: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.clock = total, desc, unit, clock
        self.done = 0
        self.start = self.last = clock()
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = self.clock()
        if self.bar.disable and now - self.last >= PROGRESS_EVERY and self.done < self.total:
            self.last = now
            elapsed = now - self.start
            left = elapsed / self.done * (self.total - self.done)
            log(
                f"{self.desc}: {self.done}/{self.total} {self.unit}, {elapsed:.0f} s, "
                f"about {left / 60:.1f} min left"
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
