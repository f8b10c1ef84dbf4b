"""Model merging on task vectors: task arithmetic, TIES-Merging and EMR-Merging.

Pure numpy on ``{tensor name: float array}`` dicts so the same code merges task vectors
decoded from any bundle (FP32, TVQ, RTVQ, T-Switch) or taken in full precision. Every
function returns a *delta* to add to the pretrained weights (``apply_delta``), never the
weights themselves, because the runtime rebuilds ``base + delta`` in place.

Only tensors present in every task vector are merged; task-specific tensors (heads) are
the caller's to keep per task. Tasks are keyed by name so EMR's per-task masks and
rescalers can be stored next to the task they belong to in a bundle.

References: Ilharco et al. 2023 (task arithmetic), Yadav et al. 2023 (TIES: trim, elect
sign, disjoint mean), Huang et al. 2024 (EMR: elect, mask, rescale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping

import numpy as np

TaskVector = Dict[str, np.ndarray]
TaskVectors = Mapping[str, Mapping[str, np.ndarray]]


def shared_names(task_vectors: TaskVectors) -> List[str]:
    """Names of the floating-point tensors every task vector has (in first-task order).

    Tensors only some tasks have (classification heads) are task-specific and never
    merged; integer buffers carry no task-vector meaning.
    """
    if not task_vectors:
        raise ValueError("no task vectors to merge")
    tvs = list(task_vectors.values())
    names = [n for n in tvs[0] if all(n in tv for tv in tvs[1:])]
    for n in names:
        shapes = {tuple(np.shape(tv[n])) for tv in tvs}
        if len(shapes) != 1:
            raise ValueError("tensor %r has different shapes across tasks: %s" % (n, sorted(shapes)))
    return [n for n in names if np.issubdtype(np.asarray(tvs[0][n]).dtype, np.floating)]


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Merged weights: base + delta for the tensors in delta, base unchanged elsewhere."""
    out = {}
    for name, w in base.items():
        out[name] = (w + delta[name]).astype(w.dtype, copy=False) if name in delta else w
    return out


def task_arithmetic(task_vectors: TaskVectors, lam: float) -> TaskVector:
    """lambda * sum_t tau_t (Ilharco et al.): one scaling for all tasks."""
    names = shared_names(task_vectors)
    out: TaskVector = {}
    for n in names:
        acc = np.zeros(np.shape(next(iter(task_vectors.values()))[n]), dtype=np.float32)
        for tv in task_vectors.values():
            acc += tv[n]
        out[n] = acc * np.float32(lam)
    return out


def magnitude_threshold(tv: Mapping[str, np.ndarray], names: List[str], keep: float) -> float:
    """|tau| value above which the top `keep` share of the task vector's entries lie.

    Taken over the whole flattened task vector (all shared tensors together), as the
    TIES reference code trims: a tensor whose entries are all small can lose them all.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError("keep ratio must be in (0, 1], got %r" % keep)
    flat = np.concatenate([np.abs(np.asarray(tv[n], dtype=np.float32)).ravel() for n in names])
    if keep >= 1.0:
        return -1.0
    k = int(round(keep * flat.size))
    if k <= 0:
        return float(np.inf)
    # k-th largest magnitude; entries strictly above it, plus ties at it, are kept.
    return float(np.partition(flat, flat.size - k)[flat.size - k])


def ties(task_vectors: TaskVectors, lam: float, keep: float = 0.2) -> TaskVector:
    """TIES-Merging: trim each tau_t to its top-`keep` magnitudes, elect a sign per entry
    by the sign of the trimmed sum (mass), average only the entries that agree with it,
    and scale by lambda.
    """
    names = shared_names(task_vectors)
    thresholds = {t: magnitude_threshold(tv, names, keep) for t, tv in task_vectors.items()}
    out: TaskVector = {}
    for n in names:
        trimmed = np.stack([np.where(np.abs(tv[n]) >= thresholds[t], tv[n], 0.0).astype(np.float32)
                            for t, tv in task_vectors.items()])
        elected = np.sign(trimmed.sum(axis=0))
        agree = (np.sign(trimmed) == elected) & (trimmed != 0)
        count = agree.sum(axis=0)
        total = np.where(agree, trimmed, 0.0).sum(axis=0)
        merged = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        out[n] = merged.astype(np.float32) * np.float32(lam)
    return out


@dataclass
class EmrResult:
    """EMR-Merging's output: one unified vector shared by all tasks, and per task a
    boolean mask (1 bit per weight, stored as a bitmap like T-Switch's) and a scalar
    rescaler. Task t's delta is ``rescalers[t] * masks[t] * unified``.
    """

    unified: TaskVector
    masks: Dict[str, Dict[str, np.ndarray]]
    rescalers: Dict[str, float]

    def task_delta(self, task: str) -> TaskVector:
        """The delta that EMR rebuilds for one task (the task must be known)."""
        mask, scale = self.masks[task], np.float32(self.rescalers[task])
        return {n: np.where(mask[n], u, 0.0).astype(np.float32) * scale for n, u in self.unified.items()}


def emr(task_vectors: TaskVectors) -> EmrResult:
    """EMR-Merging (Huang et al. 2024), tuning-free:

    1. elect: sign = sign(sum_t tau_t); magnitude = max |tau_t| over the tasks whose sign
       agrees; unified = sign * magnitude;
    2. mask_t = (tau_t * unified > 0);
    3. rescaler_t = sum |tau_t| / sum |mask_t * unified| over all merged entries, so the
       rebuilt task vector keeps the original's mean magnitude.

    (The reference code sums per-tensor means instead of entries in step 3, weighting small
    tensors such as LayerNorm as much as big matrices; we follow the paper's formula.)
    """
    names = shared_names(task_vectors)
    tasks = list(task_vectors)
    unified: TaskVector = {}
    masks: Dict[str, Dict[str, np.ndarray]] = {t: {} for t in tasks}
    abs_tau = {t: 0.0 for t in tasks}
    abs_masked = {t: 0.0 for t in tasks}
    for n in names:
        stack = np.stack([np.asarray(task_vectors[t][n], dtype=np.float32) for t in tasks])
        sign = np.sign(stack.sum(axis=0))
        agree = stack * sign > 0
        magnitude = np.where(agree, np.abs(stack), 0.0).max(axis=0)
        u = (sign * magnitude).astype(np.float32)
        unified[n] = u
        for i, t in enumerate(tasks):
            m = stack[i] * u > 0
            masks[t][n] = m
            abs_tau[t] += float(np.abs(stack[i]).sum(dtype=np.float64))
            abs_masked[t] += float(np.abs(u[m]).sum(dtype=np.float64))
    rescalers = {t: (abs_tau[t] / abs_masked[t] if abs_masked[t] > 0 else 0.0) for t in tasks}
    return EmrResult(unified, masks, rescalers)


def average(task_vectors: TaskVectors) -> TaskVector:
    """Mean task vector (task arithmetic with lambda = 1/T): the weight average of the
    fine-tuned models, which T-Switch's Auto-Switch uses as its router network."""
    return task_arithmetic(task_vectors, 1.0 / len(task_vectors))


def task_vectors_from_bundle(bundle, base: "Mapping[str, np.ndarray] | None" = None,
                             threads: int = 0) -> Dict[str, TaskVector]:
    """Each task's decoded task vector, rebuild({t: 1}) - base, as float32.

    Merging methods then see exactly what the device would add for that task, whatever
    the storage scheme (for FQ this includes the error of quantizing the weights).
    ``base`` may be None when the bundle embeds it.
    """
    from tvswitch.runtime.rebuild import CpuRebuilder

    rebuilder = CpuRebuilder(bundle, base, threads=threads)
    out = rebuilder.allocate("float32")
    taus: Dict[str, TaskVector] = {}
    for task in bundle.tasks:
        rebuilder.rebuild({task: 1.0}, out)
        taus[task] = {n: out[n] - rebuilder.base[n].astype(np.float32) for n in out}
    return taus
