"""``tvswitch doctor``: what a machine can run, and the fastest switch path among it.

The ranking follows docs/engines.md and docs/kernels.md: rebuilding on the GPU beats the CPU (the
floor is memory bandwidth, and the CPU path also pays a copy), TensorRT refit from a
device buffer beats a refit from host memory, and ONNX Runtime with weights bound as
inputs needs no refit at all. ``fastest_path`` is a pure function of the probes, so
each Jetson line's answer is tested without the hardware.

On this machine (root ``/``) the probes really run. A captured tree of another board
(``--root``) cannot be probed from here: this host's libraries say nothing about the
board, so the report lists what the board's JetPack line supports according to the
support matrix of ``devices.JETPACK_LINES``, says that nothing was run, and ranks those.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from tvswitch.jetson import probes as _probes
from tvswitch.jetson.devices import JETPACK_LINES, JetPackLine, kernel_install
from tvswitch.jetson.platform import PlatformReport, detect, is_live_root

#: The oldest Python the device-side code (runtime/, kernels/, jetson/, the CLI) supports;
#: pyproject.toml's requires-python says the same (tests/test_min_python.py checks).
MIN_PYTHON = (3, 8)

#: The probe of tvswitch's C rebuild library. The leaf cannot import ``tvswitch.kernels``,
#: so the caller makes it (``run_doctor``'s ``cpu_rebuild``); ``fastest_path`` ranks the
#: CPU path by it.
CPU_REBUILD = "cpu-rebuild"

ProbeFn = Callable[[], Union[_probes.Probe, List[_probes.Probe]]]


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
    #: the Python judged against MIN_PYTHON: this interpreter, or a captured board's system
    #: Python (None when the tree tells neither)
    python: Optional[Tuple[int, int]]
    python_ok: Optional[bool]
    #: False when ``probes`` come from the board's support matrix and nothing ran here
    probes_ran: bool
    advice: List[str] = field(default_factory=list)

    def probe(self, name: str) -> Optional[_probes.Probe]:
        return next((p for p in self.probes if p.name == name), None)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "platform": self.platform.to_dict(),
            "python": {"version": "%d.%d" % self.python if self.python else None, "minimum": "%d.%d" % MIN_PYTHON,
                       "ok": self.python_ok},
            "probes_ran": self.probes_ran,
            "probes": [asdict(p) for p in self.probes],
            "fastest": asdict(self.fastest) if self.fastest else None,
            "advice": self.advice,
        }


def _ok(probes: Dict[str, _probes.Probe], name: str) -> bool:
    p = probes.get(name)
    return bool(p and p.ok)


def fastest_path(probe_list: Iterable[_probes.Probe]) -> Optional[Path]:
    """The fastest working (rebuild, engine) pair, or None when nothing can serve.

    Without a working ``CPU_REBUILD`` probe the CPU path is the numpy reference.
    """
    probes = {p.name: p for p in probe_list}
    gpu = _ok(probes, "cuda-driver") or _ok(probes, "pycuda")
    cuda_rebuild = _ok(probes, "cuda-driver") and _ok(probes, "nvrtc")
    via = _kernel_route(probes) if cuda_rebuild else ""
    trt = probes.get("tensorrt")
    cpu = "tvswitch CPU library (C, OpenMP)" if _ok(probes, CPU_REBUILD) else "numpy reference (slow: build the CPU library)"
    if trt is not None and trt.ok and gpu:
        if trt.data.get("device_refit") and cuda_rebuild:
            return Path("tensorrt-device-refit", "CUDA kernel via %s, into a device buffer" % via,
                        "TensorRT %s, refit from device memory" % trt.version,
                        "no host copy: the kernel writes the buffer TensorRT refits from (docs/engines.md section 3)")
        rebuild = "CUDA kernel via %s" % via if cuda_rebuild else (
            "CUDA kernel from a prebuilt fatbin via pycuda" if _ok(probes, "pycuda") else cpu)
        return Path("tensorrt-host-refit", rebuild, "TensorRT %s, refit from host memory" % trt.version,
                    "TensorRT before 10 refits only from host memory: one copy per switch")
    if _ok(probes, "onnxruntime:CUDAExecutionProvider") and cuda_rebuild:
        return Path("onnxruntime-cuda", "CUDA kernel via %s, into the bound buffers" % via,
                    "ONNX Runtime, CUDA provider, weights bound by IOBinding",
                    "weights are inputs: a rebuild is the only work a switch does")
    if _ok(probes, "onnxruntime:CPUExecutionProvider"):
        return Path("onnxruntime-cpu", cpu, "ONNX Runtime, CPU provider, weights bound by IOBinding",
                    "no usable GPU engine here" + ("" if gpu else " and no usable GPU"))
    return None


def _kernel_route(probes: Dict[str, _probes.Probe]) -> str:
    """``cuda-python 11.8.2 + NVRTC 11.4``: the binding and NVRTC the probes found.

    JetPack 5 compiles through cuda-python 11.8 and NVRTC 11.4, JetPack 6 and x86 through
    cuda-bindings 12 and NVRTC 12; the path names the one this machine (or line) has.
    """
    drv, nv = probes["cuda-driver"], probes["nvrtc"]
    binding = drv.data.get("binding") or nv.data.get("binding") or "cuda-python"
    return "%s + NVRTC %s" % (binding, nv.version) if nv.version else "%s + NVRTC" % binding


def _board_python(line: JetPackLine) -> Tuple[int, int]:
    """The Python tvswitch runs on with this line: the system's, or 3.8 where that is older."""
    return max(line.python, MIN_PYTHON)


def _expected(name: str, ok: bool, detail: str, reason: str, version: str = "",
              data: Optional[Dict[str, Any]] = None) -> _probes.Probe:
    """A probe that did not run: ``detail`` where the matrix says it works, else ``reason``."""
    if ok:
        return _probes.Probe(name, True, version, detail, data=data or {})
    return _probes.Probe(name, False, reason=reason, data=data or {})


def board_probes(line: JetPackLine) -> List[_probes.Probe]:
    """What a board on ``line`` can run per the support matrix, as probes that did not run.

    JetPack's own Python builds (TensorRT's bindings, the Jetson Zoo's ONNX Runtime CUDA
    wheels) are for the system Python, so where tvswitch cannot run on that Python they
    are out of reach.
    """
    src = "JetPack %s support matrix" % line.name
    py = "%d.%d" % _board_python(line)
    system = "%d.%d" % line.python
    system_ok = line.python >= MIN_PYTHON
    refit = "device" if line.device_refit else "host"
    return [
        _expected("onnxruntime", True, "%s: PyPI aarch64 wheel for Python %s" % (src, py), ""),
        _expected("onnxruntime:CPUExecutionProvider", True, src, ""),
        _expected("onnxruntime:CUDAExecutionProvider", system_ok, "%s: the Jetson Zoo wheel for JetPack %s" % (src, line.name),
                  "%s: no ONNX Runtime CUDA build for Python %s (the Jetson Zoo's are for %s)" % (src, py, system)),
        _expected("cuda-driver", bool(line.cuda_python), "%s: %s" % (src, line.install.driver),
                  "%s: %s" % (src, line.install.driver), data={"binding": line.cuda_python}),
        _expected("nvrtc", bool(line.nvrtc), "%s: %s" % (src, line.install.nvrtc),
                  "%s: %s" % (src, line.install.nvrtc), line.nvrtc),
        _expected("pycuda", not line.cuda_python, "%s: pycuda built against CUDA %s loads the prebuilt fatbins"
                  % (src, line.cuda), "%s: not needed, %s gives the driver API" % (src, line.cuda_python)),
        _expected("tensorrt", system_ok, "%s: refit from %s memory" % (src, refit),
                  "%s: TensorRT %s's Python bindings are built for Python %s, tvswitch runs on %s"
                  % (src, line.tensorrt, system, py), line.tensorrt, {"device_refit": line.device_refit}),
        _expected(CPU_REBUILD, True, "%s: the C library builds with the board's gcc" % src, ""),
    ]


def system_python(report: PlatformReport, line: Optional[JetPackLine]) -> Optional[Tuple[int, int]]:
    """A captured board's python3: from its dpkg database, else what its JetPack line ships."""
    parts = (report.python_system or "").split(".")
    if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
        return int(parts[0]), int(parts[1])
    return line.python if line is not None else None


def advice(report: PlatformReport, probe_list: List[_probes.Probe], python: Optional[Tuple[int, int]],
           live: bool) -> List[str]:
    """The next thing to try, in the user's terms."""
    probes = {p.name: p for p in probe_list}
    line = JETPACK_LINES.get(report.jetpack_line or "")
    out = []  # type: List[str]
    if python is not None and python < MIN_PYTHON:
        out.append("tvswitch needs Python >= %d.%d and this is %d.%d: on JetPack 4 install python3.8 from Ubuntu "
                   "18.04's archive (apt install python3.8 python3.8-venv python3.8-dev) or use "
                   "docker/jetson-jp46.Dockerfile" % (MIN_PYTHON + python))
    if line is not None and line.python < MIN_PYTHON:
        out.append("JetPack %s: TensorRT %s's Python bindings exist for the system Python %d.%d only, which "
                   "tvswitch cannot run on; serve with ONNX Runtime (CPU) and the CPU rebuild, see docs/jetson.md"
                   % ((line.name, line.tensorrt) + line.python))
    elif live and report.is_jetson and not _ok(probes, "tensorrt") and report.versions.get("tensorrt") \
            and python is not None and (report.python_system or "").startswith("%d.%d" % python):
        out.append("TensorRT %s is installed for this Python: create the venv with --system-site-packages so it "
                   "is importable" % report.versions["tensorrt"])
    onnx = probes.get("onnxruntime")
    if live and report.is_jetson and onnx is not None and onnx.ok \
            and "CUDAExecutionProvider" not in onnx.data.get("providers", []):
        out.append("PyPI's onnxruntime has no Jetson GPU build: install the Jetson Zoo onnxruntime-gpu wheel for "
                   "JetPack %s" % (report.jetpack or "?"))
    return out


def default_probes(report: PlatformReport) -> List[ProbeFn]:
    """Every probe of this machine. The CUDA probes' advice is this machine's JetPack line's
    (or x86's), TensorRT's reason names the system Python its bindings were built for."""
    install = kernel_install(JETPACK_LINES.get(report.jetpack_line or ""), report.is_jetson)
    return [
        _probes.probe_onnxruntime,
        lambda: _probes.probe_cuda_driver(install),
        lambda: _probes.probe_nvrtc(install=install),
        _probes.probe_pycuda,
        lambda: _probes.probe_tensorrt(report.python_system, report.versions.get("tensorrt")),
    ]


def run_doctor(root: str, cpu_rebuild: ProbeFn, host_probes: Optional[Sequence[ProbeFn]] = None) -> DoctorReport:
    """Detect the platform under ``root``, probe or look up what it runs, rank the paths.

    With ``root`` ``/`` every probe runs here (``host_probes``, default ``default_probes``,
    then ``cpu_rebuild``). With any other root the probes are the board's support matrix
    (``board_probes``) and nothing runs; an x86 tree or an unknown release has none.
    """
    report = detect(root)
    if not is_live_root(root):
        line = JETPACK_LINES.get(report.jetpack_line or "")
        found = board_probes(line) if line is not None else []
        python = system_python(report, line)
        return DoctorReport(report, found, fastest_path(found), python,
                            None if python is None else python >= MIN_PYTHON, False,
                            advice(report, found, python, live=False))
    found = []  # type: List[_probes.Probe]
    fns = list(host_probes) if host_probes is not None else default_probes(report)
    for fn in fns + [cpu_rebuild]:
        result = fn()
        found.extend(result if isinstance(result, list) else [result])
    python = (sys.version_info[0], sys.version_info[1])
    return DoctorReport(report, found, fastest_path(found), python, python >= MIN_PYTHON, True,
                        advice(report, found, python, live=True))
