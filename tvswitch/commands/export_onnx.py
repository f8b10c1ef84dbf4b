"""tvswitch export-onnx: a torch module -> an ONNX graph whose switchable weights are named inputs."""
from __future__ import annotations

import argparse
from typing import Dict, List

from tvswitch.commands._common import load_base
from tvswitch.commands._inputs import check_output_path, load_module, parse_inputs
from tvswitch.errors import TvswitchError

NAME = "export-onnx"
HELP = "export a torch module to ONNX for serving: weights as inputs named as in its state_dict"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--module", required=True, metavar="MODULE:FACTORY",
                   help="python callable returning the network: package.module:factory or file.py:factory")
    p.add_argument("--weights", metavar="CHECKPOINT", help="weights to load into it (the base; safetensors or torch "
                   "state_dict). The graph stores them as its weights' defaults")
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
    from tvswitch.export.onnx_export import export_onnx
    from tvswitch.runtime.engines.onnx_graph import read_record

    check_output_path(args.output, "-o")
    module = load_module(args.module, load_base(args.weights))
    inputs = parse_inputs(args.input)
    dynamic = parse_dynamic(args.dynamic) if args.dynamic else None
    model = export_onnx(module, list(inputs.values()), args.output, input_names=list(inputs),
                        output_names=args.output_name or None, dynamic_axes=dynamic, opset=args.opset,
                        verify=not args.no_verify)
    record = read_record(model)
    moved = sum(1 for r in record.renamed.values() if r["layout"] != "identity")
    print("wrote %s: %d switchable weights as inputs (%d renamed from the exporter's names, %d re-laid out), "
          "%d unused%s" % (args.output, len(record.weights), len(record.renamed), moved, len(record.unused),
                           "" if args.no_verify else ", outputs checked against the module"))
    return 0
