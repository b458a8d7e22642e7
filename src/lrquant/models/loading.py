"""Load a model and tokenizer from a built-in name, a local HF directory or a ``.gguf`` file.

Loading is offline and safe by default: the Hub is never contacted, only safetensors weights
are read, and ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lrquant.arch import ArchSpec, get_arch_spec
from lrquant.arch.vision_language import VISION_LANGUAGE_TYPES, get_vision_language_spec
from lrquant.checkpoint import VISION_SCHEME, read_input_rotations, read_scheme
from lrquant.config import QuantScheme
from lrquant.console import log
from lrquant.data.images import ImagePreprocess
from lrquant.errors import LrquantError
from lrquant.file_checks import check_safetensors, read_json, read_json_object
from lrquant.models.builtin import BUILTIN_MODELS, is_builtin, resolve_builtin, resolve_gguf
from lrquant.models.processors import IMAGES_ONLY, load_images_only
from lrquant.models.streaming import SHARD_INDEX, Stream, WeightFiles, skeleton
from lrquant.quant.apply import (
    attach_block_quantizers,
    attach_head_quantizers,
    attach_quantizers,
    replace_module,
    use_quantized_attention,
)
from lrquant.quant.linear import RotatedInputLinear

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)
# A backbone's pooler is never used (features are ``last_hidden_state``), and checkpoints such as
# DINO's ViTs ship without one: transformers' random pooler is harmless there.
UNUSED_IF_MISSING = {"pooler"}


@dataclass
class LoadedModel:
    """A causal LM or a vision transformer ready to quantize or evaluate, with what it was loaded from.

    A language model comes with its ``tokenizer``; a vision model with its ``preprocess``.
    """

    model: nn.Module
    tokenizer: object | None
    arch: ArchSpec
    name: str
    path: Path
    scheme: QuantScheme | None = None
    preprocess: ImagePreprocess | None = None
    processor: object | None = None  # a vision-language model's (its tokenizer is ``tokenizer``)
    vision_scheme: QuantScheme | None = None  # a vision-language model's quantized vision tower's
    stream: Stream | None = None  # a streamed model's blocks (weightless until loaded), else None

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_model_dir(name_or_path: str) -> Path:
    """The local HF directory behind a built-in name, a directory or a ``.gguf`` file."""
    if is_builtin(name_or_path):
        return resolve_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise LrquantError(
            f"model '{name_or_path}' not found: give a local model folder, a .gguf file, "
            f"or a built-in name ({', '.join(sorted(BUILTIN_MODELS))})"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LrquantError(f"'{path}' is a file but not .gguf: give a model folder or a .gguf file")
        return resolve_gguf(path)
    if not (path / "config.json").is_file():
        raise LrquantError(f"'{path}' is not a model folder: it has no config.json")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or ["no weight files"]
        raise LrquantError(
            f"'{path}' has no .safetensors weights ({', '.join(found)}); only safetensors are loaded, "
            "for safety: convert the checkpoint with save_pretrained(safe_serialization=True)"
        )
    return path


def load_model(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    stream: bool = False,
) -> LoadedModel:
    """Load a supported decoder LLM with its tokenizer, or a vision transformer with its image
    preprocessing, in ``dtype`` (float32 by default).

    A quantized output folder comes back with its run-time quantizers attached. With ``stream``
    (a language model), the blocks stay on disk until :attr:`LoadedModel.stream` loads them one
    at a time (in float32), each with its quantizers.
    """
    from transformers import AutoConfig

    path = resolve_model_dir(name_or_path)
    _check_model_files(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise LrquantError(f"cannot read the config of '{path}': {_first_line(err)}") from None
    arch = _arch(config)
    processor = None
    if arch.modality == "image-text":
        processor = _processor(path, config.model_type, trust_remote_code)
    tokenizer = _tokenizer(path, trust_remote_code) if arch.modality == "text" else None
    if processor is not None:
        tokenizer = processor.tokenizer
    if stream and arch.modality != "text":
        raise LrquantError(
            f"--stream covers language models; '{name_or_path}' is a {arch.modality} model: "
            "quantize it without --stream"
        )
    if stream:
        return _streamed(name_or_path, path, config, arch, tokenizer, trust_remote_code)
    try:
        if arch.modality == "image":
            model = _vision_model(path, config, dtype, trust_remote_code)
        elif arch.modality == "image-text":
            model = _vision_language_model(path, dtype, trust_remote_code)
        else:
            model = _language_model(path, dtype, trust_remote_code)
    except (OSError, ValueError, RuntimeError) as err:
        raise LrquantError(f"cannot load the model in '{path}': {_first_line(err)}") from None
    model.eval()
    preprocess = ImagePreprocess.from_model_dir(path, model.config) if arch.modality == "image" else None
    scheme = read_scheme(path)
    if scheme is not None:
        for name, rotation in read_input_rotations(path).items():
            replace_module(model, name, RotatedInputLinear(model.get_submodule(name), rotation.to(dtype)))
        attach_quantizers(model, arch, scheme, weights_on_grid=True)
    vision_scheme = read_scheme(path, VISION_SCHEME)
    if vision_scheme is not None:
        tower = get_vision_language_spec(config.model_type).vision_arch(config)
        attach_quantizers(model, tower, vision_scheme, weights_on_grid=True)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        name=name_or_path,
        path=path,
        scheme=scheme,
        vision_scheme=vision_scheme,
        preprocess=preprocess,
        processor=processor,
    )


def _streamed(
    name: str, path: Path, config, arch: ArchSpec, tokenizer, trust_remote_code: bool
) -> LoadedModel:
    """A language model whose blocks are loaded one at a time (:mod:`lrquant.models.streaming`);
    a quantized output's blocks get their input rotations and quantizers as they are loaded."""
    from transformers import AutoModelForCausalLM

    files = WeightFiles(path)
    try:
        model, lazy = skeleton(AutoModelForCausalLM, config, files, arch, trust_remote_code)
    except (OSError, ValueError, RuntimeError) as err:
        raise LrquantError(f"cannot load the model in '{path}': {_first_line(err)}") from None
    stream = Stream(model, arch, files, lazy=lazy)
    scheme = read_scheme(path)
    if scheme is not None:
        rotations = read_input_rotations(path)
        if scheme.head:
            stream.load_lazy()
        attach_head_quantizers(model, arch, scheme, weights_on_grid=True)
        use_quantized_attention(model)

        def prepare(prefix: str, block: nn.Module) -> None:
            for name, rotation in rotations.items():
                if name.startswith(f"{prefix}."):
                    inner = name.removeprefix(f"{prefix}.")
                    replace_module(block, inner, RotatedInputLinear(block.get_submodule(inner), rotation))
            attach_block_quantizers(block, arch, scheme, weights_on_grid=True, prefix=prefix)

        stream.on_load.append(prepare)
    return LoadedModel(model, tokenizer, arch, name, path, scheme=scheme, stream=stream)


def _check_model_files(path: Path) -> None:
    """Refuse a model folder whose config.json or safetensors weights are damaged, before
    transformers reads them (it would fail with a traceback, or guess the model from the path)."""
    config = read_json_object(path / "config.json", "a model config")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise LrquantError(
            f"'{path / 'config.json'}' has no model_type: it is not a transformers model config; "
            "copy the config.json that came with the weights"
        )
    index = path / SHARD_INDEX
    if index.is_file() and not (path / "model.safetensors").is_file():  # transformers prefers the latter
        weight_map = read_json_object(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise LrquantError(f"'{index}' has no weight_map: it is damaged; copy or re-create it")
        absent = sorted({str(shard) for shard in weight_map.values() if not (path / str(shard)).is_file()})
        if absent:
            raise LrquantError(
                f"'{index}' names {len(absent)} shard(s) missing from '{path}' (first: {absent[0]}): "
                "copy every shard of the checkpoint"
            )
    for file in sorted(path.glob("*.safetensors")):
        check_safetensors(file)


def _tokenizer(path: Path, trust_remote_code: bool) -> object:
    """The tokenizer of ``path``, refused in one line that names its files when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot parse
        files = [name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not files:
            raise LrquantError(
                f"'{path}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): "
                "copy them from the original model"
            ) from None
        for name in files:
            if name.endswith(".json"):
                read_json(path / name)  # names the damaged file when one is not even JSON
        raise LrquantError(
            f"cannot load the tokenizer of '{path}' from {', '.join(files)} ({type(err).__name__}: "
            f"{_first_line(err)}): they are damaged or incomplete; copy or re-create them"
        ) from None


def _arch(config) -> ArchSpec:
    """The map of what gets quantized: the model's own, or a vision-language model's language
    model (:mod:`lrquant.arch.vision_language`)."""
    model_type = getattr(config, "model_type", "unknown")
    if model_type in VISION_LANGUAGE_TYPES:
        return get_vision_language_spec(model_type).language_arch(config)
    return get_arch_spec(model_type)


def _processor(path: Path, model_type: str, trust_remote_code: bool) -> object:
    """A vision-language model's processor (tokenizer and image processing), refused in one line
    when the folder has none; Qwen2-VL's without its video part (:mod:`lrquant.models.processors`)."""
    from transformers import AutoProcessor

    if not (path / "processor_config.json").is_file() and not (path / "preprocessor_config.json").is_file():
        raise LrquantError(
            f"'{path}' has no processor_config.json or preprocessor_config.json: a vision-language "
            "model needs its processor; copy the files that came with the model"
        )
    try:
        if model_type in IMAGES_ONLY:
            return load_images_only(path, model_type, trust_remote_code)
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers and tokenizers raise many kinds for damaged files
        raise LrquantError(
            f"cannot load the processor of '{path}' ({type(err).__name__}: {_first_line(err)}): "
            "its files are damaged or incomplete; copy or re-create them"
        ) from None


def _vision_language_model(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    return _from_pretrained(
        AutoModelForImageTextToText,
        path,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )


def _language_model(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return _from_pretrained(
        AutoModelForCausalLM, path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def _vision_model(path: Path, config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """A classifier when the checkpoint is one, the vision tower of a CLIP/SigLIP checkpoint, else
    the backbone."""
    import transformers
    from transformers import AutoModel, AutoModelForImageClassification

    kwargs = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if any(a.endswith("ForImageClassification") for a in getattr(config, "architectures", None) or []):
        return _from_pretrained(AutoModelForImageClassification, path, **kwargs)
    tower = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}.get(config.model_type)
    if tower is not None:
        return _from_pretrained(getattr(transformers, tower), path, **kwargs)
    if config.model_type == "dinov2" and getattr(config, "use_swiglu_ffn", False):
        raise LrquantError("DINOv2 with a SwiGLU MLP (giant) is not supported yet: its MLP has no fc1/fc2")
    return _from_pretrained(AutoModel, path, **kwargs)


def _from_pretrained(cls, path: Path, **kwargs) -> nn.Module:
    """``cls.from_pretrained(path, **kwargs)``, refused when the weights do not match the config.

    transformers fills a tensor missing from the checkpoint with random values, silently, and
    one of another shape too when told to ignore mismatches (else it raises after a long report
    table): both are read from its loading info and refused in one line.
    """
    with _without_load_report():
        model, info = cls.from_pretrained(
            path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    order = {name: i for i, name in enumerate(model.state_dict())}

    def model_order(key: str) -> tuple[int, str]:
        return order.get(key, len(order)), key

    mismatched = sorted(info["mismatched_keys"], key=lambda entry: model_order(entry[0]))
    if mismatched:
        key, in_checkpoint, in_model = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise LrquantError(
            f"the weights in '{path}' do not match its config.json: {key} is {list(in_checkpoint)} in "
            f"the checkpoint but {list(in_model)} by the config{more}; use the config.json that came "
            "with the weights"
        )
    missing = sorted(
        (key for key in info["missing_keys"] if UNUSED_IF_MISSING.isdisjoint(key.split("."))),
        key=model_order,
    )
    if missing:
        count = f"{len(missing)} tensor{'s' if len(missing) > 1 else ''} missing"
        raise LrquantError(
            f"the weights in '{path}' lack {missing[0]} ({count}): the checkpoint is incomplete or "
            "made for another config.json; copy or re-create it"
        )
    if info["unexpected_keys"]:  # a whole CLIP checkpoint holds a text tower too: say so, in one line
        unused = sorted(info["unexpected_keys"])
        name = type(model).__name__
        log(f"'{path}' holds {len(unused)} tensors that {name} has no place for ({unused[0]}, ...)")
    return model


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """Keep transformers' loading report table off the console: :func:`_from_pretrained` reports
    what matters in one line."""
    logger = logging.getLogger("transformers.modeling_utils")

    def no_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    logger.addFilter(no_report)
    try:
        yield
    finally:
        logger.removeFilter(no_report)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
