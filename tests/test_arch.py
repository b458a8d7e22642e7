"""The architecture maps agree with the real transformers modules of every tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrquant.arch import get_arch_spec, supported_model_types
from lrquant.errors import LrquantError
from lrquant.models.tiny import TINY_ARCHS, save_tiny_model, tiny_config, tiny_model, tiny_tokenizer

NUM_LAYERS = 2
DOWN_PROJ_SUFFIXES = ("down_proj", "fc2")


@pytest.fixture(scope="module", params=TINY_ARCHS)
def model(request: pytest.FixtureRequest) -> nn.Module:
    return tiny_model(request.param, seed=0, num_layers=NUM_LAYERS)


def test_tiny_archs_are_all_supported() -> None:
    assert set(TINY_ARCHS) <= set(supported_model_types())


def test_spec_resolves_blocks(model: nn.Module) -> None:
    spec = get_arch_spec(model.config.model_type)
    assert model.config.model_type in spec.model_types
    blocks = spec.block_list(model)
    assert len(blocks) == NUM_LAYERS


def test_spec_names_resolve_in_block(model: nn.Module) -> None:
    spec = get_arch_spec(model.config.model_type)
    block = spec.block_list(model)[0]
    hidden = model.config.hidden_size

    assert isinstance(block.get_submodule(spec.attention), nn.Module)
    for name in (spec.q_proj, spec.k_proj, spec.fused_qkv):
        if name is not None:
            assert isinstance(block.get_submodule(name), nn.Linear), name
    assert (spec.q_proj is None) == (spec.k_proj is None)
    assert (spec.q_proj is None) != (spec.fused_qkv is None)

    assert {p.name for p in spec.smooth_pairs} >= {"qkv", "mlp_in", "out"}
    for pair in spec.smooth_pairs:
        source = block.get_submodule(pair.source)
        targets = [block.get_submodule(t) for t in pair.targets]
        assert all(isinstance(t, nn.Linear) for t in targets), pair
        if pair.kind == "norm":
            assert not isinstance(source, nn.Linear), pair
            assert isinstance(getattr(source, "weight", None), torch.Tensor), pair
            assert source.weight.shape == (hidden,), pair
            assert all(t.in_features == hidden for t in targets), pair
        else:
            assert isinstance(source, nn.Linear), pair
            cfg = model.config
            kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
            v_rows = kv_heads * (hidden // cfg.num_attention_heads)
            if pair.source_rows == "all":
                assert source.out_features == v_rows, pair
            else:  # fused q|k|v rows: v is the last kv_heads * head_dim rows
                assert source.out_features == hidden + 2 * v_rows, pair
            # o_proj reads every query head; each kv head's v channels feed heads // kv_heads of them
            assert all(t.in_features == hidden for t in targets), pair


def test_norm_sources_feed_their_targets(model: nn.Module) -> None:
    """A norm pair's targets must read exactly the norm's output (catches e.g. Gemma's post-attn norm)."""
    spec = get_arch_spec(model.config.model_type)
    block = spec.block_list(model)[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for pair in spec.smooth_pairs:
        if pair.kind != "norm":
            continue
        hooks.append(
            block.get_submodule(pair.source).register_forward_hook(
                lambda _m, _i, out, key=pair.source: seen.__setitem__(key, out)
            )
        )
        for t in pair.targets:
            hooks.append(
                block.get_submodule(t).register_forward_hook(
                    lambda _m, inp, _o, key=t: seen.__setitem__(key, inp[0])
                )
            )
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 5, 9, 300, 42, 7, 11, 3]]))
    finally:
        for h in hooks:
            h.remove()
    for pair in spec.smooth_pairs:
        if pair.kind == "norm":
            for t in pair.targets:
                assert torch.equal(seen[t].reshape(seen[pair.source].shape), seen[pair.source]), (pair, t)


def test_every_linear_is_smoothed_or_down_proj(model: nn.Module) -> None:
    spec = get_arch_spec(model.config.model_type)
    block = spec.block_list(model)[0]
    targets = {t for pair in spec.smooth_pairs for t in pair.targets}
    linears = {name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    others = {name for name in linears - targets if not name.endswith(DOWN_PROJ_SUFFIXES)}
    assert not others, f"{model.config.model_type}: linears not covered by the map: {sorted(others)}"
    assert targets <= linears


def test_tiny_model_shapes_and_norms(model: nn.Module) -> None:
    cfg = model.config
    assert cfg.hidden_size == 64 and cfg.num_attention_heads == 4
    assert cfg.max_position_embeddings >= 256
    assert cfg.vocab_size == len(tiny_tokenizer())
    if cfg.model_type != "opt":
        assert cfg.num_key_value_heads == 2
    assert not model.training and next(model.parameters()).dtype == torch.float32
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if "norm" in name and isinstance(weight, torch.Tensor):
            assert not torch.all(weight == 1) and not torch.all(weight == 0), name


def test_tiny_model_is_deterministic() -> None:
    ids = torch.tensor([[1, 5, 9, 300, 42, 7]])
    with torch.no_grad():
        a = tiny_model("qwen3", seed=3)(ids).logits
        b = tiny_model("qwen3", seed=3)(ids).logits
        c = tiny_model("qwen3", seed=4)(ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_unknown_model_type_lists_supported() -> None:
    with pytest.raises(LrquantError) as err:
        get_arch_spec("not_a_model")
    message = str(err.value)
    assert "not_a_model" in message
    for model_type in TINY_ARCHS:
        assert model_type in message
    with pytest.raises(LrquantError):
        tiny_config("not_a_model")


def test_tokenizer_prepends_bos() -> None:
    tok = tiny_tokenizer()
    assert tok is tiny_tokenizer()
    assert 400 <= len(tok) <= 600
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    ids = tok("The quick brown fox jumps over the lazy dog.").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    plain = tok("The quick brown fox", add_special_tokens=False).input_ids
    assert plain and plain[0] != tok.bos_token_id
    assert tok.decode(plain) == "The quick brown fox"


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "opt", "phi3"])
def test_save_tiny_model_round_trip(model_type: str, tmp_path) -> None:
    path = save_tiny_model(model_type, tmp_path / model_type, seed=1)
    assert (path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("def f(x): return x + 1", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        expected = tiny_model(model_type, seed=1)(ids).logits
        got = model(ids).logits
    assert model.config.model_type == model_type
    assert torch.equal(got, expected)
