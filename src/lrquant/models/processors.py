"""Processors of vision-language families whose transformers processor cannot be built here.

Qwen2-VL's and Qwen2.5-VL's processors take a video processor too, and transformers builds
video processors with torchvision only (which this project does not depend on: PyPI's
torchvision does not load beside the CPU build of torch it installs). lrquant feeds images
and text only, so for these families it builds the family's own processor class without the
video part (:func:`images_only`): the image processor and tokenizer are the checkpoint's, the
text and images are processed by the family's code, and a saved processor names the family's
class, so that transformers loads it where torchvision is installed.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

# model_type -> the transformers processor class that wants a video processor
IMAGES_ONLY: dict[str, str] = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


@cache
def images_only(model_type: str) -> type:
    """The processor class of ``model_type`` (a key of :data:`IMAGES_ONLY`) without a video
    processor: built from an image processor and a tokenizer."""
    import transformers
    from transformers import ProcessorMixin

    family = getattr(transformers, IMAGES_ONLY[model_type])

    class ImagesOnly(family):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
            # what the family's __init__ sets beside its sub-processors
            for kind in ("image", "video"):
                token = getattr(tokenizer, f"{kind}_token", f"<|{kind}_pad|>")
                setattr(self, f"{kind}_token", token)
                token_id = getattr(tokenizer, f"{kind}_token_id", None)
                setattr(self, f"{kind}_token_id", token_id or tokenizer.convert_tokens_to_ids(token))

        def to_dict(self) -> dict:
            return super().to_dict() | {"processor_class": family.__name__}

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = f"ImagesOnly{family.__name__}"
    return ImagesOnly


def load_images_only(path: Path, model_type: str, trust_remote_code: bool) -> object:
    """The images-only processor (:func:`images_only`) of the checkpoint in ``path``."""
    from transformers import AutoImageProcessor, AutoTokenizer

    images = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return images_only(model_type)(image_processor=images, tokenizer=tokenizer)
