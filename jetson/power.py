"""Power mode (nvpmodel) and clocks: why the same board switches at different speeds.

A Nano in its 5W mode runs two CPU cores and a slower GPU and EMC clock; a switch time
measured there is not the MAXN one. nvpmodel keeps its state in files, which we read
under a root folder: /etc/nvpmodel.conf names the modes (``< POWER_MODEL ID=0
NAME=MAXN >``) and /var/lib/nvpmodel/status holds the current one (``pmode:0000``).
``nvpmodel -q`` prints the same (``NV Power Mode: MAXN`` then the id); we parse that too
for images that lack the status file. Clocks come from cpufreq and devfreq in sysfs:
a power mode caps each CPU's ``scaling_max_freq`` below the silicon's
``cpuinfo_max_freq`` (a Xavier NX in MODE_20W_6CORE caps its CPUs at about 1.4 of 1.9 GHz),
and the GPU's devfreq ``max_freq`` the same way, so "at max" means at the mode's caps,
which is what ``jetson_clocks`` pins the clocks to.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from tvswitch.jetson._files import list_dir, read_int, read_text

CONF_FILE = "/etc/nvpmodel.conf"
STATUS_FILE = "/var/lib/nvpmodel/status"

_MODEL = re.compile(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)\s*>")
_DEFAULT = re.compile(r"<\s*PM_CONFIG\s+DEFAULT=(\d+)\s*>")
_PMODE = re.compile(r"pmode:(\d+)")
_QUERY = re.compile(r"NV Power Mode:\s*(\S+)\s*\n\s*(\d+)")

#: how the integrated GPU's devfreq node name ends: 57000000.gpu (Nano), 17000000.gp10b
#: (TX2), 17000000.gv11b (Xavier), 17000000.ga10b (Orin on R35), 17000000.gpu (Orin on R36)
GPU_DEVFREQ_SUFFIXES = (".gpu", ".gp10b", ".gv11b", ".ga10b")


@dataclass(frozen=True)
class PowerMode:
    id: int
    name: str
    source: str
    modes: Dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Clocks:
    """Current clocks against the power mode's caps (``scaling_max_freq``, devfreq ``max_freq``)."""

    cpu_cur_khz: List[int] = field(default_factory=list)
    cpu_max_khz: List[int] = field(default_factory=list)
    gpu_cur_hz: Optional[int] = None
    gpu_max_hz: Optional[int] = None
    gpu_node: str = ""

    @property
    def at_max(self) -> Optional[bool]:
        """Whether every clock sits at its mode's cap (what ``jetson_clocks`` does)."""
        if not self.cpu_cur_khz or self.gpu_cur_hz is None or self.gpu_max_hz is None:
            return None
        cpus = all(c >= m for c, m in zip(self.cpu_cur_khz, self.cpu_max_khz))
        return cpus and self.gpu_cur_hz >= self.gpu_max_hz


def parse_conf(text: str) -> Dict[int, str]:
    """Mode id -> name from nvpmodel.conf."""
    return {int(i): name for i, name in _MODEL.findall(text)}


def fastest_mode(modes: Dict[int, str]) -> Optional[int]:
    """The id of the MAXN mode (MAXN_SUPER first); None where no mode is named MAXN."""
    ranked = sorted((("SUPER" not in name.upper()), i) for i, name in modes.items() if "MAXN" in name.upper())
    return ranked[0][1] if ranked else None


def parse_query(text: str) -> Optional[PowerMode]:
    """``nvpmodel -q`` output (warnings may precede the two lines we want)."""
    m = _QUERY.search(text)
    if m is None:
        return None
    return PowerMode(int(m.group(2)), m.group(1), "nvpmodel -q")


def read_power_mode(root: str = "/", run_query: bool = False) -> Optional[PowerMode]:
    """The current mode from nvpmodel's files; with ``run_query`` and none found, ask nvpmodel."""
    conf = read_text(root, CONF_FILE) or ""
    modes = parse_conf(conf)
    status = read_text(root, STATUS_FILE) or ""
    m = _PMODE.search(status)
    if m is not None:
        mode_id = int(m.group(1))
        return PowerMode(mode_id, modes.get(mode_id, "mode %d" % mode_id), STATUS_FILE, modes)
    if run_query and shutil.which("nvpmodel"):
        try:
            out = subprocess.run(["nvpmodel", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 timeout=5, check=False).stdout.decode("utf-8", "replace")
        except (OSError, subprocess.SubprocessError):
            return None
        q = parse_query(out)
        if q is not None:
            return PowerMode(q.id, q.name, q.source, modes)
    d = _DEFAULT.search(conf)
    if d is not None and modes:
        mode_id = int(d.group(1))
        return PowerMode(mode_id, modes.get(mode_id, "mode %d" % mode_id), CONF_FILE + " (default; no status)", modes)
    return None


def read_clocks(root: str = "/") -> Clocks:
    """Each online CPU's clock and cap, and the GPU's, from sysfs under ``root``."""
    cpu_cur, cpu_max = [], []  # type: List[int], List[int]
    for name in list_dir(root, "/sys/devices/system/cpu"):
        if not re.match(r"cpu\d+$", name):
            continue
        base = "/sys/devices/system/cpu/%s/cpufreq/" % name
        cur, mx = read_int(root, base + "scaling_cur_freq"), read_int(root, base + "scaling_max_freq")
        if cur is not None and mx is not None:
            cpu_cur.append(cur)
            cpu_max.append(mx)
    gpu_cur = gpu_max = None
    node = ""
    for name in list_dir(root, "/sys/class/devfreq"):
        if name.endswith(GPU_DEVFREQ_SUFFIXES):
            node = name
            gpu_cur = read_int(root, "/sys/class/devfreq/%s/cur_freq" % name)
            gpu_max = read_int(root, "/sys/class/devfreq/%s/max_freq" % name)
            break
    return Clocks(cpu_cur, cpu_max, gpu_cur, gpu_max, node)
