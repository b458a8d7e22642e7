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
import os
import shutil
import struct
from pathlib import Path

import torch
import torch.nn as nn
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrquant import __version__
from lrquant.arch import ArchSpec
from lrquant.config import QuantScheme, QuantSpec, describe_validation_error
from lrquant.errors import LrquantError
from lrquant.models.streaming import SHARD_INDEX
from lrquant.output_dir import write_json
from lrquant.quant.apply import attach_block_quantizers, detach_quantizers, head_linears, quant_linears
from lrquant.quant.linear import QuantLinear
from lrquant.quant.quantizer import dequantize_codes, integer_codes

QUANT_FILE = "lrquant_quant.json"
REPORT_FILE = "report.json"
ROTATIONS_FILE = "input_rotations.safetensors"
INTEGERS_FILE = "integer_weights.safetensors"
FORMAT_VERSION = 1
PREPROCESSOR_FILE = "preprocessor_config.json"
VISION_SCHEME = "vision_scheme"  # the quant file's key of a quantized vision tower's scheme
SHARD_METADATA = {"format": "pt"}  # what transformers writes into (and expects of) a shard


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
    integers = [INTEGERS_FILE] if _save_integer_weights(folder, model, archs) else []
    for part in archs:
        detach_quantizers(model, part)
    model.save_pretrained(folder, safe_serialization=True)
    _write_rest(folder, model, tokenizer, scheme, method, source, source_name, rotations, integers, vision)


def _write_rest(folder, model, tokenizer, scheme, method, source, source_name, rotations, integers, vision):
    """What a quantized output holds beside its weights: tokenizer, preprocessing, lrquant's file."""
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
            **({"integer_weights": integers} if integers else {}),
        },
    )


def save_streamed(
    folder: Path,
    loaded,
    store,
    tokenizer: object | None,
    scheme: QuantScheme,
    method: str,
    source: Path | None = None,
    source_name: str | None = None,
) -> None:
    """:func:`save_quantized` for a streamed model (:mod:`lrquant.models.streaming`). The run's
    resume ``store`` already holds each finished block as its shard of the output and its part
    of the integer codes (:mod:`lrquant.methods.resume`): they are hard-linked into ``folder``
    (copied where the file system cannot link), so the blocks are neither read nor written
    again and take their disk space once. What is outside the blocks is written last, one
    shard at a time. Loads to the same tensors as :func:`save_quantized` of the same model
    quantized in memory."""
    model, arch, stream = loaded.model, loaded.arch, loaded.stream
    lazy = bool(stream.lazy)  # an untied head still on disk: read and written last, on its own
    count = len(stream) + 1 + lazy
    weight_map: dict[str, str] = {}
    rotation_tensors: dict[str, torch.Tensor] = {}
    rotations: dict[str, str] = {}
    integer_files: list[str] = []
    sizes: list[int] = []

    def shard(index: int) -> str:
        return f"model-{index + 1:05d}-of-{count:05d}.safetensors"

    def integers(index: int) -> str:
        return f"integer_weights-{index + 1:05d}-of-{count:05d}.safetensors"

    def write(index: int, tensors: dict[str, torch.Tensor], linears) -> None:
        rotations.update(_collect_rotations(linears, rotation_tensors))
        codes = integer_tensors(linears)
        if codes:
            integer_files.append(integers(index))
            save_file(codes, str(Path(folder) / integer_files[-1]))
        save_file(
            {k: v.detach().contiguous() for k, v in tensors.items()},
            str(Path(folder) / shard(index)),
            SHARD_METADATA,
        )
        weight_map.update(dict.fromkeys(tensors, shard(index)))
        sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))

    for index, name in enumerate(stream.names):
        block = stream.weightless(index)
        attach_block_quantizers(block, arch, scheme, weights_on_grid=True, prefix=name)
        linears = [(f"{name}.{n}", m) for n, m in block.named_modules() if isinstance(m, QuantLinear)]
        rotations.update(_collect_rotations(linears, rotation_tensors))
        weights, codes = store.block_files(index)
        header = _header(weights)
        expected = {f"{name}.{key}" for key in block.state_dict()}
        # never another model's block; a fold may have given a linear a bias (shifts)
        if not expected <= set(header) or any(not key.endswith(".bias") for key in set(header) - expected):
            raise LrquantError(
                f"block {index + 1} in '{store.folder}' does not fit the model: delete that folder and rerun"
            )
        _link(weights, Path(folder) / shard(index))
        weight_map.update(dict.fromkeys(header, shard(index)))
        sizes.append(sum(end - begin for begin, end in header.values()))
        if codes is not None:
            integer_files.append(integers(index))
            _link(codes, Path(folder) / integer_files[-1])
    heads = [(name, head) for name, head in head_linears(model, arch) if isinstance(head, QuantLinear)]
    detach_quantizers(model, arch)  # the head's (the blocks are weightless skeletons)
    seen: set[int] = set()

    def outside_blocks() -> dict[str, torch.Tensor]:
        """What is in memory outside the blocks and not written yet, in float32."""
        rest = {}
        for key, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_meta and id(tensor) not in seen:  # a tied head once, as transformers saves it
                seen.add(id(tensor))
                rest[key] = tensor.float() if tensor.is_floating_point() else tensor  # a 16-bit embedding
        return rest

    write(len(stream), outside_blocks(), heads)  # the float32 copy of the embedding goes before ...
    if lazy:
        stream.load_lazy()  # ... the head is read: they are never in memory together
        write(len(stream) + 1, outside_blocks(), [])
    write_json(Path(folder) / SHARD_INDEX, {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})
    if rotation_tensors:
        save_file(rotation_tensors, str(Path(folder) / ROTATIONS_FILE))
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    _write_rest(folder, model, tokenizer, scheme, method, source, source_name, rotations, integer_files, None)


def _header(path: Path) -> dict[str, tuple[int, int]]:
    """{tensor name: (first byte, end byte)} of the safetensors file ``path``, from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__", None)
    return {key: tuple(entry["data_offsets"]) for key, entry in header.items()}


def _link(source: Path, target: Path) -> None:
    """``target`` as a second name of ``source`` (a hard link: no bytes copied, no disk taken);
    a copy where the file system does not link (another device, no hard links)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _quant_linears(model: nn.Module, archs: list[ArchSpec]):
    return (item for arch in archs for item in quant_linears(model, arch))


def _save_integer_weights(folder: Path, model: nn.Module, archs: list[ArchSpec]) -> bool:
    """Write the integer codes, steps and zero points of every linear whose weight is on a known
    grid (:func:`_integer_tensors`); returns whether there were any."""
    tensors = integer_tensors(_quant_linears(model, archs))
    if tensors:
        save_file(tensors, str(Path(folder) / INTEGERS_FILE))
    return bool(tensors)


def integer_tensors(linears) -> dict[str, torch.Tensor]:
    """The integer codes, steps and zero points (``weight = scale · (codes - zero)`` per group;
    scale and zero ``[out, groups]``) of each ``(name, linear)`` whose weight is on a known grid,
    after checking the weight really lies on it."""
    tensors: dict[str, torch.Tensor] = {}
    for name, linear in linears:
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
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def integer_files(folder: Path) -> list[Path]:
    """The files of a quantized output folder that hold its integer codes (empty when it has
    none: an output of an older lrquant, or one without weight quantization): one file, or a
    streamed run's one per shard."""
    folder = Path(folder)
    listed = None
    try:
        listed = json.loads((folder / QUANT_FILE).read_text()).get("integer_weights")
    except (OSError, json.JSONDecodeError, AttributeError):
        pass  # read_scheme says what is wrong with the quant file
    if not listed:  # none, or an output of an older lrquant that did not list its file
        return [folder / INTEGERS_FILE] if (folder / INTEGERS_FILE).is_file() else []
    files = [folder / str(name) for name in ([listed] if isinstance(listed, str) else listed)]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise LrquantError(
            f"'{folder}' lacks {missing[0]}, one of the files of its integer codes: copy the whole "
            "folder, or re-run the quantization"
        )
    return files


def grid_shaped(
    scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of a linear (as :func:`lrquant.quant.quantizer.weight_groups_grid` shapes it) from
    its saved steps and zero points (``[out, groups]``, :func:`integer_tensors`)."""
    if spec.granularity == "group":
        return scale.unsqueeze(-1), zero.unsqueeze(-1)
    return scale, zero


def read_integer_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{linear name: {"codes", "scale", "zero"}} of a quantized output folder (empty when it has
    none: an output of an older lrquant, or one without weight quantization)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path in integer_files(folder):
        for key, tensor in load_file(str(path)).items():
            name, _, part = key.rpartition(".")
            out.setdefault(name, {})[part] = tensor
    return out


def _save_input_rotations(folder: Path, model: nn.Module, archs: list[ArchSpec]) -> dict[str, str]:
    """Write each distinct run-time input rotation once (every block shares one, but moving
    blocks between devices copies it); returns {linear name: tensor key}."""
    tensors: dict[str, torch.Tensor] = {}
    names = _collect_rotations(_quant_linears(model, archs), tensors)
    if tensors:
        save_file(tensors, str(Path(folder) / ROTATIONS_FILE))
    return names


def _collect_rotations(linears, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Add the run-time input rotation of each ``(name, linear)`` to ``tensors`` unless an equal
    one is there; returns {linear name: tensor key}."""
    names: dict[str, str] = {}
    for name, linear in linears:
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
