"""``tvswitch doctor``: what this machine can run, and the fastest switch path among it.

The ranking follows DESIGN.md sections 3-7: rebuilding on the GPU beats the CPU (the
floor is memory bandwidth, and the CPU path also pays a copy), TensorRT refit from a
device buffer beats a refit from host memory, and ONNX Runtime with weights bound as
inputs needs no refit at all. ``fastest_path`` is a pure function of the probes, so
each Jetson line's answer is tested without the hardware.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

from tvswitch.jetson import probes as _probes
from tvswitch.jetson.platform import PlatformReport, detect

#: the oldest Python the device-side code (runtime/, kernels/, jetson/) supports
MIN_PYTHON = (3, 8)


@dataclass
class Path:
    name: str
    rebuild: str
    engine: str
    why: str


@dataclass
class DoctorReport:
    platform: PlatformReport
    probes: List[_probes.Probe]
    fastest: Optional[Path]
    python_ok: bool
    advice: List[str] = field(default_factory=list)

    def probe(self, name: str) -> Optional[_probes.Probe]:
        return next((p for p in self.probes if p.name == name), None)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "platform": self.platform.to_dict(),
            "python": {"running": "%d.%d.%d" % sys.version_info[:3], "minimum": "%d.%d" % MIN_PYTHON,
                       "ok": self.python_ok},
            "probes": [asdict(p) for p in self.probes],
            "fastest": asdict(self.fastest) if self.fastest else None,
            "advice": self.advice,
        }


def _ok(probes: Dict[str, _probes.Probe], name: str) -> bool:
    p = probes.get(name)
    return bool(p and p.ok)


def fastest_path(probe_list: Iterable[_probes.Probe]) -> Optional[Path]:
    """The fastest working (rebuild, engine) pair, or None when nothing can serve."""
    probes = {p.name: p for p in probe_list}
    gpu = _ok(probes, "cuda-driver") or _ok(probes, "pycuda")
    cuda_rebuild = _ok(probes, "cuda-driver") and _ok(probes, "nvrtc")
    trt = probes.get("tensorrt")
    cpu = "tvswitch CPU library (C, OpenMP)" if _ok(probes, "cpu-rebuild") else "numpy reference (slow: build the CPU library)"
    if trt is not None and trt.ok and gpu:
        if trt.data.get("device_refit") and cuda_rebuild:
            return Path("tensorrt-device-refit", "CUDA kernel via cuda.bindings + NVRTC, into a device buffer",
                        "TensorRT %s, refit from device memory" % trt.version,
                        "no host copy: the kernel writes the buffer TensorRT refits from (DESIGN.md s. 7)")
        rebuild = "CUDA kernel (cuda.bindings + NVRTC)" if cuda_rebuild else (
            "CUDA kernel from a prebuilt fatbin via pycuda" if _ok(probes, "pycuda") else cpu)
        return Path("tensorrt-host-refit", rebuild, "TensorRT %s, refit from host memory" % trt.version,
                    "TensorRT before 10 refits only from host memory: one copy per switch")
    if _ok(probes, "onnxruntime:CUDAExecutionProvider") and cuda_rebuild:
        return Path("onnxruntime-cuda", "CUDA kernel via cuda.bindings + NVRTC, into the bound buffers",
                    "ONNX Runtime, CUDA provider, weights bound by IOBinding",
                    "weights are inputs: a rebuild is the only work a switch does")
    if _ok(probes, "onnxruntime:CPUExecutionProvider"):
        return Path("onnxruntime-cpu", cpu, "ONNX Runtime, CPU provider, weights bound by IOBinding",
                    "no usable GPU engine here" + ("" if gpu else " and no usable GPU"))
    return None


def advice(report: PlatformReport, probe_list: List[_probes.Probe], python_ok: bool) -> List[str]:
    """The next thing to try, in the user's terms."""
    probes = {p.name: p for p in probe_list}
    out = []  # type: List[str]
    if not python_ok:
        out.append("tvswitch needs Python >= %d.%d; JetPack 4 ships 3.6: install python3.8 from Ubuntu 18.04's "
                   "archive (apt install python3.8 python3.8-venv python3.8-dev) or use docker/jetson-jp46.Dockerfile"
                   % MIN_PYTHON)
    if report.is_jetson and report.jetpack_line == "4.6":
        out.append("JetPack 4.6: TensorRT 8.2's Python bindings exist for Python 3.6 only, and tvswitch needs 3.8; "
                   "serve with ONNX Runtime (CPU) and the CPU rebuild, see docs/jetson.md")
    if report.is_jetson and not _ok(probes, "tensorrt") and report.versions.get("tensorrt"):
        out.append("TensorRT %s is installed: create the venv with --system-site-packages so it is importable"
                   % report.versions["tensorrt"])
    onnx = probes.get("onnxruntime")
    if onnx is not None and onnx.ok and "CUDAExecutionProvider" not in onnx.data.get("providers", []) and report.is_jetson:
        out.append("PyPI's onnxruntime has no Jetson GPU build: install the Jetson Zoo onnxruntime-gpu wheel for JetPack %s"
                   % (report.jetpack or "?"))
    return out


def run_doctor(
    root: str = "/",
    extra_probes: Iterable[Callable[[], _probes.Probe]] = (),
    probe_fns: Optional[List[Callable[[], Any]]] = None,
) -> DoctorReport:
    """Detect the platform under ``root``, run every probe, rank the paths.

    The probes always run against this interpreter and this machine's libraries; ``root``
    only changes where platform facts are read from (tests pass a fixture).
    """
    report = detect(root)
    found = []  # type: List[_probes.Probe]
    fns = list(probe_fns) if probe_fns is not None else list(_probes.ALL_PROBES)
    for fn in fns:
        result = fn()
        found.extend(result if isinstance(result, list) else [result])
    found.append(_probes.probe_tensorrt(report.python_system, report.versions.get("tensorrt")))
    for fn in extra_probes:
        found.append(fn())
    python_ok = sys.version_info[:2] >= MIN_PYTHON
    return DoctorReport(report, found, fastest_path(found), python_ok, advice(report, found, python_ok))


def format_text(r: DoctorReport) -> str:
    """The report for a terminal: one line per probe, the reason on failures."""
    p = r.platform
    lines = ["platform  " + p.summary]
    if p.is_jetson:
        v = p.versions
        lines.append("stack     CUDA %s, cuDNN %s, TensorRT %s, system Python %s" % (
            v.get("cuda", "?"), v.get("cudnn", "?"), v.get("tensorrt", "?"), v.get("python3", "?")))
        if p.power_mode:
            lines.append("power     %s (id %d, from %s)" % (p.power_mode.name, p.power_mode.id, p.power_mode.source))
    if p.memory:
        m = p.memory
        extra = ", NvMap holds %.0f MiB" % (m.nvmap_used_bytes / 2 ** 20) if m.nvmap_used_bytes is not None else ""
        lines.append("memory    %.2f GiB total, %.2f GiB available%s" % (m.total_bytes / 2 ** 30, m.available_bytes / 2 ** 30, extra))
    lines.append("python    %d.%d.%d (%s; minimum %d.%d)" % (sys.version_info[:3] + ("ok" if r.python_ok else "TOO OLD",) + MIN_PYTHON))
    for note in p.notes:
        lines.append("note      " + note)
    lines.append("")
    width = max(len(x.name) for x in r.probes) if r.probes else 10
    for x in r.probes:
        mark = "ok " if x.ok else "no "
        text = " ".join(t for t in (x.version, x.detail) if t) if x.ok else x.reason
        lines.append("[%s] %-*s  %s" % (mark, width, x.name, text))
    lines.append("")
    if r.fastest:
        lines.append("fastest path: %s" % r.fastest.name)
        lines.append("  rebuild: %s" % r.fastest.rebuild)
        lines.append("  engine:  %s" % r.fastest.engine)
        lines.append("  why:     %s" % r.fastest.why)
    else:
        lines.append("fastest path: none: no engine can serve here (pip install 'tvswitch[onnx]')")
    for a in r.advice:
        lines.append("advice: " + a)
    return "\n".join(lines)
