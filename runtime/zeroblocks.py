"""Which 1024-element blocks of a term are +0.0 throughout, read from its packed payloads.

A switch need not touch a block where every term of the mix it leaves and of the mix it
enters is zero: the buffer already holds what a rebuild would write there (FORMAT.md
section 3.5).  Fine-tuning leaves most rows of a word embedding within half a quantisation
step of the base, so most of its codes are the zero point; in the compact layouts the
group index already says, per 1024-element block, which groups are not all fill, so the
map costs one comparison per block; code streams are compared with the zero code's
pattern word by word.  The map is derived from the payloads, never stored: it cannot
disagree with the codes it describes.

A block counts as zero only when every value decode.h computes there is +0.0 (its bits
are all zero), so that ``w * v`` is +0.0 or -0.0 by the sign of ``w`` alone; a block
this cannot prove (a raw term, a last block shorter than 1024 elements in a stream,
parameter groups that disagree on the zero code) counts as non-zero, which is never
wrong, only slower.
"""
from __future__ import annotations

import weakref
from typing import Optional

import numpy as np

from tvswitch.kernels.packing import BLOCK_GROUPS, GROUP_ELEMS, INDEX_RECORD_WORDS, pack_codes
from tvswitch.runtime.bundle import Bundle

#: Elements per block: one record of the groups and sparse layouts' index, one tile of a GPU
#: launch (abi.BLOCK_ELEMS: a CUDA block's threads, four elements each).
ZERO_BLOCK = GROUP_ELEMS * BLOCK_GROUPS


def blocks_of(n: int) -> int:
    return -(-n // ZERO_BLOCK)


def zero_blocks(bundle: Bundle, term, n: int) -> Optional[np.ndarray]:
    """Per block of a term over ``n`` elements, True where every value is +0.0; None when
    no block is known to be (computed once per term and bundle)."""
    cache = _CACHE.setdefault(bundle, {})
    key = (term.kind, term.codes, term.values, term.params, term.mask, term.bits, term.group, term.layout,
           term.fill, n)
    if key not in cache:
        zero = _zero_blocks(bundle, term, n)
        cache[key] = zero if zero is not None and zero.any() else None
    return cache[key]


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _zero_blocks(bundle: Bundle, term, n: int) -> Optional[np.ndarray]:
    if term.kind != "codes" or n == 0:
        return None
    if term.layout in ("groups", "sparse"):
        empty = _unflagged(bundle.payload(term.mask), n)
        if term.layout == "groups":  # a group without a byte is unkept: +0.0 whatever its code
            return empty
        params = bundle.payload(term.params)
        fill = np.full(params.size // 2, term.fill, dtype=np.int64)
        return empty & _every_group(_is_plus_zero(fill, params), term.group, n)
    if term.mask is not None:  # unkept elements are +0.0; kept ones are not examined
        return _empty_mask(bundle.payload(term.mask), n)
    return _zero_code_blocks(bundle.payload(term.codes), bundle.payload(term.params), term.bits, term.group, n)


def _unflagged(index: np.ndarray, n: int) -> np.ndarray:
    """Blocks whose index record flags no group (every group fill, or unkept)."""
    records = index[:blocks_of(n) * INDEX_RECORD_WORDS].reshape(-1, INDEX_RECORD_WORDS)
    return ~records[:, 1:].any(axis=1)


def _empty_mask(mask: np.ndarray, n: int) -> np.ndarray:
    """Blocks whose mask bits are all 0 (a block is 32 words of the 1-bit stream; the
    stream's bits past n are 0)."""
    words = np.zeros(blocks_of(n) * (ZERO_BLOCK // 32), dtype=np.uint32)
    used = min(words.size, mask.size)
    words[:used] = mask[:used]
    return ~words.reshape(-1, ZERO_BLOCK // 32).any(axis=1)


def _is_plus_zero(codes: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Per parameter group, whether code ``codes[g]`` decodes to +0.0 there (decode.h's
    float32 arithmetic: (float)q * scale, then + offset, no fused multiply-add)."""
    scale, offset = params[0::2], params[1::2]
    value = codes.astype(np.float32) * scale + offset
    return value.view(np.uint32) == 0


def _every_group(ok: np.ndarray, group: int, n: int) -> np.ndarray:
    """Blocks all of whose parameter groups are ``ok``."""
    first, last = _groups_of_blocks(group, n)
    bad = np.concatenate([[0], np.cumsum(~ok)])
    return bad[last + 1] - bad[first] == 0


def _groups_of_blocks(group: int, n: int):
    begin = np.arange(blocks_of(n), dtype=np.int64) * ZERO_BLOCK
    end = np.minimum(begin + ZERO_BLOCK, n)
    return begin // group, (end - 1) // group


def _zero_code_blocks(words: np.ndarray, params: np.ndarray, bits: int, group: int, n: int) -> np.ndarray:
    """Full blocks of a code stream whose codes all decode to +0.0 under one zero code."""
    scale, offset = params[0::2].astype(np.float64), params[1::2].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        guess = np.rint(np.where(scale != 0, -offset / scale, 0.0))
    code = np.clip(np.nan_to_num(guess), 0, (1 << bits) - 1).astype(np.int64)
    code = np.where(_is_plus_zero(code, params), code, -1)  # the code that is +0.0, or none
    first, last = _groups_of_blocks(group, n)
    changes = np.concatenate([[0], np.cumsum(code[1:] != code[:-1])])
    block_code = np.where(changes[last] == changes[first], code[first], -1)
    zero = np.zeros(blocks_of(n), dtype=bool)
    full = n // ZERO_BLOCK
    per_block = ZERO_BLOCK * bits // 32  # a block is exactly this many words of the stream
    candidates = np.flatnonzero(block_code[:full] >= 0)
    if not len(candidates):
        return zero
    stream = words[:full * per_block].reshape(full, per_block)
    patterns = {int(c): pack_codes(np.full(ZERO_BLOCK, c, dtype=np.uint8), bits)[:per_block]
                for c in np.unique(block_code[candidates])}
    for c, pattern in patterns.items():
        pick = candidates[block_code[candidates] == c]
        zero[pick] = (stream[pick] == pattern).all(axis=1)
    return zero
