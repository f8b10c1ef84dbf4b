"""tvswitch merge: one merged model from the task vectors stored in a bundle."""
from __future__ import annotations

import argparse

from tvswitch.commands._common import load_base
from tvswitch.errors import TvswitchError

NAME = "merge"
HELP = "merge a bundle's task vectors (task arithmetic, TIES, EMR) into one weights file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--method", required=True, choices=["task_arithmetic", "ties", "emr", "average"],
                   help="task_arithmetic: base + lambda*sum tau; ties: trim/elect/disjoint mean; emr: per-task "
                        "masks and rescalers on one unified vector (needs --task); average: lambda = 1/T")
    p.add_argument("--lambda", dest="lam", type=float, default=0.3, help="scaling for task_arithmetic/ties (default 0.3)")
    p.add_argument("--keep", type=float, default=0.2, help="TIES: share of each task vector kept (default 0.2)")
    p.add_argument("--task", help="EMR: the task whose weights to write; other methods: add its head")
    p.add_argument("--base", help="base checkpoint (needed unless the bundle embeds it)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from tvswitch.export import merge
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.checkpoint import write_safetensors
    from tvswitch.runtime.rebuild import resolve_base

    bundle = Bundle.open(args.bundle)
    if args.task is not None and args.task not in bundle.tasks:
        raise TvswitchError("%s has no task %r (tasks: %s)" % (args.bundle, args.task, ", ".join(bundle.tasks)))
    if args.method == "emr" and args.task is None:
        raise TvswitchError("--method emr rebuilds one task's weights: give --task")
    if args.method == "ties" and not 0 < args.keep <= 1:
        raise TvswitchError("--keep must be in (0, 1], got %g" % args.keep)
    given = load_base(args.base)
    base = resolve_base(bundle, given)
    taus = merge.task_vectors_from_bundle(bundle, given)
    if args.method == "task_arithmetic":
        delta = merge.task_arithmetic(taus, args.lam)
    elif args.method == "ties":
        delta = merge.ties(taus, args.lam, args.keep)
    elif args.method == "average":
        delta = merge.average(taus)
    else:
        delta = merge.emr(taus).task_delta(args.task)
    tensors = merge.apply_delta(base, delta)
    source = given if given is not None else bundle.embedded_base()
    for name in bundle.manifest["base"].get("other", []):
        tensors[name] = source[name]
    if args.task is not None:
        tensors.update(bundle.task_specific(args.task))
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    write_safetensors(args.output, tensors, {"tvswitch.merge": args.method})
    print("wrote %s: %s over %d tasks, %d tensors" % (args.output, args.method, len(bundle.tasks), len(tensors)))
    return 0
