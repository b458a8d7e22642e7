"""Perplexity / time / memory table of quantization methods on a real LLM (not part of CI).

Each (method, setting) runs in its own fresh process, so its peak RSS is its own and runs do not
share state. Calibration on ``wikipedia:train`` (seeded random windows), perplexity on
``wikipedia:test`` (consecutive windows), as the package defaults do.

    python benchmarks/llm_ppl.py --methods rtn                       # the RTN table
    python benchmarks/llm_ppl.py --methods rtn omniquant lrquant_plus --settings W4A4 W6A6
    python benchmarks/llm_ppl.py --methods lrquant_plus --settings W4A4 --set rotation=false --name ablate
    python benchmarks/llm_ppl.py --methods autoround lrquant_plus --settings W4A16g64 --preset fast

``autoround`` (weight-only settings) runs the auto-round package (``pip install -e ".[bench]"``)
with its default SignRound tuning on the very calibration windows lrquant gets (same text, samples
and length), and our evaluator scores the model it leaves in memory, after checking that every
quantized weight really changed and lies on its grid.

Writes ``benchmarks/results/<name>.md`` and ``.json`` and prints the table; rows are also
appended to ``<name>.jsonl`` as they finish, and a rerun of the same command skips them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

SETTINGS: dict[str, dict] = {
    "FP": {},
    "W4A16": dict(wbits=4),
    "W4A16g128": dict(wbits=4, group_size=128),
    "W4A16g64": dict(wbits=4, group_size=64),
    "W3A16g128": dict(wbits=3, group_size=128),
    "W3A16g64": dict(wbits=3, group_size=64),
    "W2A16g64": dict(wbits=2, group_size=64),
    "W8A8": dict(wbits=8, abits=8),
    "W6A6": dict(wbits=6, abits=6),
    "W4A8": dict(wbits=4, abits=8),
    "W4A4": dict(wbits=4, abits=4),
}


def setting_kwargs(settings: dict[str, dict], name: str) -> dict:
    """``build_scheme`` arguments of a setting name: one of ``settings``, optionally followed by
    ``-c<ratio>`` for activation clipping (``W4A4-c0.9``: each token's range of every linear input
    shrunk to 0.9 of its min and max) and ``-rqkv`` for rotated Q, K and V heads (``--rotate-qkv``),
    in either order."""
    parts = name.split("-")
    for cut in range(len(parts), 0, -1):
        base = "-".join(parts[:cut])
        if base in settings:
            break
    else:
        raise KeyError(name)
    kwargs = dict(settings[base])
    for modifier in parts[cut:]:
        if modifier == "rqkv":
            kwargs["rotate_qkv"] = True
        elif modifier.startswith("c"):
            kwargs["a_clip"] = float(modifier[1:])
        else:
            raise KeyError(name)
    return kwargs


def setting_arg(settings: dict[str, dict]):
    """An argparse ``type`` that accepts a setting name as :func:`setting_kwargs` reads it and
    :func:`build_scheme` takes it (so a clipping ratio out of range is refused here, not mid-run)."""
    from lrquant.config import build_scheme
    from lrquant.errors import LrquantError

    def check(name: str) -> str:
        try:
            build_scheme(**setting_kwargs(settings, name))
        except (KeyError, ValueError):
            raise argparse.ArgumentTypeError(
                f"unknown setting {name!r}: one of {', '.join(settings)}, optionally with -c<ratio> and -rqkv"
            ) from None
        except LrquantError as err:
            raise argparse.ArgumentTypeError(f"setting {name!r}: {err}") from None
        return name

    return check


# LRQUANT_BENCH_RESULTS puts the result files elsewhere (the smoke tests do).
RESULTS = Path(os.environ.get("LRQUANT_BENCH_RESULTS") or Path(__file__).parent / "results")


def run_one(job: dict) -> dict:
    """Load, quantize (unless FP) and evaluate one setting in this process."""
    import torch

    from lrquant.api import (
        DataSettings,
        apply_method,
        calibration_data,
        evaluation_data,
        hadamard_supported,
        peak_device_memory,
        peak_rss_mb,
    )
    from lrquant.config import build_scheme
    from lrquant.device import placed, resolve_device
    from lrquant.eval.perplexity import score_windows
    from lrquant.models.loading import load_model
    from lrquant.recipes import PRESETS, Situation, build_recipe, parse_overrides

    torch.manual_seed(job["seed"])
    device = resolve_device(job.get("device", "cpu"))
    data = DataSettings(seqlen=job["seqlen"], eval_windows=job["windows"], seed=job["seed"])
    loaded = load_model(job["model"])
    windows = evaluation_data(loaded, data)
    start = time.perf_counter()
    blocks = []
    learned_in = None  # "matmuls" of the row; older rows lack it
    if job["method"] == "autoround":
        # auto-round's own sample count when given (``--autoround nsamples=128``: its default),
        # else the preset's, as lrquant gets
        count = parse_overrides(job["overrides"]).get("nsamples", PRESETS[job["preset"]]["nsamples"])
        calibration = calibration_data(loaded, data, int(count))
        _autoround(
            loaded, setting_kwargs(SETTINGS, job["setting"]), calibration, job["seed"], job["overrides"]
        )
    elif job["setting"] != "FP":
        scheme = build_scheme(**setting_kwargs(SETTINGS, job["setting"]))
        where = Situation.of(scheme, loaded.arch.modality, rotatable=hadamard_supported(loaded.arch))
        recipe = build_recipe(
            job["method"], job["preset"], parse_overrides(job["overrides"]), situation=where
        )
        calibration = (
            None if job["method"] == "rtn" else calibration_data(loaded, data, recipe.calibration_samples)
        )
        blocks = apply_method(loaded, scheme, job["method"], recipe, calibration, job["seed"], device=device)
        learned_in = training_matmuls(recipe, device)
    quantize_s = time.perf_counter() - start
    rss = peak_rss_mb()  # loading and quantizing, before the reference joins it for scoring
    start = time.perf_counter()
    # a quantized model is also scored against the full-precision one: KL and top-1 agreement
    reference = None if job["setting"] == "FP" else load_model(job["model"]).model
    also = {}
    with placed(loaded.model, device), placed(reference, device) if reference is not None else nullcontext():
        scores = score_windows(loaded.model, windows, reference=reference)
        for source in job.get("also", []):  # other texts, same windows count and length
            other = evaluation_data(loaded, replace(data, eval=source))
            also[source] = score_windows(loaded.model, other, reference=reference)
    return {
        **job,
        "commit": code_version(),
        "cpu": cpu_name(),
        **scores,
        "quantize_s": round(quantize_s, 1),
        "eval_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(rss),
        **peak_device_memory(device),
        "eval_tokens": int(windows.numel()),
        **({"also": also} if also else {}),
        "retries": sum(b["retries"] for b in blocks),
        "last_block_cosine": blocks[-1]["cosine"] if blocks else None,
        "matmuls": learned_in,
    }


def training_matmuls(recipe, device) -> str | None:
    """What a recipe's block training runs its matmuls in on ``device``: "bf16", "fp32", or None
    for a one-shot recipe (nothing trained)."""
    from lrquant.recipes import use_bf16

    if not recipe.learn:
        return None
    return "bf16" if use_bf16(recipe, device) else "fp32"


def _autoround(loaded, setting: dict, calibration, seed: int, overrides: list[str]) -> None:
    """Quantize ``loaded.model`` in place with auto-round at a weight-only ``setting``: its defaults,
    with ``overrides`` (``iters=64``, ``batch_size=1``: integers, floats or booleans) on top."""
    import torch
    from auto_round import AutoRound

    from lrquant.recipes import parse_overrides

    if setting.get("abits", 16) != 16:
        sys.exit("autoround: only weight-only settings (e.g. W4A16g64, W4A16) are compared")
    bits, group = setting["wbits"], setting.get("group_size", -1)  # -1: per output channel
    linears = {
        name: module.weight.detach().clone()
        for name, module in loaded.model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    tuner = AutoRound(
        loaded.model,
        tokenizer=loaded.tokenizer,
        bits=bits,
        group_size=group,
        sym=False,  # asymmetric, as lrquant's default weight grid
        dataset=[window[None] for window in calibration],
        nsamples=len(calibration),
        seqlen=calibration.shape[1],
        seed=seed,
        device_map="cpu",
        **{key: _literal(value) for key, value in parse_overrides(overrides).items() if key != "nsamples"},
    )
    tuner.quantize()
    # auto-round's "fake" export wrote unquantized weights in 0.16.1: check the model we score.
    modules = dict(loaded.model.named_modules())
    for name, before in linears.items():
        weight = modules[name].weight.detach().float()
        if torch.equal(weight, before.float()):
            sys.exit(f"autoround left {name} unquantized")
        distinct = max(
            row.unique().numel() for row in weight.reshape(-1, weight.shape[1] if group < 0 else group)
        )
        if distinct > 2**bits:
            sys.exit(f"autoround: {name} has {distinct} values in a group of {group}, not a {bits}-bit grid")


def _literal(value: str) -> int | float | bool | str:
    """``"64"`` -> 64, ``"1e-3"`` -> 0.001, ``"false"`` -> False; anything else stays a string."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def load_rows(name: str) -> list[dict]:
    """The finished rows of results ``name`` (its ``.jsonl``), oldest first."""
    path = RESULTS / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def find_row(rows: list[dict], job: dict) -> dict | None:
    """The row that ran exactly ``job``, if any (a job's ``also`` names the texts whose scores
    its row holds)."""

    def same(row: dict, key: str, value) -> bool:
        return sorted(row.get(key) or {}) == sorted(value) if key == "also" else row.get(key) == value

    return next((r for r in rows if all(same(r, k, v) for k, v in job.items())), None)


def _kl_cells(row: dict) -> str:
    """KL and top-1 agreement against full precision (empty for the FP row and older rows)."""
    if "kl" not in row:
        return " | "
    return f"{row['kl']:.4f} | {100 * row['top1_agreement']:.1f}"


def cell(row: dict) -> str:
    """A table cell: "perplexity (quantize seconds)"."""
    return f"{row['perplexity']:.2f} ({row['quantize_s']:.0f} s)"


def _pivot(rows: list[dict]) -> list[str]:
    """Settings down, methods across: "perplexity (quantize seconds)"."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["setting"] != "FP"))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    by_key = {(r["method"], r["setting"]): r for r in rows}
    out = ["| setting | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for setting in settings:
        if setting == "FP":
            fp = by_key["-", "FP"]["perplexity"]
            out.append(f"| FP | {fp:.2f} |" + " |" * (len(methods) - 1))
            continue
        cells = [by_key.get((m, setting)) for m in methods]
        out.append(f"| {setting} | " + " | ".join(cell(r) if r else "" for r in cells) + " |")
    return out


def cpu_name() -> str:
    """The CPU's model name (rows measured on different CPUs differ in time and, with bf16, in result)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def append_row(name: str, row: dict) -> None:
    """Append ``row`` to results ``name`` (its ``.jsonl``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def code_version() -> str:
    """The checked-out commit (with "+dirty" for uncommitted changes), so every row names its code."""
    here = Path(__file__).parent.parent  # the repository root, where "src" is

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, check=False)

    rev, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "src")
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["rtn"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), type=setting_arg(SETTINGS))
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="table")
    parser.add_argument("--device", default="cpu", help="where blocks learn and the model is evaluated")
    parser.add_argument(
        "--autoround",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="auto-round arguments over its defaults, e.g. iters=64 batch_size=1 (autoround jobs only)",
    )
    parser.add_argument(
        "--eval-also",
        action="append",
        default=[],
        metavar="SOURCE",
        help="also score every row on this text (e.g. news:test), same windows; repeatable",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    # Finished jobs are appended to <name>.jsonl as they end, so an interrupted table resumes
    # where it stopped when the same command is run again.
    RESULTS.mkdir(parents=True, exist_ok=True)
    done_path = RESULTS / f"{args.name}.jsonl"
    done = load_rows(args.name)
    rows = []
    jobs = [(m, s) for s in args.settings for m in (["-"] if s == "FP" else args.methods)]
    for method, setting in jobs:
        job = dict(
            model=args.model,
            method=method,
            setting=setting,
            preset=args.preset,
            overrides=args.autoround if method == "autoround" else args.overrides,
            seqlen=args.seqlen,
            windows=args.windows,
            seed=args.seed,
            # rows of CPU runs carry no device, rows on one text no "also" (older rows keep matching)
            **({"device": args.device} if args.device != "cpu" else {}),
            **({"also": args.eval_also} if args.eval_also else {}),
        )
        row = find_row(done, job)
        if row is None:
            out = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(job)],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                sys.exit(f"{method} {setting} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            with done_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        rows.append(row)
        print(
            f"{method:>13} {setting:<10} ppl {row['perplexity']:9.3f}  quantize {row['quantize_s']:7.1f} s"
            f"  eval {row['eval_s']:6.1f} s  peak RSS {row['peak_rss_mb']} MiB",
            flush=True,
        )

    import torch
    import transformers

    machine = (
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    if args.device != "cpu":
        machine = f"{torch.cuda.get_device_name()} ({args.device}), " + machine
    extra = f"; overrides {' '.join(args.overrides)}" if args.overrides else ""
    if args.autoround and "autoround" in args.methods:
        extra += f"; auto-round {' '.join(args.autoround)} over its defaults"
    lines = [
        f"Model `{args.model}`; calibration `wikipedia:train`, preset `{args.preset}`{extra}; perplexity on "
        f"`wikipedia:test`, {args.windows} windows x {args.seqlen} tokens; seed {args.seed}; {machine}.",
        "",
        "| method | setting | perplexity | KL from FP | top-1 agreement % | quantize s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['method']} | {r['setting']} | {r['perplexity']:.2f} | {_kl_cells(r)} | {r['quantize_s']:.1f} "
        f"| {r['peak_rss_mb']} |"
        for r in rows
    ]
    lines += ["", *_pivot(rows)]
    for source in args.eval_also:
        lines += ["", f"On `{source}` (same models, {args.windows} windows x {args.seqlen} tokens):", ""]
        lines += [
            "| method | setting | perplexity | KL from FP | top-1 agreement % |",
            "|---|---|---:|---:|---:|",
        ]
        for r in rows:
            scores = r["also"][source]
            ppl = scores["perplexity"]
            lines.append(f"| {r['method']} | {r['setting']} | {ppl:.2f} | {_kl_cells(scores)} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
