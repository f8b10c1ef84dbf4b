"""The one table of devices and JetPack lines that the rest of tvswitch consults.

Facts come from NVIDIA's module data sheets and the JetPack
archive: compute capability, DRAM and its peak bandwidth, the last JetPack each module
runs, and per JetPack line the software stack and which of tvswitch's paths it allows
(the support matrix). ``plan`` turns a device row into memory and switch-time figures,
``platform`` matches a detected board to a row and its L4T release to a line, ``doctor``
reads a line's support when it describes a captured tree, and docs/jetson.md prints
both tables (tests/jetson/test_docs_tables.py fails when the docs and this file differ).

Peak bandwidth is the data-sheet figure (bus width x transfer rate). A copy reaches
perhaps 60-80 % of it in practice, so times computed from it are floors, never promises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from tvswitch.jetson.errors import JetsonInputError

GIB = 1 << 30


@dataclass(frozen=True)
class KernelInstall:
    """What to install for the CUDA kernels' Python route: the driver API, then NVRTC.

    One row per JetPack line and one for x86 (``X86_INSTALL``); kernels/ and runtime/,
    which cannot import this leaf, say the same in shorter words. The ``cuda`` and
    ``nvrtc12`` extras pick their packages by Python version (pyproject.toml), so the same
    extra is right on JetPack 5's Python 3.8 and on JetPack 6's 3.10.
    """

    driver: str
    nvrtc: str


@dataclass(frozen=True)
class JetPackLine:
    """One JetPack release line: the software a device on it has and cannot change.

    A line covers the L4T releases from ``l4t`` (major, minor) up to the next line of the
    same major; within it CUDA, cuDNN and TensorRT do not change (JetPack 6.1 and 6.2 are
    both L4T R36.4 with TensorRT 10.3, so they are one line, named after the later).

    ``reserve_bytes`` is an assumption, not a measurement: what carve-outs, a headless
    L4T, the CUDA context and the engine's libraries take before tvswitch allocates
    anything. ``tvswitch plan --reserve-mb`` replaces it with a figure measured on the
    user's own image.

    The last five fields are the support matrix: ``cuda_python`` names the pip package
    that gives Python the driver API ("" where none exists: JetPack 4 has pycuda and
    prebuilt fatbins only), ``nvrtc`` the NVRTC version Python can compile with ("" for
    none), ``trt_python`` whether TensorRT's bindings import in the Python tvswitch runs
    on, ``ort_cuda`` whether an ONNX Runtime CUDA build exists for that Python, and
    ``install`` what to install for the driver API and for NVRTC on that line (what
    doctor advises; docs/jetson.md prints it).
    """

    name: str
    l4t: Tuple[int, int]
    ubuntu: str
    python: Tuple[int, int]
    cuda: str
    cudnn: str
    tensorrt: str
    reserve_bytes: int
    cuda_python: str
    nvrtc: str
    trt_python: bool
    ort_cuda: bool
    install: KernelInstall

    @property
    def l4t_name(self) -> str:
        return "R%d.%d" % self.l4t

    @property
    def device_refit(self) -> bool:
        """TensorRT refits from device memory from 10.0 on (TensorLocation.DEVICE)."""
        return int(self.tensorrt.split(".")[0]) >= 10


_PIP_CUDA12 = KernelInstall("pip install 'tvswitch[cuda]' (cuda-bindings 12)", "pip install 'tvswitch[nvrtc12]'")

#: x86 with an NVIDIA driver of CUDA 12 or later
X86_INSTALL = KernelInstall(
    "pip install 'tvswitch[cuda]' (cuda-bindings 12 on Python 3.9+; Python 3.8 gets cuda-python 11.8)",
    "pip install 'tvswitch[nvrtc12]' (Python 3.9+; cuda-python 11.8 on 3.8 loads NVRTC 11 only: "
    "pip install nvidia-cuda-nvrtc-cu11 and put its lib folder on LD_LIBRARY_PATH)")

JETPACK_LINES: Dict[str, JetPackLine] = {
    line.name: line
    for line in [
        JetPackLine("4.6", (32, 7), "18.04", (3, 6), "10.2", "8.2", "8.2", GIB,
                    cuda_python="", nvrtc="", trt_python=False, ort_cuda=False,
                    install=KernelInstall(
                        "no cuda-python for CUDA 10.2: pip install pycuda (CUDA 10.2's nvcc on PATH)",
                        "no NVRTC from Python: prebuilt fatbins (python -m tvswitch.kernels.build_fatbins "
                        "--compiler nvcc --arch sm_53,sm_62)")),
        # NVRTC 12's cubins need a CUDA 12 driver and JetPack 5's is 11.4, so NVRTC is
        # JetPack's own, the CUDA 11 soname (libnvrtc.so.11.2) cuda-python 11.8 loads.
        JetPackLine("5.1", (35, 2), "20.04", (3, 8), "11.4", "8.6", "8.5", GIB + GIB // 4,
                    cuda_python="cuda-python 11.8", nvrtc="11.4", trt_python=True, ort_cuda=True,
                    install=KernelInstall(
                        "pip install 'tvswitch[cuda]' under the system Python 3.8 (cuda-python 11.8)",
                        "JetPack's NVRTC 11.4 (apt install cuda-nvrtc-11-4), not the nvrtc12 extra: "
                        "NVRTC 12's code needs a CUDA 12 driver")),
        JetPackLine("6.0", (36, 2), "22.04", (3, 10), "12.2", "8.9", "8.6", GIB + GIB // 2,
                    cuda_python="cuda-bindings 12", nvrtc="12", trt_python=True, ort_cuda=True, install=_PIP_CUDA12),
        JetPackLine("6.2", (36, 4), "22.04", (3, 10), "12.6", "9.3", "10.3", GIB + GIB // 2,
                    cuda_python="cuda-bindings 12", nvrtc="12", trt_python=True, ort_cuda=True, install=_PIP_CUDA12),
    ]
}


def kernel_install(line: Optional[JetPackLine], is_jetson: bool) -> KernelInstall:
    """The install advice for the CUDA kernels where ``line`` runs (x86 off Jetson).

    A Jetson on a release no line covers gets the matrix to read, not another line's
    packages: a wrong CUDA binding fails later and less clearly than no advice.
    """
    if line is not None:
        return line.install
    if not is_jetson:
        return X86_INSTALL
    see = "see the support matrix in docs/jetson.md for this L4T release"
    return KernelInstall(see, see)


def line_for_l4t(major: int, minor: int) -> Optional[JetPackLine]:
    """The line an L4T release belongs to: the newest of its major that starts at or before it.

    None for a release older than every line of its major (L4T R32.6 is JetPack 4.6.0,
    with TensorRT 8.0, not the R32.7 stack the 4.6 line describes) or of another major.
    """
    candidates = [line for line in JETPACK_LINES.values() if line.l4t[0] == major and line.l4t[1] <= minor]
    return max(candidates, key=lambda line: line.l4t) if candidates else None


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
    #: what a user planning for this row should know (``plan`` prints it)
    note: str = ""
    #: True only for ``this``: the figures were measured, not taken from a data sheet
    measured: bool = False

    @property
    def line(self) -> Optional[JetPackLine]:
        return JETPACK_LINES.get(self.jetpack)


def _d(
    key: str, name: str, soc: str, cc: Tuple[int, int], dram_gib: float, bw: float, jp: str,
    parts: Tuple[str, ...] = (), note: str = "",
) -> DeviceSpec:
    return DeviceSpec(key, name, soc, cc, int(dram_gib * GIB), bw, jp, tuple(parts), note)


# Part numbers: the module's board id and SKU as the device tree names them. Not listed,
# so that the memory fallback of ``match_board`` decides: p2972-0000 (the AGX Xavier
# developer kit as a whole, sold with the 16 GB and later the 32 GB module) and
# p2888-0006 (AGX Xavier 8GB, whose data-sheet bandwidth tvswitch has not checked).
DEVICES: Dict[str, DeviceSpec] = {
    d.key: d
    for d in [
        _d("nano-2gb", "Jetson Nano 2GB", "tegra210", (5, 3), 2, 25.6, "4.6", ("p3448-0003",)),
        _d("nano-4gb", "Jetson Nano 4GB", "tegra210", (5, 3), 4, 25.6, "4.6", ("p3448-0000", "p3448-0002")),
        _d("tx2-nx", "Jetson TX2 NX", "tegra186", (6, 2), 4, 51.2, "4.6", ("p3636-0001",)),
        _d("tx2-4gb", "Jetson TX2 4GB", "tegra186", (6, 2), 4, 51.2, "4.6", ("p3489-0888",)),
        # p3489-0000 is the TX2i (8 GB, ECC): its bandwidth is taken as the TX2's, unchecked
        _d("tx2", "Jetson TX2 8GB", "tegra186", (6, 2), 8, 59.7, "4.6", ("p3310-1000", "p3489-0000")),
        _d("xavier-nx-8gb", "Jetson Xavier NX 8GB", "tegra194", (7, 2), 8, 59.7, "5.1", ("p3668-0000", "p3668-0001")),
        _d("xavier-nx-16gb", "Jetson Xavier NX 16GB", "tegra194", (7, 2), 16, 59.7, "5.1", ("p3668-0003",)),
        _d("agx-xavier-16gb", "Jetson AGX Xavier 16GB", "tegra194", (7, 2), 16, 136.5, "5.1", ("p2888-0001",)),
        # p2888-0008 is AGX Xavier Industrial (32 GB)
        _d("agx-xavier-32gb", "Jetson AGX Xavier 32GB", "tegra194", (7, 2), 32, 136.5, "5.1",
           ("p2888-0003", "p2888-0004", "p2888-0008")),
        _d("agx-xavier-64gb", "Jetson AGX Xavier 64GB", "tegra194", (7, 2), 64, 136.5, "5.1", ("p2888-0005",)),
        _d("orin-nano-4gb", "Jetson Orin Nano 4GB", "tegra234", (8, 7), 4, 34.0, "6.2", ("p3767-0004",),
           "51 GB/s in JetPack 6.2's MAXN_SUPER mode: see orin-nano-4gb-super"),
        # 64-bit LPDDR5 at 6400 MT/s in MAXN_SUPER (4266 MT/s before): NVIDIA's Super figure, 51 GB/s
        _d("orin-nano-4gb-super", "Jetson Orin Nano 4GB (MAXN_SUPER)", "tegra234", (8, 7), 4, 51.0, "6.2",
           note="the same module with JetPack 6.2's faster memory clock"),
        _d("orin-nano-8gb", "Jetson Orin Nano 8GB", "tegra234", (8, 7), 8, 68.0, "6.2", ("p3767-0003", "p3767-0005"),
           "102 GB/s in JetPack 6.2's MAXN_SUPER mode: see orin-nano-8gb-super"),
        _d("orin-nano-8gb-super", "Jetson Orin Nano 8GB (MAXN_SUPER)", "tegra234", (8, 7), 8, 102.0, "6.2",
           note="the same module with JetPack 6.2's faster memory clock"),
        _d("orin-nx-8gb", "Jetson Orin NX 8GB", "tegra234", (8, 7), 8, 102.4, "6.2", ("p3767-0001",)),
        _d("orin-nx-16gb", "Jetson Orin NX 16GB", "tegra234", (8, 7), 16, 102.4, "6.2", ("p3767-0000",)),
        # p3701-0000 is the first AGX Orin developer kit's module: 32 GB with the 64GB's GPU
        _d("agx-orin-32gb", "Jetson AGX Orin 32GB", "tegra234", (8, 7), 32, 204.8, "6.2", ("p3701-0000", "p3701-0004")),
        _d("agx-orin-64gb", "Jetson AGX Orin 64GB", "tegra234", (8, 7), 64, 204.8, "6.2", ("p3701-0005",)),
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
        raise JetsonInputError(
            "unknown device %r; known: %s" % (key, ", ".join(device_keys()))
        ) from None


def match_board(parts: List[str], soc: str, mem_total_bytes: Optional[int]) -> Optional[DeviceSpec]:
    """The table row of a detected board: by module part number, else by SoC and memory.

    The part number is exact; the fallback picks the row of this SoC whose DRAM is the
    smallest that still holds what /proc/meminfo reports (carve-outs make MemTotal a few
    hundred MB smaller than the DRAM on the data sheet), and only when one row is that
    size: a 16 GB Xavier is an NX (59.7 GB/s) or an AGX (136.5 GB/s), and guessing would
    put the wrong bandwidth in every plan.
    """
    for spec in DEVICES.values():
        if any(p in spec.parts for p in parts):
            return spec
    if mem_total_bytes is None:
        return None
    fitting = [s for s in DEVICES.values() if s.soc == soc and s.dram_bytes >= mem_total_bytes and s.parts]
    if not fitting:
        return None
    smallest = min(s.dram_bytes for s in fitting)
    rows = [s for s in fitting if s.dram_bytes == smallest]
    return rows[0] if len(rows) == 1 else None
