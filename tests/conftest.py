"""Shared fixtures: a private cache, tiny model folders and small English text files.

Everything runs offline: the tiny models and their tokenizer are built locally, and the text comes
from CPython's ``pydoc_data`` module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``LRQUANT_CACHE`` at a temporary folder for the whole session, then restore it."""
    cache = tmp_path_factory.mktemp("lrquant-cache")
    old = os.environ.get("LRQUANT_CACHE")
    os.environ["LRQUANT_CACHE"] = str(cache)
    try:
        yield cache
    finally:
        if old is None:
            os.environ.pop("LRQUANT_CACHE", None)
        else:
            os.environ["LRQUANT_CACHE"] = old


def english_text(chars: int) -> str:
    """About ``chars`` characters of English prose (Python's help topics), deterministic."""
    parts, total = [], 0
    for key in sorted(topics):
        parts.append(topics[key].strip())
        total += len(parts[-1]) + 2
        if total >= chars:
            break
    return "\n\n".join(parts)[:chars]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder that will hold the output and the bad inputs, also the working directory."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture(scope="session")
def make_text():
    """The :func:`english_text` function, for tests that need text of a given size."""
    return english_text


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UTF-8 text file of about 12 KB of English (a few thousand tiny-tokenizer tokens)."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(english_text(12_000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def short_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text file far too short for one window of 512 tokens."""
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text("Just a few words of text.\n", encoding="utf-8")
    return path


class TinyModels:
    """Tiny model folders built on first use and reused for the whole session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def __call__(self, model_type: str) -> Path:
        if model_type not in self._built:
            from lrquant.models.tiny import save_tiny_model

            self._built[model_type] = save_tiny_model(model_type, self.root / model_type)
        return self._built[model_type]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """``tiny_models("llama")`` is the path of a saved tiny llama folder (safetensors + tokenizer)."""
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: TinyModels) -> Path:
    return tiny_models("llama")


@pytest.fixture(scope="session")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny llama with 3 blocks (an interruption after block 0 is mid-run)."""
    from lrquant.models.tiny import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("llama3") / "model", num_layers=3)


@pytest.fixture(scope="session")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose linears take whole 256-weight GGUF super-blocks (hidden 256, MLP 512)."""
    import json

    from transformers import AutoModelForCausalLM, LlamaConfig

    from lrquant.models.tiny import save_tiny_model

    path = save_tiny_model("llama", tmp_path_factory.mktemp("wide") / "llama")
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_size=256, intermediate_size=512, head_dim=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads, and several stall badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def eager_quantizer() -> Iterator[None]:
    """Compiling costs seconds per new shape, which tiny models never win back; one test opts in."""
    from lrquant.quant import quantizer

    quantizer.COMPILE_ALLOWED = False
    yield
    quantizer.COMPILE_ALLOWED = True


@pytest.fixture(scope="session", autouse=True)
def progress_lines() -> None:
    """Progress lines on stderr, as the command line prints them, for tests that call the API."""
    from lrquant.console import show_progress_lines

    show_progress_lines()
