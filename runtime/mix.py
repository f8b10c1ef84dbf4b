"""Mixes: which tasks a rebuild combines, with what weights.

A mix is a plain ``{task: weight}``: one task is ``{task: 1.0}``, task arithmetic with
lambda is every task at lambda.  Validation happens here, before any buffer is touched.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping

from tvswitch.errors import TvswitchError


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


def check_mix(mix: Mapping[str, float], tasks: Iterable[str], where: str = "bundle") -> Dict[str, float]:
    """The mix with bad task names or weights refused, naming the culprit."""
    known = list(tasks)
    if not mix:
        raise TvswitchError("the mix is empty: name at least one task")
    for name, w in mix.items():
        if name not in known:
            raise TvswitchError("%s has no task %r (tasks: %s)" % (where, name, ", ".join(known)))
        check_weight(w, "weight of task %r" % name)
    return {t: float(mix[t]) for t in known if t in mix}


def check_weight(value: object, what: str) -> float:
    """``value`` as a float; TvswitchError naming ``what`` unless it is a finite number.

    Every weight that scales a task vector passes here (mix weights, merging lambdas and
    coefficients): a NaN or infinite one would write NaN into every tensor it touches.
    """
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TvswitchError("%s must be a finite number, got %r" % (what, value))
    return float(value)
