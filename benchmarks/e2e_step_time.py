"""Seconds per step of the end-to-end step sizes, and where they go (not in CI).

The end-to-end step (``e2e_epochs``, :mod:`lrquant.methods.e2e`) trains every quantized linear's
step factors on the KL divergence from the full-precision model, one calibration window per step:
each step is a forward and a backward pass of the whole model, head included. Here the model's
blocks are first rounded to nearest at the scheme (the step keeps whatever codes it is given, so
how they were found does not change its cost), then ``--warmup`` untimed steps run (compiling,
allocating) and ``--steps`` timed ones; with ``--profile``, the timed steps run under
``torch.profiler`` and its table of operators by their own time follows. Seconds per step times
``e2e_epochs`` times the windows is the step's share of a run.

    python benchmarks/e2e_step_time.py --wbits 2 --group-size 64 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from lrquant.api import DataSettings, calibration_data, situation
from lrquant.config import build_scheme
from lrquant.methods.e2e import fp_final_hidden, tune_step_sizes
from lrquant.models.loading import load_model
from lrquant.quant.apply import attach_block_quantizers, use_quantized_attention
from lrquant.quant.linear import QuantLinear
from lrquant.recipes import PRESETS, build_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--wbits", type=int, default=2)
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="profile the timed steps")
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, arch = loaded.model, loaded.arch
    cpu = torch.device("cpu")
    windows = calibration_data(loaded, DataSettings(seqlen=args.seqlen), args.warmup + args.steps)
    fp_hidden = fp_final_hidden(model, arch, windows, cpu)
    scheme = build_scheme(wbits=args.wbits, abits=16, group_size=args.group_size)
    use_quantized_attention(model)
    for block in arch.block_list(model):
        attach_block_quantizers(block, arch, scheme)
        for module in block.modules():
            if isinstance(module, QuantLinear):
                module.freeze_weight()
    default = build_recipe("auto", "fast", situation=situation(args.model, scheme))
    recipe = default.model_copy(update={"e2e_epochs": 1})

    start = time.perf_counter()
    tune_step_sizes(model, arch, windows[: args.warmup], fp_hidden[: args.warmup], recipe, 0, cpu)
    warm = time.perf_counter() - start
    with torch.profiler.profile() if args.profile else contextlib.nullcontext() as profile:
        start = time.perf_counter()
        tune_step_sizes(model, arch, windows[args.warmup :], fp_hidden[args.warmup :], recipe, 0, cpu)
        per_step = (time.perf_counter() - start) / args.steps
    share = per_step * PRESETS["fast"]["nsamples"] * default.e2e_epochs
    print(
        f"{args.model}, {scheme.name}, end-to-end step sizes on windows of {args.seqlen} tokens, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; {args.steps} timed steps "
        f"after {args.warmup} warm-up steps ({warm:.1f} s)"
    )
    print(f"| s / step | s in the default at `fast` ({default.e2e_epochs} epochs of its windows) |")
    print("|---:|---:|")
    print(f"| {per_step:.3f} | {share:.0f} |")
    if args.profile:
        print(f"\n{args.steps} steps under torch.profiler:")
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
