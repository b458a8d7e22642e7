"""Progress lines for people: one place that decides their prefix and stream."""

import sys


def log(message: str) -> None:
    """Print ``lrquant: <message>`` on stderr (stdout stays free for ``--json`` output)."""
    print(f"lrquant: {message}", file=sys.stderr, flush=True)
