"""How the exporter lays a term out: streams, compact, or auto's choice between them."""
import numpy as np
import pytest

from tvswitch.export.exporter import AUTO_COMPACT, codes_term
from tvswitch.export.quantize import Quantized
from tvswitch.kernels.packing import pack_groups, pack_sparse, unpack_sparse
from tvswitch.runtime.bundle.writer import PayloadStore


def _codes(n: int, bits: int, changed: float, seed: int = 0) -> Quantized:
    """Codes that are the zero point (1) but for a share ``changed`` of random ones."""
    rng = np.random.default_rng(seed)
    codes = np.where(rng.random(n) < changed, rng.integers(0, 1 << bits, n), 1).astype(np.uint8)
    return Quantized(codes=codes, params=np.array([0.1, -0.1], np.float32), group=n, bits=bits)


@pytest.mark.parametrize("changed,want", [(0.01, "sparse"), (0.9, "streams")])
def test_auto_takes_sparse_codes_where_they_halve_the_term(changed, want):
    store = PayloadStore()
    term = codes_term(store, "t/w", _codes(40000, 2, changed), layout="auto")
    assert term.get("layout", "streams") == want
    if want == "sparse":
        assert term["fill"] == 1
        index, words = store.stored[term["mask"]], store.stored[term["codes"]]
        assert index.size + words.size <= AUTO_COMPACT * (40000 * 2 // 32 + 1)
        assert np.array_equal(unpack_sparse(index, words, 2, 1, 40000), _codes(40000, 2, changed).codes)


def test_compact_is_taken_even_where_it_is_larger_and_streams_never():
    q = _codes(4096, 3, 0.9)
    assert codes_term(PayloadStore(), "t/w", q, layout="compact")["layout"] == "sparse"
    assert "layout" not in codes_term(PayloadStore(), "t/w", _codes(4096, 3, 0.0), layout="streams")
    index, words = pack_sparse(q.codes, 3, 1)
    assert index.size + words.size > 4096 * 3 // 32 + 1  # compact really was the larger here


@pytest.mark.parametrize("keep,want", [(0.03, "groups"), (0.3, None)])
def test_auto_takes_groups_for_masked_signs_where_they_halve_the_term(keep, want):
    rng = np.random.default_rng(1)
    mask = rng.random(8192) < keep
    q = Quantized(codes=rng.integers(0, 2, 8192).astype(np.uint8), params=np.array([0.2, -0.1], np.float32),
                  group=8192, bits=1)
    term = codes_term(PayloadStore(), "t/w", q, mask=mask, layout="auto")
    assert term.get("layout") == want
    index, data = pack_groups(mask, q.codes)
    assert (index.size + data.size <= AUTO_COMPACT * 2 * (8192 // 32 + 1)) == (want == "groups")
