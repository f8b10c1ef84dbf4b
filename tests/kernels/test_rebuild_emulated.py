"""rebuild.cu run on CPU threads (tests/kernels/emulate) against the CPU library, bit for bit.

No GPU is needed: the kernel source is compiled as host C++ under a small CUDA shim, so
its segment search, tiling, prefetching, vector and scalar paths and tails run here.  What
only a GPU can check (its conversion instructions, real concurrency) is in
test_gpu_rebuild.py.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

from tvswitch.kernels import abi

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "kernels")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed: the kernel emulation is compiled as C++20")
    lib = str(tmp_path_factory.mktemp("emulate") / "emulate.so")
    subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall",
                    "-Wno-unknown-pragmas", "-Werror", "-pthread", "-shared", "-fPIC",
                    "-I", KERNELS, "-I", os.path.join(HERE, "emulate"),
                    os.path.join(HERE, "emulate", "harness.cpp"), "-o", lib], check=True)
    dll = ctypes.CDLL(lib)
    dll.tv_emulate.argtypes = [ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32,
                               ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
    dll.tv_emulate.restype = ctypes.c_int

    def run(prefetch: int, segments: np.ndarray, terms: np.ndarray, tiles_per_block: int) -> None:
        total = int(segments[-1]["first_block"]) + -(-int(segments[-1]["n"]) // abi.BLOCK_ELEMS)
        grid = -(-total // tiles_per_block)
        rc = dll.tv_emulate(prefetch, grid, segments.ctypes.data, len(segments),
                            terms.ctypes.data if len(terms) else None, total, tiles_per_block)
        assert rc == 0

    return run


@pytest.mark.parametrize("prefetch,tiles", [(2, 1), (4, 3), (10, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_cpu_library(emulator, kit, prefetch, tiles, seed):
    case = kit.make_case(seed, kit.SIZES, terms_per_segment=(1, 4), misalign=bool(seed))
    want = case.reference()
    got = case.new_outputs()
    emulator(prefetch, case.with_outputs(got), case.terms, tiles)
    assert kit.outputs_equal(got, want) == {}


def test_terms_beyond_prefetch_and_shared_memory(emulator, kit):
    """40 terms: 10 prefetched, the rest one by one, and read from global (> 32 shared)."""
    case = kit.make_case(7, (1500, 2049, 5), terms_per_segment=(33, 40))
    assert case.segments["term_count"].max() > 32
    want = case.reference()
    got = case.new_outputs()
    emulator(10, case.with_outputs(got), case.terms, 2)
    assert kit.outputs_equal(got, want) == {}


def test_output_may_alias_its_base(emulator, kit):
    case = kit.make_case(3, (3000, 1024, 17), terms_per_segment=(2, 3))
    segs = case.segments.copy()
    segs["base_coef"] = 1.0
    results = []
    for run in (emulator, None):
        bases = [np.random.default_rng(5).normal(size=int(s["n"])).astype(np.float32) for s in segs]
        tables = segs.copy()
        tables["base"] = tables["out"] = [b.ctypes.data for b in bases]
        tables["base_dtype"] = tables["out_dtype"] = abi.F32
        if run is None:
            from tvswitch.kernels import cpu
            cpu.rebuild(tables, case.terms, 1)
        else:
            run(2, tables, case.terms, 1)
        results.append(bases)
    for got, want in zip(*results):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
