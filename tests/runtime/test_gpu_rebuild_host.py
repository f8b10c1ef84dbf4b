"""GpuRebuilder without a GPU: device memory emulated in host memory, the launch run on the CPU.

Everything but the kernel runs as on a GPU: the payload and base arenas, the table upload
with device addresses, the kernel choice and grid, the output checks and the caches.  The
"launch" reads the uploaded tables back from that memory and runs them with the CPU
library, so a wrong address or layout shows up as a wrong output, bit for bit against
CpuRebuilder; one test runs them through rebuild.cu itself, on CPU threads under
tests/kernels/emulate.  (The kernel is held to the CPU library in tests/kernels.)
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.kernels import abi, cpu, nvrtc, reference
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
        self.made_current = 0  # make_current calls

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
        # GpuRebuilder checked these tables against every buffer they name before it uploaded them
        # (engines' device buffers too, which this device did not allocate); a GPU runs them unchecked.
        cpu.rebuild_runs(seg_table, term_table, launch_runs(seg_table, total), [(0, 2**64 - 1)], 1)

    def synchronize(self):
        pass

    def make_current(self):
        self.made_current += 1


def launch_runs(seg_table, total):
    """The elements a launch of ``seg_table`` over ``total`` blocks writes, as CPU runs: segment
    e covers its tensor's blocks block_offset .. block_offset + (the next first_block - its own) - 1."""
    counts = np.diff(np.append(seg_table["first_block"].astype(np.int64), total))
    runs = []
    for e, (seg, count) in enumerate(zip(seg_table, counts)):
        begin = int(seg["block_offset"]) * abi.BLOCK_ELEMS
        end = min((int(seg["block_offset"]) + int(count)) * abi.BLOCK_ELEMS, int(seg["n"]))
        runs += [(e, i, min(abi.CPU_TILE, end - i)) for i in range(begin, end, abi.CPU_TILE)]
    return np.array(runs, dtype=abi.RUN_DTYPE)


@pytest.fixture
def gpu(monkeypatch, checkpoints):
    monkeypatch.setattr(nvrtc, "kernel_image", lambda cc: (b"image", "test"))
    base, _ = checkpoints

    def make(bundle, **kw):
        return G.GpuRebuilder(bundle, base, device=HostDevice(), **kw)

    return make


SCHEMES = [("tvq", dict(bits=b)) for b in range(1, 9)] + [
    ("tvq", dict(bits=3, granularity="channel")), ("tvq", dict(bits=2, granularity="group:16")),
    ("fq", dict(bits=4)), ("rtvq", {}), ("tswitch", dict(keep=0.25)), ("emr", dict(bits=4)),
]


def bf16_of(a: np.ndarray) -> np.ndarray:
    """decode.h's rounding of float32 values to bfloat16, as bits (what a bf16 output holds)."""
    return reference._to_16bit(np.ascontiguousarray(a, np.float32).reshape(-1), abi.BF16).reshape(a.shape)


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


def _emulation():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "kernels", "test_rebuild_emulated.py")
    spec = importlib.util.spec_from_file_location("rebuild_emulated", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def emulated_kernel(tmp_path_factory):
    """rebuild.cu's kernels on CPU threads (tests/kernels/emulate), called as tv_rebuild_p<width>."""
    emulation = _emulation()
    return emulation.load_emulator(emulation.build_emulator(str(tmp_path_factory.mktemp("emu") / "emulate.so")))


class KernelDevice(HostDevice):
    """HostDevice whose launches run the CUDA kernel source itself (emulated), not the CPU library."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def launch(self, function, grid, block, args):
        (_, segs), (_, nseg), (_, terms), (_, total), (_, tiles) = args
        assert block == abi.BLOCK_THREADS and grid == -(-total // tiles)
        width = next(w for w, name in nvrtc.KERNELS.items() if name == function)
        seg_table = np.frombuffer((ctypes.c_char * (nseg * abi.SEGMENT_DTYPE.itemsize)).from_address(segs),
                                  dtype=abi.SEGMENT_DTYPE)
        term_table = np.frombuffer((ctypes.c_char * max(1, int((seg_table["term_begin"] + seg_table["term_count"])
                                                               .max()) * abi.TERM_DTYPE.itemsize)).from_address(terms),
                                   dtype=np.uint8).view(abi.TERM_DTYPE)
        self.launches.append(SimpleNamespace(function=function, grid=grid, segments=seg_table.copy()))
        self.kernel(width, seg_table, term_table, tiles, total)


@pytest.mark.parametrize("scheme,kw", [("tvq", dict(bits=3, granularity="channel")), ("rtvq", {}),
                                       ("tswitch", dict(keep=0.3)), ("emr", dict(bits=2)), ("fq", dict(bits=5))])
def test_the_kernel_source_behind_the_rebuilder_matches_the_cpu(monkeypatch, emulated_kernel, bundle_factory,
                                                                checkpoints, scheme, kw):
    """GpuRebuilder's tables and launches, run by rebuild.cu itself (on CPU threads): fp32, fp16 and
    bfloat16 outputs of a one-task switch and a three-task mix, bit for bit against CpuRebuilder."""
    monkeypatch.setattr(nvrtc, "kernel_image", lambda cc: (b"image", "test"))
    base, _ = checkpoints
    bundle = bundle_factory(scheme, **kw)
    r = G.GpuRebuilder(bundle, base, device=KernelDevice(emulated_kernel), tiles_per_block=2)
    ref = CpuRebuilder(bundle, base)
    for mix in ({"b": 1.0}, {"a": 0.5, "b": 0.3, "c": -0.2}):
        want32 = ref.allocate("float32")
        ref.rebuild(mix, want32)
        for dtype in ("float32", "float16", "bfloat16"):
            out = r.allocate(dtype)
            r.rebuild(mix, out)
            if dtype == "bfloat16":
                want = {n: bf16_of(a) for n, a in want32.items()}
            else:
                want = ref.allocate(dtype)
                ref.rebuild(mix, want)
            for name, t in out.items():
                assert r.download(t).tobytes() == want[name].tobytes(), (mix, dtype, name)
    assert {launch.function for launch in r.device.launches} <= set(nvrtc.KERNELS.values())


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


def test_the_resident_base_is_never_an_output(gpu, bundle_factory, checkpoints):
    """Every later switch reads the resident base: a rebuild into it (or into part of it) is refused."""
    base, _ = checkpoints
    r = gpu(bundle_factory("tvq", bits=4))
    before = {n: r.download(t) for n, t in r.base.items()}
    name = next(iter(r.base))
    out = dict(r.allocate(), **{name: r.base[name]})
    for outs in (r.base, out):
        with pytest.raises(TvswitchError, match="resident base"):
            r.rebuild({"c": 1.0}, outs)
    assert r.device.launches == []
    for n, t in r.base.items():
        assert r.download(t).tobytes() == before[n].tobytes()


def test_bfloat16_outputs_round_the_float32_result(gpu, bundle_factory, checkpoints):
    """A bfloat16 device buffer (named by its dtype: numpy has none) holds decode.h's rounding of
    the float32 result, for every tensor; allocate() makes them too."""
    base, _ = checkpoints
    bundle = bundle_factory("rtvq")
    r = gpu(bundle)
    ref = CpuRebuilder(bundle, base)
    want = ref.allocate("float32")
    mix = {"a": 0.5, "c": 0.25}
    ref.rebuild(mix, want)
    for out in (r.allocate("bfloat16"), {n: G.DeviceTensor(t.ptr, t.shape, "bfloat16")
                                         for n, t in r.allocate("float16").items()}):
        assert all(abi.element_code(t.dtype) == abi.BF16 and t.itemsize == 2 for t in out.values())
        r.rebuild(mix, out)
        assert int(r.device.launches[-1].segments["out_dtype"].max()) == abi.BF16
        for n, t in out.items():
            got = r.download(t)  # bits (uint16), or ml_dtypes' bfloat16 where something imported it
            assert got.dtype.itemsize == 2 and np.array_equal(got.view(np.uint16), bf16_of(want[n])), n
    assert r.bytes_moved(mix, "bfloat16") == r.bytes_moved(mix, "float16")
    with pytest.raises(TvswitchError, match="bfloat16"):
        r.allocate("float64")


def test_emr_mix_bytes_count_the_shared_codes_once_per_task(gpu, bundle_factory, checkpoints):
    """A K-task EMR mix is K terms over the same codes, each with its own mask: the kernel reads the
    codes K times and bytes_moved says so (RTVQ's shared base, merged into one term, counts once)."""
    bundle = bundle_factory("emr", bits=4)
    r = gpu(bundle)
    one, three = r.mix_tables({"a": 0.3}), r.mix_tables({"a": 0.3, "b": 0.3, "c": 0.3})  # both read every base tensor
    codes = [k for k in three.reads if k.startswith("@shared/")]
    assert len(codes) == 3 * len(set(codes)) and len(three.terms) == 3 * len(one.terms)
    shared = sum(bundle.payload(k).nbytes for k in set(codes))
    own = sum(bundle.payload(k).nbytes for k in set(three.keys) - set(one.keys))  # b's and c's masks and raw tensors
    assert r.bytes_moved({"a": 0.3, "b": 0.3, "c": 0.3}) - r.bytes_moved({"a": 0.3}) == 2 * shared + own
    rtvq = gpu(bundle_factory("rtvq", filename="r.tvs"))
    merged = rtvq.mix_tables({"a": 0.3, "b": 0.3, "c": 0.3})
    assert len([k for k in merged.reads if k.startswith("@shared/")]) == len({k for k in merged.keys
                                                                             if k.startswith("@shared/")})


def test_a_repeated_switch_checks_nothing_again(gpu, bundle_factory, monkeypatch):
    """The same DeviceTensor objects and the same weights: no output check, no mix check, no upload,
    one launch with the arguments kept from the first time; the context made current each time."""
    r = gpu(bundle_factory("tvq", bits=4))
    out = r.allocate()
    r.rebuild({"a": 0.5, "b": 0.5}, out)
    checks, mixes = [], []
    real_check, real_mix = r._check_out, G.check_mix
    monkeypatch.setattr(r, "_check_out", lambda o: checks.append(1) or real_check(o))
    monkeypatch.setattr(G, "check_mix", lambda *a: mixes.append(1) or real_mix(*a))
    uploads, current = r.device.uploads, r.device.made_current
    for _ in range(3):
        r.rebuild({"b": 0.5, "a": 0.5}, dict(out))  # another dict and order, the same objects and weights
    assert (checks, mixes, r.device.uploads) == ([], [1], uploads)  # the reordered mix is checked once
    assert r.device.made_current == current + 3 and len(r.device.launches) == 4
    # New objects for the same buffers are checked, and reuse the tables uploaded for them.
    r.rebuild({"a": 0.5, "b": 0.5}, {n: G.DeviceTensor(t.ptr, t.shape, t.dtype) for n, t in out.items()})
    assert len(checks) == 1 and r.device.uploads == uploads
    # A mutated dict is a new set: a buffer swapped in for another is checked (and refused here).
    name, other = list(out)[:2]
    out[name] = G.DeviceTensor(out[other].ptr, out[name].shape, out[name].dtype)
    with pytest.raises(TvswitchError, match="overlap"):
        r.rebuild({"a": 0.5, "b": 0.5}, out)
    # Objects that are not DeviceTensor (a CUDA array's interface may change) are read every time.
    cai = {n: SimpleNamespace(__cuda_array_interface__={"data": (t.ptr, False), "shape": t.shape,
                                                        "typestr": t.dtype.str, "version": 3})
           for n, t in r.allocate().items()}
    checks.clear()
    r.rebuild({"a": 1.0}, cai)
    r.rebuild({"a": 1.0}, cai)
    assert len(checks) == 2


def test_a_bad_mix_is_refused_every_time(gpu, bundle_factory):
    r = gpu(bundle_factory("tvq", bits=2))
    out = r.allocate()
    for _ in range(2):  # a refused mix is never remembered as checked
        with pytest.raises(TvswitchError, match="finite"):
            r.rebuild({"a": float("nan")}, out)
        with pytest.raises(TvswitchError, match="no task"):
            r.rebuild({"zzz": 1.0}, out)
    assert r.device.launches == []


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


@pytest.mark.parametrize("group", [0, 2**31 + 5])
def test_group_sizes_outside_a_tensor_are_refused(group):
    plan = SimpleNamespace(terms=np.zeros(2, dtype=abi.TERM_DTYPE))
    plan.terms["kind"] = abi.KIND_CODES
    plan.terms["bits"] = 4
    plan.terms["group"] = [5, group]  # 0: a divide by zero; past 2^31 - 1: indices decode.h does not take
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
