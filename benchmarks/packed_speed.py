"""Tokens per second and peak memory of packed low-bit linears against bf16, batch 1, on CPU.

A LLaMA-shaped model with random weights (TinyLlama-1.1B's shape by default) is built from its
config; its block linears are rounded to nearest in memory (W4 with groups of 128; symmetric W8
per channel with 8-bit asymmetric per-token inputs) and packed (the modules
:func:`lrquant.quant.packed.pack_linears` uses); the LM head stays dense. Each variant is built
afresh in this one process, one after another, and measured the same way: a prefill of
``--prompt`` tokens, then ``--new-tokens`` greedy decode steps with the KV cache. Peak RSS is
the high-water mark from the start of the timed part (the kernel's count is reset there, so
building the model does not count).

    python benchmarks/packed_speed.py             # the 1.1B-shaped model: several minutes
    python benchmarks/packed_speed.py --smoke     # a tiny config, in seconds

On a machine other jobs share, give ``--threads 1``: with every core's worth of threads, each
operator waits at its end for a thread that another process has taken the core from, and batch-1
decode (hundreds of small operators per token) slows down several times (4x on the 1.1B shape
with two threads on a two-core machine, beside other jobs; 100x on the smoke config).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from llm_ppl import RESULTS, code_version, cpu_name
from transformers import LlamaConfig, LlamaForCausalLM

from lrquant.config import QuantSpec
from lrquant.quant.apply import replace_module
from lrquant.quant.packed import Int4WeightLinear, Int8Linear, round_to_nearest

TINYLLAMA = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
SMOKE = {**TINYLLAMA, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 512}
W4 = QuantSpec(bits=4, granularity="group", group_size=128)
W8 = QuantSpec(bits=8, symmetric=True)
A8 = QuantSpec(bits=8, granularity="token")  # lrquant's default: asymmetric per token


def int4(linear: nn.Linear) -> nn.Module:
    return Int4WeightLinear(round_to_nearest(linear.weight.float(), W4, linear.bias))


def int8(linear: nn.Linear) -> nn.Module:
    return Int8Linear(round_to_nearest(linear.weight.float(), W8, linear.bias), A8)


# name -> how each block linear is replaced (None: kept dense). The models run in bfloat16: the int4
# kernel's float32 path is about 70x slower (41 ms against 0.6 ms for one token through a
# 2048 -> 5632 linear, one thread), so a float32 model is no contender.
VARIANTS: dict[str, Callable[[nn.Linear], nn.Module] | None] = {
    "bf16 dense": None,
    "W4A16 g128": int4,
    "W8A8": int8,
}


def build(config: LlamaConfig, pack: Callable[[nn.Linear], nn.Module] | None) -> nn.Module:
    """The random-weight model (the same weights for every variant: seeded), its block linears
    replaced one at a time so the dense copies are freed as it goes."""
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    layers = model.model.layers
    if pack is not None:
        for name in [n for n, m in layers.named_modules() if isinstance(m, nn.Linear)]:
            replace_module(layers, name, pack(layers.get_submodule(name)))
    return model


def parameters(config: LlamaConfig) -> int:
    """How many parameters the model has (counted on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def memory_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of this process, in KiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Restart the kernel's peak-RSS count from the current RSS (Linux: /proc/self/clear_refs),
    after handing back to the system the memory that building the model freed (glibc keeps freed
    heap pages resident until trimmed)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@torch.inference_mode()
def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill and of ``new_tokens`` greedy decode steps after it."""
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    prefill = time.perf_counter() - start
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, time.perf_counter() - start


def measure(name: str, config: LlamaConfig, prompt: torch.Tensor, new_tokens: int) -> dict:
    model = build(config, VARIANTS[name])
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    generate(model, prompt[:, :16], 4)  # warm-up: the kernels' first calls pack and allocate
    reset_peak()
    prefill, decode = generate(model, prompt, new_tokens)
    row = {
        "variant": name,
        "prefill_tok_s": prompt.shape[1] / prefill,
        "decode_tok_s": new_tokens / decode,
        "weights_mib": weights / 2**20,
        "peak_rss_mib": memory_kib("VmHWM") / 1024,
    }
    del model
    gc.collect()
    return row


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| variant | prefill tok/s | decode tok/s | decode vs bf16 | weights MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['weights_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny config, in seconds (for the tests)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy decode steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    if args.smoke:
        args.prompt, args.new_tokens = 32, 4
    torch.set_num_threads(args.threads)
    shape = SMOKE if args.smoke else TINYLLAMA
    config = LlamaConfig(**shape)
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in VARIANTS:
        rows.append(measure(name, config, prompt, args.new_tokens))
        print(f"{name}: {rows[-1]}", flush=True)
    print(table(rows))
    result = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": args.threads,
        "code": code_version(),
        "config": shape,
        "parameters": parameters(config),
        "prompt_tokens": args.prompt,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("packed_speed_smoke.json" if args.smoke else "packed_speed.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
