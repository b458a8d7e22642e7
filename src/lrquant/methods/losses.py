"""Block reconstruction losses: MSE, negative log cosine similarity, dynamic weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_COSINE = 1e-6


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements."""
    return F.mse_loss(pred.float(), target.float())


def token_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the cosine similarity of hidden vectors."""
    return F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def nlc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log of the mean token cosine, ``-log|cos|``, clamped away from ``log 0``."""
    return -torch.log(token_cosine(pred, target).abs().clamp(min=MIN_COSINE))


class DynamicWeighting:
    """Divide each loss term by a detached moving average of its own size (momentum 0.95).

    Every term then contributes on the order of 1, whatever its scale; the averages start at 1
    and include the current step.
    """

    def __init__(self, terms: int, momentum: float = 0.95) -> None:
        self.momentum = momentum
        self.average = [1.0] * terms

    def __call__(self, *losses: torch.Tensor) -> torch.Tensor:
        divisors = self.divisors(*(float(loss.detach()) for loss in losses))
        total = losses[0].new_zeros(())
        for divisor, loss in zip(divisors, losses, strict=True):
            total = total + loss / divisor
        return total

    def divisors(self, *values: float) -> list[float]:
        """Update the averages with this step's term ``values``; what each term is divided by."""
        for i, value in enumerate(values):
            self.average[i] = self.momentum * self.average[i] + (1 - self.momentum) * value
        return [average + 1e-6 for average in self.average]
