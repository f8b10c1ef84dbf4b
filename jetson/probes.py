"""Probes: does each engine and binding really work here, and if not, why not.

Listing is not proof. ``onnxruntime.get_available_providers()`` names CUDA where its
kernels for sm_87 are missing, and a session silently falls back to the CPU, so the
ONNX Runtime probe builds a tiny model and runs it on each provider, checking both the
answer and the provider that served it. The CUDA probes call the driver (cuInit, device
count, compute capability) and compile a kernel with NVRTC for every Jetson target.
Every import is lazy and every failure becomes a reason, never an exception: doctor
must run on the machine where nothing works.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from tvswitch.jetson.devices import KernelInstall, kernel_install

#: The Jetson GPU targets (Nano, TX2, Xavier, Orin) that NVRTC must compile for.
JETSON_TARGETS: Tuple[Tuple[int, int], ...] = ((5, 3), (6, 2), (7, 2), (8, 7))

PROBE_KERNEL = b"""
extern "C" __global__ void tvswitch_probe(const float* a, const float* b, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a[i] + 0.5f * b[i];
}
"""


@dataclass
class Probe:
    """One thing doctor checked. ``ok`` means it ran, not merely that it imports."""

    name: str
    ok: bool
    version: str = ""
    detail: str = ""
    reason: str = ""
    data: Dict[str, Any] = field(default_factory=dict)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0] if text else "")


def _import(name: str) -> Tuple[Optional[Any], str]:
    import importlib

    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # noqa: BLE001 - any failure to import is a reason to report
        return None, _why(exc)


# ---------------------------------------------------------------- ONNX Runtime

#: providers that forward a model to a service rather than run it on this machine
REMOTE_PROVIDERS = ("AzureExecutionProvider",)


def tiny_model_bytes() -> bytes:
    """Y = X @ W + B with W a graph input: the weights-as-inputs shape tvswitch serves.

    The probe feeds W in ``run``'s feed dict; the runtime binds the same kind of input to
    a buffer through IOBinding. Either way W is an input, not a constant to fold.

    IR version 8 / opset 13 so that every ONNX Runtime from 1.14 (JetPack 5 builds)
    loads it.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])],
        "tvswitch_probe",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(np.array([0.25, -0.5], dtype=np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def probe_onnxruntime() -> List[Probe]:
    """One probe for the package, then one per provider that it lists."""
    ort, why = _import("onnxruntime")
    if ort is None:
        return [Probe("onnxruntime", False, reason="not importable (%s); pip install 'tvswitch[onnx]', "
                      "or on Jetson the Jetson Zoo wheel for this JetPack" % why)]
    providers = list(ort.get_available_providers())
    head = Probe("onnxruntime", True, ort.__version__, "lists " + ", ".join(providers), data={"providers": providers})
    try:
        model = tiny_model_bytes()
    except Exception as exc:  # noqa: BLE001
        head.ok = False
        head.reason = "cannot build the probe model (%s); pip install onnx" % _why(exc)
        return [head]
    import numpy as np

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    w = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    expected = x @ w + np.array([0.25, -0.5], dtype=np.float32)
    out = [head]
    for provider in providers:
        if provider in REMOTE_PROVIDERS:
            out.append(Probe("onnxruntime:" + provider, False, reason="skipped: it calls a remote endpoint, "
                             "it does not compute here"))
            continue
        out.append(_run_provider(ort, model, provider, x, w, expected))
    if not any(p.ok for p in out[1:]):
        head.ok = False
        head.reason = "no provider ran the probe model"
    return out


def _run_provider(ort: Any, model: bytes, provider: str, x: Any, w: Any, expected: Any) -> Probe:
    import numpy as np

    name = "onnxruntime:" + provider
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    try:
        t0 = time.perf_counter()
        sess = ort.InferenceSession(model, sess_options=opts, providers=[provider])
        served = sess.get_providers()
        y = sess.run(None, {"X": x, "W": w})[0]
        ms = (time.perf_counter() - t0) * 1e3
    except Exception as exc:  # noqa: BLE001
        return Probe(name, False, reason="session failed: " + _why(exc))
    if not served or served[0] != provider:
        return Probe(name, False, reason="listed, but the session fell back to %s (its libraries or kernels "
                     "for this GPU are missing)" % (served[0] if served else "nothing"))
    if not np.allclose(y, expected, atol=1e-5):
        return Probe(name, False, reason="ran but returned a wrong answer")
    return Probe(name, True, detail="ran X @ W + B with W fed as a graph input (%.1f ms incl. session)" % ms)


# ---------------------------------------------------------------- TensorRT


def probe_tensorrt(system_python: Optional[str] = None, system_trt: Optional[str] = None) -> Probe:
    """TensorRT's version and which refit it offers; on Jetson, why the import fails.

    JetPack installs TensorRT's Python bindings for the distribution's python3 only, so
    the commonest failure is a venv or an interpreter of another version.
    """
    trt, why = _import("tensorrt")
    if trt is None:
        reason = "not importable (%s)" % why
        running = "%d.%d" % sys.version_info[:2]
        if system_trt and system_python and not system_python.startswith(running):
            reason += ("; JetPack's TensorRT %s bindings are built for the system Python %s, this is Python %s"
                       % (system_trt, ".".join(system_python.split(".")[:2]), running))
        elif system_trt:
            reason += ("; JetPack's TensorRT %s is installed: run with the system python3 or create the venv "
                       "with --system-site-packages" % system_trt)
        else:
            reason += "; x86: pip install tensorrt-cu12; Jetson: it comes with JetPack"
        return Probe("tensorrt", False, reason=reason)
    version = getattr(trt, "__version__", "?")
    major = int(version.split(".")[0]) if version[:1].isdigit() else 0
    device_refit = major >= 10 and hasattr(trt, "TensorLocation")
    return Probe(
        "tensorrt", True, version,
        "refit from device memory (set_named_weights + TensorLocation.DEVICE)" if device_refit
        else "refit from host memory only (TensorRT %s)" % version,
        data={"major": major, "device_refit": device_refit, "refitter": hasattr(trt, "Refitter")},
    )


# ---------------------------------------------------------------- CUDA


def _cuda_bindings(module: str) -> Tuple[Optional[Any], str]:
    mod, why = _import("cuda.bindings." + module)
    if mod is None:  # cuda-python before 12.6 (11.8 on JetPack 5) named them cuda.cuda / cuda.nvrtc
        legacy, _ = _import("cuda." + ("cuda" if module == "driver" else module))
        if legacy is not None:
            return legacy, ""
    return mod, why


def binding_name(module: Any) -> str:
    """``cuda-bindings 12.9.0`` or ``cuda-python 11.8.2``: the package a user would pin.

    The namespace says which: ``cuda.bindings.*`` is cuda-bindings (12.6 on), ``cuda.cuda``
    the older cuda-python, the one JetPack 5's Python 3.8 can have.
    """
    if module.__name__.startswith("cuda.bindings"):
        pkg, _ = _import("cuda.bindings")
        return ("cuda-bindings " + getattr(pkg, "__version__", "?")).strip()
    pkg, _ = _import("cuda")
    return ("cuda-python " + getattr(pkg, "__version__", "?")).strip()


def _default_install() -> KernelInstall:
    return kernel_install(None, is_jetson=False)


def probe_cuda_driver(install: Optional[KernelInstall] = None) -> Probe:
    """cuInit, the device count, and each device's name and compute capability.

    ``install`` is the advice of the JetPack line (or x86) this runs on, for the reason
    when the binding is missing.
    """
    drv, why = _cuda_bindings("driver")
    if drv is None:
        return Probe("cuda-driver", False, reason="cuda-python not importable (%s); %s"
                     % (why, (install or _default_install()).driver))
    binding = binding_name(drv)
    try:
        (err,) = drv.cuInit(0)
        if int(err) != 0:
            return Probe("cuda-driver", False, reason="cuInit failed: %s" % _err_name(drv, err))
        err, count = drv.cuDeviceGetCount()
        err, version = drv.cuDriverGetVersion()
        devices = []
        for i in range(count):
            _, dev = drv.cuDeviceGet(i)
            _, name = drv.cuDeviceGetName(64, dev)
            _, major = drv.cuDeviceGetAttribute(drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
            _, minor = drv.cuDeviceGetAttribute(drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
            _, integrated = drv.cuDeviceGetAttribute(drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_INTEGRATED, dev)
            devices.append({"name": name.split(b"\x00")[0].decode(), "cc": [major, minor], "integrated": bool(integrated)})
    except Exception as exc:  # noqa: BLE001 - a missing libcuda.so.1 raises here, not at import
        return Probe("cuda-driver", False, reason="no usable NVIDIA driver (%s)" % _why(exc))
    if not devices:
        return Probe("cuda-driver", False, reason="the driver loads but reports no CUDA device")
    v = "%d.%d" % (version // 1000, version % 1000 // 10)
    gpus = ", ".join("%s (sm_%d%d)" % (d["name"], d["cc"][0], d["cc"][1]) for d in devices)
    return Probe("cuda-driver", True, v, "%s through %s" % (gpus, binding), data={"devices": devices, "binding": binding})


def _err_name(mod: Any, err: Any) -> str:
    try:
        return mod.cuGetErrorName(err)[1].decode()
    except Exception:  # noqa: BLE001
        return str(err)


def probe_nvrtc(targets: Tuple[Tuple[int, int], ...] = JETSON_TARGETS,
                install: Optional[KernelInstall] = None) -> Probe:
    """NVRTC's version and a real compile to cubin for each target (no GPU needed)."""
    install = install or _default_install()
    nvrtc, why = _cuda_bindings("nvrtc")
    if nvrtc is None:
        return Probe("nvrtc", False, reason="cuda-python not importable (%s); %s, then %s"
                     % (why, install.driver, install.nvrtc))
    try:
        err, major, minor = nvrtc.nvrtcVersion()
        if int(err) != 0:
            return Probe("nvrtc", False, reason="nvrtcVersion failed: %s" % err)
    except Exception as exc:  # noqa: BLE001 - the library itself is found at first call
        return Probe("nvrtc", False, reason="libnvrtc not found (%s); %s" % (_why(exc), install.nvrtc))
    compiled, failed = [], {}  # type: List[str], Dict[str, str]
    for cc in targets:
        sm = "sm_%d%d" % cc
        ok, msg = _compile(nvrtc, sm)
        if ok:
            compiled.append(sm)
        else:
            failed[sm] = msg
    version = "%d.%d" % (major, minor)
    if not compiled:
        return Probe("nvrtc", False, version, reason="compiled for no target: %s" % failed, data={"failed": failed})
    detail = "compiled a kernel to cubin for " + " ".join(compiled)
    if failed:
        detail += "; not for " + " ".join(sorted(failed)) + (
            " (CUDA 13 dropped sm_53/62/72: use the cu12 NVRTC wheel)" if major >= 13 else "")
    return Probe("nvrtc", True, version, detail, data={"compiled": compiled, "failed": failed,
                                                       "binding": binding_name(nvrtc)})


def _compile(nvrtc: Any, sm: str) -> Tuple[bool, str]:
    err, prog = nvrtc.nvrtcCreateProgram(PROBE_KERNEL, b"tvswitch_probe.cu", 0, [], [])
    if int(err) != 0:
        return False, str(err)
    try:
        opts = [b"--gpu-architecture=" + sm.encode()]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            return False, log.decode(errors="replace").strip()[:200] or str(err)
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        return int(err) == 0 and size > 0, "empty cubin"
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def probe_pycuda() -> Probe:
    """pycuda: JetPack 4's only Python route to the driver API (no cuda-python there)."""
    pycuda, why = _import("pycuda.driver")
    if pycuda is None:
        return Probe("pycuda", False, reason="not importable (%s); needed only on JetPack 4: pip install pycuda "
                     "with CUDA 10.2's nvcc on PATH" % why)
    try:
        pycuda.init()
        count = pycuda.Device.count()
        devices = [pycuda.Device(i) for i in range(count)]
        detail = ", ".join("%s (sm_%d%d)" % ((d.name(),) + d.compute_capability()) for d in devices)
    except Exception as exc:  # noqa: BLE001
        return Probe("pycuda", False, reason="imports but the driver fails: " + _why(exc))
    ver, _ = _import("pycuda")
    return Probe("pycuda", count > 0, getattr(ver, "VERSION_TEXT", "?"), detail,
                 reason="" if count else "no CUDA device")

