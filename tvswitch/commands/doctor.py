"""``tvswitch doctor``: what this machine can run, engine by engine, and the fastest path.

A thin layer over ``tvswitch.jetson.doctor``: it makes the one probe the leaf package may
not make itself (whether tvswitch's own CPU rebuild library loads), prints the report,
and turns the leaf's ``JetsonInputError`` (a ``--root`` that is not a folder) into the
CLI's one-line error.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Sequence

from tvswitch.commands._common import human_bytes
from tvswitch.errors import TvswitchError
from tvswitch.jetson import doctor
from tvswitch.jetson.devices import JETPACK_LINES
from tvswitch.jetson.errors import JetsonInputError
from tvswitch.jetson.memory import MemoryInfo
from tvswitch.jetson.power import Clocks
from tvswitch.jetson.probes import Probe

NAME = "doctor"
HELP = "say what this machine can run (engines, CUDA bindings, GPU) and the fastest switch path"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--root", default="/", help="describe the board whose files are under this folder (a "
                        "captured Jetson tree) from its JetPack line's support matrix; nothing is probed")


def probe_cpu_rebuild() -> Probe:
    """Whether tvswitch's C rebuild library loads here (``doctor.CPU_REBUILD``)."""
    try:
        from tvswitch.kernels import cpu
    except Exception as exc:  # noqa: BLE001 - report, never crash, in doctor
        return Probe(doctor.CPU_REBUILD, False, reason="tvswitch.kernels.cpu not importable: %s" % exc)
    if cpu.available():
        return Probe(doctor.CPU_REBUILD, True, detail="tvswitch's C rebuild library loads (%s path)" % cpu.path(),
                     data={"path": cpu.path()})
    return Probe(doctor.CPU_REBUILD, False, reason=cpu.unavailable_reason() or "unavailable")


def _python_line(r: doctor.DoctorReport) -> str:
    verdict = "ok" if r.python_ok else "TOO OLD"
    if r.probes_ran:
        return "python    %d.%d.%d (%s; minimum %d.%d)" % (sys.version_info[:3] + (verdict,) + doctor.MIN_PYTHON)
    if r.python is None:
        return "python    the tree names no system Python"
    return "python    the board's system Python %d.%d (%s; minimum %d.%d)" % (r.python + (verdict,) + doctor.MIN_PYTHON)


def _mhz(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    return "%g MHz" % lo if lo == hi else "%g-%g MHz" % (lo, hi)


def _clocks_text(c: Clocks) -> str:
    """CPU and GPU clocks against the power mode's caps, and whether all sit at them.

    A switch or an inference timed below the caps is slower than the board can run, so
    the verdict names the fix (jetson_clocks pins every clock at its cap).
    """
    parts = []
    if c.cpu_cur_khz:
        parts.append("CPU %d cores at %s (caps %s)" % (len(c.cpu_cur_khz), _mhz([k / 1e3 for k in c.cpu_cur_khz]),
                                                       _mhz([k / 1e3 for k in c.cpu_max_khz])))
    if c.gpu_cur_hz is not None:
        cap = " (cap %s)" % _mhz([c.gpu_max_hz / 1e6]) if c.gpu_max_hz is not None else ""
        parts.append("GPU at %s%s" % (_mhz([c.gpu_cur_hz / 1e6]), cap))
    verdict = {True: "at the power mode's max",
               False: "below the power mode's max: `sudo jetson_clocks` pins them there before timing",
               None: "whether at the power mode's max is unknown (a clock or cap was not readable)"}[c.at_max]
    return "%s: %s" % (", ".join(parts), verdict)


def _memory_text(m: MemoryInfo) -> str:
    """Total, what a deployment can still allocate (and from what), free, and NvMap's share."""
    text = "%s total, %s usable" % (human_bytes(m.total_bytes), human_bytes(m.usable_bytes))
    if m.nvmap_free_bytes is not None:
        text += " (MemAvailable %s + NvMap's unused page pool %s)" % (
            human_bytes(m.available_bytes), human_bytes(m.nvmap_free_bytes))
    else:
        text += " (MemAvailable)"
    text += ", %s free" % human_bytes(m.free_bytes)
    if m.nvmap_used_bytes is not None:
        text += ", NvMap holds %s" % human_bytes(m.nvmap_used_bytes)
    return text


def _platform_lines(r: doctor.DoctorReport) -> List[str]:
    p = r.platform
    lines = ["platform  " + p.summary]
    if p.is_jetson:
        v = p.versions
        lines.append("stack     CUDA %s, cuDNN %s, TensorRT %s, system Python %s" % (
            v.get("cuda", "?"), v.get("cudnn", "?"), v.get("tensorrt", "?"), v.get("python3", "?")))
        line = JETPACK_LINES.get(p.jetpack_line or "")
        if line is not None:
            lines.append("line      JetPack %s (L4T %s+, Ubuntu %s): CUDA %s, cuDNN %s, TensorRT %s, Python %d.%d" % (
                (line.name, line.l4t_name, line.ubuntu, line.cuda, line.cudnn, line.tensorrt) + line.python))
        if p.power_mode:
            lines.append("power     %s (id %d, from %s)" % (p.power_mode.name, p.power_mode.id, p.power_mode.source))
        if p.clocks is not None and (p.clocks.cpu_cur_khz or p.clocks.gpu_cur_hz is not None):
            lines.append("clocks    " + _clocks_text(p.clocks))
    if p.memory:
        lines.append("memory    " + _memory_text(p.memory))
    lines.append(_python_line(r))
    lines += ["note      " + note for note in p.notes]
    return lines


def format_text(r: doctor.DoctorReport) -> str:
    """The report for a terminal: one line per probe, the reason on failures."""
    lines = _platform_lines(r) + [""]
    if not r.probes_ran:
        lines.append("host probes not run: %s is a captured tree, and this machine's libraries say nothing about "
                     "that board; %s" % (r.platform.root, "what its JetPack line supports:" if r.probes
                                         else "no JetPack line of tvswitch's support matrix matches it"))
    width = max(len(x.name) for x in r.probes) if r.probes else 10
    for x in r.probes:
        text = " ".join(t for t in (x.version, x.detail) if t) if x.ok else x.reason
        lines.append("[%s] %-*s  %s" % ("ok " if x.ok else "no ", width, x.name, text))
    lines.append("")
    if r.fastest:
        lines.append("fastest path%s: %s" % ("" if r.probes_ran else " on that board", r.fastest.name))
        lines.append("  rebuild: %s" % r.fastest.rebuild)
        lines.append("  engine:  %s" % r.fastest.engine)
        lines.append("  why:     %s" % r.fastest.why)
    elif r.probes_ran:
        lines.append("fastest path: none: no engine can serve here (pip install 'tvswitch[onnx]')")
    else:
        lines.append("fastest path: unknown without a JetPack line; run tvswitch doctor on the board itself")
    lines += ["advice: " + a for a in r.advice]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        report = doctor.run_doctor(args.root, cpu_rebuild=probe_cpu_rebuild)
    except JetsonInputError as exc:
        raise TvswitchError("--root %s" % exc) from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(format_text(report))
    return 0
