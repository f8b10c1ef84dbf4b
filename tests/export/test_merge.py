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


def test_ties_keeps_every_entry_tied_at_the_trim_threshold():
    # keep=0.5 of 4 entries is 2, but the 2nd and 3rd largest are equal: both are kept.
    tvs = {"a": tv(w=[3.0, -2.0, 2.0, 1.0])}
    np.testing.assert_allclose(merge.ties(tvs, lam=1.0, keep=0.5)["w"], [3.0, -2.0, 2.0, 0.0])


def test_ties_zero_mass_takes_the_majority_sign_as_the_reference_code():
    # Entry 0: +2 and -2 cancel. The elected signs elsewhere are +, +, - (majority +), so
    # entry 0 is elected + and keeps task a's +2 (the reference's resolve_zero_signs
    # "majority"); a plain sign(0) = 0 would drop an entry both tasks moved.
    tvs = {"a": tv(w=[2.0, 1.0, 1.0, -1.0]), "b": tv(w=[-2.0, 1.0, 3.0, -1.0])}
    np.testing.assert_allclose(merge.ties(tvs, lam=1.0, keep=1.0)["w"], [2.0, 1.0, 2.0, -1.0])
    # Majority negative: the cancelled entry keeps the negative one.
    tvs = {"a": tv(w=[2.0, -1.0]), "b": tv(w=[-2.0, -1.0])}
    np.testing.assert_allclose(merge.ties(tvs, lam=1.0, keep=1.0)["w"], [-2.0, -1.0])
    # Majority over every tensor, not per tensor: "v" alone would elect -, the whole vector +.
    tvs = {"a": tv(w=[1.0, 1.0, 1.0], v=[3.0, -1.0]), "b": tv(w=[1.0, 1.0, 1.0], v=[-3.0, -1.0])}
    np.testing.assert_allclose(merge.ties(tvs, lam=1.0, keep=1.0)["v"], [3.0, -1.0])


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


def _example_bundle(tmp_path, bits: int = 8, scheme: str = "tvq"):
    from safetensors.numpy import load_file

    from tvswitch.export.example import make_example
    from tvswitch.export.exporter import export_bundle

    paths = make_example(str(tmp_path))
    base_path = [p for p in paths if p.endswith("base.safetensors")][0]
    tasks = {p.split("/")[-1][: -len(".safetensors")]: p for p in paths if p != base_path}
    bundle = export_bundle(base_path, tasks, str(tmp_path / ("%s.tvs" % scheme)), scheme=None, name=scheme, bits=bits)
    return bundle, load_file(base_path), {t: load_file(p) for t, p in tasks.items()}


AS_IS = ["pool.bn.running_mean", "pool.bn.running_var"]  # the example's BatchNorm statistics


def test_task_vectors_from_bundle_match_the_checkpoints(tmp_path):
    bundle, base, fts = _example_bundle(tmp_path, bits=8)
    taus = merge.task_vectors_from_bundle(bundle, base)
    assert list(taus) == list(bundle.tasks)
    for t, tv_ in taus.items():
        assert not set(AS_IS) & set(tv_)  # statistics stored as-is are no task vector
        for n, d in tv_.items():
            true = fts[t][n].astype(np.float32) - base[n].astype(np.float32)
            step = (true.max() - true.min()) / 255 if true.size else 0
            assert np.abs(d - true).max() <= step * 0.5 + 1e-6, (t, n)


def test_as_is_tensors_are_each_tasks_own(tmp_path):
    bundle, base, fts = _example_bundle(tmp_path, bits=8)
    assert merge.as_is_names(bundle) == AS_IS
    for t in bundle.tasks:
        own = merge.as_is_tensors(bundle, t)
        assert sorted(own) == AS_IS
        for n, a in own.items():
            assert a.dtype == base[n].dtype
            np.testing.assert_allclose(a, fts[t][n], rtol=1e-3)  # stored as float16


def test_merged_model_is_whole_for_a_task_and_headless_without_one(tmp_path):
    bundle, base, _ = _example_bundle(tmp_path, bits=8)
    taus = merge.task_vectors_from_bundle(bundle, base)
    delta = merge.task_arithmetic(taus, 0.3)
    task = bundle.tasks[0]
    own = merge.merged_model(bundle, delta, base, task)
    assert set(own.tensors) == set(base) | set(bundle.task_specific(task)) and own.left_out == [] == own.averaged
    for n, a in merge.as_is_tensors(bundle, task).items():
        np.testing.assert_array_equal(own.tensors[n], a)
    none = merge.merged_model(bundle, delta, base)
    heads = sorted(bundle.task_specific(task))
    assert none.left_out == heads and none.averaged == AS_IS
    assert not set(heads) & set(none.tensors)
    for n in delta:
        np.testing.assert_array_equal(none.tensors[n], own.tensors[n])


def _cli(*argv) -> int:
    from tvswitch.cli import main

    return main([str(a) for a in argv])


def _check_merged(got, want, bundle, base, task):
    """``got`` (the CLI's file) = ``want`` on the merged tensors, the task's own as-is
    tensors and head, and the base's integer buffers."""
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6, err_msg=n)
    for n, a in merge.as_is_tensors(bundle, task).items():
        np.testing.assert_array_equal(got[n], a)
    for n, a in bundle.task_specific(task).items():
        np.testing.assert_array_equal(got[n], a)
    np.testing.assert_array_equal(got["pool.bn.num_batches_tracked"], base["pool.bn.num_batches_tracked"])


@pytest.mark.parametrize("method,args,expected", [
    ("task_arithmetic", ["--lambda", "0.5"], lambda taus: merge.task_arithmetic(taus, 0.5)),
    ("ties", ["--lambda", "0.8", "--keep", "0.3"], lambda taus: merge.ties(taus, 0.8, 0.3)),
    ("average", [], merge.average),
])
def test_cli_merge_writes_the_merged_values(tmp_path, method, args, expected):
    from safetensors.numpy import load_file

    bundle, base, _ = _example_bundle(tmp_path, bits=8)
    out, task = tmp_path / "m.safetensors", bundle.tasks[1]
    assert _cli("merge", bundle.path, "--method", method, *args, "--task", task,
                "--base", tmp_path / "base.safetensors", "-o", out) == 0
    taus = merge.task_vectors_from_bundle(bundle, base)
    want = merge.apply_delta({n: base[n] for n in taus[task]}, expected(taus))
    _check_merged(load_file(str(out)), want, bundle, base, task)


def test_cli_merge_without_a_task_averages_statistics_and_leaves_heads_out(tmp_path, capsys):
    from safetensors.numpy import load_file

    bundle, base, _ = _example_bundle(tmp_path, bits=8)
    out = tmp_path / "m.safetensors"
    assert _cli("merge", bundle.path, "--method", "ties", "--lambda", "0.3", "--base", tmp_path / "base.safetensors",
                "-o", out) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "left out 2 tensors that each task has its own of (e.g. head.bias)" in err and "--task NAME" in err
    got = load_file(str(out))
    assert not [n for n in got if n.startswith("head.")]
    taus = merge.task_vectors_from_bundle(bundle, base)
    for n, a in merge.apply_delta({n: base[n] for n in taus["detect"]}, merge.ties(taus, 0.3, 0.2)).items():
        np.testing.assert_allclose(got[n], a, rtol=1e-5, atol=1e-6, err_msg=n)
    for n in AS_IS:  # the statistics: each task's own, averaged
        want = np.mean([merge.as_is_tensors(bundle, t)[n] for t in bundle.tasks], axis=0)
        np.testing.assert_allclose(got[n], want, rtol=1e-6)
        assert not np.allclose(got[n], base[n], atol=1e-3)
    np.testing.assert_array_equal(got["pool.bn.num_batches_tracked"], base["pool.bn.num_batches_tracked"])


def test_mean_statistics_leave_out_task_specific_globs(bundle_factory, checkpoints):
    """A tensor kept per task by a --task-specific glob is a per-task setting, not a statistic:
    no mean of it is written, only of the BatchNorm statistics."""
    base, fts = checkpoints
    bundle = bundle_factory(task_specific=["norm.*"])
    assert sorted(merge.as_is_names(bundle)) == ["bn.running_mean", "norm.weight"]
    assert merge.statistics_names(bundle) == ["bn.running_mean"]
    mean = merge.mean_statistics(bundle)
    assert list(mean) == ["bn.running_mean"]
    np.testing.assert_allclose(mean["bn.running_mean"], np.mean([f["bn.running_mean"] for f in fts.values()], axis=0),
                               atol=2e-3)  # stored as float16


def test_ties_refuses_a_keep_ratio_that_keeps_nothing():
    tvs = {"a": tv(w=[1.0, -2.0, 3.0]), "b": tv(w=[0.5, 0.5, 0.5])}
    with pytest.raises(ValueError, match="keeps none of the 3 entries"):
        merge.ties(tvs, 1.0, 0.1)
    merge.ties(tvs, 1.0, 1 / 3)  # one entry each: fine


@pytest.mark.parametrize("lam", [float("nan"), float("inf")])
def test_non_finite_lambdas_and_coefficients_are_refused(lam):
    from tvswitch.errors import TvswitchError

    tvs = {"a": tv(w=[1.0]), "b": tv(w=[2.0])}
    with pytest.raises(TvswitchError, match="lambda must be a finite number"):
        merge.task_arithmetic(tvs, lam)
    with pytest.raises(TvswitchError, match="lambda must be a finite number"):
        merge.ties(tvs, lam)
    with pytest.raises(TvswitchError, match="coefficient of task 'b' for tensor 'v' must be a finite number"):
        merge.Coefficients(["a", "b"], ["w", "v"], [[0.1, 0.2], [0.3, lam]])


def test_cli_emr_on_an_emr_bundle_is_the_bundles_own_rebuild(tmp_path):
    from safetensors.numpy import load_file

    from tvswitch.runtime.rebuild import CpuRebuilder

    bundle, base, _ = _example_bundle(tmp_path, bits=4, scheme="emr")
    # The first task has the smallest rescaler: re-running EMR on the decoded vectors
    # (the old behaviour) changes its model (the largest-rescaler task's would come back).
    out, task = tmp_path / "emr.safetensors", bundle.tasks[0]
    assert _cli("merge", bundle.path, "--method", "emr", "--task", task, "--base", tmp_path / "base.safetensors",
                "-o", out) == 0
    rebuilder = CpuRebuilder(bundle, base)
    want = rebuilder.allocate()
    rebuilder.rebuild({task: 1.0}, want)
    got = load_file(str(out))
    for n, a in want.items():  # bit for bit: EMR is not applied a second time
        np.testing.assert_array_equal(got[n], a, err_msg=n)
    again = merge.emr(merge.task_vectors_from_bundle(bundle, base)).task_delta(task)
    assert any(not np.allclose(got[n], base[n] + d, atol=1e-7) for n, d in again.items())
    _check_merged(got, want, bundle, base, task)


def test_cli_emr_on_another_scheme_runs_emr_on_the_decoded_vectors(tmp_path, capsys):
    from safetensors.numpy import load_file

    bundle, base, _ = _example_bundle(tmp_path, bits=8)
    out, task = tmp_path / "emr.safetensors", bundle.tasks[0]
    base_path = tmp_path / "base.safetensors"
    assert _cli("merge", bundle.path, "--method", "emr", "--base", base_path, "-o", out) == 2
    assert "give --task NAME" in capsys.readouterr().err
    assert _cli("merge", bundle.path, "--method", "emr", "--task", task, "--base", base_path, "-o", out) == 0
    assert "EMR run on the tvq-decoded task vectors" in capsys.readouterr().out
    taus = merge.task_vectors_from_bundle(bundle, base)
    want = merge.apply_delta({n: base[n] for n in taus[task]}, merge.emr(taus).task_delta(task))
    _check_merged(load_file(str(out)), want, bundle, base, task)


def test_cli_adamerging_applies_saved_coefficients(tmp_path, capsys):
    from safetensors.numpy import load_file

    bundle, base, _ = _example_bundle(tmp_path, bits=8)
    taus = merge.task_vectors_from_bundle(bundle, base)
    names = merge.shared_names(taus)
    values = np.random.default_rng(0).uniform(0, 1, (len(bundle.tasks), len(names)))
    coefficients = merge.Coefficients(list(bundle.tasks), names, values)
    coefficients.save(str(tmp_path / "c.safetensors"))
    out, task = tmp_path / "ada.safetensors", bundle.tasks[0]
    base_path = tmp_path / "base.safetensors"
    assert _cli("merge", bundle.path, "--method", "adamerging", "--coefficients", tmp_path / "c.safetensors",
                "--task", task, "--base", base_path, "-o", out) == 0
    want = merge.apply_delta({n: base[n] for n in names}, coefficients.delta(taus))
    _check_merged(load_file(str(out)), want, bundle, base, task)

    merge.Coefficients(["detect", "gauge"], names, values[:2]).save(str(tmp_path / "two.json"))
    (tmp_path / "junk.json").write_text("[1, 2]")
    for extra, message in (([], "needs --coefficients FILE"),
                           (["--coefficients", tmp_path / "none.json"], "none.json: no such coefficients file"),
                           (["--coefficients", tmp_path / "junk.json"], "junk.json: not a coefficients file"),
                           (["--coefficients", tmp_path / "two.json"], "are for tasks detect, gauge")):
        assert _cli("merge", bundle.path, "--method", "adamerging", *extra, "--task", task,
                    "--base", base_path, "-o", out) == 2
        assert message in capsys.readouterr().err
