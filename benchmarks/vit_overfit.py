"""Does a learned vision recipe fit its calibration photos or the task? (not in CI)

Quantizes a vision backbone with a class token (default DINOv2-small) with each job and scores
its final features (class token joined with the mean patch token, as ``vit_probe.py``) against
full precision on three sets of 32 images: the calibration crops themselves, 32 further crops of
the same 13 calibration photos (the next crops of the same seeded sequence, never trained on) and
32 crops of the 4 held-out photos. A recipe that wins on the first two and loses on the third fits
the calibration photos, not images in general. The class-token and mean-patch cosines are
reported too. Appends rows to ``results/<name>.jsonl`` and writes ``results/<name>.md``.

    python benchmarks/vit_overfit.py --setting W6A6 --seed 1 \\
        --jobs rtn omniquant lrquant_plus lrquant_plus,rotation=false omniquant,rotation=true
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from llm_ppl import RESULTS, code_version, cpu_name, load_rows, setting_arg, setting_kwargs
from vit_probe import SETTINGS

from lrquant.api import DataSettings, apply_method, calibration_data
from lrquant.config import build_scheme
from lrquant.eval.images import model_outputs
from lrquant.models.loading import load_model
from lrquant.recipes import build_recipe, parse_overrides

N = 32
SETS = ("calibration crops", "fresh crops, same photos", "held-out photos")


def _cosines(features: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosines of the whole feature and of its halves (class token, mean patch token)."""
    half = ref.shape[-1] // 2

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return round(float(F.cosine_similarity(a, b, dim=-1).mean()), 5)

    return {
        "feature": cos(features, ref),
        "class token": cos(features[:, :half], ref[:, :half]),
        "mean patch": cos(features[:, half:], ref[:, half:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2-small")
    parser.add_argument("--setting", default="W6A6", type=setting_arg(SETTINGS))
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs", nargs="+", default=["rtn", "omniquant", "lrquant_plus"], metavar="METHOD[,KEY=VALUE...]"
    )
    parser.add_argument("--name", default="vit_overfit")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for job in args.jobs:
        if "nsamples" in parse_overrides(job.split(",")[1:]):
            raise SystemExit(f"job '{job}': the three sets have {N} images each; nsamples cannot change")

    loaded = load_model(args.model)
    both = calibration_data(loaded, DataSettings(seed=args.seed), 2 * N)  # crops N+1..2N: fresh
    calibration = calibration_data(loaded, DataSettings(seed=args.seed), N)
    if not torch.equal(both[:N], calibration):
        raise SystemExit("the seeded crop sequence is not a prefix: fresh crops would overlap calibration")
    held = calibration_data(loaded, DataSettings(calib="photos:heldout", seed=args.seed), N)
    images = dict(zip(SETS, (calibration, both[N:], held), strict=True))
    reference = {name: model_outputs(loaded.model, loaded.arch, x) for name, x in images.items()}

    path = RESULTS / f"{args.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    for job in args.jobs:
        method, *overrides = job.split(",")
        loaded = load_model(args.model)
        start = time.perf_counter()
        recipe = build_recipe(method, args.preset, {**parse_overrides(overrides), "nsamples": N}, "image")
        scheme = build_scheme(**setting_kwargs(SETTINGS, args.setting))
        apply_method(loaded, scheme, method, recipe, None if method == "rtn" else calibration)
        seconds = time.perf_counter() - start
        outputs = {name: model_outputs(loaded.model, loaded.arch, x) for name, x in images.items()}
        scores = {name: _cosines(outputs[name], reference[name]) for name in images}
        row = {
            "model": args.model,
            "method": method,
            "overrides": sorted(overrides),
            "setting": args.setting,
            "preset": args.preset,
            "seed": args.seed,
            "commit": code_version(),
            "cpu": cpu_name(),
            "cosine": scores,
            "quantize_s": round(seconds, 1),
        }
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    lines = [
        f"Model `{args.model}`, preset `{args.preset}`, {N} crops per set, seed as listed; feature cosine "
        f"to full precision (class token / mean patch in brackets); {platform.machine()} CPU, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}.",
        "",
        "| seed | setting | method | overrides | " + " | ".join(SETS) + " |",
        "|---|---|---|---|" + "---:|" * len(SETS),
    ]
    for r in load_rows(args.name):
        parts = [r["cosine"][s] for s in SETS]
        cells = [f"{c['feature']:.4f} ({c['class token']:.4f} / {c['mean patch']:.4f})" for c in parts]
        lines.append(
            f"| {r['seed']} | {r['setting']} | {r['method']} | {' '.join(r['overrides']) or '-'} | "
            + " | ".join(cells)
            + " |"
        )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
