"""Round-to-nearest: every weight on its min/max grid, no calibration."""

from __future__ import annotations

import torch.nn as nn
from tqdm.auto import tqdm

from lrquant.arch import ArchSpec
from lrquant.config import QuantScheme
from lrquant.quant.apply import attach_quantizers, quant_linears, quantize_patch_embedding


def quantize_rtn(model: nn.Module, arch: ArchSpec, scheme: QuantScheme) -> None:
    """Attach quantizers and round every block weight to nearest, in place."""
    attach_quantizers(model, arch, scheme)
    quantize_patch_embedding(model, scheme)
    for _, linear in tqdm(
        list(quant_linears(model, arch)), desc="rtn", unit="linear", disable=None, leave=False
    ):
        linear.freeze_weight()
