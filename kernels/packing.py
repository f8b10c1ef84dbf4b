"""Bit packing and unpacking: decode.h's code streams in numpy (FORMAT.md, "Code streams"),
the groups layout of a masked 1-bit term (FORMAT.md 3.3) and the sparse layout of b-bit
codes (FORMAT.md 3.4), which share the group index.

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


#: Elements per group of the group layout, and groups per block of its index (one CUDA
#: block's 1024 elements), whose record is an offset word and GROUP_FLAG_WORDS flag words.
GROUP_ELEMS = 4
BLOCK_GROUPS = 256
GROUP_FLAG_WORDS = BLOCK_GROUPS // 32
INDEX_RECORD_WORDS = 1 + GROUP_FLAG_WORDS


def group_index_words(n: int) -> int:
    """uint32 words of the index of a group-layout term of n elements."""
    return INDEX_RECORD_WORDS * -(-(-(-n // GROUP_ELEMS)) // BLOCK_GROUPS)


def _flag_index(flags: np.ndarray) -> np.ndarray:
    """The group index (FORMAT.md 3.3) of one flag per group: per block of 256 groups the
    count of flagged groups before it, then the block's flags."""
    groups = flags.size
    blocks = -(-groups // BLOCK_GROUPS)
    padded = np.pad(flags, (0, blocks * BLOCK_GROUPS - groups))
    counts = padded.reshape(blocks, BLOCK_GROUPS).sum(1)
    index = np.zeros((blocks, INDEX_RECORD_WORDS), dtype=np.uint32)
    index[:, 0] = np.cumsum(counts) - counts
    index[:, 1:] = pack_mask(padded)[:-1].reshape(blocks, GROUP_FLAG_WORDS)
    return index.reshape(-1)


def _index_flags(index: np.ndarray, groups: int) -> np.ndarray:
    """The flags of groups 0..groups-1 of a group index, as bool."""
    records = index.reshape(-1, INDEX_RECORD_WORDS)
    return np.unpackbits(records[:, 1:].astype("<u4").view(np.uint8), bitorder="little")[:groups].astype(bool)


def _index_error(index: np.ndarray, n: int) -> "tuple[str | None, int]":
    """(what is wrong with a group index of n elements or None, its count of flagged groups)."""
    groups = -(-n // GROUP_ELEMS)
    if index.dtype != np.uint32 or index.size != group_index_words(n):
        return "index needs %d uint32 words" % group_index_words(n), 0
    records = index.reshape(-1, INDEX_RECORD_WORDS)
    flags = _index_flags(index, records.shape[0] * BLOCK_GROUPS).reshape(-1, BLOCK_GROUPS)
    if flags.reshape(-1)[groups:].any():
        return "index flags a group past the tensor's %d" % groups, 0
    counts = flags.sum(1, dtype=np.int64)
    if not np.array_equal(records[:, 0].astype(np.int64), np.cumsum(counts) - counts):
        return "index block offsets are not the counts of flagged groups before each block", 0
    return None, int(counts.sum())


def _groups_of_four(values: np.ndarray, pad) -> np.ndarray:
    """Flat ``values`` as rows of GROUP_ELEMS, the last padded with ``pad``."""
    groups = -(-values.size // GROUP_ELEMS)
    return np.pad(values, (0, groups * GROUP_ELEMS - values.size), constant_values=pad).reshape(groups, GROUP_ELEMS)


def _groups_not(values: np.ndarray, fill: int) -> int:
    """Groups of four of flat byte-sized ``values`` not all ``fill``; read as one word per
    group where they allow it (budget allocation counts every tensor at every width)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.itemsize * GROUP_ELEMS == 4 and flat.size % GROUP_ELEMS == 0:  # a group is a word
        return int(np.count_nonzero(flat.view(np.uint32) != np.uint32(0x01010101 * int(fill))))
    return int((_groups_of_four(flat, fill) != fill).any(axis=1).sum())


def group_data_words(flagged: int) -> int:
    """uint32 words of a group-layout term's bytes for ``flagged`` groups (with a trailing word)."""
    return -(-flagged // 4) + 1


def pack_groups(keep: np.ndarray, codes: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
    """(index, bytes) of a masked 1-bit code stream in the group layout: per group of four
    elements with a kept one, a byte (keep bits 0-3, code bits 4-7); per block of 256
    groups, the count of such groups before it and the block's 256 flags."""
    keep = np.asarray(keep, dtype=bool).reshape(-1)
    bits = (np.asarray(codes).reshape(-1) & 1).astype(np.uint8)
    k4 = _groups_of_four(keep, False).astype(np.uint8)
    q4 = _groups_of_four(bits, 0) & k4  # a code counts where kept only
    byte = (k4 << np.arange(4, dtype=np.uint8)).sum(1) | ((q4 << np.arange(4, 8, dtype=np.uint8)).sum(1))
    flags = k4.any(axis=1)
    kept_bytes = byte[flags].astype(np.uint8)
    words = np.zeros(group_data_words(kept_bytes.size), dtype=np.uint32)
    words.view(np.uint8)[: kept_bytes.size] = kept_bytes  # byte r is byte r & 3 of word r >> 2
    if words.dtype.byteorder == ">":  # pragma: no cover - every supported host is little-endian
        raise RuntimeError("the group layout is packed on little-endian hosts only")
    return _flag_index(flags), words


def group_layout_error(index: np.ndarray, data: np.ndarray, n: int) -> "str | None":
    """What is wrong with a group-layout (index, bytes) pair of n elements, or None: the
    index's size, each block's offset (the count of flagged groups before it), no flag past
    the last group, and room in the bytes for every flagged group. A decoder trusts all four."""
    error, flagged = _index_error(index, n)
    if error is not None:
        return error
    need = group_data_words(flagged)
    if data.dtype != np.uint32 or data.ndim != 1 or data.size != need:
        return "bytes need %d uint32 words for %d flagged groups" % (need, flagged)
    return None


def unpack_groups(index: np.ndarray, data: np.ndarray, n: int) -> "tuple[np.ndarray, np.ndarray]":
    """(keep, codes) of elements 0..n-1 of a group-layout term (the inverse of pack_groups)."""
    groups = -(-n // GROUP_ELEMS)
    flags = _index_flags(index, groups)
    byte = np.zeros(groups, dtype=np.uint8)
    byte[flags] = data.astype("<u4").view(np.uint8)[: int(flags.sum())]
    shifts = np.arange(4, dtype=np.uint8)
    keep = ((byte[:, None] >> shifts) & 1).astype(bool).reshape(-1)[:n]
    codes = ((byte[:, None] >> (shifts + 4)) & 1).astype(np.uint32).reshape(-1)[:n]
    return keep, codes


#: Zero words after a sparse term's code stream: room for a decoder's 16-byte load of the
#: stored groups of a row from any rank up to the sentinel's (FORMAT.md 3.4).
SPARSE_PAD_WORDS = 3


def sparse_words(stored: int, bits: int) -> int:
    """uint32 words of a sparse term's code stream with ``stored`` groups: their codes, the
    four fill codes of the sentinel group after them, and SPARSE_PAD_WORDS (FORMAT.md 3.4)."""
    return code_words(GROUP_ELEMS * (stored + 1), bits) + SPARSE_PAD_WORDS


def stored_groups(codes: np.ndarray, fill: int) -> int:
    """Groups of four whose codes are not all ``fill``: the ones a sparse term stores."""
    return _groups_not(np.asarray(codes), fill)


def pack_sparse(codes: np.ndarray, bits: int, fill: int) -> "tuple[np.ndarray, np.ndarray]":
    """(index, code stream) of n b-bit codes in the sparse layout: a group of four is stored
    unless all its codes are ``fill``; the stream holds the stored groups' codes, four per
    group in order, one sentinel group of fill codes, its zero word and SPARSE_PAD_WORDS."""
    c4 = _groups_of_four(np.asarray(codes).reshape(-1).astype(np.uint32), fill)
    flags = (c4 != fill).any(axis=1)
    stored = np.concatenate([c4[flags].reshape(-1), np.full(GROUP_ELEMS, fill, dtype=np.uint32)])
    return _flag_index(flags), np.concatenate([pack_codes(stored, bits), np.zeros(SPARSE_PAD_WORDS, np.uint32)])


def unpack_sparse(index: np.ndarray, words: np.ndarray, bits: int, fill: int, n: int) -> np.ndarray:
    """Codes 0..n-1 of a sparse-layout term (the inverse of pack_sparse)."""
    groups = -(-n // GROUP_ELEMS)
    flags = _index_flags(index, groups)
    c4 = np.full((groups, GROUP_ELEMS), fill, dtype=np.uint32)
    stored = GROUP_ELEMS * int(flags.sum())
    c4[flags] = unpack_codes(words[:code_words(stored, bits)], bits, stored).reshape(-1, GROUP_ELEMS)
    return c4.reshape(-1)[:n]


def sparse_layout_error(index: np.ndarray, words: np.ndarray, bits: int, n: int) -> "str | None":
    """What is wrong with a sparse-layout (index, code stream) pair of n b-bit codes, or None:
    the index as for the groups layout, and a stream sized for its stored groups."""
    error, stored = _index_error(index, n)
    if error is not None:
        return error
    need = sparse_words(stored, bits)
    if words.dtype != np.uint32 or words.ndim != 1 or words.size != need:
        return "code stream needs %d uint32 words for %d stored groups of %d-bit codes" % (need, stored, bits)
    return None
