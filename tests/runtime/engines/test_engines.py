"""Every engine that runs here (ONNX Runtime CPU, PyTorch CPU) against torch with the rebuilt weights.

For transformers' BertModel (tiny random config), a BertModel-shaped encoder and a conv net
with BatchNorm and per-task heads: after each switch the outputs equal the torch reference
of the rebuilt weights; 1,000 switches back and forth (with one slot and with a double
buffer) leave every switch's outputs unchanged (each one compared), the weight buffers where they were,
and memory flat.
"""
import copy
import re
import gc
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the engines are checked against torch (the torch extra)")
pytest.importorskip("onnx", reason="the graphs are exported with onnx (the onnx extra)")

from tvswitch.errors import TvswitchError
from tvswitch.export.onnx_export import export_onnx
from tvswitch.runtime.engines import load_engine
from tvswitch.runtime.server import BundleSource, Server, serve_bundle

# case -> (factory in models.py, tensor-name prefixes of per-task heads)
CASES = {"bert": ("bert_case", ()), "encoder": ("encoder_case", ()), "convbn": ("conv_case", ("head.",))}
MIXES = [{"a": 1.0}, {"b": 1.0}, {"a": 0.5, "c": 0.5}, {"a": 0.3, "b": 0.3, "c": 0.3}]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks on a shared 2-core machine: torch's second thread only adds wake-up latency."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, engine_models):
    M = engine_models
    factory, heads = CASES[request.param]
    module, inputs, names = getattr(M, factory)()
    folder = tmp_path_factory.mktemp(request.param)
    bundle, base = M.make_bundle(folder, module, heads)
    # beside the bundle, where serve_bundle looks for it
    graph = export_onnx(module, [inputs[n] for n in names], str(folder / "model.onnx"), input_names=names)
    refs = {repr(m): M.torch_reference(module, bundle, base, m, inputs, names) for m in MIXES}
    return dict(module=module, inputs=inputs, names=names, bundle=bundle, base=base, graph=graph, refs=refs)


def _engine(case, kind, slots=1, **options):
    if kind == "torch":
        return load_engine("torch", module=copy.deepcopy(case["module"]), input_names=case["names"], slots=slots)
    return load_engine("onnxruntime", case["graph"], slots=slots, threads=1, **options)


def _server(case, kind, slots=1, **options):
    engine = _engine(case, kind, slots, **options)
    return Server(engine, BundleSource(case["bundle"], engine, case["base"], threads=1), {"a": 1.0})


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _out(server, case):
    return next(iter(server.infer(case["inputs"]).values()))


def _check_switches_match_torch(server, case):
    for mix in MIXES + MIXES[::-1]:
        server.switch(mix)
        np.testing.assert_allclose(_out(server, case), case["refs"][repr(mix)], rtol=1e-4, atol=1e-5)
    # the tasks really differ, so equality above is not vacuous
    assert np.abs(case["refs"][repr(MIXES[0])] - case["refs"][repr(MIXES[1])]).max() > 1e-3


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
@pytest.mark.parametrize("slots", [1, 2])
def test_outputs_after_each_switch_equal_torch_with_rebuilt_weights(case, kind, slots):
    _check_switches_match_torch(_server(case, kind, slots), case)


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_serve_bundle_without_a_base_serves_from_the_engines_own_weights(case, kind):
    """No --base and no embedded base: the rebuild reads the graph's defaults (ONNX Runtime) or the
    module's whole state_dict (torch: BatchNorm's num_batches_tracked included, which the
    fingerprint covers), and every switch still equals torch."""
    assert not case["bundle"].has_embedded_base
    module = copy.deepcopy(case["module"]) if kind == "torch" else None
    server = serve_bundle(case["bundle"].path, kind, threads=1, module=module, input_names=case["names"])
    _check_switches_match_torch(server, case)


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
@pytest.mark.parametrize("slots,switches", [(1, 1000), (2, 1000)])
def test_many_switches_leave_outputs_buffers_and_memory_unchanged(case, kind, slots, switches):
    server = _server(case, kind, slots)
    buffers = [server.engine.buffers(s) for s in range(slots)]
    addresses = [{n: a.ctypes.data for n, a in b.items()} for b in buffers]
    first = {}
    for mix in ({"a": 1.0}, {"b": 1.0}):
        server.switch(mix)
        first[repr(mix)] = _out(server, case)
    for _ in range(50):  # warm up every cache (plans, bindings) before measuring
        server.switch({"a": 1.0})
        server.switch({"b": 1.0})
    # and what the loop calls for the first time (a lazy import would count as growth)
    np.testing.assert_array_equal(_out(server, case), first[repr({"b": 1.0})])
    # what is still reachable counts, not garbage awaiting the cycle collector (transformers'
    # forward leaves reference cycles behind that gc frees on its own schedule)
    gc.collect()
    rss_before = _rss_kib()
    blocks_before = sys.getallocatedblocks()  # Python objects alive (tracemalloc would triple the time)
    changed = []
    for i in range(switches):  # every switch's answer compared, bit for bit
        mix = {"ab"[i % 2]: 1.0}
        assert server.switch(mix)
        if not np.array_equal(_out(server, case), first[repr(mix)]):
            changed.append(i)
    gc.collect()
    py_growth = sys.getallocatedblocks() - blocks_before
    rss_growth_kib = _rss_kib() - rss_before
    assert not changed, "%d of %d switches answered differently, first at switch %d" % (
        len(changed), switches, changed[0])
    assert [server.engine.buffers(s) for s in range(slots)] == buffers
    assert [{n: a.ctypes.data for n, a in b.items()} for b in buffers] == addresses
    assert py_growth < 500, py_growth  # up to ~120 here; one object kept per switch would be 1,000 more
    # one leaked copy of the weights per switch would be > 10 MiB here
    assert rss_growth_kib < 4 * 1024, rss_growth_kib


def test_onnxruntime_reads_the_buffers_the_rebuild_writes(case):
    """The OrtValues share memory with the numpy slot: writing the array is what the session sees."""
    server = _server(case, "onnxruntime")
    engine = server.engine
    before = _out(server, case)
    name = next(n for n in engine.weight_specs if n in case["bundle"].shared_specs)
    buf = engine.buffers(0)[name]
    saved = buf.copy()
    buf += 1.0
    assert not np.allclose(_out(server, case), before)
    buf[...] = saved
    np.testing.assert_array_equal(_out(server, case), before)
    assert engine._values[0][name].data_ptr() == buf.ctypes.data


def test_onnxruntime_with_weights_in_its_own_memory_is_staged(case):
    """weights_device: the path the CUDA provider takes, run here on the CPU (ONNX Runtime-owned
    host memory; the CUDA device itself is not run).  The slot is a staging area: writing it
    changes nothing until publish uploads it, and the server then runs in staged mode."""
    server = _server(case, "onnxruntime", weights_device="cpu")
    engine = server.engine
    assert engine.publish_copies and server.mode == "staged"
    name = next(n for n in engine.weight_specs if n in case["bundle"].shared_specs)
    value = engine._values[0][name]
    address = value.data_ptr()
    assert address != engine.buffers(0)[name].ctypes.data
    before = _out(server, case)
    engine.buffers(0)[name] += 1.0
    np.testing.assert_array_equal(_out(server, case), before)  # staged, not yet published
    engine.publish(0)
    assert not np.allclose(_out(server, case), before)
    assert value.data_ptr() == address  # uploaded in place: the bindings stay valid
    engine.buffers(0)[name] -= 1.0
    engine.publish(0)
    np.testing.assert_allclose(_out(server, case), before, rtol=1e-6, atol=1e-6)
    _check_switches_match_torch(server, case)


def test_weights_on_a_device_need_one_slot(case):
    with pytest.raises(TvswitchError, match="slots must be 1"):
        _engine(case, "onnxruntime", slots=2, weights_device="cpu")


def test_torch_engine_writes_the_parameters_themselves(case):
    server = _server(case, "torch")
    params = dict(server.engine.module.named_parameters())
    server.switch({"b": 1.0})
    for name, a in server.engine.buffers(0).items():
        if name in params:
            assert params[name].data_ptr() == a.ctypes.data


def test_torch_engine_names_its_outputs_like_the_graph_once_it_has_run(case):
    engine = _engine(case, "torch")
    assert engine.output_names == []  # a module declares no outputs: unknown before it runs
    assert list(engine.infer(case["inputs"])) == engine.output_names == _engine(case, "onnxruntime").output_names


def test_engines_refuse_bad_inputs_with_a_clear_error(case):
    server = _server(case, "onnxruntime")
    with pytest.raises(TvswitchError, match="takes inputs"):
        server.infer({"nope": np.zeros(3)})


def test_onnxruntime_refuses_an_input_cast_that_is_not_same_kind(case):
    """Token ids from a float array would be truncated silently; float64 -> float32 is fine."""
    engine = _engine(case, "onnxruntime")
    name = case["names"][0]
    value = case["inputs"][name]
    wrong = value.astype(np.float32) if np.issubdtype(value.dtype, np.integer) else value.astype(np.complex64)
    with pytest.raises(TvswitchError, match="input %r is %s" % (name, wrong.dtype)):
        engine.infer(dict(case["inputs"], **{name: wrong}))
    if np.issubdtype(value.dtype, np.integer):  # a mask given for the ids, ids that would wrap
        for bad in (value > 0, np.full(value.shape, 2**63, np.uint64)):
            with pytest.raises(TvswitchError, match="input %r is %s" % (name, bad.dtype)):
                engine.infer(dict(case["inputs"], **{name: bad}))
    if value.dtype == np.float32:
        widened = dict(case["inputs"], **{name: value.astype(np.float64)})
        np.testing.assert_array_equal(engine.infer(widened)["output"], engine.infer(case["inputs"])["output"])


def test_negative_token_ids_are_refused_as_torch_refuses_them(case):
    """ONNX's Gather reads a negative index from the end of the table: a -1 among the ids
    would be answered with the last token's embedding.  Only the ids are refused: a mask
    no Gather reads takes any integer."""
    value = case["inputs"][case["names"][0]]
    if not np.issubdtype(value.dtype, np.integer):
        pytest.skip("this model's first input is no ids")
    ids, bad = case["names"][0], value.copy()
    bad.flat[0] = -1
    with pytest.raises(TvswitchError, match=re.escape("input %r holds negative values (-1.." % ids)):
        _engine(case, "onnxruntime").infer(dict(case["inputs"], **{ids: bad}))
    with pytest.raises(TvswitchError, match="the torch module could not run the inputs given .*index out of range"):
        _engine(case, "torch").infer(dict(case["inputs"], **{ids: bad}))
    engine = _engine(case, "onnxruntime")
    for other in case["names"][1:]:
        odd = case["inputs"][other].copy()
        if np.issubdtype(odd.dtype, np.integer):
            odd.flat[0] = -1
            engine.infer(dict(case["inputs"], **{other: odd}))


def test_a_fresh_engine_serves_the_weights_the_graph_was_exported_with(case):
    engine = load_engine("onnxruntime", case["graph"], threads=1)
    with torch.no_grad():
        want = case["module"](*[torch.from_numpy(case["inputs"][n]) for n in case["names"]]).numpy()
    np.testing.assert_allclose(next(iter(engine.infer(case["inputs"]).values())), want, rtol=1e-4, atol=1e-5)


def test_load_engine_names_what_is_missing():
    with pytest.raises(TvswitchError, match="needs a torch module"):
        load_engine("torch")
    with pytest.raises(TvswitchError, match="unknown engine"):
        load_engine("tflite")


def test_onnxruntime_refuses_a_provider_it_does_not_have(case):
    """ONNX Runtime itself would fall back to the CPU with a warning, and CPU figures pass for CUDA ones."""
    with pytest.raises(TvswitchError, match="NoSuchExecutionProvider"):
        _engine(case, "onnxruntime", providers=["NoSuchExecutionProvider"])


def _user_graph_with_a_stray_initializer():
    """A user's graph (no tvswitch record) with an initializer no node reads: ONNX Runtime warns about it."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((2, 3), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc.weight"], ["y"])], "user",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(w, "stray")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("verbose", [False, True])
def test_onnxruntime_writes_its_own_warnings_to_stderr_only_when_asked(capfd, verbose):
    load_engine("onnxruntime", _user_graph_with_a_stray_initializer(), names=["fc.weight"], verbose=verbose)
    assert ("Removing initializer 'stray'" in capfd.readouterr().err) == verbose


@pytest.mark.parametrize("slots", [1, 2])
def test_constant_sessions_take_over_after_each_switch_with_the_same_answers(case, slots):
    """constant_session: a switch answers at once through the bound inputs; the constant-weight
    session made in the background then answers, equal to torch on the rebuilt weights too."""
    engine = _engine(case, "onnxruntime", slots, constant_session=True)
    server = Server(engine, BundleSource(case["bundle"], engine, case["base"], threads=1), {"a": 1.0})
    constant = engine._constant
    for mix in MIXES:
        server.switch(mix)
        want = case["refs"][repr(mix)]
        np.testing.assert_allclose(_out(server, case), want, rtol=1e-4, atol=1e-5)
        assert engine.wait_constant(server._active, timeout=60)
        used = []
        session = constant.session(server._active)
        run = session.run
        session.run = lambda *a: used.append(1) or run(*a)
        np.testing.assert_allclose(_out(server, case), want, rtol=1e-4, atol=1e-5)
        assert used == [1]
    engine.buffers(server._active)  # a writer takes the buffers first: the slot's constant session retires
    assert constant.session(server._active) is None


def test_a_constant_session_of_a_slot_rewritten_meanwhile_is_never_served(case):
    engine = _engine(case, "onnxruntime", constant_session=True)
    assert engine.wait_constant(0, timeout=60)
    buffers = engine.buffers(0)  # a write begins: the session of the old weights retires at once
    assert engine._constant.session(0) is None
    before = _out_engine(engine, case)
    name = next(iter(buffers))
    buffers[name] += 1.0
    engine.publish(0)
    assert not np.allclose(_out_engine(engine, case), before)  # the bound inputs serve the new weights
    assert engine.wait_constant(0, timeout=60)
    np.testing.assert_allclose(_out_engine(engine, case), _out_engine(_engine(case, "onnxruntime"), case, buffers),
                               rtol=1e-4, atol=1e-5)


def _out_engine(engine, case, weights=None):
    if weights is not None:
        engine.bind({n: weights[n] for n in engine.weight_specs})
    return next(iter(engine.infer(case["inputs"]).values()))


def test_constant_sessions_are_refused_with_weights_on_a_device(case):
    with pytest.raises(TvswitchError, match="constant_session serves host weights"):
        _engine(case, "onnxruntime", weights_device="cpu", constant_session=True)
