"""Mixes: which tasks a rebuild combines, with what weights.

A mix is a plain ``{task: weight}``: one task is ``{task: 1.0}``, task arithmetic with
lambda is every task at lambda.  Validation happens here, before any buffer is touched.
A mix is answered through the head of its heaviest task (``head_task``): heads answer
one task's classes each and are never mixed.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Iterable, Mapping

from tvswitch.errors import TvswitchError
from tvswitch.kernels.abi import FLOAT32_MAX

Mix = Dict[str, float]
#: No weight of a mix or merge means anything beyond this (task arithmetic uses |lambda| <= 3,
#: negation -1): a larger one only writes the task vector's noise over the base, so it is refused.
MAX_WEIGHT = 1e6


def parse_mix(text: str) -> Dict[str, float]:
    """``"a=0.5,b=0.5"`` -> ``{"a": 0.5, "b": 0.5}`` (the CLI's ``--mix``)."""
    mix: Dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise TvswitchError("--mix takes NAME=WEIGHT[,NAME=WEIGHT...], got %r" % part)
        try:
            weight = float(value)
        except ValueError:
            raise TvswitchError("--mix weight of %r is not a number: %r" % (name.strip(), value)) from None
        if name.strip() in mix:
            raise TvswitchError("--mix names task %r twice" % name.strip())
        mix[name.strip()] = weight
    return mix


def task_arithmetic(tasks: Iterable[str], lam: float) -> Dict[str, float]:
    """Every task at weight ``lam``: base + lam * sum_t tau_t."""
    return {t: float(lam) for t in tasks}


class CheckedMix(dict):
    """A mix ``check_mix`` has passed, for the tasks in ``tasks``.

    A switch hands its mix from the server's check to the rebuilder's tables and on to the
    rebuild; a checked mix passes each later ``check_mix`` at the cost of one comparison,
    so a mix is validated once per switch. It is read-only so that it stays what was
    checked (``dict(mix)`` gives a copy to change); it pickles as a plain dict.
    """

    __slots__ = ("tasks",)

    def __init__(self, items: Iterable, tasks: tuple):
        super().__init__(items)
        self.tasks = tasks

    def _read_only(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a checked mix is read-only; dict(mix) is a copy to change")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _read_only  # type: ignore

    def __reduce__(self):
        return dict, (dict(self),)


def check_mix(mix: Mapping[str, float], tasks: Iterable[str], where: str = "bundle") -> CheckedMix:
    """The mix with bad task names or weights refused, naming the culprit; in the order of
    ``tasks``, each weight a float."""
    known = tuple(tasks)
    if isinstance(mix, CheckedMix) and mix.tasks == known:
        return mix
    if not isinstance(mix, Mapping):
        raise TvswitchError("a mix is a mapping of task to weight, e.g. {%r: 1.0}; got a %s"
                            % (known[0] if known else "task", type(mix).__name__))
    if not mix:
        raise TvswitchError("the mix is empty: name at least one task")
    for name, w in mix.items():
        if name not in known:
            raise TvswitchError("%s has no task %r (tasks: %s)" % (where, name, ", ".join(known)))
        check_weight(w, "weight of task %r" % name)
    return CheckedMix(((t, float(mix[t])) for t in known if t in mix), known)


def check_weight(value: object, what: str) -> float:
    """``value`` as a float; TvswitchError naming ``what`` unless it is a finite number.

    Every weight that scales a task vector passes here (mix weights, merging lambdas and
    coefficients): a NaN or infinite one would write NaN into every tensor it touches, one
    past float32's range inf, and one beyond ``MAX_WEIGHT`` noise.  numpy scalars are
    numbers too.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TvswitchError("%s must be a finite number, got %r" % (what, value))
    if abs(float(value)) > FLOAT32_MAX:
        raise TvswitchError("%s is %g, beyond float32's range (%.4g): every weight it scales would be inf"
                            % (what, float(value), FLOAT32_MAX))
    if abs(float(value)) > MAX_WEIGHT:
        raise TvswitchError("%s is %g: weights beyond +-%g mean nothing (task arithmetic uses |lambda| <= 3) and "
                            "would write the task vector's noise over the base" % (what, float(value), MAX_WEIGHT))
    return float(value)


def head_task(mix: Mapping[str, float]) -> str:
    """The task whose task-specific tensors (head) answer for ``mix``: its heaviest.

    A tie goes to the task first in the mix's order, which ``check_mix`` makes the
    bundle's order (numpy's argmax would choose the same).
    """
    return max(mix, key=lambda t: mix[t])
