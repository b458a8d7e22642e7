"""A streamed run against the in-memory one: the same output, the time and memory of each (not in CI).

Runs ``lrquant quantize`` on a model twice, ``--stream off`` then ``--stream on``, with the same
settings (the default recipe unless ``--method``), without evaluation, and compares every tensor
of the two outputs (weights, integer codes, rotations). Rows are appended to
``results/<name>.jsonl``: wall and quantization seconds, peak resident memory, the end-to-end
step's KL per epoch, the number of tensors that differ and the largest difference.

    python benchmarks/stream_equal.py --model smollm2-135m --wbits 2 --group-size 64 --name stream_equal
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from llm_ppl import append_row
from safetensors.torch import load_file


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder by kind (model shards as one, integer codes as one) and name."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        kind = next((k for k in ("model", "integer_weights") if file.name.startswith(k)), file.name)
        out.update({f"{kind}:{key}": t for key, t in load_file(file).items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--wbits", default="4")
    parser.add_argument("--abits", default="16")
    parser.add_argument("--group-size", default=None)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--nsamples", default=None)
    parser.add_argument("--seqlen", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="stream_equal")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stream-equal-"))
    try:
        base = ["-m", "lrquant", "quantize", "--model", args.model, "--method", args.method,
                "--preset", args.preset, "--wbits", args.wbits, "--abits", args.abits, "--no-eval",
                "--device", "cpu"]  # fmt: skip
        base += ["--group-size", args.group_size] if args.group_size else []
        base += ["--nsamples", args.nsamples] if args.nsamples else []
        base += ["--seqlen", args.seqlen] if args.seqlen else []
        base += [part for item in args.overrides for part in ("--set", item)]
        walls, reports = [], []
        for stream in ("off", "on"):
            out = work / stream
            start = time.perf_counter()
            done = subprocess.run([sys.executable, *base, "--stream", stream, "--output", str(out)],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            walls.append(round(time.perf_counter() - start, 1))
            reports.append(json.loads((out / "report.json").read_text()))
        memory, streamed = tensors(work / "off"), tensors(work / "on")
        if set(memory) != set(streamed):
            raise SystemExit(f"the outputs hold different tensors: {sorted(set(memory) ^ set(streamed))[:5]}")
        differ = [k for k in memory if not torch.equal(memory[k], streamed[k])]
        largest = max(
            ((memory[k].double() - streamed[k].double()).abs().max().item() for k in differ), default=0.0
        )
        setting = f"W{args.wbits}A{args.abits}" + (f"g{args.group_size}" if args.group_size else "")
        row = {
            "model": args.model, "method": args.method, "setting": setting, "preset": args.preset,
            "overrides": args.overrides, "wall_s": walls,
            "quantize_s": [r["seconds"]["quantize"] for r in reports],
            "peak_rss_mb": [r["peak_rss_mb"] for r in reports],
            "e2e_kl": [r["blocks"][-1].get("e2e_kl") if r["blocks"] else None for r in reports],
            "streamed": [r["model"]["streamed"] for r in reports],
            "tensors": len(memory), "tensors_differ": len(differ), "largest_difference": largest,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        append_row(args.name, row)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
