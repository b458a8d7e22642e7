"""Ablation of LRQuant+ on a real LLM: each ingredient removed in turn (not part of CI).

Every variant is one ``benchmarks/llm_ppl.py`` run of ``lrquant_plus`` with one ``--set``
override, so rows resume like the main table (``benchmarks/results/<name>.jsonl``). The full
recipe's row is taken from ``--baseline`` (the main table's rows) when it has one, else run here.

    python benchmarks/ablation.py --settings W4A4 W2A16g64 --preset fast --baseline table_fast

Writes ``benchmarks/results/<name>.md`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"

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


def _rows(name: str) -> list[dict]:
    path = RESULTS / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _find(rows: list[dict], setting: str, override: str | None, args: argparse.Namespace) -> dict | None:
    overrides = [override] if override else []
    for row in rows:
        if (
            row["method"] == "lrquant_plus"
            and row["setting"] == setting
            and row["overrides"] == overrides
            and row["preset"] == args.preset
            and row["seed"] == args.seed
            and row["windows"] == args.windows
        ):
            return row
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["W4A4", "W2A16g64"])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", default="table_fast", help="results holding the full recipe's rows")
    parser.add_argument("--name", default="ablation_fast")
    args = parser.parse_args()

    table: dict[tuple[str, str], dict] = {}
    for setting in args.settings:
        for label, override in VARIANTS:
            row = _find(_rows(args.baseline), setting, override, args) if override is None else None
            if row is None:
                command = [sys.executable, str(HERE / "llm_ppl.py"), "--methods", "lrquant_plus"]
                command += ["--settings", setting, "--preset", args.preset, "--name", args.name]
                command += ["--windows", str(args.windows), "--seed", str(args.seed)]
                command += ["--set", override] if override else []
                if subprocess.run(command, check=False).returncode != 0:
                    sys.exit(f"ablation run failed: {setting} {label}")
                row = _find(_rows(args.name), setting, override, args)
                assert row is not None
            table[label, setting] = row

    lines = [
        f"LRQuant+ on `smollm2-135m`, preset `{args.preset}`, seed {args.seed}; perplexity on "
        f"`wikipedia:test`, {args.windows} windows x 512 tokens (lower is better); "
        "quantization seconds in brackets.",
        "",
        "| variant | " + " | ".join(args.settings) + " |",
        "|---|" + "---:|" * len(args.settings),
    ]
    for label, _ in VARIANTS:
        cells = [table[label, s] for s in args.settings]
        cells_md = " | ".join(f"{r['perplexity']:.2f} ({r['quantize_s']:.0f} s)" for r in cells)
        lines.append(f"| {label} | {cells_md} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
