"""Ablation of LRQuant+ on a real LLM: each ingredient removed in turn (not part of CI).

Every variant is one ``benchmarks/llm_ppl.py`` run of ``lrquant_plus`` with one ``--set``
override, so rows resume like the main table (``benchmarks/results/<name>.jsonl``). The full
recipe's row is taken from ``--baseline`` (the main table's rows) when it has one, else run here.

    python benchmarks/ablation.py --settings W4A4 W2A16g64 --preset fast --baseline table_fast

Writes ``benchmarks/results/<name>.md`` and prints it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from llm_ppl import RESULTS, cell, find_row, load_rows

HERE = Path(__file__).parent

# Label, override. Shifts are not listed: on RMSNorm models (SmolLM2) they are off already.
VARIANTS: list[tuple[str, str | None]] = [
    ("LRQuant+ (everything)", None),
    ("no rotation vectors", "rotation=false"),
    ("no homologous branch", "homologous=false"),
    ("no NLC loss (MSE only)", "nlc=false"),
    ("no dynamic weighting", "dynamic_weighting=false"),
    ("no weight clipping", "clipping=false"),
    ("no smoothing scales", "smoothing=none"),
    ("smoothing starts at 1 (no LAE init)", "smoothing=ones"),
    ("no q/k smoothing", "qk_smoothing=false"),
]


def _job(args: argparse.Namespace, setting: str, override: str | None) -> dict:
    """The llm_ppl.py job of one variant, as its rows record it."""
    return dict(
        model=args.model,
        method="lrquant_plus",
        setting=setting,
        preset=args.preset,
        overrides=[override] if override else [],
        seqlen=args.seqlen,
        windows=args.windows,
        seed=args.seed,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--settings", nargs="+", default=["W4A4", "W2A16g64"])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", default="table_fast", help="results holding the full recipe's rows")
    parser.add_argument("--name", default="ablation_fast")
    args = parser.parse_args()

    table: dict[tuple[str, str], dict] = {}
    for setting in args.settings:
        for label, override in VARIANTS:
            job = _job(args, setting, override)
            row = find_row(load_rows(args.baseline), job) if override is None else None
            if row is None:
                command = [sys.executable, str(HERE / "llm_ppl.py"), "--model", args.model]
                command += ["--methods", "lrquant_plus", "--settings", setting, "--preset", args.preset]
                command += ["--name", args.name, "--seqlen", str(args.seqlen)]
                command += ["--windows", str(args.windows), "--seed", str(args.seed)]
                command += ["--set", override] if override else []
                if subprocess.run(command, check=False).returncode != 0:
                    sys.exit(f"ablation run failed: {setting} {label}")
                row = find_row(load_rows(args.name), job)
                assert row is not None
            table[label, setting] = row

    matmuls = sorted({str(row.get("matmuls", "not recorded")) for row in table.values()})
    lines = [
        f"LRQuant+ on `{args.model}`, preset `{args.preset}`, seed {args.seed}; perplexity on "
        f"`wikipedia:test`, {args.windows} windows x {args.seqlen} tokens (lower is better); "
        f"quantization seconds in brackets; block training matmuls: {', '.join(matmuls)}.",
        "",
        "| variant | " + " | ".join(args.settings) + " |",
        "|---|" + "---:|" * len(args.settings),
    ]
    for label, _ in VARIANTS:
        cells = " | ".join(cell(table[label, s]) for s in args.settings)
        lines.append(f"| {label} | {cells} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
