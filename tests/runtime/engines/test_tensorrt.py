"""What surrounds the TensorRT engine, tested without TensorRT: the graph it parses (weights as
initializers, BatchNorm unfolded into named constants), plan cache keys and their recovery from
a bad plan, which refit name comes from where and which absence is refused, and the checks on
TensorRT's answers.  Where a test needs one of TensorRT's objects it gets a stand-in with that one
method, to test our handling of the answer, not TensorRT.  The engine's own code runs against a
fake TensorRT in test_tensorrt_fake.py; on TensorRT itself only where TensorRT and a GPU are
present (the last test here)."""
import importlib.util
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the graph TensorRT parses is an ONNX graph (the onnx extra)")
pytest.importorskip("torch", reason="the test graphs are exported from torch (the torch extra)")

from tvswitch.errors import TvswitchError
from tvswitch.export.onnx_export import export_onnx
from tvswitch.runtime.engines import onnx_graph
from tvswitch.runtime.engines.tensorrt import (PlanCache, graph_digest, load_or_build, mark_refittable, parse_version,
                                               plan_key, refit_flag, refit_sources, strips_weights, trt_weights_dtype)


@pytest.fixture(scope="module")
def conv(engine_models):
    module, inputs, names = engine_models.conv_case()
    graph = export_onnx(module, [inputs[n] for n in names], input_names=names)
    weights = onnx_graph.find_weights(graph)
    _, defaults, _ = onnx_graph.serving_graph(graph, weights)
    return module, inputs, graph, weights, defaults


def _run(model, feeds):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_tensorrt_graph_has_weights_as_initializers_and_no_batchnorm(conv):
    _, inputs, graph, weights, defaults = conv
    trt_graph, folds = onnx_graph.tensorrt_graph(graph, weights, defaults)
    assert [i.name for i in trt_graph.graph.input] == ["x"]
    inits = {t.name for t in trt_graph.graph.initializer}
    assert set(weights) <= inits
    assert "BatchNormalization" not in [n.op_type for n in trt_graph.graph.node]
    assert [(bn.gamma, bn.mean, bn.shape) for bn in folds] == [("b1.weight", "b1.running_mean", (8, 1, 1)),
                                                               ("b2.weight", "b2.running_mean", (16, 1, 1))]
    assert all(bn.scale in inits and bn.shift in inits for bn in folds)
    onnx.checker.check_model(trt_graph)
    np.testing.assert_allclose(_run(trt_graph, inputs), _run(graph, inputs), rtol=1e-5, atol=1e-6)


def test_refitted_folds_match_batchnorm_on_new_weights(conv):
    """What a refit sets (weights + folds recomputed from them) equals BatchNorm on those weights."""
    _, inputs, graph, weights, defaults = conv
    rng = np.random.default_rng(3)
    new = {n: (a * (1 + 0.1 * rng.standard_normal(a.shape))).astype(a.dtype) for n, a in defaults.items()
           if n in weights}
    new = {n: np.abs(a) if n.endswith("running_var") else a for n, a in new.items()}
    fresh, folds = onnx_graph.tensorrt_graph(graph, weights, new)  # what a new build would hold
    refit, _ = onnx_graph.tensorrt_graph(graph, weights, defaults)  # an old build, refitted below
    values = dict(new)
    for bn in folds:
        values[bn.scale], values[bn.shift] = onnx_graph.derive_batchnorm(bn, new)
    for t in refit.graph.initializer:
        if t.name in values:
            t.CopyFrom(onnx.numpy_helper.from_array(values[t.name], t.name))
    engine_graph, _, _ = onnx_graph.serving_graph(graph, weights)
    feeds = dict(inputs, **new)
    np.testing.assert_allclose(_run(refit, inputs), _run(engine_graph, feeds), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(fresh, inputs), _run(refit, inputs), rtol=1e-6, atol=1e-7)


def test_graph_digest_ignores_switchable_values_but_not_structure_or_constants(conv):
    _, _, graph, weights, defaults = conv
    g1, folds = onnx_graph.tensorrt_graph(graph, weights, defaults)
    g2, _ = onnx_graph.tensorrt_graph(graph, weights, {n: a + 1 for n, a in defaults.items()})
    refittable = weights + [n for bn in folds for n in (bn.scale, bn.shift)]
    assert graph_digest(g1, refittable) == graph_digest(g2, refittable)
    assert graph_digest(g1, refittable) != graph_digest(g1, refittable[1:])  # a constant's value now counts
    g3 = onnx.ModelProto()
    g3.CopyFrom(g1)
    g3.graph.node[0].name = "renamed"
    assert graph_digest(g3, refittable) != graph_digest(g1, refittable)


def test_plan_key_changes_with_version_device_precision_and_shapes():
    base = plan_key("d", "10.3.0", "Orin sm_87", False, {"x": ((1, 3), (4, 3), (8, 3))})
    assert base == plan_key("d", "10.3.0", "Orin sm_87", False, {"x": ((1, 3), (4, 3), (8, 3))})
    others = [plan_key("e", "10.3.0", "Orin sm_87", False, {"x": ((1, 3), (4, 3), (8, 3))}),
              plan_key("d", "8.5.2", "Orin sm_87", False, {"x": ((1, 3), (4, 3), (8, 3))}),
              plan_key("d", "10.3.0", "Xavier sm_72", False, {"x": ((1, 3), (4, 3), (8, 3))}),
              plan_key("d", "10.3.0", "Orin sm_87", True, {"x": ((1, 3), (4, 3), (8, 3))}),
              plan_key("d", "10.3.0", "Orin sm_87", False, {"x": ((1, 3), (4, 3), (16, 3))})]
    assert len({base, *others}) == 6


def test_plan_cache_round_trip(tmp_path):
    cache = PlanCache(str(tmp_path / "plans"))
    assert cache.load("k") is None
    cache.store("k", b"plan bytes")
    assert cache.load("k") == b"plan bytes"
    assert os.listdir(str(tmp_path / "plans")) == ["k.plan"]


def test_refit_mode_and_stripping_follow_the_tensorrt_version():
    assert parse_version("10.3.0.30") == (10, 3, 0, 30) and parse_version("8.2.1.8") == (8, 2, 1, 8)
    assert refit_flag(parse_version("10.3.0")) == "REFIT_INDIVIDUAL"
    assert refit_flag(parse_version("10.1.0")) == "REFIT" and refit_flag(parse_version("8.5.2")) == "REFIT"
    assert strips_weights((10, 0)) and not strips_weights((8, 6, 1))


def test_refit_sources_sort_names_and_refuse_a_lost_fold(conv):
    _, _, graph, weights, defaults = conv
    trt_graph, folds = onnx_graph.tensorrt_graph(graph, weights, defaults)
    fold_names = [n for bn in folds for n in (bn.scale, bn.shift)]
    bn_params = {p for bn in folds for p in (bn.gamma, bn.beta, bn.mean, bn.var)}
    read = [n for n in weights if n not in bn_params]
    # REFIT (TensorRT < 10.2): every weight is refittable, graph constants too
    reported = read + fold_names + ["some_constant"]
    slot, constants = refit_sources(reported, weights, folds, onnx_graph.unread_weights(trt_graph, weights))
    assert slot == read and constants == ["some_constant"]
    with pytest.raises(TvswitchError, match="refittable"):
        refit_sources(weights, weights, folds)


def test_refit_sources_refuse_a_switchable_weight_tensorrt_dropped(conv):
    """A weight a node reads but TensorRT does not report would keep its build-time value at every
    switch: refused by name.  BatchNorm parameters and weights no node reads are expected absent."""
    _, _, graph, weights, defaults = conv
    trt_graph, folds = onnx_graph.tensorrt_graph(graph, weights, defaults)
    unread = onnx_graph.unread_weights(trt_graph, weights)
    fold_names = [n for bn in folds for n in (bn.scale, bn.shift)]
    reported = [n for n in weights if n not in unread] + fold_names
    dropped = next(n for n in reported if n in weights)  # c1.weight: a conv reads it
    with pytest.raises(TvswitchError, match="switchable weight %r" % dropped):
        refit_sources([n for n in reported if n != dropped], weights, folds, unread)
    # a tensor no node reads (say a pooler in a graph without tvswitch's record) is left out, not refused
    slot, _ = refit_sources(reported, weights + ["pooler.weight"], folds, unread + ["pooler.weight"])
    assert "pooler.weight" not in slot


def test_unread_weights_are_the_unfolded_batchnorm_parameters(conv):
    _, _, graph, weights, defaults = conv
    trt_graph, folds = onnx_graph.tensorrt_graph(graph, weights, defaults)
    bn_params = [p for bn in folds for p in (bn.gamma, bn.beta, bn.mean, bn.var)]
    assert sorted(onnx_graph.unread_weights(trt_graph, weights)) == sorted(bn_params)
    assert onnx_graph.unread_weights(graph, weights) == []  # before unfolding, BatchNorm reads them


class Network:
    """Stand-in for INetworkDefinition's mark_weights_refittable: False for the names it lacks."""

    def __init__(self, names):
        self.names, self.marked = set(names), []

    def mark_weights_refittable(self, name):
        self.marked.append(name)
        return name in self.names


def test_a_weight_tensorrt_will_not_mark_refittable_is_refused_by_name():
    network = Network(["c1.weight", "c1.bias"])
    mark_refittable(network, ["c1.weight", "c1.bias"])
    assert network.marked == ["c1.weight", "c1.bias"]
    with pytest.raises(TvswitchError, match="'head.weight' refittable"):
        mark_refittable(network, ["c1.weight", "head.weight"])


def test_a_cached_plan_that_does_not_load_is_rebuilt_and_replaced(tmp_path):
    cache = PlanCache(str(tmp_path / "plans"))
    cache.store("k", b"truncated plan")
    builds = []

    def build():
        builds.append(1)
        return b"good plan"

    def deserialize(plan):  # TensorRT's deserialize_cuda_engine answers None for a plan it cannot load
        return ("engine", plan) if plan == b"good plan" else None

    assert load_or_build(cache, "k", build, deserialize) == ("engine", b"good plan")
    assert builds == [1] and cache.load("k") == b"good plan"
    assert os.listdir(str(tmp_path / "plans")) == ["k.plan"]  # replaced atomically: no temp file left
    assert load_or_build(cache, "k", build, deserialize) == ("engine", b"good plan")
    assert builds == [1]  # a good cached plan is not rebuilt


def test_a_fresh_plan_that_does_not_load_is_refused_and_not_cached(tmp_path):
    cache = PlanCache(str(tmp_path / "plans"))
    with pytest.raises(TvswitchError, match="just built"):
        load_or_build(cache, "k", lambda: b"bad", lambda plan: None)
    assert cache.load("k") is None


def test_weights_of_a_dtype_tensorrt_cannot_refit_are_refused_by_name():
    trt = SimpleNamespace(float32="FLOAT", float16="HALF")  # the two attributes of the tensorrt module used
    assert trt_weights_dtype(trt, np.float32, "w") == "FLOAT" and trt_weights_dtype(trt, np.float16, "w") == "HALF"
    with pytest.raises(TvswitchError, match="weight 'emb.weight' is float64"):
        trt_weights_dtype(trt, np.float64, "emb.weight")


def test_publish_refits_under_the_lock_that_inference_holds():
    """publish's own code, without TensorRT: an engine object with no plan (its constructor needs
    TensorRT), whose refit step records whether the engine's lock was held around it."""
    from tvswitch.runtime.engines.tensorrt import TensorRTEngine

    engine = TensorRTEngine.__new__(TensorRTEngine)
    engine._lock = threading.Lock()
    held = []
    engine._refit = lambda: held.append(engine._lock.locked())
    engine.publish(0)
    assert held == [True] and not engine._lock.locked()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installed (no GPU on CI); the engine runs only on a device")
def test_tensorrt_engine_switches_like_onnxruntime(conv, tmp_path):
    from tvswitch.runtime.engines.tensorrt import TensorRTEngine

    _, inputs, graph, weights, defaults = conv
    engine = TensorRTEngine(graph, cache_dir=str(tmp_path))
    np.testing.assert_allclose(engine.infer(inputs)["output"], _run(graph, inputs), rtol=1e-3, atol=1e-4)
    for n, a in engine.buffers(0).items():
        a *= 1.05
    engine.publish(0)
    engine_graph, _, _ = onnx_graph.serving_graph(graph, weights)
    feeds = dict(inputs, **defaults)
    feeds.update((n, a.astype(np.float32)) for n, a in engine.buffers(0).items())
    np.testing.assert_allclose(engine.infer(inputs)["output"], _run(engine_graph, feeds), rtol=1e-3, atol=1e-4)
