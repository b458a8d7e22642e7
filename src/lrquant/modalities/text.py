"""Language models: token windows of text in, next-token distributions out."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrquant.console import log
from lrquant.data.text import (
    calibration_windows,
    evaluation_windows,
    load_documents,
    prepended_bos,
    tokenize_documents,
)
from lrquant.device import placed
from lrquant.errors import LrquantError
from lrquant.eval.perplexity import score_streamed, score_windows
from lrquant.modalities.base import Evaluation, Modality, Rule
from lrquant.models.streaming import stand_ins

if TYPE_CHECKING:
    from lrquant.api import DataSettings
    from lrquant.arch import ArchSpec
    from lrquant.models.loading import LoadedModel

# weight-only at 4 bits or fewer: no smoothing scales, learned rounding, the searched clipping
# start, the larger clipping rate
WEIGHT_ONLY = dict(smoothing=None, rounding=True, clip_init="search", lr_clipping=0.1)

# The default recipe of a language model (no --method): the first rule that applies adds its
# fields to LRQuant+'s. Each is the best measured on SmolLM2-135M (docs/results.md).
TEXT_RULES: tuple[Rule, ...] = (
    Rule(
        "language model, 4-bit weights only, in groups of 64 or fewer",
        lambda s: s.abits >= 16 and s.wbits == 4 and s.group_size is not None and s.group_size <= 64,
        WEIGHT_ONLY,
        "SmolLM2-135M W4A16 g64 at fast: without the end-to-end step 17.27 and KL 0.103 against "
        "17.41 and 0.157 with it (news: KL 0.131 against 0.171), and 200 s sooner; at g128 and "
        "per channel the step still lowers perplexity. Without smoothing scales 17.31 and KL "
        "0.1065 against 17.50 and 0.1071 (news: KL 0.121 against 0.132)",
    ),
    Rule(
        "language model, weights of 4 bits or fewer only",
        lambda s: s.abits >= 16 and s.wbits <= 4,
        {**WEIGHT_ONLY, "e2e_epochs": 2},
        "SmolLM2-135M at fast: learned rounding, the searched clipping start and the larger "
        "clipping rate take W2A16 g64 from 244 to 70.8, and the end-to-end step sizes to 47.2; "
        "then dropping the smoothing scales (which weights alone do not need) gives 46.4 against "
        "47.1 at W2A16 g64 and 18.40 and KL 0.182 against 18.80 and 0.208 at W4A16 per channel",
    ),
    Rule(
        "language model, activations of 4 bits or fewer, unpacked",
        lambda s: s.abits <= 4 and not s.packed,
        dict(
            hadamard="down",
            clip_init="search",
            lr_clipping=0.1,
            lr_transform=1e-2,
            rounding=True,
            e2e_epochs=2,
        ),
        "SmolLM2-135M W4A4 at fast: 24.85 against 55.72 for LRQuant+ (the down projection's "
        "input rotated at run time, so lrquant's loader runs the output; not with --format)",
    ),
    Rule(
        "language model, activations of 4 bits or fewer, packed",
        lambda s: s.abits <= 4,
        dict(clip_init="search", lr_clipping=0.1, lr_transform=1e-2),
        "SmolLM2-135M W4A4 at fast, without run-time rotations: 48.12 against 55.72 for LRQuant+",
    ),
    Rule(
        "language model, activations of 5-6 bits, unpacked, rotatable",
        lambda s: s.abits <= 6 and s.rotatable and not s.packed,
        dict(hadamard="online", lr_by_bits=True),
        "SmolLM2-135M W6A6 at fast: 16.58 against 17.43 for LRQuant+ (rotated at run time, so "
        "lrquant's loader runs the output; not with --format); a quarter of the smoothing rate: "
        "16.56 and KL 0.0517 against 16.67 and 0.0550 in the same code",
    ),
    Rule(
        "language model, weights of 4 bits or fewer, 8-bit activations",
        lambda s: s.wbits <= 4 and s.abits < 16,
        dict(lr_clipping=0.1),
        "SmolLM2-135M W4A8 at fast: 20.61 against 20.84 for LRQuant+ (H200, fp32)",
    ),
    Rule(
        "language model, 8-bit weights and activations, unpacked, rotatable",
        lambda s: s.wbits >= 8 and s.abits <= 8 and s.rotatable and not s.packed,
        dict(hadamard="online", lr_by_bits=True),
        "SmolLM2-135M W8A8 at fast: 15.88 and KL 0.0036 against 15.93 and 0.0049 for rotation + RTN "
        "and 16.00 and 0.0092 for LRQuant+ (the smoothing rate a sixteenth; rotated at run time, so "
        "lrquant's loader runs the output; not with --format)",
    ),
    Rule(
        "language model, anything else", lambda s: True, {}, "LRQuant+ as published: nothing measured better"
    ),
)


class Text(Modality):
    name = "text"
    default_calib = "wikipedia:train"
    default_eval = "wikipedia:test"
    report_key = "perplexity"
    e2e_measure = "KL"
    rules = TEXT_RULES

    def settings(self, data: DataSettings, loaded: LoadedModel) -> DataSettings:
        if data.image_size is not None:
            raise LrquantError(
                f"--image-size sets a vision model's input resolution; '{loaded.name}' is a language model"
            )
        return super().settings(data, loaded)

    def calibration(self, loaded: LoadedModel, data: DataSettings, n: int) -> torch.Tensor:
        """``n`` seeded windows ``[n, seqlen]`` of the calibration text."""
        _check_seqlen(loaded, data.seqlen)
        ids = tokenize_documents(load_documents(data.calib, "train", data.text_field), loaded.tokenizer)
        return calibration_windows(ids, data.seqlen, prepended_bos(loaded.tokenizer), n, data.seed)

    def windows(self, loaded: LoadedModel, data: DataSettings) -> torch.Tensor:
        """The evaluation windows ``[n, seqlen]`` of the evaluation text."""
        _check_seqlen(loaded, data.seqlen)
        ids = tokenize_documents(load_documents(data.eval, "test", data.text_field), loaded.tokenizer)
        return evaluation_windows(ids, data.seqlen, prepended_bos(loaded.tokenizer), data.eval_windows)

    def model_inputs(self, sample: torch.Tensor) -> dict:
        return {"input_ids": sample[None], "use_cache": False}

    def eval_samples(self, loaded: LoadedModel, data: DataSettings):
        """What evaluation scores: the windows of the evaluation text."""
        return self.windows(loaded, data)

    def described(self, samples, data: DataSettings) -> dict:
        """What the evaluated samples were, for the report and ``lrquant eval``."""
        return {"seqlen": data.seqlen, "windows": samples.shape[0]}

    def score(self, model: nn.Module, samples, data: DataSettings, desc: str, reference=None) -> dict:
        """Perplexity of ``model`` on ``samples``; with ``reference``, KL and top-1 agreement."""
        return score_windows(model, samples, data.batch_size, desc, reference)

    def evaluation(
        self,
        loaded: LoadedModel,
        data: DataSettings,
        device: torch.device,
        full_precision: Callable[[], nn.Module],
    ) -> Evaluation:
        """Perplexity before and after; after, also the mean KL divergence from the full-precision
        model (loaded again: the one in memory is then quantized) and the top-1 agreement."""
        samples = self.eval_samples(loaded, data)
        about = self.described(samples, data)
        details = {f"eval_{key}": value for key, value in about.items() if key != "seqlen"}
        evaluation = Evaluation(lambda: None, lambda: None, details)

        def more(stage: str, scores: dict) -> None:
            if "accuracy" in scores:
                evaluation.more.setdefault("accuracy", {})[stage] = scores["accuracy"]

        def fp() -> float:
            log(f"full-precision perplexity on {scored_samples(about)}")
            with placed(loaded.model, device):
                scores = self.score(loaded.model, samples, data, "fp perplexity")
            more("fp", scores)
            return scores["perplexity"]

        def quantized() -> float:
            reference = full_precision()
            with placed(loaded.model, device), placed(reference, device):
                scores = self.score(loaded.model, samples, data, "quantized perplexity", reference)
            evaluation.fidelity.update(kl=scores["kl"], top1_agreement=scores["top1_agreement"])
            more("quantized", scores)
            return scores["perplexity"]

        evaluation.fp, evaluation.quantized = fp, quantized
        return evaluation

    def streamed_evaluation(
        self,
        loaded: LoadedModel,
        data: DataSettings,
        quantized: Callable[[], LoadedModel],
        full_precision: Callable[[], LoadedModel],
    ) -> Evaluation:
        """:meth:`evaluation` of a streamed run (:mod:`lrquant.models.streaming`): once the output
        is written, the quantized model and the full-precision one go through the windows block
        by block side by side, so ``quantized()`` scores both and ``fp()``, called after it,
        returns the full-precision perplexity."""
        samples = self.eval_samples(loaded, data)
        about = self.described(samples, data)
        evaluation = Evaluation(lambda: None, lambda: None, {"eval_windows": about["windows"]})

        def both() -> float:
            log(f"perplexity of the quantized and the full-precision model on {scored_samples(about)}")
            scores = score_streamed(quantized(), samples, data.batch_size, "perplexity", full_precision())
            evaluation.fidelity.update(kl=scores["kl"], top1_agreement=scores["top1_agreement"])
            evaluation.fp = lambda: scores["reference_perplexity"]
            return scores["perplexity"]

        evaluation.quantized = both
        return evaluation

    def evaluate(
        self, loaded: LoadedModel, data: DataSettings, reference: nn.Module | None, device: torch.device
    ) -> dict:
        """Perplexity; with ``reference``, KL divergence from it and top-1 agreement. A streamed
        model is scored block by block (``reference`` then is a streamed :class:`LoadedModel`)."""
        samples = self.eval_samples(loaded, data)
        if loaded.stream is not None:
            scores = score_streamed(loaded, samples, data.batch_size, "perplexity", reference)
            scores.pop("reference_perplexity", None)
            return {**self.described(samples, data), **scores}
        with (
            placed(loaded.model, device),
            placed(reference, device) if reference is not None else nullcontext(),
        ):
            scores = self.score(loaded.model, samples, data, "perplexity", reference)
        return {**self.described(samples, data), **scores}

    def data_report(self, data: DataSettings, calibration: torch.Tensor | None) -> dict:
        return {"seqlen": data.seqlen}

    def check_end_to_end(self, model: nn.Module, arch: ArchSpec) -> None:
        if model.get_output_embeddings() is None:
            raise LrquantError(
                f"e2e_epochs needs an image model or a causal language model with an output head; "
                f"'{arch.model_types[0]}' is neither: leave e2e_epochs at 0"
            )

    def end_to_end_norm(self, model: nn.Module, arch: ArchSpec) -> None:
        return None  # the model's own forward runs what follows the blocks (end_to_end_loss)

    def end_to_end_loss(
        self,
        model: nn.Module,
        arch: ArchSpec,
        inputs: dict,
        fp_hidden: torch.Tensor,
        norm: nn.Module | None,
        autocast,
    ) -> torch.Tensor:
        """KL divergence from the full-precision next-token distribution to the quantized
        model's, per token, averaged. The full-precision one is what the model's own forward
        makes of ``fp_hidden`` after the blocks (final norm, head, logit soft-capping: whatever
        the architecture has), its blocks standing aside."""
        with torch.no_grad(), stand_ins(model, arch, output=fp_hidden):
            target = F.log_softmax(model(**inputs).logits.float(), dim=-1)
        with autocast():
            logits = model(**inputs).logits
        log_q = F.log_softmax(logits.float(), dim=-1)
        return F.kl_div(log_q, target, log_target=True, reduction="none").sum(-1).mean()


def scored_samples(about: dict) -> str:
    """In words, what an evaluation scored, from its description (:meth:`Text.described`, or
    the image-text one): for the log and for ``lrquant eval``'s line."""
    if "pairs" in about:
        return f"the texts of {about['pairs']} image-text pairs"
    return f"{about['windows']} windows of {about['seqlen']} tokens"


def _check_seqlen(loaded: LoadedModel, seqlen: int) -> None:
    # Learned position embeddings (OPT) fail with an IndexError past the model's context.
    limit = getattr(loaded.arch.config_of(loaded.model), "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise LrquantError(f"--seqlen {seqlen} is longer than the model's context of {limit} tokens")
