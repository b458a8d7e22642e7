"""Perplexity of a causal LM over token windows, and its fidelity to a full-precision reference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lrquant.console import Progress
from lrquant.device import module_device


@torch.no_grad()
def score_windows(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    desc: str = "perplexity",
    reference: torch.nn.Module | None = None,
) -> dict[str, float]:
    """``perplexity``: exp(mean next-token negative log-likelihood) over every predicted token of
    ``windows``; with a ``reference`` model (the full-precision one), also, on the same predicted
    tokens, ``kl``: the mean KL divergence of ``model``'s next-token distribution from the
    reference's, KL(P_ref || P_model) in nats, and ``top1_agreement``: the share of tokens where
    both put the same token first (what llama.cpp's users compare quantizations by).

    ``windows`` is ``[n, seqlen]``; each window is scored on its own (no state carried between
    windows), and position 0 (the BOS token when present) is context only.
    """
    model.eval()
    device = module_device(model)
    if reference is not None:
        reference.eval()
        ref_device = module_device(reference)
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    with Progress(windows.shape[0], desc, "windows") as bar:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
            if reference is not None:
                ref = reference(input_ids=batch.to(ref_device), use_cache=False).logits[:, :-1]
                ref = ref.float().to(device)
                log_p, log_q = F.log_softmax(ref, dim=-1), F.log_softmax(logits, dim=-1)
                kl += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
                agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
            bar.update(batch.shape[0])
    scores = {"perplexity": math.exp(nll / count)}
    if reference is not None:
        scores.update(kl=kl / count, top1_agreement=agree / count)
    return scores


def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity"
) -> float:
    """:func:`score_windows`' perplexity alone."""
    return score_windows(model, windows, batch_size, desc)["perplexity"]
