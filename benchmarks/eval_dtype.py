"""Evaluation in bf16 against float32, side by side in one process (not part of CI).

Scores a language model's evaluation windows (``lrquant eval``'s data) twice: as ``lrquant
eval`` does (float32), and with every forward under bf16 autocast. Prints the perplexity and
seconds of each and the KL divergence and top-1 agreement of the bf16 forward against the
float32 one: the error bf16 evaluation would add to every figure. With ``--quantized`` (an
output folder of ``lrquant quantize``) the quantized model is scored against its
full-precision source both ways too, so the KL it reports in float32 and in bf16 sit side by
side. Rows are appended to ``results/<name>.jsonl``.

    python benchmarks/eval_dtype.py --model smollm2-135m --name eval_dtype
    python benchmarks/eval_dtype.py --model smollm2-135m --quantized out/w8a8 --name eval_dtype
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from llm_ppl import append_row, code_version, cpu_name

from lrquant.api import DataSettings, evaluation_data
from lrquant.eval.perplexity import score_windows
from lrquant.models.loading import load_model


class Bf16(torch.nn.Module):
    """``model`` with its forward under bf16 autocast (its outputs as the model returns them)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", torch.bfloat16):
            return self.model(*args, **kwargs)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantized", help="an output folder of lrquant quantize made from --model")
    parser.add_argument("--eval", default="wikipedia:test")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--name", default="eval_dtype")
    args = parser.parse_args()

    fp = load_model(args.model)
    windows = evaluation_data(fp, DataSettings(eval=args.eval, seqlen=args.seqlen, eval_windows=args.windows))
    row = {"model": args.model, "eval": args.eval, "windows": int(windows.shape[0])}
    row["fp32"], row["fp32_s"] = timed(lambda: score_windows(fp.model, windows))
    row["bf16"], row["bf16_s"] = timed(lambda: score_windows(Bf16(fp.model), windows))
    row["bf16_against_fp32"] = score_windows(Bf16(fp.model), windows, reference=fp.model)
    if args.quantized:
        quantized = load_model(args.quantized).model
        row["quantized"] = args.quantized
        row["quantized_fp32"], row["quantized_fp32_s"] = timed(
            lambda: score_windows(quantized, windows, reference=fp.model)
        )
        row["quantized_bf16"], row["quantized_bf16_s"] = timed(
            lambda: score_windows(Bf16(quantized), windows, reference=Bf16(fp.model))
        )
    row.update(commit=code_version(), cpu=cpu_name(), threads=torch.get_num_threads())
    print(json.dumps(row, indent=1))
    append_row(args.name, row)


if __name__ == "__main__":
    main()
