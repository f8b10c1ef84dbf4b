"""How the exporter lays a term out: streams, compact, or auto's choice between them."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvswitch.export.exporter import AUTO_COMPACT, TERM_LAYOUTS, codes_term, term_form
from tvswitch.export.quantize import Quantized
from tvswitch.kernels.packing import pack_sparse, unpack_sparse
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


@pytest.mark.parametrize("keep,want", [(0.03, "sparse"), (0.3, None)])
def test_a_tswitch_term_is_one_ternary_code_sparse_where_that_halves_it(keep, want):
    """Mask and sign as one 2-bit code (0: -lambda, 1: dropped, 2: +lambda): each element's
    value is the masked sign's, and auto stores it sparse (fill: dropped) where that halves it."""
    from tvswitch.export.quantize import dequantize
    from tvswitch.export.tswitch import binarize, ternary

    rng = np.random.default_rng(1)
    tau = rng.standard_normal(8192)
    sw = binarize(tau, keep)
    q = ternary(sw)
    lam = np.float32(sw.scale)
    want_values = np.where(sw.mask, np.where(sw.positive, lam, -lam), np.float32(0.0))
    assert q.bits == 2 and dequantize(q).tobytes() == want_values.astype(np.float32).tobytes()
    store = PayloadStore()
    term = codes_term(store, "t/w", q, layout="auto")
    assert term.get("layout") == want
    assert ("mask" in term) == (want == "sparse")  # a sparse term's index; no mask otherwise
    streams_words = 8192 * 2 // 32 + 1
    if want == "sparse":
        assert term["fill"] == 1
        index, words = store.stored[term["mask"]], store.stored[term["codes"]]
        assert index.size + words.size <= AUTO_COMPACT * streams_words
    else:
        index, words = pack_sparse(q.codes, 2, 1)
        assert index.size + words.size > AUTO_COMPACT * streams_words


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 3000), bits=st.integers(1, 8), changed=st.sampled_from([0.0, 0.02, 0.3, 1.0]),
       layout=st.sampled_from(TERM_LAYOUTS), masked=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_a_term_is_priced_as_it_is_written(n, bits, changed, layout, masked, seed):
    """term_form's word count, which --budget-bits prices by, is the words codes_term writes."""
    bits = 1 if masked else bits
    q = _codes(n, bits, changed, seed)
    mask = np.random.default_rng(seed).random(n) < changed if masked else None
    store = PayloadStore()
    term = codes_term(store, "t/w", q, mask=mask, layout=layout)
    form, words, fill = term_form(q.codes, bits, mask, layout)
    assert term.get("layout", "streams") == form and term.get("fill") == fill
    assert words == sum(store.stored[term[k]].size for k in ("codes", "mask") if k in term)


def _row_tuned(seed: int, tasks: str = "xyz"):
    """A base and fine-tunes that each change a few rows of every tensor, as partial
    fine-tuning does: task vectors whose codes are mostly the zero point."""
    rng = np.random.default_rng(seed)
    shapes = {"a.weight": (256, 64), "b.weight": (128, 96), "c.weight": (64, 33)}
    base = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in shapes.items()}
    fts = {}
    for t in tasks:
        fts[t] = {}
        for n, w in base.items():
            ft = w.copy()
            rows = rng.choice(w.shape[0], w.shape[0] // 4, replace=False)
            ft[rows] += rng.normal(0, 0.01, (rows.size, w.shape[1])).astype(np.float32)
            fts[t][n] = ft
    return base, fts


@pytest.mark.parametrize("scheme", ["tvq", "rtvq"])
@pytest.mark.parametrize("layout", ["auto", "compact"])
def test_a_budget_is_priced_as_written_and_spends_what_compact_saves(tmp_path, scheme, layout):
    """Under a compact layout the allocator prices every width as the term it writes, so the
    bundle holds to the budget and spends the bits the sparse terms save on wider codes;
    priced as streams, the same budget buys narrower codes and is left mostly unspent."""
    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.stats import budget_bits

    base, fts = _row_tuned(7)
    budget = 2.0
    streams = export_bundle(base, fts, str(tmp_path / "s.tvs"), name=scheme, budget_bits=budget, layout="streams")
    compact = export_bundle(base, fts, str(tmp_path / "c.tvs"), name=scheme, budget_bits=budget, layout=layout)
    assert budget - 0.5 < budget_bits(streams) <= budget
    assert budget - 0.5 < budget_bits(compact) <= budget
    widths = {b: {n: tuple(t.bits for t in b.entries("x")[n].terms) for n in base} for b in (streams, compact)}
    assert sum(map(sum, widths[compact].values())) > sum(map(sum, widths[streams].values()))
    assert any(t.layout == "sparse" for e in compact.entries("x").values() for t in e.terms)


def test_an_unchanged_task_costs_no_budget(tmp_path):
    """A tensor a task leaves as the base has it is stored for no task that does, so the
    allocator does not price it for that task: the others get the bits."""
    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.stats import budget_bits

    base, fts = _row_tuned(8, tasks="xy")
    fts["idle"] = {n: w.copy() for n, w in base.items()}
    bundle = export_bundle(base, fts, str(tmp_path / "b.tvs"), name="tvq", budget_bits=2.0, layout="streams")
    assert not bundle.entries("idle")
    assert 2.0 * 2 / 3 - 0.5 < budget_bits(bundle) <= 2.0  # over three tasks, two of which store


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
