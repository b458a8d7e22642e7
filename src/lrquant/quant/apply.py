"""Put quantizers into a model, and take them out again for saving."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from lrquant.arch import ArchSpec
from lrquant.config import QuantScheme
from lrquant.errors import LrquantError
from lrquant.quant.attention import ATTR, AttentionQuant, base_implementation, quantized_implementation
from lrquant.quant.linear import QuantLinear
from lrquant.quant.quantizer import fake_quantize


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``root`` is."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def attach_quantizers(
    model: nn.Module, arch: ArchSpec, scheme: QuantScheme, weights_on_grid: bool = False
) -> None:
    """Swap every linear inside the transformer blocks for a :class:`QuantLinear` and make the
    attention modules quantize Q, K, V (and optionally the softmax output).

    Embeddings (patch embeddings too) and the final norm stay in full precision; so does the LM or
    classifier head unless ``scheme.head``. ``weights_on_grid`` marks
    weights as already quantized (a saved quantized checkpoint), so they are used as stored.
    """
    for prefix, block in arch.named_blocks(model):
        attach_block_quantizers(block, arch, scheme, weights_on_grid, prefix)
    attach_head_quantizers(model, arch, scheme, weights_on_grid)
    use_quantized_attention(model)


def head_linears(model: nn.Module, arch: ArchSpec) -> list[tuple[str, nn.Linear]]:
    """The model's output heads that are linear layers (a backbone has none)."""
    found = []
    for name in arch.heads:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            found.append((name, module))
    return found


def attach_head_quantizers(
    model: nn.Module, arch: ArchSpec, scheme: QuantScheme, weights_on_grid: bool = False
) -> None:
    """With ``scheme.head``, quantize the output heads like block linears (their weights rounded to
    nearest unless already on the grid). A head tied to the input embeddings is refused: rounding
    it would round the embeddings too."""
    if not scheme.head:
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, linear in head_linears(model, arch):
        if isinstance(linear, QuantLinear):
            continue
        if isinstance(embeddings, nn.Embedding) and linear.weight is embeddings.weight:
            raise LrquantError(
                f"'{name}' shares its weight with the input embeddings: it cannot be quantized "
                "alone; leave out --quantize-head"
            )
        qlinear = QuantLinear(linear, scheme.weight_for(name), scheme.activation)
        if weights_on_grid:
            qlinear.weight_frozen = True
        else:
            qlinear.freeze_weight()
        replace_module(model, name, qlinear)


def patch_embedding(model: nn.Module) -> nn.Conv2d:
    """A vision model's patch embedding: its first ``Conv2d`` named ``*patch_embed*`` (ViT, DeiT,
    DINOv2 and Swin ``embeddings.patch_embeddings.projection``, CLIP and SigLIP
    ``embeddings.patch_embedding``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and "patch_embed" in name:
            return module
    raise LrquantError(
        f"{type(model).__name__} has no patch embedding (a Conv2d): --quantize-patch-embed is for "
        "vision models"
    )


@torch.no_grad()
def quantize_patch_embedding(model: nn.Module, scheme: QuantScheme) -> None:
    """With ``scheme.patch_embed``, round the patch embedding's weight to nearest on the weight
    grid, in place: one row per output channel (``in_channels x kernel`` values, grouped as the
    block weights are)."""
    if not scheme.patch_embed or not scheme.weight.enabled:
        return
    weight = patch_embedding(model).weight
    rows = weight.reshape(weight.shape[0], -1)
    weight.copy_(fake_quantize(rows, scheme.weight).reshape(weight.shape))


def attach_block_quantizers(
    block: nn.Module, arch: ArchSpec, scheme: QuantScheme, weights_on_grid: bool = False, prefix: str = ""
) -> None:
    """:func:`attach_quantizers` for one block, called ``prefix`` in the model (which names the
    linears of ``scheme.weight_grids``); the model must also :func:`use_quantized_attention`."""
    for name, child in list(block.named_modules()):
        if isinstance(child, nn.Linear) and not isinstance(child, QuantLinear):
            act = scheme.mlp_out_activation if name in arch.mlp_out else scheme.activation
            qlinear = QuantLinear(child, scheme.weight_for(f"{prefix}.{name}" if prefix else name), act)
            qlinear.weight_frozen = qlinear.weight_frozen or weights_on_grid
            replace_module(block, name, qlinear)
    setattr(
        block.get_submodule(arch.attention),
        ATTR,
        AttentionQuant(scheme.qkv, scheme.softmax, scheme.rotate_qkv),
    )


def use_quantized_attention(model: nn.Module) -> None:
    """Route the model's attention through the quantizing wrapper (a no-op for blocks without settings)."""
    model.set_attn_implementation(quantized_implementation(model.config._attn_implementation))


def detach_quantizers(model: nn.Module, arch: ArchSpec) -> None:
    """Undo :func:`attach_quantizers`, keeping whatever weights the linears hold now."""
    for name, head in head_linears(model, arch):
        if isinstance(head, QuantLinear):
            replace_module(model, name, head.to_linear())
    for block in arch.block_list(model):
        detach_block_quantizers(block, arch)
    model.set_attn_implementation(base_implementation(model.config._attn_implementation))


def detach_block_quantizers(block: nn.Module, arch: ArchSpec) -> None:
    """:func:`detach_quantizers` for one block."""
    for name, child in list(block.named_modules()):
        if isinstance(child, QuantLinear):
            replace_module(block, name, child.to_linear())
    attention = block.get_submodule(arch.attention)
    if hasattr(attention, ATTR):
        delattr(attention, ATTR)


def quant_linears(model: nn.Module, arch: ArchSpec) -> Iterator[tuple[str, QuantLinear]]:
    """Every quantized linear in the blocks (and heads), with its name relative to the model."""
    for prefix, block in arch.named_blocks(model):
        for name, child in block.named_modules():
            if isinstance(child, QuantLinear):
                yield f"{prefix}.{name}", child
    for name, head in head_linears(model, arch):
        if isinstance(head, QuantLinear):
            yield name, head
