"""numpy transcription of decode.h: the executable spec the compiled builds are held to.

It performs the arithmetic contract of decode.h with the same float32 operations in the
same order, so the CPU library and the CUDA kernels must match it bit for bit.  It is
also the rebuild of last resort where the CPU library could not be built.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from tvswitch.kernels import abi
from tvswitch.kernels.packing import unpack_codes, unpack_groups, unpack_mask, unpack_sparse


def dequantize(codes: np.ndarray, params: np.ndarray, group: int) -> np.ndarray:
    """(float)q * scale + offset per group, in float32 as decode.h computes it."""
    g = np.arange(codes.size) // group
    scale = params[0::2][g]
    offset = params[1::2][g]
    scaled = codes.astype(np.float32) * scale
    return scaled + offset


def term_value(term: np.void, n: int, arrays: dict) -> np.ndarray:
    """Value of one term for elements 0..n-1; ``arrays`` maps addresses to the arrays."""
    kind = int(term["kind"])
    if kind == abi.KIND_GROUPS:  # the mask field holds the group index, the codes field the bytes
        keep, codes = unpack_groups(arrays[int(term["mask"])], arrays[int(term["codes"])], n)
        v = dequantize(codes, arrays[int(term["params"])], int(term["group"]))
        return np.where(keep, v, np.float32(0))
    if kind == abi.KIND_SPARSE:  # the mask field holds the group index, and there is no mask
        codes = unpack_sparse(arrays[int(term["mask"])], arrays[int(term["codes"])], int(term["bits"]),
                              int(term["fill"]), n)
        return dequantize(codes, arrays[int(term["params"])], int(term["group"]))
    if kind == abi.KIND_CODES:
        codes = unpack_codes(arrays[int(term["codes"])], int(term["bits"]), n)
        v = dequantize(codes, arrays[int(term["params"])], int(term["group"]))
    elif kind == abi.KIND_RAW_F32:
        v = arrays[int(term["codes"])].reshape(-1)[:n].astype(np.float32)
    elif kind == abi.KIND_RAW_F16:
        v = arrays[int(term["codes"])].reshape(-1)[:n].astype(np.float32)
    else:
        raise ValueError("unknown term kind %d" % kind)
    if int(term["mask"]):
        v = np.where(unpack_mask(arrays[int(term["mask"])], n), v, np.float32(0))
    return v


def rebuild_reference(segments: np.ndarray, terms: np.ndarray, arrays: Sequence[np.ndarray],
                      runs: Optional[np.ndarray] = None) -> None:
    """Run the tables like ``tv_rebuild_cpu``, with the arrays they point into given; with
    ``runs`` (``abi.RUN_DTYPE``), like ``tv_rebuild_cpu_runs_checked``: only those elements
    are written."""
    by_address = {a.__array_interface__["data"][0]: a for a in arrays}
    for s, seg in enumerate(segments):
        n = int(seg["n"])
        if runs is None:
            where = slice(0, n)
        else:
            mine = runs[runs["segment"] == s]
            where = np.concatenate([np.arange(r["start"], r["start"] + r["len"]) for r in mine]
                                   + [np.zeros(0, dtype=np.int64)])
        coef = np.float32(seg["base_coef"])
        if coef == 0:
            acc = np.zeros(n, dtype=np.float32)
        else:
            acc = coef * _as_float32(by_address[int(seg["base"])], int(seg["base_dtype"]), n)
        for j in range(int(seg["term_begin"]), int(seg["term_begin"]) + int(seg["term_count"])):
            t = terms[j]
            acc = acc + np.float32(t["weight"]) * term_value(t, n, by_address)
        out = by_address[int(seg["out"])].reshape(-1)
        code = int(seg["out_dtype"])
        if code == abi.F32:
            out.view(np.float32)[where] = acc[where]
        else:  # 16-bit outputs are written as bits, whatever numpy type the buffer has
            out.view(np.uint16)[where] = _to_16bit(acc, code)[where]


def _as_float32(a: np.ndarray, code: int, n: int) -> np.ndarray:
    flat = a.reshape(-1)[:n]
    if code == abi.BF16:
        return (flat.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    if code == abi.F16:
        return flat.view(np.float16).astype(np.float32)
    return flat.view(np.float32)


def _to_16bit(acc: np.ndarray, code: int) -> np.ndarray:
    if code == abi.F16:
        return acc.astype(np.float16).view(np.uint16)
    bits = acc.view(np.uint32).astype(np.uint64)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)
