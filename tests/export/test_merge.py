"""Merging methods on small hand-made task vectors whose merged result is worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from tvswitch.export import merge


def tv(**tensors):
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def test_task_arithmetic_scales_the_sum():
    tvs = {"a": tv(w=[1.0, -2.0, 0.0], b=[0.5]), "b": tv(w=[3.0, 1.0, -1.0], b=[0.5])}
    out = merge.task_arithmetic(tvs, 0.5)
    np.testing.assert_allclose(out["w"], [2.0, -0.5, -0.5])
    np.testing.assert_allclose(out["b"], [0.5])


def test_task_specific_tensors_are_not_merged():
    tvs = {"a": tv(w=[1.0], **{"head.weight": [9.0]}), "b": tv(w=[1.0])}
    assert set(merge.task_arithmetic(tvs, 1.0)) == {"w"}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="different shapes"):
        merge.task_arithmetic({"a": tv(w=[1.0, 2.0]), "b": tv(w=[1.0])}, 1.0)


def test_apply_delta_adds_and_keeps_dtype():
    base = {"w": np.array([1.0, 1.0], dtype=np.float16), "pos": np.arange(2)}
    out = merge.apply_delta(base, {"w": np.array([0.5, -1.0], dtype=np.float32)})
    assert out["w"].dtype == np.float16
    np.testing.assert_allclose(out["w"], [1.5, 0.0])
    assert out["pos"] is base["pos"]


def test_ties_trims_elects_sign_and_takes_disjoint_mean():
    # keep=0.5 keeps the 2 largest |tau| of each 4-entry task vector.
    tvs = {
        "a": tv(w=[4.0, -3.0, 0.1, 0.2]),   # kept: 4, -3
        "b": tv(w=[-1.0, -5.0, 2.0, 0.1]),  # kept: -5, 2
        "c": tv(w=[2.0, 1.0, 0.1, -6.0]),   # kept: 2, -6
    }
    out = merge.ties(tvs, lam=1.0, keep=0.5)
    # entry 0: trimmed 4, 0, 2 -> sign +, mean of agreeing (4, 2) = 3
    # entry 1: trimmed -3, -5, 0 -> sign -, mean = -4
    # entry 2: trimmed 0, 2, 0 -> 2; entry 3: trimmed 0, 0, -6 -> -6
    np.testing.assert_allclose(out["w"], [3.0, -4.0, 2.0, -6.0])


def test_ties_sign_election_drops_the_minority_sign():
    tvs = {"a": tv(w=[5.0]), "b": tv(w=[-2.0]), "c": tv(w=[-2.0])}
    # mass: 5 - 4 = +1 -> elected +, only task a agrees; plain averaging would give 1/3.
    np.testing.assert_allclose(merge.ties(tvs, lam=0.5, keep=1.0)["w"], [2.5])


def test_ties_threshold_is_global_across_tensors():
    tvs = {"a": tv(big=[10.0, 9.0], small=[0.1, 0.2]), "b": tv(big=[8.0, 7.0], small=[0.3, 0.1])}
    out = merge.ties(tvs, lam=1.0, keep=0.5)
    np.testing.assert_allclose(out["small"], [0.0, 0.0])
    np.testing.assert_allclose(out["big"], [9.0, 8.0])


def test_emr_unified_vector_masks_and_rescalers():
    tvs = {"a": tv(w=[2.0, -1.0, 1.0, 0.0]), "b": tv(w=[1.0, 3.0, -4.0, 2.0])}
    res = merge.emr(tvs)
    # sign of sum: [+, +, -, +]; max |tau| among agreeing tasks: [2, 3, 4, 2]
    np.testing.assert_allclose(res.unified["w"], [2.0, 3.0, -4.0, 2.0])
    np.testing.assert_array_equal(res.masks["a"]["w"], [True, False, False, False])
    np.testing.assert_array_equal(res.masks["b"]["w"], [True, True, True, True])
    assert res.masks["a"]["w"].dtype == bool
    # a: sum|tau| = 4, sum|mask*u| = 2 -> 2.0; b: 10 / 11
    assert res.rescalers["a"] == pytest.approx(2.0)
    assert res.rescalers["b"] == pytest.approx(10.0 / 11.0)
    np.testing.assert_allclose(res.task_delta("a")["w"], [4.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(res.task_delta("b")["w"], np.array([2.0, 3.0, -4.0, 2.0]) * 10 / 11, rtol=1e-6)


def test_emr_rebuilds_a_single_task_exactly():
    rng = np.random.default_rng(0)
    t = tv(w=rng.normal(size=(5, 7)))
    res = merge.emr({"only": t})
    np.testing.assert_allclose(res.task_delta("only")["w"], t["w"], rtol=1e-6)


def test_emr_task_delta_keeps_the_l1_mass_of_each_task():
    rng = np.random.default_rng(1)
    tvs = {k: tv(w=rng.normal(size=(30,)), v=rng.normal(size=(4, 4))) for k in "abc"}
    res = merge.emr(tvs)
    for k, t in tvs.items():
        d = res.task_delta(k)
        got = sum(np.abs(d[n]).sum() for n in d)
        want = sum(np.abs(t[n]).sum() for n in t)
        assert got == pytest.approx(want, rel=1e-5)


def test_average_is_the_mean_task_vector():
    tvs = {"a": tv(w=[2.0, 0.0]), "b": tv(w=[0.0, 4.0])}
    np.testing.assert_allclose(merge.average(tvs)["w"], [1.0, 2.0])


def _example_bundle(tmp_path, bits: int = 8):
    from safetensors.numpy import load_file

    from tvswitch.export.example import make_example
    from tvswitch.export.exporter import export_bundle

    paths = make_example(str(tmp_path))
    base_path = [p for p in paths if p.endswith("base.safetensors")][0]
    tasks = {p.split("/")[-1][: -len(".safetensors")]: p for p in paths if p != base_path}
    bundle = export_bundle(base_path, tasks, str(tmp_path / "b.tvs"), scheme=None, bits=bits)
    return bundle, load_file(base_path), {t: load_file(p) for t, p in tasks.items()}


def test_task_vectors_from_bundle_match_the_checkpoints(tmp_path):
    bundle, base, fts = _example_bundle(tmp_path, bits=8)
    taus = merge.task_vectors_from_bundle(bundle, base)
    assert list(taus) == list(bundle.tasks)
    for t, tv_ in taus.items():
        for n, d in tv_.items():
            true = fts[t][n].astype(np.float32) - base[n].astype(np.float32)
            step = (true.max() - true.min()) / 255 if true.size else 0
            # 8-bit codes: half a step; tensors stored as-is (BatchNorm statistics): fp16 rounding.
            fp16 = np.abs(fts[t][n]).max() * 2.0 ** -11
            assert np.abs(d - true).max() <= max(step * 0.5, fp16) + 1e-6, (t, n)


def test_cli_merge_writes_task_arithmetic_and_emr(tmp_path):
    from safetensors.numpy import load_file

    from tvswitch.cli import main

    bundle, base, fts = _example_bundle(tmp_path, bits=8)
    base_path = str(tmp_path / "base.safetensors")
    out = str(tmp_path / "ta.safetensors")
    assert main(["merge", bundle.path, "--method", "task_arithmetic", "--lambda", "0.5", "--base", base_path, "-o", out]) == 0
    merged = load_file(out)
    taus = merge.task_vectors_from_bundle(bundle, base)
    want = merge.apply_delta(base, merge.task_arithmetic(taus, 0.5))
    for n in taus[bundle.tasks[0]]:
        np.testing.assert_allclose(merged[n], want[n], rtol=1e-5, atol=1e-6)
    assert main(["merge", bundle.path, "--method", "emr", "--base", base_path, "-o", out]) == 2
    task = bundle.tasks[1]
    assert main(["merge", bundle.path, "--method", "emr", "--task", task, "--base", base_path, "-o", out]) == 0
    emr_w = load_file(out)
    assert set(bundle.task_specific(task)) <= set(emr_w)
