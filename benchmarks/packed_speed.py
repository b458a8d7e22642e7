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

With ``--llama-cpp DIR`` (default: the environment's ``LLAMA_CPP_BIN``), DIR holding llama.cpp's
``llama-bench``, the same random model is also written as GGUF files by lrquant's own writer
(:func:`lrquant.export.gguf.write_gguf`, into ``--work``) and measured by llama.cpp: BF16, Q4_0
and Q8_0 by default (``--llama-types``; also F16, and Q4_K, whose fitting takes about half a minute
a layer on the 1.1B shape). Q4_0 and Q4_K hold the block linears
rounded to nearest on lrquant's 4-bit symmetric grid with groups of 32, Q8_0 on the 8-bit one
(code for code in Q4_0 and Q8_0, fitted in Q4_K); BF16 and F16 hold that 8-bit grid's weights
dequantized (the writer stores quantized linears; any weights run at the same speed). The
embedding, the norms and the LM head stay as the PyTorch model has them (BF16 matrices, F32
norms). Prefill is ``llama-bench -p PROMPT -n 0``, decode ``-p 0 -n NEW -d PROMPT`` (the new
tokens after a context of the prompt's length, as in PyTorch, the depth filled before the
clock starts), both with ``-t THREADS -r 3`` (the mean over 3 timed runs after a warm-up) and
llama.cpp's defaults otherwise (memory-mapped file, weights repacked for the CPU). Its prefill
computes the logits of the last prompt token only, PyTorch's those of every one (the LM head is
about 6% of the 1.1B shape's multiply-adds). Peak RSS is
GNU time's ``%M`` (the process's ``ru_maxrss``) of each llama-bench process, the larger of the
two; it counts the file pages the process maps, as well as the KV cache and compute buffers.

On a machine other jobs share, give ``--threads 1``: with every core's worth of threads, each
operator waits at its end for a thread that another process has taken the core from, and batch-1
decode (hundreds of small operators per token) slows down several times (4x on the 1.1B shape
with two threads on a two-core machine, beside other jobs; 100x on the smoke config). llama.cpp's
threads wait for each other the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from llm_ppl import RESULTS, code_version, cpu_name
from transformers import LlamaConfig, LlamaForCausalLM

from lrquant.config import QuantSpec, build_scheme
from lrquant.export import IntegerLinear, QuantizedOutput
from lrquant.export.gguf import write_gguf
from lrquant.models.tiny import tiny_tokenizer
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
        "engine": "PyTorch",
        "variant": name,
        "prefill_tok_s": prompt.shape[1] / prefill,
        "decode_tok_s": new_tokens / decode,
        "weights_mib": weights / 2**20,
        "peak_rss_mib": memory_kib("VmHWM") / 1024,
    }
    del model
    gc.collect()
    return row


# GGUF type -> the bits of lrquant's symmetric grid (groups of 32) the block linears are rounded to
LLAMA_TYPES = {"BF16": 8, "F16": 8, "Q8_0": 8, "Q4_0": 4, "Q4_K": 4}
LLAMA_GROUP = 32
LLAMA_REPETITIONS = 3
GNU_TIME = Path("/usr/bin/time")
NO_LLAMA_CPP = (
    "llama.cpp rows skipped: pass --llama-cpp DIR or set LLAMA_CPP_BIN, DIR holding llama.cpp's "
    "llama-bench (cmake -S llama.cpp -B build -DLLAMA_CURL=OFF && cmake --build build --target "
    "llama-bench; DIR is build/bin)"
)


def find_llama_bench(bin_dir: str | None) -> Path | None:
    """``llama-bench`` in ``bin_dir``; None when no folder is given, exit when it is not there."""
    if not bin_dir:
        return None
    bench = Path(bin_dir) / "llama-bench"
    if not bench.is_file():
        sys.exit(f"no llama-bench in {bin_dir}")
    if not GNU_TIME.is_file():
        sys.exit(f"the llama.cpp rows measure peak RSS with GNU time, and {GNU_TIME} is missing")
    return bench.resolve()


def gguf_folder(config: LlamaConfig, work: Path) -> Path:
    """A folder with what the GGUF writer reads besides the weights: config.json and lrquant's
    tiny tokenizer (512 tokens; the writer pads the vocabulary with unused ones)."""
    folder = work / "model"
    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save_pretrained(folder)
    config.to_json_file(folder / "config.json")
    return folder


def quantized_output(model: nn.Module, folder: Path, bits: int) -> QuantizedOutput:
    """The model as the GGUF writer takes it: block linears rounded to nearest on the symmetric
    ``bits``-bit grid with groups of 32, every other tensor as it is (by its HF name)."""
    scheme = build_scheme(bits, group_size=LLAMA_GROUP, w_symmetric=True)
    layers = model.model.layers
    linears: dict[str, IntegerLinear] = {
        f"model.layers.{name}": round_to_nearest(module.weight.float(), scheme.weight)
        for name, module in layers.named_modules()
        if isinstance(module, nn.Linear)
    }
    weights = {f"{name}.weight" for name in linears}
    tensors = {key: t for key, t in model.state_dict().items() if key not in weights}
    return QuantizedOutput(folder, model.config.to_dict(), scheme, linears, tensors, "rtn")


def write_gguf_files(config: LlamaConfig, types: list[str], work: Path, stem: str) -> dict[str, Path]:
    """One GGUF file of the seeded random model per type, in ``work``: the model is built once and
    its linears rounded once per grid; an F16 file has its embedding and head in F16 too."""
    folder = gguf_folder(config, work)
    model = build(config, None)
    files = {}
    for bits in sorted({LLAMA_TYPES[t] for t in types}):
        output = quantized_output(model, folder, bits)
        for qtype in [t for t in types if LLAMA_TYPES[t] == bits]:
            files[qtype] = work / f"{stem}-{qtype}.gguf"
            rules = "F16,token_embd=F16,output=F16" if qtype == "F16" else qtype
            write_gguf(output, files[qtype], gguf_type=rules)
        del output
    del model
    gc.collect()
    return {qtype: files[qtype] for qtype in types}


def llama_bench(bench: Path, model: Path, threads: int, *test: str) -> tuple[dict, int]:
    """llama-bench's JSON result for its one ``test`` on ``model``, and the peak RSS of its
    process in KiB (GNU time's ``%M``)."""
    rss = model.with_suffix(".rss")
    command = [
        *(str(GNU_TIME), "-f", "%M", "-o", str(rss)),
        *(str(bench), "-m", str(model), "-t", str(threads)),
        *("-r", str(LLAMA_REPETITIONS), "-o", "json", *test),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    [result] = json.loads(out.stdout)
    peak = int(rss.read_text().split()[-1])
    rss.unlink()
    return result, peak


def measure_gguf(bench: Path, qtype: str, path: Path, prompt: int, new_tokens: int, threads: int) -> dict:
    """The prefill of ``prompt`` tokens, then ``new_tokens`` decode steps after a context of
    ``prompt`` tokens, by llama-bench (two runs: the larger peak RSS of the two)."""
    prefill, prefill_kib = llama_bench(bench, path, threads, "-p", str(prompt), "-n", "0")
    after_prompt = ("-p", "0", "-n", str(new_tokens), "-d", str(prompt))
    decode, decode_kib = llama_bench(bench, path, threads, *after_prompt)
    return {
        "engine": "llama.cpp",
        "variant": qtype,
        "prefill_tok_s": prefill["avg_ts"],
        "prefill_tok_s_stddev": prefill["stddev_ts"],
        "decode_tok_s": decode["avg_ts"],
        "decode_tok_s_stddev": decode["stddev_ts"],
        "weights_mib": decode["model_size"] / 2**20,
        "file_mib": path.stat().st_size / 2**20,
        "peak_rss_mib": max(prefill_kib, decode_kib) / 1024,
        "llama_cpp_build": f"{decode['build_number']} ({decode['build_commit']})",
    }


def llama_cpp_rows(bench: Path, config: LlamaConfig, args: argparse.Namespace, stem: str) -> list[dict]:
    """The llama.cpp rows: GGUF files written into ``args.work``, measured one after another,
    then deleted (with the tokenizer folder) unless ``args.keep_gguf``."""
    work = Path(args.work)
    files = write_gguf_files(config, args.llama_types, work, stem)
    rows = []
    for qtype, path in files.items():
        rows.append(measure_gguf(bench, qtype, path, args.prompt, args.new_tokens, args.threads))
        print(f"llama.cpp {qtype}: {rows[-1]}", flush=True)
    if not args.keep_gguf:
        for path in files.values():
            path.unlink()
        shutil.rmtree(work / "model")
    return rows


def table(rows: list[dict]) -> str:
    """The rows as markdown, decode speed also relative to the first row (PyTorch bf16)."""
    base = rows[0]
    lines = [
        "| engine | variant | prefill tok/s | decode tok/s | decode vs PyTorch bf16 | weights MiB "
        "| GGUF MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        file_mib = "" if r.get("file_mib") is None else f"{r['file_mib']:.0f}"
        lines.append(
            f"| {r['engine']} | {r['variant']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['weights_mib']:.0f} | {file_mib} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny config, in seconds (for the tests)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy decode steps")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch and llama.cpp threads"
    )
    parser.add_argument(
        "--llama-cpp",
        default=os.environ.get("LLAMA_CPP_BIN"),
        metavar="DIR",
        help="folder holding llama.cpp's llama-bench (default: $LLAMA_CPP_BIN), no llama.cpp rows without it",
    )
    parser.add_argument(
        "--llama-types",
        type=lambda text: text.split(","),
        default="BF16,Q4_0,Q8_0",
        help=f"GGUF types for llama.cpp, comma-separated, of {', '.join(LLAMA_TYPES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--work", default="/tmp/packed_speed", help="folder for the GGUF files (default: /tmp/packed_speed)"
    )
    parser.add_argument("--keep-gguf", action="store_true", help="keep the GGUF files in --work")
    args = parser.parse_args()
    unknown = [t for t in args.llama_types if t not in LLAMA_TYPES]
    if unknown:
        parser.error(f"--llama-types: unknown {', '.join(unknown)}; choose from {', '.join(LLAMA_TYPES)}")
    if args.smoke:
        args.prompt, args.new_tokens = 32, 4
    return args


def main() -> None:
    args = parse_args()
    bench = find_llama_bench(args.llama_cpp)
    torch.set_num_threads(args.threads)
    shape = SMOKE if args.smoke else TINYLLAMA
    config = LlamaConfig(**shape)
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in VARIANTS:
        rows.append(measure(name, config, prompt, args.new_tokens))
        print(f"{name}: {rows[-1]}", flush=True)
    if bench is None:
        print(NO_LLAMA_CPP)
    else:
        rows += llama_cpp_rows(bench, config, args, "smoke" if args.smoke else "tinyllama")
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
