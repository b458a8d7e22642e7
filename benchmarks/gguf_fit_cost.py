"""What fitting a learned grid to GGUF's K-quants costs, against the types that hold it exactly.

For each grid, SmolLM2-135M is quantized once (``--method``, RTN by default: the fit is what is
measured) and exported twice: with GGUF types that hold every code exactly, and with the K-quant
of the grid's width (``--gguf-type``). Perplexity of the simulated output and of each GGUF file
(loaded by transformers' GGUF reader, the same evaluation windows) shows what the fitting adds.
SmolLM2's hidden size, 576, is not whole 256-weight super-blocks, so only the MLP's output
projection (1536 inputs, a quarter of the block weights) takes a K-quant there; the others fall
back to a legacy type as llama.cpp's quantizer does, which holds these grids exactly.

    python benchmarks/gguf_fit_cost.py                  # four grids, 16 windows: about 10 minutes
    python benchmarks/gguf_fit_cost.py --windows 2 --grids W4g32   # a smoke run

Writes ``benchmarks/results/gguf_fit_cost.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from llm_ppl import RESULTS, code_version, cpu_name

# grid -> (quantize flags, exact GGUF types, fitted GGUF types)
GRIDS: dict[str, tuple[list[str], str, str]] = {
    "W4g32": (["--wbits", "4", "--group-size", "32"], "Q4_1", "Q4_1,blk.*.ffn_down=Q4_K"),
    "W3g32-sym": (["--wbits", "3", "--group-size", "32", "--w-symmetric"], "Q4_0", "Q3_K"),
    "W2g32": (["--wbits", "2", "--group-size", "32"], "Q4_1", "Q4_1,blk.*.ffn_down=Q2_K"),
    "W6g32-sym": (["--wbits", "6", "--group-size", "32", "--w-symmetric"], "Q8_0", "Q6_K"),
}


def lrquant(*args: str) -> str:
    """Run the command line tool; its stdout."""
    done = subprocess.run([sys.executable, "-m", "lrquant", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lrquant {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def perplexity(model: Path, windows: int) -> float:
    report = json.loads(lrquant("eval", "--model", str(model), "--eval-windows", str(windows), "--json"))
    return report["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf_fit_cost"))
    parser.add_argument("--name", default="gguf_fit_cost")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    rows = []
    for grid in args.grids:
        flags, exact, fitted = GRIDS[grid]
        out = args.work / f"{args.method}-{grid}"
        if not (out / "lrquant_manifest.json").exists():
            lrquant("quantize", "--model", "smollm2-135m", "--method", args.method, *flags, "--no-eval",
                    "--output", str(out), "--overwrite")  # fmt: skip
        simulated = perplexity(out, args.windows)
        for kind, types in (("exact", exact), ("fitted", fitted)):
            file = args.work / f"{args.method}-{grid}-{kind}.gguf"
            start = time.perf_counter()
            lrquant("export", str(out), "--format", "gguf", "--gguf-type", types, "--output", str(file),
                    "--overwrite")  # fmt: skip
            seconds = time.perf_counter() - start
            ppl = perplexity(file, args.windows)
            rows.append(
                dict(grid=grid, method=args.method, kind=kind, types=types, mib=file.stat().st_size / 2**20,
                     export_s=seconds, simulated=simulated, gguf=ppl, change=ppl / simulated - 1)
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

    lines = [
        f"SmolLM2-135M, {args.method}, perplexity on {args.windows} windows of 512 tokens of "
        f"wikipedia:test; {cpu_name()}; code {code_version()}",
        "",
        "| grid | GGUF types | file MiB | export s | simulated | GGUF (transformers) | change |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['grid']} | `{r['types']}` | {r['mib']:.1f} | {r['export_s']:.1f} | {r['simulated']:.3f} "
            f"| {r['gguf']:.3f} | {100 * r['change']:+.2f}% |"
        )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
