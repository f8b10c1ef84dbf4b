"""tvswitch run: serve a bundle's task, mix or Auto-Switch choice on an engine, for one input file."""
from __future__ import annotations

import argparse
import io
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from tvswitch.commands._common import load_base
from tvswitch.commands._inputs import check_output_path, load_module, module_weights, parse_inputs, threads
from tvswitch.errors import TvswitchError
from tvswitch.runtime.engines.base import ENGINE_KINDS
from tvswitch.runtime.engines.options import engine_options, name_inputs, torch_device

if TYPE_CHECKING:
    from tvswitch.runtime.server import Server

NAME = "run"
HELP = "run a task, a mix or Auto-Switch's choice of a bundle on an engine (onnxruntime, tensorrt, torch)"


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that say how to load the engine and its base (shared with bench-switch)."""
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--engine", choices=ENGINE_KINDS, default="onnxruntime")
    p.add_argument("--model", metavar="MODEL.onnx",
                   help="the ONNX graph (default: BUNDLE's name with .onnx, as export-onnx suggests)")
    p.add_argument("--base", help="base checkpoint (default: the bundle's embedded base, else the graph's weights)")
    p.add_argument("--module", metavar="MODULE:FACTORY", help="torch engine: callable returning the network")
    p.add_argument("--threads", type=threads, default=0, help="CPU threads for rebuild and inference (default: all)")
    p.add_argument("--double-buffer", action="store_true",
                   help="two weight sets: requests never wait for a rebuild (twice the weight memory)")
    p.add_argument("--provider", choices=["cpu", "cuda"],
                   help="where inference runs: onnxruntime's execution provider, torch's device (default cpu); "
                   "cuda is refused with the reason where it cannot run (no silent CPU fallback). tensorrt: "
                   "cuda only")
    p.add_argument("--fp16", action="store_true", help="tensorrt: build an FP16 engine")
    p.add_argument("--plan-cache", metavar="DIR", help="tensorrt: folder of cached plans")
    p.add_argument("--verbose", action="store_true",
                   help="let the engine's own warnings through (ONNX Runtime, TensorRT); errors only by default")
    p.add_argument("--no-constants", action="store_true",
                   help="onnxruntime: serve the tensors no task changes as graph inputs like the others, not as "
                   "constants of the session (constants are pre-packed, faster at small batches, but the session "
                   "is made from a transient copy of them)")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="serve a graph that lacks some of the bundle's tensors on purpose: those keep the graph's "
                   "values through every switch (listed in a warning). Without it such a graph is refused")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="one task")
    which.add_argument("--mix", metavar="NAME=W,NAME=W", help="a weighted mix: base + sum_i w_i tau_i")
    which.add_argument("--auto", action="store_true",
                       help="Auto-Switch: the bundle's query sets choose the mix for the batch (features as "
                       "its router record says)")
    p.add_argument("--per-input", action="store_true",
                   help="with --auto: route each input on its own, one rebuild per distinct mix in the batch")
    p.add_argument("--input", action="append", required=True, metavar="[NAME=]X.npy",
                   help="an input array: a bare X.npy for a network with one input, else NAME=X.npy once per "
                   "input, or a bare X.npz holding every input under its name (tensorrt builds its engine for "
                   "these shapes)")
    p.add_argument("-o", "--output", required=True, metavar="Y.npy",
                   help="where to write the output, exactly this path (.npz: every output by name, needed where "
                   "the network has several)")


def open_server(args: argparse.Namespace, inputs: Mapping[str, np.ndarray],
                initial: Optional[Mapping[str, float]] = None) -> Tuple["Server", Dict[str, np.ndarray]]:
    """A ``Server`` for the engine the flags describe, and ``inputs`` under the names the network uses.

    A bare ``--input X.npy`` is called ``input``; a network with one data input of another
    name gets it under that name (``name_inputs``).
    """
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.server import default_model_path, serve_bundle

    bundle = Bundle.open(args.bundle)
    base = load_base(args.base, bundle)
    module = None
    inputs, options = engine_options(args.engine, inputs, provider=args.provider, verbose=args.verbose,
                                     fp16=args.fp16, plan_cache=args.plan_cache,
                                     graph=args.model or default_model_path(args.bundle))
    if args.engine == "torch":
        if not args.module:
            raise TvswitchError("--engine torch needs --module MODULE:FACTORY (the network to serve)")
        device = torch_device(args.provider)
        heads = bundle.head_names
        weights = None if base is None else module_weights(base, bundle)
        module = load_module(args.module, weights, may_lack=heads).to(device)
        options["example_inputs"] = dict(inputs) if inputs else None
    server = serve_bundle(bundle, args.engine, model=args.model, base=base, base_label=args.base, initial=initial,
                          slots=2 if args.double_buffer else 1, threads=args.threads, module=module,
                          input_names=list(inputs), allow_unmatched=args.allow_unmatched,
                          constants=not args.no_constants, **options)
    return server, name_inputs(inputs, server.engine.input_names)


def output_format(path: str, count: int) -> str:
    """``"npz"`` for a ``.npz`` path, else ``"npy"``, which holds one output only."""
    if path.endswith(".npz"):
        return "npz"
    if count > 1:
        raise TvswitchError("-o %s: the network has %d outputs; give -o OUT.npz to write them all" % (path, count))
    return "npy"


def write_outputs(path: str, outputs: Mapping[str, Any]) -> None:
    """Write ``outputs`` to exactly ``path`` (np.save would add .npy to another name), atomically.

    An output answered per input by heads of different sizes (``--auto --per-input``) is a
    list: in a ``.npz`` it is one array per input, ``NAME.0``, ``NAME.1``, ...
    """
    from tvswitch.files import atomic_write

    ragged = [n for n, v in outputs.items() if isinstance(v, list)]
    buf = io.BytesIO()
    if output_format(path, len(outputs)) == "npz":
        arrays: Dict[str, np.ndarray] = {}
        for name, value in outputs.items():
            if isinstance(value, list):
                arrays.update(("%s.%d" % (name, i), a) for i, a in enumerate(value))
            else:
                arrays[name] = value
        np.savez(buf, **arrays)
    elif ragged:
        raise TvswitchError("-o %s: the inputs were answered by heads of different sizes, which no one array holds; "
                            "give -o OUT.npz (one array per input, %s.0, %s.1, ...)" % (path, ragged[0], ragged[0]))
    else:
        np.save(buf, next(iter(outputs.values())))
    try:
        atomic_write(path, buf.getvalue())
    except OSError as exc:
        raise TvswitchError("-o %s: cannot write it (%s)" % (path, exc.strerror or exc)) from None


def run(args: argparse.Namespace) -> int:
    from tvswitch.runtime.mix import parse_mix
    from tvswitch.runtime.server import default_model_path

    check_output_path(args.output, "-o", inputs=[args.bundle, args.model or default_model_path(args.bundle),
                                                 args.base] + [v.partition("=")[2] or v for v in args.input])
    inputs = parse_inputs(args.input)
    if args.per_input and not args.auto:
        raise TvswitchError("--per-input routes with Auto-Switch: use it with --auto")
    mix = None if args.auto else ({args.task: 1.0} if args.task is not None else parse_mix(args.mix))
    server, inputs = open_server(args, inputs, initial=mix)
    output_format(args.output, len(server.engine.output_names))  # known before inference, except for torch
    start = time.perf_counter()
    if args.auto:
        served, outputs = auto_infer(server, inputs, args.per_input)
    else:
        served, outputs = [mix], server.infer(inputs)
    seconds = time.perf_counter() - start
    write_outputs(args.output, outputs)
    print("wrote %s: %s on %s (%s), %.1f ms" % (args.output, " | ".join(",".join("%s=%g" % kv for kv in m.items())
                                                                        for m in served),
                                                args.engine, server.mode, 1e3 * seconds))
    return 0


def auto_infer(server: "Server", inputs: Mapping[str, np.ndarray], per_input: bool
               ) -> Tuple[List[Dict[str, float]], Dict[str, np.ndarray]]:
    """Auto-Switch through the bundle's router record and query sets: (mixes served, outputs).

    One mix for the batch, or with ``per_input`` the batch split by each input's own mix
    and answered group by group."""
    from tvswitch.runtime.autoswitch import Router, serve_groups

    router = Router(server.source.bundle, server.infer)
    if not per_input:
        mix, outputs = server.auto(inputs, router)
        return [mix], outputs
    groups = router.groups(inputs)
    return [dict(m) for _, m in groups], serve_groups(server.infer, inputs, groups)
