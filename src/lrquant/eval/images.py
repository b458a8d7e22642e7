"""Evaluation of a vision model against its full-precision reference.

Each evaluation set is a list of images at one resolution. On every set we report the mean cosine
similarity of the model's final features to the reference's; on a labelled set also top-1
accuracy (classifiers) or linear-probe accuracy (backbones: a probe trained on the reference's
features of one half of the set, scored on the model's features of the other half).

Sets are named as on the command line, comma-separated, each with an optional ``@SIZE``
(``photos:heldout,digits@112``): see :func:`lrquant.data.images.resolve_image_source`; the
built-in photos are scored as 32 seeded crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from PIL import Image

from lrquant.arch import ArchSpec
from lrquant.console import Progress
from lrquant.data.images import DEFAULT_PHOTO_CROPS, ImagePreprocess, resolve_image_source, split_labelled
from lrquant.device import module_device
from lrquant.errors import LrquantError
from lrquant.eval.vision import feature_cosine, probe_accuracy, top1

DEFAULT_IMAGE_EVAL = "photos:heldout,digits@112,lfw@112"
PROBE_TRAIN_FRACTION = 0.5


class Pixels:
    """A set's images, preprocessed a batch at a time when sliced: the float32 model inputs of a
    whole set (1797 digits at 224 pixels: 1.1 GB) are never held at once."""

    def __init__(self, images: Sequence[Image.Image], preprocess: ImagePreprocess) -> None:
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.preprocess(self.images[rows])


@dataclass
class EvalSet:
    """One evaluation set: ``train`` holds the probe's training half of a labelled set."""

    name: str
    pixels: Pixels
    labels: torch.Tensor | None = None
    train_pixels: Pixels | None = None
    train_labels: torch.Tensor | None = None


def parse_sources(spec: str) -> list[tuple[str, int | None]]:
    """``"photos:heldout,digits@112"`` -> ``[("photos:heldout", None), ("digits", 112)]``."""
    out: list[tuple[str, int | None]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, size = item.partition("@")
        if size and not (size.isdigit() and int(size) >= 8):
            raise LrquantError(
                f"bad image size in '{item}': write NAME@SIZE with SIZE a number of pixels >= 8"
            )
        out.append((name, int(size) if size else None))
    if not out:
        raise LrquantError(f"no evaluation images named in '{spec}'")
    return out


def load_eval_sets(spec: str, preprocess: ImagePreprocess, seed: int = 0) -> list[EvalSet]:
    """Load, split and preprocess every set named in ``spec``."""
    sets = []
    for name, size in parse_sources(spec):
        prep = preprocess if size is None else preprocess.with_size(size)
        # The held-out photos are few (4): score seeded crops of them, like the calibration crops.
        images = resolve_image_source(name, DEFAULT_PHOTO_CROPS if name.startswith("photos") else None, seed)
        if images.labels is None:
            sets.append(EvalSet(name if size is None else f"{name}@{size}", Pixels(images.images, prep)))
            continue
        train, test = split_labelled(images, PROBE_TRAIN_FRACTION, seed)
        sets.append(
            EvalSet(
                name if size is None else f"{name}@{size}",
                Pixels(test.images, prep),
                torch.tensor(test.labels),
                Pixels(train.images, prep),
                torch.tensor(train.labels),
            )
        )
    return sets


def is_classifier(model: nn.Module) -> bool:
    """Whether the model ends in a classification head (scored by top-1 instead of a probe)."""
    return type(model).__name__.endswith("ForImageClassification")


@torch.no_grad()
def model_outputs(
    model: nn.Module,
    arch: ArchSpec,
    pixels: torch.Tensor | Pixels,
    batch_size: int = 16,
    desc: str = "images",
) -> torch.Tensor:
    """Logits of a classifier, else final features ``[n, d]``: the class token joined with the mean
    of the other tokens where the model has one, the mean of all tokens otherwise. ``pixels``:
    model inputs, or :class:`Pixels` preprocessed a batch at a time."""
    model.eval()
    device = module_device(model)
    outs = []
    with Progress(len(pixels), desc, "images") as bar:
        for start in range(0, len(pixels), batch_size):
            result = model(pixel_values=pixels[start : start + batch_size].to(device))
            if is_classifier(model):
                outs.append(result.logits.float().cpu())
            else:
                hidden = result.last_hidden_state.float().cpu()
                if arch.cls_token:
                    outs.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1))
                else:
                    outs.append(hidden.mean(dim=1))
            bar.update(min(batch_size, len(pixels) - start))
    return torch.cat(outs)


@dataclass
class Reference:
    """The full-precision model's outputs on every set (and on the probes' training halves)."""

    outputs: list[torch.Tensor]
    train_outputs: list[torch.Tensor | None]


def reference_outputs(
    model: nn.Module, arch: ArchSpec, sets: list[EvalSet], batch_size: int = 16
) -> Reference:
    """Run the reference model once over every set and every probe training half."""
    outputs = [model_outputs(model, arch, s.pixels, batch_size, f"fp {s.name}") for s in sets]
    train = [
        None if s.train_pixels is None else model_outputs(model, arch, s.train_pixels, batch_size, "fp probe")
        for s in sets
    ]
    return Reference(outputs, train)


def reference_metrics(
    model: nn.Module, arch: ArchSpec, sets: list[EvalSet], batch_size: int = 16
) -> tuple[Reference, dict[str, dict]]:
    """Run the reference model over every set and score it against itself (cosine 1, its own
    top-1 or probe accuracy): what the full-precision row of a table reports."""
    reference = reference_outputs(model, arch, sets, batch_size)
    return reference, metrics(sets, reference, reference.outputs, is_classifier(model))


def score(
    model: nn.Module,
    arch: ArchSpec,
    sets: list[EvalSet],
    reference: Reference,
    batch_size: int = 16,
    label: str = "quantized",
) -> dict[str, dict]:
    """Metrics of ``model`` on every set, against ``reference``: cosine, and top-1 or probe accuracy."""
    outputs = [model_outputs(model, arch, s.pixels, batch_size, f"{label} {s.name}") for s in sets]
    return metrics(sets, reference, outputs, is_classifier(model))


def metrics(
    sets: list[EvalSet], reference: Reference, outputs: list[torch.Tensor], classifier: bool
) -> dict[str, dict]:
    """Cosine to the reference on every set; top-1 (classifiers) or probe accuracy on labelled sets.

    ``metrics(sets, ref, ref.outputs, ...)`` scores the reference itself (cosine 1).
    """
    results: dict[str, dict] = {}
    for s, ref, ref_train, out in zip(sets, reference.outputs, reference.train_outputs, outputs, strict=True):
        row: dict[str, float | int] = {"images": len(s.pixels), "cosine": feature_cosine(ref, out)}
        if s.labels is not None and classifier:
            row["top1"] = top1(out, s.labels)
        elif s.labels is not None:
            row["probe_accuracy"] = probe_accuracy(ref_train, s.train_labels, out, s.labels)
        results[s.name] = row
    return results
