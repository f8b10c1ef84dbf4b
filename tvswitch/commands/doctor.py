"""``tvswitch doctor``: what this machine can run, engine by engine, and the fastest path.

A thin layer over ``tvswitch.jetson.doctor``; it adds the one probe the leaf package may
not make itself, whether tvswitch's own CPU rebuild library loads.
"""
from __future__ import annotations

import argparse
import json

from tvswitch.jetson import doctor
from tvswitch.jetson.probes import Probe

NAME = "doctor"
HELP = "say what this machine can run (engines, CUDA bindings, GPU) and the fastest switch path"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--root", default="/", help="read platform files under this folder (a captured Jetson tree)")


def probe_cpu_rebuild() -> Probe:
    try:
        from tvswitch.kernels import cpu
    except Exception as exc:  # noqa: BLE001 - report, never crash, in doctor
        return Probe("cpu-rebuild", False, reason="tvswitch.kernels.cpu not importable: %s" % exc)
    if cpu.available():
        return Probe("cpu-rebuild", True, detail="tvswitch's C rebuild library loads")
    return Probe("cpu-rebuild", False, reason=cpu.unavailable_reason() or "unavailable")


def run(args: argparse.Namespace) -> int:
    report = doctor.run_doctor(args.root, extra_probes=[probe_cpu_rebuild])
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(doctor.format_text(report))
    return 0
