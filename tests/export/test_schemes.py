import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.export import allocate as alloc
from tvswitch.export.rtvq import quantize_residual, reconstruct
from tvswitch.export.tswitch import binarize
from tvswitch.runtime.stats import budget_bits


def test_error_correction_lowers_rtvq_error():
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 1e-2, 5000)
    taus = np.stack([shared + rng.normal(0, 3e-3, 5000) for _ in range(8)]).astype(np.float32)
    def err(ec):
        res = quantize_residual(taus, 3, 2, 5000, error_correction=ec)
        return sum(np.sum((reconstruct(res, t) - taus[t]) ** 2) for t in range(8))
    assert err(True) < 0.9 * err(False)


def test_rtvq_beats_tvq_at_two_bits_on_correlated_tasks():
    from tvswitch.export.quantize import dequantize, quantize
    rng = np.random.default_rng(2)
    shared = rng.normal(0, 1e-2, 4000)
    taus = np.stack([shared + rng.normal(0, 2e-3, 4000) for _ in range(8)]).astype(np.float32)
    res = quantize_residual(taus, 3, 2, 4000)
    rtvq = sum(np.sum((reconstruct(res, t) - taus[t]) ** 2) for t in range(8))
    tvq = sum(np.sum((dequantize(quantize(taus[t], 2, 4000)) - taus[t]) ** 2) for t in range(8))
    assert rtvq < tvq


def test_tswitch_keeps_the_share_of_each_sign_and_restores_the_norm():
    rng = np.random.default_rng(3)
    tau = rng.normal(0, 1, 1001)
    tau[:100] = 0.0  # exact zeros are neither positive nor negative: never kept
    sw = binarize(tau, 0.3)
    npos, nneg = int((tau > 0).sum()), int((tau < 0).sum())
    assert sw.kept == round(0.3 * npos) + round(0.3 * nneg)
    assert int((sw.mask & (tau > 0)).sum()) == round(0.3 * npos)
    # the kept entries are the largest of each sign
    kept_pos = tau[sw.mask & (tau > 0)]
    assert kept_pos.min() >= tau[~sw.mask & (tau > 0)].max()
    kept_neg = tau[sw.mask & (tau < 0)]
    assert kept_neg.max() <= tau[~sw.mask & (tau < 0)].min()
    rebuilt = sw.scale * sw.mask * np.where(sw.positive, 1.0, -1.0)
    assert np.isclose(np.linalg.norm(rebuilt), np.linalg.norm(tau), rtol=1e-12)
    assert not sw.mask[:100].any()


def test_tswitch_keep_is_checked():
    with pytest.raises(TvswitchError, match="--keep"):
        binarize(np.ones(4), 0.0)


def test_allocator_respects_the_budget_and_spends_bits_where_they_pay():
    # tensor 0 is small and error-prone, tensor 1 large and forgiving
    small = [alloc.Option(10 * b, 100.0 / 4 ** b, b) for b in range(1, 9)]
    large = [alloc.Option(1000 * b, 1.0 / 4 ** b, b) for b in range(1, 9)]
    budget = 2.0 * 1010
    choice = alloc.allocate([small, large], budget)
    cost = small[choice[0]].cost + large[choice[1]].cost
    assert cost <= budget
    assert small[choice[0]].label > large[choice[1]].label
    uniform_error = small[1].error + large[1].error  # 2 bits each, the same budget
    assert small[choice[0]].error + large[choice[1]].error < uniform_error


def test_allocator_refuses_an_impossible_budget():
    with pytest.raises(TvswitchError, match="--budget-bits"):
        alloc.allocate([[alloc.Option(10, 1.0)]], 5)


def _coded_bits_per_weight(bundle):
    """Stored bits of every codes term's payloads (codes and params; a shared payload once)
    per task-vector weight of the tensors those terms code."""
    keys, weights = set(), 0
    for name, spec in bundle.shared_specs.items():
        entries = [bundle.entries(t).get(name) for t in bundle.tasks]
        if entries[0] is None or entries[0].terms[0].kind != "codes":
            continue
        weights += spec.numel * len(bundle.tasks)
        for e in entries:
            keys.update(k for t in e.terms for k in (t.codes, t.params))
    return 8.0 * sum(bundle.payload(k).nbytes for k in keys) / weights


@pytest.mark.parametrize("scheme,granularity,budget", [
    ("tvq", "tensor", 3.0), ("tvq", "group:32", 4.0), ("tvq", "channel", 2.5),
    ("rtvq", "tensor", 2.5), ("rtvq", "group:32", 5.0),
])
def test_budget_counts_scales_and_offsets(tmp_path, scheme, granularity, budget):
    """--budget-bits is what the file stores for the coded tensors, (scale, offset) pairs included:
    at group:32 the pairs alone cost 2 bits per weight."""
    from tvswitch.export.exporter import export_bundle

    rng = np.random.default_rng(5)
    shapes = {"a.weight": (96, 64), "b.weight": (200, 48), "c.bias": (64,), "d.weight": (33, 70)}
    base = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in shapes.items()}
    fts = {t: {n: (w + rng.laplace(0, 0.002 * (1 + k), w.shape)).astype(np.float32) for k, (n, w) in
               enumerate(base.items())} for t in "xyz"}
    bundle = export_bundle(base, fts, str(tmp_path / "b.tvs"), name=scheme, granularity=granularity,
                           budget_bits=budget, layout="streams")
    measured = _coded_bits_per_weight(bundle)
    assert budget - 1.0 < measured <= budget
    # under auto the widths are priced as the terms auto writes, and the budget still holds
    compact = export_bundle(base, fts, str(tmp_path / "c.tvs"), name=scheme, granularity=granularity,
                            budget_bits=budget, layout="auto")
    assert budget_bits(compact) <= budget
    widths = {n: tuple(t.bits for t in bundle.entries("x")[n].terms) for n in shapes}
    assert len(set(widths.values())) > 1  # the budget was spent unevenly, not one width for all


def test_budget_below_the_scales_alone_is_refused(tmp_path):
    from tvswitch.export.exporter import export_bundle

    rng = np.random.default_rng(6)
    base = {"w": rng.normal(0, 0.05, (64, 64)).astype(np.float32)}
    fts = {"a": {"w": base["w"] + np.float32(0.01)}}
    with pytest.raises(TvswitchError, match=r"--budget-bits 2.5 is below .* \(3.0\d* bits needed, scales included\)"):
        export_bundle(base, fts, str(tmp_path / "b.tvs"), name="tvq", granularity="group:32", budget_bits=2.5)


def test_rtvq_add_task_keeps_the_base_at_a_measured_cost(tmp_path):
    """add-task keeps RTVQ's shared base (the mean of the tasks exported): the other tasks stay
    bit for bit; the added task's offset, taken against the old mean, spans about T/(T-1) the
    range a fresh export gives it.  Measured here on 7 + 1 tasks shaped like AdamW task vectors
    (Gaussian/uniform mix, kurtosis ~2.6, a low-rank part, some shared direction)."""
    from tvswitch.export.edit import add_task
    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.rebuild import CpuRebuilder

    rng = np.random.default_rng(8)
    shapes = {"q.weight": (128, 128), "up.weight": (256, 128), "up.bias": (256,)}
    base = {n: rng.normal(0, 0.09, s).astype(np.float32) for n, s in shapes.items()}

    def noise(s):
        return (rng.normal(0, 1, s) + rng.uniform(-3 ** 0.5, 3 ** 0.5, s)) / 2 ** 0.5
    shared = {n: noise(s) for n, s in shapes.items()}
    fts = {}
    for t in range(8):
        fts["t%d" % t] = {}
        for n, s in shapes.items():
            own = noise(s) + (rng.normal(0, 1, (s[0], 4)) @ rng.normal(0, 1, (4, s[1])) / 4 if len(s) == 2 else 0)
            fts["t%d" % t][n] = (base[n] + 1e-3 * (0.2 ** 0.5 * shared[n] + 0.8 ** 0.5 * own)).astype(np.float32)
    tasks = list(fts)

    def rel_error(bundle, task):
        r = CpuRebuilder(bundle, base)
        out = r.allocate()
        r.rebuild({task: 1.0}, out)
        err = sum(np.sum((out[n].astype(np.float64) - fts[task][n]) ** 2) for n in shapes)
        return (err / sum(np.sum((fts[task][n].astype(np.float64) - base[n]) ** 2) for n in shapes)) ** 0.5

    seven = export_bundle(base, {t: fts[t] for t in tasks[:7]}, str(tmp_path / "7.tvs"), name="rtvq")
    added = add_task(seven.path, tasks[7], fts[tasks[7]], base, out=str(tmp_path / "7+1.tvs"))
    fresh = export_bundle(base, fts, str(tmp_path / "8.tvs"), name="rtvq")
    for t in tasks[:7]:
        assert rel_error(added, t) == rel_error(seven, t)
    ratio = rel_error(added, tasks[7]) / rel_error(fresh, tasks[7])
    assert 1.03 < ratio < 1.3  # documented in docs/FORMAT.md section 7 and add-task --help


def test_a_task_rtvq_stores_worse_than_not_at_all_is_named(tmp_path, checkpoints, caplog):
    """Beside a task vector 5x larger, RTVQ's shared base vector swamps the small tasks."""
    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints
    with caplog.at_level("WARNING", logger="tvswitch.export"):
        export_bundle(base, fts, str(tmp_path / "even.tvs"), name="rtvq")
    assert "further than the base" not in caplog.text
    big = dict(fts, c={n: (base[n] + 5 * (a - base[n])).astype(a.dtype) if n in base else a
                       for n, a in fts["c"].items()})
    with caplog.at_level("WARNING", logger="tvswitch.export"):
        export_bundle(base, big, str(tmp_path / "uneven.tvs"), name="rtvq")
    assert "task 'a'" in caplog.text and "further than the base" in caplog.text and "--scheme tvq" in caplog.text
    assert "task 'c' (c): the rtvq" not in caplog.text
