"""tvswitch export-onnx: a torch module -> an ONNX graph whose switchable weights are named inputs."""
from __future__ import annotations

import argparse
from typing import Dict, List

import os

from tvswitch.commands._common import human_bytes, load_base
from tvswitch.commands._inputs import check_output_path, load_module, module_weights, parse_inputs
from tvswitch.errors import TvswitchError

NAME = "export-onnx"
HELP = "export a torch module to ONNX for serving: weights as inputs named as in its state_dict"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--module", required=True, metavar="MODULE:FACTORY",
                   help="python callable returning the network: package.module:factory or file.py:factory")
    p.add_argument("--weights", metavar="CHECKPOINT", help="weights to load into it (the base; safetensors or torch "
                   "state_dict). The graph stores them as its weights' defaults (with --bundle they only serve the "
                   "export's checks: default the bundle's embedded base, else the module's own)")
    p.add_argument("--bundle", metavar="BUNDLE",
                   help="make one graph that serves every task of BUNDLE, whatever the shape of its head: heads laid "
                   "out at the largest shape any task has, each task's outputs cut back to its own; the graph holds "
                   "no weights (tvswitch run takes them from the base and the bundle)")
    p.add_argument("--input", action="append", required=True, metavar="NAME=X.npy",
                   help="an example input, in forward's order; repeat per input")
    p.add_argument("--output-name", action="append", default=[], metavar="NAME", help="names of the outputs")
    p.add_argument("--dynamic", action="append", default=[], metavar="NAME=AXES",
                   help="dynamic axes of an input or output, e.g. input_ids=0,1; repeatable. Default: axis 0 of "
                   "every input and output")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-verify", action="store_true", help="skip running the graph against the module")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx",
                   help="where to write it; beside a bundle as BUNDLE_STEM.onnx, tvswitch run finds it")


def parse_dynamic(values: List[str]) -> Dict[str, Dict[int, str]]:
    """``NAME=0,1`` -> ``{NAME: {0: "NAME_0", 1: "NAME_1"}}`` (torch's dynamic_axes)."""
    axes: Dict[str, Dict[int, str]] = {}
    for v in values:
        name, sep, text = v.partition("=")
        if not sep or not name or not all(a.strip().isdigit() for a in text.split(",")):
            raise TvswitchError("--dynamic takes NAME=AXIS[,AXIS...], got %r" % v)
        axes[name] = {int(a): "%s_%s" % (name, a.strip()) for a in text.split(",")}
    return axes


def run(args: argparse.Namespace) -> int:
    from tvswitch.export.onnx_export import export_onnx, export_onnx_for_bundle
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.engines.onnx_graph import read_record

    bundle = Bundle.open(args.bundle) if args.bundle else None
    inputs_of = [args.weights, args.bundle] + [v.partition("=")[2] or v for v in args.input]
    check_output_path(args.output, "-o", inputs=inputs_of)
    weights = load_base(args.weights, bundle)
    if bundle is not None:
        if weights is None:
            weights = bundle.embedded_base()
        heads = bundle.head_names
        if weights is not None:  # a base may hold a head of its own shape: the bundle's are laid out anew
            weights = module_weights(weights, bundle)
        module = load_module(args.module, weights, may_lack=heads) if weights is not None else load_module(args.module)
    else:
        module = load_module(args.module, weights)
    inputs = parse_inputs(args.input)
    dynamic = parse_dynamic(args.dynamic) if args.dynamic else None
    options = dict(input_names=list(inputs), output_names=args.output_name or None, dynamic_axes=dynamic,
                   opset=args.opset, verify=not args.no_verify)
    if bundle is not None:
        model = export_onnx_for_bundle(module, bundle, list(inputs.values()), args.output, **options)
    else:
        model = export_onnx(module, list(inputs.values()), args.output, **options)
    record = read_record(model)
    moved = sum(1 for r in record.renamed.values() if r["layout"] != "identity")
    print("wrote %s (%s): %d switchable weights as inputs (%d renamed from the exporter's names, %d re-laid out), "
          "%d unused%s%s" % (args.output, human_bytes(os.path.getsize(args.output)), len(record.weights),
                             len(record.renamed), moved, len(record.unused),
                             "" if args.no_verify else ", outputs checked against the module",
                             _heads_line(bundle, record) if bundle is not None else ""))
    return 0


def _heads_line(bundle, record) -> str:
    """``; serves tasks a, b, c (2 head shapes cut from the padded one); no weights stored``."""
    from tvswitch.export.onnx_export import graph_binding

    return "; serves %s of %s (%d smaller head shape%s cut from the padded one); no weights stored" % (
        ", ".join(graph_binding(bundle, record).servable), bundle.path, len(record.heads),
        "" if len(record.heads) == 1 else "s")
