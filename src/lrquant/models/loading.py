"""Load a model and tokenizer from a built-in name, a local HF directory or a ``.gguf`` file.

Loading is offline and safe by default: the Hub is never contacted, only safetensors weights
are read, and ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lrquant.arch import ArchSpec, get_arch_spec
from lrquant.checkpoint import read_input_rotations, read_scheme
from lrquant.config import QuantScheme
from lrquant.data.images import ImagePreprocess
from lrquant.errors import LrquantError
from lrquant.models.builtin import BUILTIN_MODELS, is_builtin, resolve_builtin, resolve_gguf
from lrquant.quant.apply import attach_quantizers, replace_module
from lrquant.quant.linear import RotatedInputLinear

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")


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
    name_or_path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a supported decoder LLM with its tokenizer, or a vision transformer with its image
    preprocessing, in ``dtype`` (float32 by default).

    A quantized output folder comes back with its run-time quantizers attached.
    """
    from transformers import AutoConfig

    path = resolve_model_dir(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise LrquantError(f"cannot read the config of '{path}': {_first_line(err)}") from None
    arch = get_arch_spec(getattr(config, "model_type", "unknown"))
    try:
        if arch.modality == "image":
            model, tokenizer = _vision_model(path, config, dtype, trust_remote_code), None
        else:
            model, tokenizer = _language_model(path, dtype, trust_remote_code)
    except (OSError, ValueError) as err:
        raise LrquantError(f"cannot load the model in '{path}': {_first_line(err)}") from None
    model.eval()
    preprocess = ImagePreprocess.from_model_dir(path, model.config) if arch.modality == "image" else None
    scheme = read_scheme(path)
    if scheme is not None:
        for name, rotation in read_input_rotations(path).items():
            replace_module(model, name, RotatedInputLinear(model.get_submodule(name), rotation.to(dtype)))
        attach_quantizers(model, arch, scheme, weights_on_grid=True)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        name=name_or_path,
        path=path,
        scheme=scheme,
        preprocess=preprocess,
    )


def _language_model(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _vision_model(path: Path, config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """A classifier when the checkpoint is one, the vision tower of a CLIP/SigLIP checkpoint, else
    the backbone."""
    import transformers
    from transformers import AutoModel, AutoModelForImageClassification

    kwargs = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if any(a.endswith("ForImageClassification") for a in getattr(config, "architectures", None) or []):
        return AutoModelForImageClassification.from_pretrained(path, **kwargs)
    tower = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}.get(config.model_type)
    if tower is not None:
        return getattr(transformers, tower).from_pretrained(path, **kwargs)
    if config.model_type == "dinov2" and getattr(config, "use_swiglu_ffn", False):
        raise LrquantError("DINOv2 with a SwiGLU MLP (giant) is not supported yet: its MLP has no fc1/fc2")
    return AutoModel.from_pretrained(path, **kwargs)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
