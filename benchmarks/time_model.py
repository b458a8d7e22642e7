"""What quantizing LLaMA-shaped models costs here: the cost model beside measurements (not in CI).

For the shapes of Llama 3.2 1B and 3B, Llama 3.1 8B and Llama 3.1 70B, builds the model on
PyTorch's meta device (no weights) and asks :func:`lrquant.cost.estimate` what each method costs
per block and in all at a calibration budget: the block's arithmetic over the calibration
tokens at the speed of a matrix product timed here (one thread unless ``OMP_NUM_THREADS`` says
otherwise), the stages each method runs, and the memory a streamed run holds. Where
``results/<name>.jsonl`` files of ``stream_scale.py`` hold measured rows of the same shape,
method and budget, their seconds per block and peak memory are printed beside the estimate, and
the estimate's error on them is what to expect from the extrapolated rows.

    python benchmarks/time_model.py --measured stream_1b stream_3b stream_8b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from stream_scale import SHAPES as STREAM_SHAPES

RESULTS = Path(os.environ.get("LRQUANT_BENCH_RESULTS") or Path(__file__).parent / "results")
SHAPES = {name: shape for name, shape in STREAM_SHAPES.items() if name != "tiny"}


def estimates(
    shape: str, methods: list[str], nsamples: int, seqlen: int, group_size: int, device: str = "cpu"
) -> list[dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lrquant.arch import get_arch_spec
    from lrquant.config import build_scheme
    from lrquant.cost import estimate
    from lrquant.recipes import build_recipe

    config = LlamaConfig(**SHAPES[shape], vocab_size=128256)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch, scheme = get_arch_spec("llama"), build_scheme(wbits=4, group_size=group_size)
    rows = []
    for method in methods:
        recipe = None if method == "rtn" else build_recipe(method, "fast", {"nsamples": nsamples})
        cost = estimate(model, arch, scheme, recipe, nsamples, seqlen, torch.device(device), streamed=True)
        rows.append({"shape": shape, "method": method, **cost.as_dict()})
    return rows


def measured_rows(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        path = RESULTS / f"{name}.jsonl"
        rows += [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "lrquant_plus"])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="where the product is timed: cpu or cuda")
    parser.add_argument(
        "--measured", nargs="*", default=[], help="stream_scale.py result names to compare with"
    )
    args = parser.parse_args()

    measured = [
        r for r in measured_rows(args.measured)
        if r["nsamples"] == args.nsamples and r["seqlen"] == args.seqlen and not r.get("overrides")
        and not r.get("perplexity")  # not evaluated: the estimate is of quantizing alone
        and r["scheme"] == {"wbits": 4, "abits": 16, "group_size": args.group_size}
        and r.get("device", "cpu") == args.device
    ]  # fmt: skip
    where = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    )
    print(f"{where}; W4A16 g{args.group_size}, `fast`, "
          f"{args.nsamples} windows x {args.seqlen} tokens, streamed")  # fmt: skip
    print("| shape | blocks | method | s per block, estimated | measured | hours in all, estimated | "
          "peak GiB, estimated | measured |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        for row in estimates(shape, args.methods, args.nsamples, args.seqlen, args.group_size, args.device):
            mine = [r for r in measured if r["shape"] == shape and r["method"] == row["method"]]
            seconds = "/".join(f"{r['seconds_per_block']:.1f}" for r in mine) or "-"
            peak = "/".join(f"{r['peak_rss_mb'] / 1024:.1f}" for r in mine) or "-"
            print(
                f"| {shape} | {row['blocks']} | {row['method']} | {row['seconds_per_block']:.1f} | "
                f"{seconds} | {row['seconds'] / 3600:.2f} | {row['peak_memory_mb'] / 1024:.1f} | {peak} |"
            )


if __name__ == "__main__":
    main()
