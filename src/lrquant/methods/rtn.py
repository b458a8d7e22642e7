"""Round-to-nearest: every weight on its min/max grid, no calibration."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
from tqdm.auto import tqdm

from lrquant.arch import ArchSpec
from lrquant.config import QuantScheme
from lrquant.models.streaming import Stream
from lrquant.quant.apply import (
    attach_block_quantizers,
    attach_head_quantizers,
    attach_quantizers,
    quant_linears,
    quantize_patch_embedding,
    use_quantized_attention,
)
from lrquant.quant.linear import QuantLinear


def quantize_rtn(model: nn.Module, arch: ArchSpec, scheme: QuantScheme) -> None:
    """Attach quantizers and round every block weight to nearest, in place."""
    attach_quantizers(model, arch, scheme)
    quantize_patch_embedding(model, scheme)
    for _, linear in tqdm(
        list(quant_linears(model, arch)), desc="rtn", unit="linear", disable=None, leave=False
    ):
        linear.freeze_weight()


def quantize_rtn_streamed(
    stream: Stream, scheme: QuantScheme, done: Callable[[int, nn.Module], None]
) -> None:
    """:func:`quantize_rtn` for a streamed model: each block loaded, rounded, handed to
    ``done(index, block)`` (which keeps it) and dropped."""
    model, arch = stream.model, stream.arch
    attach_head_quantizers(model, arch, scheme)
    use_quantized_attention(model)
    for index in tqdm(range(len(stream)), desc="rtn", unit="block", disable=None, leave=False):
        block = stream.load(index)
        attach_block_quantizers(block, arch, scheme, prefix=stream.names[index])
        for module in block.modules():
            if isinstance(module, QuantLinear):
                module.freeze_weight()
        done(index, block)
        stream.release(index)
