"""Vision-language models: an image and a text in (the image's tokens among the text's), the
next-token distribution out. The language model is what gets quantized; its block-wise learning
runs on the hidden states that image and text together produce."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from lrquant.data.pairs import load_pairs
from lrquant.data.samples import Sample, Samples
from lrquant.errors import LrquantError
from lrquant.eval.perplexity import score_windows
from lrquant.modalities.base import Rule
from lrquant.modalities.text import Text

if TYPE_CHECKING:
    from lrquant.api import DataSettings
    from lrquant.models.loading import LoadedModel

SCORED = "text_mask"  # the field of encoded pairs that marks the text's own tokens
# per-token fields of a processor's output: cut and padded with the token ids
TOKEN_FIELDS = ("input_ids", "token_type_ids", "mm_token_type_ids", SCORED)

# Not measured on a vision-language model yet: LRQuant+ as published.
IMAGE_TEXT_RULES: tuple[Rule, ...] = (
    Rule(
        "vision-language model",
        lambda s: True,
        {},
        "LRQuant+ as published: no setting has been measured better on a vision-language model yet",
    ),
)


class ImageText(Text):
    """Image-text pairs in; the end-to-end loss is the language model's (:class:`Text`)."""

    name = "image-text"
    default_calib = ""  # no built-in pairs yet: --calib-data is needed
    default_eval = ""
    rules = IMAGE_TEXT_RULES

    def settings(self, data: DataSettings, loaded: LoadedModel) -> DataSettings:
        if data.image_size is not None:
            raise LrquantError(
                "--image-size does not apply to a vision-language model: its processor sets the resolution"
            )
        return super().settings(data, loaded)

    def calibration(self, loaded: LoadedModel, data: DataSettings, n: int) -> Samples:
        """``n`` seeded pairs, each run through the model's processor (the image marker first,
        then the text), cut to ``seqlen`` tokens and padded at the end to the longest."""
        if not data.calib:
            raise LrquantError(
                "a vision-language model calibrates on image-text pairs: give --calib-data, a folder "
                'of images each with a .txt of the same name, or a .jsonl of {"image", "text"} lines'
            )
        return encode_pairs(loaded, load_pairs(data.calib, n, data.seed), data.seqlen)

    def model_inputs(self, sample: Sample) -> dict:
        """Every field the processor gave (token ids, pixels, token types, ...), as a batch of one."""
        return {name: t[None] for name, t in sample.items() if name != SCORED} | {"use_cache": False}

    def eval_samples(self, loaded: LoadedModel, data: DataSettings) -> Samples:
        """What evaluation scores: the evaluation pairs, encoded as for calibration."""
        if not data.eval:
            raise LrquantError(
                "a vision-language model is evaluated on image-text pairs: give --eval-data (a folder "
                "of images each with a .txt, or a .jsonl), or skip the evaluation with --no-eval"
            )
        return encode_pairs(loaded, load_pairs(data.eval, data.eval_windows, data.seed), data.seqlen)

    def described(self, samples: Samples, data: DataSettings) -> dict:
        return {"pairs": len(samples)}

    def score(
        self, model: nn.Module, samples: Samples, data: DataSettings, desc: str, reference=None
    ) -> dict:
        """Perplexity of the texts given their images (their own tokens only); with
        ``reference``, KL and top-1 agreement on the same tokens."""
        return score_windows(
            model,
            samples["input_ids"],
            data.batch_size,
            desc,
            reference,
            extra={name: t for name, t in samples.fields.items() if name not in ("input_ids", SCORED)},
            scored=samples[SCORED],
        )

    def data_report(self, data: DataSettings, calibration) -> dict:
        return {"seqlen": None if calibration is None else calibration["input_ids"].shape[1]}


def encode_pairs(loaded: LoadedModel, pairs, seqlen: int) -> Samples:
    """Every field the processor makes of ``pairs`` (token ids ``[n, L]``, pixels, ...), with
    :data:`SCORED`, the mask of the tokens evaluation scores.

    Each pair is the image marker, then the text; the processor puts the image's tokens (and its
    family's wrappers) in the marker's place. Every sample gets the same length ``L`` (the
    longest, at most ``seqlen``; shorter ones padded at the end, token ids with the end-of-text
    token), because a block is replayed with the attention mask and positions of the first
    sample; padding at the end changes no earlier token's output. Scored are the text's own
    tokens: the sample's last tokens when they are the text tokenized alone, else every token
    after the image's last (not the image, its wrappers or the padding)."""
    processor = loaded.processor
    marker = getattr(processor, "image_token", None)
    if marker is None:
        raise LrquantError(
            f"the processor of '{loaded.name}' names no image token: it cannot place the image"
        )
    image_id = loaded.model.config.image_token_id
    tokens: dict[str, list[torch.Tensor]] = {}  # fields with one value per token
    images: dict[str, list[torch.Tensor]] = {}  # fields with one value per sample
    for pair in pairs:
        out = processor(images=pair.image, text=marker + pair.text, return_tensors="pt")
        row = out["input_ids"][0]
        if (row[:seqlen] == image_id).sum() != (row == image_id).sum():
            raise LrquantError(f"--seqlen {seqlen} cuts into the image's tokens: give a longer --seqlen")
        text = processor.tokenizer(pair.text, add_special_tokens=False)["input_ids"]
        out[SCORED] = _text_tokens(row, text, image_id)[None]
        for name, value in out.items():
            if name in TOKEN_FIELDS:
                tokens.setdefault(name, []).append(value[0][:seqlen])
            elif name != "attention_mask":
                images.setdefault(name, []).append(value[0])
    length = max(len(row) for row in tokens["input_ids"])
    pad = processor.tokenizer.eos_token_id
    if pad is None:
        pad = processor.tokenizer.pad_token_id or 0
    fields = {}
    for name, rows in tokens.items():
        padded = torch.full((len(rows), length), pad if name == "input_ids" else 0, dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = row
        fields[name] = padded
    return Samples(fields | {name: torch.stack(values) for name, values in images.items()})


def _text_tokens(row: torch.Tensor, text: list[int], image_id: int) -> torch.Tensor:
    """The mask of ``row``'s tokens that are the text's (``text``: the text tokenized alone)."""
    mask = torch.zeros(len(row), dtype=torch.bool)
    if text and row[-len(text) :].tolist() == text:
        mask[-len(text) :] = True
    else:  # the text's first tokens merged with what precedes them: all after the image
        mask[int((row == image_id).nonzero().max()) + 1 :] = True
    return mask
