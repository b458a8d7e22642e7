"""Vision-language models: an image and a text in (the image's tokens among the text's), the
next-token distribution out. The language model is what gets quantized; its block-wise learning
runs on the hidden states that image and text together produce."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from lrquant.arch.vision_language import get_vision_language_spec
from lrquant.data.pairs import DIGITS_PAIRS, load_pairs
from lrquant.data.samples import Sample, Samples
from lrquant.errors import LrquantError
from lrquant.eval.perplexity import score_windows
from lrquant.modalities.base import Rule
from lrquant.modalities.text import TEXT_RULES, Text

if TYPE_CHECKING:
    from lrquant.api import DataSettings
    from lrquant.models.loading import LoadedModel

SCORED = "text_mask"  # the field of encoded pairs that marks the text's own tokens
# fields of encoded pairs with answers: where the answer's token is, which choice it is, and the
# token of each choice
ANSWERS = ("answer_at", "answer", "choices")
NOT_INPUTS = (SCORED, *ANSWERS)  # fields evaluation reads, which the model does not take
# per-token fields of a processor's output: cut and padded with the token ids
TOKEN_FIELDS = ("input_ids", "token_type_ids", "mm_token_type_ids", SCORED)
PACKED_BY = "image_grid_thw"  # a processor's field that says its pixels are packed patches


def _carried(when: str, measured: str, without: tuple[str, ...] = ()) -> Rule:
    """The language model rule for ``when``, carried over (less the fields ``without``, which
    were not measured on a vision-language model), with what it measured on one."""
    text = next(rule for rule in TEXT_RULES if rule.when == f"language model, {when}")
    fields = {key: value for key, value in text.fields.items() if key not in without}
    return Rule(f"vision-language model, {when}", text.applies, fields, measured)


# The default recipe of a vision-language model's language model (no --method): the language
# model rules (TEXT_RULES, chosen on SmolLM2-135M and Wikipedia) where they were confirmed,
# unchanged, on tiny-llava's 500 test pairs (docs/results.md, "tiny-llava quantized"); LRQuant+
# as published elsewhere, until measured.
IMAGE_TEXT_RULES: tuple[Rule, ...] = (
    _carried(
        "weights of 4 bits or fewer only",
        "tiny-llava W4A16 at fast: the language model rule of the time (with LAE smoothing) gives "
        "80.0 % task accuracy and KL 0.460 against 71.8 % and 0.735 for LRQuant+; the text rule "
        "without smoothing scales is not measured here",
        without=("smoothing",),
    ),
    _carried(
        "activations of 4 bits or fewer, unpacked",
        "tiny-llava W4A4 at fast: the language model rule gives 71.0 % task accuracy and KL 0.713 "
        "against 27.2 % and 3.068 for LRQuant+",
    ),
    _carried(
        "activations of 5-6 bits, unpacked, rotatable",
        "tiny-llava W6A6 at fast: the language model rule (its residual stream and the projector's "
        "output rotated, a quarter of the smoothing rate) gives 80.4 % task accuracy and KL 0.251 "
        "against 77.6 % and 0.56 for LRQuant+ (80.2 % and 0.259 without the smaller rate)",
    ),
    _carried(
        "weights of 4 bits or fewer, 8-bit activations",
        "tiny-llava W4A8 at fast: the language model rule gives 71.0 % task accuracy and KL 0.686 "
        "against 66.0 % and 0.798 for LRQuant+",
    ),
    Rule(
        "vision-language model, anything else",
        lambda s: True,
        {},
        "LRQuant+ as published: the other language model rules are not measured on a "
        "vision-language model yet",
    ),
)


class ImageText(Text):
    """Image-text pairs in; the end-to-end loss is the language model's (:class:`Text`)."""

    name = "image-text"
    default_calib = f"{DIGITS_PAIRS}:train"
    default_eval = f"{DIGITS_PAIRS}:test"
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
        return encode_pairs(loaded, load_pairs(data.calib, n, data.seed), data.seqlen)

    def model_inputs(self, sample: Sample) -> dict:
        """Every field the processor gave (token ids, pixels, token types, ...), as a batch of one."""
        return {name: t[None] for name, t in sample.items() if name not in NOT_INPUTS} | {"use_cache": False}

    def eval_samples(self, loaded: LoadedModel, data: DataSettings) -> Samples:
        """What evaluation scores: the evaluation pairs, encoded as for calibration."""
        return encode_pairs(loaded, load_pairs(data.eval, data.eval_windows, data.seed), data.seqlen)

    def described(self, samples: Samples, data: DataSettings) -> dict:
        return {"pairs": len(samples)}

    def score(
        self, model: nn.Module, samples: Samples, data: DataSettings, desc: str, reference=None
    ) -> dict:
        """Perplexity of the texts given their images (their own tokens only); with
        ``reference``, KL and top-1 agreement on the same tokens."""
        return score_pairs(model, samples, data.batch_size, desc, reference)

    def data_report(self, data: DataSettings, calibration) -> dict:
        return {"seqlen": None if calibration is None else calibration["input_ids"].shape[1]}


def score_pairs(model: nn.Module, samples: Samples, batch_size: int, desc: str, reference=None) -> dict:
    """:func:`score_windows` of encoded pairs (:func:`encode_pairs`): the text's own tokens
    scored, every other model input passed along, and the accuracy where the pairs have answers."""
    return score_windows(
        model,
        samples["input_ids"],
        batch_size,
        desc,
        reference,
        extra={name: t for name, t in samples.fields.items() if name not in ("input_ids", *NOT_INPUTS)},
        scored=samples[SCORED],
        answers=tuple(samples[name] for name in ANSWERS) if ANSWERS[0] in samples.fields else None,
    )


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
    prompt = get_vision_language_spec(loaded.model_type).image_prompt
    return encode(loaded.processor, loaded.model.config.image_token_id, pairs, seqlen, loaded.name, prompt)


def encode(
    processor, image_id: int, pairs, seqlen: int, name: str = "the model", prompt: str = "{image}"
) -> Samples:
    """:func:`encode_pairs` with ``processor``, for a model whose image token is ``image_id``
    and whose prompts place an image as ``prompt`` says (around the processor's image token).

    A processor that packs each image's patches in one row per patch (Qwen2-VL's, with
    ``image_grid_thw``) gets every image at the first one's size, so that all have as many."""
    marker = getattr(processor, "image_token", None)
    if marker is None:
        raise LrquantError(f"the processor of '{name}' names no image token: it cannot place the image")
    tokens: dict[str, list[torch.Tensor]] = {}  # fields with one value per token
    images: dict[str, list[torch.Tensor]] = {}  # fields with one value per sample
    size = None  # the first image's, for packed patches
    for pair in pairs:
        image = pair.image if size is None or pair.image.size == size else pair.image.resize(size)
        out = processor(images=image, text=prompt.format(image=marker) + pair.text, return_tensors="pt")
        if PACKED_BY in out:  # the patches of the one image: kept whole
            size = size or pair.image.size
            images.setdefault("pixel_values", []).append(out.pop("pixel_values"))
        row = out["input_ids"][0]
        if (row[:seqlen] == image_id).sum() != (row == image_id).sum():
            raise LrquantError(f"--seqlen {seqlen} cuts into the image's tokens: give a longer --seqlen")
        text = processor.tokenizer(pair.text, add_special_tokens=False)["input_ids"]
        out[SCORED] = _text_tokens(row, text, image_id)[None]
        answer = _answer(processor.tokenizer, pair, row, text, seqlen)
        if answer is not None:
            out.update({name: value[None] for name, value in zip(ANSWERS, answer, strict=True)})
        for name, value in out.items():
            if name in TOKEN_FIELDS:
                tokens.setdefault(name, []).append(value[0][:seqlen])
            elif name != "attention_mask":
                images.setdefault(name, []).append(value[0])
    if any(len(images.get(name, ())) != len(tokens["input_ids"]) for name in ANSWERS):
        for name in ANSWERS:  # accuracy only where every pair has its answer
            images.pop(name, None)
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


def _answer(tokenizer, pair, row: torch.Tensor, text: list[int], seqlen: int):
    """Where the answer's token sits in ``row``, its choice and every choice's token, for a pair
    of a task with answers whose choices are one token each (else None: no accuracy)."""
    if pair.answer is None:
        return None
    choices = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in pair.choices]
    at = len(row) - len(text) + len(tokenizer(pair.prompt, add_special_tokens=False)["input_ids"])
    if any(len(ids) != 1 for ids in choices) or row[-len(text) :].tolist() != text or at >= seqlen:
        return None
    if int(row[at]) != choices[pair.answer][0]:
        return None
    return torch.tensor(at), torch.tensor(pair.answer), torch.tensor([ids[0] for ids in choices])


def _text_tokens(row: torch.Tensor, text: list[int], image_id: int) -> torch.Tensor:
    """The mask of ``row``'s tokens that are the text's (``text``: the text tokenized alone)."""
    mask = torch.zeros(len(row), dtype=torch.bool)
    if text and row[-len(text) :].tolist() == text:
        mask[-len(text) :] = True
    else:  # the text's first tokens merged with what precedes them: all after the image
        mask[int((row == image_id).nonzero().max()) + 1 :] = True
    return mask
