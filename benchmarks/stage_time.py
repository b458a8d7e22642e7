"""Seconds per stage of the block-wise pass, per block, for the default recipe (not in CI).

Runs ``quantize_blockwise`` on the first ``--blocks`` blocks of the model (the rest cut off) with
the recipe ``lrquant quantize`` would use for the setting, timing each named stage of
:mod:`lrquant.methods.blockwise` (the full-precision targets and statistics, the smoothing start,
the clipping search, training, folding with the pass of the finished block). The first block
includes compiling the fake quantizer. The end-to-end step is not part of this pass.

    python benchmarks/stage_time.py --wbits 4 --group-size 64 --blocks 3
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

import lrquant.methods.blockwise as blockwise
from lrquant.api import DataSettings, calibration_data, situation
from lrquant.config import build_scheme
from lrquant.models.loading import load_model
from lrquant.recipes import build_recipe, parse_overrides

STAGES = ("_targets_and_stats", "initialise", "search_clipping", "train", "collect_statistics", "fold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=16)
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=3)
    args = parser.parse_args()

    seconds: dict[str, list[float]] = {name: [] for name in STAGES}  # per block, in order

    def timed(name: str, fn):
        @functools.wraps(fn)
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name].append(time.perf_counter() - start)

        return run

    for name in STAGES:
        setattr(blockwise, name, timed(name, getattr(blockwise, name)))
    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, arch = loaded.model, loaded.arch
    blocks = arch.named_blocks(model)[0][0].rsplit(".", 1)[0]
    kept = model.get_submodule(blocks)[: args.blocks]
    parent, _, leaf = blocks.rpartition(".")
    setattr(model.get_submodule(parent), leaf, kept)
    model.config.num_hidden_layers = len(kept)
    scheme = build_scheme(wbits=args.wbits, abits=args.abits, group_size=args.group_size)
    recipe = build_recipe(
        args.method, args.preset, parse_overrides(args.overrides), situation=situation(args.model, scheme)
    )
    calibration = calibration_data(loaded, DataSettings(seqlen=args.seqlen), recipe.nsamples)
    reports = blockwise.quantize_blockwise(model, arch, scheme, recipe, calibration).reports
    n = len(reports)
    # initialise contains the targets: report it without them
    seconds["initialise"] = [
        a - b for a, b in zip(seconds["initialise"], seconds["_targets_and_stats"], strict=True)
    ]
    blocks_s = [r.seconds for r in reports]
    print(
        f"{args.model}, first {n} blocks, {scheme.name}, {args.method} at {args.preset} "
        f"({recipe.nsamples} windows x {args.seqlen} tokens, {recipe.epochs} epochs), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| stage | s per block | first block (compiles) | later blocks, mean |")
    print("|---|---:|---:|---:|")
    names = {"_targets_and_stats": "full-precision targets and statistics", "initialise": "smoothing start"}

    def row(label: str, values: list[float], whole: float) -> None:
        first, later = (values[0], sum(values[1:]) / (len(values) - 1)) if len(values) > 1 else (whole, whole)
        print(f"| {label} | {whole / n:.2f} | {first:.2f} | {later:.2f} |")

    for name in STAGES:
        values = seconds[name] or [0.0] * n  # a stage the recipe skips
        row(names.get(name, name.replace("_", " ")), values, sum(values))
    row("the whole block", blocks_s, sum(blocks_s))


if __name__ == "__main__":
    main()
