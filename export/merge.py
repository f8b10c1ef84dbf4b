"""Model merging on task vectors: task arithmetic, TIES-Merging, EMR-Merging, and the
coefficients AdaMerging learns (``Coefficients``: applied here, learned in adamerging.py).

Pure numpy on ``{tensor name: float array}`` dicts so the same code merges task vectors
decoded from any bundle (FP32, TVQ, RTVQ, T-Switch) or taken in full precision. Every
function returns a *delta* to add to the pretrained weights (``apply_delta``), never the
weights themselves, because the runtime rebuilds ``base + delta`` in place.

Only tensors present in every task vector are merged; task-specific tensors (heads) and
tensors a bundle stores per task as-is (BatchNorm statistics) are the caller's to keep per
task: ``task_vectors_from_bundle`` leaves the latter out, ``as_is_tensors`` gives one
task's own and ``mean_statistics`` the mean over tasks of those that are statistics.
Tasks are keyed by name so EMR's per-task masks and rescalers can be stored next to the
task they belong to in a bundle.

References: Ilharco et al. 2023 (task arithmetic), Yadav et al. 2023 (TIES: trim, elect
sign, disjoint mean), Huang et al. 2024 (EMR: elect, mask, rescale).
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.mix import check_weight
from tvswitch.runtime.rebuild import CpuRebuilder, resolve_base

if TYPE_CHECKING:
    from tvswitch.runtime.bundle import Bundle

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
    lam = check_weight(lam, "lambda")
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
    A ratio so small that it keeps no entry is refused: the merge would be the base.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError("keep ratio must be in (0, 1], got %r" % keep)
    flat = np.concatenate([np.abs(np.asarray(tv[n], dtype=np.float32)).ravel() for n in names])
    if keep >= 1.0:
        return -1.0
    k = int(round(keep * flat.size))
    if k <= 0:
        raise ValueError("keep ratio %g keeps none of the %d entries of a task vector (the merge would be the "
                         "base); a ratio of %.3g keeps one" % (keep, flat.size, 1.0 / flat.size))
    # k-th largest magnitude; entries strictly above it, plus ties at it, are kept.
    return float(np.partition(flat, flat.size - k)[flat.size - k])


def ties(task_vectors: TaskVectors, lam: float, keep: float = 0.2) -> TaskVector:
    """TIES-Merging: trim each tau_t to its top-`keep` magnitudes, elect a sign per entry
    by the sign of the trimmed sum (mass), average only the entries that agree with it,
    and scale by lambda.

    An entry whose trimmed sum is exactly zero takes the majority sign, the sign of the
    sum of all elected signs over the whole vector, as the reference code's
    ``resolve_zero_signs(..., "majority")`` does; otherwise such an entry would be lost
    although some tasks moved it. (If that majority is itself zero the entry stays 0.)
    """
    lam = check_weight(lam, "lambda")
    names = shared_names(task_vectors)
    thresholds = {t: magnitude_threshold(tv, names, keep) for t, tv in task_vectors.items()}

    def trimmed(n: str) -> np.ndarray:
        return np.stack([np.where(np.abs(tv[n]) >= thresholds[t], tv[n], 0.0).astype(np.float32)
                         for t, tv in task_vectors.items()])

    # Two passes over the tensors: the majority sign needs every elected sign first, and
    # keeping the trimmed stacks of all tensors in between would cost T times the model.
    elected = {n: np.sign(trimmed(n).sum(axis=0)).astype(np.int8) for n in names}
    majority = np.int8(np.sign(sum(int(e.sum(dtype=np.int64)) for e in elected.values())))
    out: TaskVector = {}
    for n in names:
        stack = trimmed(n)
        sign = np.where(elected[n] == 0, majority, elected[n])
        agree = (np.sign(stack) == sign) & (stack != 0)
        count = agree.sum(axis=0)
        total = np.where(agree, stack, 0.0).sum(axis=0)
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


def as_is_names(bundle: "Bundle") -> List[str]:
    """Tensors the bundle stores per task as raw values (BatchNorm statistics, --task-specific
    globs): every task's entry is ``absolute`` with raw terms only. They are statistics or
    per-task settings, not task-vector material, so no merging method may mix them."""
    first = bundle.entries(bundle.tasks[0]) if bundle.tasks else {}
    return [n for n, e in first.items()
            if all(_is_as_is(bundle.entries(t).get(n)) for t in bundle.tasks)]


def _is_as_is(entry) -> bool:
    return entry is not None and entry.mode == "absolute" and all(t.kind == "raw" for t in entry.terms)


def as_is_tensors(bundle: "Bundle", task: str, names: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
    """One task's own values of the tensors stored as-is (or of ``names`` among them), in
    the bundle's tensor dtype."""
    out = {}
    for n in as_is_names(bundle) if names is None else names:
        term = bundle.entries(task)[n].terms[0]
        spec = bundle.shared_specs[n]
        out[n] = np.asarray(bundle.payload(term.values)).reshape(spec.shape).astype(spec.dtype)
    return out


def statistics_names(bundle: "Bundle") -> List[str]:
    """The tensors stored as-is that are statistics (BatchNorm running mean and variance,
    other float buffers), i.e. all but those the exporter was told to keep per task with
    ``--task-specific`` globs (per-task settings, such as heads of one shape)."""
    patterns = bundle.manifest.get("scheme", {}).get("task_specific", [])
    return [n for n in as_is_names(bundle) if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def mean_statistics(bundle: "Bundle") -> Dict[str, np.ndarray]:
    """The mean over tasks of each statistic stored as-is (``statistics_names``).

    A merged model serving no task in particular has no statistics of its own; the mean
    of the tasks' is what weight averaging of whole checkpoints gives (model soups), an
    approximation: BatchNorm statistics recomputed on data under the merged weights are
    exact, and a model meant for one task takes that task's (``as_is_tensors``).
    """
    names = statistics_names(bundle)
    acc = {n: np.zeros(bundle.shared_specs[n].shape, dtype=np.float64) for n in names}
    for task in bundle.tasks:
        for n, a in as_is_tensors(bundle, task, names).items():
            acc[n] += a
    return {n: (a / len(bundle.tasks)).astype(bundle.shared_specs[n].dtype) for n, a in acc.items()}


def task_vectors_from_bundle(bundle: "Bundle", base: Optional[Mapping[str, np.ndarray]] = None,
                             threads: int = 0) -> Dict[str, TaskVector]:
    """Each task's decoded task vector, rebuild({t: 1}) - base, as float32.

    Merging methods then see exactly what the device would add for that task, whatever
    the storage scheme (for FQ this includes the error of quantizing the weights).
    Tensors stored as-is are left out (``as_is_tensors`` gives them per task).
    ``base`` may be None when the bundle embeds it.
    """
    rebuilder = CpuRebuilder(bundle, base, threads=threads)
    out = rebuilder.allocate("float32")
    skip = set(as_is_names(bundle))
    taus: Dict[str, TaskVector] = {}
    for task in bundle.tasks:
        rebuilder.rebuild({task: 1.0}, out)
        taus[task] = {n: out[n] - rebuilder.base[n].astype(np.float32) for n in out if n not in skip}
    return taus


# ---- a whole model from a bundle -------------------------------------------------------

@dataclass
class MergedModel:
    """A checkpoint made from a bundle, and what a caller should be told about it.

    ``left_out``: tensors each task has its own of (heads, per-task settings), dropped
    because no task was named; ``averaged``: statistics averaged over the tasks instead.
    """

    tensors: Dict[str, np.ndarray]
    left_out: List[str]
    averaged: List[str]


def merged_model(bundle: "Bundle", delta: Mapping[str, np.ndarray], base: Optional[Mapping[str, np.ndarray]] = None,
                 task: Optional[str] = None) -> MergedModel:
    """The checkpoint of ``base + delta``, whole: with ``task`` it takes that task's head
    and tensors stored as-is, so it serves that task; without one it has no head and the
    tasks' statistics averaged (``mean_statistics``). ``base`` may be None when the bundle
    embeds it."""
    tensors = apply_delta(resolve_base(bundle, base), delta)
    tensors.update(as_is_tensors(bundle, task) if task is not None else mean_statistics(bundle))
    averaged = statistics_names(bundle) if task is None else []
    return whole_model(bundle, tensors, base, task, averaged)


def emr_model(bundle: "Bundle", task: str, base: Optional[Mapping[str, np.ndarray]] = None) -> MergedModel:
    """An emr bundle's model of ``task``: exactly what the device rebuilds for {task: 1}
    (the unified vector through the task's mask, times its rescaler), whole."""
    rebuilder = CpuRebuilder(bundle, base)
    out = rebuilder.allocate()
    rebuilder.rebuild({task: 1.0}, out)
    return whole_model(bundle, out, base, task)


def whole_model(bundle: "Bundle", tensors: Dict[str, np.ndarray], base: Optional[Mapping[str, np.ndarray]],
                task: Optional[str], averaged: Sequence[str] = ()) -> MergedModel:
    """``tensors`` (the bundle's shared tensors, rebuilt or merged) with the base's tensors
    no task changes (integer buffers) and, for a task, its head in the dtype of ``tensors``
    (heads are stored at the export's --raw-dtype, float16 by default; a checkpoint in
    one float dtype is what a loader expects); without a task, the tensors that belong
    to one task removed."""
    source = base if base is not None else bundle.embedded_base()
    for name in bundle.manifest["base"].get("other", []):
        tensors[name] = source[name]
    if task is not None:
        dtype = next((tensors[n].dtype for n in bundle.shared_specs if n in tensors), None)
        tensors.update((n, a if dtype is None else a.astype(dtype, copy=False))
                       for n, a in bundle.task_specific(task).items())
        return MergedModel(tensors, [], list(averaged))
    stats = set(statistics_names(bundle))
    per_task = [n for n in as_is_names(bundle) if n not in stats]
    for n in per_task:
        del tensors[n]
    heads = sorted(bundle.head_names)
    return MergedModel(tensors, per_task + heads, list(averaged))


# ---- learned coefficients (AdaMerging) --------------------------------------------------

@dataclass
class Coefficients:
    """Merging coefficients per task, shape (tasks, 1) task-wise or (tasks, tensors)
    layer-wise: the merged delta is ``sum_t lambda_{t,l} tau_{t,l}``.

    Numpy only, so the CLI applies coefficients learned elsewhere (adamerging.py needs
    torch) to any bundle's decoded task vectors. Saved as JSON or safetensors. A value
    that is not a finite number is refused (TvswitchError naming its task and tensor).
    """

    tasks: List[str]
    names: List[str]
    values: np.ndarray

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        if self.values.ndim != 2 or self.values.shape[0] != len(self.tasks) \
                or self.values.shape[1] not in (1, len(self.names)):
            raise ValueError("coefficients of shape %s do not fit %d tasks x (1 or %d tensors)"
                             % (list(self.values.shape), len(self.tasks), len(self.names)))
        layer = self.values.shape[1] > 1
        for i, task in enumerate(self.tasks):
            for j, value in enumerate(self.values[i].tolist()):
                check_weight(value, "the coefficient of task %r%s" % (task, " for tensor %r" % self.names[j]
                                                                       if layer else ""))

    def coefficient(self, task: str, name: str) -> float:
        col = 0 if self.values.shape[1] == 1 else self.names.index(name)
        return float(self.values[self.tasks.index(task), col])

    def delta(self, task_vectors: TaskVectors) -> TaskVector:
        """sum_t lambda_{t,l} tau_{t,l}: the merged delta to add to the base weights."""
        self.check(task_vectors)
        out: TaskVector = {}
        for n in self.names:
            acc = np.zeros(np.shape(task_vectors[self.tasks[0]][n]), dtype=np.float32)
            for t in self.tasks:
                acc += np.float32(self.coefficient(t, n)) * np.asarray(task_vectors[t][n], dtype=np.float32)
            out[n] = acc
        return out

    def check(self, task_vectors: TaskVectors) -> None:
        """Refuse task vectors whose tasks or merged tensors are not the ones learned on."""
        if sorted(task_vectors) != sorted(self.tasks):
            raise ValueError("coefficients are for tasks %s, the task vectors are of %s"
                             % (", ".join(self.tasks), ", ".join(task_vectors)))
        have = set(shared_names(task_vectors))
        missing, extra = [n for n in self.names if n not in have], sorted(have - set(self.names))
        if missing:
            raise ValueError("coefficients name tensor %r, which the task vectors lack" % missing[0])
        if extra:
            raise ValueError("coefficients have none for tensor %r of the task vectors" % extra[0])

    def save(self, path: str) -> None:
        """JSON (``.json``) or safetensors (any other suffix): tasks, tensor names, values."""
        if path.endswith(".json"):
            with open(path, "w") as f:
                json.dump({"method": "adamerging", "tasks": self.tasks, "names": self.names,
                           "coefficients": self.values.tolist()}, f)
            return
        from tvswitch.runtime.checkpoint import write_safetensors

        write_safetensors(path, {"coefficients": self.values},
                          {"tasks": json.dumps(self.tasks), "names": json.dumps(self.names)})

    @classmethod
    def load(cls, path: str) -> "Coefficients":
        """Read what ``save`` wrote; ValueError naming the file for anything else."""
        from safetensors import SafetensorError, safe_open

        if not os.path.isfile(path):
            raise ValueError("%s: no such coefficients file" % path)
        try:
            if path.endswith(".json"):
                with open(path) as f:
                    raw = json.load(f)  # reads NaN and Infinity too: __post_init__ refuses them
                tasks, names, values = list(raw["tasks"]), list(raw["names"]), np.asarray(raw["coefficients"],
                                                                                          dtype=np.float32)
            else:
                with safe_open(path, framework="numpy") as f:
                    meta = f.metadata() or {}
                    tasks, names, values = json.loads(meta["tasks"]), json.loads(meta["names"]), \
                        f.get_tensor("coefficients")
        except (KeyError, TypeError, ValueError, OSError, SafetensorError) as exc:
            raise ValueError("%s: not a coefficients file (JSON or safetensors with tasks, names and "
                             "coefficients: %s)" % (path, exc)) from None
        try:
            return cls(tasks, names, values)
        except (ValueError, TvswitchError) as exc:
            raise ValueError("%s: %s" % (path, exc)) from None
