"""Vision-language models as data: where the language model, the vision tower and the projector
between them sit, and each part's architecture map re-rooted at its place in the whole model.

A LLaVA-style model is an image encoder, a projector that turns its features into token
embeddings, and a decoder LLM that reads them in place of the image tokens. Each part is a
family lrquant already maps (LLaMA, Gemma 3, SigLIP, CLIP, ...), so the joined model needs only
the paths: :meth:`VisionLanguageSpec.language_arch` and :meth:`~VisionLanguageSpec.vision_arch`
give the parts' :class:`ArchSpec` with every path relative to the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lrquant.arch.registry import ArchSpec, get_arch_spec
from lrquant.errors import LrquantError


def _reroot(path: str, old: str, new: str) -> str:
    """``path`` with its leading ``old`` part replaced by ``new`` (``old`` empty: prefixed)."""
    if not old:
        return f"{new}.{path}"
    if path != old and not path.startswith(old + "."):
        raise ValueError(f"'{path}' does not start with '{old}'")
    return new + path[len(old) :]


@dataclass(frozen=True)
class VisionLanguageSpec:
    """Where a vision-language family keeps its parts (paths relative to the whole model)."""

    model_types: tuple[str, ...]
    language: str  # the decoder LLM's base model (its blocks, embedding and final norm)
    vision: str  # the vision tower
    projector: str  # the projector from image features to token embeddings
    # the projector's linear that writes the image's token embeddings (None: not a linear, as
    # Gemma 3's matrix; the residual-stream rotations are then refused)
    projector_out: str | None
    # how a prompt places one image, around the processor's image token (Qwen2-VL wraps it)
    image_prompt: str = "{image}"

    def language_arch(self, config) -> ArchSpec:
        """The map of the language model (``config.text_config``'s family), re-rooted: a text
        map's paths start at its base model (``model.``), here at :attr:`language`; the head
        stays at the top (``lm_head``). Its modality is ``image-text``: it learns on what images
        and text produce together."""
        text = get_arch_spec(config.text_config.model_type)
        move = lambda path: _reroot(path, "model", self.language)  # noqa: E731
        return replace(
            text,
            model_types=self.model_types,
            blocks=tuple(move(p) for p in text.blocks),
            embedding=None if text.embedding is None else move(text.embedding),
            final_norm=None if text.final_norm is None else move(text.final_norm),
            stream_writers=() if self.projector_out is None else (f"{self.projector}.{self.projector_out}",),
            projector=self.projector,
            modality="image-text",
            config="text_config",
        )

    def vision_arch(self, config) -> ArchSpec:
        """The map of the vision tower (``config.vision_config``'s family) under :attr:`vision`;
        it has no head of its own here (the projector reads its features). Its modality is
        ``image-text``: it is calibrated on the same image-text pairs as the language model (the
        whole model runs up to the tower's blocks)."""
        tower = get_arch_spec(config.vision_config.model_type)
        move = lambda path: _reroot(path, "", self.vision)  # noqa: E731
        return replace(
            tower,
            model_types=self.model_types,
            blocks=tuple(move(p) for p in tower.blocks),
            feature_norm=tuple(move(p) for p in tower.feature_norm),
            heads=(),
            modality="image-text",
            config="vision_config",
        )


VISION_LANGUAGE_SPECS: tuple[VisionLanguageSpec, ...] = (
    VisionLanguageSpec(
        ("llava",), "model.language_model", "model.vision_tower", "model.multi_modal_projector", "linear_2"
    ),
    VisionLanguageSpec(
        ("gemma3",), "model.language_model", "model.vision_tower", "model.multi_modal_projector", None
    ),
    VisionLanguageSpec(
        ("idefics3", "smolvlm"),
        "model.text_model",
        "model.vision_model",
        "model.connector",
        "modality_projection.proj",
    ),
    *(
        VisionLanguageSpec(
            (model_type,),
            "model.language_model",
            "model.visual",
            "model.visual.merger",
            "mlp.2",
            image_prompt="<|vision_start|>{image}<|vision_end|>",
        )
        for model_type in ("qwen2_vl", "qwen2_5_vl")
    ),
)
_BY_TYPE = {t: spec for spec in VISION_LANGUAGE_SPECS for t in spec.model_types}
VISION_LANGUAGE_TYPES = frozenset(_BY_TYPE)


def get_vision_language_spec(model_type: str) -> VisionLanguageSpec:
    """The parts map of a vision-language ``model_type``, or one clear error naming those known."""
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        known = ", ".join(sorted(_BY_TYPE))
        raise LrquantError(
            f"unsupported vision-language architecture '{model_type}'; supported: {known}"
        ) from None
