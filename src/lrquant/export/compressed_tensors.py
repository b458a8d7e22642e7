"""Write a quantized output as a compressed-tensors checkpoint (the format of vLLM and llm-compressor).

Each quantized linear keeps lrquant's integers: compressed-tensors stores ``weight = scale · (q - zp)``
with signed codes ``q`` and zero points ``zp``, so an asymmetric grid's unsigned codes and zero points
are shifted by ``2^(b-1)`` (the difference ``q - zp`` is unchanged). The packing and the config
objects are the ``compressed_tensors`` library's own; the only change to a weight is the rounding
of its scales to the model's dtype, the dtype transformers gives them when it loads the model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from lrquant.arch import get_arch_spec
from lrquant.arch.vision_language import VISION_LANGUAGE_TYPES
from lrquant.checkpoint import INTEGERS_FILE, QUANT_FILE, REPORT_FILE, ROTATIONS_FILE
from lrquant.config import QuantSpec
from lrquant.errors import LrquantError
from lrquant.export import IntegerLinear, QuantizedOutput
from lrquant.models.streaming import SHARD_INDEX
from lrquant.output_dir import MANIFEST_FILE, write_json
from lrquant.report import PLOT_FILE

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

INSTALL = "pip install 'compressed-tensors>=0.20.1'"
# lrquant's own files and the weights, which export rewrites; every other file (tokenizer,
# generation and preprocessor configs) describes the model and is copied as it is
NOT_COPIED = {"config.json", QUANT_FILE, REPORT_FILE, ROTATIONS_FILE, INTEGERS_FILE, MANIFEST_FILE, PLOT_FILE}
# per-layer bias switches of configs whose linears have no bias by default
BIAS_SWITCHES = {
    "attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp_bias": ("gate_proj", "up_proj", "down_proj"),
}
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PACKED = "pack-quantized"
SHARD_BYTES = 2 * 2**30  # past this, the checkpoint is written in shards (memory holds one)


def _require_package() -> None:
    """Refuse before anything is written when the ``compressed_tensors`` package is missing."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise LrquantError(f"compressed-tensors export needs its package: {INSTALL}") from None


def _check_scheme(output: QuantizedOutput) -> None:
    """Refuse what the format's config cannot state: it quantizes the weights and the inputs of
    linears only, each input on a dynamic per-token grid over its full range."""
    for scheme, _ in output.parts():
        _check_part(output, scheme)


def _check_part(output: QuantizedOutput, scheme) -> None:
    unsupported = []
    if scheme.qkv.enabled:
        unsupported.append(f"Q/K/V quantization ({scheme.qkv.bits} bits; use --qkv-bits 16)")
    if scheme.softmax.enabled:
        unsupported.append("softmax quantization (leave --softmax-bits at 16)")
    if scheme.rotate_qkv:
        unsupported.append("--rotate-qkv (drop it)")
    if scheme.patch_embed:
        unsupported.append("patch-embedding quantization (a convolution; drop --quantize-patch-embed)")
    clips = {spec.clip_ratio for spec in scheme.quantized_linear_inputs if spec.clip_ratio < 1.0}
    if clips:
        unsupported.append(f"clipped linear inputs (--a-clip {min(clips)}; use 1)")
    if scheme.weight_grids:
        unsupported.append("a weight grid per tensor (learned for GGUF types by --format gguf)")
    if scheme.weight.bits > 8:
        unsupported.append(f"{scheme.weight.bits}-bit weights (it packs 1 to 8 bits)")
    if unsupported:
        raise LrquantError(
            f"'{output.folder}' uses {', '.join(unsupported)}, which compressed-tensors cannot hold: "
            "quantize again without it"
        )


def refuse_ragged_groups(size: int | None, widths: set[int]) -> None:
    """compressed-tensors has one group size for every row: refuse a ``size`` that leaves a
    ragged last group on rows of one of ``widths`` columns, naming the sizes that divide them."""
    ragged = sorted(width for width in widths if size is not None and width % size)
    if ragged:
        dividing = [str(g) for g in (256, 128, 64, 32, 16) if all(width % g == 0 for width in widths)]
        fix = f"use --group-size {' or '.join(dividing)}" if dividing else "quantize per channel"
        raise LrquantError(
            f"group size {size} leaves a ragged last group on rows of {ragged[0]} columns, which "
            f"compressed-tensors cannot hold: {fix} (it divides every quantized row)"
        )


def _check_grids(output: QuantizedOutput) -> None:
    """Refuse grids the format cannot store: a ragged last group (it has one group size for every
    row) and an asymmetric zero point outside the code range (it stores zero points as codes)."""
    for scheme, names in output.parts():
        refuse_ragged_groups(scheme.weight.group_size, {output.linear_shape(name)[1] for name in names})
        if not scheme.weight.symmetric:
            top = 2**scheme.weight.bits - 1
            zeros = (output.linears[name].zero for name in names)  # one linear read at a time
            outside = sum(int(((zero < 0) | (zero > top)).sum()) for zero in zeros)
            if outside:
                raise LrquantError(
                    f"{outside} group(s) have a zero point outside the codes 0..{top}, which "
                    "compressed-tensors stores as a code: quantize with symmetric weights (--w-symmetric)"
                )


def _scheme(weight: QuantSpec, inputs: QuantSpec, targets: list[str]) -> QuantizationScheme:
    """The config group of the linears ``targets``: lrquant's weight grid, and their inputs quantized
    as lrquant does it (a dynamic grid per token), or not at all."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    grouped = weight.group_size is not None
    scheme = QuantizationScheme(
        targets=targets,
        weights=QuantizationArgs(
            num_bits=weight.bits,
            type="int",
            symmetric=weight.symmetric,
            strategy="group" if grouped else "channel",
            group_size=weight.group_size if grouped else None,
        ),
        input_activations=QuantizationArgs(
            num_bits=inputs.bits, type="int", symmetric=inputs.symmetric, strategy="token", dynamic=True
        )
        if inputs.enabled
        else None,
    )
    # the library's own choice: pack-quantized for weight-only, int-quantized with quantized inputs
    scheme.format = infer_module_format(torch.nn.Linear, scheme).value
    return scheme


def quantization_schemes(output: QuantizedOutput) -> dict[str, QuantizationScheme]:
    """The config groups: every quantized linear, and when the MLP activation has its own grid
    (``--post-act-bits``), the MLP's second linears by name (an exact name outranks a class); a
    quantized vision tower's linears by name, on its own grids."""
    suffixes = tuple(f".{name}" for name in _mlp_out(output))
    groups: dict[str, QuantizationScheme] = {}
    for part, (scheme, names) in enumerate(output.parts()):
        mlp_out = []
        if scheme.mlp_out_activation != scheme.activation:
            mlp_out = sorted(name for name in names if name.endswith(suffixes))
        rest = ["Linear"] if part == 0 else sorted(set(names) - set(mlp_out))
        groups[f"group_{len(groups)}"] = _scheme(scheme.weight, scheme.activation, rest)
        if mlp_out:
            groups[f"group_{len(groups)}"] = _scheme(scheme.weight, scheme.mlp_out_activation, mlp_out)
    return groups


def _mlp_out(output: QuantizedOutput) -> tuple[str, ...]:
    """The names of the MLP's second linear in each of the model's parts."""
    config = output.config
    types = [output.model_type]
    if output.model_type in VISION_LANGUAGE_TYPES:
        types = [config["text_config"]["model_type"], config["vision_config"]["model_type"]]
    return tuple(name for kind in types for name in get_arch_spec(kind).mlp_out)


def _scheme_of(name: str, groups: dict[str, QuantizationScheme]) -> QuantizationScheme:
    """The group a quantized linear belongs to: the one naming it, else the class-wide one."""
    return next((g for g in groups.values() if name in g.targets), groups["group_0"])


def _empty_model(config: dict) -> torch.nn.Module:
    """The model ``config`` describes, without weights: its linears and the keys it loads."""
    import transformers

    architecture = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    model_class = getattr(transformers, architecture, transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        return model_class._from_config(transformers.AutoConfig.for_model(**config))


def _config_with_biases(output: QuantizedOutput) -> dict:
    """The model config, its bias switches turned on where a quantized linear carries a bias the
    architecture lacks by default (lrquant folds shifts into biases)."""
    config = dict(output.config)
    biased = [name for name in output.linears if output.has_bias(name)]
    for switch, suffixes in BIAS_SWITCHES.items():
        if config.get(switch) is False and any(name.endswith(suffixes) for name in biased):
            config[switch] = True
    return config


def _packed(name: str, linear: IntegerLinear, scheme: QuantizationScheme, dtype: torch.dtype) -> dict:
    """The tensors compressed-tensors stores for one linear, under ``name``: pack-quantized packs
    codes into int32 along rows and zero points along columns; int-quantized keeps int8."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 0 if linear.symmetric else 2 ** (linear.bits - 1)
    codes = (linear.codes.to(torch.int16) - offset).to(torch.int8)
    packed = scheme.format == PACKED
    tensors = {f"{name}.weight_scale": linear.scale.to(dtype)}
    if packed:
        tensors[f"{name}.weight_packed"] = pack_to_int32(codes, linear.bits)
        tensors[f"{name}.weight_shape"] = torch.tensor(list(linear.codes.shape))
    else:
        tensors[f"{name}.weight"] = codes
    if not linear.symmetric:
        zero = (linear.zero - offset).to(torch.int8)
        # one zero point per group: packed down the rows, the group columns kept apart
        tensors[f"{name}.weight_zero_point"] = pack_to_int32(zero, linear.bits, 0) if packed else zero
    if linear.bias is not None:
        tensors[f"{name}.bias"] = linear.bias
    return tensors


def _loaded_names(model: torch.nn.Module, keys: list[str]) -> dict[str, str]:
    """The parameter each checkpoint key loads into. transformers renames the keys of some
    architectures (ViT's ``encoder.layer.0.attention.attention.query`` loads into
    ``layers.0.attention.q_proj``), while lrquant names quantized linears by module."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta, prefix = model.state_dict(), model.base_model_prefix
    return {key: rename_source_key(key, renamings, converters, prefix, meta)[0] for key in keys}


def compressed_tensors_of(
    output: QuantizedOutput, model: torch.nn.Module, groups: dict[str, QuantizationScheme]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, one at a time (each linear read and packed when its turn
    comes): the other weights unchanged, the packed linears, and a zero bias for each quantized
    linear that a bias switch gave one but the output has none. Refusals come first."""
    dtype = SCALE_DTYPES.get(str(output.config.get("dtype", output.config.get("torch_dtype"))), torch.float32)
    loaded = _loaded_names(model, list(output.tensors))
    # a quantized linear's float weight stays in ``tensors`` when its checkpoint key is renamed on load
    float_weights = {f"{name}.weight" for name in output.linears}
    kept = [key for key in output.tensors if loaded[key] not in float_weights]
    expected = model.state_dict()
    present = set(loaded.values()) | {f"{name}.bias" for name in output.linears if output.has_bias(name)}
    zero_biases = []
    for name in output.linears:
        key = f"{name}.bias"
        if key in present and key not in expected:
            raise LrquantError(
                f"'{name}' has a bias that a {output.model_type} model cannot load: quantize with a "
                "method that folds no shifts into biases (e.g. rtn or gptq)"
            )
        if key in expected and key not in present:
            zero_biases.append(key)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key in kept:
            yield key, output.tensors[key].contiguous()
        for name in output.linears:
            packed = _packed(name, output.linears[name], _scheme_of(name, groups), dtype)
            yield from ((key, value.contiguous()) for key, value in packed.items())
        for key in zero_biases:
            yield key, torch.zeros(expected[key].shape, dtype=dtype)

    return tensors()


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path) -> None:
    """Write ``tensors`` as ``model.safetensors``, or, past :data:`SHARD_BYTES`, as shards of at
    most that size with their index (as transformers saves large models): memory holds one shard."""
    shards: list[Path] = []
    weight_map: dict[str, int] = {}
    total = 0
    pending: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            shards.append(folder / f".shard-{len(shards)}.safetensors")
            save_file(pending, str(shards[-1]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, len(shards) - 1))
            pending, size = {}, 0

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > SHARD_BYTES:
            flush()
        pending[key], size, total = tensor, size + nbytes, total + nbytes
    flush()
    if len(shards) == 1:
        shards[0].rename(folder / "model.safetensors")
        return
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, name in zip(shards, names, strict=True):
        shard.rename(folder / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
    write_json(folder / SHARD_INDEX, index)


def quantization_config(output: QuantizedOutput, model: torch.nn.Module) -> QuantizationConfig:
    """The ``quantization_config`` of config.json; the linears left in full precision are ignored."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    groups = quantization_schemes(output)
    formats = {group.format for group in groups.values()}
    ignore = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in output.linears
    ]
    return QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )


def write_compressed_tensors(output: QuantizedOutput, folder: Path) -> None:
    """Write ``output`` into the existing empty ``folder`` as a compressed-tensors checkpoint that
    vLLM serves and ``transformers`` loads (with compressed-tensors installed). Every refusal comes
    before the first file is written.

    transformers 5.25 with compressed-tensors 0.20.1 builds its compressed layout for asymmetric
    ``pack-quantized`` weights with unpacked zero points, while the library's compressor (and
    vLLM) packs them: such checkpoints say ``"dequantize": true`` in their quantization config, so
    that transformers decompresses them while loading (vLLM reads the packed layout as written).
    """
    _require_package()
    import compressed_tensors

    _check_scheme(output)
    _check_grids(output)
    config = _config_with_biases(output)
    model = _empty_model(config)
    qconfig = quantization_config(output, model)
    tensors = compressed_tensors_of(output, model, qconfig.config_groups)
    config["quantization_config"] = {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        **qconfig.model_dump(exclude={"quant_method"}, mode="json"),
    }
    if not output.scheme.weight.symmetric and not output.scheme.activation.enabled:  # pack-quantized
        config["quantization_config"]["dequantize"] = True
    folder = Path(folder)
    _write_shards(tensors, folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in sorted(output.folder.iterdir()):
        if path.is_file() and path.name not in NOT_COPIED and ".safetensors" not in path.name:
            shutil.copyfile(path, folder / path.name)
