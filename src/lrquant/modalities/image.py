"""Vision transformers: images in, features (or class logits) out."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrquant.console import log
from lrquant.data.images import ImagePreprocess, resolve_image_source
from lrquant.device import placed
from lrquant.eval import images as image_eval
from lrquant.modalities.base import Evaluation, LastHidden, Modality, Rule

if TYPE_CHECKING:
    from lrquant.api import DataSettings
    from lrquant.arch import ArchSpec
    from lrquant.models.loading import LoadedModel

# The default recipe of a vision transformer (no --method), measured on DINOv2-small
# (docs/results.md).
IMAGE_RULES: tuple[Rule, ...] = (
    Rule(
        "vision transformer",
        lambda s: True,
        dict(smoothing="best", lr_by_bits=True),
        "DINOv2-small: the smoothing start chosen per block beats LAE at W4A4 and W6A6, and a "
        "smaller transform rate above 4 bits takes W6A6 past OmniQuant over six seeds",
    ),
)


class Image(Modality):
    name = "image"
    default_calib = "photos"
    default_eval = image_eval.DEFAULT_IMAGE_EVAL
    default_samples = 32
    report_key = "images"
    e2e_measure = "feature error"
    rules = IMAGE_RULES

    def preprocess(self, loaded: LoadedModel, data: DataSettings) -> ImagePreprocess:
        """The model's preprocessing, at ``--image-size`` when given."""
        prep = loaded.preprocess
        return prep if data.image_size is None else prep.with_size(data.image_size)

    def calibration(self, loaded: LoadedModel, data: DataSettings, n: int) -> torch.Tensor:
        """``n`` seeded calibration images ``[n, 3, H, W]``, preprocessed."""
        images = resolve_image_source(data.calib, n, data.seed)
        return self.preprocess(loaded, data)(images.images)

    def model_inputs(self, sample: torch.Tensor) -> dict:
        return {"pixel_values": sample[None]}

    def evaluation(
        self,
        loaded: LoadedModel,
        data: DataSettings,
        device: torch.device,
        full_precision: Callable[[], nn.Module],
    ) -> Evaluation:
        """Feature cosine to the full-precision model (its outputs kept from before quantizing),
        and top-1 or linear-probe accuracy, on every evaluation set."""
        sets = image_eval.load_eval_sets(data.eval, self.preprocess(loaded, data), data.seed)
        ref: list[image_eval.Reference] = []

        def fp() -> dict:
            log(f"full-precision outputs on {', '.join(s.name for s in sets)}")
            with placed(loaded.model, device):
                reference, own = image_eval.reference_metrics(
                    loaded.model, loaded.arch, sets, data.batch_size
                )
            ref.append(reference)
            return own

        def quantized() -> dict:
            with placed(loaded.model, device):
                return image_eval.score(loaded.model, loaded.arch, sets, ref[0], data.batch_size)

        return Evaluation(fp, quantized, {"eval_images": {s.name: len(s.pixels) for s in sets}})

    def evaluate(
        self, loaded: LoadedModel, data: DataSettings, reference: nn.Module | None, device: torch.device
    ) -> dict:
        """Scores on every evaluation set against ``reference`` (or the model against itself)."""
        sets = image_eval.load_eval_sets(data.eval, self.preprocess(loaded, data), data.seed)
        if reference is None:
            with placed(loaded.model, device):
                images = image_eval.reference_metrics(loaded.model, loaded.arch, sets, data.batch_size)[1]
        else:
            with placed(reference, device):
                ref = image_eval.reference_outputs(reference, loaded.arch, sets, data.batch_size)
            with placed(loaded.model, device):
                images = image_eval.score(loaded.model, loaded.arch, sets, ref, data.batch_size)
        return {"images": images}

    def data_report(self, data: DataSettings, calibration: torch.Tensor | None) -> dict:
        return {"seqlen": None, "image_size": None if calibration is None else calibration.shape[-1]}

    def check_end_to_end(self, model: nn.Module, arch: ArchSpec) -> None:
        return  # tuned on the last hidden states: every vision model has them

    def end_to_end_norm(self, model: nn.Module, arch: ArchSpec) -> nn.Module | None:
        return arch.feature_norm_module(model)

    def end_to_end_loss(
        self,
        model: nn.Module,
        arch: ArchSpec,
        inputs: dict,
        fp_hidden: torch.Tensor,
        norm: nn.Module | None,
        autocast,
    ) -> torch.Tensor:
        """The features' relative squared error (:func:`feature_error`)."""
        with LastHidden(model, arch) as last, autocast():
            model(**inputs)
        return feature_error(last.value, fp_hidden, norm, arch.cls_token)


def feature_error(
    out: torch.Tensor, target: torch.Tensor, norm: nn.Module | None, cls_token: bool
) -> torch.Tensor:
    """Squared error of an image model's features per token, relative to the full-precision
    features' size: the last hidden states through ``norm`` (the model's final norm, with its
    affine part; standardized where the model has none). The affine part matters: DINOv2-small's
    two largest residual channels get its final norm's two smallest weights, so an error measured
    before it chases channels the features hardly show. With a class token, it counts as much as
    all the other tokens together, as in the features a backbone is judged by (the class token
    joined with the mean of the others) and the token a classifier's head reads."""
    if norm is None:
        shape = target.shape[-1:]
        out, target = F.layer_norm(out.float(), shape), F.layer_norm(target.float(), shape)
    else:
        out, target = norm(out.float()), norm(target.float())
    error = (out - target).square().mean(-1) / target.square().mean(-1).clamp_min(1e-12)
    if cls_token:
        return 0.5 * error[:, 0].mean() + 0.5 * error[:, 1:].mean()
    return error.mean()
