import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvswitch.kernels import abi, cpu
from tvswitch.kernels.packing import pack_codes, pack_mask, unpack_codes, unpack_mask


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_every_width_and_size_round_trips(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, n, dtype=np.uint32)
    words = pack_codes(codes, bits)
    assert words.dtype == np.uint32
    assert words.size == abi.code_words(n, bits)  # real packing: ceil(n*b/32) words + 1
    assert words[-1] == 0
    assert np.array_equal(unpack_codes(words, bits, n), codes)


def test_layout_is_the_documented_one():
    # 2-bit: value i of a word at bits [2i, 2i+2)
    words = pack_codes(np.array([1, 2, 3, 0, 1]), 2)
    assert words[0] == (1 | 2 << 2 | 3 << 4 | 0 << 6 | 1 << 8)
    # 3-bit: 32 values fill exactly 3 words; value 10 straddles words 0 and 1
    codes = np.zeros(32, dtype=np.uint8)
    codes[10] = 0b111
    words = pack_codes(codes, 3)
    assert words.size == 3 + 1
    assert words[0] == (0b11 << 30) and words[1] == 0b1


def test_codes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError):
        pack_codes(np.array([4]), 2)
    with pytest.raises(ValueError):
        pack_codes(np.array([1]), 9)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1))
def test_masks_round_trip(n, seed):
    mask = np.random.default_rng(seed).random(n) < 0.3
    assert np.array_equal(unpack_mask(pack_mask(mask), n), mask)


@pytest.mark.skipif(not cpu.available(), reason="CPU library not built")
@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1))
def test_compiled_decoder_reads_what_the_packer_wrote(bits, n, seed):
    """The C build of decode.h, not only the numpy transcription, unpacks every width."""
    codes = np.random.default_rng(seed).integers(0, 1 << bits, n, dtype=np.uint32)
    words = pack_codes(codes, bits)
    params = np.array([1.0, 0.0], dtype=np.float32)  # value = q exactly
    out = np.full(n, np.nan, dtype=np.float32)
    terms = np.array([(words.ctypes.data, 0, params.ctypes.data, n, 1.0, abi.KIND_CODES, bits, 0, 0)],
                     dtype=abi.TERM_DTYPE)
    segs = np.zeros(1, dtype=abi.SEGMENT_DTYPE)
    segs[0] = (0, out.ctypes.data, n, 0, 0.0, abi.F32, abi.F32, 0, 1, 0)
    cpu.rebuild(segs, terms, [words, params, out], threads=1)
    assert np.array_equal(out, codes.astype(np.float32))


# ---- the group layout (FORMAT.md "Groups") ----

@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 3000), share=st.sampled_from([0.0, 0.01, 0.2, 0.7, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_groups_round_trip_and_pass_their_own_check(n, share, seed):
    from tvswitch.kernels.packing import (group_data_words, group_index_words, group_layout_error, pack_groups,
                                          unpack_groups)

    rng = np.random.default_rng(seed)
    keep, codes = rng.random(n) < share, rng.integers(0, 2, n)
    index, data = pack_groups(keep, codes)
    assert index.size == group_index_words(n) and group_layout_error(index, data, n) is None
    got_keep, got_codes = unpack_groups(index, data, n)
    assert np.array_equal(got_keep, keep) and np.array_equal(got_codes, codes * keep)  # codes count where kept
    flagged = -(-n // 4) if share == 1.0 else int(np.pad(keep, (0, -n % 4)).reshape(-1, 4).any(1).sum())
    assert data.size == -(-flagged // 4) + 1  # a byte per group with a kept element, no more
    assert group_data_words(flagged) == data.size


def test_group_layout_is_the_documented_one():
    from tvswitch.kernels.packing import pack_groups

    keep = np.zeros(1030, bool)
    codes = np.zeros(1030, int)
    keep[[1, 2]] = True  # group 0: elements 1 and 2 kept, element 2 positive
    codes[2] = 1
    keep[1029] = True  # group 257, in block 1: the partial last group
    codes[1029] = 1
    index, data = pack_groups(keep, codes)
    assert index.tolist()[:2] == [0, 1] and index[1:9].tolist() == [1] + [0] * 7
    assert index[9] == 1 and index[10] == 1 << 1  # block 1 counts one group before it; group 257 = bit 1
    assert data.view(np.uint8)[:2].tolist() == [0b0100_0110, 0b0010_0010]  # keep bits 0-3, codes 4-7
    assert data.size == 2 and data[-1] == 0


@pytest.mark.parametrize("damage,says", [
    (lambda i, d: (i, d), None),
    (lambda i, d: (i.__setitem__(9, 2) or i, d), "block offsets"),
    (lambda i, d: (i.__setitem__(17, 1 << 31) or i, d), "past the tensor"),  # group 511 of a 258-group tensor
    (lambda i, d: (i, d[:-1]), "bytes need"),
    (lambda i, d: (i[:9], d), "index needs 18"),
])
def test_a_damaged_group_layout_is_named(damage, says):
    from tvswitch.kernels.packing import group_layout_error, pack_groups

    keep = np.random.default_rng(0).random(1030) < 0.3
    index, data = damage(*pack_groups(keep, keep))
    error = group_layout_error(index, data, 1030)
    assert error is None if says is None else says in error


# ---- the sparse layout (FORMAT.md 3.4) ----

def _mostly_fill(seed: int, n: int, bits: int, share: float):
    """(codes, fill): n b-bit codes, each a random code with probability ``share``, else the fill."""
    rng = np.random.default_rng(seed)
    fill = int(rng.integers(0, 1 << bits))
    return np.where(rng.random(n) < share, rng.integers(0, 1 << bits, n), fill).astype(np.uint32), fill


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 3000), bits=st.integers(1, 8), share=st.sampled_from([0.0, 0.01, 0.2, 0.7, 1.0]),
       seed=st.integers(0, 2**32 - 1))
def test_sparse_codes_round_trip_and_pass_their_own_check(n, bits, share, seed):
    from tvswitch.kernels.packing import pack_sparse, sparse_layout_error, sparse_words, stored_groups, unpack_sparse

    codes, fill = _mostly_fill(seed, n, bits, share)
    index, words = pack_sparse(codes, bits, fill)
    assert sparse_layout_error(index, words, bits, n) is None
    assert np.array_equal(unpack_sparse(index, words, bits, fill, n), codes)
    stored = int((np.pad(codes, (0, -n % 4), constant_values=fill).reshape(-1, 4) != fill).any(1).sum())
    assert words.size == sparse_words(stored, bits)  # four codes per stored group, the sentinel, the pad
    assert stored_groups(codes, fill) == stored  # what the exporter prices
    assert stored_groups(codes.astype(np.uint8), fill) == stored  # as quantize's codes: a word per group
    codes_and_sentinel = words[:abi.code_words(4 * (stored + 1), bits)]
    assert np.all(unpack_codes(codes_and_sentinel, bits, 4 * (stored + 1))[4 * stored:] == fill)
    assert not words[codes_and_sentinel.size:].any()  # the stream's zero word and three pad words


def test_sparse_layout_is_the_documented_one():
    from tvswitch.kernels.packing import pack_sparse

    codes = np.full(1030, 2)  # 2-bit codes, fill 2
    codes[5] = 1  # group 1 stored: codes 2, 1, 2, 2
    codes[1029] = 0  # group 257 (block 1, the partial last group): 2, 0, then padding 2, 2
    index, words = pack_sparse(codes, 2, 2)
    assert index[0] == 0 and index[1:9].tolist() == [1 << 1] + [0] * 7
    assert index[9] == 1 and index[10] == 1 << 1
    # each stored group one byte of 2-bit codes (code k at bits 2k), then the fill sentinel
    assert words.view(np.uint8)[:3].tolist() == [0b10_10_01_10, 0b10_10_00_10, 0b10_10_10_10]
    assert words.size == 5 and not words[1:].any()  # the stream's zero word, then 3 pad words


@pytest.mark.parametrize("damage,says", [
    (lambda i, w: (i, w), None),
    (lambda i, w: (i.__setitem__(9, 0) or i, w), "block offsets"),
    (lambda i, w: (i.__setitem__(17, 1 << 31) or i, w), "past the tensor"),
    (lambda i, w: (i, w[:-1]), "code stream needs"),
    (lambda i, w: (i[:9], w), "index needs 18"),
])
def test_a_damaged_sparse_layout_is_named(damage, says):
    from tvswitch.kernels.packing import pack_sparse, sparse_layout_error

    rng = np.random.default_rng(0)
    codes = np.where(rng.random(1030) < 0.3, rng.integers(0, 8, 1030), 3)
    index, words = damage(*pack_sparse(codes, 3, 3))
    error = sparse_layout_error(index, words, 3, 1030)
    assert error is None if says is None else says in error


@pytest.mark.skipif(not cpu.available(), reason="CPU library not built")
@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 5000), share=st.sampled_from([0.0, 0.1, 0.6, 1.0]),
       seed=st.integers(0, 2**32 - 1))
def test_compiled_decoder_reads_sparse_codes(bits, n, share, seed):
    """Each path of the C build gives every element its code: stored, or the fill."""
    from tvswitch.kernels.packing import pack_sparse

    codes, fill = _mostly_fill(seed, n, bits, share)
    index, words = pack_sparse(codes, bits, fill)
    params = np.array([1.0, 0.0], dtype=np.float32)  # value = q exactly
    out = np.full(n, np.nan, dtype=np.float32)
    terms = np.array([(words.ctypes.data, index.ctypes.data, params.ctypes.data, n, 1.0, abi.KIND_SPARSE, bits,
                       words.size, fill)], dtype=abi.TERM_DTYPE)
    segs = np.zeros(1, dtype=abi.SEGMENT_DTYPE)
    segs[0] = (0, out.ctypes.data, n, 0, 0.0, abi.F32, abi.F32, 0, 1, 0)
    for path in set(cpu.PATHS) - {"auto"}:
        try:
            cpu.set_path(path)
        except ValueError:
            continue
        out[:] = np.nan
        cpu.rebuild(segs, terms, [words, index, params, out], threads=1)
        assert np.array_equal(out, codes.astype(np.float32)), path
    cpu.set_path("auto")
