"""Perplexity of a causal LM over token windows, and its fidelity to a full-precision reference."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lrquant.console import Progress
from lrquant.device import module_device
from lrquant.models.streaming import stand_ins

if TYPE_CHECKING:
    from lrquant.models.loading import LoadedModel


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
    tally = _Tally(scored, answers)
    with Progress(windows.shape[0], desc, "windows") as bar:
        for start in range(0, windows.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            batch = windows[rows].to(device)
            inputs = {name: t[rows] for name, t in (extra or {}).items()}
            logits = model(
                input_ids=batch, use_cache=False, **{k: v.to(device) for k, v in inputs.items()}
            ).logits
            ref = None
            if reference is not None:
                ref_inputs = {k: v.to(ref_device) for k, v in inputs.items()}
                ref = reference(input_ids=batch.to(ref_device), use_cache=False, **ref_inputs).logits.to(
                    device
                )
            tally.add(rows, batch, logits, ref)
            bar.update(batch.shape[0])
    return tally.scores(windows.shape[0])


# positions scored at once (:class:`_Tally`)
SCORE_CHUNK = 128


class _Tally:
    """The sums behind :func:`score_windows`' scores, one batch of windows at a time."""

    def __init__(self, scored: torch.Tensor | None = None, answers=None) -> None:
        self.scored, self.answers = scored, answers
        self.nll, self.kl, self.agree, self.count, self.right = 0.0, 0.0, 0, 0, 0
        self.reference = False

    def add(self, rows: slice, batch: torch.Tensor, logits: torch.Tensor, ref: torch.Tensor | None) -> None:
        """Count the windows ``batch`` (rows ``rows`` of all), with the model's ``logits`` and the
        reference's ``ref`` (or None) on the same device."""
        device = logits.device
        if self.answers is not None:
            at, answer, choices = (t[rows].to(device) for t in self.answers)
            before = logits[torch.arange(len(at), device=device), at - 1]  # predicts the answer
            self.right += int((before.gather(1, choices).argmax(1) == answer).sum())
        mask = None if self.scored is None else self.scored[rows, 1:].to(device)
        if ref is not None:
            self.reference = True
        # a few positions at a time: the vocabulary-wide temporaries (float32 copies, log-softmaxes,
        # the KL terms) then stay small beside the logits themselves
        for window in range(batch.shape[0]):
            for start in range(0, batch.shape[1] - 1, SCORE_CHUNK):
                cut = slice(start, min(start + SCORE_CHUNK, batch.shape[1] - 1))
                keep = slice(None) if mask is None else mask[window, cut]
                here = logits[window, cut][keep].float()
                targets = batch[window, cut.start + 1 : cut.stop + 1][keep]
                self.nll += F.cross_entropy(here, targets, reduction="sum").item()
                self.count += targets.numel()
                if ref is not None:
                    theirs = ref[window, cut][keep].float()
                    log_p, log_q = F.log_softmax(theirs, dim=-1), F.log_softmax(here, dim=-1)
                    self.kl += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
                    self.agree += int((theirs.argmax(-1) == here.argmax(-1)).sum())

    def scores(self, windows: int) -> dict[str, float]:
        scores = {"perplexity": math.exp(self.nll / self.count)}
        if self.answers is not None:
            scores["accuracy"] = self.right / windows
        if self.reference:
            scores.update(kl=self.kl / self.count, top1_agreement=self.agree / self.count)
        return scores


@torch.no_grad()
def score_streamed(
    model: LoadedModel,
    windows: torch.Tensor,
    batch_size: int = 1,
    desc: str = "perplexity",
    reference: LoadedModel | None = None,
) -> dict[str, float]:
    """:func:`score_windows` for streamed models (:mod:`lrquant.models.streaming`): all windows
    go through one block at a time, each block loaded for its turn (the reference's chain
    beside the model's), then through what follows the blocks; the same numbers as
    :func:`score_windows` on the fully loaded models, in memory for one block and the windows'
    hidden states. With a ``reference``, also its own ``reference_perplexity``."""
    chains = [model] + ([reference] if reference is not None else [])
    with Progress(len(model.stream) * len(chains), desc, "blocks") as bar:
        hidden = [_through_blocks(loaded, windows, batch_size, bar) for loaded in chains]
    for loaded in chains:  # the heads, left on disk while the blocks ran
        loaded.stream.load_lazy()
    tally, own = _Tally(), _Tally()  # own: the reference's perplexity
    for start in range(0, windows.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        logits = [
            _after_blocks(loaded, windows[rows], h[rows]) for loaded, h in zip(chains, hidden, strict=True)
        ]
        tally.add(rows, windows[rows], logits[0], logits[1] if reference is not None else None)
        if reference is not None:
            own.add(rows, windows[rows], logits[1], None)
    scores = tally.scores(windows.shape[0])
    if reference is not None:
        scores["reference_perplexity"] = own.scores(windows.shape[0])["perplexity"]
    return scores


def _through_blocks(loaded: LoadedModel, windows: torch.Tensor, batch_size: int, bar) -> torch.Tensor:
    """The last block's outputs ``[n, seqlen, hidden]`` of a streamed model on ``windows``."""
    from lrquant.methods.capture import capture_block_inputs, capture_block_kwargs, run_block

    model, arch, stream = loaded.model, loaded.arch, loaded.stream
    kwargs, _ = capture_block_kwargs(model, arch, windows[0])
    hidden = capture_block_inputs(model, arch, windows)
    for index in range(len(stream)):
        hidden = run_block(stream.load(index), hidden, kwargs[index], batch_size)
        stream.release(index)
        bar.update(1)
    return hidden


def _after_blocks(loaded: LoadedModel, batch: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model's own forward computes on ``batch`` when its last block gives ``hidden``."""
    with stand_ins(loaded.model, loaded.arch, output=hidden):
        return loaded.model(input_ids=batch, use_cache=False).logits


def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity"
) -> float:
    """:func:`score_windows`' perplexity alone."""
    return score_windows(model, windows, batch_size, desc)["perplexity"]
