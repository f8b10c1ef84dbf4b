"""Every engine that runs here (ONNX Runtime CPU, PyTorch CPU) against torch with the rebuilt weights.

For a BertModel-shaped encoder and a conv net with BatchNorm and per-task heads: after
each switch the outputs equal the torch reference of the rebuilt weights; 1,000 switches
back and forth leave outputs unchanged, the weight buffers where they were, and memory flat.
"""
import copy
import importlib.util
import os
import tracemalloc

import numpy as np
import pytest
import torch

from tvswitch.export.onnx_export import export_onnx
from tvswitch.runtime.engines import load_engine
from tvswitch.runtime.server import BundleSource, Server

_spec = importlib.util.spec_from_file_location("engine_models", os.path.join(os.path.dirname(__file__), "models.py"))
M = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(M)

CASES = {"encoder": (M.encoder_case, ()), "convbn": (M.conv_case, ("head.",))}
MIXES = [{"a": 1.0}, {"b": 1.0}, {"a": 0.5, "c": 0.5}, {"a": 0.3, "b": 0.3, "c": 0.3}]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks on a shared 2-core machine: torch's second thread only adds wake-up latency."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    make, heads = CASES[request.param]
    module, inputs, names = make()
    bundle, base = M.make_bundle(tmp_path_factory.mktemp(request.param), module, heads)
    graph = export_onnx(module, [inputs[n] for n in names], input_names=names)
    refs = {repr(m): M.torch_reference(module, bundle, base, m, inputs, names) for m in MIXES}
    return dict(module=module, inputs=inputs, names=names, bundle=bundle, base=base, graph=graph, refs=refs)


def _server(case, kind, slots=1):
    if kind == "torch":
        engine = load_engine("torch", module=copy.deepcopy(case["module"]), input_names=case["names"], slots=slots)
    else:
        engine = load_engine("onnxruntime", case["graph"], slots=slots, threads=1)
    return Server(engine, BundleSource(case["bundle"], engine.weight_specs, case["base"], threads=1), {"a": 1.0})


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _out(server, case):
    return next(iter(server.infer(case["inputs"]).values()))


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
@pytest.mark.parametrize("slots", [1, 2])
def test_outputs_after_each_switch_equal_torch_with_rebuilt_weights(case, kind, slots):
    server = _server(case, kind, slots)
    for mix in MIXES + MIXES[::-1]:
        server.switch(mix)
        np.testing.assert_allclose(_out(server, case), case["refs"][repr(mix)], rtol=1e-4, atol=1e-5)
    # the tasks really differ, so equality above is not vacuous
    assert np.abs(case["refs"][repr(MIXES[0])] - case["refs"][repr(MIXES[1])]).max() > 1e-3


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_a_thousand_switches_leave_outputs_buffers_and_memory_unchanged(case, kind):
    server = _server(case, kind)
    buffers = server.engine.buffers(0)
    addresses = {n: a.ctypes.data for n, a in buffers.items()}
    first = {}
    for mix in ({"a": 1.0}, {"b": 1.0}):
        server.switch(mix)
        first[repr(mix)] = _out(server, case)
    for _ in range(50):  # warm up every cache (plans, bindings) before measuring
        server.switch({"a": 1.0})
        server.switch({"b": 1.0})
    tracemalloc.start()
    rss_before = _rss_kib()
    py_before = tracemalloc.get_traced_memory()[0]
    for i in range(1000):
        mix = {"ab"[i % 2]: 1.0}
        assert server.switch(mix)
        if i % 50 < 2:
            np.testing.assert_array_equal(_out(server, case), first[repr(mix)])
    py_growth = tracemalloc.get_traced_memory()[0] - py_before
    tracemalloc.stop()
    rss_growth_kib = _rss_kib() - rss_before
    assert server.engine.buffers(0) is buffers
    assert {n: a.ctypes.data for n, a in buffers.items()} == addresses
    assert py_growth < 64 * 1024, py_growth
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


def test_torch_engine_writes_the_parameters_themselves(case):
    server = _server(case, "torch")
    params = dict(server.engine.module.named_parameters())
    server.switch({"b": 1.0})
    for name, a in server.engine.buffers(0).items():
        if name in params:
            assert params[name].data_ptr() == a.ctypes.data


def test_engines_refuse_bad_inputs_with_a_clear_error(case):
    from tvswitch.errors import TvswitchError

    server = _server(case, "onnxruntime")
    with pytest.raises(TvswitchError, match="takes inputs"):
        server.infer({"nope": np.zeros(3)})


def test_a_fresh_engine_serves_the_weights_the_graph_was_exported_with(case):
    engine = load_engine("onnxruntime", case["graph"], threads=1)
    with torch.no_grad():
        want = case["module"](*[torch.from_numpy(case["inputs"][n]) for n in case["names"]]).numpy()
    np.testing.assert_allclose(next(iter(engine.infer(case["inputs"]).values())), want, rtol=1e-4, atol=1e-5)


def test_load_engine_names_what_is_missing():
    from tvswitch.errors import TvswitchError

    with pytest.raises(TvswitchError, match="needs a torch module"):
        load_engine("torch")
    with pytest.raises(TvswitchError, match="unknown engine"):
        load_engine("tflite")
