"""Learnable equivalent transforms: exact in full precision for every tiny architecture (before and
after folding), the LAE / SmoothQuant initialisations, and the truncation of small scales."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from helpers import logits, rel_err

from lrquant.arch import ArchSpec, get_arch_spec
from lrquant.config import build_scheme
from lrquant.methods.blockwise import quantize_blockwise
from lrquant.models.tiny import TINY_ARCHS, tiny_model
from lrquant.quant.apply import attach_block_quantizers, use_quantized_attention
from lrquant.quant.linear import QuantLinear, weights_held
from lrquant.recipes import build_recipe
from lrquant.transforms.block import (
    AttentionLayout,
    BlockTransforms,
    ChannelStats,
    TransformOptions,
    attach_block_transforms,
    fold_block_transforms,
)
from lrquant.transforms.smoothing import (
    MIN_SCALE,
    SmoothedNorm,
    SmoothingFactor,
    log_activation_equivalent,
    smoothquant_scale,
)

FP = build_scheme(16, 16)
SEQ = 40  # longer than Gemma's sliding window (32)


def random_stats(block: nn.Module, arch: ArchSpec, generator: torch.Generator) -> dict[str, ChannelStats]:
    """Input ranges of each pair's first target: negative minima, positive maxima, very uneven sizes."""
    stats = {}
    for pair in arch.smooth_pairs:
        n = block.get_submodule(pair.targets[0]).in_features
        lo = -(0.05 + 8 * torch.rand(n, generator=generator) ** 3)
        hi = 0.05 + 8 * torch.rand(n, generator=generator) ** 3
        stats[pair.targets[0]] = ChannelStats(lo, hi)
    return stats


@torch.no_grad()
def perturb(bt: BlockTransforms, generator: torch.Generator) -> None:
    """Move every factor like training would: scales by exp(0.5·N(0,1)), shifts to random values."""
    for factor in bt.factors.values():
        factor.scale.mul_(torch.exp(0.5 * torch.randn(factor.scale.shape, generator=generator)))
        if factor.shift is not None:
            factor.shift.copy_(0.5 * torch.randn(factor.shift.shape, generator=generator))


def first_projection(block: nn.Module, arch: ArchSpec) -> QuantLinear:
    return block.get_submodule(arch.fused_qkv or arch.q_proj)


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_transforms_are_exact_in_full_precision_before_and_after_fold(model_type: str) -> None:
    model = tiny_model(model_type, seed=0, num_layers=2)
    arch = get_arch_spec(model.config.model_type)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, SEQ), generator=generator)
    ref = logits(model, ids)
    original_q = [first_projection(b, arch).weight.detach().clone() for b in arch.block_list(model)]

    layout = AttentionLayout.from_config(model.config)
    shifts = arch.norm_kind == "layer"
    options = TransformOptions(shifts=shifts, clipping=False, rotation_vectors=False)
    use_quantized_attention(model)
    transforms = []
    for block in arch.block_list(model):
        attach_block_quantizers(block, arch, FP)
        bt = attach_block_transforms(block, arch, layout, random_stats(block, arch, generator), options)
        assert set(bt.factors) == {"qkv", "mlp_in", "out"} | (set() if arch.qk_norm else {"qk"})
        assert ("qk" in bt.factors) == (model_type not in ("qwen3", "gemma3_text"))
        assert all((f.shift is not None) == shifts for n, f in bt.factors.items() if n != "qk")
        assert not bt.clipping and not bt.rotation_vectors  # 16-bit weights: nothing to clip or rotate
        assert sum(isinstance(m, SmoothedNorm) for m in block.modules()) == 2
        transforms.append(bt)

    # The LAE initialisation alone is already an exact equivalence.
    assert rel_err(logits(model, ids), ref) < 1e-5

    for bt in transforms:
        perturb(bt, generator)
    err_trained = rel_err(logits(model, ids), ref)
    assert err_trained < 1e-5, err_trained

    for block in arch.block_list(model):
        fold_block_transforms(block, arch)
        assert not any(isinstance(m, SmoothedNorm) for m in block.modules())
        assert all(m.transform is None for m in block.modules() if isinstance(m, QuantLinear))
    err_folded = rel_err(logits(model, ids), ref)
    assert err_folded < 1e-5, err_folded

    # Not vacuous: the folded weights are far from the originals.
    for block, before in zip(arch.block_list(model), original_q, strict=True):
        assert rel_err(first_projection(block, arch).weight, before) > 0.3
    if shifts:  # OPT: the shifts went into the norm biases and the targets' biases
        block = arch.block_list(model)[0]
        assert block.get_submodule("self_attn.q_proj").bias is not None


@pytest.mark.parametrize("model_type", ["llama", "opt", "phi3", "gemma3_text"])
def test_full_precision_learned_pipeline_is_identity(model_type: str) -> None:
    model = tiny_model(model_type, seed=0, num_layers=2)
    arch = get_arch_spec(model.config.model_type)
    generator = torch.Generator().manual_seed(2)
    calibration = torch.randint(3, model.config.vocab_size, (4, 32), generator=generator)
    ids = torch.randint(3, model.config.vocab_size, (2, SEQ), generator=generator)
    ref = logits(model, ids)
    before = copy.deepcopy(model)

    recipe = build_recipe("lrquant_plus", "fast", {"epochs": 0})
    reports = quantize_blockwise(model, arch, FP, recipe, calibration, seed=0).reports

    assert [r.index for r in reports] == [0, 1]
    assert all(r.cosine > 1 - 1e-6 and r.mse < 1e-10 for r in reports)
    err = rel_err(logits(model, ids), ref)
    assert err < 1e-5, err
    # The smoothing was really folded (LAE scales are far from 1), it just changed nothing.
    q = first_projection(arch.block_list(model)[0], arch).weight
    assert rel_err(q, first_projection(arch.block_list(before)[0], arch).weight) > 0.1


def test_log_activation_equivalent_formula() -> None:
    amax = torch.tensor([0.0, 1e-7, 0.5, 1.0, 2.0, 14.0, 1000.0])
    got = log_activation_equivalent(amax)
    expected = [
        max(max(a, 1e-5) / math.log2(2 + max(a, 1e-5)), 1e-5) for a in amax.tolist()
    ]  # s = max|X| / log2(2 + max|X|)
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-6, atol=0)
    assert got[3].item() == pytest.approx(1 / math.log2(3))
    assert got[5].item() == pytest.approx(14 / 4)  # log2(16) = 4
    assert got[6].item() == pytest.approx(1000 / math.log2(1002))


def test_smoothquant_scale_formula() -> None:
    act = torch.tensor([4.0, 0.25, 9.0, 0.0])
    weight = torch.tensor([1.0, 4.0, 0.5, 2.0])
    for alpha in (0.5, 0.75):
        got = smoothquant_scale(act, weight, alpha)
        expected = [
            max(max(a, 1e-5) ** alpha / max(w, 1e-5) ** (1 - alpha), 1e-5)
            for a, w in zip(act.tolist(), weight.tolist(), strict=True)
        ]
        assert torch.allclose(got, torch.tensor(expected), rtol=1e-6, atol=0)
    assert smoothquant_scale(act, weight, 0.5)[0].item() == pytest.approx(2.0)  # sqrt(4) / sqrt(1)
    assert smoothquant_scale(act, weight, 0.5)[1].item() == pytest.approx(0.25)  # 0.5 / 2


def test_small_scales_are_truncated_with_straight_through_gradient() -> None:
    factor = SmoothingFactor(torch.tensor([1e-3, -1e-4, 0.0, 0.5, -2.0, 0.02]))
    value = factor.value()
    assert torch.equal(value, torch.tensor([MIN_SCALE, -MIN_SCALE, MIN_SCALE, 0.5, -2.0, 0.02]))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (value * weights).sum().backward()
    assert torch.equal(factor.scale.grad, weights)  # identity gradient, truncated entries included
    # The stored parameter itself is untouched.
    assert factor.scale[0].item() == pytest.approx(1e-3)


def test_held_weights_compute_each_weight_once_and_the_same_output() -> None:
    """``weights_held``: a pass over several batches quantizes each learning linear's weight once
    (on entry), gives what the unheld forwards give, and lets go on exit (the transforms move
    again, so the next forward must see them)."""
    model = tiny_model("llama", seed=0, num_layers=1)
    arch = get_arch_spec("llama")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, SEQ), generator=generator)
    use_quantized_attention(model)
    block = arch.block_list(model)[0]
    attach_block_quantizers(block, arch, build_scheme(3, 16, group_size=16))
    options = TransformOptions(shifts=False, clipping=True, rotation_vectors=True)
    bt = attach_block_transforms(
        block, arch, AttentionLayout.from_config(model.config), random_stats(block, arch, generator), options
    )
    perturb(bt, generator)
    linears = [m for m in block.modules() if isinstance(m, QuantLinear)]
    calls = {"n": 0}
    for m in linears:
        compute = m.transform.weight_and_bias

        def counted(*args, _compute=compute):
            calls["n"] += 1
            return _compute(*args)

        m.transform.weight_and_bias = counted
    ref = logits(model, ids)
    assert calls["n"] == len(linears)  # once per forward, unheld
    calls["n"] = 0
    with weights_held(block):
        held = [logits(model, ids) for _ in range(3)]
    assert calls["n"] == len(linears)  # once for the three forwards
    assert all(torch.equal(out, ref) for out in held)
    assert all(m.held is None for m in linears)
    perturb(bt, generator)  # a moved transform reaches the next forward
    assert rel_err(logits(model, ids), ref) > 1e-3
