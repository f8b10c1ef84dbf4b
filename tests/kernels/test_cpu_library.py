"""The compiled CPU build of decode.h against its numpy transcription, bit for bit."""
import pathlib
import platform
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvswitch.kernels.packing import pack_codes, pack_groups, pack_mask, pack_sparse
from tvswitch.kernels import abi, cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="CPU library not built: %s" % cpu.unavailable_reason())


def _paths():
    """Every instruction path this CPU runs, each a parameter: each must give the same bits."""
    if not cpu.available():
        return ["portable"]
    names = []
    for name in cpu.PATHS:
        if name == "auto":
            continue
        try:
            cpu.set_path(name)
            names.append(name)
        except ValueError:
            names.append(pytest.param(name, marks=pytest.mark.skip(reason="this CPU has no %s" % name)))
    cpu.set_path("auto")
    return names


@pytest.fixture(params=_paths())
def path(request):
    cpu.set_path(request.param)
    yield request.param
    cpu.set_path("auto")


def _aligned_row(values: np.ndarray) -> np.ndarray:
    """32 float32 at a 32-byte boundary (the tile buffer's alignment, which AVX2 relies on)."""
    raw = np.empty(32 + 8, dtype=np.float32)
    start = (-raw.ctypes.data % 32) // 4
    row = raw[start:start + 32]
    row[...] = values
    return row


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("masked", [False, True])
def test_simd_rows_equal_decode_h_scalar_functions(bits, masked):
    """Every SIMD row path (SSE2 or NEON code conversion, AVX2) gives the bits of the scalar
    path, which is decode.h's functions alone: every width, all codes, with and without a mask."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    n = 32 * 40
    codes = rng.integers(0, 1 << bits, n)
    codes[:32] = (1 << bits) - 1  # the widest code in every lane of the first row
    codes[32:64] = np.arange(32) % (1 << bits)  # every code value
    words = pack_codes(codes, bits)
    mask = pack_mask(rng.random(n) < 0.5) if masked else None
    group = int(rng.choice([n, 32, 96]))  # whole rows per group: every row takes the path's own code
    params = rng.normal(0, 0.1, 2 * -(-n // group)).astype(np.float32)
    term = np.zeros(1, dtype=abi.TERM_DTYPE)
    term[0] = (words.ctypes.data, mask.ctypes.data if masked else 0, params.ctypes.data, group,
               float(rng.normal()), abi.KIND_CODES, bits, 0, 0)
    for i in range(0, n, 32):
        start = rng.normal(0, 1, 32).astype(np.float32)
        want = _aligned_row(start)
        cpu.accumulate_row("scalar", want, term, i, n)
        for name in set(cpu.PATHS) - {"auto", "scalar"}:
            got = _aligned_row(start)
            try:
                cpu.accumulate_row(name, got, term, i, n)
            except ValueError:
                continue  # this CPU lacks the path (the parameters say so)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (name, bits, i, "seed %d" % seed)
    # and the scalar path is the numpy transcription of decode.h
    acc = np.zeros(n, np.float32)
    v = reference.term_value(term[0], n, {words.ctypes.data: words, params.ctypes.data: params,
                                          **({mask.ctypes.data: mask} if masked else {})})
    row = _aligned_row(np.zeros(32, np.float32))
    for i in range(0, n, 32):
        row[...] = 0
        cpu.accumulate_row("scalar", row, term, i, n)
        acc[i:i + 32] = row
    assert np.array_equal(acc.view(np.uint32), (np.float32(0) + np.float32(term[0]["weight"]) * v).view(np.uint32))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("weight", [-0.75, 0.75])
def test_a_masked_out_lane_adds_what_the_scalar_path_adds_even_to_minus_zero(bits, weight):
    """A lane the mask drops adds w * +0 (negative zero for a negative weight), so on an
    accumulator of -0 the SIMD rows, table lookups included, give the scalar path's sign."""
    if not cpu.available():
        pytest.skip(cpu.unavailable_reason())
    n = 64
    words = pack_codes(np.arange(n) % (1 << bits), bits)
    mask = pack_mask(np.arange(n) % 3 == 0)
    params = np.array([0.25, -0.5], np.float32)
    term = np.zeros(1, dtype=abi.TERM_DTYPE)
    term[0] = (words.ctypes.data, mask.ctypes.data, params.ctypes.data, n, weight, abi.KIND_CODES, bits, 0, 0)
    for i in (0, 32):
        want = _aligned_row(np.full(32, -0.0, np.float32))
        cpu.accumulate_row("scalar", want, term, i, n)
        for name in set(cpu.PATHS) - {"auto", "scalar"}:
            got = _aligned_row(np.full(32, -0.0, np.float32))
            try:
                cpu.accumulate_row(name, got, term, i, n)
            except ValueError:
                continue
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (name, bits, weight, i)


@pytest.mark.parametrize("kind,bits", [(abi.KIND_GROUPS, 1)] + [(abi.KIND_SPARSE, b) for b in range(1, 9)])
@pytest.mark.parametrize("weight", [-0.75, 0.75])
def test_a_row_with_no_stored_group_adds_its_value_even_to_minus_zero(path, kind, bits, weight):
    """The planned rows add a row that stores no group as one value (the fill's, or a
    dropped element's) without decoding it; on a base of -0.0 that +0.0 must still turn
    each sum to +0.0 (a positive weight), as the scalar path does."""
    n, fill = 4096, (1 << bits) - 1
    base = np.full(n, -0.0, np.float32)
    out = np.full(n, np.nan, np.float32)
    params = np.array([0.25, -0.25 * fill], np.float32)  # the fill decodes to +0.0
    if kind == abi.KIND_SPARSE:
        index, data = pack_sparse(np.full(n, fill), bits, fill)
        row = (data.ctypes.data, index.ctypes.data, params.ctypes.data, n, weight, kind, bits, data.size, fill)
    else:
        index, data = pack_groups(np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64))
        row = (data.ctypes.data, index.ctypes.data, params.ctypes.data, n, weight, kind, 1, data.size, 0)
    terms = np.array([row, row], dtype=abi.TERM_DTYPE)  # a run of two: the planned rows' case
    segs = np.zeros(1, dtype=abi.SEGMENT_DTYPE)
    segs[0] = (base.ctypes.data, out.ctypes.data, n, 0, 1.0, abi.F32, abi.F32, 0, 2, 0)
    keep = [base, out, params, index, data]
    _assert_rebuild_is_reference(segs, terms, keep, [out], 1)
    assert (np.signbit(out) == (weight < 0)).all() and (out == 0).all()


def test_auto_picks_the_fastest_path_this_cpu_has():
    if not pathlib.Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(open("/proc/cpuinfo").read().split())
    x86 = platform.machine() == "x86_64"
    if x86 and {"avx2", "avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
        want = "avx512"
    elif x86:
        want = "avx2" if "avx2" in flags else "portable"
    else:
        want = "neon" if platform.machine() == "aarch64" else "portable"
    assert cpu.set_path("auto") == want


def _random_tables(rng, n_segments, out_code, base_code, tensor_wide=False):
    """Random segments of every term kind; tensor_wide: only CODES, GROUPS and SPARSE terms
    with one (scale, offset) for the tensor, 1-40 of them (the SIMD paths' register-held
    rows, and past their 32-term limit the per-term rows), in runs of one kind and width or
    of mixed kinds, widths and masks."""
    keep = []
    segs = np.zeros(n_segments, dtype=abi.SEGMENT_DTYPE)
    rows = []
    outs = []
    for s in range(n_segments):
        n = int(rng.integers(1, 9000))
        base = rng.normal(0, 1, n).astype(np.float32)
        if base_code == abi.F16:
            base = base.astype(np.float16)
        elif base_code == abi.BF16:
            base = (base.view(np.uint32) >> 16).astype(np.uint16)
        out = np.full(n, 0x7E00 if out_code != abi.F32 else 0, dtype=np.uint16 if out_code != abi.F32 else np.float32)
        if out_code == abi.F32:
            out[:] = np.nan  # poison: an unwritten element fails the comparison
        keep += [base, out]
        outs.append(out)
        begin = len(rows)
        count = int(rng.choice([1, 2, 8, 9, 32, 33, 40])) if tensor_wide else int(rng.integers(0, 4))
        one_width = int(rng.integers(1, 9)) if tensor_wide and rng.random() < 0.5 else 0
        kinds = [abi.KIND_CODES, abi.KIND_CODES, abi.KIND_RAW_F32, abi.KIND_RAW_F16, abi.KIND_GROUPS, abi.KIND_SPARSE]
        if tensor_wide:
            kinds = [int(rng.choice([abi.KIND_CODES, abi.KIND_GROUPS, abi.KIND_SPARSE]))] if rng.random() < 0.5 else \
                [abi.KIND_CODES, abi.KIND_GROUPS, abi.KIND_SPARSE]
        for _ in range(count):
            kind = int(rng.choice(kinds))
            if kind == abi.KIND_SPARSE:
                bits, share = one_width or int(rng.integers(1, 9)), rng.choice([0.0, 0.05, 0.5, 1.0])
                fill = int(rng.integers(0, 1 << bits))
                index, words = pack_sparse(np.where(rng.random(n) < share, rng.integers(0, 1 << bits, n), fill),
                                           bits, fill)
                group = n if tensor_wide else int(rng.choice([n, 33, 96]))
                params = rng.normal(0, 0.1, 2 * (-(-n // group))).astype(np.float32)
                keep += [index, words, params]
                rows.append((words.ctypes.data, index.ctypes.data, params.ctypes.data, group, float(rng.normal()),
                             kind, bits, words.size, fill))
                continue
            if kind == abi.KIND_GROUPS:
                index, data = pack_groups(rng.random(n) < rng.choice([0.0, 0.05, 0.5, 1.0]), rng.integers(0, 2, n))
                group = n if tensor_wide else int(rng.choice([n, 33, 96]))
                params = rng.normal(0, 0.1, 2 * (-(-n // group))).astype(np.float32)
                keep += [index, data, params]
                rows.append((data.ctypes.data, index.ctypes.data, params.ctypes.data, group, float(rng.normal()),
                             kind, 1, data.size, 0))
                continue
            mask_addr = 0
            if rng.random() < 0.4:
                m = pack_mask(rng.random(n) < 0.5)
                keep.append(m)
                mask_addr = m.ctypes.data
            if kind == abi.KIND_CODES:
                bits = one_width or int(rng.integers(1, 9))
                group = n if tensor_wide else int(rng.choice([n, max(1, n // 7), 33, 1]))
                words = pack_codes(rng.integers(0, 1 << bits, n), bits)
                params = rng.normal(0, 0.1, 2 * (-(-n // group))).astype(np.float32)
                keep += [words, params]
                rows.append((words.ctypes.data, mask_addr, params.ctypes.data, group,
                             float(rng.normal()), kind, bits, 0, 0))
            else:
                vals = rng.normal(0, 0.1, n).astype(np.float32 if kind == abi.KIND_RAW_F32 else np.float16)
                keep.append(vals)
                rows.append((vals.ctypes.data, mask_addr, 0, 1, float(rng.normal()), kind, 0, 0, 0))
        coef = float(rng.choice([1.0, 0.0, 0.25]))
        segs[s] = (base.ctypes.data, out.ctypes.data, n, 0, coef, base_code, out_code, begin, len(rows) - begin, 0)
    terms = np.array(rows, dtype=abi.TERM_DTYPE) if rows else np.zeros(0, dtype=abi.TERM_DTYPE)
    return segs, terms, keep, outs


# The path fixture sets the library's path once; every example runs on it.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), out_code=st.sampled_from([abi.F32, abi.F16, abi.BF16]),
       base_code=st.sampled_from([abi.F32, abi.F16, abi.BF16]), threads=st.sampled_from([1, 2]))
def test_compiled_equals_reference_bit_for_bit(path, seed, out_code, base_code, threads):
    rng = np.random.default_rng(seed)
    segs, terms, keep, outs = _random_tables(rng, int(rng.integers(1, 5)), out_code, base_code)
    _assert_rebuild_is_reference(segs, terms, keep, outs, threads)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), out_code=st.sampled_from([abi.F32, abi.F16, abi.BF16]),
       base_code=st.sampled_from([abi.F32, abi.F16, abi.BF16]))
def test_mixes_of_tensor_wide_terms_equal_reference_bit_for_bit(path, seed, out_code, base_code):
    rng = np.random.default_rng(seed)
    segs, terms, keep, outs = _random_tables(rng, int(rng.integers(1, 3)), out_code, base_code, tensor_wide=True)
    _assert_rebuild_is_reference(segs, terms, keep, outs, 1)


def _assert_rebuild_is_reference(segs, terms, keep, outs, threads):
    cpu.rebuild(segs, terms, keep, threads=threads)
    got = [o.copy() for o in outs]
    for o in outs:
        o[...] = 0
    reference.rebuild_reference(segs, terms, keep)
    for g, want in zip(got, outs):
        assert np.array_equal(g.view(np.uint8), want.view(np.uint8))


def test_half_conversion_matches_numpy_everywhere(path):
    """Every float16 value, and rounding from float32, as numpy (IEEE, nearest even) does."""
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)]
    x = np.concatenate([finite.astype(np.float32),
                        np.random.default_rng(0).normal(0, 1000, 100000).astype(np.float32),
                        np.array([65519.0, 65520.0, 1e-8, -6e-8, 3e-5], np.float32)])
    out = np.zeros(x.size, dtype=np.float16)
    terms = np.array([(x.ctypes.data, 0, 0, 1, 1.0, abi.KIND_RAW_F32, 0, 0, 0)], dtype=abi.TERM_DTYPE)
    segs = np.zeros(1, dtype=abi.SEGMENT_DTYPE)
    segs[0] = (0, out.ctypes.data, x.size, 0, 0.0, abi.F32, abi.F16, 0, 1, 0)
    cpu.rebuild(segs, terms, [x, out], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy warns on the overflow to inf
        want = (np.float32(0.0) + np.float32(1.0) * x).astype(np.float16)  # the contract: 0 + 1*x
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))
    back = np.zeros(finite.size, dtype=np.float32)
    segs[0] = (finite.ctypes.data, back.ctypes.data, finite.size, 0, 1.0, abi.F16, abi.F32, 0, 0, 0)
    cpu.rebuild(segs, np.zeros(0, dtype=abi.TERM_DTYPE), [finite, back], 1)
    assert np.array_equal(back, finite.astype(np.float32))


@pytest.mark.parametrize("fault", ["base", "out", "codes", "params", "mask", "values", "terms"])
def test_tables_that_reach_outside_their_buffers_are_refused_before_any_write(fault):
    """cpu_rebuild.c's tv_check_tables: every address and size against the buffers given."""
    from tvswitch.errors import TvswitchError

    if not cpu.available():
        pytest.skip(cpu.unavailable_reason())
    n, bits = 100, 3
    base, out = np.ones(n, np.float32), np.zeros(n, np.float32)
    words = np.zeros(abi.code_words(n, bits), np.uint32)
    params = np.array([1.0, 0.0], np.float32)
    mask = np.zeros(abi.code_words(n, 1), np.uint32)
    values = np.ones(n, np.float16)
    named = {"base": base, "out": out, "codes": words, "params": params, "mask": mask, "values": values}
    # the table is right and one buffer given is one element short (or the term range is too long)
    buffers = [a[:-1] if name == fault else a for name, a in named.items()]
    terms = np.array([(words.ctypes.data, mask.ctypes.data, params.ctypes.data, n, 1.0, abi.KIND_CODES, bits, 0, 0),
                      (values.ctypes.data, 0, 0, 1, 1.0, abi.KIND_RAW_F16, 0, 0, 0)], dtype=abi.TERM_DTYPE)
    segs = np.zeros(1, dtype=abi.SEGMENT_DTYPE)
    segs[0] = (base.ctypes.data, out.ctypes.data, n, 0, 1.0, abi.F32, abi.F32, 0, 3 if fault == "terms" else 2, 0)
    with pytest.raises(TvswitchError, match="reach outside the buffers given \\(segment 0"):
        cpu.rebuild(segs, terms, buffers, 1)
    assert not out.any()  # nothing written
    if fault == "out":
        segs[0]["term_count"] = 2
        cpu.rebuild(segs, terms, list(named.values()), 1)  # and all given in full: it runs
        assert out.all()


@settings(max_examples=200, deadline=None)
@given(spans=st.lists(st.tuples(st.integers(0, 2**12), st.integers(0, 2**10)), max_size=12),
       start=st.integers(0, 2**12), n=st.integers(1, 300), top=st.booleans())
def test_a_range_passes_the_buffer_check_exactly_when_one_buffer_holds_it(spans, start, n, top):
    """The sorted search of tv_check_tables against the plain definition, with buffers that
    overlap, nest, repeat, are empty, or end at the top of the address space."""
    from tvswitch.errors import TvswitchError

    if not cpu.available():
        pytest.skip(cpu.unavailable_reason())
    last = 2**64 - 1
    shift = 2**64 - 2**12 if top else 0  # near the top: an end past 2^64 must not wrap to a pass
    spans = [(b + shift, size) for b, size in spans if b + shift <= last]
    begin, size = start + shift, 4 * n
    if begin > last:
        return
    segs = np.zeros(1, dtype=abi.SEGMENT_DTYPE)
    segs[0] = (0, begin, n, 0, 0.0, abi.F32, abi.F32, 0, 0, 0)  # no base read, no terms: the output's range
    held = begin + size <= last and any(b <= begin and begin + size <= min(b + s, last) for b, s in spans)
    if held:
        cpu.check_tables(segs, np.zeros(0, dtype=abi.TERM_DTYPE), spans)
    else:
        with pytest.raises(TvswitchError, match="reach outside"):
            cpu.check_tables(segs, np.zeros(0, dtype=abi.TERM_DTYPE), spans)
