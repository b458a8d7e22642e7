"""Milliseconds of one weight's fake quantization while training, eager and compiled (not in CI).

Times the forward and the forward plus backward of :func:`lrquant.quant.quantizer.fake_quantize`
on one weight (default 1536 x 576, SmolLM2-135M's MLP, 4 bits in groups of 64, with learnable
clipping factors and rounding offsets, as the default weight-only recipe trains it): eager,
compiled, and compiled with autograd's own ``amax``/``amin`` for each group's range (what the
quantizer used before it took the range through its own autograd function). Then the reason for
the difference: one compiled kernel storing a boolean per element against one storing a float.

    python benchmarks/quantizer_speed.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lrquant.config import build_scheme
from lrquant.quant import quantizer
from lrquant.quant.quantizer import compiled_quantizer, fake_quantize


class _AutogradRange:
    """Each group's range through autograd's ``amax``/``amin``."""

    @staticmethod
    def apply(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)


def _milliseconds(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1536)
    parser.add_argument("--columns", type=int, default=576)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    spec = build_scheme(wbits=args.bits, group_size=args.group_size).weight
    groups = -(-args.columns // args.group_size)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(args.rows, args.columns, generator=generator).requires_grad_(True)
    upper = torch.full((args.rows, groups, 1), 4.0, requires_grad=True)
    lower = torch.full((args.rows, groups, 1), 4.0, requires_grad=True)
    offset = torch.zeros(args.rows, args.columns, requires_grad=True)

    def forward() -> torch.Tensor:
        return fake_quantize(weight, spec, torch.sigmoid(upper), torch.sigmoid(lower), offset)

    def both() -> None:
        forward().sum().backward()

    print(
        f"{args.rows} x {args.columns} weight, {args.bits} bits in groups of {args.group_size}, clipping and "
        f"rounding offsets; {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| quantizer | forward ms | forward and backward ms |")
    print("|---|---:|---:|")
    variants = [
        ("eager", False, False),
        ("compiled", True, False),
        ("compiled, autograd's amax/amin", True, True),
    ]
    real_range = quantizer._GroupRange
    for name, compiled, autograd_range in variants:
        quantizer._GroupRange = _AutogradRange if autograd_range else real_range
        torch._dynamo.reset()  # compile again for each variant
        quantizer._compiled.clear()
        with compiled_quantizer(compiled):
            times = _milliseconds(forward, args.repeats), _milliseconds(both, args.repeats)
            print(f"| {name} | {times[0]:.2f} | {times[1]:.2f} |")
    quantizer._GroupRange = real_range

    x = torch.randn(args.rows * groups, args.group_size, generator=generator)
    masks = torch.compile(lambda x: x == x.amax(-1, keepdim=True), dynamic=False)
    floats = torch.compile(lambda x: x / x.amax(-1, keepdim=True), dynamic=False)
    print(
        f"\none compiled kernel over {x.numel()} elements: storing a boolean each "
        f"{_milliseconds(lambda: masks(x), args.repeats):.2f} ms, a float each "
        f"{_milliseconds(lambda: floats(x), args.repeats):.2f} ms"
    )


if __name__ == "__main__":
    main()
