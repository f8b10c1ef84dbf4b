"""Bit packing and unpacking: decode.h's code streams in numpy (FORMAT.md, "Code streams").

Value i of a b-bit stream sits at stream bits [b*i, b*i + b); stream bit k is bit k & 31
of little-endian uint32 word k >> 5; one zero word ends every stream.  32 values of b
bits fill exactly b words, so the stream is packed 32 values (one row of b words) at a
time, column by column.
"""
from __future__ import annotations

import numpy as np

from tvswitch.kernels.abi import code_words


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes in [0, 2^bits) into a b-bit uint32 stream."""
    if not 1 <= bits <= 8:
        raise ValueError("code width must be 1..8 bits, got %d" % bits)
    flat = np.asarray(codes).reshape(-1)
    n = flat.size
    if n and int(flat.max()) >> bits:
        raise ValueError("a code does not fit in %d bits" % bits)
    rows = -(-n // 32)
    padded = np.zeros(rows * 32, dtype=np.uint64)
    padded[:n] = flat
    padded = padded.reshape(rows, 32)
    words = np.zeros((rows, bits), dtype=np.uint64)
    for j in range(32):
        bit = j * bits
        w, s = bit >> 5, bit & 31
        words[:, w] |= (padded[:, j] << np.uint64(s)) & np.uint64(0xFFFFFFFF)
        if s + bits > 32:
            words[:, w + 1] |= padded[:, j] >> np.uint64(32 - s)
    out = np.zeros(code_words(n, bits), dtype=np.uint32)
    packed = words.reshape(-1).astype(np.uint32)
    # rows * bits words hold the values; the stream keeps ceil(n*b/32) of them plus one zero.
    used = code_words(n, bits) - 1
    out[:used] = packed[:used]
    return out


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Pack a boolean array into a 1-bit stream."""
    return pack_codes(np.asarray(mask, dtype=bool).astype(np.uint8), 1)


def unpack_codes(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Codes 0..n-1 of a b-bit stream, as uint32 (FORMAT.md, "Code streams")."""
    if words.dtype != np.uint32 or words.size < code_words(n, bits):
        raise ValueError("a %d-bit stream of %d values needs %d uint32 words, got %d %s"
                         % (bits, n, code_words(n, bits), words.size, words.dtype))
    bit = np.arange(n, dtype=np.uint64) * np.uint64(bits)
    w = (bit >> np.uint64(5)).astype(np.intp)
    s = bit & np.uint64(31)
    window = words[w].astype(np.uint64) | (words[w + 1].astype(np.uint64) << np.uint64(32))
    return ((window >> s) & np.uint64((1 << bits) - 1)).astype(np.uint32)


def unpack_mask(words: np.ndarray, n: int) -> np.ndarray:
    """Bits 0..n-1 of a 1-bit stream, as bool."""
    return unpack_codes(words, 1, n).astype(bool)
