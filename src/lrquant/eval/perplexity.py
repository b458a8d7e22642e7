"""Perplexity of a causal LM over token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lrquant.console import Progress
from lrquant.device import module_device


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity"
) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``windows``.

    ``windows`` is ``[n, seqlen]``; each window is scored on its own (no state carried between
    windows), and position 0 (the BOS token when present) is context only.
    """
    model.eval()
    device = module_device(model)
    total, count = 0.0, 0
    with Progress(windows.shape[0], desc, "windows") as bar:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
            bar.update(batch.shape[0])
    return math.exp(total / count)
