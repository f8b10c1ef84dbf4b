"""Residual task-vector quantisation (RTVQ): a shared base vector plus per-task offsets.

base = mean_t(tau_t) is quantised at ``base_bits``; each task's offset is taken against
the error-corrected reference, offset_t = tau_t - deq(Q(base)), and quantised at
``offset_bits``.  The offsets then absorb the base's quantisation error instead of
adding to it (the paper's "quantization error correction").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from tvswitch.export.quantize import Quantized, dequantize, quantize


@dataclass
class Residual:
    """RTVQ of one tensor: the shared base and one offset per task, in task order."""

    base: Quantized
    offsets: List[Quantized]


def quantize_residual(taus: np.ndarray, base_bits: int, offset_bits: int, group: int,
                      error_correction: bool = True) -> Residual:
    """RTVQ of the stacked task vectors ``taus`` (tasks x elements) of one tensor."""
    taus = np.asarray(taus, dtype=np.float32).reshape(taus.shape[0], -1)
    mean = taus.mean(axis=0, dtype=np.float64).astype(np.float32)
    base = quantize(mean, base_bits, group)
    reference = dequantize(base) if error_correction else mean
    offsets = [quantize(tau - reference, offset_bits, group) for tau in taus]
    return Residual(base=base, offsets=offsets)


def reconstruct(res: Residual, task: int) -> np.ndarray:
    """The float32 task vector decoders rebuild for task index ``task``."""
    return dequantize(res.base) + dequantize(res.offsets[task])
