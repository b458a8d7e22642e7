"""One process against several (torchrun, gloo): the same quantization, the wall time of each (not in CI).

Runs ``lrquant quantize`` once in one process with ``--threads`` threads and once under
``torch.distributed.run --nproc-per-node N`` with ``--threads / N`` threads each (the same cores
in all), with the same recipe and global ``batch_size``, then compares the outputs: the share
of integer codes that differ, perplexity and KL on the same windows. Rows are appended to
``results/<name>.jsonl``.

    python benchmarks/processes.py --model smollm2-135m --processes 2 --threads 2 --wbits 4 \\
        --group-size 128 --set batch_size=2 --name processes_fast
"""

from __future__ import annotations

import argparse
import json
import os
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


def run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=2, help="threads in all (each process: threads / processes)"
    )
    parser.add_argument("--method", default="lrquant_plus")
    parser.add_argument("--wbits", default="4")
    parser.add_argument("--abits", default="16")
    parser.add_argument("--group-size", default="128")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--nsamples", default=None)
    parser.add_argument("--eval-windows", default="16")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=["batch_size=2"], metavar="KEY=VALUE"
    )
    parser.add_argument("--name", default="processes")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="procs-"))
    try:
        base = ["quantize", "--model", args.model, "--method", args.method, "--preset", args.preset,
                "--wbits", args.wbits, "--abits", args.abits, "--group-size", args.group_size,
                "--eval-windows", args.eval_windows, "--device", "cpu"]  # fmt: skip
        base += [part for item in args.overrides for part in ("--set", item)]
        base += ["--nsamples", args.nsamples] if args.nsamples else []
        one, many = work / "one", work / "many"
        wall_one = run(["-m", "lrquant", *base, "--output", str(one)], args.threads)
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.processes)]
        wall_many = run(
            [*launcher, "-m", "lrquant", *base, "--output", str(many)], args.threads // args.processes
        )
        reports = [json.loads((folder / "report.json").read_text()) for folder in (one, many)]
        codes = [load_file(folder / "integer_weights.safetensors") for folder in (one, many)]
        keys = [k for k in codes[0] if k.endswith(".codes")]
        differ = sum(int((codes[0][k] != codes[1][k]).sum()) for k in keys) / sum(
            codes[0][k].numel() for k in keys
        )
        row = {
            "model": args.model, "method": args.method,
            "setting": f"W{args.wbits}A{args.abits}g{args.group_size}", "preset": args.preset,
            "overrides": args.overrides, "processes": args.processes, "threads": args.threads,
            "wall_s": [round(wall_one, 1), round(wall_many, 1)],
            "quantize_s": [r["seconds"]["quantize"] for r in reports],
            "perplexity": [r["perplexity"]["quantized"] for r in reports],
            "fp_perplexity": reports[0]["perplexity"]["fp"],
            "kl": [r["fidelity"]["kl"] for r in reports],
            "codes_differ": differ,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        }  # fmt: skip
        print(json.dumps(row))
        append_row(args.name, row)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
