"""tvswitch merge: one merged model from the task vectors stored in a bundle."""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import numpy as np

from tvswitch.commands._common import load_base
from tvswitch.errors import TvswitchError

NAME = "merge"
HELP = "merge a bundle's task vectors (task arithmetic, TIES, EMR, AdaMerging coefficients) into one weights file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--method", required=True, choices=["task_arithmetic", "ties", "emr", "adamerging", "average"],
                   help="task_arithmetic: base + lambda*sum tau; ties: trim/elect/disjoint mean; emr: one task's "
                        "EMR model (needs --task; an emr bundle's own rebuild of it, otherwise EMR run on the "
                        "decoded task vectors); adamerging: learned coefficients (--coefficients); average: "
                        "lambda = 1/T")
    p.add_argument("--lambda", dest="lam", type=float, default=0.3, help="scaling for task_arithmetic/ties (default 0.3)")
    p.add_argument("--keep", type=float, default=0.2, help="TIES: share of each task vector kept (default 0.2)")
    p.add_argument("--coefficients", metavar="FILE",
                   help="adamerging: coefficients saved by tvswitch.export.adamerging (JSON or safetensors)")
    p.add_argument("--task", help="EMR: the task whose model to write; other methods: add its head and its "
                                  "tensors stored as-is (needed when the bundle has such tensors)")
    p.add_argument("--base", help="base checkpoint (needed unless the bundle embeds it)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")


def run(args: argparse.Namespace) -> int:
    from tvswitch.export import merge
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.checkpoint import write_safetensors
    from tvswitch.runtime.rebuild import resolve_base

    bundle = Bundle.open(args.bundle)
    _check_args(args, bundle, merge.as_is_names(bundle))
    given = load_base(args.base)
    if args.method == "emr" and bundle.scheme == "emr":
        tensors = _own_rebuild(bundle, given, args.task)
        how = "the bundle's own EMR model of %s" % args.task
    else:
        tensors = merge.apply_delta(resolve_base(bundle, given), _delta(args, bundle, given))
        how = "%s over %d tasks" % (args.method, len(bundle.tasks))
        if args.method == "emr":
            how = "EMR run on the %s-decoded task vectors, model of %s" % (bundle.scheme, args.task)
        if args.task is not None:
            tensors.update(merge.as_is_tensors(bundle, args.task))
    source = given if given is not None else bundle.embedded_base()
    for name in bundle.manifest["base"].get("other", []):
        tensors[name] = source[name]
    if args.task is not None:
        tensors.update(bundle.task_specific(args.task))
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    write_safetensors(args.output, tensors, {"tvswitch.merge": args.method})
    print("wrote %s: %s, %d tensors" % (args.output, how, len(tensors)))
    return 0


def _check_args(args: argparse.Namespace, bundle, as_is: List[str]) -> None:
    """Refuse flag combinations that cannot name one model, before anything is decoded."""
    if args.task is not None and args.task not in bundle.tasks:
        raise TvswitchError("%s has no task %r (tasks: %s)" % (args.bundle, args.task, ", ".join(bundle.tasks)))
    if args.method == "emr" and args.task is None:
        raise TvswitchError("--method emr writes one task's model (EMR keeps a mask and a rescaler per task): "
                            "give --task NAME")
    if (args.method == "adamerging") != (args.coefficients is not None):
        raise TvswitchError("--method adamerging needs --coefficients FILE, and --coefficients only applies to it")
    if args.method == "ties" and not 0 < args.keep <= 1:
        raise TvswitchError("--keep must be in (0, 1], got %g" % args.keep)
    if as_is and args.task is None:
        raise TvswitchError("%s stores %d tensors per task as-is (e.g. %s), which are not merged: give --task NAME "
                            "to take that task's own" % (args.bundle, len(as_is), as_is[0]))


def _delta(args: argparse.Namespace, bundle, given: Optional[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """The merged delta of the bundle's decoded task vectors under the chosen method."""
    from tvswitch.export import merge

    coefficients = _load_coefficients(args.coefficients) if args.method == "adamerging" else None
    taus = merge.task_vectors_from_bundle(bundle, given)
    if args.method == "task_arithmetic":
        return merge.task_arithmetic(taus, args.lam)
    if args.method == "ties":
        return merge.ties(taus, args.lam, args.keep)
    if args.method == "average":
        return merge.average(taus)
    if args.method == "emr":
        return merge.emr(taus).task_delta(args.task)
    try:
        return coefficients.delta(taus)
    except ValueError as exc:
        raise TvswitchError("--coefficients %s do not fit %s: %s" % (args.coefficients, args.bundle, exc)) from None


def _load_coefficients(path: str):
    from tvswitch.export.merge import Coefficients

    try:
        return Coefficients.load(path)
    except ValueError as exc:
        raise TvswitchError("--coefficients %s" % exc) from None


def _own_rebuild(bundle, given: Optional[Dict[str, np.ndarray]], task: str) -> Dict[str, np.ndarray]:
    """An emr bundle's model of ``task``: exactly what the device rebuilds for {task: 1}
    (unified vector through the task's mask, times its rescaler, plus its as-is tensors)."""
    from tvswitch.runtime.rebuild import CpuRebuilder

    rebuilder = CpuRebuilder(bundle, given)
    out = rebuilder.allocate()
    rebuilder.rebuild({task: 1.0}, out)
    return out
