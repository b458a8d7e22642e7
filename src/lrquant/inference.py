"""Running a quantized output: on real low-bit CPU kernels or simulated, and generating text.

``fake`` computes as the run evaluated (fake-quantized linears: exact, for research);
``packed`` replaces the quantized linears with real int4 / int8 kernels
(:mod:`lrquant.quant.packed`); ``auto`` packs where a kernel exists and simulates otherwise.
"""

from __future__ import annotations

import time

import torch

from lrquant.console import log
from lrquant.errors import LrquantError
from lrquant.models.loading import LoadedModel
from lrquant.quant.packed import pack_linears

BACKENDS = ("auto", "packed", "fake")


def apply_backend(loaded: LoadedModel, backend: str, device: torch.device) -> str:
    """Put ``loaded``'s quantized linears on ``backend``; returns the backend used (``auto``
    resolves to ``packed`` or ``fake``). A model that is not a quantized output runs as it is."""
    from lrquant.export import read_output

    if backend not in BACKENDS:
        raise LrquantError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    if loaded.scheme is None:
        if backend == "packed":
            raise LrquantError(
                f"'{loaded.name}' is not a quantized output: --backend packed has nothing to pack"
            )
        return "dense"
    if backend == "fake":
        return "fake"
    if device.type != "cpu":
        if backend == "auto":
            return "fake"
        raise LrquantError("the packed kernels run on the CPU: use --device cpu, or --backend fake")
    try:
        count = pack_linears(loaded.model, read_output(loaded.path), "packed")
    except LrquantError as err:
        if backend == "packed":
            raise
        log(f"running simulated: {err}")
        return "fake"
    log(f"{count} linears on packed CPU kernels")
    return "packed"


class _TimedStreamer:
    """Prints the decoded text as tokens arrive and records when each came (the prompt first)."""

    def __init__(self, tokenizer, echo: bool) -> None:
        from transformers import TextStreamer

        self.text = TextStreamer(tokenizer, skip_prompt=True) if echo else None
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if self.text is not None:
            self.text.put(value)

    def end(self) -> None:
        if self.text is not None:
            self.text.end()


@torch.no_grad()
def generate_text(loaded: LoadedModel, prompt: str, max_new_tokens: int, echo: bool = True) -> dict:
    """Greedy continuation of ``prompt`` (streamed to stdout when ``echo``), with the prefill and
    decode speeds in tokens per second."""
    if loaded.arch.modality != "text":
        raise LrquantError(f"'{loaded.name}' is a vision model: generate is for language models")
    if max_new_tokens < 1:
        raise LrquantError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if not prompt.strip():
        raise LrquantError("the prompt is empty: give some text to continue")
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    streamer = _TimedStreamer(loaded.tokenizer, echo)
    start = time.perf_counter()
    out = loaded.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=loaded.tokenizer.eos_token_id,
    )
    new = out[0, ids.shape[1] :]
    # put() gets the prompt, then each new token: the first new token ends the prefill
    first = streamer.times[1] if len(streamer.times) > 1 else time.perf_counter()
    decode_steps = max(len(streamer.times) - 2, 0)
    decode_seconds = streamer.times[-1] - first if decode_steps else 0.0
    return {
        "text": loaded.tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": ids.shape[1],
        "new_tokens": int(new.numel()),
        "prefill_tokens_per_s": round(ids.shape[1] / (first - start), 2),
        "decode_tokens_per_s": round(decode_steps / decode_seconds, 2) if decode_steps else None,
    }
