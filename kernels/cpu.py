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
    if (lib.tv_sizeof_term(), lib.tv_sizeof_segment()) != (abi.TERM_DTYPE.itemsize, abi.SEGMENT_DTYPE.itemsize):
        _ERROR = "%s was built from another decode.h (struct sizes differ); rebuild it" % path
        return None
    _LIB = lib
    return lib


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    _load()
    return _ERROR


def rebuild(segments: np.ndarray, terms: np.ndarray, threads: int = 0) -> None:
    """Run the segment and term tables; ``threads`` <= 0 uses every core OpenMP sees.

    The tables hold raw addresses: the caller keeps every array they point into alive.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(_ERROR)
    if segments.dtype != abi.SEGMENT_DTYPE or terms.dtype != abi.TERM_DTYPE:
        raise TypeError("segment and term tables must use kernels.abi's dtypes")
    segments = np.ascontiguousarray(segments)
    terms = np.ascontiguousarray(terms)
    lib.tv_rebuild_cpu(segments.ctypes.data, len(segments), terms.ctypes.data if len(terms) else None, int(threads))
