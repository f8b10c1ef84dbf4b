"""T-Switch: keep a task vector's largest entries as mask + sign + one scale per tensor.

As the official code does, positive and negative entries are ranked separately and the
top ``keep`` share of each is kept.  The scale restores the tensor's L2 norm:
lambda = ||tau||_2 / ||mask * sign||_2 = ||tau||_2 / sqrt(kept).  Mask and sign are stored
as one 2-bit code per weight (``ternary``): 0 -> -lambda, 1 -> dropped, 2 ->
+lambda, (scale, offset) = (lambda, -lambda), so T-Switch is a code stream (or sparse codes)
and needs no decoder of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.export.quantize import Quantized


@dataclass
class Switch:
    """Activation mask, polarity (True = positive) and scaling knob of one tensor."""

    mask: np.ndarray  # bool, flat
    positive: np.ndarray  # bool, flat
    scale: float

    @property
    def kept(self) -> int:
        return int(self.mask.sum())


def _top_share(magnitudes: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask of the round(share * n) largest entries (ties broken by position)."""
    count = int(round(share * magnitudes.size))
    keep = np.zeros(magnitudes.size, dtype=bool)
    if count:
        keep[np.argpartition(-magnitudes, count - 1)[:count]] = True
    return keep


def binarize(tau: np.ndarray, keep: float) -> Switch:
    """The T-Switch of one task-vector tensor at keep ratio ``keep`` (0 < keep <= 1)."""
    if not 0.0 < keep <= 1.0:
        raise TvswitchError("--keep must be in (0, 1], got %g" % keep)
    flat = np.asarray(tau, dtype=np.float64).reshape(-1)
    positive = flat > 0
    negative = flat < 0
    mask = np.zeros(flat.size, dtype=bool)
    pos_idx = np.flatnonzero(positive)
    neg_idx = np.flatnonzero(negative)
    mask[pos_idx[_top_share(flat[pos_idx], keep)]] = True
    mask[neg_idx[_top_share(-flat[neg_idx], keep)]] = True
    kept = int(mask.sum())
    scale = float(np.linalg.norm(flat) / np.sqrt(kept)) if kept else 0.0
    return Switch(mask=mask, positive=positive, scale=scale)


def ternary(sw: Switch) -> Quantized:
    """A T-Switch tensor (mask, sign, lambda) as one 2-bit code per weight: 0 -> -lambda,
    1 -> dropped, 2 -> +lambda, with (scale, offset) = (lambda, -lambda).

    The same two bits per weight as a mask stream beside a sign stream, and the same value
    at every element bit for bit (a dropped code is lambda - lambda = +0.0, as a masked-out
    lane is), but one code stream: the rebuild decodes it as it does TVQ-INT2, one table
    lookup per element and term, where mask and sign took a lookup and a blend, and where
    few weights are kept the sparse layout (fill: the dropped code) stores it in the bits
    the groups layout took (FORMAT.md 3.4)."""
    lam = np.float32(sw.scale)
    codes = np.where(sw.mask, np.where(sw.positive, 2, 0), 1).astype(np.uint8)
    return Quantized(codes=codes, params=np.array([lam, -lam], dtype=np.float32), group=max(codes.size, 1), bits=2)
