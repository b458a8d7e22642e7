"""GGUF block types fitted to a learned weight: the K-quants, and any type the grid does not match.

A GGUF type stores each sub-block of ``sub`` weights as integers ``q`` on a uniform grid, either
symmetric, ``w = a·q`` with ``q`` in ``[−L, L − 1]``, or with a minimum, ``w = a·q − b`` with
``q`` in ``[0, 2^bits − 1]`` and ``b ≥ 0``. The legacy types (Q4_0 … Q8_0) store ``a`` (and
``b``) in fp16 per 32 weights. The K-quants group 8 or 16 sub-blocks into a super-block of 256
weights and store each sub-block's ``a`` and ``b`` as small integers times the super-block's fp16
steps ``d`` and ``dmin`` (Q4_K/Q5_K: 6 bits, Q2_K: 4 bits, Q3_K: 6-bit signed, Q6_K: int8), as
llama.cpp's ggml-common.h lays them out.

The target is the weight lrquant evaluated, ``s·(c − z)``: it already holds the learned rounding
and lies inside the learned clipping range. Each sub-block takes the best of two grids, by the
squared error to that target: the learned group's own grid when the type holds it (same or more
code bits, a non-negative minimum), and a search over grid widths with a least-squares step and
minimum (llama.cpp's ``make_qx_quants`` / ``make_qkx2_quants`` without importance weights). The
sub-block steps are then rounded to the super-block's integers and every weight is rounded anew
to the nearest code of the grid actually stored: what the file holds is the closest it can be to
the learned weight for those steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from lrquant.errors import LrquantError
from lrquant.quant.quantizer import integer_range

Q = gguf.GGMLQuantizationType
QK_K = 256


@dataclass(frozen=True)
class GridType:
    """How one GGUF type quantizes: ``block`` weights per block, one step per ``sub`` of them,
    ``bits``-bit codes, symmetric or with a minimum; ``scale_bits`` is the width of the
    sub-block steps under the super-block's fp16 step (None: each block stores its own fp16 step)."""

    name: str
    block: int
    sub: int
    bits: int
    symmetric: bool
    scale_bits: int | None = None

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return Q[self.name]

    @property
    def low(self) -> int:
        """The smallest code: ``−L`` for a symmetric grid, 0 with a minimum."""
        return integer_range(self.bits, self.symmetric)[0]

    @property
    def high(self) -> int:
        return integer_range(self.bits, self.symmetric)[1]


GRID_TYPES = {
    t.name: t
    for t in (
        GridType("Q4_0", 32, 32, 4, True),
        GridType("Q4_1", 32, 32, 4, False),
        GridType("Q5_0", 32, 32, 5, True),
        GridType("Q5_1", 32, 32, 5, False),
        GridType("Q8_0", 32, 32, 8, True),
        GridType("Q2_K", QK_K, 16, 2, False, scale_bits=4),
        GridType("Q3_K", QK_K, 16, 3, True, scale_bits=6),
        GridType("Q4_K", QK_K, 32, 4, False, scale_bits=6),
        GridType("Q5_K", QK_K, 32, 5, False, scale_bits=6),
        GridType("Q6_K", QK_K, 16, 6, True, scale_bits=8),
    )
}

# the type llama.cpp's quantizer takes for a K-quant when a row is not whole super-blocks
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class Learned:
    """The learned grid of every sub-block: ``w = step·(c − zero)`` with ``c`` in
    ``[low, high]``, each ``[rows, sub-blocks]``."""

    step: np.ndarray
    zero: np.ndarray
    low: int
    high: int


@dataclass
class Fit:
    """A fitted weight: codes ``[rows, n]`` as the type numbers them (``low`` … ``high``), each
    sub-block's step and minimum as stored (``[rows, sub-blocks]``, float32, the minimum 0 for
    symmetric types), and for the K-quants the integers behind them and the super-block steps."""

    codes: np.ndarray
    step: np.ndarray
    minimum: np.ndarray
    scale_ints: np.ndarray | None = None
    min_ints: np.ndarray | None = None
    d: np.ndarray | None = None
    dmin: np.ndarray | None = None

    def dequantized(self, sub: int) -> np.ndarray:
        rows, n = self.codes.shape
        step = np.repeat(self.step, sub, axis=1)
        minimum = np.repeat(self.minimum, sub, axis=1)
        return (step * self.codes.astype(np.float32) - minimum).reshape(rows, n)


def _error(x: np.ndarray, a: np.ndarray, q: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The squared error of each sub-block ``x [..., sub]`` on the grid ``a·q − b``."""
    return ((a[..., None] * q - b[..., None] - x) ** 2).sum(axis=-1)


def _largest_magnitude(values: np.ndarray) -> np.ndarray:
    """The value of largest magnitude along the last axis, its sign kept."""
    return np.take_along_axis(values, np.abs(values).argmax(axis=-1)[..., None], axis=-1)[..., 0]


def _search_symmetric(x: np.ndarray, t: GridType) -> np.ndarray:
    """Per sub-block ``[..., sub]``: the least-squares step over 19 grid widths around the one
    that puts the largest magnitude on ``−L`` (llama.cpp's ``make_qx_quants``)."""
    top = _largest_magnitude(x)
    safe = np.where(top == 0, 1.0, top)
    best_a = np.zeros_like(top)
    best_err = np.full_like(top, np.inf)
    levels = -t.low
    for tweak in range(-9, 10):
        inverse = -(levels + 0.1 * tweak) / safe
        q = np.clip(np.rint(x * inverse[..., None]), t.low, t.high)
        norm = (q * q).sum(axis=-1)
        a = np.where(norm > 0, (x * q).sum(axis=-1) / np.where(norm > 0, norm, 1), 0.0)
        err = _error(x, a, q, np.zeros_like(a))
        better = err < best_err
        best_a, best_err = np.where(better, a, best_a), np.where(better, err, best_err)
    return best_a


def _search_minimum(x: np.ndarray, t: GridType) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block ``[..., sub]``: step ``a ≥ 0`` and minimum ``b ≥ 0`` (``w = a·q − b``), the
    least-squares pair over 21 grid widths (llama.cpp's ``make_qkx2_quants``)."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    span = np.where(hi > lo, hi - lo, 1.0)
    n = x.shape[-1]
    best_a = np.where(hi > lo, span / t.high, 0.0)
    best_b = -lo
    q0 = np.clip(np.rint((x - lo[..., None]) / np.where(best_a > 0, best_a, 1)[..., None]), 0, t.high)
    best_err = _error(x, best_a, q0, best_b)
    sx = x.sum(axis=-1)
    for tweak in range(21):
        inverse = (t.high - 1.0 + 0.1 * tweak) / span
        q = np.clip(np.rint((x - lo[..., None]) * inverse[..., None]), 0, t.high)
        sq, sq2, sxq = q.sum(axis=-1), (q * q).sum(axis=-1), (x * q).sum(axis=-1)
        det = n * sq2 - sq * sq
        ok = det > 0
        safe = np.where(ok, det, 1.0)
        a = (n * sxq - sq * sx) / safe
        m = (sq2 * sx - sq * sxq) / safe  # the offset: w = a·q + m
        positive = m > 0  # a minimum above zero is not stored: fit the step alone
        a = np.where(positive, sxq / np.where(sq2 > 0, sq2, 1), a)
        m = np.where(positive, 0.0, m)
        ok &= a > 0
        err = _error(x, a, q, -m)
        better = ok & (err < best_err)
        best_a = np.where(better, a, best_a)
        best_b = np.where(better, -m, best_b)
        best_err = np.where(better, err, best_err)
    return best_a, best_b


def _search(x: np.ndarray, t: GridType) -> tuple[np.ndarray, np.ndarray]:
    """Step and minimum of each sub-block found by search alone."""
    if t.symmetric:
        return _search_symmetric(x, t), np.zeros(x.shape[:-1], x.dtype)
    return _search_minimum(x, t)


def _learned_grid(learned: Learned | None, t: GridType) -> tuple[np.ndarray, np.ndarray] | None:
    """The learned grid as this type's step and minimum, where the type holds its codes."""
    if learned is None or learned.high - learned.low > t.high - t.low:
        return None
    if t.symmetric:
        if not (np.all(learned.zero == 0) and learned.low >= t.low and learned.high <= t.high):
            return None
        return learned.step, np.zeros_like(learned.step)
    # codes from 0: c − low under a positive step; under a negative one (a symmetric grid whose
    # positive end took the extra level), high − c with the step's magnitude
    step = np.abs(learned.step)
    negative = learned.step < 0
    return step, np.where(negative, step * (learned.high - learned.zero), step * (learned.zero - learned.low))


def _codes(x: np.ndarray, a: np.ndarray, b: np.ndarray, t: GridType) -> np.ndarray:
    """The nearest code of each weight on the grids ``a·q − b`` (code 0 where the step is 0),
    as floats of ``x``'s type."""
    safe = np.where(a == 0, 1, a)
    q = np.where(a[..., None] == 0, 0, np.rint((x + b[..., None]) / safe[..., None]))
    return np.clip(q, t.low, t.high).astype(x.dtype)


def _super_ints(values: np.ndarray, bits: int, signed: bool, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """Each super-block's sub-block ``values [..., k]`` as integers times one fp16 step, the
    largest magnitude on ``slack`` levels short of the widest integer (−2^(bits−1) when signed,
    as llama.cpp puts it)."""
    if signed:
        levels = 1 << (bits - 1)
        d = (-_largest_magnitude(values) / (levels - slack)).astype(np.float16)
        low, high = -levels, levels - 1
    else:
        d = (values.max(axis=-1) / ((1 << bits) - 1 - slack)).astype(np.float16)
        low, high = 0, (1 << bits) - 1
    if not np.isfinite(d).all():
        raise LrquantError("a super-block step is beyond the fp16 range of GGUF: it cannot be exported")
    d32 = d.astype(np.float32)
    safe = np.where(d32 == 0, 1.0, d32)
    ints = np.clip(np.rint(values / safe[..., None]), low, high)
    return np.where(d32[..., None] == 0, 0, ints).astype(np.int32), d


# the super-block steps tried: the largest sub-block step on the widest integer, or up to four
# levels short of it (a coarser super-step can round every sub-block step closer)
SLACKS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)


def _super_blocks(x: np.ndarray, a: np.ndarray, b: np.ndarray, t: GridType) -> Fit:
    """The sub-block steps ``a`` and minimums ``b`` ``[rows, supers, per super]`` rounded to
    integers under fp16 super-block steps, the steps chosen per super-block (from
    :data:`SLACKS`) by the squared error of ``x [rows, supers, per super, sub]`` once every
    weight is rounded anew to the stored grid."""
    if t.symmetric:
        min_ints, dmin, minimum = None, None, np.zeros(a.shape, np.float32)
    else:  # the minimums do not depend on the super-step: rounded once
        min_ints, dmin = _super_ints(b, t.scale_bits, False, 0.0)
        minimum = dmin.astype(np.float32)[..., None] * min_ints.astype(np.float32)
    best: Fit | None = None
    best_err = None
    for slack in SLACKS:
        scale_ints, d = _super_ints(a, t.scale_bits, t.symmetric, slack)
        step = d.astype(np.float32)[..., None] * scale_ints.astype(np.float32)
        codes = _codes(x, step, minimum, t)
        err = ((step[..., None] * codes - minimum[..., None] - x) ** 2).sum(axis=(-1, -2))
        if best is None:
            best, best_err = Fit(codes, step, minimum, scale_ints, min_ints, d, dmin), err
            continue
        take = err < best_err
        best_err = np.where(take, err, best_err)
        for field, new in (("codes", codes), ("step", step), ("scale_ints", scale_ints), ("d", d)):
            old = getattr(best, field)
            mask = take.reshape(take.shape + (1,) * (new.ndim - take.ndim))
            setattr(best, field, np.where(mask, new, old))
    return best


def fit(weight: np.ndarray, t: GridType, learned: Learned | None = None) -> Fit:
    """Fit ``weight [rows, n]`` (``n`` a multiple of ``t.block``) to type ``t``."""
    rows, n = weight.shape
    x = weight.astype(np.float32).reshape(rows, n // t.sub, t.sub)
    grid = _learned_grid(learned, t)
    if grid is None:
        a, b = _search(x, t)
    else:  # the learned grid, searched only where it does not hold the learned weight
        a, b = (g.astype(x.dtype) for g in grid)
        err = _error(x, a, _codes(x, a, b, t), b)
        off = err > 1e-6 * t.sub * a * a  # beyond float rounding
        if off.any():
            sa, sb = _search(x[off], t)
            better = _error(x[off], sa, _codes(x[off], sa, sb, t), sb) < err[off]
            a[off] = np.where(better, sa, a[off])
            b[off] = np.where(better, sb, b[off])
    if t.scale_bits is None:  # fp16 per block
        step = a.astype(np.float16)
        minimum = b.astype(np.float16)
        if not (np.isfinite(step).all() and np.isfinite(minimum).all()):
            raise LrquantError("a block step is beyond the fp16 range of GGUF: it cannot be exported")
        step32, min32 = step.astype(np.float32), minimum.astype(np.float32)
        codes = _codes(x, step32, min32, t)
        return Fit(codes.reshape(rows, n).astype(np.int32), step32, min32)
    per_super = t.block // t.sub
    shape = (rows, n // t.block, per_super)
    f = _super_blocks(x.reshape(*shape, t.sub), a.reshape(shape), b.reshape(shape), t)
    f.codes = f.codes.reshape(rows, n).astype(np.int32)
    f.step, f.minimum = f.step.reshape(rows, -1), f.minimum.reshape(rows, -1)
    return f


def _half_bytes(values: np.ndarray) -> np.ndarray:
    """fp16 values ``[rows, blocks]`` as their two bytes each, ``[rows, blocks, 2]``."""
    return np.ascontiguousarray(values, dtype=np.float16).view(np.uint8).reshape(*values.shape, 2)


def _bit_planes(values: np.ndarray, width: int, planes: int) -> np.ndarray:
    """Pack ``[..., planes, k]`` fields of ``width`` bits into ``[..., k]`` bytes: field ``j`` of
    each byte sits at bit ``j·width`` (the ``qs >> shift`` layouts of ggml-common.h)."""
    shifts = (np.arange(planes, dtype=np.uint32) * width)[:, None]
    return (values.astype(np.uint32) << shifts).sum(axis=-2, dtype=np.uint32).astype(np.uint8)


def _pack_legacy(f: Fit, t: GridType, rows: int, blocks: int) -> list[np.ndarray]:
    """Q4_0 … Q8_0: fp16 step (and fp16 offset ``m = −b`` for the _1 types), then the codes."""
    q = (f.codes.reshape(rows, blocks, 32) - t.low).astype(np.uint32)  # stored from 0
    parts = [_half_bytes(f.step)]
    if not t.symmetric:
        parts.append(_half_bytes(-f.minimum))
    if t.bits == 8:
        return [*parts, f.codes.reshape(rows, blocks, 32).astype(np.int8).view(np.uint8)]
    if t.bits == 5:  # bit 4 of weight j is bit j of a little-endian uint32
        high = ((q >> 4) & 1) << np.arange(32, dtype=np.uint32)
        parts.append(high.sum(axis=-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(rows, blocks, 4))
    low = q & 0xF  # weights j and j + 16 share byte j
    return [*parts, _bit_planes(low.reshape(rows, blocks, 2, 16), 4, 2)]


def _pack_k(f: Fit, t: GridType, rows: int, blocks: int) -> list[np.ndarray]:
    """The K-quants, as ggml-common.h's block_q2_K … block_q6_K."""
    q = (f.codes.reshape(rows, blocks, QK_K) - t.low).astype(np.uint32)
    sc = f.scale_ints.reshape(rows, blocks, -1)
    d = _half_bytes(f.d)
    if t.name == "Q2_K":  # scales (low nibble step, high nibble minimum), qs, d, dmin
        scales = (sc | (f.min_ints.reshape(rows, blocks, -1) << 4)).astype(np.uint8)
        qs = _bit_planes(q.reshape(rows, blocks, 2, 4, 32), 2, 4).reshape(rows, blocks, 64)
        return [scales, qs, d, _half_bytes(f.dmin)]
    if t.name == "Q3_K":  # hmask, qs, 12 bytes of 6-bit scales (+32), d
        hmask = _bit_planes((q >> 2).reshape(rows, blocks, 8, 32), 1, 8)
        qs = _bit_planes((q & 3).reshape(rows, blocks, 2, 4, 32), 2, 4).reshape(rows, blocks, 64)
        s = (sc + 32).astype(np.uint32)
        low = _bit_planes((s & 0xF).reshape(rows, blocks, 2, 8), 4, 2)
        high = _bit_planes((s >> 4).reshape(rows, blocks, 4, 4), 2, 4)
        return [hmask, qs, low, high, d]
    if t.name == "Q6_K":  # ql, qh, int8 scales, d
        ql = _bit_planes((q & 0xF).reshape(rows, blocks, 2, 2, 64), 4, 2).reshape(rows, blocks, 128)
        qh = _bit_planes((q >> 4).reshape(rows, blocks, 2, 4, 32), 2, 4).reshape(rows, blocks, 64)
        return [ql, qh, sc.astype(np.int8).view(np.uint8), d]
    # Q4_K, Q5_K: d, dmin, 12 bytes of 6-bit steps and minimums, (qh,) qs
    mn = f.min_ints.reshape(rows, blocks, -1).astype(np.uint32)
    sc = sc.astype(np.uint32)
    scales = np.concatenate(
        [
            sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
            mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4),
        ],
        axis=-1,
    ).astype(np.uint8)
    qs = _bit_planes((q & 0xF).reshape(rows, blocks, 4, 2, 32), 4, 2).reshape(rows, blocks, 128)
    parts = [d, _half_bytes(f.dmin), scales]
    if t.name == "Q5_K":
        parts.append(_bit_planes((q >> 4).reshape(rows, blocks, 8, 32), 1, 8))
    return [*parts, qs]


def pack(f: Fit, t: GridType) -> np.ndarray:
    """The GGUF blocks of a fitted weight, ``[rows, n / block · bytes per block]`` uint8."""
    rows, n = f.codes.shape
    blocks = n // t.block
    parts = (_pack_k if t.scale_bits is not None else _pack_legacy)(f, t, rows, blocks)
    packed = np.concatenate([p.reshape(rows, blocks, -1) for p in parts], axis=-1)
    expected = gguf.GGML_QUANT_SIZES[t.qtype][1]
    assert packed.shape[-1] == expected, (t.name, packed.shape, expected)
    return packed.reshape(rows, -1)
