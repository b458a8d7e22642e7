"""Packed export of a quantized output folder to the formats engines run.

:func:`read_output` gathers what every writer needs from an output folder (the integer codes,
steps and zero points of each quantized linear, the other weights, config and scheme); each
format's writer (``compressed_tensors``, ``gguf``) turns that into its own files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lrquant.arch.vision_language import get_vision_language_spec
from lrquant.checkpoint import (
    QUANT_FILE,
    REPORT_FILE,
    VISION_SCHEME,
    integer_files,
    read_input_rotations,
    read_scheme,
)
from lrquant.config import QuantScheme, QuantSpec
from lrquant.errors import LrquantError
from lrquant.export.lazy import LazyLinears, LazyTensors
from lrquant.file_checks import check_safetensors, read_json_object
from lrquant.models.streaming import SHARD_INDEX
from lrquant.quant.quantizer import dequantize_codes


@dataclass
class IntegerLinear:
    """One quantized linear on its grid: ``weight = scale · (codes - zero)`` per group.

    ``codes`` is ``[out, in]`` (uint8 for an asymmetric grid, int8 for a symmetric one); ``scale``
    and ``zero`` are float32 ``[out, groups]``, groups of ``group_size`` consecutive input columns
    (the last one shorter when ``group_size`` does not divide ``in``; one group per row when
    ``group_size`` is None); ``zero`` holds integers, 0 on a symmetric grid, possibly outside the
    code range on an asymmetric one. ``bias`` is the linear's bias, if it has one.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    symmetric: bool
    group_size: int | None

    def dequantized(self) -> torch.Tensor:
        """The float32 weight these integers stand for."""
        granularity = "group" if self.group_size else "channel"
        spec = QuantSpec(
            bits=self.bits, symmetric=self.symmetric, granularity=granularity, group_size=self.group_size
        )
        if self.group_size:  # the quantizer's per-group statistics are [out, groups, 1]
            return dequantize_codes(self.codes, spec, self.scale.unsqueeze(-1), self.zero.unsqueeze(-1))
        return dequantize_codes(self.codes, spec, self.scale, self.zero)


@dataclass
class QuantizedOutput:
    """What a quantized output folder holds, as export reads it."""

    folder: Path
    config: dict
    scheme: QuantScheme
    # by module name, e.g. "model.layers.0.self_attn.q_proj" (read_output: a LazyLinears)
    linears: Mapping[str, IntegerLinear]
    # every other tensor of the weight files, by its key (read_output: a LazyTensors)
    tensors: Mapping[str, torch.Tensor]
    method: str | None
    # a vision-language model's quantized vision tower: its scheme, and the prefix of its linears
    vision_scheme: QuantScheme | None = None
    tower: str | None = None
    # a vision-language model's projector (quantized, if at all, on the language model's scheme;
    # Qwen2-VL's sits inside the tower's module)
    projector: str | None = None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    def linear_shape(self, name: str) -> tuple[int, ...]:
        """A quantized linear's ``[out, in]``, without reading it where it is read lazily."""
        if isinstance(self.linears, LazyLinears):
            return self.linears.shape(name)
        return tuple(self.linears[name].codes.shape)

    def has_bias(self, name: str) -> bool:
        """Whether a quantized linear has a bias, without reading it where it is read lazily."""
        if isinstance(self.linears, LazyLinears):
            return self.linears.has_bias(name)
        return self.linears[name].bias is not None

    def tensor_meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Another tensor's shape and dtype, without reading it where it is read lazily."""
        if isinstance(self.tensors, LazyTensors):
            return self.tensors.shape(key), self.tensors.dtype(key)
        return tuple(self.tensors[key].shape), self.tensors[key].dtype

    def in_tower(self, name: str) -> bool:
        """Whether the linear ``name`` is in the quantized vision tower (not its projector)."""
        in_projector = self.projector is not None and name.startswith(self.projector + ".")
        return self.tower is not None and name.startswith(self.tower + ".") and not in_projector

    def scheme_of(self, name: str) -> QuantScheme:
        """The scheme the linear ``name`` was quantized with (its part's)."""
        return self.vision_scheme if self.in_tower(name) and self.vision_scheme else self.scheme

    def parts(self) -> list[tuple[QuantScheme, list[str]]]:
        """Each scheme with the names of its quantized linears (the language model's first)."""
        tower = sorted(name for name in self.linears if self.in_tower(name))
        rest = [name for name in self.linears if not self.in_tower(name)]
        return [(self.scheme, rest)] + ([(self.vision_scheme, tower)] if self.vision_scheme else [])


def _recreate_hint(folder: Path) -> str:
    """The command that made ``folder`` again, from its report, for outputs export cannot read."""
    try:
        report = json.loads((folder / REPORT_FILE).read_text())
        scheme = report["settings"]["weight"]
        command = (
            f"lrquant quantize --model {report['model']['name']} --method {report['method']} "
            f"--preset {report['preset']} --wbits {scheme['bits']}"
            + (f" --group-size {scheme['group_size']}" if scheme.get("group_size") else "")
            + f" --seed {report['seed']} --output {folder} --overwrite"
        )
        return f"re-create it with this lrquant ({command})"
    except (OSError, ValueError, KeyError, TypeError):
        return "re-create it with this lrquant's `lrquant quantize`"


def read_output(folder: str | Path) -> QuantizedOutput:
    """Read a quantized output folder for export; refused in one line when it is not one, or was
    written without integer weights (an older lrquant), saying how to re-create it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LrquantError(f"output folder '{folder}' not found: give a folder that `lrquant quantize` wrote")
    if not (folder / QUANT_FILE).is_file():
        raise LrquantError(
            f"'{folder}' is not an lrquant output folder (it has no {QUANT_FILE}): export takes the "
            "folder that `lrquant quantize --output` wrote"
        )
    scheme = read_scheme(folder)
    assert scheme is not None
    if not scheme.weight.enabled:
        raise LrquantError(f"'{folder}' has no quantized weights ({scheme.name}): there is nothing to pack")
    integers = {}
    if files := integer_files(folder):
        for file in files:
            check_safetensors(file)
        integers = LazyTensors.of(files)
    if not integers:
        raise LrquantError(
            f"'{folder}' has no integer weights (written by an older lrquant): {_recreate_hint(folder)}"
        )
    if read_input_rotations(folder):
        raise LrquantError(
            f"'{folder}' rotates linear inputs at run time (hadamard=online, down or inputs), which "
            "packed formats cannot hold exactly: quantize without them or with --set hadamard=folded"
        )
    config = read_json_object(folder / "config.json", "a model config")
    files = _weight_files(folder)  # one file, or the shards of a streamed run
    for weights in files:
        check_safetensors(weights)
    tensors = LazyTensors.of(files)  # read one at a time, as the writers ask for them
    vision_scheme = read_scheme(folder, VISION_SCHEME)
    tower = projector = None
    if vision_scheme is not None:
        spec = get_vision_language_spec(str(config.get("model_type")))
        tower, projector = spec.vision, spec.projector
    output = QuantizedOutput(folder, config, scheme, {}, tensors, None, vision_scheme, tower, projector)
    output.linears = LazyLinears(integers, lambda name: output.scheme_of(name).weight_for(name), tensors)
    output.tensors = tensors.without(
        key for name in output.linears for key in (f"{name}.weight", f"{name}.bias")
    )
    output.method = json.loads((folder / QUANT_FILE).read_text()).get("method")
    return output


def language_model_of(output: QuantizedOutput) -> QuantizedOutput:
    """A vision-language output's language model as a language model's output: the text config,
    the language model's tensors and linears named as a decoder's own (``model.layers...``) and
    the head; the vision tower and the projector left out. The weight files may name the
    language model as the model does (``model.language_model.``) or in the older layout that
    transformers saves LLaVA in (``language_model.model.``, ``language_model.lm_head``)."""
    spec = get_vision_language_spec(output.model_type)
    prefixes = {
        spec.language + ".": "model.",
        "language_model.model.": "model.",
        "language_model.lm_head.": "lm_head.",
    }

    def renamed(key: str) -> str | None:
        for old, new in prefixes.items():
            if key.startswith(old):
                return new + key[len(old) :]
        return key if key.startswith("lm_head.") else None

    config = dict(output.config["text_config"])
    config.setdefault("tie_word_embeddings", output.config.get("tie_word_embeddings", False))
    linears = output.linears.renamed(renamed)  # biases found under either layout
    tensors = output.tensors.renamed(renamed)
    tensors = tensors.without(key for name in linears for key in (f"{name}.weight", f"{name}.bias"))
    return QuantizedOutput(output.folder, config, output.scheme, linears, tensors, output.method)


def _weight_files(folder: Path) -> list[Path]:
    """The output's weight files: ``model.safetensors``, or the shards its index names."""
    index = folder / SHARD_INDEX
    if not (folder / "model.safetensors").is_file() and index.is_file():
        weight_map = read_json_object(index, "a safetensors index").get("weight_map")
        if isinstance(weight_map, dict):
            return [folder / str(name) for name in sorted(set(weight_map.values()))]
    return [folder / "model.safetensors"]


@dataclass(frozen=True)
class ExportFormat:
    """A packed format: whether it is one file or a folder, its usual suffix, and its writer
    (``module:function``, imported when used: a format's package is an optional extra)."""

    name: str
    single_file: bool
    suffix: str
    writer: str
    engines: str


FORMATS = {
    f.name: f
    for f in (
        ExportFormat(
            "compressed-tensors",
            False,
            "-compressed-tensors",
            "lrquant.export.compressed_tensors:write_compressed_tensors",
            "vLLM, llm-compressor, transformers",
        ),
        ExportFormat("gguf", True, ".gguf", "lrquant.export.gguf:write_gguf", "llama.cpp, Ollama, LM Studio"),
    )
}


def export_format(name: str) -> ExportFormat:
    """The format called ``name``, or a one-line refusal listing the formats."""
    if name not in FORMATS:
        raise LrquantError(f"unknown export format '{name}'; available: {', '.join(FORMATS)}")
    return FORMATS[name]


def default_destination(output: str | Path, fmt: ExportFormat) -> Path:
    """Where ``quantize --format`` puts the export of ``output``: beside it, named after it."""
    output = Path(output)
    return output.with_name(output.name + fmt.suffix)


def check_options(
    fmt: ExportFormat, scheme: QuantScheme, gguf_type: str | None, config: dict | None = None
) -> None:
    """Refuse, before any work, the format options and schemes ``fmt`` cannot take; with the
    model's ``config``, also a group size that leaves ragged groups on its hidden or MLP width."""
    if gguf_type is not None and fmt.name != "gguf":
        raise LrquantError(
            f"--gguf-type chooses GGUF types, but the format is {fmt.name}: drop it or use --format gguf"
        )
    if fmt.name == "gguf":
        from lrquant.export.gguf import parse_type_rules, refuse_scheme

        refuse_scheme(scheme)
        parse_type_rules(gguf_type)
    elif config is not None and scheme.weight.granularity == "group":
        from lrquant.export.compressed_tensors import refuse_ragged_groups

        widths = {config.get(key) for key in ("hidden_size", "intermediate_size")}
        refuse_ragged_groups(scheme.weight.group_size, {w for w in widths if isinstance(w, int)})


def write_format(
    output: QuantizedOutput, fmt: ExportFormat, path: Path, gguf_type: str | None = None
) -> None:
    """Run ``fmt``'s writer on ``output`` into ``path`` (a new empty folder, or a new file); the
    caller has checked the options with :func:`check_options`."""
    import importlib

    options = {} if gguf_type is None else {"gguf_type": gguf_type}
    module, _, function = fmt.writer.partition(":")
    getattr(importlib.import_module(module), function)(output, path, **options)
