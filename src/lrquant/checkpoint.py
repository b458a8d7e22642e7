"""Quantized checkpoints on disk (written into an :class:`lrquant.output_dir.AtomicOutputDir`).

A quantized output folder is a plain Hugging Face checkpoint (``from_pretrained`` loads it; the
weights are the dequantized, fake-quantized values) plus ``lrquant_quant.json``, which holds the
settings needed to rebuild run-time activation quantization, ``integer_weights.safetensors``
(the integer codes, steps and zero points of every quantized linear, for exact packed export),
``report.json`` and the list of files lrquant wrote (``lrquant_manifest.json``). A model with
online rotations (``hadamard=online``) also has ``input_rotations.safetensors``: plain
``from_pretrained`` then misses them, lrquant's loader applies them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrquant import __version__
from lrquant.arch import ArchSpec
from lrquant.config import QuantScheme, describe_validation_error
from lrquant.errors import LrquantError
from lrquant.output_dir import write_json
from lrquant.quant.apply import detach_quantizers, quant_linears
from lrquant.quant.quantizer import dequantize_codes, integer_codes

QUANT_FILE = "lrquant_quant.json"
REPORT_FILE = "report.json"
ROTATIONS_FILE = "input_rotations.safetensors"
INTEGERS_FILE = "integer_weights.safetensors"
FORMAT_VERSION = 1
PREPROCESSOR_FILE = "preprocessor_config.json"
VISION_SCHEME = "vision_scheme"  # the quant file's key of a quantized vision tower's scheme


def save_quantized(
    folder: Path,
    model: nn.Module,
    tokenizer: object | None,
    arch: ArchSpec,
    scheme: QuantScheme,
    method: str,
    source: Path | None = None,
    source_name: str | None = None,
    vision: tuple[ArchSpec, QuantScheme] | None = None,
) -> None:
    """Save a quantized model into ``folder`` (normally an :class:`AtomicOutputDir`'s ``tmp``).

    The model's quantizers are removed first: the saved linears are plain ``nn.Linear`` holding
    the quantized weights. A vision model keeps the image preprocessing of its ``source`` folder;
    ``source_name`` (how the user named the full-precision model) is recorded for evaluation.
    ``vision``: the map and scheme of a vision-language model's quantized vision tower.
    """
    archs = [arch] + ([vision[0]] if vision is not None else [])
    rotations = _save_input_rotations(folder, model, archs)
    integers = _save_integer_weights(folder, model, archs)
    for part in archs:
        detach_quantizers(model, part)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if source is not None and (source / PREPROCESSOR_FILE).is_file():
        shutil.copyfile(source / PREPROCESSOR_FILE, folder / PREPROCESSOR_FILE)
    write_json(
        folder / QUANT_FILE,
        {
            "format_version": FORMAT_VERSION,
            "lrquant_version": __version__,
            "method": method,
            "model_type": model.config.model_type,
            "source_model": source_name,
            "scheme": scheme.model_dump(),
            **({VISION_SCHEME: vision[1].model_dump()} if vision is not None else {}),
            **({"input_rotations": rotations} if rotations else {}),
            **({"integer_weights": INTEGERS_FILE} if integers else {}),
        },
    )


def _quant_linears(model: nn.Module, archs: list[ArchSpec]):
    return (item for arch in archs for item in quant_linears(model, arch))


def _save_integer_weights(folder: Path, model: nn.Module, archs: list[ArchSpec]) -> bool:
    """Write the integer codes, steps and zero points of every linear whose weight is on a known
    grid (``weight = scale · (codes - zero)`` per group; scale and zero ``[out, groups]``), after
    checking the weight really lies on it; returns whether there were any."""
    tensors: dict[str, torch.Tensor] = {}
    for name, linear in _quant_linears(model, archs):
        if linear.grid is None:
            continue
        scale, zero = linear.grid
        spec = linear.weight_spec
        weight = linear.weight.detach().float()
        codes = integer_codes(weight, spec, scale, zero)
        off = (dequantize_codes(codes, spec, scale, zero) - weight).abs()
        step = (weight.abs().amax() + 1) * 1e-5
        if off.max() > step:  # a rounding that differs from what was evaluated: never export it
            raise RuntimeError(f"the weight of {name} is off its grid by {off.max():.3g}")
        tensors[f"{name}.codes"] = codes.to(torch.int8 if spec.symmetric else torch.uint8)
        tensors[f"{name}.scale"] = scale.reshape(scale.shape[0], -1)
        tensors[f"{name}.zero"] = zero.reshape(zero.shape[0], -1)
    if tensors:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(Path(folder) / INTEGERS_FILE))
    return bool(tensors)


def read_integer_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{linear name: {"codes", "scale", "zero"}} of a quantized output folder (empty when it has
    none: an output of an older lrquant, or one without weight quantization)."""
    path = Path(folder) / INTEGERS_FILE
    if not path.is_file():
        return {}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        name, _, part = key.rpartition(".")
        out.setdefault(name, {})[part] = tensor
    return out


def _save_input_rotations(folder: Path, model: nn.Module, archs: list[ArchSpec]) -> dict[str, str]:
    """Write each distinct run-time input rotation once (every block shares one, but moving
    blocks between devices copies it); returns {linear name: tensor key}."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for name, linear in _quant_linears(model, archs):
        if linear.input_rotation is None:
            continue
        rotation = linear.input_rotation.detach().cpu().contiguous()
        key = next(
            (k for k, t in tensors.items() if t.shape == rotation.shape and torch.equal(t, rotation)), None
        )
        if key is None:
            key = f"rotation_{len(tensors)}"
            tensors[key] = rotation
        names[name] = key
    if tensors:
        save_file(tensors, str(Path(folder) / ROTATIONS_FILE))
    return names


def read_input_rotations(folder: Path) -> dict[str, torch.Tensor]:
    """{linear name: run-time input rotation} of a quantized output folder (empty for most)."""
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        return {}
    try:
        names = json.loads(path.read_text()).get("input_rotations") or {}
        tensors = load_file(str(Path(folder) / ROTATIONS_FILE)) if names else {}
        return {name: tensors[key] for name, key in names.items()}
    except (json.JSONDecodeError, AttributeError, KeyError, OSError, SafetensorError) as err:
        raise LrquantError(
            f"the input rotations of '{folder}' are missing or damaged ({type(err).__name__}): "
            "re-run the quantization"
        ) from None


def read_source(folder: Path) -> str | None:
    """The full-precision model a quantized output folder was made from, as the user named it."""
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("source_model")
    except (json.JSONDecodeError, AttributeError):
        return None


def read_scheme(folder: Path, key: str = "scheme") -> QuantScheme | None:
    """The scheme of a quantized output folder, or ``None`` for an ordinary model folder
    (``key=VISION_SCHEME``: its vision tower's, ``None`` when the tower was not quantized)."""
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise LrquantError(
                f"'{path}' has format version {data.get('format_version')}; "
                f"this lrquant reads version {FORMAT_VERSION}"
            )
        if key != "scheme" and key not in data:
            return None
        return QuantScheme.model_validate(data[key])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LrquantError(f"'{path}' is damaged ({type(err).__name__}): re-run the quantization") from None
    except ValidationError as err:
        raise LrquantError(describe_validation_error(err, f"'{path}' holds invalid settings")) from None
