"""Asymmetric uniform quantisation of task vectors (TVQ), with tensor, channel or group scales.

Delta = (max - min) / (2^b - 1) and q = round(x / Delta) + z with an integer zero point
z = round(-min / Delta), so that zero stays exactly representable (most task-vector
entries are near zero).  The stored pair per group is (scale, offset) = (Delta, -z*Delta),
which decode.h turns back into q*scale + offset.  Rounding is half-up and the float32
scale is rounded up, never down, so every code stays within half a step of its value:
the per-element error is at most Delta/2 (plus float32 rounding of the decode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError


@dataclass
class Quantized:
    """b-bit codes of one tensor and their per-group (scale, offset) pairs."""

    codes: np.ndarray  # uint8 codes, flat
    params: np.ndarray  # float32 [scale0, offset0, scale1, offset1, ...]
    group: int
    bits: int


def parse_granularity(text: str) -> str:
    """Check a ``--granularity`` value: ``tensor``, ``channel`` or ``group:G``."""
    if text in ("tensor", "channel"):
        return text
    if text.startswith("group:"):
        size = text[len("group:"):]
        if size.isdigit() and int(size) > 0:
            return text
    raise TvswitchError("--granularity must be tensor, channel or group:G with G > 0, got %r" % text)


def group_size(shape: Sequence[int], granularity: str) -> int:
    """Elements that share one (scale, offset) pair, along the tensor's flat order.

    ``channel`` means one pair per output channel, i.e. per slice along dim 0; a 1-D
    tensor (a bias, a norm) has no channels worth the name and gets one pair.
    """
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if granularity == "tensor" or n == 0:
        return max(n, 1)
    if granularity == "channel":
        return n // shape[0] if len(shape) >= 2 and shape[0] > 0 else n
    return min(int(granularity.split(":", 1)[1]), n)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise TvswitchError("bit width must be 1..8, got %d" % bits)


def _rows(flat: np.ndarray, group: int) -> np.ndarray:
    """Flat float64 ``flat`` as one row per group, the last padded with its last value (which
    moves neither its min nor its max); a view where the groups divide it."""
    n = flat.size
    rows = -(-n // group)
    if rows * group == n:
        return flat.reshape(rows, group)
    padded = np.empty(rows * group, dtype=np.float64)
    padded[:n] = flat
    padded[n:] = flat[-1] if n else 0.0
    return padded.reshape(rows, group)


def _step_zero_rows(g: np.ndarray, bits: int) -> Tuple[np.ndarray, np.ndarray]:
    lo = g.min(axis=1)
    hi = g.max(axis=1)
    delta = (hi - lo) / ((1 << bits) - 1)
    # A constant group: a step of |lo| codes lo exactly (code 0, zero point -+1).
    const = delta == 0
    delta[const] = np.where(lo[const] != 0, np.abs(lo[const]), 1.0)
    delta32 = delta.astype(np.float32)
    low = delta32.astype(np.float64) < delta
    delta32[low] = np.nextafter(delta32[low], np.float32(np.inf))
    step = delta32.astype(np.float64)
    return step, np.floor(-lo / step + 0.5)


def step_and_zero(x: np.ndarray, bits: int, group: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-group float32 step Delta (as float64) and integer zero point z of flat ``x``."""
    return _step_zero_rows(_rows(np.asarray(x, dtype=np.float64).reshape(-1), group), bits)


def _codes(x: np.ndarray, step: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """floor(x / step + 0.5) + zero, clipped to the codes (float64, in place: budget
    allocation quantises every tensor at every width, and the temporaries were most of it)."""
    q = x / step
    q += 0.5
    np.floor(q, out=q)
    q += zero
    return np.clip(q, 0, (1 << bits) - 1, out=q)


def quantize(x: np.ndarray, bits: int, group: int) -> Quantized:
    """Quantise ``x`` (any float dtype) to ``bits`` with one (scale, offset) per ``group``."""
    _check_bits(bits)
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(flat).all():  # the steps would be NaN: every code garbage
        raise TvswitchError("cannot quantise NaN/inf values")
    rows = _rows(flat, group)
    step, zero = _step_zero_rows(rows, bits)
    codes = _codes(rows, step[:, None], zero[:, None], bits).reshape(-1)[:flat.size].astype(np.uint8)
    params = np.empty(2 * step.size, dtype=np.float32)
    params[0::2] = step
    params[1::2] = (-zero * step).astype(np.float32)
    return Quantized(codes=codes, params=params, group=group, bits=bits)


def dequantize(qt: Quantized) -> np.ndarray:
    """The float32 values decoders produce for ``qt`` (decode.h's arithmetic)."""
    from tvswitch.kernels.reference import dequantize as _deq

    return _deq(qt.codes.astype(np.uint32), qt.params, qt.group)


def sampled_error(x: np.ndarray, bits: int, group: int, idx: Optional[np.ndarray],
                  along: Optional[np.ndarray] = None, gain: float = 0.0) -> float:
    """Squared quantisation error of flat ``x``, estimated on elements ``idx`` (all if None);
    with ``along`` (a flat vector of x's size), the error's component along it is counted
    ``1 + gain`` times.

    The steps come from the whole tensor, as the real quantiser's do; only the error
    sums are sampled, which is what lets bit allocation try many widths quickly.
    """
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    step, zero = step_and_zero(flat, bits, group)
    sel = flat if idx is None else flat[idx]
    pos = np.arange(flat.size) if idx is None else idx
    g = pos // group
    q = _codes(sel, step[g], zero[g], bits)
    diff = (q - zero[g]) * step[g] - sel
    scale = 1.0 if idx is None else flat.size / max(len(idx), 1)
    err = scale * float(diff @ diff)
    if along is not None and gain:
        a = np.asarray(along, dtype=np.float64).reshape(-1)
        norm = float(a @ a)
        if norm > 0:
            err += gain * (scale * float(diff @ (a if idx is None else a[idx]))) ** 2 / norm
    return err
