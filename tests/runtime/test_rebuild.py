"""The CPU rebuild against a float64 reference computed from the packed codes."""
import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.kernels.packing import unpack_codes, unpack_mask
from tvswitch.runtime.rebuild import CpuRebuilder


def _deq64(bundle, term, n):
    """A term's values in float64, straight from its payloads (the spec, not the code)."""
    if term.layout == "groups":  # per group of four with a kept element, a byte: keep bits, then codes
        index, data = bundle.payload(term.mask), bundle.payload(term.codes)
        flags = np.unpackbits(index.reshape(-1, 9)[:, 1:].view(np.uint8), bitorder="little")[: -(-n // 4)]
        byte = np.zeros(flags.size, dtype=np.uint8)
        byte[flags.astype(bool)] = data.view(np.uint8)[: int(flags.sum())]
        bits = np.unpackbits(byte[:, None], axis=1, bitorder="little")
        keep, q = bits[:, :4].reshape(-1)[:n], bits[:, 4:].reshape(-1)[:n].astype(np.float64)
        p = bundle.payload(term.params).astype(np.float64)
        return keep * (q * p[0] + p[1])
    if term.kind == "raw":
        v = bundle.payload(term.values).reshape(-1).astype(np.float64)
    else:
        if term.layout == "sparse":  # four codes per flagged group, in order; the fill elsewhere
            flags = np.unpackbits(bundle.payload(term.mask).reshape(-1, 9)[:, 1:].view(np.uint8),
                                  bitorder="little")[: -(-n // 4)].astype(bool)
            q4 = np.full((flags.size, 4), float(term.fill))
            stored = 4 * int(flags.sum())  # the stream: ceil(stored * b / 32) + 1 words, then 3 pad words
            q4[flags] = unpack_codes(bundle.payload(term.codes)[:-3], term.bits, stored).reshape(-1, 4)
            q = q4.reshape(-1)[:n]
        else:
            q = unpack_codes(bundle.payload(term.codes), term.bits, n).astype(np.float64)
        p = bundle.payload(term.params).astype(np.float64)
        g = np.arange(n) // term.group
        v = q * p[0::2][g] + p[1::2][g]
    if term.mask and term.layout == "streams":
        v = v * unpack_mask(bundle.payload(term.mask), n)
    return v


def reference64(bundle, base, mix):
    out = {}
    for name, spec in bundle.shared_specs.items():
        n = spec.numel
        acc = base[name].reshape(-1).astype(np.float64)
        for task, w in mix.items():
            entry = bundle.entries(task).get(name)
            if entry is None:
                continue
            if entry.mode == "absolute":
                acc = acc - w * base[name].reshape(-1).astype(np.float64)
            for t in entry.terms:
                acc = acc + w * t.scale * _deq64(bundle, t, n)
        out[name] = acc.reshape(spec.shape)
    return out


@pytest.mark.parametrize("scheme,kw", [
    ("tvq", dict(bits=4)), ("tvq", dict(bits=3, granularity="channel")), ("tvq", dict(bits=2, granularity="group:16")),
    ("fq", dict(bits=4)), ("rtvq", {}), ("rtvq", dict(budget_bits=2.4)), ("tswitch", dict(keep=0.25, layout="streams")),
    ("tswitch", dict(keep=0.1, layout="compact")), ("tvq", dict(bits=2, layout="compact")),
    ("rtvq", dict(layout="compact")),
    ("emr", dict(bits=4)),
])
@pytest.mark.parametrize("mix", [{"a": 1.0}, {"a": 0.5, "c": 0.25}, {"a": 0.3, "b": 0.3, "c": 0.3}])
def test_rebuild_matches_float64_reference(bundle_factory, checkpoints, scheme, kw, mix):
    base, _ = checkpoints
    bundle = bundle_factory(scheme, **kw)
    r = CpuRebuilder(bundle, base)
    out = r.allocate()
    r.rebuild(mix, out)
    want = reference64(bundle, base, mix)
    for name, a in out.items():
        scale = np.abs(want[name]).max() + 1e-6
        tol = (4e-3 if a.dtype == np.float16 else 2e-6) * scale
        assert np.abs(a.astype(np.float64) - want[name]).max() <= tol, name


def test_single_task_rebuild_is_close_to_the_finetuned_weights(bundle_factory, checkpoints):
    base, fts = checkpoints
    r = CpuRebuilder(bundle_factory("tvq", bits=8), base)
    out = r.allocate()
    r.rebuild({"b": 1.0}, out)
    for name, a in out.items():
        assert np.allclose(a, fts["b"][name], atol=1e-3), name


def test_buffers_are_reused_and_a_bad_mix_writes_nothing(bundle_factory, checkpoints):
    base, _ = checkpoints
    r = CpuRebuilder(bundle_factory("rtvq"), base, threads=2)
    out = r.allocate()
    ids = {k: v.ctypes.data for k, v in out.items()}
    r.rebuild({"a": 1.0}, out)
    before = {k: v.copy() for k, v in out.items()}
    for bad in ({"zzz": 1.0}, {}, {"a": float("nan")}):
        with pytest.raises(TvswitchError):
            r.rebuild(bad, out)
    for k in out:
        assert np.array_equal(out[k], before[k]) and out[k].ctypes.data == ids[k]
    r.rebuild({"c": 1.0}, out)
    r.rebuild({"a": 1.0}, out)
    for k in out:
        assert np.array_equal(out[k], before[k])


def test_wrong_output_buffer_is_refused(bundle_factory, checkpoints):
    base, _ = checkpoints
    r = CpuRebuilder(bundle_factory("tvq"), base)
    out = r.allocate()
    out["enc.weight"] = np.zeros((29, 37), np.float32)
    with pytest.raises(TvswitchError, match="enc.weight"):
        r.rebuild({"a": 1.0}, out)


def test_threads_do_not_change_the_result(bundle_factory, checkpoints):
    base, _ = checkpoints
    bundle = bundle_factory("tvq", bits=3)
    outs = []
    for threads in (1, 2):
        r = CpuRebuilder(bundle, base, threads=threads)
        o = r.allocate()
        r.rebuild({"a": 0.7, "b": 0.2}, o)
        outs.append(o)
    for k in outs[0]:
        assert np.array_equal(outs[0][k], outs[1][k])


def test_a_switch_whose_since_mix_fills_the_table_cache_still_rebuilds_its_mix(bundle_factory, checkpoints):
    """The table cache clears when full (64 mixes): here while caching the mix the buffers
    hold, after caching the mix being entered, whose buffers must still be found."""
    base, _ = checkpoints
    bundle = bundle_factory("tvq", bits=3)
    since, mix = {"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}
    out, fresh = CpuRebuilder(bundle, base).allocate(), CpuRebuilder(bundle, base).allocate()
    CpuRebuilder(bundle, base, threads=1).rebuild(since, out)  # out holds `since`
    r = CpuRebuilder(bundle, base, threads=1)
    for i in range(64):
        r.mix_tables({"a": 0.001 * (i + 1)})
    r.rebuild(mix, out, since=since)
    CpuRebuilder(bundle, base, threads=1).rebuild(mix, fresh)
    for k in out:
        assert np.array_equal(out[k], fresh[k]), k


def test_fp16_output_of_fp32_base(bundle_factory, checkpoints):
    base, _ = checkpoints
    r = CpuRebuilder(bundle_factory("tvq"), base)
    o32, o16 = r.allocate(), r.allocate("float16")
    r.rebuild({"a": 1.0}, o32)
    r.rebuild({"a": 1.0}, o16)
    for k in o32:
        assert np.array_equal(o16[k], o32[k].astype(np.float16))


def test_embedded_base_needs_no_checkpoint(tmp_path, checkpoints):
    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints
    bundle = export_bundle(base, fts, str(tmp_path / "self.tvs"), name="tvq", include_base="float32")
    a, b = CpuRebuilder(bundle), CpuRebuilder(bundle, base)
    oa, ob = a.allocate(), b.allocate()
    a.rebuild({"a": 1.0}, oa)
    b.rebuild({"a": 1.0}, ob)
    for k in oa:
        assert np.array_equal(oa[k], ob[k])


def test_emr_bundle_rebuilds_what_emr_merging_defines(bundle_factory, checkpoints):
    """EMR stored as shared codes + per-task masks and rescalers rebuilds rescaler * mask * unified."""
    from tvswitch.export.merge import emr
    from tvswitch.export.quantize import dequantize, group_size, quantize

    base, fts = checkpoints
    bundle = bundle_factory("emr", bits=8)
    vectors = {t: {n: (ft[n].astype(np.float32) - base[n].astype(np.float32)).reshape(-1)
                   for n in ("enc.weight", "enc.bias", "mlp.weight", "norm.weight", "half.weight")}
               for t, ft in fts.items()}
    merged = emr(vectors)
    r = CpuRebuilder(bundle, base)
    out = r.allocate()
    r.rebuild({"b": 1.0}, out)
    for n in ("enc.weight", "mlp.weight"):
        u = dequantize(quantize(merged.unified[n], 8, group_size(base[n].shape, "tensor")))
        want = base[n].reshape(-1) + np.float32(merged.rescalers["b"]) * np.where(merged.masks["b"][n], u, 0)
        assert np.allclose(out[n].reshape(-1), want, atol=1e-6)


@pytest.mark.parametrize("scheme", ["tvq", "rtvq", "tswitch", "fq", "emr"])
def test_scalar_and_empty_tensors(tmp_path, scheme):
    from tvswitch.export.exporter import export_bundle

    base = {"w": np.ones((3, 4), np.float32), "empty": np.zeros((0, 4), np.float32),
            "scalar": np.array(2.0, np.float32)}
    ft = {k: v + np.float32(0.25) for k, v in base.items()}  # numpy makes the 0-d one a scalar
    bundle = export_bundle(base, {"a": ft, "b": ft}, str(tmp_path / "e.tvs"), name=scheme, keep=1.0)
    assert "empty" not in bundle.shared_specs and bundle.manifest["base"]["other"] == ["empty"]
    r = CpuRebuilder(bundle, base)
    out = r.allocate()
    r.rebuild({"a": 1.0}, out)
    assert out["scalar"].shape == () and abs(float(out["scalar"]) - 2.25) < 0.02


@pytest.mark.parametrize("chunk", [1, 1000, 1 << 22])
def test_rebuild_with_progress_runs_in_chunks_to_the_same_bits(bundle_factory, checkpoints, monkeypatch, chunk):
    from tvswitch.runtime import rebuild as R

    base, _ = checkpoints
    r = CpuRebuilder(bundle_factory("rtvq"), base)
    want, got = r.allocate(), r.allocate()
    r.rebuild({"a": 0.5, "b": 0.5}, want)
    monkeypatch.setattr(R, "PROGRESS_CHUNK", chunk)
    runs = R._runs(r.mix_tables({"a": 0.5, "b": 0.5}).segments["n"], chunk)
    assert runs[0][0] == 0 and runs[-1][1] == len(want)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    assert len(runs) == {1: len(want), 1000: 3, 1 << 22: 1}[chunk]
    r.rebuild({"a": 0.5, "b": 0.5}, got, progress=True)
    for k in want:
        assert np.array_equal(got[k], want[k])


def test_negative_threads_are_refused(bundle_factory, checkpoints):
    base, _ = checkpoints
    with pytest.raises(TvswitchError, match="threads must be 0"):
        CpuRebuilder(bundle_factory("tvq"), base, threads=-3)


def test_sparse_terms_that_share_payloads_but_not_their_fill_are_not_merged(tmp_path):
    """A mix merges terms that several tasks share; two sparse terms over the same codes,
    index and params but with other fill codes are different terms (from a review)."""
    from tvswitch.kernels.packing import pack_sparse, unpack_sparse
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.bundle.writer import PayloadStore, write_bundle
    from tvswitch.runtime.checkpoint import fingerprint

    n = 64
    codes = np.zeros(n, np.uint32)
    codes[:4] = [1, 2, 3, 0]  # group 0 stored, the others all fill
    index, words = pack_sparse(codes, 2, 0)
    base = np.zeros(n, np.float32)
    store = PayloadStore()
    store.add("c", words)
    store.add("i", index)
    store.add("p", np.array([1.0, 0.0], np.float32), compress=False)

    def term(fill):
        return {"kind": "codes", "layout": "sparse", "bits": 2, "fill": fill, "group": n, "codes": "c", "mask": "i",
                "params": "p"}

    m = {"scheme": {"name": "tvq", "bits": 2}, "base": {"fingerprint": fingerprint({"w": base}, ["w"]), "other": [],
                                                        "embedded": None},
         "tasks": ["a", "b"], "tensors": {"w": {"shape": [n], "dtype": "float32"}},
         "entries": {"a": {"w": {"mode": "delta", "terms": [term(0)]}}, "b": {"w": {"mode": "delta", "terms": [term(3)]}}},
         "task_specific": {"a": {}, "b": {}}}
    path = str(tmp_path / "fill.tvs")
    write_bundle(path, m, store)
    r = CpuRebuilder(Bundle.open(path), {"w": base})
    out = r.allocate("float32")
    r.rebuild({"a": 1.0, "b": 1.0}, out)
    want = unpack_sparse(index, words, 2, 0, n) + unpack_sparse(index, words, 2, 3, n)
    assert np.array_equal(out["w"], want.astype(np.float32))


@pytest.mark.parametrize("layout", ["groups", "streams"])
def test_a_tswitch_bundle_of_the_masked_sign_form_rebuilds_as_its_ternary_codes(bundle_factory, legacy_tswitch,
                                                                                checkpoints, tmp_path, layout):
    """T-Switch terms are ternary codes now; a bundle written before (a sign code under a
    mask, as streams or groups) still rebuilds every mix bit for bit the same, and a task
    added to it is stored the new way beside the old ones."""
    from tvswitch.export.edit import add_task

    base, fts = checkpoints
    new = bundle_factory("tswitch", keep=0.1, layout="streams")
    old = legacy_tswitch(new, str(tmp_path / "old.tvs"), layout)
    assert old.entries("a")["mlp.weight"].terms[0].bits == 1 and new.entries("a")["mlp.weight"].terms[0].bits == 2
    for mix in ({"a": 1.0}, {"a": 0.5, "b": -0.3, "c": 0.7}, {"c": -1.0}):
        got, want = (_rebuilt(CpuRebuilder(b, base), mix) for b in (old, new))
        for name in want:
            assert got[name].tobytes() == want[name].tobytes(), (mix, name)
    grown = add_task(old.path, "d", fts["a"], base=base, out=str(tmp_path / "grown.tvs"))
    assert grown.entries("d")["mlp.weight"].terms[0].bits == 2  # d is a's checkpoint under a new name
    assert _rebuilt(CpuRebuilder(grown, base), {"d": 1.0})["mlp.weight"].tobytes() == \
        _rebuilt(CpuRebuilder(new, base), {"a": 1.0})["mlp.weight"].tobytes()


def _rebuilt(rebuilder, mix):
    out = rebuilder.allocate()
    rebuilder.rebuild(mix, out)
    return out
