"""Small numeric helpers shared by the tests."""

import os

import torch
import torch.nn as nn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``out`` against ``ref``."""
    return ((out - ref).norm() / ref.norm()).item()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids``, without gradients."""
    with torch.no_grad():
        return model(input_ids=ids).logits


# Where the device tests learn and evaluate: the CPU in CI; LRQUANT_TEST_DEVICE=cuda runs the same
# tests on a GPU (tests/test_device.py, test_resume.py and the learning tests of test_blockwise.py).
TEST_DEVICE = os.environ.get("LRQUANT_TEST_DEVICE", "cpu")
