"""The CUDA driver API as the GPU rebuilder needs it: memory, one stream, modules, launches.

Two bindings stand behind one small ``Device`` interface:

- NVIDIA's cuda-python (``cuda.bindings.driver``; ``cuda.cuda`` before 12.6 and 11.8.4,
  see ``cuda_python``): the default, on x86 and on JetPack 5/6 (``pip install 'tvswitch[cuda]'``);
- pycuda: the fallback for JetPack 4 (Nano, TX2), where cuda-python does not exist.  The
  package itself needs Python 3.8, so on JetPack 4 this means a Python 3.8 built for the
  board plus pycuda built against CUDA 10.2 (docs/kernels.md).

Both use the device's primary context (the one PyTorch, TensorRT and ONNX Runtime use),
so device pointers pass freely between them and tvswitch.  Every driver call is checked:
a failure raises ``CudaError`` naming the call and the driver's error.  Nothing is
imported until a device is opened, so ``import tvswitch`` needs neither binding.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError


class CudaError(RuntimeError):
    """A CUDA driver call failed, or no binding or device is usable; the message says which."""


def _element_dtype(dtype: Any) -> Any:
    """numpy's dtype, or the name ``"bfloat16"`` where numpy has none (ml_dtypes not installed)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        try:
            return np.dtype(dtype)
        except TypeError:
            return dtype
    return np.dtype(dtype)


@dataclass(frozen=True)
class DeviceTensor:
    """A C-contiguous tensor in device memory: what a rebuild reads or writes.

    ``dtype`` is a numpy dtype or a name; a bfloat16 buffer (which numpy cannot name without
    ml_dtypes, nor torch export through ``__cuda_array_interface__``) is ``"bfloat16"``.
    """

    ptr: int
    shape: Tuple[int, ...]
    dtype: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "ptr", int(self.ptr))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", _element_dtype(self.dtype))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def itemsize(self) -> int:
        return 2 if isinstance(self.dtype, str) else self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def host_dtype(self) -> np.dtype:
        """The dtype of a host copy: bfloat16 without numpy support comes back as its bits (uint16)."""
        return np.dtype(np.uint16) if isinstance(self.dtype, str) else self.dtype

    @classmethod
    def of(cls, obj: Any) -> "DeviceTensor":
        """A DeviceTensor, or the view of a CUDA array (torch, CuPy) through ``__cuda_array_interface__``."""
        if isinstance(obj, DeviceTensor):
            return obj
        cai = getattr(obj, "__cuda_array_interface__", None)
        if cai is None:
            raise TvswitchError("output %r is not device memory (give a DeviceTensor or a CUDA array)"
                                % type(obj).__name__)
        shape = tuple(int(d) for d in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        strides = cai.get("strides")
        if strides is not None and tuple(strides) != _c_strides(shape, dtype.itemsize):
            raise TvswitchError("a CUDA array output must be C-contiguous")
        return cls(int(cai["data"][0]), shape, dtype)


def _c_strides(shape: Tuple[int, ...], itemsize: int) -> Tuple[int, ...]:
    strides, step = [], itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


class Device:
    """One GPU through one binding.  All work goes to ``self`` 's single stream, in order.

    Pointers are plain integers (device addresses).  Uploads and downloads are ordered with
    the stream; ``download`` returns once the data is on the host.
    """

    binding = "?"
    name = "?"
    cc: Tuple[int, int] = (0, 0)

    def alloc(self, nbytes: int) -> int:
        raise NotImplementedError

    def free(self, ptr: int) -> None:
        raise NotImplementedError

    def upload(self, ptr: int, array: np.ndarray) -> None:
        raise NotImplementedError

    def download(self, array: np.ndarray, ptr: int) -> None:
        raise NotImplementedError

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        raise NotImplementedError

    def memset(self, ptr: int, byte: int, nbytes: int) -> None:
        raise NotImplementedError

    def load_module(self, image: bytes) -> Any:
        raise NotImplementedError

    def function(self, module: Any, name: str) -> Any:
        raise NotImplementedError

    def launch(self, function: Any, grid: int, block: int, args: Sequence[Tuple[str, int]]) -> None:
        """Launch ``function`` on ``grid`` x ``block`` threads; args as ("ptr"|"u32", value)."""
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def event(self) -> Any:
        """An event recorded on the stream now (for timing)."""
        raise NotImplementedError

    def elapsed_ms(self, start: Any, end: Any) -> float:
        raise NotImplementedError

    @property
    def stream_handle(self) -> Optional[int]:
        """The raw handle of this device's stream (what TensorRT's refit and enqueue take)."""
        return None

    def make_current(self) -> None:
        """Make this device's context current on the calling thread (a switch may come from
        any thread of a server, and the driver API's current context is per thread)."""

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """This device's context current on the calling thread for the block: what every
        caller wraps its device calls in.  cuda-python sets it (nothing to undo); pycuda
        pushes it on the thread's context stack and pops it again."""
        self.make_current()
        yield

    def close(self) -> None:
        """Give back what this object holds (the stream, its modules, its hold on the primary
        context); memory is the caller's."""


# ---------------------------------------------------------------- cuda-python


#: cuda-python's modules' old homes (``cuda.cuda``, ``cuda.nvrtc``, ``cuda.cudart``), before
#: ``cuda.bindings``.
_OLD_NAMES = {"driver": "cuda", "nvrtc": "nvrtc", "runtime": "cudart"}


def cuda_python(name: str) -> Any:
    """cuda-python's ``cuda.bindings.<name>`` (``driver``, ``nvrtc``, ``runtime``), else its old home.

    ``cuda.bindings`` exists from cuda-python 12.6 and 11.8.4 on; 11.8.0-11.8.3, which a
    JetPack 5 board on Python 3.8 may have (cuda-bindings 12 has no cp38 wheels), only
    has ``from cuda import cuda, nvrtc``.  The calls tvswitch makes are the same in both.
    Raises ImportError where neither imports.
    """
    try:
        return importlib.import_module("cuda.bindings." + name)
    except ImportError:
        return importlib.import_module("cuda." + _OLD_NAMES[name])


def _driver_module() -> Any:
    return cuda_python("driver")


class DriverDevice(Device):
    """cuda-python's driver API."""

    binding = "cuda-python"

    def __init__(self, ordinal: int = 0):
        self._drv = drv = _driver_module()
        try:
            result = drv.cuInit(0)
        except Exception as exc:  # noqa: BLE001 - a missing libcuda.so.1 raises here, type varies by version
            raise CudaError("no usable NVIDIA driver (%s)" % exc) from None
        self._check("cuInit", result)
        count = self._check("cuDeviceGetCount", drv.cuDeviceGetCount())
        if ordinal >= count:
            raise CudaError("CUDA device %d requested, the driver sees %d" % (ordinal, count))
        self._dev = self._check("cuDeviceGet", drv.cuDeviceGet(ordinal))
        self._ctx = self._check("cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain(self._dev))
        self._check("cuCtxSetCurrent", drv.cuCtxSetCurrent(self._ctx))
        raw = self._check("cuDeviceGetName", drv.cuDeviceGetName(128, self._dev))
        self.name = raw.split(b"\0")[0].decode()
        attr = drv.CUdevice_attribute
        self.cc = (self._check("cuDeviceGetAttribute", drv.cuDeviceGetAttribute(
                       attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._dev)),
                   self._check("cuDeviceGetAttribute", drv.cuDeviceGetAttribute(
                       attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._dev)))
        self._stream = self._check("cuStreamCreate", drv.cuStreamCreate(drv.CUstream_flags.CU_STREAM_NON_BLOCKING))
        self._modules: list = []
        self._params: Dict[tuple, tuple] = {}

    def _check(self, call: str, result: Any) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            try:
                name = self._drv.cuGetErrorName(err)[1].decode()
                text = self._drv.cuGetErrorString(err)[1].decode()
            except Exception:  # noqa: BLE001 - the names are a courtesy; the code is in the message
                name, text = str(err), ""
            raise CudaError("%s failed: %s%s" % (call, name, " (%s)" % text if text else ""))
        if isinstance(result, tuple) and len(result) > 1:
            return result[1] if len(result) == 2 else result[1:]
        return None

    @property
    def stream_handle(self) -> Optional[int]:
        return None if self._stream is None else int(self._stream)

    def make_current(self) -> None:
        self._check("cuCtxSetCurrent", self._drv.cuCtxSetCurrent(self._ctx))

    def alloc(self, nbytes: int) -> int:
        return int(self._check("cuMemAlloc", self._drv.cuMemAlloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self._check("cuMemFree", self._drv.cuMemFree(ptr))

    def upload(self, ptr: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        # From pageable memory the driver stages the bytes before it returns, so `a` may go.
        self._check("cuMemcpyHtoDAsync", self._drv.cuMemcpyHtoDAsync(ptr, a.ctypes.data, a.nbytes, self._stream))

    def download(self, array: np.ndarray, ptr: int) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("download needs a C-contiguous array")
        self._check("cuMemcpyDtoHAsync", self._drv.cuMemcpyDtoHAsync(array.ctypes.data, ptr, array.nbytes,
                                                                     self._stream))
        self.synchronize()

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self._check("cuMemcpyDtoDAsync", self._drv.cuMemcpyDtoDAsync(dst, src, nbytes, self._stream))

    def memset(self, ptr: int, byte: int, nbytes: int) -> None:
        self._check("cuMemsetD8Async", self._drv.cuMemsetD8Async(ptr, byte, nbytes, self._stream))

    def load_module(self, image: bytes) -> Any:
        module = self._check("cuModuleLoadData", self._drv.cuModuleLoadData(image))
        self._modules.append(module)
        return module

    def function(self, module: Any, name: str) -> Any:
        return self._check("cuModuleGetFunction", self._drv.cuModuleGetFunction(module, name.encode()))

    def launch(self, function: Any, grid: int, block: int, args: Sequence[Tuple[str, int]]) -> None:
        # kernelParams: an array of pointers, each to one argument's bytes (the driver copies
        # them at launch).  Built once per argument list and kept: a switch launches the same
        # arguments again and again, and building them costs more than the launch.
        key = tuple(args)
        params = self._params.get(key)
        if params is None:
            values = [np.array([v], dtype=np.uint64 if kind == "ptr" else np.uint32) for kind, v in key]
            array = np.array([v.ctypes.data for v in values], dtype=np.uint64)
            if len(self._params) >= 256:
                self._params.clear()
            params = self._params[key] = (int(array.ctypes.data), array, values)
        self._check("cuLaunchKernel", self._drv.cuLaunchKernel(function, grid, 1, 1, block, 1, 1, 0, self._stream,
                                                               params[0], 0))

    def synchronize(self) -> None:
        self._check("cuStreamSynchronize", self._drv.cuStreamSynchronize(self._stream))

    def event(self) -> Any:
        ev = self._check("cuEventCreate", self._drv.cuEventCreate(0))
        self._check("cuEventRecord", self._drv.cuEventRecord(ev, self._stream))
        return ev

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self._check("cuEventSynchronize", self._drv.cuEventSynchronize(end))
        ms = float(self._check("cuEventElapsedTime", self._drv.cuEventElapsedTime(start, end)))
        for ev in (start, end):
            self._check("cuEventDestroy", self._drv.cuEventDestroy(ev))
        return ms

    def close(self) -> None:
        if self._stream is None:
            return
        self.make_current()
        self.synchronize()
        for module in self._modules:
            self._check("cuModuleUnload", self._drv.cuModuleUnload(module))
        self._modules = []
        self._check("cuStreamDestroy", self._drv.cuStreamDestroy(self._stream))
        self._stream = None
        self._check("cuDevicePrimaryCtxRelease", self._drv.cuDevicePrimaryCtxRelease(self._dev))


# ---------------------------------------------------------------- pycuda (JetPack 4)


class PycudaDevice(Device):
    """pycuda's driver wrapper: the same interface where cuda-python does not exist.

    pycuda keeps a context stack per thread and aborts the process if one is left non-empty
    when its thread ends, so no call leaves the context pushed: each public call runs inside
    ``current()``, which pushes the primary context where it is not current and pops it
    after.  ``close()`` drops the stream and releases the primary context (pycuda's
    ``detach``), on the thread that opened the device (pycuda refuses other threads).
    """

    binding = "pycuda"

    def __init__(self, ordinal: int = 0):
        import pycuda.driver as drv

        self._drv = drv
        self._ctx: Any = None
        self._stream: Any = None
        self._call("cuInit", drv.init)
        count = self._call("cuDeviceGetCount", drv.Device.count)
        if ordinal >= count:
            raise CudaError("CUDA device %d requested, the driver sees %d" % (ordinal, count))
        dev = self._call("cuDeviceGet", drv.Device, ordinal)
        self._ctx = self._call("cuDevicePrimaryCtxRetain", dev.retain_primary_context)
        self.name = dev.name()
        self.cc = tuple(dev.compute_capability())  # type: ignore[assignment]
        with self.current():
            self._stream = self._call("cuStreamCreate", drv.Stream)
        self._allocations: Dict[int, Any] = {}  # pycuda frees memory when its object dies

    def _call(self, call: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except self._drv.Error as exc:
            raise CudaError("%s failed: %s" % (call, exc)) from None

    def _run(self, call: str, fn: Any, *args: Any, **kw: Any) -> Any:
        with self.current():
            return self._call(call, fn, *args, **kw)

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        now = self._call("cuCtxGetCurrent", self._drv.Context.get_current)
        pushed = now is None or now != self._ctx
        if pushed:
            self._call("cuCtxPushCurrent", self._ctx.push)
        try:
            yield
        finally:
            if pushed:
                self._call("cuCtxPopCurrent", self._drv.Context.pop)

    def make_current(self) -> None:
        """Nothing to do: every call of this device pushes and pops its context (``current``)."""

    @property
    def stream_handle(self) -> Optional[int]:
        return None if self._stream is None else int(self._stream.handle)

    def alloc(self, nbytes: int) -> int:
        mem = self._run("cuMemAlloc", self._drv.mem_alloc, max(int(nbytes), 1))
        self._allocations[int(mem)] = mem
        return int(mem)

    def free(self, ptr: int) -> None:
        mem = self._allocations.pop(ptr)
        self._run("cuMemFree", mem.free)

    def upload(self, ptr: int, array: np.ndarray) -> None:
        # pycuda's async copies want page-locked memory; loads and table uploads are rare.
        with self.current():
            self._call("cuStreamSynchronize", self._stream.synchronize)
            self._call("cuMemcpyHtoD", self._drv.memcpy_htod, ptr, np.ascontiguousarray(array))

    def download(self, array: np.ndarray, ptr: int) -> None:
        with self.current():
            self._call("cuStreamSynchronize", self._stream.synchronize)
            self._call("cuMemcpyDtoH", self._drv.memcpy_dtoh, array, ptr)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self._run("cuMemcpyDtoDAsync", self._drv.memcpy_dtod_async, dst, src, nbytes, self._stream)

    def memset(self, ptr: int, byte: int, nbytes: int) -> None:
        with self.current():
            self._call("cuStreamSynchronize", self._stream.synchronize)
            self._call("cuMemsetD8", self._drv.memset_d8, ptr, byte, nbytes)

    def load_module(self, image: bytes) -> Any:
        return self._run("cuModuleLoadData", self._drv.module_from_buffer, image)

    def function(self, module: Any, name: str) -> Any:
        return self._run("cuModuleGetFunction", module.get_function, name)

    def launch(self, function: Any, grid: int, block: int, args: Sequence[Tuple[str, int]]) -> None:
        values = [np.uintp(v) if kind == "ptr" else np.uint32(v) for kind, v in args]
        self._run("cuLaunchKernel", function, *values, block=(block, 1, 1), grid=(grid, 1), stream=self._stream)

    def synchronize(self) -> None:
        self._run("cuStreamSynchronize", self._stream.synchronize)

    def event(self) -> Any:
        with self.current():
            ev = self._call("cuEventCreate", self._drv.Event)
            self._call("cuEventRecord", ev.record, self._stream)
        return ev

    def elapsed_ms(self, start: Any, end: Any) -> float:
        with self.current():
            self._call("cuEventSynchronize", end.synchronize)
            return float(self._call("cuEventElapsedTime", start.time_till, end))

    def close(self) -> None:
        if self._ctx is None:
            return
        if self._stream is not None:
            with self.current():
                self._call("cuStreamSynchronize", self._stream.synchronize)
                self._stream = None  # pycuda destroys a stream when its object goes, in this context
        ctx, self._ctx = self._ctx, None
        self._call("cuDevicePrimaryCtxRelease", ctx.detach)


def open_device(ordinal: int = 0, binding: str = "auto") -> Device:
    """The GPU ``ordinal`` through cuda-python, or pycuda where cuda-python is missing."""
    if binding not in ("auto", "cuda-python", "pycuda"):
        raise ValueError("binding must be auto, cuda-python or pycuda, got %r" % binding)
    why = []
    if binding in ("auto", "cuda-python"):
        try:
            _driver_module()
        except ImportError as exc:
            why.append("cuda-python is not installed (%s): pip install 'tvswitch[cuda]'" % exc)
        else:
            return DriverDevice(ordinal)
    if binding in ("auto", "pycuda"):
        try:
            import pycuda.driver  # noqa: F401
        except ImportError as exc:
            why.append("pycuda is not installed (%s): JetPack 4 only, see docs/kernels.md" % exc)
        else:
            return PycudaDevice(ordinal)
    raise CudaError("no CUDA binding: " + "; ".join(why))


def has_gpu() -> Optional[str]:
    """None when a GPU can be opened here, else the reason it cannot (for skips and the bench)."""
    try:
        open_device().close()
    except (CudaError, ImportError) as exc:
        return str(exc)
    return None

