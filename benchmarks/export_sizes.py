"""Bytes of the transformer blocks in packed exports, against the same weights in bf16.

The blocks are what quantization packs (the embedding and head are each format's own choice), so
this is the ratio the formats are judged by: for every tensor of a block (GGUF ``blk.*``,
safetensors ``*.layers.*``), its stored bytes, against 2 bytes for each weight it holds.

    python benchmarks/export_sizes.py out/w4g32.gguf out/w4g32-compressed-tensors
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import gguf


def gguf_blocks(path: Path) -> tuple[int, int]:
    """(stored bytes, weights) of the ``blk.*`` tensors of a GGUF file."""
    stored = weights = 0
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.name.startswith("blk."):
            stored += int(tensor.n_bytes)
            weights += int(tensor.n_elements)
    return stored, weights


def folder_blocks(path: Path) -> tuple[int, int]:
    """(stored bytes, weights) of the ``*.layers.*`` tensors of a safetensors folder: a packed
    weight holds the weights of its ``weight_shape``, its scales and zero points none."""
    from safetensors import safe_open

    stored = weights = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if ".layers." not in key:
                    continue
                tensor = f.get_tensor(key)
                stored += tensor.numel() * tensor.element_size()
                name = key.rsplit(".", 1)[-1]
                if name == "weight_shape":
                    weights += math.prod(tensor.tolist())
                elif not name.startswith(("weight_packed", "weight_scale", "weight_zero", "input_")):
                    weights += tensor.numel()
    return stored, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="GGUF files or safetensors folders")
    args = parser.parse_args()
    print("| export | block MiB | bf16 MiB | ratio |\n|---|---|---|---|")
    for path in args.paths:
        stored, weights = gguf_blocks(path) if path.is_file() else folder_blocks(path)
        ratio = stored / (2 * weights)
        print(f"| {path.name} | {stored / 2**20:.1f} | {2 * weights / 2**20:.1f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
