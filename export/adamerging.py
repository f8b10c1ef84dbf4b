"""AdaMerging (Yang et al., ICLR 2024): learn merging coefficients without labels.

The merged weights are ``base + sum_t lambda_t * tau_t`` (task-wise: one lambda per task)
or ``base_l + sum_t lambda_{t,l} * tau_{t,l}`` (layer-wise: one lambda per task and
weight tensor). The lambdas minimise the Shannon entropy of each task's predictions on
unlabelled inputs of that task, summed over tasks: confident predictions are a usable
proxy for accuracy, and no labels are needed. The defaults are the paper's and its
reference code's: lambdas start at 0.3, Adam at lr 1e-3 (betas 0.9, 0.999) for 500 steps,
clipped to [0, 1] after each step.

Entropy is only a proxy, and on a small budget it can be minimised by sharpening every
task's logits while accuracy falls (docs/results/text8-notes.md). Two options guard
against that: ``normalize`` divides each task's entropy by log(classes), so a 44-class
task does not outweigh a binary one, and ``validate`` scores the coefficients on labelled
validation data at step 0 and every ``validate_every`` steps and returns the best ones,
so starting from a validated task-arithmetic lambda the result is never worse than it
on validation.

The model is the caller's: ``forward(params, task, batch)`` must return the logits of
``task`` on ``batch`` when the shared tensors take the values in ``params`` (typically
``torch.func.functional_call`` plus the task's own head). This keeps the method
independent of the network and of where the task vectors came from (FP32 or decoded
from TVQ/RTVQ bundles). ``learn_from_bundle`` is that wiring for a bundle and a torch
module whose state_dict the bundle was exported from (what ``tvswitch merge --method
adamerging --module`` runs): each task's logits come through its own head and its own
tensors stored as-is, as the device serves the task. Runs on the CPU; torch is the
exporter's tool, never the device's.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from tvswitch.errors import TvswitchError
from tvswitch.export.merge import (Coefficients, TaskVectors, as_is_tensors, shared_names,
                                   task_vectors_from_bundle)
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.mix import check_weight
from tvswitch.runtime.rebuild import resolve_base

Forward = Callable[[Dict[str, torch.Tensor], str, Any], torch.Tensor]
Validate = Callable[[Coefficients], float]


@dataclass
class AdaMergingResult(Coefficients):
    """The chosen coefficients (``values``) and how they were found."""

    entropy: List[float] = field(default_factory=list)  # objective at each step, to check it went down
    validation: List[Tuple[int, float]] = field(default_factory=list)  # (step, score) of each check
    best_step: int = -1  # the step whose coefficients are ``values`` (-1: the last, no validation)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax over the last axis."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class MergedParams:
    """The merged weights ``base_l + sum_t lambda_{t,l} tau_{t,l}`` as leaf tensors a forward
    pass reads, and the coefficients' gradient computed from the leaves' gradients.

    Since d(merged_l)/d(lambda_tl) = tau_tl, dL/dlambda_tl = <dL/dmerged_l, tau_tl>: one
    dot product per task and tensor, far cheaper than letting autograd differentiate the
    weighted sum of T full-size task vectors (which dominated a step in a profile on 2 CPU
    cores). tests/export/test_adamerging.py checks it against autograd.
    """

    def __init__(self, base: Mapping[str, np.ndarray], task_vectors: TaskVectors, tasks: Sequence[str],
                 names: Sequence[str]) -> None:
        self.names = list(names)
        self.tasks = list(tasks)
        self._base = {n: torch.as_tensor(np.asarray(base[n], dtype=np.float32)) for n in self.names}
        self._taus = {n: [torch.as_tensor(np.asarray(task_vectors[t][n], dtype=np.float32)) for t in self.tasks]
                      for n in self.names}
        self.params = {n: torch.empty_like(self._base[n], requires_grad=True) for n in self.names}

    def fill(self, lam: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Write the weights of coefficients ``lam`` (tasks x 1 or tasks x tensors) into the
        leaves and clear their gradients; returns the leaves."""
        width = lam.shape[1]
        with torch.no_grad():
            for j, n in enumerate(self.names):
                p = self.params[n]
                p.copy_(self._base[n])
                for i, tau in enumerate(self._taus[n]):
                    p.add_(tau, alpha=float(lam[i, 0 if width == 1 else j]))
                p.grad = None
        return self.params

    def coefficient_grad(self, width: int) -> torch.Tensor:
        """dL/dlambda from the leaves' gradients after ``backward`` (tensors no gradient
        reached contribute nothing)."""
        grad = torch.zeros((len(self.tasks), width))
        with torch.no_grad():
            for j, n in enumerate(self.names):
                g = self.params[n].grad
                if g is None:
                    continue
                for i, tau in enumerate(self._taus[n]):
                    grad[i, 0 if width == 1 else j] += torch.dot(g.reshape(-1), tau.reshape(-1))
        return grad


def task_entropy(logits: torch.Tensor, normalize: bool) -> torch.Tensor:
    """One task's term of the objective: its mean entropy, divided by log(classes) if
    ``normalize`` (each task's term then lies in [0, 1])."""
    h = entropy(logits)
    return h / math.log(logits.shape[-1]) if normalize and logits.shape[-1] > 1 else h


def adamerging(base: Mapping[str, np.ndarray], task_vectors: TaskVectors,
               batches: Mapping[str, Iterable[Any]], forward: Forward,
               granularity: str = "layer", init: Union[float, np.ndarray] = 0.3, steps: int = 500,
               lr: float = 1e-3, normalize: bool = False, validate: Optional[Validate] = None,
               validate_every: int = 0, log: Optional[Callable[[str], None]] = None) -> AdaMergingResult:
    """Learn task-wise or layer-wise coefficients by entropy minimisation.

    ``batches[task]`` yields unlabelled input batches of that task (cycled); use inputs
    the benchmark may look at (validation or unlabelled deployment data), never labels.
    ``init`` is a scalar or an array broadcastable to (tasks, 1 or tensors), e.g. a
    validated task-arithmetic lambda or task-wise coefficients to refine layer-wise.
    ``validate(coefficients) -> score`` (higher is better), if given, runs at step 0,
    every ``validate_every`` steps (0: only at the start and the end) and after the last,
    and the best-scoring coefficients are returned (the earliest on ties).
    """
    if granularity not in ("task", "layer"):
        raise ValueError("granularity must be 'task' or 'layer', got %r" % granularity)
    if steps < 0 or validate_every < 0:
        raise ValueError("steps and validate_every must be >= 0, got %r and %r" % (steps, validate_every))
    if not check_weight(lr, "the learning rate") > 0:
        raise ValueError("the learning rate must be > 0, got %r" % lr)
    tasks = list(task_vectors)
    missing = [t for t in tasks if t not in batches]
    if missing:
        raise ValueError("no unlabelled inputs for tasks %s" % missing)
    names = shared_names(task_vectors)
    width = 1 if granularity == "task" else len(names)
    lam = _initial(init, len(tasks), width)
    merged = MergedParams(base, task_vectors, tasks, names)
    opt = torch.optim.Adam([lam], lr=lr, betas=(0.9, 0.999))
    streams = {t: itertools.cycle(batches[t]) for t in tasks}
    result = AdaMergingResult(tasks, names, lam.detach().numpy().copy())
    best = -math.inf
    for step in range(steps + 1):
        if validate is not None and (step in (0, steps) or (validate_every and step % validate_every == 0)):
            score = float(validate(Coefficients(tasks, names, lam.detach().numpy().copy())))
            result.validation.append((step, score))
            if score > best:
                best, result.best_step, result.values = score, step, lam.detach().numpy().copy()
            if log is not None:
                log("adamerging[%s] step %d validation %.4f (best %.4f at step %d)"
                    % (granularity, step, score, best, result.best_step))
        if step == steps:
            break
        params = merged.fill(lam)
        loss = 0.0
        for t in tasks:  # backward per task: one task's graph is alive at a time
            h = task_entropy(forward(params, t, next(streams[t])), normalize)
            h.backward()
            loss += float(h.detach())
        lam.grad = merged.coefficient_grad(width)
        opt.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
        result.entropy.append(loss)
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log("adamerging[%s] step %d/%d entropy %.4f" % (granularity, step + 1, steps, loss))
    if validate is None:
        result.values = lam.detach().numpy().copy()
    return result


def _initial(init: Union[float, np.ndarray], tasks: int, width: int) -> torch.Tensor:
    """The starting coefficients as a (tasks, width) leaf, refusing shapes that do not fit
    and values that are not finite numbers."""
    try:
        values = np.broadcast_to(np.asarray(init, dtype=np.float32), (tasks, width)).copy()
    except ValueError:
        raise ValueError("init of shape %s does not fit (%d tasks, %d coefficients)"
                         % (list(np.shape(init)), tasks, width)) from None
    for value in values.reshape(-1).tolist():
        check_weight(value, "the initial coefficient")
    return torch.from_numpy(values).requires_grad_(False)


# ---- a bundle and a torch module --------------------------------------------------------

Inputs = Sequence[np.ndarray]  # one task's unlabelled inputs, in forward's order, rows along axis 0


def unlabelled_batches(arrays: Inputs, size: int, seed: int = 0, task: str = "") -> List[Tuple[torch.Tensor, ...]]:
    """One task's inputs in seeded random batches of ``size`` rows (one batch of every row
    where there are fewer); rows left over after the last full batch are not used, so
    every step sees a batch of the same size."""
    if size < 1:
        raise TvswitchError("the batch size must be >= 1, got %d" % size)
    rows = {len(a) if np.ndim(a) else 0 for a in arrays}
    if not arrays or len(rows) != 1 or 0 in rows:
        raise TvswitchError("inputs of task %r: need arrays with one and the same number of rows (>= 1), got shapes %s"
                            % (task, [list(np.shape(a)) for a in arrays]))
    n = rows.pop()
    order = np.random.default_rng(seed).permutation(n)
    size = min(size, n)
    return [tuple(torch.from_numpy(np.ascontiguousarray(a[order[s:s + size]])) for a in arrays)
            for s in range(0, n - size + 1, size)]


def bundle_forward(module: torch.nn.Module, bundle: Bundle, names: Sequence[str],
                   fixed: Mapping[str, np.ndarray]) -> Forward:
    """``forward(params, task, batch)`` for ``module`` serving ``bundle``'s tasks: the merged
    tensors ``names`` from ``params``, and from the bundle each task's own tensors (its head,
    its tensors stored as-is) and the base's ``fixed`` ones (integer buffers), so each task's
    logits are those the device serves for it. The logits are the module's output, or its
    first output where it returns several; the module is put in eval mode (BatchNorm reads
    the task's statistics, dropout is off), as it serves. Refuses a module whose tensors the
    bundle does not cover exactly (names, and shapes but for heads: each task's head runs at
    its own shape, so tasks with 3 and 44 classes merge through one module), task by task,
    before anything is run."""
    module.eval()
    state = module.state_dict()
    own: Dict[str, Dict[str, torch.Tensor]] = {}
    for task in bundle.tasks:
        arrays = dict(fixed)
        arrays.update(bundle.task_specific(task))
        arrays.update(as_is_tensors(bundle, task))
        have = set(names) | set(arrays)
        missing = [n for n in state if n not in have]
        if missing:
            raise TvswitchError("the module's tensor %r is neither merged nor one of task %r's own in %s"
                                % (missing[0], task, bundle.path))
        extra = sorted(have - set(state))
        if extra:
            raise TvswitchError("tensor %r of %s (task %r) is not one of the module's" % (extra[0], bundle.path, task))
        heads = bundle.task_specific(task)
        for n, a in arrays.items():  # a head may have its task's own shape: the module runs with it as it is
            if n not in heads and tuple(np.shape(a)) != tuple(state[n].shape):
                raise TvswitchError("tensor %r of task %r is %s in %s, the module's is %s"
                                    % (n, task, list(np.shape(a)), bundle.path, list(state[n].shape)))
        own[task] = {n: torch.as_tensor(np.array(a)).to(state[n].dtype) for n, a in arrays.items()}

    def forward(params: Dict[str, torch.Tensor], task: str, batch: Any) -> torch.Tensor:
        tensors = dict(own[task])
        tensors.update(params)
        try:
            out = torch.func.functional_call(module, tensors, tuple(batch))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise TvswitchError("the module failed on task %r's inputs: %s"
                                % (task, (str(exc).strip().splitlines() or [type(exc).__name__])[0])) from None
        return _first_output(out, task)

    return forward


def _first_output(out: Any, task: str) -> torch.Tensor:
    """The logits: the output tensor, or the first of a tuple, list or dict (HF ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out:
        return _first_output(out[0], task)
    raise TvswitchError("the module returned %s on task %r's inputs, not logits (a tensor)"
                        % (type(out).__name__, task))


def learn_from_bundle(bundle: Bundle, module: torch.nn.Module, inputs: Mapping[str, Inputs],
                      base: Optional[Mapping[str, np.ndarray]] = None,
                      task_vectors: Optional[TaskVectors] = None, batch: int = 16, seed: int = 0,
                      **options: Any) -> AdaMergingResult:
    """AdaMerging of ``bundle``'s decoded task vectors with ``module`` (the network whose
    state_dict the bundle was exported from; its own weights are not used): what
    ``tvswitch merge --method adamerging --module`` runs.

    ``inputs[task]`` are that task's unlabelled inputs (arrays in forward's order, rows
    along the first axis), cut into seeded random batches of ``batch`` rows; ``base`` is
    the base checkpoint unless the bundle embeds it; ``task_vectors`` saves decoding them
    again where the caller has them. ``options`` go to ``adamerging`` (granularity, init,
    steps, lr, normalize, log).
    """
    missing = [t for t in bundle.tasks if t not in inputs]
    if missing:
        raise TvswitchError("no unlabelled inputs for task %r of %s: AdaMerging needs some for every task"
                            % (missing[0], bundle.path))
    unknown = sorted(set(inputs) - set(bundle.tasks))
    if unknown:
        raise TvswitchError("inputs for task %r, which %s does not have (tasks: %s)"
                            % (unknown[0], bundle.path, ", ".join(bundle.tasks)))
    weights = resolve_base(bundle, base)
    source = base if base is not None else bundle.embedded_base()
    fixed = {n: source[n] for n in bundle.manifest["base"].get("other", [])}
    taus = task_vectors if task_vectors is not None else task_vectors_from_bundle(bundle, base)
    forward = bundle_forward(module, bundle, shared_names(taus), fixed)
    batches = {t: unlabelled_batches(inputs[t], batch, seed, t) for t in bundle.tasks}
    return adamerging(weights, {t: taus[t] for t in bundle.tasks}, batches, forward, **options)
