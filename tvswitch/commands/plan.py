"""``tvswitch plan``: memory, flash and switch-time figures of a bundle on a device.

A thin adapter: it reads the numbers off ``Bundle`` (or takes them from flags for a
bundle not exported yet) and hands them to ``tvswitch.jetson.plan``.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Iterable, Optional, Set

from tvswitch.errors import TvswitchError
from tvswitch.jetson import plan as _plan
from tvswitch.jetson.devices import device_keys, lookup

NAME = "plan"
HELP = "memory, flash and switch-time floor of a bundle on a Jetson (or this machine)"

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="a bundle file; or give --params/--tasks/--bits instead")
    parser.add_argument("--device", default="this", choices=device_keys(), metavar="DEVICE",
                        help="a row of the device table (%s) or 'this' (measured here)" % ", ".join(device_keys()))
    parser.add_argument("--engine", default="onnxruntime", choices=_plan.ENGINES)
    parser.add_argument("--workspace-mb", type=float, help="engine workspace and activations (default 256, assumed)")
    parser.add_argument("--reserve-mb", type=float, help="memory the OS and CUDA take (default: the JetPack line's)")
    parser.add_argument("--params", type=float, help="what-if: shared weights (e.g. 22.7e6)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_ITEMSIZE), help="what-if: base dtype")
    parser.add_argument("--tasks", type=int, help="what-if: number of tasks")
    parser.add_argument("--bits", type=float, help="what-if: bits per weight per task (RTVQ 8 tasks: 2.375)")
    parser.add_argument("--root", default="/", help="platform files for --device this (a captured tree)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _payload_keys(bundle: Any, tasks: Iterable[str]) -> Set[str]:
    keys = set()  # type: Set[str]
    for task in tasks:
        for entry in bundle.entries(task).values():
            for t in entry.terms:
                keys.update(k for k in (getattr(t, a, None) for a in ("codes", "params", "values", "mask")) if k)
    return keys


def facts_from_bundle(path: str) -> _plan.BundleFacts:
    from tvswitch.runtime.bundle import Bundle

    b = Bundle.open(path, verify=False)
    size = lambda keys: sum(b.payload(k).nbytes for k in keys)  # noqa: E731
    one = max(size(_payload_keys(b, [t])) for t in b.tasks) if b.tasks else 0
    return _plan.BundleFacts(
        tasks=len(b.tasks), scheme=b.scheme, num_shared_params=b.num_shared_params,
        base_nbytes=b.base_nbytes, packed_nbytes=b.packed_nbytes, file_nbytes=b.file_nbytes,
        query_nbytes=b.query_nbytes, base_in_bundle=bool(getattr(b, "has_embedded_base", False)),
        task_read_nbytes=one, mix_read_nbytes=size(_payload_keys(b, b.tasks)),
    )


def _mb(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(value * _plan.MIB)


def run(args: argparse.Namespace) -> int:
    what_if = (args.params, args.tasks, args.bits)
    if args.bundle and any(v is not None for v in what_if):
        raise TvswitchError("give a bundle or --params/--tasks/--bits, not both")
    if args.bundle:
        facts, label = facts_from_bundle(args.bundle), args.bundle
    elif all(v is not None for v in what_if):
        facts = _plan.facts_from_numbers(int(args.params), _ITEMSIZE[args.dtype], args.tasks, args.bits)
        label = "a what-if bundle"
    else:
        raise TvswitchError("give a bundle file, or all of --params, --tasks and --bits")
    available = None
    if args.device == "this":
        from tvswitch.jetson import bandwidth, platform

        report = platform.detect(args.root)
        matched = lookup(report.device_key) if report.device_key else None
        device = platform.this_device(report, bandwidth.measure_copy_gbs(), matched)
        available = report.memory.available_bytes if report.memory else None
    else:
        device = lookup(args.device)
    p = _plan.make_plan(facts, device, args.engine, _mb(args.workspace_mb), _mb(args.reserve_mb), available)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2, default=str))
    else:
        print(_plan.format_text(p, label))
    return 0
