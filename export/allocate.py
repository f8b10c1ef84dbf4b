"""Per-tensor bit widths under an average bits-per-weight budget.

Each tensor offers a few width options, each with a cost in bits and a measured error.
The allocator starts every tensor at its cheapest option and then repeatedly takes the
upgrade with the largest error reduction per extra bit that still fits the budget: the
greedy solution of the Lagrangian relaxation, exact on the lower convex hull of each
tensor's options.

The error is sensitivity weighted (the exporter computes it, ``exporter._widths``), per
tensor and summed over tasks:

    (||e||^2 + G * <e, tau>^2 / ||tau||^2) / ||theta_ft||^2,      e = tau_hat - tau

- dividing by ||theta_ft||^2 (the fine-tuned weights, mean over tasks) makes it a
  relative error: for a linear map y = W x the relative output perturbation
  ||dW x|| / ||W x|| tracks ||dW||_F / ||W||_F, so every tensor counts once whatever its
  size; small tensors (norms, biases) get wide codes cheaply;
- the second term counts the error's component along the task vector itself G = 100
  more times.  Rounding noise points in random directions, to which the output is
  mostly insensitive; a width so coarse that the quantiser zeroes most of a tensor's
  task vector instead removes what fine-tuning learned, coherently.  Without it the
  allocator sent MiniLM's word embeddings (half the weights; a few outliers stretch their
  range) to 1 bit, which zeroes their task vector: that one tensor made all of the
  allocation's loss to uniform widths at 3 bits.  G is chosen on measurements (two
  MiniLM fine-tunes, docs/allocation.md), not derived.

It needs no data.  docs/allocation.md compares it with uniform widths at equal budget
on the fine-tuned models' outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from tvswitch.errors import TvswitchError


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: its cost in bits and its (weighted) error."""

    cost: float
    error: float
    label: object = None


def allocate(options: Sequence[Sequence[Option]], budget: float, weights: float = 1.0) -> List[int]:
    """Index of the chosen option per tensor, total cost <= ``budget`` bits.

    ``weights`` (the number of weights the budget is spread over) only scales the
    message that refuses an impossible budget, which then speaks in bits per weight.
    """
    choice = [min(range(len(opts)), key=lambda k: (opts[k].cost, opts[k].error)) for opts in options]
    spent = sum(opts[c].cost for opts, c in zip(options, choice))
    if spent > budget * (1 + 1e-12):
        raise TvswitchError("--budget-bits %.4g is below the cheapest widths on offer (%.4g bits needed, "
                            "scales included)" % (budget / weights, spent / weights))
    while True:
        best = None
        for t, opts in enumerate(options):
            cur = opts[choice[t]]
            for k, opt in enumerate(opts):
                extra = opt.cost - cur.cost
                gain = cur.error - opt.error
                if extra <= 0 or gain <= 0 or spent + extra > budget * (1 + 1e-12):
                    continue
                ratio = gain / extra
                if best is None or ratio > best[0]:
                    best = (ratio, t, k, extra)
        if best is None:
            return choice
        _, t, k, extra = best
        choice[t] = k
        spent += extra
