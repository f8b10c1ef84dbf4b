"""The TensorRT engine's own code, run against FAKE TensorRT (fake_tensorrt.py), for 8.x and 10.x.

Not TensorRT: the fake implements the documented Python API subset the engine uses, records
every call and enforces the documented contracts; its engines compute with ONNX Runtime
from the weights the refits set.  What these tests show is that our call sequence is the
one the documentation asks for, per version (build flags, plan cache, registration and
refit calls, the streams), and that the weights it hands over are the right ones (outputs
equal torch on the rebuilt weights).  They do not show that TensorRT itself accepts it:
nothing here ran on TensorRT (docs/engines.md section 3).
"""
import ctypes
import importlib.util
import os
import sys

import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.export.onnx_export import export_onnx
from tvswitch.runtime.engines import onnx_graph
from tvswitch.runtime.server import BundleSource, Server

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_tensorrt as F  # noqa: E402  (a file beside this one: the tests' folders are not packages)

VERSIONS = ["8.5.2", "8.6.1", "10.1.0", "10.3.0"]
MIXES = [{"b": 1.0}, {"a": 0.5, "c": 0.5}, {"a": 1.0}]


@pytest.fixture(scope="module")
def cases(tmp_path_factory, engine_models):
    """The conv net with BatchNorm and per-task heads, and the BERT-shaped encoder: graph, bundle, refs."""
    M = engine_models
    out = {}
    for name, factory, heads in (("conv", "conv_case", ("head.",)), ("encoder", "encoder_case", ())):
        module, inputs, names = getattr(M, factory)()
        folder = tmp_path_factory.mktemp(name)
        bundle, base = M.make_bundle(folder, module, heads)
        graph = export_onnx(module, [inputs[n] for n in names], input_names=names)
        profile = {n: ((1,) + a.shape[1:], a.shape, (4,) + a.shape[1:]) for n, a in inputs.items()}
        refs = {repr(m): M.torch_reference(module, bundle, base, m, inputs, names) for m in MIXES}
        out[name] = dict(module=module, inputs=inputs, names=names, bundle=bundle, base=base, graph=graph,
                         profile=profile, refs=refs)
    return out


def _engine(case, fake, tmp_path=None, **kw):
    from tvswitch.runtime.engines.tensorrt import TensorRTEngine

    return TensorRTEngine(case["graph"], profile=case["profile"], cache_dir=str(tmp_path) if tmp_path else None,
                          **kw)


def _server(case, engine):
    return Server(engine, BundleSource(case["bundle"], engine, case["base"], threads=1), {"a": 1.0})


def _check_switches(server, case):
    for mix in MIXES:
        server.switch(mix)
        out = server.infer(case["inputs"])["output"]
        np.testing.assert_allclose(out, case["refs"][repr(mix)], rtol=1e-4, atol=1e-5)


def _switchable_read(case):
    """The switchable weights a node of TensorRT's graph reads (BatchNorm's four are read as folds)."""
    weights = onnx_graph.find_weights(case["graph"])
    _, defaults, _ = onnx_graph.serving_graph(case["graph"], weights)
    graph, folds = onnx_graph.tensorrt_graph(case["graph"], weights, defaults)
    unread = set(onnx_graph.unread_weights(graph, weights))
    return [n for n in weights if n not in unread], [n for bn in folds for n in (bn.scale, bn.shift)]


@pytest.mark.parametrize("version", VERSIONS)
def test_build_flags_follow_the_version(cases, monkeypatch, version):
    fake = F.install(monkeypatch, version)
    case = cases["conv"]
    engine = _engine(case, fake)
    flags = fake.called("set_flag")
    read, folds = _switchable_read(case)
    if version.startswith("8."):
        assert flags == ["REFIT"]  # no STRIP_PLAN, no REFIT_INDIVIDUAL before 10
        assert engine.device_buffers() is None
        with pytest.raises(TvswitchError, match="host memory only"):
            engine.use_device_buffers(None)
    elif version == "10.1.0":
        assert flags == ["REFIT", "STRIP_PLAN"]
    else:
        assert flags == ["REFIT_INDIVIDUAL", "STRIP_PLAN"]
        assert fake.called("mark_weights_refittable") == read + folds  # BatchNorm's own four: read as folds
    np.testing.assert_allclose(engine.infer(case["inputs"])["output"], _plain(case), rtol=1e-4, atol=1e-5)


def _plain(case):
    """The module as exported (the graph's own weights): what a fresh engine serves."""
    import torch

    with torch.no_grad():
        return case["module"](*[torch.from_numpy(case["inputs"][n]) for n in case["names"]]).numpy()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("which", ["conv", "encoder"])
def test_switches_equal_torch_on_the_rebuilt_weights_with_the_calls_of_the_version(cases, monkeypatch, version,
                                                                                   which):
    fake = F.install(monkeypatch, version)
    case = cases[which]
    engine = _engine(case, fake)
    server = _server(case, engine)
    assert server.mode == "staged"
    at_load = len(fake.calls)
    _check_switches(server, case)
    per_switch = fake.calls[at_load:]
    names = [w for w, _ in per_switch]
    if version.startswith("8."):
        assert names.count("refit_cuda_engine") == len(MIXES)
        assert "refit_cuda_engine_async" not in names and "refit_from_bytes" not in names
        sets = [d for w, d in per_switch if w == "set_named_weights"]
        assert all(where == "HOST" for _, where in sets)
        read, folds = _switchable_read(case)
        assert sorted(n for n, _ in sets) == sorted((read + folds) * len(MIXES))  # every weight, every switch
    else:
        # registered once at load as DEVICE; a switch copies into those buffers and refits on the engine's stream
        assert "set_named_weights" not in names
        registered = [n for n, where in fake.called("set_named_weights") if where == "DEVICE"]
        assert sorted(registered) == sorted(_switchable_read(case)[0] + _switchable_read(case)[1])
        refits = [d for w, d in per_switch if w == "refit_cuda_engine_async"]
        assert refits == [engine._stream] * len(MIXES)
        assert "refit_cuda_engine" not in names
        # REFIT on 10.0/10.1 strips the constants too (the encoder has some): the ONNX parser's refitter
        # supplies them once at load; REFIT_INDIVIDUAL strips only the marked weights
        wanted = [len(engine._graph_bytes)] if (which, version) == ("encoder", "10.1.0") else []
        assert fake.called("refit_from_bytes") == wanted


@pytest.mark.parametrize("version", ["8.5.2", "8.6.1", "10.1.0"])
def test_under_refit_constants_tensorrt_combined_with_a_weight_are_supplied_from_the_graph(cases, monkeypatch,
                                                                                          version):
    """TensorRT may fold the attention scale into the query weights; under REFIT it then reports the
    constant missing whenever the weight is set, and a refit without it fails."""
    case = cases["encoder"]
    scale = _attention_scale(case)
    fake = F.install(monkeypatch, version, fusions={"layers.0.q.weight": [scale]})
    engine = _engine(case, fake)
    server = _server(case, engine)
    _check_switches(server, case)
    supplied = [where for n, where in fake.called("set_named_weights") if n == scale]
    assert supplied and set(supplied) == {"HOST"}
    assert fake.called("refit_from_bytes") == ([len(engine._graph_bytes)] if version == "10.1.0" else [])


def _attention_scale(case):
    """The Constant a Div of the encoder's attention reads (the score's 1/sqrt(d))."""
    weights = onnx_graph.find_weights(case["graph"])
    _, defaults, _ = onnx_graph.serving_graph(case["graph"], weights)
    graph, _ = onnx_graph.tensorrt_graph(case["graph"], weights, defaults)
    constants = {n.output[0] for n in graph.graph.node if n.op_type == "Constant"}
    return next(n.input[1] for n in graph.graph.node if n.op_type == "Div" and n.input[1] in constants)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_failed_refit_leaves_the_previous_task_serving(cases, monkeypatch, version):
    """The fake refits half the weights and answers False, as the documentation allows: the server
    puts the previous task's weights back; a second failure (the rollback's) refuses requests."""
    fake = F.install(monkeypatch, version)
    case = cases["conv"]
    server = _server(case, _engine(case, fake))
    before = server.infer(case["inputs"])["output"]
    fake.fail_refits = 1
    with pytest.raises(TvswitchError, match="TensorRT refit failed"):
        server.switch({"b": 1.0})
    assert server.mix == {"a": 1.0}
    np.testing.assert_array_equal(server.infer(case["inputs"])["output"], before)
    fake.fail_refits = 2
    with pytest.raises(TvswitchError, match="TensorRT refit failed"):
        server.switch({"b": 1.0})
    with pytest.raises(TvswitchError, match="no task is serving"):
        server.infer(case["inputs"])
    server.switch({"b": 1.0})
    np.testing.assert_allclose(server.infer(case["inputs"])["output"], case["refs"][repr({"b": 1.0})],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("version", ["10.1.0", "10.3.0"])
def test_the_plan_on_flash_holds_no_switchable_weight(cases, monkeypatch, tmp_path, version):
    fake = F.install(monkeypatch, version)
    case = cases["conv"]
    _engine(case, fake, tmp_path)
    plan = (tmp_path / os.listdir(str(tmp_path))[0]).read_bytes()
    weights = onnx_graph.find_weights(case["graph"])
    _, defaults, _ = onnx_graph.serving_graph(case["graph"], weights)
    for name in ("c1.weight", "c2.weight", "head.weight"):
        assert defaults[name].tobytes() not in plan


def test_a_tensorrt_8_plan_holds_its_weights(cases, monkeypatch, tmp_path):
    """No STRIP_PLAN before TensorRT 10: the same check finds the weights, so the one above can fail."""
    fake = F.install(monkeypatch, "8.5.2")
    case = cases["conv"]
    _engine(case, fake, tmp_path)
    plan = (tmp_path / os.listdir(str(tmp_path))[0]).read_bytes()
    weights = onnx_graph.find_weights(case["graph"])
    _, defaults, _ = onnx_graph.serving_graph(case["graph"], weights)
    assert defaults["c1.weight"].tobytes() in plan


def test_the_plan_cache_is_keyed_by_device_and_version(cases, monkeypatch, tmp_path):
    case = cases["conv"]
    fake = F.install(monkeypatch, "10.3.0")
    _engine(case, fake, tmp_path)
    _engine(case, fake, tmp_path)
    assert fake.builds == 1 and len(os.listdir(str(tmp_path))) == 1  # the second engine loaded the plan
    for version, device in (("10.3.0", ("Xavier", (7, 2))), ("10.4.0", ("Orin", (8, 7))), ("8.6.1", ("Orin", (8, 7)))):
        other = F.install(monkeypatch, version, device=device[0], cc=device[1])
        engine = _engine(case, other, tmp_path)
        assert other.builds == 1, (version, device)  # a new key: built, not the other plan tried
        np.testing.assert_allclose(engine.infer(case["inputs"])["output"], _plain(case), rtol=1e-4, atol=1e-5)
    assert len(os.listdir(str(tmp_path))) == 4


def test_a_cached_plan_of_another_version_under_this_key_is_rebuilt(cases, monkeypatch, tmp_path):
    """A plan file that TensorRT will not load (here: written by another version) is rebuilt and replaced."""
    case = cases["conv"]
    old = F.install(monkeypatch, "10.1.0")
    _engine(case, old, tmp_path)
    stale = (tmp_path / os.listdir(str(tmp_path))[0]).read_bytes()
    fake = F.install(monkeypatch, "10.3.0")
    key = _engine(case, fake).plan_key
    (tmp_path / (key + ".plan")).write_bytes(stale)
    fake.builds = 0
    engine = _engine(case, fake, tmp_path)
    assert fake.builds == 1 and (tmp_path / (key + ".plan")).read_bytes() != stale
    np.testing.assert_allclose(engine.infer(case["inputs"])["output"], _plain(case), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_inputs_the_engine_was_not_built_for_are_refused_in_one_line(cases, monkeypatch, version):
    fake = F.install(monkeypatch, version)
    case = cases["conv"]
    engine = _engine(case, fake)
    x = case["inputs"]["x"]
    with pytest.raises(TvswitchError, match=r"input 'x' is \[8, 3, 8, 8\]; the TensorRT engine was built for "
                                            r"shapes \[1, 3, 8, 8\] to \[4, 3, 8, 8\]"):
        engine.infer({"x": np.concatenate([x] * 4)})
    with pytest.raises(TvswitchError, match=r"input 'x' is float32\[2, 3, 8, 9\]; the network takes float32"):
        engine.infer({"x": np.zeros((2, 3, 8, 9), np.float32)})
    with pytest.raises(TvswitchError, match="input 'x' is complex64"):
        engine.infer({"x": x.astype(np.complex64)})


def test_tensorrt_8_takes_token_ids_as_int32(cases, monkeypatch):
    fake = F.install(monkeypatch, "8.5.2")
    case = cases["encoder"]
    engine = _engine(case, fake)
    assert engine._input_dtypes == {"ids": np.dtype(np.int32), "mask": np.dtype(np.int32)}
    np.testing.assert_allclose(engine.infer(case["inputs"])["output"], _plain(case), rtol=1e-4, atol=1e-5)


# ---- the GPU path: the CUDA kernels (run on the CPU over host memory) write TensorRT 10's buffers ----

def _load(name, *parts):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "..", *parts))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("which", ["conv", "encoder"])
def test_the_gpu_path_refits_what_the_kernels_wrote_on_their_stream(cases, monkeypatch, which):
    from tvswitch.kernels import cpu, nvrtc
    from tvswitch.runtime.gpu_source import GpuBundleSource

    if not cpu.available():
        pytest.skip("CPU library not built: %s" % cpu.unavailable_reason())
    monkeypatch.setattr(nvrtc, "kernel_image", lambda cc: (b"image", "test"))
    G = _load("gpu_source_tests", "test_gpu_source.py")
    fake = F.install(monkeypatch, "10.3.0")
    case = cases[which]
    engine = _engine(case, fake)
    device = G.StreamDevice([])
    source = GpuBundleSource(case["bundle"], engine, case["base"], device=device)
    server = Server(engine, source, {"a": 1.0})
    at_load, cuda_at_load = len(fake.calls), len(fake._cuda.calls)
    for mix in MIXES:
        server.switch(mix)
    per_switch = fake.calls[at_load:]
    assert [d for w, d in per_switch if w == "refit_cuda_engine_async"] == [device.stream_handle] * len(MIXES)
    assert "set_named_weights" not in [w for w, _ in per_switch]  # the buffers registered at load are re-read
    # no weight crosses the host: per switch, only the BatchNorm folds (C floats each) go up and the four
    # per-channel vectors they derive from come down, all on the kernels' stream
    copies = [d for w, d in fake._cuda.calls[cuda_at_load:] if w == "cudaMemcpyAsync"]
    up = [n for kind, n, stream in copies if kind == "HtoD"]
    down = [n for kind, n, stream in copies if kind == "DtoH"]
    fold_bytes = sorted(4 * int(np.prod(bn.shape)) for bn in engine._folds for _ in (0, 1))
    assert sorted(up) == sorted(fold_bytes * len(MIXES))
    assert len(down) == 4 * len(engine._folds) * len(MIXES)
    assert all(stream == device.stream_handle for _, _, stream in copies)
    _check_switches(server, case)


# ---- the fake is strict: the contracts it enforces are enforced ----

def test_the_fake_refuses_what_the_documentation_forbids(cases, monkeypatch):
    case = cases["conv"]
    fake = F.install(monkeypatch, "10.3.0")
    engine = _engine(case, fake)
    refitter, cuda = engine._refitter, fake._cuda
    w = fake.Weights(np.zeros(8, np.float32))
    with pytest.raises(F.ContractViolation, match="not device memory"):
        refitter.set_named_weights("c1.bias", w, fake.TensorLocation.DEVICE)
    assert not refitter.set_named_weights("c1.bias", fake.Weights(np.zeros(7, np.float32)))  # count differs
    assert not refitter.set_named_weights("no.such.weight", w)
    cuda.streams[0x999] = ["inference"]  # work enqueued on another stream
    with pytest.raises(F.ContractViolation, match="pending"):
        refitter.refit_cuda_engine_async(engine._stream)
    del cuda.streams[0x999]
    with pytest.raises(AttributeError):
        refitter.no_such_attribute = 1
    old = F.install(monkeypatch, "8.5.2")
    old_engine = _engine(case, old)
    for attr in ("OnnxParserRefitter",):
        assert not hasattr(old, attr)
    assert not hasattr(old.BuilderFlag, "STRIP_PLAN") and not hasattr(old.BuilderFlag, "REFIT_INDIVIDUAL")
    assert not hasattr(old_engine._refitter, "refit_cuda_engine_async")
    with pytest.raises(TypeError):
        old_engine._refitter.set_named_weights("c1.bias", w, old.TensorLocation.HOST)
    with pytest.raises(AttributeError):
        old_engine._refitter.weights_validation = False


def test_the_fake_refuses_inference_on_a_stripped_engine_before_its_refit(cases, monkeypatch):
    case = cases["conv"]
    fake = F.install(monkeypatch, "10.3.0")
    engine = _engine(case, fake)
    fresh = fake.Runtime(fake.Logger()).deserialize_cuda_engine(
        fake.Builder(None).build_serialized_network(*_network(fake, engine)))
    context = fresh.create_execution_context()
    x = case["inputs"]["x"]
    _, ptr = fake._cuda.cudaMalloc(x.nbytes)
    _, out = fake._cuda.cudaMalloc(1024)
    ctypes.memmove(ptr, x.ctypes.data, x.nbytes)
    assert context.set_input_shape("x", x.shape) and not context.set_input_shape("x", (9, 3, 8, 8))
    context.set_tensor_address("x", ptr)
    context.set_tensor_address("output", out)
    with pytest.raises(F.ContractViolation, match="weight-stripped engine"):
        context.execute_async_v3(1)


def _network(fake, engine):
    builder = fake.Builder(None)
    network = builder.create_network(0)
    fake.OnnxParser(network, None).parse(engine._graph_bytes)
    config = builder.create_builder_config()
    config.set_flag(fake.BuilderFlag.REFIT)
    config.set_flag(fake.BuilderFlag.STRIP_PLAN)
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))
    config.add_optimization_profile(profile)
    return network, config


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_one_weight_stripped_graph_serves_heads_of_three_sizes_refitting_padded_heads(tmp_path, monkeypatch, version):
    """The built-in example's one graph (export-onnx --bundle): TensorRT builds it with the base and
    zero heads (the graph holds no weights), each switch refits the padded head, and the answers
    are cut to each task's size, equal to ONNX Runtime's on the same graph."""
    pytest.importorskip("torch", reason="export-onnx traces the example with torch (the torch extra)")
    pytest.importorskip("onnxruntime", reason="the answers are compared with onnxruntime's (the onnx extra)")
    from tvswitch.cli import main
    from tvswitch.runtime.checkpoint import read_safetensors
    from tvswitch.runtime.server import serve_bundle

    d = tmp_path / "demo"
    assert main(["example", str(d)]) == 0
    assert main(["export", "--base", str(d / "base.safetensors"), "-o", str(d / "tasks.tvs"), "--no-progress",
                 *[a for t in ("detect", "gauge", "line") for a in ("--task", "%s=%s" % (t, d / (t + ".safetensors")))]]) == 0
    assert main(["export-onnx", "--module", "tvswitch.export.example_net:detect", "--bundle", str(d / "tasks.tvs"),
                 "--input", "ids=" + str(d / "ids.npy"), "-o", str(d / "tasks.onnx")]) == 0
    base = read_safetensors(str(d / "base.safetensors"))
    feeds = {"ids": np.load(str(d / "ids.npy"))}
    ort = serve_bundle(str(d / "tasks.tvs"), model=str(d / "tasks.onnx"), base=base, threads=1)
    F.install(monkeypatch, version)
    trt = serve_bundle(str(d / "tasks.tvs"), "tensorrt", model=str(d / "tasks.onnx"), base=base, gpu=False,
                       profile={"ids": (feeds["ids"].shape,) * 3})
    assert trt.mode == "staged" and trt.servable == ["detect", "gauge", "line"]
    for task, classes in (("line", 5), ("detect", 3), ("gauge", 4)):
        ort.switch({task: 1.0})
        trt.switch({task: 1.0})
        got = trt.infer(feeds)["output"]
        assert got.shape == (2, classes)
        np.testing.assert_allclose(got, ort.infer(feeds)["output"], rtol=1e-4, atol=1e-5)
