"""Atomic switching: failed switches keep the old task serving; no request sees half-written weights.

The engines are the real ONNX Runtime and PyTorch engines on a small conv net with
BatchNorm.  Failures in the middle of a rebuild (what a CUDA error or a corrupt payload
would cause) are made by wrapping the real weight source; the staged path with a failing
refit (TensorRT's, which cannot run here) is exercised through an ONNX Runtime engine
whose publish copies a staging slot, a test double of the server's contract, not of
TensorRT.
"""
import contextlib
import copy
import threading
import time

import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.export.onnx_export import export_onnx
from tvswitch.runtime.engines import load_engine
from tvswitch.runtime.engines.onnxruntime import OnnxRuntimeEngine
from tvswitch.runtime.engines.torch_engine import TorchEngine
from tvswitch.runtime.server import BundleSource, Server

ENGINES = ["onnxruntime", "torch"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, engine_models):
    module, inputs, names = engine_models.conv_case()
    bundle, base = engine_models.make_bundle(tmp_path_factory.mktemp("server"), module, ("head.",))
    graph = export_onnx(module, [inputs[n] for n in names], input_names=names)
    return dict(bundle=bundle, base=base, graph=graph, inputs=inputs, module=module, names=names)


class SlowSource:
    """The real rebuild, landed tensor by tensor with pauses: a slow in-place write, so that a
    request slipping in mid-switch would read a mix of two tasks' weights."""

    def __init__(self, inner: BundleSource, pause: float = 2e-4):
        self.inner, self.pause = inner, pause
        self.tasks = inner.tasks
        self.writes = 0
        self.failures = 0  # how many writes from now on fail after their third tensor

    def check(self, mix):
        return self.inner.check(mix)

    def write(self, mix, buffers):
        scratch = {n: np.empty_like(a) for n, a in buffers.items()}
        self.inner.write(mix, scratch)
        self.writes += 1
        for i, (name, a) in enumerate(scratch.items()):
            if i == 3 and self.failures:
                self.failures -= 1
                raise RuntimeError("simulated device error after %d tensors" % i)
            np.copyto(buffers[name], a)
            time.sleep(self.pause)


class StagedOrt(OnnxRuntimeEngine):
    """ONNX Runtime with a staging slot that ``publish`` copies into the bound buffers (the
    contract TensorRT's refit has), to test the server's staged path."""

    publish_copies = True

    def __init__(self, *args, **kw):
        self.fail_publish = 0  # how many publishes fail from now on
        self.staging = None  # while the base class binds the graph's weights, they go straight in
        super().__init__(*args, **kw)
        self.staging = {n: a.copy() for n, a in self._arrays[0].items()}

    def buffers(self, slot=0):
        return self._arrays[0] if self.staging is None else self.staging

    def publish(self, slot=0):
        if self.staging is None:
            return
        if self.fail_publish:
            self.fail_publish -= 1
            first = next(iter(self.staging))
            np.copyto(self._arrays[0][first], self.staging[first])  # half done, then the error
            raise RuntimeError("simulated refit failure")
        for name, a in self.staging.items():
            np.copyto(self._arrays[0][name], a)
            time.sleep(1e-4)


def _engine(setup, mode, kind):
    slots = 2 if mode == "double" else 1
    if kind == "torch":
        return load_engine("torch", module=copy.deepcopy(setup["module"]), input_names=setup["names"], slots=slots)
    return (StagedOrt if mode == "staged" else OnnxRuntimeEngine)(setup["graph"], slots=slots, threads=1)


def _server(setup, mode="lock", pause=2e-4, kind="onnxruntime"):
    engine = _engine(setup, mode, kind)
    source = SlowSource(BundleSource(setup["bundle"], engine, setup["base"], threads=1), pause)
    return Server(engine, source, {"a": 1.0})


def _out(server, setup):
    return server.infer(setup["inputs"])["output"]


@contextlib.contextmanager
def _readers(server, setup, refs, same, count=3):
    """Threads that keep asking while the body switches; yields (bad, seen): the answers
    that matched no reference or more than one, and how often each reference was seen."""
    stop = threading.Event()
    bad, seen = [], [0] * len(refs)

    def reader():
        while not stop.is_set():
            out = _out(server, setup)
            hits = [same(out, r) for r in refs]
            if hits.count(True) != 1:
                bad.append(out)
            else:
                seen[hits.index(True)] += 1

    threads = [threading.Thread(target=reader) for _ in range(count)]
    for t in threads:
        t.start()
    try:
        yield bad, seen
    finally:
        stop.set()
        for t in threads:
            t.join()


def _reference(setup, mix, kind="onnxruntime"):
    server = _server(setup, pause=0, kind=kind)
    server.switch(mix)
    return _out(server, setup)


MODES = ["lock", "double", "staged"]
#: (mode, engine) pairs that run here; staged is the ONNX Runtime double above.
MODE_ENGINES = [(m, k) for m in ("lock", "double") for k in ENGINES] + [("staged", "onnxruntime")]


@pytest.mark.parametrize("mode,kind", MODE_ENGINES)
def test_bad_task_or_weight_is_refused_before_anything_changes(setup, mode, kind):
    server = _server(setup, mode, pause=0, kind=kind)
    before = _out(server, setup)
    writes = server.source.writes
    for mix in ({"nope": 1.0}, {"a": float("nan")}, {}):
        with pytest.raises(TvswitchError):
            server.switch(mix)
    assert server.source.writes == writes
    assert server.mix == {"a": 1.0}
    np.testing.assert_array_equal(_out(server, setup), before)


@pytest.mark.parametrize("mode,kind", MODE_ENGINES)
def test_a_failure_half_way_through_the_write_keeps_the_old_task_serving(setup, mode, kind):
    server = _server(setup, mode, pause=0, kind=kind)
    before = _out(server, setup)
    server.source.failures = 1
    with pytest.raises(RuntimeError, match="simulated"):
        server.switch({"b": 1.0})
    assert server.mix == {"a": 1.0}
    np.testing.assert_array_equal(_out(server, setup), before)
    assert server.switch({"b": 1.0})
    np.testing.assert_array_equal(_out(server, setup), _reference(setup, {"b": 1.0}, kind))


def test_a_failed_refit_is_rolled_back(setup):
    server = _server(setup, "staged", pause=0)
    before = _out(server, setup)
    server.engine.fail_publish = 1
    with pytest.raises(RuntimeError, match="simulated refit"):
        server.switch({"b": 1.0})
    assert server.mix == {"a": 1.0}
    np.testing.assert_array_equal(_out(server, setup), before)


def test_a_failed_refit_whose_rollback_fails_refuses_requests(setup):
    server = _server(setup, "staged", pause=0)
    before = _out(server, setup)
    server.engine.fail_publish = 2
    with pytest.raises(RuntimeError, match="simulated refit"):
        server.switch({"b": 1.0})
    with pytest.raises(TvswitchError, match="no task is serving"):
        server.infer(setup["inputs"])
    assert server.switch({"a": 1.0})
    np.testing.assert_array_equal(_out(server, setup), before)


@pytest.mark.parametrize("kind", ENGINES)
def test_when_the_rollback_fails_too_requests_are_refused_until_a_switch_succeeds(setup, kind):
    server = _server(setup, "lock", pause=0, kind=kind)
    before = _out(server, setup)
    server.source.failures = 2  # the switch and its rollback
    with pytest.raises(RuntimeError):
        server.switch({"b": 1.0})
    with pytest.raises(TvswitchError, match="no task is serving"):
        server.infer(setup["inputs"])
    assert server.switch({"a": 1.0})
    np.testing.assert_array_equal(_out(server, setup), before)


@pytest.mark.parametrize("mode,kind", MODE_ENGINES)
def test_concurrent_requests_see_one_task_or_the_other_never_a_mix(setup, mode, kind):
    refs = [_reference(setup, {"a": 1.0}, kind), _reference(setup, {"b": 1.0}, kind)]
    assert not np.array_equal(refs[0], refs[1])
    server = _server(setup, mode, kind=kind)
    with _readers(server, setup, refs, np.array_equal) as (bad, seen):
        for i in range(30):
            server.switch({"ba"[i % 2]: 1.0})
            time.sleep(0.002)  # switches spaced out, as in service: requests get their turn
    assert not bad, "%d requests saw half-written weights" % len(bad)
    assert seen[0] and seen[1]


def test_switching_to_the_serving_mix_rebuilds_nothing(setup):
    server = _server(setup, pause=0)
    writes = server.source.writes
    assert not server.switch({"a": 1.0})
    assert server.source.writes == writes


def test_a_switch_checks_its_mix_once(setup, monkeypatch):
    from tvswitch.runtime import mix as mixes

    server = _server(setup, pause=0)
    checked = []
    real = mixes.check_weight
    monkeypatch.setattr(mixes, "check_weight", lambda value, what: checked.append(what) or real(value, what))
    assert server.switch({"b": 0.5, "c": 0.25})
    assert checked == ["weight of task 'b'", "weight of task 'c'"]  # server, tables and rebuild: one check


def test_a_request_with_a_mix_is_answered_with_that_mix(setup):
    server = _server(setup, pause=0)
    mix = {"b": 0.5, "c": 0.5}
    mixed, out = server.auto(setup["inputs"], lambda x: {"a": 0.0, **mix})
    assert mixed == mix and server.mix == mix
    np.testing.assert_array_equal(out["output"], _reference(setup, mix))


def test_a_bundle_whose_names_match_no_weight_of_the_engine_is_refused(setup):
    engine = OnnxRuntimeEngine(setup["graph"], threads=1)
    renamed = {"model." + n: spec for n, spec in engine.weight_specs.items()}
    with pytest.raises(TvswitchError, match="names differ"):
        BundleSource(setup["bundle"], renamed, setup["base"])


@pytest.fixture(scope="module")
def plain(tmp_path_factory, engine_models):
    """A bundle of the BERT-shaped encoder and the graph a plain ``torch.onnx.export`` makes of it:
    constant folding stores most Linear weights as ``onnx::MatMul_N``, so only some names match."""
    import io
    import warnings

    import onnx
    import torch

    module, inputs, names = engine_models.encoder_case()
    with torch.no_grad():  # no two tensors equal (fresh LayerNorms are all ones), or the exporter merges them
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("plain")
    bundle, base = engine_models.make_bundle(folder, module)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(inputs[n]) for n in names), buf, dynamo=False,
                          input_names=names, output_names=["output"], do_constant_folding=True)
    onnx.save(onnx.load_from_string(buf.getvalue()), str(folder / "plain.onnx"))
    return dict(bundle=bundle, base=base, module=module, inputs=inputs, names=names, model=str(folder / "plain.onnx"))


def test_a_graph_that_lacks_some_of_the_bundles_tensors_is_refused_naming_them(plain):
    from tvswitch.runtime.server import serve_bundle

    with pytest.raises(TvswitchError) as info:
        serve_bundle(plain["bundle"].path, model=plain["model"], threads=1)
    message = str(info.value)
    assert "12 of the 36 tensors" in message and "layers.0.q.weight" in message
    assert "tvswitch export-onnx" in message and "--allow-unmatched" in message
    assert "\n" not in message


def test_allow_unmatched_serves_the_subset_and_warns_what_stays_at_the_graphs_values(plain, caplog):
    """The matched tensors switch, the others keep the graph's values: exactly the torch module with
    the rebuilt weights for the matched names and the base for the rest."""
    import torch

    from tvswitch.runtime.rebuild import CpuRebuilder
    from tvswitch.runtime.server import serve_bundle

    with pytest.raises(TvswitchError, match="cannot serve as the base .* give the base checkpoint"):
        serve_bundle(plain["bundle"].path, model=plain["model"], threads=1, allow_unmatched=True)
    with caplog.at_level("WARNING", logger="tvswitch.server"):
        server = serve_bundle(plain["bundle"].path, model=plain["model"], base=plain["base"], threads=1,
                              allow_unmatched=True)
    unmatched = server.unmatched
    assert len(unmatched) == 12 and "layers.0.q.weight" in unmatched
    assert set(unmatched).isdisjoint(server.engine.weight_specs)
    assert "12 tensors" in caplog.text and all(n in caplog.text for n in unmatched)
    rebuilder = CpuRebuilder(plain["bundle"], plain["base"])
    for task in ("b", "a"):
        server.switch({task: 1.0})
        rebuilt = rebuilder.allocate()
        rebuilder.rebuild({task: 1.0}, rebuilt)
        rebuilt.update((n, plain["base"][n]) for n in unmatched)
        ref = copy.deepcopy(plain["module"])
        ref.load_state_dict({n: torch.from_numpy(np.asarray(a)) for n, a in rebuilt.items()}, strict=False)
        with torch.no_grad():
            want = ref(*[torch.from_numpy(plain["inputs"][n]) for n in plain["names"]]).numpy()
        np.testing.assert_allclose(server.infer(plain["inputs"])["output"], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("slots", [1, 2])
def test_with_constant_sessions_concurrent_requests_see_one_task_or_the_other(setup, slots):
    """Constant-weight sessions made in the background come and go while a fourth thread switches:
    every answer is one task's (within float rounding: the constant session sums in another
    order), never a mix, and both paths answer (bound inputs right after a switch, the
    constant session once it is ready)."""
    refs = [_reference(setup, {"a": 1.0}), _reference(setup, {"b": 1.0})]
    engine = OnnxRuntimeEngine(setup["graph"], slots=slots, threads=1, constant_session=True)
    server = Server(engine, BundleSource(setup["bundle"], engine, setup["base"], threads=1), {"a": 1.0})
    constant_runs = []

    def close(out, ref):
        constant_runs.append(engine._constant.session(server._active) is not None)
        return np.allclose(out, ref, rtol=1e-4, atol=1e-5)

    with _readers(server, setup, refs, close) as (bad, seen):
        for i in range(16):
            server.switch({"ba"[i % 2]: 1.0})
            if i % 4 == 3:
                engine.wait_constant(server._active, timeout=60)  # let a constant session serve a while
            time.sleep(0.01)
    assert not bad, "%d requests saw neither task's answer" % len(bad)
    assert seen[0] and seen[1] and any(constant_runs) and not all(constant_runs)


@pytest.fixture(scope="module")
def partial(tmp_path_factory, engine_models):
    """The conv network's tasks, each changing part of it only: a the first half of its shared
    tensors, b the second, c all; each with its own head. Switches then leave tensors alone."""
    from tvswitch.export.exporter import export_bundle

    module, inputs, names = engine_models.conv_case()
    base, tasks = engine_models.task_checkpoints(module, ("head.",))
    shared = [n for n, a in base.items() if np.issubdtype(a.dtype, np.floating)]
    for task, kept in (("a", shared[len(shared) // 2:]), ("b", shared[: len(shared) // 2])):
        for n in kept:
            tasks[task][n] = base[n].copy()
    folder = tmp_path_factory.mktemp("partial")
    bundle = export_bundle(base, tasks, str(folder / "p.tvs"), name="tvq", bits=4)
    graph = export_onnx(module, [inputs[n] for n in names], input_names=names)
    return dict(bundle=bundle, base=base, graph=graph, inputs=inputs, module=module, names=names)


class FailingSource(BundleSource):
    """The real source; a write asked to fail scribbles another mix over the buffers, then raises."""

    fail_next = False

    def write(self, mix, buffers, since=None):
        if self.fail_next:
            self.fail_next = False
            super().write({t: 0.7 for t in self.tasks}, buffers)
            raise RuntimeError("simulated failure after writing other weights")
        super().write(mix, buffers, since)


@pytest.mark.parametrize("mode,kind", MODE_ENGINES)
def test_after_any_switches_and_failures_the_serving_slot_holds_a_fresh_rebuild(partial, mode, kind):
    from tvswitch.runtime.rebuild import CpuRebuilder

    engine = _engine(partial, mode, kind)
    source = FailingSource(partial["bundle"], engine, partial["base"], threads=1)
    server = Server(engine, source, {"a": 1.0})
    fresh = CpuRebuilder(partial["bundle"], partial["base"], threads=1)
    rng = np.random.default_rng(0)
    written = []
    real = source.rebuilder.rebuild
    source.rebuilder.rebuild = lambda mix, out, **kw: written.append(kw.get("since")) or real(mix, out, **kw)
    for step in range(40):
        mix = {t: float(rng.choice([1.0, 0.5, -0.3])) for t in rng.choice(["a", "b", "c"], rng.integers(1, 4), False)}
        source.fail_next = step % 9 == 4
        try:
            server.switch(mix)
        except RuntimeError:
            assert step % 9 == 4
        want = fresh.allocate()
        fresh.rebuild(server.mix, want)
        live = engine.buffers(server._active)
        for name, a in want.items():
            if name in live:
                assert np.asarray(live[name]).tobytes() == a.tobytes(), (step, mode, name)
        heads = source.binding.heads.padded[max(server.mix, key=server.mix.get)]
        for name, a in heads.items():
            np.testing.assert_array_equal(np.asarray(live[name]), a)
    assert any(s is not None for s in written) and written.count(None) > 1  # skipped, and whole after failures


def _read_twice_net():
    """y = tanh(x @ w) @ w.T + b: a plain export folds ``w.T`` into an initializer of its own."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8) * 0.3)
            self.b = torch.nn.Parameter(torch.randn(8) * 0.1)

        def forward(self, x):
            return torch.tanh(x @ self.w) @ self.w.t() + self.b

    return Net().eval()


@pytest.fixture(scope="module")
def read_twice(tmp_path_factory, engine_models):
    import io
    import warnings

    import onnx
    import torch

    torch.manual_seed(0)
    module = _read_twice_net()
    folder = tmp_path_factory.mktemp("twice")
    bundle, base = engine_models.make_bundle(folder, module)
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(x),), buf, dynamo=False, input_names=["x"],
                          output_names=["y"], do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    assert len(proto.graph.initializer) == 3  # w, b and w.T under the exporter's name
    onnx.save(proto, str(folder / "plain.onnx"))
    return dict(bundle=bundle, base=base, module=module, x=x, model=str(folder / "plain.onnx"), folder=folder)


def test_a_weight_the_graph_also_holds_folded_is_refused_naming_both(read_twice):
    """The graph has a weight named ``w``, so the name check passes, but one of its two uses
    reads a folded copy: every switch would answer with half the task's w and half the base's."""
    from tvswitch.runtime.server import serve_bundle

    engine = OnnxRuntimeEngine(read_twice["model"], names=read_twice["bundle"].shared_specs, threads=1)
    (copy, (weight, how)), = engine.weight_copies.items()
    assert (weight, how) == ("w", "transposed") and copy.startswith("onnx::")
    for constants in (True, False):
        with pytest.raises(TvswitchError) as info:
            serve_bundle(read_twice["bundle"].path, model=read_twice["model"], base=read_twice["base"], threads=1,
                         constants=constants)
        message = str(info.value)
        assert "'w'" in message and repr(copy) in message and "export-onnx" in message and "\n" not in message
    server = serve_bundle(read_twice["bundle"].path, model=read_twice["model"], base=read_twice["base"], threads=1,
                          allow_unmatched=True)
    assert "w" in server.unmatched


def test_the_same_network_exported_by_tvswitch_switches_every_use(read_twice, engine_models):
    from tvswitch.export.onnx_export import export_onnx
    from tvswitch.runtime.server import serve_bundle

    graph = str(read_twice["folder"] / "model.onnx")
    export_onnx(read_twice["module"], [read_twice["x"]], graph, input_names=["x"])
    server = serve_bundle(read_twice["bundle"].path, model=graph, base=read_twice["base"], threads=1)
    assert not server.engine.weight_copies
    for task in read_twice["bundle"].tasks:
        server.switch({task: 1.0})
        want = engine_models.torch_reference(read_twice["module"], read_twice["bundle"], read_twice["base"],
                                             {task: 1.0}, {"x": read_twice["x"]}, ["x"])
        np.testing.assert_allclose(next(iter(server.infer({"x": read_twice["x"]}).values())), want,
                                   rtol=1e-5, atol=1e-6)


def test_weight_copies_are_found_by_value_and_constant_weights_are_not(read_twice):
    import onnx
    from onnx import helper, numpy_helper

    from tvswitch.runtime.engines import onnx_graph

    proto = onnx.load(read_twice["model"])
    w = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "w")
    proto.graph.initializer.append(numpy_helper.from_array(w.reshape(64), "flat"))  # same bytes, another shape
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros(8, np.float32), "zeros"))
    proto.graph.node.append(helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(w.copy(), "c")))
    copies = onnx_graph.weight_copies(proto, ["w", "b"])
    assert copies.pop("flat") == ("w", "copy") and copies.pop("c") == ("w", "copy")
    assert list(copies.values()) == [("w", "transposed")]
    b = next(t for t in proto.graph.initializer if t.name == "b")
    b.CopyFrom(numpy_helper.from_array(np.zeros(8, np.float32), "b"))  # a constant weight matches any zeros: not taken
    assert "zeros" not in onnx_graph.weight_copies(proto, ["w", "b"])


def test_a_task_changing_one_of_two_tied_names_is_refused(tmp_path, engine_models):
    """An output projection tied to the embedding: the graph reads one tensor for both names.
    A task that stores ``out.weight`` alone (a LoRA adapter on ``out``) would be served as the
    base; one that changes both (a merged checkpoint) serves, as torch does."""
    import torch

    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.server import serve_bundle

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.out = torch.nn.Linear(8, 20, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids)))

    torch.manual_seed(0)
    module = Tied().eval()
    ids = np.array([[1, 5, 7]])
    graph = str(tmp_path / "model.onnx")
    export_onnx(module, [ids], graph, input_names=["ids"])
    engine = OnnxRuntimeEngine(graph, threads=1)
    assert dict(engine.weight_aliases) == {"out.weight": "emb.weight"}
    one, base = engine_models.make_bundle(tmp_path, module, name="one.tvs", only=("out.weight",))
    with pytest.raises(TvswitchError, match="changes 'out.weight', which the graph .* ties to 'emb.weight'"):
        serve_bundle(one.path, model=graph, base=base, threads=1)
    torch_engine = TorchEngine(module, ["ids"])  # one parameter under two names: the first is the weight
    assert dict(torch_engine.weight_aliases) == {"out.weight": "emb.weight"}
    assert "out.weight" not in torch_engine.weight_specs
    with pytest.raises(TvswitchError, match="changes 'out.weight', which the torch module ties to 'emb.weight'"):
        serve_bundle(one.path, "torch", module=module, input_names=["ids"], base=base)
    base, tasks = engine_models.task_checkpoints(module, only=("emb.weight",))
    for ft in tasks.values():  # a merged checkpoint: one tensor under both names
        ft["out.weight"] = ft["emb.weight"]
    both = export_bundle(base, tasks, str(tmp_path / "both.tvs"), name="tvq", bits=8)
    server = serve_bundle(both.path, model=graph, base=base, threads=1)
    task = both.tasks[0]
    server.switch({task: 1.0})
    want = engine_models.torch_reference(module, both, base, {task: 1.0}, {"ids": ids}, ["ids"])
    np.testing.assert_allclose(next(iter(server.infer({"ids": ids}).values())), want, rtol=1e-5, atol=1e-6)
    on_torch = serve_bundle(both.path, "torch", module=module, input_names=["ids"], base=base)
    on_torch.switch({task: 1.0})
    np.testing.assert_allclose(next(iter(on_torch.infer({"ids": ids}).values())), want, rtol=1e-5, atol=1e-6)


def test_a_graph_with_tied_names_and_an_int_buffer_forward_reads_serves_as_the_base(tmp_path, engine_models):
    """The graph's own weights are the base when no --base is given: a tied alias (not a
    weight of the graph) and an int64 ``position_ids`` buffer that ``forward`` reads (an
    initializer of the graph under its own name) are both in the bundle's fingerprint, so
    the graph's defaults must hold them; a stripped graph (--bundle) keeps the buffer."""
    import torch

    from tvswitch.export.exporter import export_bundle
    from tvswitch.export.onnx_export import export_onnx_for_bundle
    from tvswitch.runtime.server import serve_bundle

    class Positions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.pos = torch.nn.Embedding(4, 8)
            self.register_buffer("position_ids", torch.arange(4).unsqueeze(0))
            self.out = torch.nn.Linear(8, 20, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids) + self.pos(self.position_ids[:, :ids.shape[1]])))

    torch.manual_seed(0)
    module = Positions().eval()
    ids = np.array([[1, 5, 7]])
    base, tasks = engine_models.task_checkpoints(module)
    for ft in tasks.values():
        ft["out.weight"] = ft["emb.weight"]
    bundle = export_bundle(base, tasks, str(tmp_path / "pos.tvs"), name="tvq", bits=8)
    assert "position_ids" in bundle.manifest["base"]["other"]
    graph = str(tmp_path / "model.onnx")
    export_onnx(module, [ids], graph, input_names=["ids"])
    stripped = str(tmp_path / "stripped.onnx")
    export_onnx_for_bundle(module, bundle, [ids], stripped, input_names=["ids"])
    for model, given in ((graph, None), (stripped, base)):
        server = serve_bundle(bundle.path, model=model, base=given, threads=1)
        for task in bundle.tasks:
            server.switch({task: 1.0})
            want = engine_models.torch_reference(module, bundle, base, {task: 1.0}, {"ids": ids}, ["ids"])
            np.testing.assert_allclose(next(iter(server.infer({"ids": ids}).values())), want, rtol=1e-5, atol=1e-6)
