"""End-to-end step-size variants on one block-wise pass, side by side (not part of CI).

The block-wise pass of the base recipe runs once, checkpointed block by block as ``lrquant
quantize`` does (in ``--store``, so an interrupted sweep resumes and a later sweep with the same
base reuses it). Each variant then loads the model afresh, restores the finished blocks and runs
only its end-to-end tuning (``e2e_epochs``, ``lr_e2e``), then the perplexity. That is the path a
resumed run takes, so a variant's perplexity is the one ``llm_ppl.py`` gives for the same
settings (the smoke test checks it), at a fraction of the time.

    python benchmarks/e2e_sweep.py --setting W2A16g64 --preset fast --name e2e_sweep \\
        --set bf16=false --set rounding=true --set clip_init=search --set lr_clipping=0.1 \\
        --variants e2e_epochs=2 e2e_epochs=2,lr_e2e=3e-3

Rows go to ``benchmarks/results/<name>.jsonl`` as they finish (a rerun skips them); the store
lives under ``~/.cache/lrquant/e2e_sweep`` (delete it when done: about 0.6 GB for SmolLM2). It is
keyed by the settings, not the commit, so a later commit's end-to-end options reuse a finished
block-wise pass (rows name both commits): delete it whenever the block-wise pass itself changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from llm_ppl import RESULTS, SETTINGS, code_version, cpu_name, load_rows, setting_arg, setting_kwargs

E2E_FIELDS = ("e2e_epochs", "lr_e2e", "e2e_samples", "e2e_schedule")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    weighted = {name: kwargs for name, kwargs in SETTINGS.items() if name != "FP"}
    parser.add_argument("--setting", default="W2A16g64", type=setting_arg(weighted))
    parser.add_argument("--method", default="lrquant_plus")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--variants", nargs="+", required=True, metavar="K=V[,K=V]")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="e2e_sweep")
    parser.add_argument("--store", type=Path, default=Path.home() / ".cache" / "lrquant" / "e2e_sweep")
    args = parser.parse_args()

    import torch

    from lrquant.api import DataSettings, apply_method, calibration_data, evaluation_data
    from lrquant.config import build_scheme
    from lrquant.errors import LrquantError
    from lrquant.eval.perplexity import perplexity
    from lrquant.methods.resume import ResumeStore
    from lrquant.models.loading import load_model
    from lrquant.recipes import build_recipe, parse_overrides

    try:
        base = parse_overrides(args.overrides)
        if set(base) & set(E2E_FIELDS):
            raise LrquantError(f"set {', '.join(E2E_FIELDS)} in --variants, not in --set")
        recipes = {}
        for variant in args.variants:
            fields = parse_overrides(variant.split(","))
            if set(fields) - set(E2E_FIELDS):
                raise LrquantError(
                    f"variant '{variant}' changes more than the end-to-end fields ({', '.join(E2E_FIELDS)}): "
                    "the block-wise pass is shared, so put other settings in --set"
                )
            recipes[variant] = build_recipe(args.method, args.preset, {**base, **fields})
        first = build_recipe(args.method, args.preset, base)
    except LrquantError as err:
        sys.exit(f"error: {err}")
    scheme = build_scheme(**setting_kwargs(SETTINGS, args.setting))
    data = DataSettings(seqlen=args.seqlen, eval_windows=args.windows, seed=args.seed)
    commit = code_version()
    key = dict(
        model=args.model, setting=args.setting, method=args.method, preset=args.preset,
        overrides=args.overrides, seqlen=args.seqlen, windows=args.windows, seed=args.seed, commit=commit,
    )  # fmt: skip
    # a row is done when one with the same settings and variant exists (from any commit)
    same = {k: v for k, v in key.items() if k != "commit"}
    done = {r["variant"] for r in load_rows(args.name) if {k: r.get(k) for k in same} == same}
    recipes = {v: r for v, r in recipes.items() if v not in done}
    if not recipes:
        print(f"every variant of {args.setting} is in {args.name}.jsonl already")
        return
    # The store is keyed by the settings, not the commit, so that variants added by a later commit
    # (new end-to-end options) reuse the block-wise pass; each row names the commit of that pass.
    digest = hashlib.sha1(json.dumps(same, sort_keys=True).encode()).hexdigest()[:12]
    store = ResumeStore(args.store / digest / "out", same)
    made_by = args.store / digest / "blockwise_commit"

    def fresh(recipe):  # as llm_ppl.py's run_one: seed, load, evaluation windows, calibration windows
        torch.manual_seed(args.seed)
        loaded = load_model(args.model)
        calibration = calibration_data(loaded, data, recipe.calibration_samples)
        return loaded, evaluation_data(loaded, data), calibration

    # the shared block-wise pass (nothing to do when the store holds every block)
    loaded, _, calibration = fresh(first)
    began = time.perf_counter()
    if not made_by.is_file():
        made_by.parent.mkdir(parents=True, exist_ok=True)
        made_by.write_text(commit)
    apply_method(loaded, scheme, args.method, first, calibration, args.seed, store)
    blockwise_s = round(time.perf_counter() - began, 1)
    blockwise_commit = made_by.read_text()

    RESULTS.mkdir(parents=True, exist_ok=True)
    for variant, recipe in recipes.items():
        loaded, windows, calibration = fresh(recipe)
        began = time.perf_counter()
        blocks = apply_method(loaded, scheme, args.method, recipe, calibration, args.seed, store)
        e2e_s = round(time.perf_counter() - began, 1)
        row = dict(
            key, variant=variant, perplexity=perplexity(loaded.model, windows), e2e_s=e2e_s,
            blockwise_s=blockwise_s, blockwise_commit=blockwise_commit, e2e_kl=blocks[-1].get("e2e_kl", []),
            threads=torch.get_num_threads(), cpu=cpu_name(),
        )  # fmt: skip
        with (RESULTS / f"{args.name}.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        ppl = row["perplexity"]
        print(f"{args.setting} {variant}: perplexity {ppl:.3f}, end-to-end {e2e_s:.0f} s", flush=True)


if __name__ == "__main__":
    main()
