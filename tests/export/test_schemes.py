import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.export import allocate as alloc
from tvswitch.export.rtvq import quantize_residual, reconstruct
from tvswitch.export.tswitch import binarize


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
