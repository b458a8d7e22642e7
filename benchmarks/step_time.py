"""Seconds per block-training step, side by side: eager vs compiled quantizer, bf16 vs fp32.

One process, one block (block 0 of the model), LRQuant+ transforms attached at a scheme; each
variant first runs untimed warm-up steps (compiling happens there; its time is reported), then
``--steps`` timed steps. The per-step time times the steps of a preset times the blocks gives that
preset's training time (what ``lrquant quantize`` spends beyond capture and folding).

    python benchmarks/step_time.py --wbits 4 --abits 4
    python benchmarks/step_time.py --wbits 4 --abits 16 --group-size 64 --method auto --profile

With ``--profile``, the timed steps of the bf16 compiled variant run under ``torch.profiler`` and
its table of operators by their own time follows.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from lrquant.api import DataSettings, calibration_data, situation
from lrquant.config import build_scheme
from lrquant.methods import losses
from lrquant.methods.blockwise import (
    ChainState,
    Learner,
    _targets_and_stats,
    optimizer_for,
    training_step,
)
from lrquant.methods.capture import capture_block_inputs, capture_block_kwargs
from lrquant.models.loading import load_model
from lrquant.quant.apply import attach_block_quantizers, use_quantized_attention
from lrquant.quant.quantizer import compiled_quantizer
from lrquant.recipes import PRESETS, build_recipe
from lrquant.transforms.block import AttentionLayout, attach_block_transforms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=4)
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--method", default="lrquant_plus", help="the recipe (auto: the default's)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile the bf16 compiled steps")
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, arch = loaded.model, loaded.arch
    n = args.steps + args.warmup
    calibration = calibration_data(loaded, DataSettings(seqlen=args.seqlen), n)
    scheme = build_scheme(wbits=args.wbits, abits=args.abits, group_size=args.group_size)
    recipe = build_recipe(args.method, "fast", situation=situation(args.model, scheme))
    if recipe.hadamard != "off":
        parser.error(f"the {args.method} recipe rotates at run time (hadamard={recipe.hadamard}): not timed")
    kwargs = capture_block_kwargs(model, arch, calibration[0])[0][0]
    inputs = capture_block_inputs(model, arch, calibration)
    state = ChainState(inputs, inputs.clone())
    block = arch.block_list(model)[0]
    for p in block.parameters():
        p.requires_grad_(False)
    learner = Learner.of(model, arch, scheme, recipe)
    options = learner.options
    fp_out, hom_out, stats = _targets_and_stats(block, learner, state, kwargs)
    use_quantized_attention(model)
    attach_block_quantizers(block, arch, scheme)
    layout = AttentionLayout.of_block(block, arch, model.config)
    bt = attach_block_transforms(block, arch, layout, stats, options)
    initial = {k: v.clone() for k, v in bt.state_dict().items()}

    def run(bf16: bool, compiled: bool) -> tuple[float, float]:
        bt.load_state_dict(initial)
        timed = recipe.model_copy(update={"bf16": bf16})
        optimizer = optimizer_for(bt, timed)
        weighting = losses.DynamicWeighting(2)

        def step(i: int) -> None:
            batch = slice(i, i + 1)
            targets = [fp_out[batch], hom_out[batch]]
            training_step(block, state.quant[batch], targets, kwargs, timed, optimizer, weighting)

        profiled = args.profile and bf16 and compiled
        with compiled_quantizer(compiled):
            start = time.perf_counter()
            for i in range(args.warmup):
                step(i)
            warm = time.perf_counter() - start
            with torch.profiler.profile() if profiled else contextlib.nullcontext() as profile:
                start = time.perf_counter()
                for i in range(args.warmup, n):
                    step(i)
                seconds = time.perf_counter() - start
        if profiled:
            tables.append(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return seconds / args.steps, warm

    tables: list[str] = []

    blocks = len(arch.block_list(model))
    print(
        f"{args.model}, block 0 of {blocks}, W{args.wbits}A{args.abits}"
        f"{f'g{args.group_size}' if args.group_size else ''}, {args.method}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps"
    )
    print("| matmuls | quantizer | s / step | warm-up s | train min: fast | default | paper |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for bf16 in (True, False):
        for compiled in (False, True):
            per_step, warm = run(bf16, compiled)
            minutes = [
                per_step * PRESETS[p]["nsamples"] * PRESETS[p]["epochs"] * blocks / 60
                for p in ("fast", "default", "paper")
            ]
            print(
                f"| {'bf16' if bf16 else 'fp32'} | {'compiled' if compiled else 'eager'} | {per_step:.3f} "
                f"| {warm:.1f} | " + " | ".join(f"{m:.1f}" for m in minutes) + " |",
                flush=True,
            )
    for table in tables:
        print(f"\nbf16, compiled, {args.steps} steps under torch.profiler:\n{table}")


if __name__ == "__main__":
    main()
