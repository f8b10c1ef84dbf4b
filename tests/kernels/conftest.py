"""Random segment and term tables for holding a kernel build to the CPU library.

A case is every kind of term decode.h knows (codes of 1..8 bits with tensor-wide,
channel-like and odd group sizes, with and without masks; raw fp32 and fp16 values; masked
1-bit codes in the group layout) over
tensors of odd sizes, fp32/fp16/bf16 bases and outputs, and base coefficients of 1, 0
and 0.75.  ``Case.tables(out)`` fills the output addresses; the CPU library's result on
the same tables is the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Tuple

import numpy as np
import pytest

from tvswitch.kernels import abi, cpu
from tvswitch.kernels.packing import pack_groups, pack_sparse

ELEM = {abi.F32: np.float32, abi.F16: np.float16, abi.BF16: np.uint16}
#: Bytes around every output array that no rebuild may touch.
GUARD = 64
POISON = 0xA5


@dataclass
class Case:
    """Tables with host addresses, the arrays they point into, and output layouts."""

    segments: np.ndarray
    terms: np.ndarray
    arrays: List[np.ndarray]  # every input the tables point into (kept alive here)
    outs: List[Tuple[int, int, int]]  # per segment: (n, out dtype code, element offset)
    keep: List[np.ndarray] = field(default_factory=list)

    def new_outputs(self) -> List[np.ndarray]:
        """Poisoned output buffers with guards, each at its element offset (misaligned when odd)."""
        bufs = []
        for n, code, offset in self.outs:
            size = np.dtype(ELEM[code]).itemsize
            bufs.append(np.full(2 * GUARD + (n + offset) * size, POISON, dtype=np.uint8))
        return bufs

    def out_address(self, buf: np.ndarray, s: int) -> int:
        n, code, offset = self.outs[s]
        return buf.ctypes.data + GUARD + offset * np.dtype(ELEM[code]).itemsize

    def with_outputs(self, bufs: List[np.ndarray]) -> np.ndarray:
        segs = self.segments.copy()
        segs["out"] = [self.out_address(b, s) for s, b in enumerate(bufs)]
        return segs

    def reference(self) -> List[np.ndarray]:
        """The CPU library's outputs for this case."""
        bufs = self.new_outputs()
        cpu.rebuild(self.with_outputs(bufs), self.terms, self.arrays + bufs, 1)
        return bufs


def _f16_specials(rng: np.random.Generator, n: int) -> np.ndarray:
    """Normal values plus fp16 trouble: subnormals, sums that overflow to inf, exact ties.

    Every input stays finite: a NaN's bits differ between CPU and GPU arithmetic.
    """
    v = rng.normal(size=n).astype(np.float32)
    pick = rng.integers(0, 8, size=n)
    v[pick == 0] *= np.float32(1e-6)  # fp16 subnormal range
    v[pick == 1] = np.float32(65000.0) * np.sign(v[pick == 1])  # sums overflow fp16
    v[pick == 2] = np.float32(1.0 + 2.0 ** -11)  # a tie between two fp16 values
    return v


def make_case(seed: int, sizes: Tuple[int, ...], terms_per_segment: Tuple[int, int] = (1, 3),
              misalign: bool = False) -> Case:
    rng = np.random.default_rng(seed)
    arrays: List[np.ndarray] = []

    def keep(a: np.ndarray) -> int:
        arrays.append(a)
        return a.ctypes.data

    segs = np.zeros(len(sizes), dtype=abi.SEGMENT_DTYPE)
    rows = []
    outs = []
    first = 0
    for s, n in enumerate(sizes):
        base_code = int(rng.choice([abi.F32, abi.F16, abi.BF16]))
        out_code = int(rng.choice([abi.F32, abi.F16, abi.BF16]))
        base = _f16_specials(rng, n)
        if base_code == abi.F16:
            base = base.astype(np.float16)
        elif base_code == abi.BF16:
            base = (base.view(np.uint32) >> 16).astype(np.uint16)
        coef = float(rng.choice([1.0, 1.0, 0.0, 0.75]))
        segs[s]["base"] = keep(base) if coef != 0.0 or rng.random() < 0.5 else 0
        segs[s]["base_dtype"] = base_code
        segs[s]["out_dtype"] = out_code
        segs[s]["base_coef"] = coef
        segs[s]["n"] = n
        segs[s]["first_block"] = first
        first += -(-n // abi.BLOCK_ELEMS)
        segs[s]["term_begin"] = len(rows)
        count = int(rng.integers(terms_per_segment[0], terms_per_segment[1] + 1))
        for _ in range(count):
            rows.append(_term(rng, n, keep))
        segs[s]["term_count"] = count
        outs.append((n, out_code, int(rng.integers(1, 4)) if misalign and rng.random() < 0.5 else 0))
    terms = np.array(rows, dtype=abi.TERM_DTYPE) if rows else np.zeros(0, dtype=abi.TERM_DTYPE)
    return Case(segs, terms, arrays, outs)


def _term(rng: np.random.Generator, n: int, keep) -> tuple:
    weight = float(rng.choice([1.0, 0.5, -0.3, 0.125]))
    mask = 0
    if rng.random() < 0.35:
        words = rng.integers(0, 2**32, size=abi.code_words(n, 1), dtype=np.uint64).astype(np.uint32)
        words[-1] = 0
        mask = keep(words)
    kind = rng.choice(["codes"] * 6 + ["f32", "f16", "groups", "sparse"])
    if kind == "groups":  # masked 1-bit codes by groups of four (FORMAT.md 3.3), sparse or dense
        index, data = pack_groups(rng.random(n) < rng.choice([0.02, 0.3, 0.9]), rng.integers(0, 2, n))
        group = int(rng.choice([max(n, 1), 64, 1000]))
        params = rng.uniform(-0.1, 0.1, size=2 * max(-(-n // group), 1)).astype(np.float32)
        return (keep(data), keep(index), keep(params), group, weight, abi.KIND_GROUPS, 1, data.size, 0)
    if kind == "sparse":  # b-bit codes, groups of the fill code left out (FORMAT.md 3.4)
        bits = int(rng.integers(1, 9))
        fill = int(rng.integers(0, 1 << bits))
        codes = np.where(rng.random(n) < rng.choice([0.02, 0.3, 0.9]), rng.integers(0, 1 << bits, n), fill)
        index, words = pack_sparse(codes, bits, fill)
        group = int(rng.choice([max(n, 1), 3, 64, 1000]))
        params = rng.uniform(-0.1, 0.1, size=2 * max(-(-n // group), 1)).astype(np.float32)
        return (keep(words), keep(index), keep(params), group, weight, abi.KIND_SPARSE, bits, words.size, fill)
    if kind == "f32":
        return (keep(rng.normal(size=n).astype(np.float32)), mask, 0, 1, weight, abi.KIND_RAW_F32, 0, 0, 0)
    if kind == "f16":
        return (keep(_f16_specials(rng, n).astype(np.float16)), mask, 0, 1, weight, abi.KIND_RAW_F16, 0, 0, 0)
    bits = int(rng.integers(1, 9))
    group = int(rng.choice([max(n, 1), 1, 3, 7, 64, 100, 384, 1000]))
    words = rng.integers(0, 2**32, size=abi.code_words(n, bits), dtype=np.uint64).astype(np.uint32)
    words[-1] = 0
    groups = max(-(-n // group), 1)
    params = np.empty(2 * groups, dtype=np.float32)
    params[0::2] = rng.uniform(1e-3, 0.1, size=groups)
    params[1::2] = rng.uniform(-0.2, 0.0, size=groups)
    return (keep(words), mask, keep(params), group, weight, abi.KIND_CODES, bits, 0, 0)


#: Sizes with every shape of tail: empty, one element, under a tile, exact tiles, odd.
SIZES = (1, 0, 3, 1023, 1024, 1025, 2048 + 5, 777, 4096, 13, 2500)


def outputs_equal(got: List[np.ndarray], want: List[np.ndarray]) -> Dict[int, str]:
    """Segments whose output bytes (guards included) differ, with the first bad element."""
    bad = {}
    for s, (g, w) in enumerate(zip(got, want)):
        if not np.array_equal(g, w):
            i = int(np.flatnonzero(g != w)[0])
            bad[s] = "byte %d: got %#x want %#x" % (i, g[i], w[i])
    return bad


@pytest.fixture
def kit() -> SimpleNamespace:
    """This module's helpers (test modules cannot import a conftest under importlib mode)."""
    if not cpu.available():
        pytest.skip(cpu.unavailable_reason() or "the CPU library is not built")
    return SimpleNamespace(make_case=make_case, SIZES=SIZES, outputs_equal=outputs_equal, GUARD=GUARD)
