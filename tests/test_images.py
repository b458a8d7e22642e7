"""Image sources (folders, built-in photos, digits, faces), preprocessing and vision metrics."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lrquant.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SKIMAGE_PHOTOS,
    ImagePreprocess,
    ImageSet,
    builtin_photos,
    digits_set,
    lfw_set,
    load_image_folder,
    photo_split,
    random_crops,
    resolve_image_source,
    split_labelled,
    to_rgb,
)
from lrquant.errors import LrquantError
from lrquant.eval.vision import LinearProbe, feature_cosine, probe_accuracy, top1


def _save(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _pixels(image: Image.Image) -> bytes:
    return image.tobytes()


# --- preprocessing ------------------------------------------------------------------------------


def test_preprocess_constant_gray_gives_normalised_values() -> None:
    prep = ImagePreprocess(size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = prep([Image.new("RGB", (300, 200), (128, 128, 128)), Image.new("L", (50, 90), 128)])
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for image in out:
        for channel, value in zip(image, expected, strict=True):
            assert torch.allclose(channel, value.float().expand_as(channel), atol=1e-5)


def test_preprocess_center_crops_after_shorter_edge_resize() -> None:
    # 400x100: the shorter edge becomes 8, so 32x8; the centred 8x8 is the middle (white) band only
    image = Image.new("RGB", (400, 100), (0, 0, 0))
    image.paste((255, 255, 255), (150, 0, 250, 100))
    prep = ImagePreprocess(size=8, resize=8, mean=(0.0,) * 3, std=(1.0,) * 3, resample=Image.NEAREST)
    out = prep([image])
    assert torch.allclose(out, torch.ones(1, 3, 8, 8), atol=1e-6)
    assert prep([]).shape == (0, 3, 8, 8)


def test_preprocess_transparent_pixels_become_white() -> None:
    prep = ImagePreprocess(size=4, resize=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = prep([Image.new("RGBA", (4, 4), (0, 0, 0, 0))])
    assert torch.allclose(out, torch.ones_like(out))


def test_preprocess_refuses_bad_geometry() -> None:
    with pytest.raises(LrquantError, match="size <= resize"):
        ImagePreprocess(size=224, resize=200, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_preprocessor_config_json_is_honoured(tmp_path: Path) -> None:
    config = {
        "do_center_crop": True,
        "crop_size": {"height": 196, "width": 196},
        "size": {"shortest_edge": 230},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25],
        "rescale_factor": 0.5,
        "resample": 2,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    prep = ImagePreprocess.from_model_dir(tmp_path, SimpleNamespace(image_size=518))
    assert (prep.size, prep.resize) == (196, 230)
    assert prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.25, 0.25, 0.25)
    assert (prep.rescale, prep.resample) == (0.5, Image.BILINEAR)
    out = prep([Image.new("RGB", (10, 10), (1, 1, 1))])
    assert torch.allclose(out, torch.full_like(out, (0.5 - 0.5) / 0.25))


@pytest.mark.parametrize(
    ("config", "side", "resize"),
    [
        ({"size": {"height": 384, "width": 384}}, 384, 384),  # ViT: no crop
        ({"size": 224, "crop_size": 224}, 224, 224),  # old integer style, crop by default
        ({"size": {"shortest_edge": 224}, "crop_pct": 0.875}, 224, 256),  # ConvNeXt style
        ({"size": {"shortest_edge": 384}, "crop_pct": 0.875}, 384, 384),  # ConvNeXt: no crop_pct at 384
        ({"crop_size": {"height": 224, "width": 224}}, 224, 256),
        ({"size": {"shortest_edge": 256}, "crop_size": 224, "do_center_crop": False}, 256, 256),
    ],
)
def test_preprocessor_config_sizes(tmp_path: Path, config: dict, side: int, resize: int) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    prep = ImagePreprocess.from_model_dir(tmp_path, None)
    assert (prep.size, prep.resize) == (side, resize)
    assert prep.mean == IMAGENET_MEAN and prep.std == IMAGENET_STD


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"crop_size": {"height": 224, "width": 160}}', "only square"),
        ('{"size": 224, "image_mean": [0.5, 0.5]}', "image_mean must be 3 numbers"),
        ('{"image_mean": [0.5]}', "no image size"),
    ],
)
def test_bad_preprocessor_config_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "preprocessor_config.json").write_text(text)
    with pytest.raises(LrquantError, match=message) as err:
        ImagePreprocess.from_model_dir(tmp_path, None)
    assert "preprocessor_config.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("config", "side", "resize"),
    [
        (SimpleNamespace(image_size=518), 518, 592),
        (SimpleNamespace(image_size=(384, 384)), 384, 439),
        (SimpleNamespace(vision_config=SimpleNamespace(image_size=336)), 336, 384),
        ({"image_size": 96}, 96, 110),
        (SimpleNamespace(), 224, 256),
    ],
)
def test_defaults_from_model_config(tmp_path: Path, config: object, side: int, resize: int) -> None:
    prep = ImagePreprocess.from_model_dir(tmp_path, config)
    assert (prep.size, prep.resize, prep.mean, prep.std) == (side, resize, IMAGENET_MEAN, IMAGENET_STD)


def test_bad_model_image_size(tmp_path: Path) -> None:
    with pytest.raises(LrquantError, match="image_size 'big'"):
        ImagePreprocess.from_model_dir(tmp_path, SimpleNamespace(image_size="big"))


def test_with_size_keeps_normalisation() -> None:
    prep = ImagePreprocess(size=224, resize=256, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), resample=2)
    small = prep.with_size(112)
    assert (small.size, small.resize) == (112, 128)
    assert (small.mean, small.std, small.resample, small.rescale) == (prep.mean, prep.std, 2, prep.rescale)


# --- modes and folders --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"])
def test_to_rgb_accepts_8bit_modes(mode: str) -> None:
    assert to_rgb(Image.new(mode, (3, 2)), "x").mode == "RGB"


@pytest.mark.parametrize(("mode", "words"), [("F", "32-bit float"), ("I;16", "16-bit"), ("I", "32-bit int")])
def test_to_rgb_refuses_deep_modes(mode: str, words: str) -> None:
    with pytest.raises(LrquantError, match=f"'pic.tif' has mode {mode} \\({words}.*8-bit RGB or grayscale"):
        to_rgb(Image.new(mode, (3, 2)), "pic.tif")


def test_folder_with_classes_gives_labels(tmp_path: Path) -> None:
    _save(tmp_path / "cat" / "b.PNG", (1, 2, 3))
    _save(tmp_path / "cat" / "a.jpg")
    _save(tmp_path / "dog" / "nested" / "c.bmp", (200, 0, 0))
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    images = load_image_folder(tmp_path)
    assert images.classes == ["cat", "dog"] and images.labels == [0, 0, 1]
    assert all(image.mode == "RGB" for image in images.images)
    assert images.images[1].getpixel((0, 0)) == (1, 2, 3)  # sorted: a.jpg, b.PNG
    assert images.images[2].getpixel((0, 0)) == (200, 0, 0)
    assert len(load_image_folder(tmp_path, limit=2)) == 2


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    _save(tmp_path / "b.png", (2, 2, 2))
    _save(tmp_path / "a.png", (1, 1, 1))
    Image.new("L", (5, 5), 7).save(tmp_path / "c.gif")
    (tmp_path / "readme.md").write_text("ignored")
    images = load_image_folder(str(tmp_path))
    assert images.labels is None and images.classes is None and len(images) == 3
    assert [im.getpixel((0, 0)) for im in images.images] == [(1, 1, 1), (2, 2, 2), (7, 7, 7)]


def _one_line_error(path: Path, *match: str) -> None:
    with pytest.raises(LrquantError) as err:
        load_image_folder(path)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    for part in match:
        assert part in message


def test_folder_errors(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "missing", "not found")
    _save(tmp_path / "file.png")
    _one_line_error(tmp_path / "file.png", "is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    _one_line_error(empty, "has no images", ".png", ".jpeg", ".webp")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    _save(tmp_path / "ok.png")
    (tmp_path / "x.png").write_bytes(b"this is not a png at all")
    _one_line_error(tmp_path, "x.png", "cannot read image")


def test_truncated_image_is_named(tmp_path: Path) -> None:
    data = _save(tmp_path / "full.png", size=(64, 64)).read_bytes()
    (tmp_path / "full.png").unlink()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path, "cut.png", "cannot read image")


def test_wrong_mode_files_are_refused(tmp_path: Path) -> None:
    floats = tmp_path / "floats"
    floats.mkdir()
    Image.new("F", (8, 8), 0.5).save(floats / "depth.tif")
    _one_line_error(floats, "depth.tif", "mode F", "8-bit RGB or grayscale")
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.new("I;16", (8, 8), 300).save(deep / "scan.png")
    _one_line_error(deep, "scan.png", "16-bit", "8-bit RGB or grayscale")


def test_class_folder_errors(tmp_path: Path) -> None:
    _save(tmp_path / "cat" / "a.png")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "list.csv").write_text("x")
    _one_line_error(tmp_path, "dog", "has no images")
    _save(tmp_path / "dog" / "b.png")
    _save(tmp_path / "loose.png")
    _one_line_error(tmp_path, "loose.png", "class subfolder")


# --- built-in sets ------------------------------------------------------------------------------


def test_builtin_photos_and_split() -> None:
    photos = builtin_photos()
    names = [name for name, _ in photos]
    assert len(photos) >= 16 and names == sorted(names)
    assert {"china", "flower", "astronaut"} <= set(names)
    assert len(names) == len(SKIMAGE_PHOTOS) + 2
    assert all(image.mode == "RGB" and min(image.size) >= 150 for _, image in photos)
    calib, held = photo_split("calib"), photo_split("heldout")
    calib_names, held_names = [n for n, _ in calib], [n for n, _ in held]
    assert not set(calib_names) & set(held_names)
    assert sorted(calib_names + held_names) == names == [n for n, _ in photo_split("all")]
    assert held_names == names[3::4]
    assert [n for n, _ in photo_split("heldout")] == held_names
    with pytest.raises(LrquantError, match="calib, heldout, all"):
        photo_split("test")


def test_builtin_photos_are_copies() -> None:
    first = builtin_photos()[0][1]
    first.paste((1, 2, 3), (0, 0, 5, 5))
    assert builtin_photos()[0][1].getpixel((0, 0)) != (1, 2, 3)


def test_random_crops_are_seeded() -> None:
    photos = [image for _, image in photo_split("calib")]
    a, b, c = (random_crops(photos, 20, seed) for seed in (0, 0, 1))
    assert len(a) == 20
    assert [_pixels(x) for x in a] == [_pixels(x) for x in b]
    assert [_pixels(x) for x in a] != [_pixels(x) for x in c]
    assert all(crop.width == crop.height for crop in a)
    assert len({_pixels(x) for x in a}) == 20
    with pytest.raises(LrquantError, match="min_scale"):
        random_crops(photos, 2, 0, min_scale=0)


def test_digits_set() -> None:
    digits = digits_set()
    assert len(digits) == 1797 and digits.classes == [str(d) for d in range(10)]
    assert set(digits.labels or []) == set(range(10))
    first = np.asarray(digits.images[0])
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert max(int(np.asarray(image).max()) for image in digits.images[:20]) == 255
    assert (first[:4, :4] == first[0, 0]).all()  # nearest upsampling: 4x4 blocks


def test_lfw_set() -> None:
    faces = lfw_set()
    assert len(faces) == 200 and faces.classes == ["non-face", "face"]
    assert faces.labels == [1] * 100 + [0] * 100
    assert all(image.mode == "RGB" and image.size == (25, 25) for image in faces.images)


def test_resolve_builtin_sources() -> None:
    photos = resolve_image_source("photos", None, seed=0)
    assert len(photos) == 32 and photos.labels is None
    assert [_pixels(x) for x in resolve_image_source("photos:calib", 32, seed=0).images] == [
        _pixels(x) for x in photos.images
    ]
    assert len(resolve_image_source("photos", 5, seed=0)) == 5
    held = resolve_image_source("photos:heldout", None, seed=0)
    assert len(held) == len(photo_split("heldout"))
    assert len(resolve_image_source("photos:heldout", 6, seed=0)) == 6
    assert len(resolve_image_source("photos:all", None, seed=0)) == len(builtin_photos())
    digits = resolve_image_source("digits", 40, seed=3)
    assert len(digits) == 40 and digits.classes == [str(d) for d in range(10)]
    assert digits.labels == resolve_image_source("digits", 40, seed=3).labels
    assert len(resolve_image_source("lfw", None, seed=0)) == 200
    # NAME:N is a seeded N of the set, whatever count the caller passes
    assert resolve_image_source("digits:40", None, seed=3).labels == digits.labels
    assert len(resolve_image_source("lfw:30", 5, seed=0)) == 30
    with pytest.raises(LrquantError, match="image count must be"):
        resolve_image_source("digits:0", None, seed=0)


def test_resolve_folder_and_unknown(tmp_path: Path) -> None:
    for index in range(6):
        _save(tmp_path / f"{index}.png", (index, index, index))
    picked = resolve_image_source(str(tmp_path), 3, seed=1)
    assert len(picked) == 3 and picked.source == str(tmp_path)
    again = resolve_image_source(str(tmp_path), 3, seed=1)
    assert [_pixels(x) for x in picked.images] == [_pixels(x) for x in again.images]
    assert len(resolve_image_source(str(tmp_path), None, seed=1)) == 6
    with pytest.raises(LrquantError, match="'imagenet' not found.*photos, photos:calib, photos:heldout"):
        resolve_image_source("imagenet", None, seed=0)
    with pytest.raises(LrquantError, match="image count must be a positive integer"):
        resolve_image_source("photos", 0, seed=0)


def test_split_labelled() -> None:
    images = ImageSet([Image.new("RGB", (2, 2), (i, 0, 0)) for i in range(10)], list(range(10)), None, "s")
    train, test = split_labelled(images, 0.7, seed=0)
    assert (len(train), len(test)) == (7, 3)
    assert sorted((train.labels or []) + (test.labels or [])) == list(range(10))
    assert [im.getpixel((0, 0))[0] for im in train.images] == train.labels
    assert split_labelled(images, 0.7, seed=0)[0].labels == train.labels
    with pytest.raises(LrquantError, match="has no labels"):
        split_labelled(ImageSet(images.images, None, None, "flat"), 0.5, seed=0)


# --- metrics ------------------------------------------------------------------------------------


def test_feature_cosine() -> None:
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    assert feature_cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    assert feature_cosine(x, -2 * x) == pytest.approx(-1.0, abs=1e-12)
    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    assert feature_cosine(a, b) == pytest.approx(0.5)
    with pytest.raises(LrquantError, match="shapes differ"):
        feature_cosine(x, x[:, :4])


def test_top1() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    assert top1(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(75.0)
    with pytest.raises(LrquantError, match="one label per row"):
        top1(logits, torch.tensor([0, 1]))


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs in 16 dimensions, on very different feature scales."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.randn(3, 16, generator=gen) * 4
    features = centres[labels] + torch.randn(n, 16, generator=gen)
    return features * torch.logspace(-3, 3, 16), labels


def test_linear_probe_separable_and_noise() -> None:
    train, train_labels = _separable(150, seed=0)
    test, test_labels = _separable(90, seed=0)
    probe = LinearProbe.fit(train, train_labels)
    assert isinstance(probe, LinearProbe)
    assert probe.accuracy(train, train_labels) == 100.0
    assert probe.accuracy(test, test_labels) == 100.0
    assert probe.predict(test).shape == (90,)
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(1)) * test.std(dim=0) * 3
    assert probe.accuracy(test + noise, test_labels) < 90.0
    again = LinearProbe.fit(train, train_labels)  # deterministic: zero start, full batch
    assert torch.equal(again.weight, probe.weight)
    assert probe_accuracy(train, train_labels, test, test_labels) == 100.0


def test_linear_probe_errors() -> None:
    features = torch.randn(6, 4)
    with pytest.raises(LrquantError, match="at least two classes"):
        LinearProbe.fit(features, torch.zeros(6, dtype=torch.long))
    probe = LinearProbe.fit(features, torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(LrquantError, match="trained on 4"):
        probe.accuracy(torch.randn(6, 5), torch.zeros(6, dtype=torch.long))
