"""Image-text pairs for vision-language models: a folder where each image has a text file of the
same name (``cat.png`` + ``cat.txt``), a ``.jsonl`` file with one ``{"image": path, "text":
...}`` per line (paths relative to the file), or the built-in ``digits-words``.

``digits-words`` are scikit-learn's 1797 handwritten digits, each with the text "A handwritten
digit seven." (its digit in words): a task with answers, so a model's accuracy can be measured
(which of the ten words it finds likeliest after "A handwritten digit"). A fixed split (seed 0,
whatever the run's seed) keeps ``digits-words:test`` (500 images) apart from
``digits-words:train`` (the other 1297); plain ``digits-words`` is the train split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lrquant.data.images import IMAGE_SUFFIXES, _open_image, _positive
from lrquant.errors import LrquantError


@dataclass(frozen=True)
class Pair:
    """One image and the text that goes with it; in a task with answers, the text holds
    ``choices[answer]`` as one word after ``prompt`` (``text`` = prompt + " " + word + ...)."""

    image: Image.Image
    text: str
    answer: int | None = None
    choices: tuple[str, ...] = ()
    prompt: str = ""


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_PROMPT = "A handwritten digit"
DIGITS_PAIRS = "digits-words"
DIGITS_TEST = 500  # images in digits-words:test


def digit_pairs(split: str) -> list[Pair]:
    """The built-in pairs of ``split`` (``train`` or ``test``), in a fixed order."""
    from lrquant.data.images import digits_set

    digits = digits_set()
    order = [int(i) for i in np.random.default_rng(0).permutation(len(digits))]
    chosen = order[:DIGITS_TEST] if split == "test" else order[DIGITS_TEST:]
    return [
        Pair(
            digits.images[i],
            f"{DIGITS_PROMPT} {DIGIT_WORDS[digits.labels[i]]}.",
            digits.labels[i],
            DIGIT_WORDS,
            DIGITS_PROMPT,
        )
        for i in chosen
    ]


def load_pairs(spec: str, n: int | None = None, seed: int = 0) -> list[Pair]:
    """The pairs of a folder, a ``.jsonl`` file or a built-in split: all of them in order, or a
    ``seed``-ed random ``n`` (only those images are opened)."""
    name, _, split = spec.partition(":")
    if name == DIGITS_PAIRS and split in ("", "train", "test"):
        pairs = digit_pairs(split or "train")
        if n is None:
            return pairs
        order = np.random.default_rng(seed).permutation(len(pairs))[: _positive(n, "pair count")]
        return [pairs[int(i)] for i in order]
    path = Path(spec).expanduser()
    if not path.exists():
        raise LrquantError(
            f"image-text pairs '{spec}' not found: give a folder of images with a .txt of the same "
            'name beside each, a .jsonl of {"image": path, "text": ...} lines, or the built-in '
            f"{DIGITS_PAIRS}:train / {DIGITS_PAIRS}:test"
        )
    listed = _folder_pairs(path) if path.is_dir() else _jsonl_pairs(path)
    order = list(range(len(listed)))
    if n is not None:
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(listed))][
            : _positive(n, "pair count")
        ]
    return [Pair(_open_image(listed[i][0]), listed[i][1]) for i in order]


def _folder_pairs(root: Path) -> list[tuple[Path, str]]:
    images = sorted(
        p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    texts = {p.stem: p for p in root.glob("*.txt") if not p.name.startswith(".")}
    if not images:
        raise LrquantError(f"'{root}' has no images: put image files with a .txt of the same name in it")
    pairs = []
    for image in images:
        if image.stem not in texts:
            raise LrquantError(f"image '{image}' has no text: add '{image.stem}.txt' beside it, or remove it")
        pairs.append((image, _text(texts.pop(image.stem))))
    if texts:
        stray = sorted(texts)[0]
        raise LrquantError(
            f"text '{root / (stray + '.txt')}' has no image of the same name: add one or remove it"
        )
    return pairs


def _text(file: Path) -> str:
    try:
        text = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise LrquantError(f"cannot read '{file}' as UTF-8 text ({type(err).__name__}): re-save it") from None
    if not text:
        raise LrquantError(f"'{file}' is empty: write the image's text in it, or remove the pair")
    return text


def _jsonl_pairs(file: Path) -> list[tuple[Path, str]]:
    if file.suffix.lower() != ".jsonl":
        raise LrquantError(f"'{file}' is neither a folder nor a .jsonl file of image-text pairs")
    pairs = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LrquantError(f"cannot read '{file}' as UTF-8 text ({type(err).__name__}): re-save it") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"'{file}' line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LrquantError(
                f'{where} is not JSON: write one {{"image": ..., "text": ...}} per line'
            ) from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("image"), str)
            or not isinstance(row.get("text"), str)
        ):
            raise LrquantError(f'{where} needs an "image" path and a "text", both strings')
        if not row["text"].strip():
            raise LrquantError(f"{where} has an empty text: write the image's text, or remove the line")
        image = (file.parent / row["image"]).expanduser()
        if not image.is_file():
            raise LrquantError(f"{where}: image '{image}' not found: fix the path (relative to the .jsonl)")
        pairs.append((image, row["text"].strip()))
    if not pairs:
        raise LrquantError(f'\'{file}\' has no pairs: write one {{"image": ..., "text": ...}} per line')
    return pairs
