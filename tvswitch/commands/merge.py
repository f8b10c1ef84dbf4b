"""tvswitch merge: one merged model from the task vectors stored in a bundle."""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Tuple

import numpy as np

from tvswitch.commands._common import OUTPUT_DTYPES, cast_floats, load_base, output_dtype, parse_task_args
from tvswitch.commands._inputs import check_output_path, load_arrays
from tvswitch.errors import TvswitchError

NAME = "merge"
HELP = "merge a bundle's task vectors (task arithmetic, TIES, EMR, AdaMerging) into one weights file"

METHODS = ("task_arithmetic", "ties", "emr", "adamerging", "average")
#: Flags that only some methods read: (attribute, flag, the methods that read it). Any
#: other method refuses them rather than ignore them.
SCALING = (("lam", "--lambda", ("task_arithmetic", "ties")), ("keep", "--keep", ("ties",)),
           ("coefficients", "--coefficients", ("adamerging",)))
#: AdaMerging's learning flags (attribute, flag); they apply to --method adamerging without --coefficients.
LEARNING = (("module", "--module"), ("inputs", "--inputs"), ("granularity", "--granularity"), ("steps", "--steps"),
            ("lr", "--lr"), ("init", "--init"), ("batch", "--batch"), ("seed", "--seed"),
            ("coefficients_out", "--coefficients-out"))
LEARN_DEFAULTS = {"granularity": "layer", "steps": 500, "lr": 1e-3, "init": 0.3, "batch": 16, "seed": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="task_arithmetic: base + lambda*sum tau; ties: trim/elect/disjoint mean; emr: one task's "
                        "EMR model (needs --task; an emr bundle's own rebuild of it, otherwise EMR run on the "
                        "decoded task vectors); adamerging: coefficients applied (--coefficients) or learned "
                        "(--module, --inputs); average: lambda = 1/T")
    p.add_argument("--lambda", dest="lam", type=float, help="task_arithmetic, ties: the scaling (default 0.3)")
    p.add_argument("--keep", type=float, help="ties: share of each task vector kept (default 0.2)")
    p.add_argument("--coefficients", metavar="FILE",
                   help="adamerging: apply coefficients learned before (JSON or safetensors, as --coefficients-out "
                        "or tvswitch.export.adamerging save them)")
    p.add_argument("--task", help="the task whose head and tensors stored as-is (BatchNorm statistics) the output "
                                  "takes (EMR: the task whose model to write). Without it: the merged weights, "
                                  "statistics averaged over the tasks, no head")
    p.add_argument("--base", help="base checkpoint (needed unless the bundle embeds it)")
    p.add_argument("--dtype", choices=OUTPUT_DTYPES,
                   help="output dtype of the floating tensors (default: as merged, the base's as read)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    g = p.add_argument_group("adamerging: learning the coefficients (entropy minimisation on unlabelled inputs, "
                             "torch on the CPU)")
    g.add_argument("--module", metavar="MODULE:FACTORY",
                   help="callable returning the network whose state_dict the bundle was exported from "
                        "(package.module:factory or file.py:factory, as export-onnx); its output, or first output, "
                        "are the logits")
    g.add_argument("--inputs", action="append", metavar="TASK=X.npy|X.npz",
                   help="unlabelled inputs of one task, rows along the first axis: a .npy for a network with one "
                        "input, a .npz of arrays in forward's order for several; once per task")
    g.add_argument("--granularity", choices=["task", "layer"],
                   help="one coefficient per task, or per task and tensor (default layer)")
    g.add_argument("--steps", type=int, help="Adam steps (default 500, the paper's)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3, the paper's)")
    g.add_argument("--init", type=float, help="every coefficient's start (default 0.3, the paper's)")
    g.add_argument("--batch", type=int, help="inputs per task and step (default 16)")
    g.add_argument("--seed", type=int, help="seed of the batches' order (default 0)")
    g.add_argument("--normalize", action="store_true",
                   help="divide each task's entropy by log(classes), so a many-class task does not outweigh a "
                        "binary one")
    g.add_argument("--coefficients-out", metavar="C.json",
                   help="also save the learned coefficients (.json or .safetensors) for --coefficients")


def run(args: argparse.Namespace) -> int:
    from tvswitch.export import merge
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.checkpoint import write_safetensors

    inputs = [args.bundle, args.base, args.coefficients] + [f.partition("=")[2] for f in args.inputs or []]
    check_output_path(args.output, "-o", inputs=inputs)
    if args.coefficients_out is not None:
        check_output_path(args.coefficients_out, "--coefficients-out", inputs=inputs + [args.output])
    dtype = output_dtype(args.dtype)
    bundle = Bundle.open(args.bundle)
    _check_args(args, bundle)
    given = load_base(args.base, bundle)
    if args.method == "emr" and bundle.scheme == "emr":
        model = merge.emr_model(bundle, args.task, given)
        how = "the bundle's own EMR model of %s" % args.task
    else:
        delta, how = _delta(args, bundle, given)
        model = merge.merged_model(bundle, delta, given, args.task)
        if model.averaged:
            how += ", %d statistics averaged over the tasks" % len(model.averaged)
    if model.left_out:
        print("tvswitch merge: note: left out %d tensor%s that each task has its own of (e.g. %s); give --task NAME "
              "to include that task's" % (len(model.left_out), "" if len(model.left_out) == 1 else "s",
                                          model.left_out[0]), file=sys.stderr)
    write_safetensors(args.output, cast_floats(model.tensors, dtype), {"tvswitch.merge": args.method})
    print("wrote %s: %s, %d tensors" % (args.output, how, len(model.tensors)))
    return 0


def _check_args(args: argparse.Namespace, bundle) -> None:
    """Refuse flag combinations that cannot name one model, and flags the method would
    ignore, before anything is decoded."""
    from tvswitch.runtime.mix import check_weight

    if args.task is not None and args.task not in bundle.tasks:
        raise TvswitchError("%s has no task %r (tasks: %s)" % (args.bundle, args.task, ", ".join(bundle.tasks)))
    for attr, flag, methods in SCALING:
        if getattr(args, attr) is not None and args.method not in methods:
            raise TvswitchError("%s does not apply to --method %s (only to %s)"
                                % (flag, args.method, ", ".join(methods)))
    learning = [flag for attr, flag in LEARNING if getattr(args, attr) is not None] + \
        (["--normalize"] if args.normalize else [])
    if learning and args.method != "adamerging":
        raise TvswitchError("%s does not apply to --method %s (it learns AdaMerging's coefficients)"
                            % (learning[0], args.method))
    if args.method == "adamerging":
        if args.coefficients is not None and learning:
            raise TvswitchError("%s learns coefficients, --coefficients applies saved ones: give one or the other"
                                % learning[0])
        if args.coefficients is None and (args.module is None or not args.inputs):
            raise TvswitchError("--method adamerging needs --coefficients FILE (apply saved coefficients) or "
                                "--module MODULE:FACTORY and --inputs TASK=X.npy for every task (learn them)")
    if args.method == "emr" and args.task is None:
        raise TvswitchError("--method emr writes one task's model (EMR keeps a mask and a rescaler per task): "
                            "give --task NAME")
    if args.lam is not None:
        check_weight(args.lam, "--lambda")
    if args.keep is not None and not 0 < args.keep <= 1:
        raise TvswitchError("--keep must be in (0, 1], got %g" % args.keep)
    if args.lr is not None and not check_weight(args.lr, "--lr") > 0:
        raise TvswitchError("--lr must be > 0, got %g" % args.lr)
    if args.init is not None:
        check_weight(args.init, "--init")
    for flag, value in (("--steps", args.steps), ("--batch", args.batch)):
        if value is not None and value < (0 if flag == "--steps" else 1):
            raise TvswitchError("%s must be >= %d, got %d" % (flag, 0 if flag == "--steps" else 1, value))


def _delta(args: argparse.Namespace, bundle, given: Optional[Dict[str, np.ndarray]]
           ) -> Tuple[Dict[str, np.ndarray], str]:
    """The merged delta of the bundle's decoded task vectors under the chosen method, and
    how it was made (for the summary line)."""
    from tvswitch.export import merge

    coefficients = _load_coefficients(args.coefficients) if args.coefficients is not None else None
    taus = merge.task_vectors_from_bundle(bundle, given)
    how = "%s over %d tasks" % (args.method, len(bundle.tasks))
    lam = 0.3 if args.lam is None else args.lam
    if args.method == "task_arithmetic":
        return merge.task_arithmetic(taus, lam), how
    if args.method == "ties":
        try:
            return merge.ties(taus, lam, 0.2 if args.keep is None else args.keep), how
        except ValueError as exc:  # a ratio that keeps no entry
            raise TvswitchError("--keep: %s" % exc) from None
    if args.method == "average":
        return merge.average(taus), how
    if args.method == "emr":
        return merge.emr(taus).task_delta(args.task), \
            "EMR run on the %s-decoded task vectors, model of %s" % (bundle.scheme, args.task)
    if coefficients is None:
        coefficients, how = _learn(args, bundle, given, taus)
    try:
        return coefficients.delta(taus), how
    except ValueError as exc:
        raise TvswitchError("--coefficients %s do not fit %s: %s" % (args.coefficients, args.bundle, exc)) from None


def _learn(args: argparse.Namespace, bundle, given: Optional[Dict[str, np.ndarray]], taus):
    """AdaMerging's coefficients learned on the --inputs through the --module, saved to
    --coefficients-out if given; (coefficients, summary)."""
    from tvswitch.commands._inputs import load_module

    try:
        from tvswitch.export.adamerging import learn_from_bundle
    except ImportError as exc:
        raise TvswitchError("learning AdaMerging's coefficients needs torch (pip install 'tvswitch[torch]'): %s"
                            % exc) from None
    settings = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in LEARN_DEFAULTS.items()}
    inputs = {t: list(load_arrays(path, "--inputs").values())
              for t, path in parse_task_args(args.inputs, "--inputs").items()}
    module = load_module(args.module)
    try:
        result = learn_from_bundle(bundle, module, inputs, given, taus, batch=settings["batch"],
                                   seed=settings["seed"], granularity=settings["granularity"], init=settings["init"],
                                   steps=settings["steps"], lr=settings["lr"], normalize=args.normalize,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as exc:
        raise TvswitchError("AdaMerging: %s" % exc) from None
    if args.coefficients_out is not None:
        result.save(args.coefficients_out)
    h = result.entropy
    how = "adamerging (%s-wise, %d steps%s) over %d tasks%s" % (
        settings["granularity"], settings["steps"],
        ", entropy %.4g -> %.4g" % (h[0], h[-1]) if h else "", len(bundle.tasks),
        ", coefficients in %s" % args.coefficients_out if args.coefficients_out else "")
    return result, how


def _load_coefficients(path: str):
    from tvswitch.export.merge import Coefficients

    try:
        return Coefficients.load(path)
    except ValueError as exc:
        raise TvswitchError("--coefficients %s" % exc) from None
