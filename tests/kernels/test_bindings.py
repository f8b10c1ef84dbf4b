"""The driver bindings without a GPU: fake cuda-python and pycuda modules stand in for NVIDIA's.

What is checked is tvswitch's side of each binding: which cuda-python namespace it
imports (``cuda.bindings`` since 12.6 and 11.8.4, ``cuda.cuda``/``cuda.nvrtc`` in
cuda-python 11.8.0-11.8.3, what a JetPack 5 board on Python 3.8 may have), that a launch's
argument block is built once and holds the arguments, and that pycuda's per-thread
context stack is left as it was found by every call, on any thread, with the primary
context released at close.
"""
from __future__ import annotations

import ctypes
import gc
import sys
import threading
import types
import weakref

import numpy as np
import pytest

from tvswitch.kernels import cuda, nvrtc


def _module(name: str, package: bool = False, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    if package:
        m.__path__ = []  # type: ignore[attr-defined]
    m.__dict__.update(attrs)
    return m


@pytest.fixture
def modules(monkeypatch):
    """Replace the cuda namespace in sys.modules (None: that import fails)."""
    def install(table):
        for name in ("cuda", "cuda.bindings", "cuda.bindings.driver", "cuda.bindings.nvrtc", "cuda.cuda",
                     "cuda.nvrtc"):
            monkeypatch.setitem(sys.modules, name, table.get(name))
    return install


def test_cuda_bindings_is_preferred_where_it_exists(modules):
    new_driver, old_driver = _module("cuda.bindings.driver"), _module("cuda.cuda")
    modules({"cuda": _module("cuda", True), "cuda.bindings": _module("cuda.bindings", True),
             "cuda.bindings.driver": new_driver, "cuda.bindings.nvrtc": _module("cuda.bindings.nvrtc"),
             "cuda.cuda": old_driver})
    assert cuda.cuda_python("driver") is new_driver
    assert nvrtc.nvrtc_module() is sys.modules["cuda.bindings.nvrtc"]


def test_cuda_python_11_8_old_namespace_is_used_where_cuda_bindings_is_missing(modules):
    """cuda-python 11.8.0-11.8.3: ``from cuda import cuda, nvrtc`` only."""
    old_driver, old_nvrtc = _module("cuda.cuda"), _module("cuda.nvrtc")
    modules({"cuda": _module("cuda", True), "cuda.cuda": old_driver, "cuda.nvrtc": old_nvrtc})
    assert cuda.cuda_python("driver") is old_driver
    assert nvrtc.nvrtc_module() is old_nvrtc


def test_no_cuda_python_says_so(modules):
    modules({})
    with pytest.raises(ImportError):
        cuda.cuda_python("driver")
    with pytest.raises(nvrtc.KernelBuildError, match="NVRTC needs cuda-python"):
        nvrtc.nvrtc_module()
    with pytest.raises(cuda.CudaError, match="cuda-python is not installed"):
        cuda.open_device(binding="cuda-python")


def test_a_launch_builds_its_argument_block_once_and_it_holds_the_arguments():
    seen = []

    class FakeDriver:
        @staticmethod
        def cuLaunchKernel(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
            pointers = (ctypes.c_uint64 * 3).from_address(params)
            seen.append((params, ctypes.c_uint64.from_address(pointers[0]).value,
                         ctypes.c_uint32.from_address(pointers[1]).value,
                         ctypes.c_uint64.from_address(pointers[2]).value))
            return (0,)

    dev = cuda.DriverDevice.__new__(cuda.DriverDevice)
    dev._drv, dev._stream, dev._params = FakeDriver(), 1, {}
    args = [("ptr", 0x7F0000001000), ("u32", 77), ("ptr", 2**40 + 8)]
    dev.launch("kernel", 3, 256, args)
    dev.launch("kernel", 3, 256, tuple(args))
    assert seen[0] == seen[1] and seen[0][1:] == (0x7F0000001000, 77, 2**40 + 8)
    assert len(dev._params) == 1
    dev.launch("kernel", 3, 256, [("ptr", 1), ("u32", 2), ("ptr", 3)])
    assert seen[-1][1:] == (1, 2, 3) and len(dev._params) == 2


# ---------------------------------------------------------------- pycuda


class FakePycuda:
    """The parts of pycuda.driver PycudaDevice uses, with pycuda's per-thread context stack."""

    class Error(Exception):
        pass

    def __init__(self):
        self.stacks = threading.local()
        self.released = 0
        self.calls = []
        fake = self

        class Context:
            def push(self):
                fake.stack().append(self)

            @staticmethod
            def pop():
                if not fake.stack():
                    raise FakePycuda.Error("cannot pop non-current context")
                fake.stack().pop()

            @staticmethod
            def get_current():
                return fake.stack()[-1] if fake.stack() else None

            def detach(self):
                fake.released += 1

        class Device:
            def __init__(self, ordinal):
                self.ordinal = ordinal

            @staticmethod
            def count():
                return 1

            def retain_primary_context(self):
                return fake.context

            def name(self):
                return "Fake Nano"

            def compute_capability(self):
                return (5, 3)

        class Stream:
            handle = 0x5EED

            def __init__(self):
                fake.current_during("cuStreamCreate")

            def synchronize(self):
                fake.current_during("cuStreamSynchronize")

        class Allocation:
            def __init__(self, n):
                self.n = n

            def __int__(self):
                return 4096

            def free(self):
                fake.current_during("cuMemFree")

        class Module:
            def get_function(self, name):
                def function(*args, **kw):
                    fake.current_during("cuLaunchKernel")
                    fake.calls.append(("launch", args, kw["grid"], kw["block"]))
                return function

        self.context = Context()
        self.driver = _module("pycuda.driver", Error=FakePycuda.Error, Context=Context, Device=Device, Stream=Stream,
                              init=lambda: None, mem_alloc=lambda n: self.current_during("cuMemAlloc", Allocation(n)),
                              memcpy_htod=lambda ptr, a: self.current_during("cuMemcpyHtoD"),
                              module_from_buffer=lambda image: self.current_during("cuModuleLoadData", Module()))

    def stack(self):
        if not hasattr(self.stacks, "items"):
            self.stacks.items = []
        return self.stacks.items

    def current_during(self, call, result=None):
        """Every call the device makes must find its context current on the calling thread."""
        if not self.stack() or self.stack()[-1] is not self.context:
            raise FakePycuda.Error("%s without a current context" % call)
        self.calls.append(call)
        return result


@pytest.fixture
def pycuda(monkeypatch):
    fake = FakePycuda()
    monkeypatch.setitem(sys.modules, "pycuda", _module("pycuda", True, driver=fake.driver))
    monkeypatch.setitem(sys.modules, "pycuda.driver", fake.driver)
    return fake


def test_pycuda_calls_leave_every_threads_context_stack_as_they_found_it(pycuda):
    dev = cuda.open_device(binding="pycuda")
    assert (dev.binding, dev.name, dev.cc) == ("pycuda", "Fake Nano", (5, 3))
    assert pycuda.stack() == []
    function = dev.function(dev.load_module(b"image"), "tv_rebuild_p2")
    ptr = dev.alloc(64)
    dev.upload(ptr, np.zeros(16, np.float32))
    assert pycuda.stack() == []

    def switch():  # a server thread that never pushed anything
        dev.launch(function, 5, 256, [("ptr", ptr), ("u32", 1)])
        dev.synchronize()
        assert pycuda.stack() == []

    t = threading.Thread(target=switch)
    t.start()
    t.join()
    assert pycuda.calls.count("cuLaunchKernel") == 1
    launch = next(c for c in pycuda.calls if isinstance(c, tuple))
    assert launch[2:] == ((5, 1), (256, 1, 1)) and [int(v) for v in launch[1]] == [ptr, 1]
    with dev.current():  # nested calls inside a caller's block push nothing more
        dev.synchronize()
        assert pycuda.stack() == [pycuda.context]
    assert pycuda.stack() == []


def test_pycuda_close_drops_the_stream_and_releases_the_primary_context(pycuda):
    dev = cuda.open_device(binding="pycuda")
    stream = weakref.ref(dev._stream)
    dev.close()
    gc.collect()
    assert stream() is None and pycuda.released == 1 and pycuda.stack() == []
    dev.close()  # twice is harmless
    assert pycuda.released == 1


def test_pycuda_errors_name_the_call_and_still_pop_the_context(pycuda):
    dev = cuda.open_device(binding="pycuda")

    def refuse(ptr, a):
        raise FakePycuda.Error("out of memory")

    pycuda.driver.memcpy_htod = refuse
    with pytest.raises(cuda.CudaError, match="cuMemcpyHtoD failed: out of memory"):
        dev.upload(dev.alloc(8), np.zeros(2, np.float32))
    assert pycuda.stack() == []
