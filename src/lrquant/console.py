"""Progress lines for people: one place that decides their prefix, stream and pace."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm.auto import tqdm

# seconds between the progress lines of a long loop when no terminal shows its bar
PROGRESS_EVERY = 30.0


def log(message: str) -> None:
    """Print ``lrquant: <message>`` on stderr (stdout stays free for ``--json`` output)."""
    print(f"lrquant: {message}", file=sys.stderr, flush=True)


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
