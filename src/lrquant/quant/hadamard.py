"""Hadamard and random orthogonal matrices for the rotations (float64, seeded)."""

from __future__ import annotations

import math
from functools import cache

import torch


def hadamard(k: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``k`` (a power of two), float64."""
    if k < 1 or k & (k - 1):
        raise ValueError(f"Sylvester-Hadamard matrices have a power-of-two order, not {k}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(k)


def random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal), float64."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def randomized_hadamard(dim: int, generator: torch.Generator) -> torch.Tensor:
    """``diag(±1) (H_k ⊗ O_m)`` with ``dim = k m``, ``k`` the largest power of two dividing ``dim``."""
    k = dim & -dim
    m = dim // k
    h = hadamard(k)
    o = random_orthogonal(m, generator) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    signs = torch.randint(0, 2, (dim,), generator=generator).double() * 2 - 1
    return signs[:, None] * (h[:, None, :, None] * o[None, :, None, :]).reshape(dim, dim)


@cache
def head_rotation(head_dim: int, device: torch.device) -> torch.Tensor:
    """The fixed rotation of one attention head's Q, K and V (``--rotate-qkv``): a randomized
    Hadamard matrix from seed 0, so a saved model needs nothing stored to rebuild it. Built in
    float64, kept in float32 on ``device`` (cached: attention asks for it at every call)."""
    return randomized_hadamard(head_dim, torch.Generator().manual_seed(0)).to(device, torch.float32)
