"""Metrics for vision models on tensors: feature similarity, top-1 accuracy and a linear probe.

A quantized backbone is judged by how close its features stay to the full-precision ones
(``feature_cosine``) and by how well a linear classifier trained on full-precision features still
classifies its features (``probe_accuracy``). Running the models happens elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lrquant.errors import LrquantError

_STD_FLOOR = 1e-8  # features constant over the training set are centred but not scaled


def feature_cosine(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity between two ``[n, d]`` feature matrices.

    Leading dimensions beyond the first are treated as more rows (e.g. ``[n, tokens, d]``). The
    sums are done in float64 so that values close to 1 are not rounded away.
    """
    if ref.shape != other.shape:
        raise LrquantError(f"feature shapes differ: {tuple(ref.shape)} vs {tuple(other.shape)}")
    if ref.dim() < 2 or ref.numel() == 0:
        raise LrquantError(f"features must be a non-empty [n, d] matrix, got shape {tuple(ref.shape)}")
    a = ref.detach().reshape(-1, ref.shape[-1]).to(torch.float64)
    b = other.detach().reshape(-1, other.shape[-1]).to(torch.float64)
    return float(F.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of rows of ``[n, classes]`` logits whose largest entry is at the label."""
    if logits.dim() != 2:
        raise LrquantError(f"logits must be [n, classes], got shape {tuple(logits.shape)}")
    labels = _labels(labels, logits.shape[0])
    return 100.0 * float((logits.argmax(dim=1) == labels).double().mean())


def _labels(labels: torch.Tensor, rows: int) -> torch.Tensor:
    """``labels`` as a 1-D int64 tensor of ``rows`` non-negative class indices."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() != rows or labels.numel() == 0:
        raise LrquantError(
            f"labels must be a non-empty 1-D tensor with one label per row: {rows} rows, "
            f"labels of shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or int(labels.min()) < 0:
        raise LrquantError("labels must be non-negative integer class indices")
    return labels.to(torch.int64)


def _features(features: torch.Tensor) -> torch.Tensor:
    """``features`` as a float64 ``[n, d]`` matrix, refusing other shapes and non-finite values."""
    if features.dim() != 2 or features.numel() == 0:
        raise LrquantError(f"features must be a non-empty [n, d] matrix, got shape {tuple(features.shape)}")
    out = features.detach().to(torch.float64)
    if not torch.isfinite(out).all():
        raise LrquantError("features contain NaN or infinity: the model's output overflowed")
    return out


@dataclass
class LinearProbe:
    """A multinomial logistic-regression classifier on standardised features.

    The standardisation (``mean``, ``std``) comes from the training features and is reused when
    scoring, so quantized features are judged on the full-precision scale.
    """

    weight: torch.Tensor  # [d, classes], float64
    bias: torch.Tensor  # [classes], float64
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]

    @classmethod
    def fit(
        cls, features: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3, max_iter: int = 500
    ) -> LinearProbe:
        """Fit with full-batch L-BFGS in float64: deterministic, since it starts from zero weights.

        The loss is the mean cross-entropy plus ``weight_decay / 2 * |weight|^2`` (bias not decayed).
        """
        x = _features(features)
        y = _labels(labels, x.shape[0])
        classes = int(y.max()) + 1
        if len(torch.unique(y)) < 2:
            raise LrquantError("a linear probe needs labels of at least two classes")
        if weight_decay < 0 or max_iter < 1:
            raise LrquantError(f"need weight_decay >= 0 and max_iter >= 1, got {weight_decay}, {max_iter}")
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        std = torch.where(std > _STD_FLOOR, std, torch.ones_like(std))
        probe = cls(
            weight=torch.zeros(x.shape[1], classes, dtype=torch.float64),
            bias=torch.zeros(classes, dtype=torch.float64),
            mean=mean,
            std=std,
        )
        probe._optimise((x - mean) / std, y, weight_decay, max_iter)
        return probe

    def _optimise(self, x: torch.Tensor, y: torch.Tensor, weight_decay: float, max_iter: int) -> None:
        """Minimise the regularised cross-entropy over ``weight`` and ``bias`` in place."""
        weight = self.weight.clone().requires_grad_(True)
        bias = self.bias.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=max_iter,
            history_size=20,
            tolerance_grad=1e-7,
            tolerance_change=1e-10,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.weight = weight.detach()
        self.bias = bias.detach()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores ``[n, classes]`` of features, standardised with the training statistics."""
        x = _features(features)
        if x.shape[1] != self.weight.shape[0]:
            raise LrquantError(
                f"features have {x.shape[1]} dimensions but the probe was trained on {self.weight.shape[0]}"
            )
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The predicted class index of each row, int64 ``[n]``."""
        return self.logits(features).argmax(dim=1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy in percent on ``features`` with true ``labels``."""
        return top1(self.logits(features), labels)


def probe_accuracy(
    train_fp: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-3,
) -> float:
    """Accuracy (percent) on ``test_features`` of a probe fitted on full-precision ``train_fp``.

    Fitting on full-precision features and scoring quantized ones measures how much quantization
    moves the features relative to what a downstream head learned.
    """
    probe = LinearProbe.fit(train_fp, train_labels, weight_decay=weight_decay)
    return probe.accuracy(test_features, test_labels)
