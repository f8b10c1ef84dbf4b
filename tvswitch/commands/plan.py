"""``tvswitch plan``: memory, flash and switch-time figures of a bundle on a device.

A thin adapter: it takes the numbers from ``runtime.stats.device_footprint`` (or from
flags for a bundle not exported yet), hands them to ``tvswitch.jetson.plan`` and prints the plan.
Values argparse cannot judge (a zero task count, a negative reserve, --root without
--device this) are checked here, so that each is one line naming its flag, as argparse's
own refusals are; the leaf's ``JetsonInputError`` becomes the CLI's ``TvswitchError``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Optional, Tuple

from tvswitch.commands._common import human_bytes
from tvswitch.errors import TvswitchError
from tvswitch.jetson import plan as _plan
from tvswitch.jetson.devices import DeviceSpec, device_keys, lookup
from tvswitch.jetson.errors import JetsonInputError
from tvswitch.runtime.engines.base import ENGINE_KINDS

NAME = "plan"
HELP = "memory, flash and switch-time floor of a bundle on a Jetson (or this machine)"

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="a bundle file; or give --params/--tasks/--bits instead")
    parser.add_argument("--device", default="this", choices=device_keys(), metavar="DEVICE",
                        help="a row of the device table (%s), or 'this': measured here, or the board "
                             "captured under --root" % ", ".join(device_keys()))
    parser.add_argument("--engine", default="onnxruntime", choices=ENGINE_KINDS)
    parser.add_argument("--workspace-mb", type=float, help="engine workspace and activations in MiB (default 256, assumed)")
    parser.add_argument("--reserve-mb", type=float, help="MiB the OS and CUDA take (default: the JetPack line's)")
    parser.add_argument("--params", type=float, help="what-if: shared weights (e.g. 22.7e6)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_ITEMSIZE), help="what-if: base dtype")
    parser.add_argument("--tasks", type=int, help="what-if: number of tasks")
    parser.add_argument("--bits", type=float, help="what-if: bits per weight each task stores (TVQ: its code "
                        "width as streams; RTVQ: the offsets' width, 2 by default; the compact layout stores "
                        "fewer: `tvswitch inspect` of a real bundle says how many)")
    parser.add_argument("--base-bits", type=float,
                        help="what-if RTVQ: bits per weight of the base vector all tasks share and every switch "
                             "reads (RTVQ's default is 3; leave it out for schemes without one)")
    parser.add_argument("--model", metavar="MODEL.onnx", help="the serving graph, counted on flash (default: BUNDLE's "
                        "name with .onnx, where it exists)")
    parser.add_argument("--root", help="with --device this: plan for the board whose files are under this folder")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def facts_from_bundle(path: str, graph: Optional[str] = None) -> _plan.BundleFacts:
    """The plan's numbers of a bundle; flash sizes as ``tvswitch inspect`` counts them, plus
    the serving graph ``graph`` (default: the bundle's name with .onnx, where it exists)."""
    import os

    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.server import default_model_path
    from tvswitch.runtime.stats import device_footprint

    if graph is None and os.path.isfile(default_model_path(path)):
        graph = default_model_path(path)
    if graph is not None and not os.path.isfile(graph):
        raise TvswitchError("--model %s: no such file" % graph)
    # the payloads' CRCs too: a plan of a bundle that cannot be served is a refusal, not figures
    return _plan.BundleFacts(**device_footprint(Bundle.open(path)),  # type: ignore[arg-type]
                             graph_nbytes=os.path.getsize(graph) if graph else 0)


def _what_if(args: argparse.Namespace) -> _plan.BundleFacts:
    for flag, value in (("--params", args.params), ("--tasks", args.tasks), ("--bits", args.bits)):
        if not value > 0:
            raise TvswitchError("%s must be positive, got %g" % (flag, value))
    shared = args.base_bits or 0.0
    if shared < 0:
        raise TvswitchError("--base-bits cannot be negative, got %g" % shared)
    return _plan.facts_from_numbers(int(args.params), _ITEMSIZE[args.dtype], args.tasks, args.bits,
                                    scheme="what-if, shared base vector" if shared else "what-if", shared_bits=shared)


def _mib(flag: str, value: Optional[float]) -> Optional[int]:
    if value is None:
        return None
    if value < 0:
        raise TvswitchError("%s cannot be negative, got %g" % (flag, value))
    return int(value * _plan.MIB)


def _device(args: argparse.Namespace) -> Tuple[DeviceSpec, Optional[int], str, str]:
    """(device, bytes free to budget against or None, how those were counted, where the
    figures come from).

    ``this`` on this machine is measured; ``this`` with a captured tree is the device
    table's row for the board found there, since this host's bandwidth and free memory
    say nothing about that board, but on the JetPack line detected there: the row names
    the last line a module runs, and a board may run an older one (an AGX Orin on 6.0 has
    TensorRT 8.6, not 6.2's 10.3).
    """
    if args.device != "this":
        if args.root is not None:
            raise TvswitchError("--root names the board for --device this; with --device %s it has no effect"
                                % args.device)
        return lookup(args.device), None, "", "the device table"
    from tvswitch.jetson import bandwidth, platform

    root = "/" if args.root is None else args.root
    report = platform.detect(root)
    matched = lookup(report.device_key) if report.device_key else None
    if not platform.is_live_root(root):
        if matched is None:
            raise TvswitchError("--device this --root %s: the files there match no row of the device table (%s); "
                                "give --device KEY" % (root, report.summary))
        source = "the device table's %s row, the board found under %s" % (matched.key, root)
        if report.jetpack_line is None:
            source += " (its L4T release is in no JetPack line: the row's JetPack %s assumed)" % matched.jetpack
        elif report.jetpack_line != matched.jetpack:
            matched = dataclasses.replace(matched, jetpack=report.jetpack_line)
        return matched, None, "", source
    device = platform.this_device(report, bandwidth.measure_copy_gbs(), matched)
    m = report.memory
    if m is None:
        return device, None, "", "measured on this machine"
    how = "MemAvailable + NvMap's unused page pool, now" if m.nvmap_free_bytes is not None else "MemAvailable now"
    return device, m.usable_bytes, how, "measured on this machine"


def format_text(plan: _plan.Plan, label: str, source: str) -> str:
    """The plan for a terminal; every byte figure in binary units, as ``inspect`` prints them."""
    f, d = plan.facts, plan.device
    lines = [
        "plan for %s (%s, %d tasks, %s shared weights of %g bytes, %.3f bits/weight/task resident)"
        % (label, f.scheme, f.tasks, "{:,}".format(f.num_shared_params), f.weight_itemsize, f.bits_per_weight_per_task),
        "on %s (%s, %.1f GB/s %s, engine %s; from %s)" % (
            d.name, ("JetPack " + d.jetpack) if d.jetpack else "no JetPack", d.bandwidth_gbs,
            "measured copy" if d.measured else "peak", plan.engine, source),
    ]
    lines += ["WARNING: " + w for w in plan.warnings]
    if d.note:
        lines.append("note: " + d.note)
    lines += ["note: " + n for n in plan.notes]
    lines += ["", "memory"]
    for name, n in plan.memory:
        lines.append("  %-34s %11s" % (name, human_bytes(n)))
    lines.append("  %-34s %11s" % ("total", human_bytes(plan.total_bytes)))
    lines.append("  %-34s %11s  (%s)" % ("device budget", human_bytes(plan.budget_bytes), plan.budget_source))
    lines.append("  %-34s %11s  -> %s" % ("headroom", human_bytes(plan.headroom_bytes),
                                         "fits" if plan.fits else "DOES NOT FIT"))
    lines += [
        "",
        "flash, in FP16 on both sides",
        "  %-34s %11s" % ("task data (the bundle)", human_bytes(f.task_data_nbytes)),
        "  %-34s %11s" % ("serving graph" if f.graph_nbytes else "serving graph (none given)",
                          human_bytes(f.graph_nbytes)),
        "  %-34s %11s" % ("base weights in FP16", human_bytes(plan.base_fp16_bytes)),
        "  %-34s %11s" % ("tvswitch total", human_bytes(plan.flash_bytes)),
        "  %-34s %11s  %.1fx the tvswitch total; %.1fx the task data alone (inspect's ratio)" % (
            "one FP16 checkpoint per task", human_bytes(plan.fp16_checkpoints_bytes), plan.flash_saving,
            plan.task_data_saving),
    ]
    if f.weight_itemsize != 2:
        lines.append("  %-34s %11s  (the base at %g bytes a weight, as given here)"
                     % ("tvswitch total as shipped", human_bytes(plan.shipped_bytes), f.weight_itemsize))
        lines.append("  %-34s %11s  %.1fx the total as shipped" % (
            "one FP32 checkpoint per task", human_bytes(plan.fp32_checkpoints_bytes),
            plan.fp32_checkpoints_bytes / float(plan.shipped_bytes)))
    lines += [
        "",
        "switch floor: read base + packed vectors, write weights (docs/architecture.md)",
        "  %-34s %11s  %7.2f ms" % ("one task", human_bytes(plan.switch_one_bytes), plan.switch_one_ms),
        "  %-34s %11s  %7.2f ms" % ("mix of all %d tasks" % f.tasks, human_bytes(plan.switch_mix_bytes),
                                    plan.switch_mix_ms),
    ]
    if plan.assumptions:
        lines.append("")
        lines += ["assumed: " + a for a in plan.assumptions]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    what_if = (args.params, args.tasks, args.bits)
    if args.bundle and any(v is not None for v in what_if + (args.base_bits,)):
        raise TvswitchError("give a bundle or --params/--tasks/--bits/--base-bits, not both")
    if not args.bundle and not all(v is not None for v in what_if):
        raise TvswitchError("give a bundle file, or all of --params, --tasks and --bits")
    try:
        if args.model and not args.bundle:
            raise TvswitchError("--model counts a bundle's graph: give the bundle too")
        facts = facts_from_bundle(args.bundle, args.model) if args.bundle else _what_if(args)
        device, available, counted, source = _device(args)
        p = _plan.make_plan(facts, device, args.engine, _mib("--workspace-mb", args.workspace_mb),
                            _mib("--reserve-mb", args.reserve_mb), available, counted or "MemAvailable now")
    except JetsonInputError as exc:
        raise TvswitchError(str(exc)) from None
    if args.json:
        print(json.dumps(dict(p.to_dict(), source=source), indent=2, default=str))
    else:
        print(format_text(p, args.bundle or "a what-if bundle", source))
    return 0
