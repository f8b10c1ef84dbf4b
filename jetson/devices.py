"""The one table of devices and JetPack lines that the rest of tvswitch consults.

Facts come from DESIGN.md section 8 and NVIDIA's module data sheets: compute capability,
DRAM and its peak bandwidth, and the last JetPack each module runs. ``plan`` turns them
into memory and switch-time figures, ``platform`` matches a detected board to a row,
and docs/jetson.md prints the same table; changing a number here changes all three.

Peak bandwidth is the data-sheet figure (bus width x transfer rate). A copy reaches
perhaps 60-80 % of it in practice, so times computed from it are floors, never promises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from tvswitch.errors import TvswitchError

GIB = 1 << 30


@dataclass(frozen=True)
class JetPackLine:
    """One JetPack release line: the software a device on it has and cannot change.

    ``reserve_bytes`` is an assumption, not a measurement: what carve-outs, a headless
    L4T, the CUDA context and the engine's libraries take before tvswitch allocates
    anything. ``tvswitch plan --reserve-mb`` replaces it with a figure measured on the
    user's own image.
    """

    name: str
    l4t: str
    ubuntu: str
    python: Tuple[int, int]
    cuda: str
    cudnn: str
    tensorrt: str
    reserve_bytes: int


JETPACK_LINES: Dict[str, JetPackLine] = {
    "4.6": JetPackLine("4.6", "R32.7", "18.04", (3, 6), "10.2", "8.2", "8.2", GIB),
    "5.1": JetPackLine("5.1", "R35", "20.04", (3, 8), "11.4", "8.6", "8.5", GIB + GIB // 4),
    "6.2": JetPackLine("6.2", "R36.4", "22.04", (3, 10), "12.6", "9.3", "10.3", GIB + GIB // 2),
}

#: The L4T major release that each JetPack line ships.
L4T_MAJOR_TO_LINE: Dict[int, str] = {32: "4.6", 35: "5.1", 36: "6.2"}


@dataclass(frozen=True)
class DeviceSpec:
    """One Jetson module (or this machine, filled in from measurements)."""

    key: str
    name: str
    soc: str
    compute_capability: Tuple[int, int]
    dram_bytes: int
    bandwidth_gbs: float
    jetpack: str
    #: device-tree module part numbers (``p3448-0000``) that identify this row
    parts: Tuple[str, ...] = ()
    note: str = ""
    #: True only for ``this``: the figures were measured, not taken from a data sheet
    measured: bool = False

    @property
    def line(self) -> Optional[JetPackLine]:
        return JETPACK_LINES.get(self.jetpack)

    @property
    def sm(self) -> str:
        return "sm_%d%d" % self.compute_capability

    @property
    def is_jetson(self) -> bool:
        return self.soc.startswith("tegra")


def _d(
    key: str, name: str, soc: str, cc: Tuple[int, int], dram_gib: float, bw: float, jp: str,
    parts: Tuple[str, ...] = (), note: str = "",
) -> DeviceSpec:
    return DeviceSpec(key, name, soc, cc, int(dram_gib * GIB), bw, jp, tuple(parts), note)


DEVICES: Dict[str, DeviceSpec] = {
    d.key: d
    for d in [
        _d("nano-2gb", "Jetson Nano 2GB", "tegra210", (5, 3), 2, 25.6, "4.6", ("p3448-0003",)),
        _d("nano-4gb", "Jetson Nano 4GB", "tegra210", (5, 3), 4, 25.6, "4.6", ("p3448-0000", "p3448-0002")),
        _d("tx2-nx", "Jetson TX2 NX", "tegra186", (6, 2), 4, 51.2, "4.6", ("p3636-0001",)),
        _d("tx2", "Jetson TX2 8GB", "tegra186", (6, 2), 8, 59.7, "4.6", ("p3310-1000", "p3489-0888", "p3489-0000")),
        _d("xavier-nx-8gb", "Jetson Xavier NX 8GB", "tegra194", (7, 2), 8, 59.7, "5.1", ("p3668-0000", "p3668-0001")),
        _d("xavier-nx-16gb", "Jetson Xavier NX 16GB", "tegra194", (7, 2), 16, 59.7, "5.1", ("p3668-0003",)),
        _d("agx-xavier-32gb", "Jetson AGX Xavier 32GB", "tegra194", (7, 2), 32, 136.5, "5.1",
           ("p2888-0001", "p2888-0004", "p2888-0003", "p2972-0000")),
        _d("agx-xavier-64gb", "Jetson AGX Xavier 64GB", "tegra194", (7, 2), 64, 136.5, "5.1", ("p2888-0005",)),
        _d("orin-nano-4gb", "Jetson Orin Nano 4GB", "tegra234", (8, 7), 4, 34.0, "6.2", ("p3767-0004",),
           "51 GB/s in JetPack 6.2's MAXN_SUPER mode"),
        _d("orin-nano-8gb", "Jetson Orin Nano 8GB", "tegra234", (8, 7), 8, 68.0, "6.2", ("p3767-0003", "p3767-0005"),
           "102 GB/s in JetPack 6.2's MAXN_SUPER mode: see orin-nano-8gb-super"),
        _d("orin-nano-8gb-super", "Jetson Orin Nano 8GB (MAXN_SUPER)", "tegra234", (8, 7), 8, 102.0, "6.2",
           note="the same module with JetPack 6.2's faster memory clock"),
        _d("orin-nx-8gb", "Jetson Orin NX 8GB", "tegra234", (8, 7), 8, 102.4, "6.2", ("p3767-0001",)),
        _d("orin-nx-16gb", "Jetson Orin NX 16GB", "tegra234", (8, 7), 16, 102.4, "6.2", ("p3767-0000",)),
        _d("agx-orin-32gb", "Jetson AGX Orin 32GB", "tegra234", (8, 7), 32, 204.8, "6.2", ("p3701-0004",)),
        _d("agx-orin-64gb", "Jetson AGX Orin 64GB", "tegra234", (8, 7), 64, 204.8, "6.2", ("p3701-0005", "p3701-0000")),
    ]
}

#: Compute capability of each Jetson SoC, as /proc/device-tree/compatible names it.
SOC_COMPUTE_CAPABILITY: Dict[str, Tuple[int, int]] = {
    "tegra210": (5, 3),
    "tegra186": (6, 2),
    "tegra194": (7, 2),
    "tegra234": (8, 7),
}


def device_keys() -> List[str]:
    """The keys ``--device`` accepts, ``this`` included."""
    return sorted(DEVICES) + ["this"]


def lookup(key: str) -> DeviceSpec:
    """The table row for ``key``; ``this`` is resolved by ``platform.this_device``."""
    try:
        return DEVICES[key]
    except KeyError:
        raise TvswitchError(
            "unknown device %r; known: %s" % (key, ", ".join(device_keys()))
        ) from None


def match_board(parts: List[str], soc: str, mem_total_bytes: Optional[int]) -> Optional[DeviceSpec]:
    """The table row of a detected board: by module part number, else by SoC and memory.

    The part number is exact; the fallback picks the row of this SoC whose DRAM is the
    smallest that still holds what /proc/meminfo reports (carve-outs make MemTotal a few
    hundred MB smaller than the DRAM on the data sheet).
    """
    for spec in DEVICES.values():
        if any(p in spec.parts for p in parts):
            return spec
    if mem_total_bytes is None:
        return None
    candidates = sorted(
        (s for s in DEVICES.values() if s.soc == soc and s.dram_bytes >= mem_total_bytes and s.parts),
        key=lambda s: s.dram_bytes,
    )
    return candidates[0] if candidates else None
