"""Quantizers inside every tiny architecture: identity at 16 bits, our eager attention equals the
library's, and each quantizer (weights, activations, Q/K/V, softmax) really acts on the forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import lrquant.quant.attention as attention_mod
import lrquant.quant.linear as linear_mod
from lrquant.arch import ArchSpec, get_arch_spec
from lrquant.config import QuantScheme, QuantSpec, build_scheme
from lrquant.errors import LrquantError
from lrquant.methods.rtn import quantize_rtn
from lrquant.models.tiny import SLIDING_WINDOW, TINY_ARCHS, tiny_model
from lrquant.quant.apply import attach_quantizers, detach_quantizers, quant_linears
from lrquant.quant.attention import ATTR
from lrquant.quant.linear import QuantLinear
from lrquant.quant.quantizer import fake_quantize

NUM_LAYERS = 2
SEQ = 48  # longer than Gemma's sliding window, so the sliding mask really cuts
assert SEQ > SLIDING_WINDOW
FP = build_scheme(wbits=16, abits=16)


@pytest.fixture(scope="module", params=TINY_ARCHS)
def base(request: pytest.FixtureRequest) -> tuple[nn.Module, ArchSpec, torch.Tensor, torch.Tensor]:
    """A tiny model (never modified: tests work on copies), its spec, input ids and FP logits."""
    model = tiny_model(request.param, seed=0, num_layers=NUM_LAYERS)
    ids = torch.randint(3, model.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return model, get_arch_spec(model.config.model_type), ids, logits(model, ids)


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def quantized(base_model: nn.Module, arch: ArchSpec, scheme: QuantScheme, rtn: bool = True) -> nn.Module:
    model = copy.deepcopy(base_model)
    if rtn:
        quantize_rtn(model, arch, scheme)
    else:
        attach_quantizers(model, arch, scheme)
    return model


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def block_linears(model: nn.Module, arch: ArchSpec) -> list[nn.Module]:
    return [m for block in arch.block_list(model) for m in block.modules() if isinstance(m, nn.Linear)]


# ----------------------------------------------------------------------------- identity and detaching


def test_full_precision_scheme_is_identity_and_detach_restores(base) -> None:
    base_model, arch, ids, ref = base
    impl = base_model.config._attn_implementation
    model = quantized(base_model, arch, FP, rtn=False)

    linears = block_linears(model, arch)
    assert linears and all(isinstance(m, QuantLinear) for m in linears)
    assert model.config._attn_implementation == "lrquant_" + impl
    assert all(hasattr(block.get_submodule(arch.attention), ATTR) for block in arch.block_list(model))
    # The LM head and embeddings stay plain.
    assert not isinstance(model.get_output_embeddings(), QuantLinear)
    assert torch.allclose(logits(model, ids), ref, atol=1e-5, rtol=0)

    detach_quantizers(model, arch)
    linears = block_linears(model, arch)
    assert linears and all(type(m) is nn.Linear for m in linears)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert not any(hasattr(block.get_submodule(arch.attention), ATTR) for block in arch.block_list(model))
    assert model.config._attn_implementation == impl
    assert torch.allclose(logits(model, ids), ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------- our eager attention vs the library


def _through_eager_path(monkeypatch: pytest.MonkeyPatch) -> list[QuantSpec]:
    """Make the softmax quantizer of the attention wrapper the identity, recording each call."""
    calls: list[QuantSpec] = []

    def identity(x: torch.Tensor, spec: QuantSpec, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(spec)
        return x

    monkeypatch.setattr(attention_mod, "fake_quantize", identity)
    return calls


def test_eager_softmax_path_equals_library_attention(base, monkeypatch: pytest.MonkeyPatch) -> None:
    """An enabled softmax spec routes attention through ``_eager_with_softmax_quant``; with its quantizer
    made the identity, it must reproduce the model's own attention (GQA, scaling, softcap, causal and
    sliding-window masks, padding)."""
    base_model, arch, ids, ref = base
    if getattr(base_model.config, "attn_logit_softcapping", None) is not None:
        # Gemma-2 caps scores at 50, which the tiny model's small scores never feel: cap harder.
        base_model = copy.deepcopy(base_model)
        for block in arch.block_list(base_model):
            block.get_submodule(arch.attention).attn_logit_softcapping = 0.05
        capped = logits(base_model, ids)
        assert not torch.allclose(capped, ref, atol=1e-3)
        ref = capped
    softmax_spec = QuantSpec(bits=8, granularity="token")
    model = quantized(base_model, arch, build_scheme(wbits=16, abits=16, softmax_bits=8), rtn=False)
    calls = _through_eager_path(monkeypatch)

    out = logits(model, ids)
    assert calls == [softmax_spec] * NUM_LAYERS  # the eager path ran in every layer
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()

    # Left padding on the second sequence: a mask the library builds explicitly.
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ref_padded = logits(base_model, ids, mask)
    out_padded = logits(model, ids, mask)
    keep = mask.bool()
    assert torch.allclose(out_padded[keep], ref_padded[keep], atol=1e-5, rtol=0)
    assert not torch.allclose(ref_padded[1, 5:], ref[1, 5:], atol=1e-3)  # the padding mattered

    # Decoding one token with a cache (q_len 1, mask skipped by sdpa) agrees too.
    with torch.no_grad():
        prefix_ref = base_model(input_ids=ids[:, :-1], use_cache=True)
        step_ref = base_model(input_ids=ids[:, -1:], cache=prefix_ref.cache).logits
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], cache=prefix.cache).logits
    assert torch.allclose(step, step_ref, atol=1e-5, rtol=0)
    assert torch.allclose(step[:, -1], ref[:, -1], atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------------------------- RTN


def test_rtn_w4a4_changes_logits_and_w8a8_is_much_closer(base) -> None:
    base_model, arch, ids, ref = base
    w4a4 = build_scheme(wbits=4, abits=4)
    assert w4a4.qkv.bits == 4
    out4 = logits(quantized(base_model, arch, w4a4), ids)
    out8 = logits(quantized(base_model, arch, build_scheme(wbits=8, abits=8)), ids)
    assert torch.isfinite(out4).all() and torch.isfinite(out8).all()
    err4, err8 = rel_err(out4, ref), rel_err(out8, ref)
    assert err4 > 0.02
    assert 0 < err8 < err4 / 5, (err8, err4)


def test_rtn_freezes_every_block_weight_on_its_grid(base) -> None:
    base_model, arch, ids, _ = base
    scheme = build_scheme(wbits=4, group_size=32)
    model = quantized(base_model, arch, scheme)
    originals = dict(base_model.named_parameters())
    names = []
    for name, linear in quant_linears(model, arch):
        names.append(name)
        assert linear.weight_frozen
        expected = fake_quantize(originals[name + ".weight"].detach(), scheme.weight)
        assert torch.equal(linear.weight.detach(), expected), name
    assert len(names) == len(block_linears(base_model, arch))
    # The LM head is untouched.
    assert torch.equal(model.get_output_embeddings().weight, base_model.get_output_embeddings().weight)


# -------------------------------------------------------------------------------------------- QuantLinear


def test_freeze_weight_uses_stored_weight_with_identical_output(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    original = linear.weight.detach().clone()
    wspec = QuantSpec(bits=4, granularity="group", group_size=16)
    aspec = QuantSpec(bits=8, granularity="token")
    qlinear = QuantLinear(linear, wspec, aspec)
    assert qlinear.weight is linear.weight and qlinear.bias is linear.bias  # shared, not copied
    assert not qlinear.weight_frozen
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        unfrozen = qlinear(x)
        expected = nn.functional.linear(fake_quantize(x, aspec), fake_quantize(original, wspec), linear.bias)
    assert torch.equal(unfrozen, expected)
    assert not torch.allclose(unfrozen, linear(x), atol=1e-4)  # quantization did something

    qlinear.freeze_weight()
    assert qlinear.weight_frozen
    assert torch.equal(qlinear.weight.detach(), fake_quantize(original, wspec))
    assert torch.equal(linear.weight.detach(), qlinear.weight.detach())  # written in place

    seen: list[QuantSpec] = []

    def recording(t: torch.Tensor, spec: QuantSpec, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(spec)
        return fake_quantize(t, spec, *args, **kwargs)

    monkeypatch.setattr(linear_mod, "fake_quantize", recording)
    with torch.no_grad():
        frozen = qlinear(x)
    assert torch.equal(frozen, unfrozen)
    assert seen == [aspec]  # only the input is quantized; the stored weight is used as it is

    # The forward really reads the stored weight: an off-grid edit shows up unrounded.
    with torch.no_grad():
        qlinear.weight[0, 0] += 1e-3
        edited = qlinear(x)
    assert not torch.equal(edited, frozen)
    with torch.no_grad():
        direct = nn.functional.linear(fake_quantize(x, aspec), qlinear.weight, qlinear.bias)
    assert torch.equal(edited, direct)

    # Freezing again does not re-quantize.
    before = qlinear.weight.detach().clone()
    qlinear.freeze_weight()
    assert torch.equal(qlinear.weight.detach(), before)

    plain = qlinear.to_linear()
    assert type(plain) is nn.Linear and plain.weight is qlinear.weight and plain.bias is qlinear.bias


def test_weight_quantized_linear_keeps_gradient_to_weight() -> None:
    linear = nn.Linear(16, 8)
    qlinear = QuantLinear(linear, QuantSpec(bits=4), QuantSpec(bits=16, granularity="token"))
    qlinear(torch.randn(3, 16)).sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_state_dict_keys_unchanged(base) -> None:
    base_model, arch, _, _ = base
    keys = list(base_model.state_dict())
    model = quantized(base_model, arch, build_scheme(wbits=4, abits=8, group_size=32))
    state = model.state_dict()
    assert list(state) == keys
    for name, linear in quant_linears(model, arch):
        assert state[name + ".weight"].data_ptr() == linear.weight.data_ptr()
    detach_quantizers(model, arch)
    assert list(model.state_dict()) == keys


# ---------------------------------------------------------------------- the attention hooks really act


@pytest.mark.parametrize("qkv_bits", [4, 16])
def test_qkv_quantization_happens(base, qkv_bits: int) -> None:
    base_model, arch, ids, ref = base
    scheme = build_scheme(wbits=16, abits=16, qkv_bits=qkv_bits)
    assert not scheme.weight.enabled and not scheme.activation.enabled
    out = logits(quantized(base_model, arch, scheme), ids)
    assert torch.isfinite(out).all()
    if qkv_bits == 16:
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    else:
        assert (out - ref).abs().max().item() > 1e-3


def test_qkv_quantizer_sees_query_key_value_after_projection(base, monkeypatch: pytest.MonkeyPatch) -> None:
    base_model, arch, ids, _ = base
    config = base_model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = config.hidden_size // heads
    scheme = build_scheme(wbits=16, abits=16, qkv_bits=4)
    model = quantized(base_model, arch, scheme)
    seen: list[tuple[tuple[int, ...], QuantSpec]] = []

    def recording(x: torch.Tensor, spec: QuantSpec, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append((tuple(x.shape), spec))
        return fake_quantize(x, spec, *args, **kwargs)

    monkeypatch.setattr(attention_mod, "fake_quantize", recording)
    logits(model, ids)
    batch = ids.shape[0]
    q_shape, kv_shape = (batch, heads, SEQ, head_dim), (batch, kv_heads, SEQ, head_dim)
    assert seen == [(q_shape, scheme.qkv), (kv_shape, scheme.qkv), (kv_shape, scheme.qkv)] * NUM_LAYERS


@pytest.mark.parametrize("softmax_bits", [4, 16])
def test_softmax_quantization_happens(base, softmax_bits: int) -> None:
    base_model, arch, ids, ref = base
    out = logits(
        quantized(base_model, arch, build_scheme(wbits=16, abits=16, softmax_bits=softmax_bits)), ids
    )
    assert torch.isfinite(out).all()
    if softmax_bits == 16:
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    else:
        assert (out - ref).abs().max().item() > 1e-3


def test_activation_quantization_happens(base) -> None:
    base_model, arch, ids, ref = base
    scheme = QuantScheme(weight=QuantSpec(bits=16), activation=QuantSpec(bits=4, granularity="token"))
    out = logits(quantized(base_model, arch, scheme), ids)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------- rotated Q, K and V


def test_qkv_rotation_is_exact_without_quantization(base, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Q/K/V quantizer made the identity, rotating each head changes nothing (sdpa and our
    eager softmax path, GQA, RoPE, sliding windows, a cached decoding step), while the quantizer
    really sees rotated tensors: the same per-head norms, other values."""
    base_model, arch, ids, ref = base
    seen: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    for softmax_bits in (16, 8):
        for rotate in (False, True):
            scheme = build_scheme(
                wbits=16, abits=16, qkv_bits=4, softmax_bits=softmax_bits, rotate_qkv=rotate
            )
            model = quantized(base_model, arch, scheme, rtn=False)

            def identity(x: torch.Tensor, spec: QuantSpec, *args: object, rotate=rotate) -> torch.Tensor:
                if spec.bits == 4:  # Q, K and V, not the softmax output
                    seen[rotate].append(x)
                return x

            monkeypatch.setattr(attention_mod, "fake_quantize", identity)
            assert rel_err(logits(model, ids), ref) < 1e-5
            with torch.no_grad():
                prefix = model(input_ids=ids[:, :-1], use_cache=True)
                step = model(input_ids=ids[:, -1:], cache=prefix.cache).logits
            assert torch.allclose(step[:, -1], ref[:, -1], atol=1e-4, rtol=0)
            monkeypatch.undo()
    assert len(seen[True]) == len(seen[False]) > 0
    for plain, rotated in zip(seen[False], seen[True], strict=True):
        assert torch.allclose(plain.norm(dim=-1), rotated.norm(dim=-1), atol=1e-4, rtol=1e-5)
        assert not torch.allclose(plain, rotated, atol=1e-3)


def test_qkv_rotation_shrinks_the_4_bit_error_of_outlier_dimensions() -> None:
    """One dimension of every head of Q, K and V 20x larger (as real models have): at 4 bits the
    rotated heads' grids are finer, and the logits closer to full precision."""
    model = tiny_model("llama", seed=0, num_layers=NUM_LAYERS)
    arch = get_arch_spec("llama")
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    qkv = next(pair for pair in arch.smooth_pairs if pair.name == "qkv")
    with torch.no_grad():
        for block in arch.block_list(model):
            for name in qkv.targets:
                block.get_submodule(name).weight[1::head_dim] *= 20
    ids = torch.randint(3, model.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    errors = {}
    for rotate in (False, True):
        scheme = build_scheme(wbits=16, abits=16, qkv_bits=4, rotate_qkv=rotate)
        errors[rotate] = rel_err(logits(quantized(model, arch, scheme), ids), ref)
    assert errors[True] < 0.75 * errors[False], errors  # 0.68 with these 16-dimensional heads


def test_qkv_rotation_needs_quantized_qkv() -> None:
    with pytest.raises(LrquantError, match="rotate-qkv"):
        build_scheme(wbits=4, abits=16, rotate_qkv=True)
    assert build_scheme(wbits=4, abits=16, qkv_bits=8, rotate_qkv=True).rotate_qkv
