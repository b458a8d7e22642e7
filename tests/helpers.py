"""Small numeric helpers shared by the tests."""

import os

import pytest
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


def correlated_llama(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny 2-block llama whose channels are correlated as in a real LLM, and seeded calibration
    (8 x 32) and held-out (4 x 64) token ids.

    The block weights are scaled x5 (so the blocks matter next to the embedding) and the embedding
    is made nearly low-rank (rank 8 plus a little noise): with the tiny model's isotropic random
    embedding every input Hessian is close to diagonal, which hides what GPTQ and end-to-end
    tuning do with real models.
    """
    from lrquant.arch import get_arch_spec
    from lrquant.models.tiny import tiny_model

    arch = get_arch_spec("llama")
    model = tiny_model("llama", seed=seed, num_layers=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in arch.block_list(model):
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.weight.mul_(5)
        emb = model.get_input_embeddings().weight
        rank8 = torch.randn(emb.shape[0], 8, generator=generator) @ torch.randn(
            8, emb.shape[1], generator=generator
        )
        emb.copy_(rank8 + 0.2 * emb.std() * torch.randn(emb.shape, generator=generator))
    calibration = torch.randint(3, model.config.vocab_size, (8, 32), generator=generator)
    held_out = torch.randint(3, model.config.vocab_size, (4, 64), generator=generator)
    return model, calibration, held_out


def interrupt_after_block(monkeypatch: pytest.MonkeyPatch, index: int) -> list[int]:
    """Make a learned run stop (Ctrl-C) right after block ``index`` was saved to its resume store;
    returns the indices saved (``index`` -1: never stop, only record)."""
    from lrquant.methods.resume import ResumeStore

    original = ResumeStore.save_block
    saved: list[int] = []

    def save_then_interrupt(self, i, block, state, report=None) -> None:
        original(self, i, block, state, report)
        saved.append(i)
        if i == index:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumeStore, "save_block", save_then_interrupt)
    return saved
