"""Put quantizers into a model, and take them out again for saving."""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn as nn

from lrquant.arch import ArchSpec
from lrquant.config import QuantScheme
from lrquant.quant.attention import ATTR, AttentionQuant, base_implementation, quantized_implementation
from lrquant.quant.linear import QuantLinear


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``root`` is."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def attach_quantizers(
    model: nn.Module, arch: ArchSpec, scheme: QuantScheme, weights_on_grid: bool = False
) -> None:
    """Swap every linear inside the transformer blocks for a :class:`QuantLinear` and make the
    attention modules quantize Q, K, V (and optionally the softmax output).

    Embeddings (patch embeddings too), the final norm and the LM or classifier head stay in full
    precision. ``weights_on_grid`` marks
    weights as already quantized (a saved quantized checkpoint), so they are used as stored.
    """
    for block in arch.block_list(model):
        attach_block_quantizers(block, arch, scheme, weights_on_grid)
    use_quantized_attention(model)


def attach_block_quantizers(
    block: nn.Module, arch: ArchSpec, scheme: QuantScheme, weights_on_grid: bool = False
) -> None:
    """:func:`attach_quantizers` for one block (the model must also :func:`use_quantized_attention`)."""
    for name, child in list(block.named_modules()):
        if isinstance(child, nn.Linear) and not isinstance(child, QuantLinear):
            act = scheme.mlp_out_activation if name in arch.mlp_out else scheme.activation
            qlinear = QuantLinear(child, scheme.weight, act)
            qlinear.weight_frozen = qlinear.weight_frozen or weights_on_grid
            replace_module(block, name, qlinear)
    setattr(block.get_submodule(arch.attention), ATTR, AttentionQuant(scheme.qkv, scheme.softmax))


def use_quantized_attention(model: nn.Module) -> None:
    """Route the model's attention through the quantizing wrapper (a no-op for blocks without settings)."""
    model.set_attn_implementation(quantized_implementation(model.config._attn_implementation))


def detach_quantizers(model: nn.Module, arch: ArchSpec) -> None:
    """Undo :func:`attach_quantizers`, keeping whatever weights the linears hold now."""
    for block in arch.block_list(model):
        for name, child in list(block.named_modules()):
            if isinstance(child, QuantLinear):
                replace_module(block, name, child.to_linear())
        attention = block.get_submodule(arch.attention)
        if hasattr(attention, ATTR):
            delattr(attention, ATTR)
    model.set_attn_implementation(base_implementation(model.config._attn_implementation))


def quant_linears(model: nn.Module, arch: ArchSpec) -> Iterator[tuple[str, QuantLinear]]:
    """Every quantized linear in the blocks, with its name relative to the model."""
    for prefix, block in arch.named_blocks(model):
        for name, child in block.named_modules():
            if isinstance(child, QuantLinear):
                yield f"{prefix}.{name}", child
