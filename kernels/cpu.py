"""The compiled CPU rebuild (cpu_rebuild.c over decode.h), loaded with ctypes.

setup.py builds it into the package as ``_tvcpu``.  It carries no CPython ABI, so the
same file serves any Python on the machine.  Where it is missing (a source tree that was
never built), ``available()`` says why and the caller falls back to ``reference``.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from typing import Optional

import numpy as np

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
    lib.tv_rebuild_cpu.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int]
    lib.tv_rebuild_cpu.restype = ctypes.c_int
    lib.tv_sizeof_term.restype = ctypes.c_uint32
    lib.tv_sizeof_segment.restype = ctypes.c_uint32
    lib.tv_cpu_set_path.argtypes = [ctypes.c_int]
    lib.tv_cpu_set_path.restype = ctypes.c_int
    lib.tv_cpu_path.restype = ctypes.c_int
    lib.tv_cpu_accum_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
    lib.tv_cpu_accum_row.restype = ctypes.c_int
    if (lib.tv_sizeof_term(), lib.tv_sizeof_segment()) != (abi.TERM_DTYPE.itemsize, abi.SEGMENT_DTYPE.itemsize):
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
#: the reference the SIMD of ``portable`` (SSE2 or NEON code conversion) and ``avx2`` is held to.
PATHS = {"auto": 0, "portable": 1, "avx2": 2, "scalar": 3}


def path() -> str:
    """The instruction path rebuilds take: ``avx2``, ``portable`` (SSE2, NEON or plain C) or ``scalar``."""
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


def rebuild(segments: np.ndarray, terms: np.ndarray, threads: int = 0) -> None:
    """Run the segment and term tables; ``threads`` <= 0 uses every core OpenMP sees.

    The tables hold raw addresses: the caller keeps every array they point into alive.
    """
    lib = _require()
    if segments.dtype != abi.SEGMENT_DTYPE or terms.dtype != abi.TERM_DTYPE:
        raise TypeError("segment and term tables must use kernels.abi's dtypes")
    segments = np.ascontiguousarray(segments)
    terms = np.ascontiguousarray(terms)
    lib.tv_rebuild_cpu(segments.ctypes.data, len(segments), terms.ctypes.data if len(terms) else None, int(threads))
