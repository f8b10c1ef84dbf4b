"""The compiled CPU rebuild (cpu_rebuild.c over decode.h), loaded with ctypes.

setup.py builds it into the package as ``_tvcpu``.  It carries no CPython ABI, so the
same file serves any Python on the machine.  Where it is missing (a source tree that was
never built), ``available()`` says why and the caller falls back to ``reference``.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from typing import Iterable, Optional, Tuple, Union

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.kernels import abi

_LIB: Optional[ctypes.CDLL] = None
_ERROR: Optional[str] = None


def _find_library() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_tvcpu" + suffix)
        if os.path.exists(path):
            return path
    return None


def _load() -> Optional[ctypes.CDLL]:
    global _LIB, _ERROR
    if _LIB is not None or _ERROR is not None:
        return _LIB
    path = _find_library()
    if path is None:
        _ERROR = "the CPU library _tvcpu is not built (reinstall tvswitch with a C compiler: pip install .)"
        return None
    lib = ctypes.CDLL(path)
    lib.tv_abi_version.restype = ctypes.c_int
    if lib.tv_abi_version() != abi.ABI_VERSION:
        _ERROR = "%s is of ABI version %d, this tvswitch needs %d; rebuild it" % (path, lib.tv_abi_version(),
                                                                                 abi.ABI_VERSION)
        return None
    tables = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32]
    lib.tv_check_tables.argtypes = tables + [ctypes.POINTER(ctypes.c_uint32)]
    lib.tv_check_tables.restype = ctypes.c_int
    lib.tv_rebuild_cpu_checked.argtypes = tables + [ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)]
    lib.tv_rebuild_cpu_checked.restype = ctypes.c_int
    lib.tv_rebuild_cpu_runs_checked.argtypes = tables + [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                                         ctypes.POINTER(ctypes.c_uint32)]
    lib.tv_rebuild_cpu_runs_checked.restype = ctypes.c_int
    lib.tv_sizeof_term.restype = ctypes.c_uint32
    lib.tv_sizeof_segment.restype = ctypes.c_uint32
    lib.tv_sizeof_run.restype = ctypes.c_uint32
    lib.tv_cpu_set_path.argtypes = [ctypes.c_int]
    lib.tv_cpu_set_path.restype = ctypes.c_int
    lib.tv_cpu_path.restype = ctypes.c_int
    lib.tv_cpu_accum_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
    lib.tv_cpu_accum_row.restype = ctypes.c_int
    if (lib.tv_sizeof_term(), lib.tv_sizeof_segment(), lib.tv_sizeof_run()) != (
            abi.TERM_DTYPE.itemsize, abi.SEGMENT_DTYPE.itemsize, abi.RUN_DTYPE.itemsize):
        _ERROR = "%s was built from another decode.h (struct sizes differ); rebuild it" % path
        return None
    lib.tv_cpu_path()  # pick the instruction path now, before any thread rebuilds
    _LIB = lib
    return lib


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    _load()
    return _ERROR


#: The library's instruction paths (tv_cpu_set_path's codes): ``scalar`` is decode.h alone,
#: the reference the SIMD of ``portable`` (SSE2 or NEON code conversion), ``avx2``,
#: ``avx512`` (AVX2's rows with AVX-512VL lookups and mask registers, at 256 bits) and
#: ``neon`` (aarch64: the register-held rows at four lanes) is held to.
PATHS = {"auto": 0, "portable": 1, "avx2": 2, "scalar": 3, "avx512": 4, "neon": 5}


def path() -> str:
    """The instruction path rebuilds take: ``avx512``, ``avx2``, ``neon``, ``portable`` (SSE2, NEON or plain C) or
    ``scalar``."""
    lib = _require()
    code = lib.tv_cpu_path()
    return next(name for name, c in PATHS.items() if c == code)


def set_path(name: str) -> str:
    """Force an instruction path (``auto`` picks the fastest); the tests run each one.

    Not thread-safe: no rebuild may be running.  Raises ValueError for a path this CPU
    or build lacks.
    """
    if name not in PATHS:
        raise ValueError("no CPU path %r (paths: %s)" % (name, ", ".join(PATHS)))
    if _require().tv_cpu_set_path(PATHS[name]) < 0:
        raise ValueError("this CPU or build has no %s path" % name)
    return path()


def accumulate_row(path_name: str, acc: np.ndarray, term: np.ndarray, i: int, n: int) -> None:
    """Add CODES term ``term`` over elements i..i+31 to ``acc`` the way path ``path_name`` does in a
    rebuild (i a multiple of 32): what the tests compare the SIMD paths with decode.h by.

    ``acc`` is 32 float32 aligned to 32 bytes; raises ValueError for a path this CPU lacks.
    """
    if acc.dtype != np.float32 or acc.shape != (32,) or acc.ctypes.data % 32 or term.dtype != abi.TERM_DTYPE:
        raise ValueError("accumulate_row needs 32 aligned float32 and one abi.TERM_DTYPE term")
    if i % 32 or i + 32 > n:
        raise ValueError("row %d of a %d-element tensor is not a whole row" % (i, n))
    if _require().tv_cpu_accum_row(PATHS[path_name], acc.ctypes.data, term.ctypes.data, i, n) < 0:
        raise ValueError("this CPU or build has no %s path" % path_name)


def _require() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(_ERROR)
    return lib


Buffer = Union[np.ndarray, Tuple[int, int]]


class Extents:
    """The buffers tables may point into (arrays, or (address, bytes) pairs of device
    memory) as cpu_rebuild.c's tv_extent table, holding the arrays alive while it lives.

    Made once for buffers a caller reuses: reading an array's address from Python takes
    about a microsecond, and an 8-task mix names some 1,800 buffers (2 ms a switch).
    """

    def __init__(self, buffers: Iterable[Buffer] = ()):
        self._arrays = list(buffers)
        rows = [(b.ctypes.data, b.nbytes) if isinstance(b, np.ndarray) else (int(b[0]), int(b[1]))
                for b in self._arrays]
        self.table = np.array(rows, dtype=abi.EXTENT_DTYPE) if rows else np.zeros(0, dtype=abi.EXTENT_DTYPE)

    def __add__(self, other: "Extents") -> "Extents":
        both = Extents()
        both._arrays = self._arrays + other._arrays
        both.table = np.concatenate([self.table, other.table])
        return both


Buffers = Union[Extents, Iterable[Buffer]]


def extents(buffers: Buffers) -> Extents:
    """``buffers`` as an Extents (itself if it is one)."""
    return buffers if isinstance(buffers, Extents) else Extents(buffers)


def check_tables(segments: np.ndarray, terms: np.ndarray, buffers: Buffers) -> None:
    """Refuse tables that would read or write outside ``buffers`` (cpu_rebuild.c's
    tv_check_tables; the GPU rebuild checks its device tables here too)."""
    segments, terms = _tables(segments, terms)
    ext = extents(buffers).table  # held here: the call reads it through its address
    where = ctypes.c_uint32(0)
    fault = _require().tv_check_tables(*_args(segments, terms, ext), ctypes.byref(where))
    _raise(fault, where.value)


def rebuild(segments: np.ndarray, terms: np.ndarray, buffers: Buffers, threads: int = 0) -> None:
    """Run the segment and term tables; ``threads`` <= 0 uses every core OpenMP sees.

    The tables hold raw addresses into ``buffers`` (the payloads, bases and outputs), which
    the caller keeps alive; the library checks every address and size against them first
    and refuses tables that reach outside (a ``TvswitchError``, nothing written).
    """
    segments, terms = _tables(segments, terms)
    ext = extents(buffers).table  # held here: the call reads it through its address
    where = ctypes.c_uint32(0)
    fault = _require().tv_rebuild_cpu_checked(*_args(segments, terms, ext), int(threads), ctypes.byref(where))
    _raise(fault, where.value)


def rebuild_runs(segments: np.ndarray, terms: np.ndarray, runs: np.ndarray, buffers: Buffers,
                 threads: int = 0) -> None:
    """``rebuild`` over the element ranges ``runs`` (``abi.RUN_DTYPE``) only: what a switch
    runs when whole blocks of a tensor hold the same bits before and after it.  Tables and
    runs are checked first (a run outside its segment is refused, nothing written)."""
    segments, terms = _tables(segments, terms)
    if runs.dtype != abi.RUN_DTYPE:
        raise TypeError("runs must use kernels.abi.RUN_DTYPE")
    runs = np.ascontiguousarray(runs)
    ext = extents(buffers).table
    where = ctypes.c_uint32(0)
    fault = _require().tv_rebuild_cpu_runs_checked(*_args(segments, terms, ext),
                                                   runs.ctypes.data if len(runs) else None, len(runs),
                                                   int(threads), ctypes.byref(where))
    _raise(fault, where.value, "run" if fault == abi.CHECK_RUN else "segment")


def _tables(segments: np.ndarray, terms: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    if segments.dtype != abi.SEGMENT_DTYPE or terms.dtype != abi.TERM_DTYPE:
        raise TypeError("segment and term tables must use kernels.abi's dtypes")
    return np.ascontiguousarray(segments), np.ascontiguousarray(terms)


def _args(segments: np.ndarray, terms: np.ndarray, ext: np.ndarray) -> tuple:
    return (segments.ctypes.data, len(segments), terms.ctypes.data if len(terms) else None, len(terms),
            ext.ctypes.data if len(ext) else None, len(ext))


def _raise(fault: int, where: int, what: str = "segment") -> None:
    if fault:
        raise TvswitchError("the rebuild tables reach outside the buffers given (%s %d: %s); refused before "
                            "anything was read or written" % (what, where, abi.CHECK_FAULTS.get(fault, "fault %d" % fault)))
