"""Auto-Switch's kNN weights on clustered synthetic features."""
from __future__ import annotations

import numpy as np
import pytest

from tvswitch.runtime.autoswitch import AutoSwitch, select_exemplars

CENTRES = {"a": [10.0, 0.0, 0.0], "b": [0.0, 10.0, 0.0], "c": [0.0, 0.0, 10.0]}


def clusters(n: int, seed: int, spread: float = 0.5):
    rng = np.random.default_rng(seed)
    return {t: np.asarray(c) + spread * rng.normal(size=(n, 3)) for t, c in CENTRES.items()}


def test_a_batch_from_one_cluster_routes_to_its_task():
    router = AutoSwitch(clusters(100, 0), k=10)
    batch = clusters(16, 1)["b"]
    assert router.weights(batch) == {"a": 0.0, "b": 1.0, "c": 0.0}


def test_a_mixed_batch_gets_its_mixture_shares():
    router = AutoSwitch(clusters(100, 0), k=10)
    test = clusters(40, 2)
    batch = np.concatenate([test["a"][:30], test["c"][:10]])
    w = router.weights(batch)
    assert w["a"] == pytest.approx(0.75)
    assert w["c"] == pytest.approx(0.25)
    assert w["b"] == 0.0
    per = router.per_input(batch)
    assert per.shape == (40, 3)
    np.testing.assert_allclose(per.sum(axis=1), 1.0)
    assert (per[:30, 0] == 1.0).all() and (per[30:, 2] == 1.0).all()


def test_shares_between_two_clusters_count_neighbours():
    # Query points on a line: 6 of task a at x=0..5, 4 of task b at x=100..103.
    q = {"a": np.arange(6.0)[:, None], "b": (100.0 + np.arange(4.0))[:, None]}
    router = AutoSwitch(q, k=8)
    # From x=0 the 8 nearest are all 6 a-points and the 2 nearest b-points.
    np.testing.assert_allclose(router.per_input(np.array([[0.0]])), [[0.75, 0.25]])
    # From x=103 the 8 nearest are all 4 b-points and the 4 largest a-points.
    np.testing.assert_allclose(router.per_input(np.array([[103.0]])), [[0.5, 0.5]])


def test_k_is_capped_by_the_number_of_exemplars():
    router = AutoSwitch({"a": np.zeros((2, 2)), "b": np.ones((1, 2))}, k=10)
    assert router.k == 3
    np.testing.assert_allclose(router.per_input(np.zeros((1, 2))), [[2 / 3, 1 / 3]])


def test_fp16_query_sets_route_like_fp32():
    qs = clusters(50, 3)
    router32 = AutoSwitch(qs, k=10)
    router16 = AutoSwitch(router32.query_sets(), k=10)
    assert all(q.dtype == np.float16 for q in router32.query_sets().values())
    batch = np.concatenate(list(clusters(10, 4).values()))
    np.testing.assert_allclose(router16.per_input(batch), router32.per_input(batch))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError):
        AutoSwitch({})
    with pytest.raises(ValueError):
        AutoSwitch({"a": np.zeros((3, 2)), "b": np.zeros((3, 4))})
    with pytest.raises(ValueError):
        AutoSwitch({"a": np.zeros((3, 2))}).per_input(np.zeros((1, 5)))


def test_select_exemplars_is_seeded_and_sized():
    x = np.arange(1000.0)[:, None]
    a, b = select_exemplars(x, 100, seed=0), select_exemplars(x, 100, seed=0)
    assert a.shape == (100, 1)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 100
    assert select_exemplars(x[:10], 100).shape == (10, 1)
