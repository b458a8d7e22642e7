"""Models larger than memory: LLaMA-shaped bfloat16 checkpoints quantized streamed (not in CI).

Writes a checkpoint of the shape of Llama 3.2 1B or 3B or Llama 3.1 8B or 70B (``--shape``; cut to
``--blocks`` blocks when given) with seeded random bfloat16 weights, one tensor at a time, then
runs ``lrquant quantize --stream on`` with each method in a fresh process (``--no-eval`` unless
``--eval``) and records its seconds, seconds per block, peak resident memory (``VmHWM``), the
peak of its anonymous memory (``RssAnon`` sampled every 50 ms: resident memory less the pages
of mapped files, which the system can write back and drop), where the calibration activations
lived (``--max-memory``, ``--set chain_dtype=...``), the bytes it wrote and the most disk it took
at once beyond the checkpoint (resume store and output; the file system's used bytes sampled
every half second, so run nothing else that writes to it). The tokenizer is
lrquant's tiny test tokenizer (512 ids, inside any vocabulary); calibration is ``--nsamples``
windows of ``--seqlen`` tokens of the built-in Wikipedia text.
Random weights: the figures say what a run costs on this machine, not how well it quantizes.
Rows are appended to ``results/<name>.jsonl``.

    python benchmarks/stream_scale.py --shape 1b --methods rtn gptq --nsamples 8 --name stream_1b
    python benchmarks/stream_scale.py --shape 8b --blocks 2 --methods rtn gptq --name stream_8b
    python benchmarks/stream_scale.py --shape 1b --blocks 2 --methods gptq --nsamples 16 --seqlen 2048 \
        --max-memory 64MiB --set chain_dtype=bfloat16 --name activations_1b
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import torch
from llm_ppl import append_row
from safetensors.torch import save_file

SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),  # for a smoke run
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}  # fmt: skip
METHODS = {"rtn": ("rtn", []), "gptq": ("gptq", []), "lrquant_plus": ("lrquant_plus", [])}

RUN = """
import json, sys, threading, time
from lrquant import api
from lrquant.config import build_scheme
args = json.loads(sys.argv[1])
anon = [0]  # the peak of anonymous memory (what cannot be paged out to a file), sampled


def sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                anon[0] = max(anon[0], int(line.split()[1]) // 1024)
        time.sleep(0.05)


threading.Thread(target=sample, daemon=True).start()
data = api.DataSettings(nsamples=args["nsamples"], seqlen=args["seqlen"], eval_windows=args["eval_windows"])
report = api.quantize(args["model"], args["out"], build_scheme(**args["scheme"]), args["method"],
                      args["preset"], args["overrides"], data, run_eval=args["eval"], stream=True,
                      max_memory=args["max_memory"], device=args["device"])
print("ROW " + json.dumps({"seconds": report["seconds"], "peak_rss_mb": report["peak_rss_mb"],
      "peak_anon_mb": anon[0], "activations": report.get("activations"),
      "blocks": [b.get("seconds") for b in report["blocks"]], "perplexity": report.get("perplexity"),
      "fidelity": report.get("fidelity"), "estimate": report["estimate"],
      "peak_gpu_mb": report.get("peak_gpu_mb"), "device": report.get("device")}))
"""


def write_checkpoint(folder: Path, config: dict, seed: int = 0) -> int:
    """A LLaMA checkpoint of ``config`` with random bfloat16 weights (normal, std 0.02; norms 1),
    one shard per block and one for the rest; returns its bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lrquant.models.tiny import tiny_tokenizer

    folder.mkdir(parents=True)
    llama = LlamaConfig(**config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(llama, dtype=torch.bfloat16)
    shapes = {
        k: tuple(v.shape)
        for k, v in skeleton.state_dict().items()
        if k != "lm_head.weight" or not llama.tie_word_embeddings
    }
    groups: dict[str, list[str]] = {}
    for key in shapes:
        parts = key.split(".")
        groups.setdefault(f"layers.{parts[2]}" if parts[1:2] == ["layers"] else "rest", []).append(key)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups.values()):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key in keys:
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shapes[key], dtype=torch.bfloat16)
            else:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
                tensors[key] = (torch.randn(shapes[key], generator=generator) * 0.02).to(torch.bfloat16)
        save_file(tensors, folder / shard, {"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, shard))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    llama.dtype = "bfloat16"
    llama.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return total


class DiskPeak:
    """The most bytes the file system holding ``folder`` gained over its use at entry, sampled
    every half second while the ``with`` block runs (``peak``)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak, self._stop = folder, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, shutil.disk_usage(self.folder).used - self.start)

    def __enter__(self) -> DiskPeak:
        self.start = shutil.disk_usage(self.folder).used
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--blocks", type=int, default=None, help="cut the model to this many blocks")
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=METHODS)
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval", action="store_true", help="also evaluate (block by block, 4 windows)")
    parser.add_argument(
        "--max-memory", default=None, help="memory the calibration activations may take (lrquant's flag)"
    )
    parser.add_argument(
        "--workdir", default=None, help="where the checkpoint and outputs go (default: a temp dir)"
    )
    parser.add_argument("--device", default="cpu", help="where blocks learn: cpu or cuda")
    parser.add_argument("--name", default="stream_scale")
    args = parser.parse_args()

    from lrquant.methods.activations import parse_size
    from lrquant.recipes import parse_overrides

    config = {**SHAPES[args.shape], "vocab_size": 128256, "max_position_embeddings": 8192,
              "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    if args.blocks:
        config["num_hidden_layers"] = args.blocks
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stream-"))
    model = work / f"llama-{args.shape}-{config['num_hidden_layers']}"
    try:
        start = time.perf_counter()
        size = write_checkpoint(model, config)
        print(
            f"wrote {model} ({size / 2**30:.2f} GiB bf16) in {time.perf_counter() - start:.0f} s", flush=True
        )
        for name in args.methods:
            method, extra = METHODS[name]
            out = work / f"out-{name}"
            job = {
                "model": str(model), "out": str(out), "method": method, "preset": args.preset,
                "scheme": {"wbits": args.wbits, "abits": args.abits, "group_size": args.group_size},
                "overrides": parse_overrides([*extra, *args.overrides]) or None, "nsamples": args.nsamples,
                "seqlen": args.seqlen, "eval": args.eval, "eval_windows": 4,
                "max_memory": None if args.max_memory is None else parse_size(args.max_memory),
                "device": args.device,
            }  # fmt: skip
            with DiskPeak(work) as disk:
                done = subprocess.run(
                    [sys.executable, "-c", RUN, json.dumps(job)], capture_output=True, text=True
                )
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("ROW "))[4:])
            written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            blocks = [s for s in row["blocks"] if s is not None]
            result = {
                "shape": args.shape, "blocks": config["num_hidden_layers"], "method": name,
                "scheme": job["scheme"], "preset": args.preset, "overrides": job["overrides"],
                "nsamples": args.nsamples, "seqlen": args.seqlen, "checkpoint_bytes": size,
                "output_bytes": written, "peak_disk_bytes": disk.peak, "peak_rss_mb": row["peak_rss_mb"],
                "peak_anon_mb": row["peak_anon_mb"], "activations": row["activations"],
                "max_memory": args.max_memory, "seconds": row["seconds"],
                "seconds_per_block": round(row["seconds"]["quantize"] / config["num_hidden_layers"], 2),
                "learned_block_seconds": blocks, "perplexity": row["perplexity"], "fidelity": row["fidelity"],
                "estimate": row["estimate"], "device": args.device, "peak_gpu_mb": row["peak_gpu_mb"],
                "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            }  # fmt: skip
            print(json.dumps(result), flush=True)
            append_row(args.name, result)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
