"""Images for calibrating and evaluating vision models, and the preprocessing that feeds them.

An image source is one of: a folder of images (class subfolders give labels), the built-in
``photos`` (random crops of real photographs shipped with scikit-image and scikit-learn, split into
``photos`` / ``photos:calib`` for calibration and ``photos:heldout`` for evaluation), the built-in
``digits`` (scikit-learn's 8x8 handwritten digits, labelled 0-9) or the built-in ``lfw`` (200 small
faces and non-faces from scikit-image). Everything built in comes from installed packages, so it
works offline.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lrquant.errors import LrquantError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# The real photographs in scikit-image's data folder, chosen by looking at every file. Left out:
# synthetic images (chessboard_GRAY, chessboard_RGB, color, logo, phantom, horse: a silhouette),
# near-featureless or tiny ones (cell, clock_motion: a motion-blurred blob, microaneurysms: 102 px),
# the scanned page (page) and motorcycle_right, the other half of a stereo pair with motorcycle_left:
# keeping both could put near-identical pictures on both sides of the calibration/held-out split.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)

PHOTO_SPLITS = ("calib", "heldout", "all")
BUILTIN_SOURCES = ("photos", "photos:calib", "photos:heldout", "photos:all", "digits", "lfw")
DEFAULT_PHOTO_CROPS = 32

# Pillow's resampling filters (the numbers Hugging Face preprocessor configs use for ``resample``).
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_TO_RGB_MODES = ("RGB", "L", "1", "CMYK", "YCbCr")
_ALPHA_MODES = ("RGBA", "LA", "P", "PA")
_MODE_WORDS = {
    "F": "32-bit float",
    "I": "32-bit integer",
    "I;16": "16-bit integer",
    "I;16B": "16-bit integer",
    "I;16L": "16-bit integer",
    "I;16N": "16-bit integer",
}


# --- preprocessing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the shorter edge to ``resize``, center-crop ``size`` x ``size``, rescale, normalise.

    This is the standard ViT/DINOv2/CLIP evaluation transform, done with Pillow and numpy so that
    no torchvision is needed.
    """

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255
    resample: int = Image.BICUBIC

    def __post_init__(self) -> None:
        if self.size < 1 or self.resize < self.size:
            raise LrquantError(
                f"image preprocessing needs 1 <= size <= resize, got size {self.size} and "
                f"resize {self.resize}: fix the model's preprocessor_config.json"
            )
        if self.resample not in _RESAMPLE_NAMES:
            raise LrquantError(
                f"unknown resample filter {self.resample}: use one of "
                + ", ".join(f"{k} ({v})" for k, v in _RESAMPLE_NAMES.items())
            )
        if any(s <= 0 for s in self.std):
            raise LrquantError(f"image std {self.std} must be positive: fix the preprocessor config")

    @classmethod
    def from_model_dir(cls, path: Path, config: Any) -> ImagePreprocess:
        """The model's own preprocessing: its ``preprocessor_config.json``, else ImageNet defaults.

        Without the file, the side is ``config.image_size`` (or its vision config's; 224 if absent),
        with the usual 256/224 shorter-edge resize before the crop.
        """
        file = Path(path) / "preprocessor_config.json"
        if file.is_file():
            return _from_hf_config(_read_json(file), file)
        side = _config_image_size(config)
        return cls(side, _resize_for(side), IMAGENET_MEAN, IMAGENET_STD)

    def with_size(self, size: int) -> ImagePreprocess:
        """The same normalisation at another side, keeping the resize-to-crop ratio."""
        return ImagePreprocess(
            size=size,
            resize=max(size, round(size * self.resize / self.size)),
            mean=self.mean,
            std=self.std,
            rescale=self.rescale,
            resample=self.resample,
        )

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Float32 ``[n, 3, size, size]`` model input for ``images`` (any mode ``to_rgb`` accepts)."""
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        arrays = []
        for index, image in enumerate(images):
            square = self._crop(to_rgb(image, f"image {index}"))
            pixels = np.asarray(square, dtype=np.float32) * np.float32(self.rescale)
            arrays.append(((pixels - mean) / std).transpose(2, 0, 1))
        if not arrays:
            return torch.empty(0, 3, self.size, self.size)
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))

    def _crop(self, image: Image.Image) -> Image.Image:
        """Shorter edge to ``resize`` (aspect kept), then the centred ``size`` square.

        The longer edge is truncated, not rounded, as Hugging Face and torchvision do, so that
        the pixels match theirs.
        """
        width, height = image.size
        short = min(width, height)
        new_size = (
            max(self.resize, width * self.resize // short),
            max(self.resize, height * self.resize // short),
        )
        if new_size != image.size:
            image = image.resize(new_size, resample=self.resample)
        left = (new_size[0] - self.size) // 2
        top = (new_size[1] - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


def _resize_for(side: int) -> int:
    """The conventional shorter edge before a center crop of ``side`` (256 for 224)."""
    return round(side * 256 / 224)


def _config_image_size(config: Any) -> int:
    """``image_size`` of a model config (int or the first of a pair), 224 when it has none."""
    value = _field(config, "image_size")
    if value is None:
        value = _field(_field(config, "vision_config"), "image_size")
    if value is None:
        return 224
    if isinstance(value, (list, tuple)):
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LrquantError(f"model config has image_size {value!r}: it must be a positive integer")
    return value


def _field(config: Any, name: str) -> Any:
    """``config.name`` or ``config[name]`` (a config object or its ``config.json`` dict), else None."""
    if isinstance(config, dict):
        return config.get(name)
    return getattr(config, name, None)


def _read_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``, or a one-line error naming it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LrquantError(f"'{file}' is not valid JSON ({err}): fix or delete it") from None
    except OSError as err:
        raise LrquantError(f"cannot read '{file}': {err.strerror}") from None
    if not isinstance(data, dict):
        raise LrquantError(f"'{file}' must hold a JSON object: fix or delete it")
    return data


def _from_hf_config(data: dict[str, Any], file: Path) -> ImagePreprocess:
    """Read the usual Hugging Face image-processor fields (size, crop, mean/std, rescale, filter)."""
    side, resize = _hf_geometry(data, file)
    normalise = data.get("do_normalize", True)
    rescale = data.get("rescale_factor", 1 / 255) if data.get("do_rescale", True) else 1.0
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or rescale <= 0:
        raise LrquantError(f"'{file}' field rescale_factor must be a positive number, got {rescale!r}")
    return ImagePreprocess(
        size=side,
        resize=resize,
        mean=_triple(data.get("image_mean", IMAGENET_MEAN), "image_mean", file) if normalise else (0.0,) * 3,
        std=_triple(data.get("image_std", IMAGENET_STD), "image_std", file) if normalise else (1.0,) * 3,
        rescale=float(rescale),
        resample=_integer(data.get("resample", Image.BICUBIC), "resample", file),
    )


def _hf_geometry(data: dict[str, Any], file: Path) -> tuple[int, int]:
    """(output side, shorter edge before the crop) from ``size``, ``crop_size`` and friends.

    With a center crop the side is ``crop_size`` and the resize is ``size`` (or 256/224 of the
    side); without one the side is ``size``, and the resize is ``size / crop_pct`` where given
    (ConvNeXt, which applies it below 384 only).
    """
    size = _side(data.get("size"), "size", file)
    crop = _side(data.get("crop_size"), "crop_size", file)
    if data.get("do_center_crop", crop is not None):
        side = crop if crop is not None else size
        resize = size if size is not None else (None if side is None else _resize_for(side))
    else:
        side = size if size is not None else crop
        crop_pct = data.get("crop_pct")
        if side is not None and side < 384 and isinstance(crop_pct, (int, float)) and 0 < crop_pct < 1:
            resize = round(side / crop_pct)
        else:
            resize = side
    if side is None or resize is None:
        raise LrquantError(f"'{file}' gives no image size (size or crop_size): add one")
    return side, max(resize, side)


def _side(value: Any, field: str, file: Path) -> int | None:
    """A square side from an int or a dict with ``shortest_edge`` or equal ``height``/``width``."""
    if value is None:
        return None
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return _integer(value["shortest_edge"], f"{field}.shortest_edge", file)
        if "height" in value and "width" in value:
            height = _integer(value["height"], f"{field}.height", file)
            width = _integer(value["width"], f"{field}.width", file)
            if height != width:
                raise LrquantError(
                    f"'{file}' asks for a {height}x{width} {field}: only square model inputs are supported"
                )
            return height
        raise LrquantError(f"'{file}' field {field} needs shortest_edge or height and width, got {value}")
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return _integer(value[0], field, file)
    return _integer(value, field, file)


def _integer(value: Any, field: str, file: Path) -> int:
    """``value`` as a non-negative int, or an error naming the field and file."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LrquantError(f"'{file}' field {field} must be a non-negative integer, got {value!r}")
    return value


def _triple(value: Any, field: str, file: Path) -> tuple[float, float, float]:
    """Three per-channel floats from a number, a 1-list or a 3-list."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise LrquantError(f"'{file}' field {field} must be 3 numbers (R, G, B), got {value!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


# --- reading images -----------------------------------------------------------------------------


def to_rgb(image: Image.Image, where: str) -> Image.Image:
    """``image`` as 8-bit RGB; transparent pixels become white. Deep/float modes are refused.

    16/32-bit and float images have no single sensible mapping to 0-255, so the user must choose
    one by re-saving the file.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _TO_RGB_MODES:
        return image.convert("RGB")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    kind = f" ({_MODE_WORDS[image.mode]})" if image.mode in _MODE_WORDS else ""
    raise LrquantError(f"'{where}' has mode {image.mode}{kind}: save it as 8-bit RGB or grayscale")


def _open_image(file: Path) -> Image.Image:
    """Read ``file`` fully into an RGB image (upright per its EXIF tag), closing the file."""
    try:
        with Image.open(file) as image:
            image.load()
            _make_upright(image)
            rgb = to_rgb(image, str(file))
            return rgb.copy() if rgb is image else rgb
    except Image.DecompressionBombError:
        raise LrquantError(f"'{file}' has too many pixels to be a safe image: shrink or remove it") from None
    except UnidentifiedImageError:
        raise LrquantError(f"cannot read image '{file}': not a recognised image format; remove it") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise LrquantError(f"cannot read image '{file}' ({reason}): re-save it or remove it") from None


def _make_upright(image: Image.Image) -> None:
    """Apply the EXIF orientation tag in place (camera photos); a broken tag is left as it is."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (ValueError, KeyError, TypeError, SyntaxError, OSError):
        pass


@dataclass
class ImageSet:
    """RGB images with optional integer labels (indices into ``classes``) and where they came from."""

    images: list[Image.Image]
    labels: list[int] | None
    classes: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int], source: str | None = None) -> ImageSet:
        """The images (and labels) at ``indices``, in that order."""
        return ImageSet(
            images=[self.images[i] for i in indices],
            labels=None if self.labels is None else [self.labels[i] for i in indices],
            classes=self.classes,
            source=self.source if source is None else source,
        )


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _visible(path: Path) -> list[Path]:
    """The entries of a folder, sorted, without hidden ones (``.DS_Store``, ``.ipynb_checkpoints``)."""
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _scan_folder(root: Path, source: str) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Image paths, labels and class names of a flat folder or one with class subfolders."""
    entries = _visible(root)
    folders = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if _is_image_file(p)]
    if folders and loose:
        raise LrquantError(
            f"'{source}' has images ('{loose[0].name}') next to class subfolders ('{folders[0].name}'): "
            "move every image into a class subfolder, or remove the subfolders"
        )
    if loose:
        return loose, None, None
    if not folders:
        raise LrquantError(f"'{source}' has no images: put {', '.join(IMAGE_SUFFIXES)} files in it")
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        found = sorted(p for p in folder.rglob("*") if _is_image_file(p) and not _hidden_below(p, folder))
        if not found:
            raise LrquantError(
                f"class folder '{folder}' has no images ({', '.join(IMAGE_SUFFIXES)}): add some or remove it"
            )
        files += found
        labels += [label] * len(found)
    return files, labels, [f.name for f in folders]


def _hidden_below(path: Path, top: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(top).parts)


def load_image_folder(path: str | Path, limit: int | None = None, seed: int | None = None) -> ImageSet:
    """Load a folder of images: class subfolders (sorted, label = index) or a flat folder (no labels).

    ``limit`` keeps the first ``limit`` images in sorted order, or a ``seed``-ed random sample of
    them when ``seed`` is given; only the kept files are opened.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise LrquantError(f"image folder '{path}' not found: check the path")
    if not root.is_dir():
        raise LrquantError(f"'{path}' is not a folder: give a folder of images or of class subfolders")
    files, labels, classes = _scan_folder(root, str(path))
    order = list(range(len(files)))
    if seed is not None:
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(files))]
    if limit is not None:
        order = order[: _positive(limit, "image count")]
    return ImageSet(
        images=[_open_image(files[i]) for i in order],
        labels=None if labels is None else [labels[i] for i in order],
        classes=classes,
        source=str(path),
    )


def _positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LrquantError(f"{what} must be a positive integer, got {value!r}")
    return value


# --- built-in sets ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _photo_cache() -> tuple[tuple[str, Image.Image], ...]:
    """Decode the built-in photos once per process (they are read-only afterwards)."""
    import skimage
    from sklearn.datasets import load_sample_images

    folder = Path(os.path.dirname(skimage.__file__)) / "data"
    photos = []
    for name in SKIMAGE_PHOTOS:
        file = folder / name
        if not file.is_file():
            raise LrquantError(
                f"scikit-image's data folder lacks '{name}': reinstall it (pip install --force-reinstall "
                "scikit-image)"
            )
        photos.append((Path(name).stem, _open_image(file)))
    samples = load_sample_images()
    for file, array in zip(samples.filenames, samples.images, strict=True):
        photos.append((Path(file).stem, Image.fromarray(np.asarray(array, dtype=np.uint8), "RGB")))
    return tuple(sorted(photos, key=lambda item: item[0]))


def builtin_photos() -> list[tuple[str, Image.Image]]:
    """The real photographs of scikit-image (``SKIMAGE_PHOTOS``) and scikit-learn, sorted by name, RGB.

    Each call returns fresh copies, so callers may modify them.
    """
    return [(name, image.copy()) for name, image in _photo_cache()]


def photo_split(split: str) -> list[tuple[str, Image.Image]]:
    """A fixed, disjoint split of the built-in photos: every 4th (sorted) is ``heldout``.

    ``calib`` is the rest and ``all`` is everything, so calibration never sees held-out pictures.
    """
    if split not in PHOTO_SPLITS:
        raise LrquantError(f"unknown photo split '{split}': use one of {', '.join(PHOTO_SPLITS)}")
    photos = builtin_photos()
    if split == "all":
        return photos
    held = split == "heldout"
    return [item for i, item in enumerate(photos) if (i % 4 == 3) == held]


def random_crops(photos: list[Image.Image], n: int, seed: int, min_scale: float = 0.35) -> list[Image.Image]:
    """``n`` seeded random square crops, taking photos round-robin in a seeded order.

    A crop covers a uniform fraction in ``[min_scale, 1]`` of the area of the largest square that
    fits the photo, at a uniform position. This turns a handful of photos into many distinct
    calibration images without repeating any.
    """
    if n < 0:
        raise LrquantError(f"number of crops must be >= 0, got {n}")
    if not photos:
        raise LrquantError("random_crops needs at least one photo")
    if not 0 < min_scale <= 1:
        raise LrquantError(f"min_scale must be in (0, 1], got {min_scale}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(photos))
    crops = []
    for k in range(n):
        photo = photos[int(order[k % len(photos)])]
        width, height = photo.size
        side = max(1, round(math.sqrt(rng.uniform(min_scale, 1.0)) * min(width, height)))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crops.append(photo.crop((left, top, left + side, top + side)))
    return crops


def _gray_to_rgb(pixels: np.ndarray) -> Image.Image:
    """An RGB image from a 2-D uint8 array (the same value in all three channels)."""
    return Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2), "RGB")


def digits_set() -> ImageSet:
    """scikit-learn's 1797 handwritten digits as 32x32 RGB images, labelled 0-9.

    The 8x8, 0-16 images are scaled to 0-255 and upsampled 4x with nearest neighbours, so later
    bicubic resizing to the model's side starts from sharp blocks rather than 8 pixels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    scaled = np.rint(np.asarray(digits.images, dtype=np.float64) * (255 / 16)).clip(0, 255).astype(np.uint8)
    upsampled = scaled.repeat(4, axis=1).repeat(4, axis=2)
    return ImageSet(
        images=[_gray_to_rgb(a) for a in upsampled],
        labels=[int(t) for t in digits.target],
        classes=[str(d) for d in range(10)],
        source="digits",
    )


def lfw_set() -> ImageSet:
    """scikit-image's LFW subset: 200 25x25 gray crops, the first 100 faces (label 1), then 100 non-faces."""
    import skimage.data

    faces = np.asarray(skimage.data.lfw_subset(), dtype=np.float64)
    if faces.max() > 1.0:  # documented as uint8, shipped as floats in [0, 1]: accept either
        faces = faces / 255.0
    pixels = np.rint(faces * 255).clip(0, 255).astype(np.uint8)
    half = len(pixels) // 2
    return ImageSet(
        images=[_gray_to_rgb(a) for a in pixels],
        labels=[1] * half + [0] * (len(pixels) - half),
        classes=["non-face", "face"],
        source="lfw",
    )


# --- command-line sources -----------------------------------------------------------------------


def resolve_image_source(spec: str, n: int | None, seed: int) -> ImageSet:
    """The image set a command-line ``spec`` names: a built-in set or a folder path.

    ``photos`` (also ``photos:calib``) gives ``n`` (default 32) random crops of the calibration
    photos; ``photos:heldout`` / ``photos:all`` give ``n`` crops (seed + 1 for held-out) or the
    whole photos when ``n`` is None. ``digits``, ``lfw`` and folders give a seeded random ``n`` of
    their images, or all of them in order; ``digits:N`` / ``lfw:N`` a seeded random ``N``. An
    existing path wins over a built-in name.
    """
    if n is not None:
        _positive(n, "image count")
    path = Path(spec).expanduser() if spec else None
    if path is not None and path.exists():
        return load_image_folder(spec, limit=n, seed=seed if n is not None else None)
    name, _, split = spec.partition(":")
    if name == "photos" and split in ("", *PHOTO_SPLITS):
        return _photo_source(split or "calib", n, seed)
    if name in ("digits", "lfw") and (not split or split.isdigit()):
        images = digits_set() if name == "digits" else lfw_set()
        count = int(split) if split else n  # "digits:300": a seeded 300 of them
        if count is not None:
            _positive(count, "image count")
        return images if count is None else _sample(images, count, seed)
    raise LrquantError(
        f"image source '{spec}' not found: give a folder of images (class subfolders give labels) "
        f"or a built-in set: {', '.join(BUILTIN_SOURCES)}"
    )


def _photo_source(split: str, n: int | None, seed: int) -> ImageSet:
    """Crops (or whole photos) of one built-in photo split."""
    photos = [image for _, image in photo_split(split)]
    source = "photos" if split == "calib" else f"photos:{split}"
    if n is None and split != "calib":
        return ImageSet(images=photos, labels=None, classes=None, source=source)
    crop_seed = seed + 1 if split == "heldout" else seed
    n = DEFAULT_PHOTO_CROPS if n is None else n
    return ImageSet(images=random_crops(photos, n, crop_seed), labels=None, classes=None, source=source)


def _sample(images: ImageSet, n: int, seed: int) -> ImageSet:
    """The first ``n`` images of a ``seed``-ed shuffle (all of them, shuffled, if fewer)."""
    order = np.random.default_rng(seed).permutation(len(images))[:n]
    return images.subset([int(i) for i in order])


def split_labelled(s: ImageSet, train_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A seeded random (not stratified) train/test split of a labelled set, both parts non-empty."""
    if s.labels is None:
        raise LrquantError(
            f"'{s.source}' has no labels: use a folder with class subfolders, or the built-in digits or lfw"
        )
    if not 0 < train_fraction < 1:
        raise LrquantError(f"train fraction must be between 0 and 1, got {train_fraction}")
    if len(s) < 2:
        raise LrquantError(f"'{s.source}' has {len(s)} image(s): a train/test split needs at least 2")
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(s))]
    cut = min(len(s) - 1, max(1, round(len(s) * train_fraction)))
    return s.subset(order[:cut], f"{s.source} (train)"), s.subset(order[cut:], f"{s.source} (test)")
