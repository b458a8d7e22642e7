"""The kinds of model lrquant quantizes, each a :class:`Modality` (``text.py``, ``image.py``): a
new kind is one new file here, registered in :data:`MODALITIES`."""

from __future__ import annotations

from lrquant.errors import LrquantError
from lrquant.modalities.base import Evaluation, LastHidden, Modality, Rule, Situation, last_module
from lrquant.modalities.image import Image
from lrquant.modalities.image_text import ImageText
from lrquant.modalities.text import Text

MODALITIES: dict[str, Modality] = {m.name: m for m in (Text(), Image(), ImageText())}


def modality_named(name: str) -> Modality:
    """The modality called ``name``."""
    try:
        return MODALITIES[name]
    except KeyError:
        raise LrquantError(f"unknown modality '{name}'; known: {', '.join(MODALITIES)}") from None


def modality_of(arch) -> Modality:
    """The modality of an architecture (:class:`lrquant.arch.ArchSpec`)."""
    return modality_named(arch.modality)


__all__ = [
    "MODALITIES",
    "Evaluation",
    "LastHidden",
    "Modality",
    "Rule",
    "Situation",
    "last_module",
    "modality_named",
    "modality_of",
]
