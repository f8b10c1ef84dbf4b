"""Auto-Switch: kNN weights on clustered synthetic features, per-input groups, query sets,
and the router record from export to serving."""
from __future__ import annotations

import re

import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.runtime.autoswitch import (DEFAULT_EXEMPLARS, AutoSwitch, Router, RouterSpec, build_query_sets,
                                         router_query_sets, select_exemplars, serve_groups)

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


# ---- per-input routing ----------------------------------------------------------------

def test_split_groups_inputs_by_their_own_mix_and_serve_groups_reassembles():
    router = AutoSwitch(clusters(100, 0), k=10)
    test = clusters(10, 5)
    batch = np.concatenate([test["a"][:3], test["c"][:2], test["a"][3:5]])
    groups = router.split(batch)
    assert [(list(rows), mix) for rows, mix in groups] == [([0, 1, 2, 5, 6], {"a": 1.0}), ([3, 4], {"c": 1.0})]

    calls = []

    def infer(inputs, mix):  # a fake engine: the output names which task served each row
        calls.append((len(inputs["x"]), dict(mix)))
        return {"y": inputs["x"][:, :1] * 0 + ord(next(iter(mix)))}

    out = serve_groups(infer, {"x": batch}, groups)
    assert calls == [(5, {"a": 1.0}), (2, {"c": 1.0})]  # one inference (one rebuild) per distinct mix
    np.testing.assert_array_equal(out["y"][:, 0], [ord(c) for c in "aaaccaa"])


def test_split_keeps_shared_shares_of_an_input_between_clusters():
    q = {"a": np.arange(6.0)[:, None], "b": (100.0 + np.arange(4.0))[:, None]}
    groups = AutoSwitch(q, k=8).split(np.array([[0.0], [103.0], [1.0]]))
    assert [(list(r), m) for r, m in groups] == [([0, 2], {"a": 0.75, "b": 0.25}), ([1], {"a": 0.5, "b": 0.5})]


# ---- query sets and the router record -------------------------------------------------

def test_build_query_sets_draws_n_seeded_exemplars_per_task():
    exemplars = {"a": [("a", i) for i in range(300)], "b": np.arange(40.0)[:, None]}
    seen = []

    def features(xs):
        seen.append(len(xs))
        return np.array([[float(x[1])] for x in xs]) if isinstance(xs, list) else xs * 2

    qs = build_query_sets(features, exemplars, n=100, seed=3)
    assert seen == [100, 40]  # all of b's 40, since it has fewer than n
    assert qs["a"].shape == (100, 1) and qs["b"].shape == (40, 1) and qs["a"].dtype == np.float32
    assert len(np.unique(qs["a"])) == 100
    np.testing.assert_array_equal(qs["a"], build_query_sets(features, exemplars, n=100, seed=3)["a"])
    assert not np.array_equal(qs["a"], build_query_sets(features, exemplars, n=100, seed=4)["a"])
    assert build_query_sets(features, exemplars)["a"].shape == (DEFAULT_EXEMPLARS, 1)
    with pytest.raises(ValueError, match=">= 1"):
        build_query_sets(features, exemplars, n=0)
    with pytest.raises(ValueError, match="need \\(5, d\\)"):
        build_query_sets(lambda xs: np.zeros((3, 2)), {"a": list(range(5))})


def test_router_query_sets_run_the_router_network_in_batches_as_the_record_says():
    """What `tvswitch router` stores: n exemplars drawn as build_query_sets draws them, run
    through the router network's mix in batches, mean-pooled over the mask input."""
    rng = np.random.default_rng(0)
    exemplars = {t: {"x": rng.normal(size=(n, 4, 3)), "mask": (rng.uniform(size=(n, 4)) > 0.3).astype(np.int64)}
                 for t, n in (("a", 23), ("b", 9))}
    calls = []

    def infer(inputs, mix):  # the "network": its output is its input, scaled by the mix's total weight
        calls.append((len(inputs["x"]), dict(mix)))
        return {"h": inputs["x"] * sum(mix.values())}

    spec = RouterSpec(output="h", mask_input="mask", network="average")
    qs = router_query_sets(spec, infer, ["a", "b"], exemplars, n=20, seed=1, batch=8)
    assert [c[0] for c in calls] == [8, 8, 4, 8, 1]  # a: 20 of 23 in batches of 8; b: all 9
    assert all(c[1] == {"a": 0.5, "b": 0.5} for c in calls)
    rows = select_exemplars(np.arange(23), 20, seed=1)
    x, m = exemplars["a"]["x"][rows], exemplars["a"]["mask"][rows]
    want = (x * m[:, :, None]).sum(1) / np.maximum(m.sum(1), 1)[:, None]
    np.testing.assert_allclose(qs["a"], want, rtol=1e-5, atol=1e-6)
    assert qs["b"].shape == (9, 3)
    with pytest.raises(TvswitchError, match="exemplars of task 'a': need input arrays with one and the same"):
        router_query_sets(spec, infer, ["a"], {"a": {"x": np.zeros((3, 4, 3)), "mask": np.ones((2, 4))}})


def test_router_features_mean_pool_over_the_mask():
    spec = RouterSpec(output="hidden", pool="mean", mask_input="mask")
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    got = spec.features({"hidden": hidden, "other": np.zeros(1)}, {"ids": np.zeros((2, 3)), "mask": mask})
    np.testing.assert_allclose(got, [hidden[0, :2].mean(0), hidden[1, 0]])
    unmasked = RouterSpec(output="hidden").features({"hidden": hidden}, {})
    np.testing.assert_allclose(unmasked, hidden.mean(axis=1))
    flat = np.ones((2, 5))
    np.testing.assert_array_equal(RouterSpec(output="f", pool="none").features({"f": flat}, {}), flat)


@pytest.mark.parametrize("spec,outputs,inputs,message", [
    (RouterSpec(output="h"), {"y": np.zeros((2, 3))}, {}, "'h' is not among the network's outputs (y)"),
    (RouterSpec(output="h", pool="none"), {"h": np.zeros((2, 3, 4))}, {}, "pool 'none' needs"),
    (RouterSpec(output="h", mask_input="m"), {"h": np.zeros((2, 3, 4))}, {"x": 0}, "'m' is not among the inputs"),
    (RouterSpec(output="h", mask_input="m"), {"h": np.zeros((2, 3, 4))}, {"m": np.ones((2, 4))}, "needs [2, 3]"),
])
def test_router_features_refuse_outputs_the_record_does_not_fit(spec, outputs, inputs, message):
    with pytest.raises(TvswitchError, match=re.escape(message)):
        spec.features(outputs, inputs)


@pytest.mark.parametrize("record,message", [
    ([1], "must be an object"),
    ({"pool": "mean"}, "lacks 'output'"),
    ({"output": "h", "features": "encoder"}, "unknown field 'features'"),
    ({"output": "h", "pool": "max"}, "pool must be mean or none"),
    ({"output": "h", "pool": "none", "mask_input": "m"}, "mask_input must be null unless pool is mean"),
    ({"output": "h", "k": 0}, "k must be an integer >= 1"),
    ({"output": "h", "k": True}, "k must be an integer >= 1"),
    ({"output": "h", "network": "best"}, "network must be average or base"),
    ({"output": ""}, "output must be an output name"),
])
def test_router_record_is_validated(record, message):
    with pytest.raises(TvswitchError, match=re.escape(message)):
        RouterSpec.from_record(record, "b.tvs")


def test_router_record_round_trips_and_names_the_router_network():
    spec = RouterSpec(output="last_hidden_state", mask_input="attention_mask", k=5, network="base")
    assert RouterSpec.from_record(spec.record()) == spec
    assert spec.record() == {"output": "last_hidden_state", "pool": "mean", "mask_input": "attention_mask",
                             "k": 5, "network": "base"}
    assert spec.network_mix(["a", "b"]) == {"a": 0.0, "b": 0.0}
    assert RouterSpec(output="h").network_mix(["a", "b", "c", "d"]) == {t: 0.25 for t in "abcd"}


def test_bundle_stores_a_valid_router_record_and_router_serves_from_it(bundle_factory, checkpoints):
    qs = {t: c[None, :] + np.zeros((5, 3)) for t, c in zip("abc", np.eye(3) * 10)}
    spec = RouterSpec(output="h", pool="none", k=3)
    bundle = bundle_factory(query_sets=qs, router=spec)
    assert bundle.router() == spec.record()
    calls = []

    def infer(inputs, mix):  # the router network: its output is the input itself
        calls.append(dict(mix))
        return {"h": inputs["x"]}

    router = Router(bundle, infer)
    assert router.switch.k == 3
    assert router({"x": np.array([[0.0, 9.0, 0.0]])}) == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert calls == [{t: 1.0 / 3 for t in "abc"}]  # features from the average network
    groups = router.groups({"x": np.array([[10.0, 0, 0], [0, 0, 10.0]])})
    assert [m for _, m in groups] == [{"a": 1.0}, {"c": 1.0}]

    with pytest.raises(TvswitchError, match="the router record: router pool must be"):
        bundle_factory(filename="bad.tvs", query_sets=qs, router={"output": "h", "pool": "max"})
    with pytest.raises(TvswitchError, match="give the query sets too"):
        bundle_factory(filename="bad.tvs", router=spec)
    with pytest.raises(TvswitchError, match="no router record"):
        Router(bundle_factory(filename="old.tvs", query_sets=qs), infer)
    with pytest.raises(TvswitchError, match="no Auto-Switch query sets"):
        Router(bundle_factory(filename="none.tvs"), infer)
