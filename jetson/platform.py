"""One report of what this machine is: board, SoC, software stack, memory, power.

Every field says where it came from or why it is missing, because ``tvswitch doctor``
is read by someone whose deployment just failed. On a machine with neither an L4T
release stamp nor a Tegra SoC in its device tree the report says plainly that this is
not a Jetson, and still reports memory and Python, which ``plan --device this`` needs.
"""
from __future__ import annotations

import os
import platform as _platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from tvswitch.jetson import devicetree, memory, packages, power, release
from tvswitch.jetson.devices import DEVICES, DeviceSpec, JETPACK_LINES, match_board
from tvswitch.jetson.errors import JetsonInputError


@dataclass
class PlatformReport:
    root: str
    is_jetson: bool
    summary: str
    machine: str = ""
    model: str = ""
    soc: str = ""
    parts: List[str] = field(default_factory=list)
    compute_capability: Optional[Tuple[int, int]] = None
    device_key: Optional[str] = None
    l4t: Optional[str] = None
    jetpack: Optional[str] = None
    jetpack_source: str = ""
    jetpack_line: Optional[str] = None
    versions: Dict[str, str] = field(default_factory=dict)
    python_running: Optional[str] = None
    memory: Optional[memory.MemoryInfo] = None
    power_mode: Optional[power.PowerMode] = None
    clocks: Optional[power.Clocks] = None
    notes: List[str] = field(default_factory=list)

    @property
    def python_system(self) -> Optional[str]:
        """The distribution's python3 (what JetPack's TensorRT bindings are built for)."""
        return self.versions.get("python3")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["python_system"] = self.python_system
        if self.clocks is not None:
            d["clocks"]["at_max"] = self.clocks.at_max
        if self.memory is not None:
            d["memory"]["usable_bytes"] = self.memory.usable_bytes
        return d


def is_live_root(root: str) -> bool:
    """True when ``root`` is this machine's own ``/``, not a captured tree of another board."""
    return os.path.abspath(root) == "/"


def _guess_machine(root: str, is_jetson: bool) -> str:
    if is_live_root(root):
        return _platform.machine()
    return "aarch64" if is_jetson else ""


def detect(root: str = "/", run_commands: Optional[bool] = None) -> PlatformReport:
    """Read everything under ``root``; ``run_commands`` (default: only when root is /)
    lets it ask ``nvpmodel -q`` when nvpmodel's status file is missing.

    A ``root`` that is not a folder raises: every reader would find nothing there and
    the report would call a typo "not a Jetson".
    """
    if not os.path.isdir(root):
        raise JetsonInputError("%s: no such folder (the root to read platform files under)" % root)
    live = is_live_root(root)
    if run_commands is None:
        run_commands = live
    rel = release.read_release(root)
    tree = devicetree.read_device_tree(root)
    soc = tree.soc if tree else ""
    is_jetson = rel is not None or soc.startswith("tegra")
    versions = packages.read_versions(root)
    mem = memory.read_memory(root)
    report = PlatformReport(root=root, is_jetson=is_jetson, summary="", machine=_guess_machine(root, is_jetson))
    report.versions = versions
    report.memory = mem
    if live:
        report.python_running = "%d.%d.%d" % sys.version_info[:3]
    if tree is not None:
        report.model = tree.model
        report.soc = soc
        report.parts = tree.parts
        report.compute_capability = tree.compute_capability
    if not is_jetson:
        what = report.machine or ("this machine" if live else "the tree under %s" % root)
        report.summary = "not a Jetson (%s): no %s and no Tegra SoC in %s" % (
            what, release.RELEASE_FILE, devicetree.COMPATIBLE_FILE)
        return report
    spec = match_board(report.parts, soc, mem.total_bytes if mem else None)
    if spec is not None:
        report.device_key = spec.key
    else:
        report.notes.append("board %r (%s) is not in tvswitch's device table" % (report.model, soc or "unknown SoC"))
    _read_line(report, rel, spec)
    report.power_mode = power.read_power_mode(root, run_query=run_commands)
    report.clocks = power.read_clocks(root)
    pm = report.power_mode
    if pm is not None and report.device_key and "SUPER" in pm.name.upper():
        # JetPack 6.2's MAXN_SUPER raises the memory clock: a different bandwidth row
        if report.device_key + "-super" in DEVICES:
            report.device_key += "-super"
    fastest = power.fastest_mode(pm.modes) if pm is not None else None
    if pm is not None and fastest is not None and pm.id != fastest:
        report.notes.append(
            "power mode %s is not the board's fastest (%s, `sudo nvpmodel -m %d`): switch and inference "
            "times measured now are slower than the plan's" % (pm.name, pm.modes[fastest], fastest))
    report.summary = "%s, %s, L4T %s (JetPack %s), compute capability %s" % (
        report.model or "unknown board",
        soc or "unknown SoC",
        report.l4t or "?",
        report.jetpack or "?",
        "%d.%d" % report.compute_capability if report.compute_capability else "?",
    )
    return report


def _read_line(report: PlatformReport, rel: Optional[release.L4TRelease], spec: Optional[DeviceSpec]) -> None:
    """L4T, JetPack and the JetPack line, with a note for each fact that is missing or off.

    Without a release stamp the line is the board's last one, said to be a guess. The
    stack of the line is compared with the dpkg database, so a board whose CUDA, cuDNN
    or TensorRT was changed by hand says so.
    """
    if rel is None:
        report.notes.append("%s is missing: L4T and JetPack unknown" % release.RELEASE_FILE)
        if spec is not None:
            report.jetpack_line = spec.jetpack
            report.notes.append("JetPack line taken as %s, the last this board runs (a guess)" % spec.jetpack)
    else:
        report.l4t = rel.version
        report.jetpack, report.jetpack_source = release.jetpack_for(rel, report.versions.get("jetpack"))
        if rel.line is None:
            report.notes.append("L4T %s is in none of the JetPack lines tvswitch describes (%s)" % (
                rel.version, ", ".join("%s: L4T %s+" % (n, line.l4t_name) for n, line in JETPACK_LINES.items())))
        else:
            report.jetpack_line = rel.line.name
    line = JETPACK_LINES.get(report.jetpack_line or "")
    if line is None:
        return
    for component, expected in (("cuda", line.cuda), ("cudnn", line.cudnn), ("tensorrt", line.tensorrt)):
        have = report.versions.get(component)
        if have is None:
            report.notes.append("%s not found in the dpkg database (JetPack %s ships %s)" % (component, line.name, expected))
        elif not have.startswith(expected):
            report.notes.append("%s %s differs from JetPack %s's %s" % (component, have, line.name, expected))


def this_device(report: PlatformReport, bandwidth_gbs: float, matched: Optional[DeviceSpec] = None) -> DeviceSpec:
    """``--device this``: the machine as measured, not as the data sheet says.

    ``bandwidth_gbs`` is the copy bandwidth measured in this run (``bandwidth.measure``),
    so switch times for ``this`` compare with switch times measured here.
    """
    total = report.memory.total_bytes if report.memory else 0
    name = report.model or ("this machine (%s)" % (report.machine or "unknown"))
    return DeviceSpec(
        key="this",
        name=name,
        soc=report.soc or report.machine,
        compute_capability=report.compute_capability or (matched.compute_capability if matched else (0, 0)),
        dram_bytes=total,
        bandwidth_gbs=bandwidth_gbs,
        jetpack=report.jetpack_line or "",
        measured=True,
    )
