"""Hadamard rotations (``hadamard``): fixed orthogonal rotations of a decoder's residual stream
(QuaRot, SpinQuant's R1/R2/R4) and of linear inputs, before learning. Not LRQuant+'s learned
rotation vectors (per-row multipliers, :mod:`lrquant.transforms.weight`).

An orthogonal ``Q`` spreads an outlier channel over all channels, so per-token activation grids get
much finer, and without quantization the rotated model computes exactly what the original did:

* **residual** (``folded``): every RMSNorm weight is folded into the linears that read the norm
  (the norm keeps weight 1, and ``rms(xQ) = rms(x)``); the embedding rows become ``E Q`` (a
  vision-language model's projector, which writes the image's tokens, ``Qᵀ W``), every
  linear that reads the residual ``W Q``, every linear that writes it ``Qᵀ W`` (bias ``b Q``), and
  the head reads ``W diag(g) Q`` with the final norm's ``g``. A tied head is untied first.
* **per head** (``folded``): each value head's rows and the matching input columns of the attention
  output projection are rotated by a ``head_dim`` matrix (v -> o is linear, softmax mixes tokens).
* **down projection input** (``online``): the MLP's activation output is rotated at run time before
  it is quantized (a ``RotatedInputLinear``), the down projection's weight holding ``W R``.
  ``down`` does this one alone, for any model with an MLP (vision transformers too).
* **every linear input** (``inputs``): every linear of every block reads its input rotated at run
  time, the weight holding ``W R``, for any architecture (LayerNorm models and vision transformers,
  whose residual stream the ``folded`` rotation does not cover). Smoothing still applies: a
  linear's input is smoothed, then rotated (:class:`lrquant.transforms.weight.WeightTransform`).

``folded`` leaves an ordinary checkpoint of the same architecture; the run-time rotation needs
lrquant's loader (it is saved beside the weights).

The rotations are randomised Hadamard matrices: ``diag(±1) (H_k ⊗ O_m)`` for a dimension ``k m`` with
``k`` its largest power-of-two factor, ``O_m`` a random orthogonal matrix (576 = 64 x 9 in SmolLM2).
All seeded, built in float64 and applied in float64 before casting back.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn as nn

from lrquant.arch import ArchSpec
from lrquant.errors import LrquantError
from lrquant.quant.apply import replace_module
from lrquant.quant.hadamard import randomized_hadamard
from lrquant.quant.linear import RotatedInputLinear

HadamardMode = Literal["off", "folded", "online", "down", "inputs"]
# the modes that leave a Hadamard rotation of some linear inputs in the forward (not an ordinary
# checkpoint)
RUN_TIME_HADAMARD: tuple[HadamardMode, ...] = ("online", "down", "inputs")
HADAMARD_MODES: tuple[str, ...] = get_args(HadamardMode)


def check_hadamard_supported(arch: ArchSpec) -> None:
    """Refuse, with what to do, a model whose layout the residual-stream Hadamard rotations
    (``folded``, ``online``) do not cover."""
    if arch.embedding is None or arch.final_norm is None or not arch.residual_writers:
        raise LrquantError(
            f"hadamard rotations cover decoders with plain RMSNorm (Llama, Mistral, Qwen, ...), "
            f"not model type '{arch.model_types[0]}': use --set hadamard=off"
        )
    if arch.modality == "image-text" and not arch.stream_writers:  # images enter from the projector
        raise LrquantError(
            "the residual-stream hadamard rotations do not cover this vision-language model's projector "
            "(not a linear): use --set hadamard=down or off"
        )


def _set(linear: nn.Linear, weight: torch.Tensor) -> None:
    linear.weight.data = weight.to(linear.weight.dtype)


def _norm_pairs(arch: ArchSpec):
    return [pair for pair in arch.smooth_pairs if pair.kind == "norm"]


@torch.no_grad()
def apply_hadamard(model: nn.Module, arch: ArchSpec, mode: str, seed: int = 0) -> None:
    """Rotate ``model`` in place by randomised Hadamard matrices: ``folded`` (residual stream and
    value heads), ``online`` (those and the down projection's input), ``down`` (the down
    projection's input only) or ``inputs`` (every linear's input in the blocks); see the module
    docstring. Deterministic in ``seed``, so a resumed run rebuilds the same rotations before it
    loads its finished blocks.
    """
    plan = HadamardPlan.of(model, arch, mode, seed)
    plan.outside_blocks(model)
    for block in arch.block_list(model):
        plan.block(block)


class HadamardPlan:
    """The rotations of one run, applied in two parts: to what is outside the blocks (embedding,
    final norm, head) and to each block, when its turn comes (a streamed model's blocks are
    loaded one at a time); in block order, the same matrices as :func:`apply_hadamard`."""

    def __init__(self, arch: ArchSpec, mode: str, generator: torch.Generator, q=None, per_head=None) -> None:
        self.arch, self.mode, self.generator = arch, mode, generator
        self.q, self.per_head = q, per_head  # the residual stream's and the value heads' (folded)
        self.inner: dict[int, torch.Tensor] = {}  # run-time input rotations, one per width

    @classmethod
    def of(cls, model: nn.Module, arch: ArchSpec, mode: str, seed: int = 0) -> HadamardPlan:
        if mode not in HADAMARD_MODES:
            raise LrquantError(f"hadamard must be one of {', '.join(HADAMARD_MODES)}, not '{mode}'")
        generator = torch.Generator().manual_seed(seed)
        if mode not in ("folded", "online"):
            return cls(arch, mode, generator)
        check_hadamard_supported(arch)
        config = arch.config_of(model)
        dim = config.hidden_size
        q = randomized_hadamard(dim, generator)
        head_dim = getattr(config, "head_dim", None) or dim // config.num_attention_heads
        return cls(arch, mode, generator, q, randomized_hadamard(head_dim, generator))

    @torch.no_grad()
    def outside_blocks(self, model: nn.Module) -> None:
        """The embedding, a vision-language model's projector output, the final norm and the
        head (``folded``, ``online``); a tied head is untied first."""
        if self.q is None:
            return
        arch, q = self.arch, self.q
        config = model.config
        embedding = model.get_submodule(arch.embedding)
        heads = [model.get_submodule(name) for name in arch.heads if _has(model, name)]
        for head in heads:
            if head.weight is embedding.weight:  # tied: the head needs its own (scaled, rotated) copy
                head.weight = nn.Parameter(embedding.weight.detach().clone())
                config.tie_word_embeddings = False
                if hasattr(config, "get_text_config"):
                    config.get_text_config().tie_word_embeddings = False
        final_norm = model.get_submodule(arch.final_norm)
        _fold_norm(final_norm, heads)
        for head in heads:
            _set(head, head.weight.double() @ q)
        embedding.weight.data = (embedding.weight.double() @ q).to(embedding.weight.dtype)
        for name in arch.stream_writers:  # the image's token embeddings: rotated as the text's
            _rotate_output(model.get_submodule(name), q)

    @torch.no_grad()
    def block(self, block: nn.Module) -> None:
        """One block's rotations. A weightless block (a streamed model's skeleton, to be filled
        with weights that are rotated already) gets the run-time rotations' modules alone."""
        arch = self.arch
        weightless = any(p.is_meta for p in block.parameters())
        if self.q is not None and not weightless:
            for pair in _norm_pairs(arch):
                readers = [block.get_submodule(t) for t in pair.targets]
                _fold_norm(block.get_submodule(pair.source), readers)
                for linear in readers:
                    _set(linear, linear.weight.double() @ self.q)
            for name in arch.residual_writers:
                _rotate_output(block.get_submodule(name), self.q)
            for pair in arch.smooth_pairs:
                if pair.kind == "linear":  # v -> o: the value heads and the output projection's columns
                    _rotate_heads(
                        block.get_submodule(pair.source), block.get_submodule(pair.targets[0]), self.per_head
                    )
        if self.mode in ("online", "down"):
            self._rotate_inputs(block, list(arch.mlp_out), weightless)
        if self.mode == "inputs":
            self._rotate_inputs(block, _block_linears(block), weightless)

    def _rotate_inputs(self, block: nn.Module, names: list[str], weightless: bool = False) -> None:
        """The linears ``names`` of ``block`` read their input rotated at run time (one matrix
        per width, shared by every block)."""
        for name in names:
            linear = block.get_submodule(name)
            if linear.in_features not in self.inner:
                self.inner[linear.in_features] = randomized_hadamard(linear.in_features, self.generator)
            if not weightless:
                _set(linear, linear.weight.double() @ self.inner[linear.in_features])
            rotation = self.inner[linear.in_features].to(linear.weight.dtype)
            replace_module(block, name, RotatedInputLinear(linear, rotation))


def _block_linears(block: nn.Module) -> list[str]:
    return [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]


def _has(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """Move an RMSNorm's weight into the columns of the linears that read it; the norm keeps 1."""
    gain = norm.weight.detach().double()
    if getattr(norm, "bias", None) is not None:
        raise LrquantError("hadamard rotations need RMSNorm without a bias")
    for linear in readers:
        _set(linear, linear.weight.double() * gain)
    norm.weight.data.fill_(1.0)


def _rotate_output(linear: nn.Linear, q: torch.Tensor) -> None:
    """A linear that writes the residual: ``Qᵀ W`` and ``b Q``."""
    _set(linear, q.T @ linear.weight.double())
    if linear.bias is not None:
        linear.bias.data = (linear.bias.double() @ q).to(linear.bias.dtype)


def _rotate_heads(v_proj: nn.Linear, o_proj: nn.Linear, r: torch.Tensor) -> None:
    """Each value head's output by ``r`` (rows ``rᵀ W_v``, bias ``b r``); o_proj's columns per head
    by ``r``."""
    hd = r.shape[0]
    wv = v_proj.weight.double().reshape(-1, hd, v_proj.in_features)
    _set(v_proj, torch.einsum("ji,hjd->hid", r, wv).reshape(v_proj.out_features, -1))
    if v_proj.bias is not None:
        v_proj.bias.data = (v_proj.bias.double().reshape(-1, hd) @ r).reshape(-1).to(v_proj.bias.dtype)
    wo = o_proj.weight.double().reshape(o_proj.out_features, -1, hd)
    _set(o_proj, torch.einsum("ohj,ji->ohi", wo, r).reshape(o_proj.out_features, -1))
