"""The per-block picture of a learned run: where the model hurts."""

from __future__ import annotations

import math
from pathlib import Path

PLOT_FILE = "blocks.png"


def plot_blocks(blocks: list[dict], path: Path, title: str) -> None:
    """Write a PNG with, per block, the output cosine and MSE to full precision, the training loss
    (first and last epoch) and the seconds spent, so a user sees which blocks lose the most."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = [b["index"] for b in blocks]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), constrained_layout=True)
    axes[0].plot(index, [1 - b["cosine"] for b in blocks], marker="o", ms=3)
    axes[0].set(title="1 - cosine to full precision", xlabel="block", yscale="log")
    axes[1].plot(index, [b["mse"] for b in blocks], marker="o", ms=3, color="tab:red")
    axes[1].set(title="output MSE to full precision", xlabel="block", yscale="log")
    first = [b["losses"][0] if b["losses"] else math.nan for b in blocks]
    last = [b["losses"][-1] if b["losses"] else math.nan for b in blocks]
    axes[2].plot(index, first, marker="o", ms=3, label="first epoch")
    axes[2].plot(index, last, marker="o", ms=3, label="last epoch")
    axes[2].set(title="training loss", xlabel="block")
    axes[2].legend()
    axes[3].bar(index, [b["seconds"] for b in blocks], color="tab:gray")
    axes[3].set(title="seconds", xlabel="block")
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)
