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

    Embeddings (patch embeddings too) and the final norm stay in full precision; so do the LM or
    classifier head unless ``scheme.head``, and a vision-language model's projector unless
    ``scheme.projector``. ``weights_on_grid`` marks
    weights as already quantized (a saved quantized checkpoint), so they are used as stored.
    """
    for prefix, block in arch.named_blocks(model):
        attach_block_quantizers(block, arch, scheme, weights_on_grid, prefix)
    attach_head_quantizers(model, arch, scheme, weights_on_grid)
    attach_projector_quantizers(model, arch, scheme, weights_on_grid)
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


def projector_linears(model: nn.Module, arch: ArchSpec) -> list[tuple[str, nn.Linear]]:
    """The linear layers of a vision-language model's projector (a model without one has none)."""
    if arch.projector is None:
        return []
    projector = model.get_submodule(arch.projector)
    return [
        (f"{arch.projector}.{name}", m) for name, m in projector.named_modules() if isinstance(m, nn.Linear)
    ]


def outer_linears(model: nn.Module, arch: ArchSpec) -> list[tuple[str, nn.Linear]]:
    """The linears outside the blocks that may be quantized: the heads and a projector's."""
    return head_linears(model, arch) + projector_linears(model, arch)


def check_projector(model: nn.Module, arch: ArchSpec) -> None:
    """Refuse, in one line, ``--quantize-projector`` for a model without a projector of linears."""
    if arch.projector is None:
        raise LrquantError(
            f"--quantize-projector applies to a vision-language model's projector; this {arch.modality} "
            "model has none: leave it out"
        )
    if not projector_linears(model, arch):
        raise LrquantError(
            f"the projector '{arch.projector}' holds no linear layer (Gemma 3's is a matrix), so "
            "there is nothing to quantize: leave out --quantize-projector"
        )


def _round_outside(
    model: nn.Module, name: str, linear: nn.Linear, scheme: QuantScheme, on_grid: bool
) -> None:
    """Put a :class:`QuantLinear` in place of the linear ``name`` outside the blocks, its weight
    rounded to nearest (``on_grid``: already there)."""
    qlinear = QuantLinear(linear, scheme.weight_for(name), scheme.activation)
    if on_grid:
        qlinear.weight_frozen = True
    else:
        qlinear.freeze_weight()
    replace_module(model, name, qlinear)


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
        _round_outside(model, name, linear, scheme, weights_on_grid)


def attach_projector_quantizers(
    model: nn.Module, arch: ArchSpec, scheme: QuantScheme, weights_on_grid: bool = False
) -> None:
    """With ``scheme.projector``, quantize a vision-language model's projector linears: weights
    rounded to nearest (unless already on the grid), inputs at the activation grid."""
    if not scheme.projector:
        return
    check_projector(model, arch)
    for name, linear in projector_linears(model, arch):
        if not isinstance(linear, QuantLinear):
            _round_outside(model, name, linear, scheme, weights_on_grid)


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


def quantize_before_blocks(model: nn.Module, arch: ArchSpec, scheme: QuantScheme) -> None:
    """Quantize what runs before the first block when the scheme asks: a vision model's patch
    embedding, a vision-language model's projector (for the quantized chain's inputs)."""
    quantize_patch_embedding(model, scheme)
    attach_projector_quantizers(model, arch, scheme)


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
    for name, head in outer_linears(model, arch):
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
    """Every quantized linear in the blocks (and heads, projector), with its name relative to the model."""
    for prefix, block in arch.named_blocks(model):
        for name, child in block.named_modules():
            if isinstance(child, QuantLinear):
                yield f"{prefix}.{name}", child
    for name, head in outer_linears(model, arch):
        if isinstance(head, QuantLinear):
            yield name, head
