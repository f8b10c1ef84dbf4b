"""How the exporter lays a term out: streams, compact, or auto's choice between them."""
import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.export.exporter import AUTO_COMPACT, Scheme, codes_term
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


def test_compact_is_refused_under_a_budget():
    """Compact may store a term in more bits than its stream, so it cannot promise a budget."""
    with pytest.raises(TvswitchError, match="--layout compact"):
        Scheme(name="tvq", bits=2, budget_bits=2.5, layout="compact").check()
    Scheme(name="tvq", bits=2, budget_bits=2.5, layout="auto").check()


@pytest.mark.parametrize("recorded,want", [(None, "streams"), ("auto", "sparse")])
def test_an_added_task_is_laid_out_as_the_bundle_records(tmp_path, recorded, want):
    """add-task encodes as the bundle's tasks are: a bundle written before the compact
    layouts (no layout in its scheme record) gets a stream, one written with auto gets what
    auto picks (here sparse: the new task changes four rows of 512)."""
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from tvswitch.export.edit import add_task
    from tvswitch.export.exporter import export_bundle

    rng = np.random.default_rng(3)
    base = {"w": rng.normal(0, 0.05, (512, 64)).astype(np.float32)}

    def task(rows):
        ft = {"w": base["w"].copy()}
        ft["w"][rows] += rng.normal(0, 0.01, (len(rows), 64)).astype(np.float32)
        return ft

    path = str(tmp_path / "b.tvs")
    export_bundle(base, {"a": task([0, 1]), "b": task([5, 9])}, path, name="tvq", bits=2, layout=recorded or "auto")
    if recorded is None:  # as the exporter wrote bundles before there was a layout to record
        with safe_open(path, framework="numpy") as f:
            m = json.loads(f.metadata()["tvswitch.manifest"])
        del m["scheme"]["layout"]
        text = json.dumps(m)
        save_file(load_file(path), path, metadata={"tvswitch.manifest": text,
                                                   "tvswitch.manifest.sha256": hashlib.sha256(text.encode()).hexdigest()})
    added = add_task(path, "c", task([7, 100, 200, 300]), base=base)
    assert added.entries("c")["w"].terms[0].layout == want
