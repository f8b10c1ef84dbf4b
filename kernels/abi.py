"""The structs of decode.h as numpy dtypes, and the constants both sides agree on.

Python fills the term and segment tables as structured arrays and hands their address
to the CPU library or copies them to the GPU; the struct sizes here must equal the C
ones, which the library reports and ``kernels.cpu`` compares at load, with its ABI version.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

KIND_CODES = 0
KIND_RAW_F32 = 1
KIND_RAW_F16 = 2
KIND_GROUPS = 3
KIND_SPARSE = 4

F32 = 0
F16 = 1
BF16 = 2

BLOCK_THREADS = 256
ELEMS_PER_THREAD = 4
BLOCK_ELEMS = BLOCK_THREADS * ELEMS_PER_THREAD

#: Largest tensor a segment may hold: decode.h indexes elements with 32-bit integers.
MAX_ELEMENTS = 2**31 - 1

#: The largest finite float32: decode.h's arithmetic, weights and scales are binary32.
FLOAT32_MAX = 3.4028234663852886e38

TERM_DTYPE = np.dtype(
    {
        # "fill" last by name (tables are filled with tuples in this order), at offset 28
        "names": ["codes", "mask", "params", "group", "weight", "kind", "bits", "aux", "fill"],
        "formats": ["<u8", "<u8", "<u8", "<u4", "<f4", "<u4", "<u4", "<u4", "<u4"],
        "offsets": [0, 8, 16, 24, 32, 36, 40, 44, 28],
        "itemsize": 48,
    }
)

SEGMENT_DTYPE = np.dtype(
    {
        "names": [
            "base", "out", "n", "first_block", "base_coef",
            "base_dtype", "out_dtype", "term_begin", "term_count", "block_offset",
        ],
        "formats": ["<u8", "<u8", "<u8", "<u8", "<f4", "<u4", "<u4", "<u4", "<u4", "<u4"],
        "offsets": [0, 8, 16, 24, 32, 36, 40, 44, 48, 52],
        "itemsize": 56,
    }
)

#: Elements [start, start + len) of one segment (cpu_rebuild.c's tv_run): a work item of a
#: rebuild that writes part of a tensor; start a multiple of 32, len at most CPU_TILE.
RUN_DTYPE = np.dtype({"names": ["segment", "start", "len"], "formats": ["<u4", "<u4", "<u4"],
                      "offsets": [0, 4, 8], "itemsize": 12})

#: cpu_rebuild.c's TILE: the most elements one work item covers.
CPU_TILE = 4096

#: A buffer the tables may point into (cpu_rebuild.c's tv_extent): begin address, bytes.
EXTENT_DTYPE = np.dtype({"names": ["begin", "bytes"], "formats": ["<u8", "<u8"], "offsets": [0, 8], "itemsize": 16})

#: tv_rebuild_cpu_runs_checked's fault for a run outside its segment (``where`` is then a run).
CHECK_RUN = 9

#: tv_check_tables' faults: what of a segment reaches outside the buffers it was given.
CHECK_FAULTS = {
    1: "its size, dtype codes, term range or block offset",
    2: "its base",
    3: "its output",
    4: "a term's kind, width or group",
    5: "a term's codes",
    6: "a term's (scale, offset) pairs",
    7: "a term's mask",
    8: "a term's values",
    CHECK_RUN: "a run's segment or element range",
}

#: The C library's tv_abi_version(): what these tables and entry points are.
ABI_VERSION = 5

#: decode.h's element types, by dtype name.
ELEMENT_CODES = {"float32": F32, "float16": F16, "bfloat16": BF16}


def element_code(dtype: Any) -> Optional[int]:
    """decode.h's code for a float32, float16 or bfloat16 dtype or its name (a device buffer
    of bfloat16 has only a name where ml_dtypes is not installed); None for any other.

    Remembered per dtype: a switch asks once per tensor, and a dtype's name takes
    microseconds to make."""
    if isinstance(dtype, str):
        return ELEMENT_CODES.get(dtype)
    try:
        return _CODES_BY_DTYPE[dtype]
    except KeyError:
        pass
    except TypeError:  # unhashable: not a dtype
        return None
    try:
        code = ELEMENT_CODES.get(np.dtype(dtype).name)
    except TypeError:
        return None
    _CODES_BY_DTYPE[dtype] = code
    return code


_CODES_BY_DTYPE: dict = {}


def dtype_code(dtype: Any) -> int:
    """``element_code``, refusing a dtype decode.h has no element type for."""
    code = element_code(dtype)
    if code is None:
        raise ValueError("decode.h has no element type for %s" % dtype)
    return code


def code_words(n: int, bits: int) -> int:
    """uint32 words of a b-bit stream of n values, the trailing zero word included."""
    return (n * bits + 31) // 32 + 1
