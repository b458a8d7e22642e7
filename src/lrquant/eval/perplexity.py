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
    extra: dict[str, torch.Tensor] | None = None,
    scored: torch.Tensor | None = None,
    answers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """``perplexity``: exp(mean next-token negative log-likelihood) over every predicted token of
    ``windows``; with a ``reference`` model (the full-precision one), also, on the same predicted
    tokens, ``kl``: the mean KL divergence of ``model``'s next-token distribution from the
    reference's, KL(P_ref || P_model) in nats, and ``top1_agreement``: the share of tokens where
    both put the same token first (what llama.cpp's users compare quantizations by).

    ``windows`` is ``[n, seqlen]``; each window is scored on its own (no state carried between
    windows), and position 0 (the BOS token when present) is context only. ``extra`` holds more
    model inputs per window (a vision-language model's ``pixel_values``); ``scored`` (``[n,
    seqlen]``, bool) marks the tokens that count as predictions (a vision-language model's text,
    not its image tokens or padding); by default every token after the first.

    ``answers`` (a task with answers): where each window's answer token is ``[n]``, which choice
    it is ``[n]`` and the token of every choice ``[n, k]``; ``accuracy`` is then the share of
    windows where the right choice's token is the likeliest of the choices at that place.
    """
    model.eval()
    device = module_device(model)
    if reference is not None:
        reference.eval()
        ref_device = module_device(reference)
    nll, kl, agree, count, right = 0.0, 0.0, 0, 0, 0
    with Progress(windows.shape[0], desc, "windows") as bar:
        for start in range(0, windows.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            batch = windows[rows].to(device)
            inputs = {name: t[rows] for name, t in (extra or {}).items()}
            # the predictions that count, as [tokens, vocab], and their targets
            pick = (
                (lambda t: t.flatten(0, 1))
                if scored is None
                else (lambda t, m=scored[rows, 1:]: t[m.to(t.device)])
            )
            out = model(input_ids=batch, use_cache=False, **{k: v.to(device) for k, v in inputs.items()})
            if answers is not None:
                at, answer, choices = (t[rows].to(device) for t in answers)
                before = out.logits[torch.arange(len(at), device=device), at - 1]  # predicts the answer
                right += int((before.gather(1, choices).argmax(1) == answer).sum())
            logits, targets = pick(out.logits[:, :-1].float()), pick(batch[:, 1:])
            nll += F.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
            if reference is not None:
                ref_inputs = {k: v.to(ref_device) for k, v in inputs.items()}
                ref = reference(input_ids=batch.to(ref_device), use_cache=False, **ref_inputs).logits[:, :-1]
                ref = pick(ref.float().to(device))
                log_p, log_q = F.log_softmax(ref, dim=-1), F.log_softmax(logits, dim=-1)
                kl += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
                agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
            bar.update(batch.shape[0])
    scores = {"perplexity": math.exp(nll / count)}
    if answers is not None:
        scores["accuracy"] = right / windows.shape[0]
    if reference is not None:
        scores.update(kl=kl / count, top1_agreement=agree / count)
    return scores


def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity"
) -> float:
    """:func:`score_windows`' perplexity alone."""
    return score_windows(model, windows, batch_size, desc)["perplexity"]
