"""The kernels on a real GPU against the CPU library, bit for bit (skipped where there is none).

Fresh random tables (a new seed every run, named in every failure) of every term kind,
width and group shape over odd sizes, outputs poisoned and guarded so that an unwritten
or overwritten byte fails; then GpuRebuilder against CpuRebuilder for every scheme and
width on exported bundles, into fp32, fp16 and bf16 outputs with poisoned guard bytes
before, between and past them (bench/gpu_rebuild.py's guarded_outputs).
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from tvswitch.kernels import abi, cpu, nvrtc
from tvswitch.kernels.cuda import has_gpu, open_device

_NO_GPU = has_gpu()
pytestmark = [
    pytest.mark.skipif(_NO_GPU is not None, reason="no CUDA device: %s" % _NO_GPU),
    pytest.mark.skipif(not cpu.available(), reason="CPU library not built: %s" % cpu.unavailable_reason()),
]


@pytest.fixture(scope="module")
def device():
    dev = open_device()
    yield dev
    dev.close()


@pytest.fixture(scope="module")
def functions(device):
    image, _ = nvrtc.kernel_image(device.cc)
    module = device.load_module(image)
    return {w: device.function(module, name) for w, name in nvrtc.KERNELS.items()}


def run_on_device(device, function, case, tiles_per_block):
    """Upload a case's inputs, relocate its tables, launch, and download the guarded outputs."""
    owned, moved = [], {}
    for a in case.arrays:
        ptr = device.alloc(a.nbytes)
        owned.append(ptr)
        device.upload(ptr, a)
        moved[a.ctypes.data] = ptr
    host_outs = case.new_outputs()
    dev_outs = []
    for buf in host_outs:
        ptr = device.alloc(buf.nbytes)
        owned.append(ptr)
        device.memset(ptr, int(buf[0]), buf.nbytes)
        dev_outs.append(ptr)
    segs = case.segments.copy()
    segs["base"] = [moved.get(int(p), 0) for p in segs["base"]]
    segs["out"] = [d + (case.out_address(h, s) - h.ctypes.data) for s, (h, d) in enumerate(zip(host_outs, dev_outs))]
    terms = case.terms.copy()
    for field in ("codes", "mask", "params"):
        terms[field] = [moved.get(int(p), 0) for p in terms[field]]
    tables = [device.alloc(segs.nbytes), device.alloc(max(terms.nbytes, 1))]
    owned += tables
    device.upload(tables[0], segs)
    if len(terms):
        device.upload(tables[1], terms)
    total = int(segs[-1]["first_block"]) + -(-int(segs[-1]["n"]) // abi.BLOCK_ELEMS)
    device.launch(function, -(-total // tiles_per_block), abi.BLOCK_THREADS,
                  [("ptr", tables[0]), ("u32", len(segs)), ("ptr", tables[1]), ("u32", total),
                   ("u32", tiles_per_block)])
    for buf, ptr in zip(host_outs, dev_outs):
        device.download(buf, ptr)
    for ptr in owned:
        device.free(ptr)
    return host_outs


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


@pytest.mark.parametrize("width,tiles", [(2, 1), (4, 4), (10, 2), (10, 7)])
@pytest.mark.parametrize("misalign", [False, True])
def test_kernels_match_the_cpu_library(device, functions, kit, width, tiles, misalign):
    seed = fresh_seed()
    case = kit.make_case(seed, kit.SIZES * 3, terms_per_segment=(1, 12), misalign=misalign)
    got = run_on_device(device, functions[width], case, tiles)
    assert kit.outputs_equal(got, case.reference()) == {}, "seed %d" % seed


def test_many_terms_beyond_shared_memory(device, functions, kit):
    seed = fresh_seed()
    case = kit.make_case(seed, (70001, 1025, 3), terms_per_segment=(33, 45))
    got = run_on_device(device, functions[10], case, 4)
    assert kit.outputs_equal(got, case.reference()) == {}, "seed %d" % seed


SCHEMES = [("tvq", dict(bits=b, granularity=g)) for b in range(1, 9) for g in ("tensor", "channel", "group:16")] + [
    ("fq", dict(bits=4)), ("rtvq", {}), ("rtvq", dict(budget_bits=2.4)), ("tswitch", dict(keep=0.25)),
    ("emr", dict(bits=4)), ("emr", dict(bits=2, granularity="channel")),
]


@pytest.fixture
def bench(monkeypatch):
    """bench/gpu_rebuild.py (guarded outputs, the expected bf16 rounding), imported from the repository."""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2]))
    import bench.gpu_rebuild

    return bench.gpu_rebuild


@pytest.mark.parametrize("scheme,kw", SCHEMES)
def test_gpu_rebuilder_matches_cpu_rebuilder(device, bench, scheme, kw, tmp_path):
    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.gpu_rebuild import GpuRebuilder
    from tvswitch.runtime.rebuild import CpuRebuilder

    seed = fresh_seed()
    odd = {"a.weight": (37, 29), "b.weight": (1031, 7), "c.bias": (1,), "d.weight": (3, 2049), "e.weight": (5, 3)}
    base, fts = bench.synthetic(odd, ["a", "b", "c"], "float32", seed)
    bundle = export_bundle(base, fts, str(tmp_path / "b.tvs"), name=scheme, **kw)
    ref = CpuRebuilder(bundle, base)
    specs = {n: s.shape for n, s in bundle.shared_specs.items()}
    with GpuRebuilder(bundle, base, device=device, tiles_per_block=2) as r:
        for mix in ({"a": 1.0}, {"a": 0.4, "b": 0.4, "c": 0.4}):
            for dtype in ("float32", "float16", "bfloat16"):
                out, arena, nbytes = bench.guarded_outputs(device, specs, dtype)
                try:
                    r.rebuild(mix, out)
                    want = bench.expected(ref, mix, dtype)
                    for name, t in out.items():
                        assert r.download(t).tobytes() == want[name].tobytes(), (mix, dtype, name, "seed %d" % seed)
                    assert bench.written_outside(device, out, arena, nbytes) == [], (mix, dtype, "seed %d" % seed)
                finally:
                    device.free(arena)
