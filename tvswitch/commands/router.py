"""tvswitch router: build Auto-Switch's query sets from exemplar inputs and store them in a bundle."""
from __future__ import annotations

import argparse

from tvswitch.commands._common import load_base, parse_task_args
from tvswitch.commands._inputs import check_output_path, load_arrays, threads
from tvswitch.runtime.engines.options import name_inputs
from tvswitch.errors import TvswitchError

NAME = "router"
HELP = "build Auto-Switch's query sets (router features of exemplar inputs per task) and store them in the bundle"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tvswitch.runtime.autoswitch import DEFAULT_EXEMPLARS, DEFAULT_K, NETWORKS, POOLS

    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--inputs", action="append", required=True, metavar="TASK=X.npy|X.npz",
                   help="exemplar inputs of one task, rows along the first axis: a .npy for a graph with one input, "
                        "a .npz of arrays named as the graph's inputs for several; once per task")
    p.add_argument("--exemplars", type=int, default=DEFAULT_EXEMPLARS,
                   help="exemplars drawn per task, at random (seeded); all of them where a task has fewer "
                        "(default %(default)s)")
    p.add_argument("--output", metavar="NAME",
                   help="the graph output features come from (default: the bundle's router record's)")
    p.add_argument("--pool", choices=POOLS,
                   help="mean: average over every axis but the first and last (inputs, features); none: a 2-D "
                        "output as it is (default: the record's, else mean)")
    p.add_argument("--mask-input", metavar="NAME",
                   help="with --pool mean: average only where this input (e.g. attention_mask) is nonzero")
    p.add_argument("--network", choices=NETWORKS,
                   help="the router network's weights: average (every task at 1/T, T-Switch's choice) or base "
                        "(default: the record's, else average)")
    p.add_argument("--k", type=int, help="neighbours per input at serving time (default: the record's, else %d)"
                   % DEFAULT_K)
    p.add_argument("--seed", type=int, default=0, help="seed of the exemplars' draw (default 0)")
    p.add_argument("--batch", type=int, default=64, help="exemplars per inference (default 64)")
    p.add_argument("--model", metavar="MODEL.onnx",
                   help="the ONNX graph (default: BUNDLE's name with .onnx, as export-onnx suggests)")
    p.add_argument("--base", help="base checkpoint (default: the bundle's embedded base, else the graph's weights)")
    p.add_argument("--threads", type=threads, default=0, help="CPU threads for rebuild and inference (default: all)")
    p.add_argument("-o", "--out", metavar="OUT.tvs",
                   help="write the bundle here (default: rewrite BUNDLE in place); tvswitch run looks for its graph "
                        "beside it, OUT.onnx, unless given --model")


def run(args: argparse.Namespace) -> int:
    from tvswitch.export.edit import set_query_sets
    from tvswitch.runtime.autoswitch import RouterSpec, router_query_sets
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.server import serve_bundle

    if args.out is not None:
        check_output_path(args.out, "-o", inputs=[args.bundle, args.model, args.base]
                          + [f.partition("=")[2] for f in args.inputs])
    for flag, value in (("--exemplars", args.exemplars), ("--batch", args.batch)):
        if value < 1:
            raise TvswitchError("%s must be >= 1, got %d" % (flag, value))
    bundle = Bundle.open(args.bundle)
    spec = RouterSpec.from_record(_record(args, bundle.router()), "the router record")
    files = parse_task_args(args.inputs, "--inputs")
    missing = [t for t in bundle.tasks if t not in files]
    if missing:
        raise TvswitchError("no --inputs for task %r: Auto-Switch would never route to it (tasks: %s)"
                            % (missing[0], ", ".join(bundle.tasks)))
    unknown = [t for t in files if t not in bundle.tasks]
    if unknown:
        raise TvswitchError("%s has no task %r (tasks: %s)" % (args.bundle, unknown[0], ", ".join(bundle.tasks)))
    network = spec.network_mix(bundle.tasks)
    server = serve_bundle(bundle, "onnxruntime", model=args.model, base=load_base(args.base), base_label=args.base,
                          initial=network, threads=args.threads)
    outputs = list(server.engine.output_names)
    if spec.output not in outputs:
        raise TvswitchError("--output %s: the graph has no such output (outputs: %s)"
                            % (spec.output, ", ".join(outputs)))
    graph_inputs = list(server.engine.input_names)
    exemplars = {t: name_inputs(load_arrays(path, "--inputs"), graph_inputs) for t, path in files.items()}
    if spec.mask_input is not None and spec.mask_input not in graph_inputs:
        raise TvswitchError("--mask-input %s: the graph has no such input (inputs: %s)"
                            % (spec.mask_input, ", ".join(graph_inputs)))
    queries = router_query_sets(spec, server.infer, bundle.tasks, exemplars, n=args.exemplars, seed=args.seed,
                                batch=args.batch)
    out = set_query_sets(args.bundle, queries, spec, args.out)
    print("wrote %s: query sets of %s exemplars (%d features each, fp16, %d bytes), router %s k=%d on the %s network"
          % (out.path, "/".join(str(len(q)) for q in queries.values()), next(iter(queries.values())).shape[1],
             out.query_nbytes, spec.output + ("" if spec.pool == "none" else " mean-pooled") +
             (" over %s" % spec.mask_input if spec.mask_input else ""), spec.k, spec.network))
    return 0


def _record(args: argparse.Namespace, stored) -> dict:
    """The router record: the bundle's (if any) with the flags given on top."""
    record = dict(stored or {})
    flags = {"output": args.output, "pool": args.pool, "mask_input": args.mask_input, "network": args.network,
             "k": args.k}
    record.update((k, v) for k, v in flags.items() if v is not None)
    if args.pool == "none" and args.mask_input is None:
        record["mask_input"] = None  # a stored mask belongs to the stored mean pooling
    if "output" not in record:
        raise TvswitchError("%s has no router record yet: give --output NAME (the graph output features come from)"
                            % args.bundle)
    return record
