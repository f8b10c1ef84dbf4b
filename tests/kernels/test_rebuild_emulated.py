"""rebuild.cu run on CPU threads (tests/kernels/emulate) against the CPU library, bit for bit.

No GPU is needed: the kernel source is compiled as host C++ under a small CUDA shim, so
its segment search, tiling, prefetching, vector and scalar paths and tails run here, with
UBSan's alignment check standing in for the GPU's fault on a misaligned vector access.
Seeds are fresh per run and named in every failure.  What only a GPU can check (its
conversion instructions, real concurrency) is in test_gpu_rebuild.py.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from typing import Optional, Tuple

import numpy as np
import pytest

from tvswitch.kernels import abi

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "kernels")


def build_emulator(out: str, defines: Tuple[str, ...] = ()) -> str:
    """Compile harness.cpp (rebuild.cu under shim.h) into a shared library; misaligned vector
    accesses abort it (UBSan's alignment check, as the GPU faults on them)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed: the kernel emulation is compiled as C++20")
    subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall",
                    "-Wno-unknown-pragmas", "-Werror", "-pthread", "-shared", "-fPIC",
                    "-fsanitize=alignment", "-fno-sanitize-recover=alignment", *["-D" + d for d in defines],
                    "-I", KERNELS, "-I", os.path.join(HERE, "emulate"),
                    os.path.join(HERE, "emulate", "harness.cpp"), "-o", out], check=True)
    return out


def load_emulator(lib: str):
    """A function running (prefetch, segments, terms, tiles_per_block) through the emulated kernel."""
    dll = ctypes.CDLL(lib)
    dll.tv_emulate.argtypes = [ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32,
                               ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
    dll.tv_emulate.restype = ctypes.c_int

    def run(prefetch: int, segments: np.ndarray, terms: np.ndarray, tiles_per_block: int,
            total: Optional[int] = None) -> None:
        """``total``: the launch's blocks (default: the last segment's tensor to its end)."""
        if total is None:
            total = int(segments[-1]["first_block"]) + -(-int(segments[-1]["n"]) // abi.BLOCK_ELEMS)
        grid = -(-total // tiles_per_block)
        rc = dll.tv_emulate(prefetch, grid, segments.ctypes.data, len(segments),
                            terms.ctypes.data if len(terms) else None, total, tiles_per_block)
        assert rc == 0

    return run


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return load_emulator(build_emulator(str(tmp_path_factory.mktemp("emulate") / "emulate.so")))


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


@pytest.mark.parametrize("prefetch,tiles", [(2, 1), (4, 3), (10, 2)])
@pytest.mark.parametrize("misalign", [False, True])
def test_kernel_matches_cpu_library(emulator, kit, prefetch, tiles, misalign):
    seed = fresh_seed()
    case = kit.make_case(seed, kit.SIZES, terms_per_segment=(1, 4), misalign=misalign)
    want = case.reference()
    got = case.new_outputs()
    emulator(prefetch, case.with_outputs(got), case.terms, tiles)
    assert kit.outputs_equal(got, want) == {}, "seed %d" % seed


def test_tiles_no_segment_owns_are_skipped(emulator, kit):
    """A table whose first segment starts at tile 3 and whose segments leave gaps: the tiles
    before and between them write nothing.  A decoy launch first leaves its segment in the
    block's shared memory (the shim keeps it between launches, as a GPU may hold anything
    there); a kernel that used it for the tiles before the first segment would rewrite the
    decoy's output from its changed input."""
    seed = fresh_seed()
    decoy_in = np.ones(4096, np.float32)
    decoy_out = np.zeros(4096, np.float32)
    decoy_terms = np.array([(decoy_in.ctypes.data, 0, 0, 1, 1.0, abi.KIND_RAW_F32, 0, 0, 0)], dtype=abi.TERM_DTYPE)
    decoy = np.zeros(1, dtype=abi.SEGMENT_DTYPE)
    decoy[0] = (0, decoy_out.ctypes.data, 4096, 0, 0.0, abi.F32, abi.F32, 0, 1, 0)
    case = kit.make_case(seed, (1500, 17, 4096), terms_per_segment=(1, 3))
    for tiles in (1, 2, 5):
        emulator(4, decoy, decoy_terms, 1)
        assert (decoy_out == 1.0).all()
        decoy_in[...] = 2.0
        got = case.new_outputs()
        segs = case.with_outputs(got)
        segs["first_block"] = [3, 7, 9]  # 1500 elements: tiles 3-4; 17: tile 7; 4096: tiles 9-12
        emulator(4, segs, case.terms, tiles)
        assert kit.outputs_equal(got, case.reference()) == {}, "seed %d, %d tiles per block" % (seed, tiles)
        assert (decoy_out == 1.0).all(), "a tile before the first segment wrote the previous launch's segment"
        decoy_in[...] = 1.0


_MISALIGNED_RUN = """
import ctypes, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_rebuild_emulated import load_emulator
from tvswitch.kernels import abi
run = load_emulator(sys.argv[1])
n = 1024
base = np.ones(n, np.float32)
out = np.zeros(n + 4, np.float32)  # the output starts one float in: 4-byte, not 16-byte, aligned
values = np.full(n, 0.5, np.float32)
terms = np.array([(values.ctypes.data, 0, 0, 1, 1.0, abi.KIND_RAW_F32, 0, 0, 0)], dtype=abi.TERM_DTYPE)
segs = np.zeros(1, dtype=abi.SEGMENT_DTYPE)
segs[0] = (base.ctypes.data, out.ctypes.data + 4 * int(sys.argv[3]), n, 0, 1.0, abi.F32, abi.F32, 0, 1, 0)
run(2, segs, terms, 1)
assert (out[int(sys.argv[3]):][:n] == 1.5).all()
print("written")
"""


@pytest.mark.parametrize("ignore_alignment", [False, True])
def test_a_misaligned_vector_access_fails_the_emulation(tmp_path, ignore_alignment):
    """The shim's float4/uint2 carry the GPU's alignment and the harness is built with UBSan's
    alignment check: a kernel that skipped tv_aligned() and stored a float4 at a 4-byte
    aligned output is stopped (run in a child process, since the check aborts)."""
    defines = ("TV_EMULATE_IGNORE_ALIGNMENT",) if ignore_alignment else ()
    lib = build_emulator(str(tmp_path / "emulate.so"), defines)
    results = []
    for offset in (1, 0):  # misaligned by one float, then aligned
        results.append(subprocess.run([sys.executable, "-c", _MISALIGNED_RUN, lib, HERE, str(offset)],
                                      capture_output=True, text=True, timeout=300))
    misaligned, aligned = results
    assert aligned.returncode == 0 and "written" in aligned.stdout, aligned.stderr
    if ignore_alignment:
        assert misaligned.returncode != 0 and "misaligned address" in misaligned.stderr, misaligned.stderr
    else:  # the real kernel sees the address and takes the scalar path
        assert misaligned.returncode == 0 and "written" in misaligned.stdout, misaligned.stderr


def test_terms_beyond_prefetch_and_shared_memory(emulator, kit):
    """40 terms: 10 prefetched, the rest one by one, and read from global (> 32 shared)."""
    seed = fresh_seed()
    case = kit.make_case(seed, (1500, 2049, 5), terms_per_segment=(33, 40))
    assert case.segments["term_count"].max() > 32
    want = case.reference()
    got = case.new_outputs()
    emulator(10, case.with_outputs(got), case.terms, 2)
    assert kit.outputs_equal(got, want) == {}, "seed %d" % seed


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
            cpu.rebuild(tables, case.terms, case.arrays + bases, 1)
        else:
            run(2, tables, case.terms, 1)
        results.append(bases)
    for got, want in zip(*results):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def _indexed_terms_match(emulator, prefetch, sizes, term_rows):
    """Segments of the given (size, output dtype) whose terms ``term_rows(n, keep)`` gives
    (table rows, their arrays kept alive in ``keep``): the CUDA source under emulation, the
    CPU library and the numpy reference write the same bytes."""
    from tvswitch.kernels import cpu, reference

    rng = np.random.default_rng(11)
    keep, outs, segs, rows = [], [], np.zeros(len(sizes), dtype=abi.SEGMENT_DTYPE), []
    for s, (n, out_code) in enumerate(sizes):
        base = rng.normal(size=n).astype(np.float32)
        out = np.zeros(n, np.float32 if out_code == abi.F32 else np.uint16)
        begin = len(rows)
        rows += term_rows(n, keep)
        keep += [base, out]
        outs.append(out)
        segs[s] = (base.ctypes.data, out.ctypes.data, n, 0, 1.0, abi.F32, out_code, begin, len(rows) - begin, 0)
    segs["first_block"] = np.concatenate([[0], np.cumsum(-(-segs["n"].astype(np.int64) // abi.BLOCK_ELEMS))[:-1]])
    terms = np.array(rows, dtype=abi.TERM_DTYPE)
    emulator(prefetch, segs, terms, 1)
    got = [o.copy() for o in outs]
    cpu.rebuild(segs, terms, keep, 1)
    for g, o in zip(got, outs):
        assert np.array_equal(g.view(np.uint8), o.view(np.uint8))
    reference.rebuild_reference(segs, terms, keep)
    for g, o in zip(got, outs):
        assert np.array_equal(g.view(np.uint8), o.view(np.uint8))


@pytest.mark.parametrize("share", [0.03, 0.4])
def test_group_layout_terms_match_the_cpu_library_and_the_reference(emulator, share):
    """Terms in the group layout only (each found by its rank in the index), over sizes with
    partial groups and blocks, summed into fp32 and fp16 outputs."""
    from tvswitch.kernels.packing import pack_groups

    rng = np.random.default_rng(11)

    def term_rows(n, keep):
        rows = []
        for weight in (0.5, -1.25):
            index, data = pack_groups(rng.random(n) < share, rng.integers(0, 2, n))
            params = np.array([0.02, -0.01], np.float32)
            keep += [index, data, params]
            rows.append((data.ctypes.data, index.ctypes.data, params.ctypes.data, n, weight, abi.KIND_GROUPS, 1,
                         data.size, 0))
        return rows

    _indexed_terms_match(emulator, 4, ((5003, abi.F32), (1024, abi.F16), (4, abi.F32)), term_rows)


@pytest.mark.parametrize("share", [0.03, 0.4])
def test_sparse_layout_terms_match_the_cpu_library_and_the_reference(emulator, share):
    """Terms in the sparse layout only (a thread's group found by its rank, or filled), every
    width, over sizes with partial groups and blocks, into fp32 and fp16 outputs."""
    from tvswitch.kernels.packing import pack_sparse

    rng = np.random.default_rng(12)

    def term_rows(n, keep):
        rows = []
        for bits, weight in zip(range(1, 9), (0.5, -1.25, 0.75, 1.0, -0.5, 0.25, 2.0, -0.125)):
            fill = int(rng.integers(0, 1 << bits))
            codes = np.where(rng.random(n) < share, rng.integers(0, 1 << bits, n), fill)
            index, words = pack_sparse(codes, bits, fill)
            params = np.array([0.02, -0.01], np.float32)
            keep += [index, words, params]
            rows.append((words.ctypes.data, index.ctypes.data, params.ctypes.data, n, weight, abi.KIND_SPARSE, bits,
                         words.size, fill))
        return rows

    _indexed_terms_match(emulator, 10, ((5003, abi.F32), (1024, abi.F16), (6, abi.F32)), term_rows)
