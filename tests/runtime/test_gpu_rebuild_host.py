"""GpuRebuilder without a GPU: device memory emulated in host memory, the launch run by the CPU library.

Everything but the kernel runs as on a GPU: the payload and base arenas, the table upload
with device addresses, the kernel choice and grid, the output checks and the caches.  The
"launch" reads the uploaded tables back from that memory and runs them with the CPU
library, so a wrong address or layout shows up as a wrong output, bit for bit against
CpuRebuilder.  (The kernel itself is held to the CPU library in tests/kernels.)
"""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.kernels import abi, cpu, nvrtc
from tvswitch.kernels.cuda import CudaError, Device, DriverDevice
from tvswitch.runtime import gpu_rebuild as G
from tvswitch.runtime.rebuild import CpuRebuilder

pytestmark = pytest.mark.skipif(not cpu.available(), reason="CPU library not built: %s" % cpu.unavailable_reason())


class HostDevice(Device):
    """Device memory as aligned host buffers; launches run the CPU library on the uploaded tables."""

    binding, name, cc = "host", "host memory", (8, 7)

    def __init__(self):
        self.mem = {}
        self.launches = []
        self.uploads = 0

    def alloc(self, nbytes):
        buf = np.full(nbytes + G.ALIGN, 0xA5, dtype=np.uint8)  # poisoned: unwritten outputs show
        ptr = -(-buf.ctypes.data // G.ALIGN) * G.ALIGN
        self.mem[ptr] = buf
        return ptr

    def free(self, ptr):
        del self.mem[ptr]

    def upload(self, ptr, array):
        a = np.ascontiguousarray(array)
        self.uploads += 1
        ctypes.memmove(ptr, a.ctypes.data, a.nbytes)

    def download(self, array, ptr):
        ctypes.memmove(array.ctypes.data, ptr, array.nbytes)

    def memset(self, ptr, byte, nbytes):
        ctypes.memset(ptr, byte, nbytes)

    def load_module(self, image):
        return image

    def function(self, module, name):
        return name

    def launch(self, function, grid, block, args):
        (_, segs), (_, nseg), (_, terms), (_, total), (_, tiles) = args
        assert block == abi.BLOCK_THREADS and grid == -(-total // tiles)
        seg_table = np.frombuffer((ctypes.c_char * (nseg * abi.SEGMENT_DTYPE.itemsize)).from_address(segs),
                                  dtype=abi.SEGMENT_DTYPE).copy()
        nterms = int((seg_table["term_begin"] + seg_table["term_count"]).max())
        term_table = np.frombuffer((ctypes.c_char * (nterms * abi.TERM_DTYPE.itemsize)).from_address(terms),
                                   dtype=abi.TERM_DTYPE).copy()
        self.launches.append(SimpleNamespace(function=function, grid=grid, segments=seg_table, terms=term_table))
        cpu.rebuild(seg_table, term_table, 1)

    def synchronize(self):
        pass


@pytest.fixture
def gpu(monkeypatch, checkpoints):
    monkeypatch.setattr(nvrtc, "kernel_image", lambda cc: (b"image", "test"))
    base, _ = checkpoints

    def make(bundle, **kw):
        return G.GpuRebuilder(bundle, base, device=HostDevice(), **kw)

    return make


SCHEMES = [("tvq", dict(bits=b)) for b in range(1, 9)] + [
    ("tvq", dict(bits=3, granularity="channel")), ("tvq", dict(bits=2, granularity="group:16")),
    ("fq", dict(bits=4)), ("rtvq", {}), ("tswitch", dict(keep=0.25)),
]


@pytest.mark.parametrize("scheme,kw", SCHEMES)
def test_matches_the_cpu_rebuilder_bit_for_bit(gpu, bundle_factory, checkpoints, scheme, kw):
    base, _ = checkpoints
    bundle = bundle_factory(scheme, **kw)
    r = gpu(bundle, tiles_per_block=3)
    ref = CpuRebuilder(bundle, base)
    for mix in ({"b": 1.0}, {"a": 0.5, "b": 0.3, "c": -0.2}):
        for dtype in (None, "float16"):
            out = r.allocate(dtype)
            r.rebuild(mix, out)
            want = ref.allocate(dtype)
            ref.rebuild(mix, want)
            for name, t in out.items():
                got = r.download(t)
                assert got.tobytes() == want[name].tobytes(), (mix, dtype, name)


def test_payloads_live_in_one_aligned_arena(gpu, bundle_factory):
    bundle = bundle_factory("rtvq")
    r = gpu(bundle)
    keys = r._payload_keys()
    addresses = sorted(r.address(k) for k in keys)
    assert all(a % G.ALIGN == 0 for a in addresses) and len(set(addresses)) == len(keys)
    for k in keys:
        host = bundle.payload(k)
        back = np.empty_like(host)
        r.device.download(back, r.address(k))
        assert np.array_equal(back, host), k
    assert r.resident_bytes >= sum(bundle.payload(k).nbytes for k in keys) + bundle.base_nbytes


def test_tables_upload_once_per_mix_and_outputs_and_pick_the_kernel(gpu, bundle_factory):
    r = gpu(bundle_factory("rtvq"))
    out = r.allocate()
    r.rebuild({"a": 1.0}, out)
    uploads = r.device.uploads
    r.rebuild({"a": 1.0}, out)
    assert r.device.uploads == uploads  # cached: a switch is one launch
    r.rebuild({"a": 1.0}, r.allocate())
    assert r.device.uploads == uploads + 2  # new outputs: new tables (segments, terms)
    r.rebuild({"a": 0.3, "b": 0.3, "c": 0.3}, out)
    first, mix = r.device.launches[0], r.device.launches[-1]
    assert first.function == nvrtc.KERNELS[2]  # RTVQ, one task: shared base + offset
    assert mix.function == nvrtc.KERNELS[4]  # three tasks: the shared base merged + 3 offsets
    assert int(mix.segments["term_count"].max()) == 4


def test_bad_outputs_and_mixes_write_nothing(gpu, bundle_factory):
    r = gpu(bundle_factory("tvq"))
    out = r.allocate()
    r.rebuild({"a": 1.0}, out)
    before = {n: r.download(t) for n, t in out.items()}
    launches = len(r.device.launches)
    name, t = next(iter(out.items()))
    other = list(out)[1]
    bad = [
        ({"zzz": 1.0}, out, "no task"),
        ({"a": float("inf")}, out, "finite"),
        ({"a": 1.0}, {k: v for k, v in out.items() if k != name}, "lack"),
        ({"a": 1.0}, dict(out, **{name: G.DeviceTensor(t.ptr, (1,), t.dtype)}), "shape"),
        ({"a": 1.0}, dict(out, **{name: G.DeviceTensor(t.ptr, t.shape, np.dtype(np.float64))}), "float32"),
        ({"a": 1.0}, dict(out, **{other: G.DeviceTensor(t.ptr, out[other].shape, out[other].dtype)}), "overlap"),
        ({"a": 1.0}, dict(out, **{name: G.DeviceTensor(r.address(r._payload_keys()[0]), t.shape, t.dtype)}),
         "overlap"),
        ({"a": 1.0}, dict(out, **{name: np.zeros(t.shape, t.dtype)}), "not device memory"),
    ]
    for mix, outs, message in bad:
        with pytest.raises(TvswitchError, match=message):
            r.rebuild(mix, outs)
    assert len(r.device.launches) == launches
    for n, t in out.items():
        assert np.array_equal(r.download(t), before[n])


def test_rebuild_in_place_over_the_base(gpu, bundle_factory, checkpoints):
    base, _ = checkpoints
    bundle = bundle_factory("tvq", bits=4)
    r = gpu(bundle)
    ref = CpuRebuilder(bundle, base)
    want = ref.allocate()
    ref.rebuild({"c": 1.0}, want)
    r.rebuild({"c": 1.0}, r.base)
    for name, t in r.base.items():
        assert r.download(t).tobytes() == want[name].tobytes()


def test_close_frees_every_buffer(gpu, bundle_factory):
    r = gpu(bundle_factory("tswitch"))
    r.rebuild({"a": 1.0}, r.allocate())
    assert r.device.mem
    r.close()
    assert r.device.mem == {}
    r.close()  # twice is harmless


def test_arena_layout_and_helpers():
    offsets, total = G.arena_layout([1, 256, 257, 0, 3])
    assert offsets == [0, 256, 512, 1024, 1024] and total == 1280
    assert [G.pick_kernel(n) for n in (0, 1, 2, 3, 4, 5, 10, 11, 40)] == [2, 2, 2, 4, 4, 10, 10, 10, 10]
    G.check_disjoint([(0, 10, "a"), (10, 5, "b"), (100, 0, "empty"), (5, 0, "empty too")])
    with pytest.raises(TvswitchError, match="a.*b|b.*a"):
        G.check_disjoint([(0, 10, "a"), (9, 5, "b")])


def test_cuda_array_interface_outputs():
    arr = SimpleNamespace(__cuda_array_interface__={"data": (4096, False), "shape": (3, 5), "typestr": "<f2",
                                                    "strides": None, "version": 3})
    assert G.DeviceTensor.of(arr) == G.DeviceTensor(4096, (3, 5), np.dtype(np.float16))
    arr.__cuda_array_interface__["strides"] = (2, 6)  # a transposed view
    with pytest.raises(TvswitchError, match="C-contiguous"):
        G.DeviceTensor.of(arr)


def test_group_sizes_beyond_32_bits_are_refused():
    plan = SimpleNamespace(terms=np.zeros(2, dtype=abi.TERM_DTYPE))
    plan.terms["kind"] = abi.KIND_CODES
    plan.terms["bits"] = 4
    plan.terms["group"] = [5, 2**32 + 5]  # decode.h would divide by 5: params read out of range
    with pytest.raises(TvswitchError, match="group"):
        G.check_terms(plan)


def test_driver_errors_name_the_call():
    class FakeDriver:
        @staticmethod
        def cuGetErrorName(err):
            return 0, b"CUDA_ERROR_OUT_OF_MEMORY"

        @staticmethod
        def cuGetErrorString(err):
            return 0, b"out of memory"

    dev = DriverDevice.__new__(DriverDevice)
    dev._drv = FakeDriver()
    with pytest.raises(CudaError, match=r"cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY \(out of memory\)"):
        dev._check("cuMemAlloc", (2, None))
    assert dev._check("cuMemAlloc", (0, 1234)) == 1234
