"""AdaMerging (Yang et al., ICLR 2024): learn merging coefficients without labels.

The merged weights are ``base + sum_t lambda_t * tau_t`` (task-wise: one lambda per task)
or ``base_l + sum_t lambda_{t,l} * tau_{t,l}`` (layer-wise: one lambda per task and
weight tensor). The lambdas minimise the Shannon entropy of each task's predictions on
unlabelled inputs of that task, summed over tasks: confident predictions are a usable
proxy for accuracy, and no labels are needed. Lambdas start at ``init`` (0.3, the
paper's) and are clipped to [0, 1] after each Adam step as the reference code does.

The model is the caller's: ``forward(params, task, batch)`` must return the logits of
``task`` on ``batch`` when the shared tensors take the values in ``params`` (typically
``torch.func.functional_call`` plus the task's own head). This keeps the method
independent of the network and of where the task vectors came from (FP32 or decoded
from TVQ/RTVQ bundles). Runs on the CPU; torch is the exporter's tool, never the device's.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import numpy as np
import torch

from tvswitch.export.merge import TaskVector, TaskVectors, shared_names

Forward = Callable[[Dict[str, torch.Tensor], str, Any], torch.Tensor]


@dataclass
class AdaMergingResult:
    """Learned coefficients, shape (tasks, 1) task-wise or (tasks, tensors) layer-wise."""

    tasks: List[str]
    names: List[str]
    coefficients: np.ndarray
    entropy: List[float]  # summed entropy at each step, to check it went down

    def coefficient(self, task: str, name: str) -> float:
        col = 0 if self.coefficients.shape[1] == 1 else self.names.index(name)
        return float(self.coefficients[self.tasks.index(task), col])

    def delta(self, task_vectors: TaskVectors) -> TaskVector:
        """sum_t lambda_{t,l} tau_{t,l}: the merged delta to add to the base weights."""
        out: TaskVector = {}
        for n in self.names:
            acc = np.zeros(np.shape(task_vectors[self.tasks[0]][n]), dtype=np.float32)
            for t in self.tasks:
                acc += np.float32(self.coefficient(t, n)) * np.asarray(task_vectors[t][n], dtype=np.float32)
            out[n] = acc
        return out


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax over the last axis."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def adamerging(base: Mapping[str, np.ndarray], task_vectors: TaskVectors,
               batches: Mapping[str, Iterable[Any]], forward: Forward,
               granularity: str = "layer", init: float = 0.3, steps: int = 100,
               lr: float = 1e-3, log: Optional[Callable[[str], None]] = None) -> AdaMergingResult:
    """Learn task-wise or layer-wise coefficients by entropy minimisation.

    ``batches[task]`` yields unlabelled input batches of that task (cycled); use inputs
    the benchmark may look at (validation or unlabelled deployment data), never labels.
    """
    if granularity not in ("task", "layer"):
        raise ValueError("granularity must be 'task' or 'layer', got %r" % granularity)
    tasks = list(task_vectors)
    missing = [t for t in tasks if t not in batches]
    if missing:
        raise ValueError("no unlabelled inputs for tasks %s" % missing)
    names = shared_names(task_vectors)
    base_t = {n: torch.as_tensor(np.asarray(base[n], dtype=np.float32)) for n in names}
    taus = {n: [torch.as_tensor(np.asarray(task_vectors[t][n], dtype=np.float32)) for t in tasks] for n in names}
    width = 1 if granularity == "task" else len(names)
    lam = torch.full((len(tasks), width), float(init))
    lam.grad = torch.zeros_like(lam)
    opt = torch.optim.Adam([lam], lr=lr, betas=(0.9, 0.999))
    # The merged weights are leaves filled in place each step. Since d(merged_l)/d(lambda_tl)
    # = tau_tl, the coefficients' gradient is <dL/dmerged_l, tau_tl>: one dot product per
    # task and tensor, far cheaper than letting autograd differentiate the weighted sum.
    params = {n: torch.empty_like(base_t[n], requires_grad=True) for n in names}
    streams = {t: itertools.cycle(batches[t]) for t in tasks}
    history: List[float] = []
    for step in range(steps):
        with torch.no_grad():
            for j, n in enumerate(names):
                p = params[n]
                p.copy_(base_t[n])
                for i in range(len(tasks)):
                    p.add_(taus[n][i], alpha=float(lam[i, 0 if width == 1 else j]))
                p.grad = None
        loss = sum(entropy(forward(params, t, next(streams[t]))) for t in tasks)
        loss.backward()
        with torch.no_grad():
            lam.grad.zero_()
            for j, n in enumerate(names):
                g = params[n].grad
                if g is None:  # the tensor does not reach the logits
                    continue
                for i in range(len(tasks)):
                    lam.grad[i, 0 if width == 1 else j] += torch.dot(g.reshape(-1), taus[n][i].reshape(-1))
        opt.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
        history.append(float(loss.detach()))
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log("adamerging[%s] step %d/%d entropy %.4f" % (granularity, step + 1, steps, history[-1]))
    return AdaMergingResult(tasks, names, lam.numpy().copy(), history)
