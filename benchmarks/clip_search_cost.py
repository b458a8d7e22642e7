"""What the searched clipping start costs and gives before any training, side by side.

One process: the same model, calibration windows and scheme quantized block by block with
``epochs=0`` (start values only, folded as they are), once per clipping start (``minmax``: the
paper's σ(4); ``search``: ``clip_init=search``). Prints the total seconds, the seconds the search
itself took, and the block output cosines of the quantized chain against full precision.

    python benchmarks/clip_search_cost.py --wbits 4 --group-size 64
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lrquant.api import DataSettings, calibration_data
from lrquant.config import build_scheme
from lrquant.methods import blockwise
from lrquant.models.loading import load_model
from lrquant.recipes import build_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=16)
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model)
    calibration = calibration_data(loaded, DataSettings(seqlen=args.seqlen), args.nsamples)
    scheme = build_scheme(wbits=args.wbits, abits=args.abits, group_size=args.group_size)
    overrides = dict(item.split("=", 1) for item in args.set)

    search_seconds: list[float] = []
    search = blockwise.search_clipping

    def timed_search(*a, **k) -> None:
        start = time.perf_counter()
        search(*a, **k)
        search_seconds.append(time.perf_counter() - start)

    blockwise.search_clipping = timed_search
    setting = f"W{args.wbits}A{args.abits}{f'g{args.group_size}' if args.group_size else ''}"
    print(
        f"{args.model}, {setting}, {args.nsamples} windows x {args.seqlen} tokens (seed 0), epochs=0, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| clip_init | total s | search s | blocks searched | first block cosine | last block cosine |")
    print("|---|---:|---:|---:|---:|---:|")
    for clip_init in ("minmax", "search"):
        model = copy.deepcopy(loaded.model)
        recipe = build_recipe("lrquant_plus", "fast", {**overrides, "epochs": 0, "clip_init": clip_init})
        search_seconds.clear()
        start = time.perf_counter()
        reports = blockwise.quantize_blockwise(model, loaded.arch, scheme, recipe, calibration).reports
        total = time.perf_counter() - start
        print(
            f"| {clip_init} | {total:.1f} | {sum(search_seconds):.1f} | {len(search_seconds)} "
            f"| {reports[0].cosine:.4f} | {reports[-1].cosine:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
