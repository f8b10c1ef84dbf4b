"""tvswitch run: serve a bundle's task, mix or Auto-Switch choice on an engine, for one input file."""
from __future__ import annotations

import argparse
import time
from typing import Dict, Mapping

import numpy as np

from tvswitch.commands._common import load_base
from tvswitch.commands.export_onnx import parse_inputs
from tvswitch.errors import TvswitchError

NAME = "run"
HELP = "run a task, a mix or Auto-Switch's choice of a bundle on an engine (onnxruntime, tensorrt, torch)"


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that say how to load the engine and its base (shared with bench-switch)."""
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--engine", choices=["onnxruntime", "tensorrt", "torch"], default="onnxruntime")
    p.add_argument("--model", metavar="MODEL.onnx",
                   help="the ONNX graph (default: BUNDLE's name with .onnx, as export-onnx suggests)")
    p.add_argument("--base", help="base checkpoint (default: the bundle's embedded base, else the graph's weights)")
    p.add_argument("--module", metavar="MODULE:FACTORY", help="torch engine: callable returning the network")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for rebuild and inference (default: all)")
    p.add_argument("--double-buffer", action="store_true",
                   help="two weight sets: requests never wait for a rebuild (twice the weight memory)")
    p.add_argument("--fp16", action="store_true", help="tensorrt: build an FP16 engine")
    p.add_argument("--plan-cache", metavar="DIR", help="tensorrt: folder of cached plans")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="one task")
    which.add_argument("--mix", metavar="NAME=W,NAME=W", help="a weighted mix: base + sum_i w_i tau_i")
    which.add_argument("--auto", action="store_true",
                       help="Auto-Switch: the bundle's query sets choose the mix for the batch")
    p.add_argument("--input", action="append", required=True, metavar="[NAME=]X.npy",
                   help="an input array; repeat as NAME=X.npy per input for several")
    p.add_argument("-o", "--output", required=True, metavar="Y.npy",
                   help="the output (.npz with every output by name where the network has several)")


def open_server(args: argparse.Namespace, inputs: Mapping[str, np.ndarray], initial=None):
    """A ``Server`` for the engine the flags describe; torch modules come from ``--module``."""
    from tvswitch.runtime.server import serve_bundle

    base = load_base(args.base)
    options: Dict[str, object] = {}
    module = None
    if args.engine == "torch":
        from tvswitch.runtime.engines.torch_engine import load_module

        if not args.module:
            raise TvswitchError("--engine torch needs --module MODULE:FACTORY (the network to serve)")
        module = load_module(args.module, base)
    elif args.engine == "tensorrt":
        options = {"fp16": args.fp16, "cache_dir": args.plan_cache,
                   "profile": {n: (a.shape,) * 3 for n, a in inputs.items()}}
    server = serve_bundle(args.bundle, args.engine, model=args.model, base=base, initial=initial,
                          slots=2 if args.double_buffer else 1, threads=args.threads, module=module,
                          input_names=list(inputs), **options)
    if set(inputs) != set(server.engine.input_names) and list(inputs) == ["input"] \
            and len(server.engine.input_names) == 1:
        inputs = {server.engine.input_names[0]: inputs["input"]}
    return server, dict(inputs)


def auto_route(server, bundle):
    """Auto-Switch's route: features from the router network (the bundle's ``router`` record;
    by default the average of all tasks, as T-Switch does), its first output averaged over
    every axis but the first and the last, then kNN over the stored query sets."""
    from tvswitch.runtime.autoswitch import AutoSwitch

    queries = bundle.query_sets()
    if not queries:
        raise TvswitchError("%s has no Auto-Switch query sets (export with query sets to use --auto)" % bundle.path)
    record = bundle.router() or {}
    router = AutoSwitch(queries, k=int(record.get("k", 10)))
    tasks = bundle.tasks
    net = {t: 0.0 for t in tasks} if record.get("network") == "base" else {t: 1.0 / len(tasks) for t in tasks}

    def route(inputs):
        first = server.engine.output_names[0]
        out = np.asarray(server.infer(inputs, net)[first], dtype=np.float32)
        feats = out.reshape(out.shape[0], -1, out.shape[-1]).mean(axis=1) if out.ndim > 2 else out
        return router.weights(feats)

    return route


def run(args: argparse.Namespace) -> int:
    from tvswitch.runtime.mix import parse_mix

    inputs = parse_inputs(args.input)
    mix = None if args.auto else ({args.task: 1.0} if args.task is not None else parse_mix(args.mix))
    server, inputs = open_server(args, inputs, initial=mix)
    start = time.perf_counter()
    if args.auto:
        mix, outputs = server.auto(inputs, auto_route(server, server.source.bundle))
    else:
        outputs = server.infer(inputs)
    seconds = time.perf_counter() - start
    if len(outputs) == 1:
        np.save(args.output, next(iter(outputs.values())))
    elif args.output.endswith(".npz"):
        np.savez(args.output, **outputs)
    else:
        raise TvswitchError("the network has %d outputs (%s): give -o OUT.npz" % (len(outputs), ", ".join(outputs)))
    print("wrote %s: %s on %s (%s), %.1f ms" % (args.output, ",".join("%s=%g" % kv for kv in mix.items()),
                                                args.engine, server.mode, 1e3 * seconds))
    return 0
