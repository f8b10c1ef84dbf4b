"""GpuBundleSource without a GPU: the CUDA kernels write an engine's device buffers directly.

Device memory is host memory and the launch runs the CPU library on the uploaded tables
(``HostDevice`` of test_gpu_rebuild_host.py).  The engine is ``DeviceFedEngine``, a test
double of the engine contract (registered device buffers, a staged publish that copies
them into the engine's own weights, as TensorRT's refit does): it is **not** TensorRT,
which cannot run here; the real TensorRT engine is exercised only by the last test,
skipped without TensorRT and a GPU.
"""
import ctypes
import importlib.util
import logging
import os

import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.export.exporter import export_bundle
from tvswitch.kernels import cpu, nvrtc
from tvswitch.kernels.cuda import CudaError
from tvswitch.runtime import engines, gpu_rebuild
from tvswitch.runtime.engines.base import Engine
from tvswitch.kernels.cuda import DeviceTensor
from tvswitch.runtime.gpu_source import GpuBundleSource
from tvswitch.runtime.rebuild import CpuRebuilder
from tvswitch.runtime.server import Server, serve_bundle

pytestmark = pytest.mark.skipif(not cpu.available(), reason="CPU library not built: %s" % cpu.unavailable_reason())


def _load(name, *parts):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), *parts))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


H = _load("gpu_rebuild_host", "test_gpu_rebuild_host.py")


class StreamDevice(H.HostDevice):
    """HostDevice with device-to-device copies, a stream handle and an event log shared with the engine."""

    stream_handle = 0x5EED

    def __init__(self, log):
        super().__init__()
        self.log = log
        self.fail_launch = 0

    def launch(self, function, grid, block, args):
        if self.fail_launch:
            self.fail_launch -= 1
            raise CudaError("cuLaunchKernel failed: CUDA_ERROR_LAUNCH_FAILED (simulated)")
        super().launch(function, grid, block, args)
        self.log.append("launch")

    def copy(self, dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)
        self.log.append("copy")


class DeviceFedEngine(Engine):
    """Test double of the engine contract with device buffers (not TensorRT): ``publish`` copies the
    device buffers (or, before ``use_device_buffers``, the host slot) into the weights ``infer`` reads."""

    kind = "device-double"
    publish_copies = True
    unread_weights = ("unused.weight",)  # the bundle's tensor this network does not read

    def __init__(self, device, specs, defaults):
        self.device, self.log, self.specs = device, device.log, dict(specs)
        self.defaults = defaults
        self.staging = {n: np.zeros(s, d) for n, (s, d) in specs.items()}
        self.own = {n: np.zeros(s, d) for n, (s, d) in specs.items()}
        self.ptrs = {n: device.alloc(a.nbytes) for n, a in self.staging.items()}  # poisoned
        self.stream = "host path"
        self.fail_publish = 0
        self.bind(defaults)

    input_names = ["x"]

    @property
    def output_names(self):
        return list(self.specs)

    @property
    def weight_specs(self):
        return dict(self.specs)

    def buffers(self, slot=0):
        return self.staging

    def device_buffers(self):
        return {n: DeviceTensor(self.ptrs[n], s, np.dtype(d)) for n, (s, d) in self.specs.items()}

    def use_device_buffers(self, stream=None):
        self.stream = stream

    def publish(self, slot=0):
        if self.fail_publish:
            self.fail_publish -= 1
            self.log.append("publish failed")
            raise CudaError("refit failed (simulated)")
        for n in self.own:
            if self.stream == "host path":
                np.copyto(self.own[n], self.staging[n])
            else:
                self.device.download(self.own[n], self.ptrs[n])
        self.log.append("publish@%s" % self.stream)

    def infer(self, inputs, slot=0):
        return {n: a.copy() for n, a in self.own.items()}


def _checkpoints():
    rng = np.random.default_rng(1)
    base = {"enc.weight": rng.normal(0, 0.05, (37, 29)).astype(np.float32),
            "enc.bias": rng.normal(0, 0.01, 37).astype(np.float32),
            "half.weight": rng.normal(0, 0.05, (7, 13)).astype(np.float16),
            "unused.weight": rng.normal(0, 0.05, (5, 3)).astype(np.float32)}  # not read by the engine
    fts = {}
    for i, t in enumerate("abc"):
        ft = {k: (v + rng.normal(0, 0.003 * (i + 1), v.shape)).astype(v.dtype) for k, v in base.items()}
        ft["head.weight"] = rng.normal(0, 0.1, (4, 29)).astype(np.float32)
        fts[t] = ft
    return base, fts


@pytest.fixture
def case(tmp_path, monkeypatch):
    monkeypatch.setattr(nvrtc, "kernel_image", lambda cc: (b"image", "test"))
    base, fts = _checkpoints()
    path = str(tmp_path / "b.tvs")
    bundle = export_bundle(base, fts, path, name="tvq", bits=4)
    specs = {n: (a.shape, a.dtype) for n, a in base.items() if n != "unused.weight"}
    specs["head.weight"] = ((4, 29), np.dtype(np.float16))  # the engine holds the head in fp16
    defaults = {n: base[n] for n in specs if n in base}
    defaults["head.weight"] = np.zeros((4, 29), np.float16)
    return dict(bundle=bundle, path=path, base=base, fts=fts, specs=specs, defaults=defaults)


def _served(case, log=None, **kw):
    log = [] if log is None else log
    device = StreamDevice(log)
    engine = DeviceFedEngine(device, case["specs"], case["defaults"])
    source = GpuBundleSource(case["bundle"], engine, case["base"], device=device, **kw)
    return Server(engine, source, {"a": 1.0}), engine, source


def _want(case, mix):
    ref = CpuRebuilder(case["bundle"], case["base"])
    out = ref.allocate()
    ref.rebuild(mix, out)
    head = max(mix, key=lambda t: mix[t])
    out["head.weight"] = case["fts"][head]["head.weight"].astype(np.float16)
    return out


def _check(server, case, mix):
    got, want = server.infer({"x": None}), _want(case, mix)
    for n, a in got.items():
        assert a.tobytes() == want[n].tobytes(), (mix, n)


def test_switches_write_the_engines_device_buffers_bit_for_bit(case):
    server, engine, source = _served(case)
    assert server.mode == "staged" and server.rebuild_on == "gpu"
    host_slot = {n: a.copy() for n, a in engine.staging.items()}
    for mix in ({"a": 1.0}, {"a": 0.5, "b": 0.3, "c": -0.2}, {"c": 1.0}, {"b": 0.2, "c": 0.7}):
        server.switch(mix)
        _check(server, case, mix)
    for n, a in engine.staging.items():  # the host slot is never written on the GPU path
        assert np.array_equal(a, host_slot[n]), n
    assert "unused.weight" in source._outputs and "unused.weight" not in engine.ptrs


def test_a_switch_is_one_launch_and_device_copies_then_the_refit_on_the_same_stream(case):
    log = []
    server, engine, source = _served(case, log)
    assert engine.stream == StreamDevice.stream_handle == source.stream
    server.switch({"b": 1.0})
    server.switch({"a": 1.0})
    uploads = source.device.uploads
    del log[:]
    for task in "baba":
        server.switch({task: 1.0})
    assert log == ["launch", "copy", "publish@%d" % StreamDevice.stream_handle] * 4
    assert source.device.uploads == uploads  # no host-to-device copy per switch once a mix was served
    assert source.writes == 7


def test_a_failed_launch_keeps_the_previous_weights_serving(case):
    log = []
    server, engine, source = _served(case, log)
    server.switch({"b": 1.0})
    del log[:]
    source.device.fail_launch = 1
    with pytest.raises(CudaError, match="cuLaunchKernel"):
        server.switch({"c": 1.0})
    assert "publish" not in " ".join(log)  # the engine never refitted from half-written buffers
    assert server.mix == {"b": 1.0}
    _check(server, case, {"b": 1.0})
    assert server.switch({"c": 1.0})
    _check(server, case, {"c": 1.0})


def test_a_failed_refit_is_undone_by_rebuilding_the_previous_mix(case):
    log = []
    server, engine, source = _served(case, log)
    del log[:]
    engine.fail_publish = 1
    with pytest.raises(CudaError, match="refit"):
        server.switch({"b": 0.6, "c": 0.4})
    stream = "publish@%d" % StreamDevice.stream_handle
    assert log == ["launch", "copy", "publish failed", "launch", "copy", stream]
    assert server.mix == {"a": 1.0}
    _check(server, case, {"a": 1.0})


def test_bad_mixes_and_buffers_are_refused_before_anything_is_written(case):
    server, engine, source = _served(case)
    launches = len(source.device.launches)
    for mix in ({"zzz": 1.0}, {"a": float("nan")}):
        with pytest.raises(TvswitchError):
            server.switch(mix)
    assert len(source.device.launches) == launches
    device = StreamDevice([])
    engine = DeviceFedEngine(device, case["specs"], case["defaults"])
    engine.ptrs["enc.bias"] = engine.ptrs["enc.weight"]  # two weights in one buffer
    with pytest.raises(TvswitchError, match="overlap"):
        Server(engine, GpuBundleSource(case["bundle"], engine, case["base"], device=device), {"a": 1.0})


def _patch_engine(monkeypatch, case, log):
    made = {}

    def load_engine(kind, model=None, **kw):
        made["engine"] = DeviceFedEngine(StreamDevice(log), case["specs"], case["defaults"])
        return made["engine"]

    monkeypatch.setattr(engines, "load_engine", load_engine)
    return made


def test_serve_bundle_picks_the_gpu_rebuild_where_the_device_and_kernels_are(case, monkeypatch, caplog):
    made = _patch_engine(monkeypatch, case, [])
    monkeypatch.setattr(gpu_rebuild, "open_device", lambda ordinal=0, binding="auto": made["engine"].device)
    with caplog.at_level(logging.INFO, logger="tvswitch.server"):
        server = serve_bundle(case["path"], "tensorrt", model="unused.onnx", base=case["base"])
    assert server.rebuild_on == "gpu" and isinstance(server.source, GpuBundleSource)
    assert "GPU rebuild" in caplog.text and "host memory" in server.rebuild_note
    assert made["engine"].stream == StreamDevice.stream_handle and made["engine"].defaults is None
    server.switch({"c": 1.0})
    _check(server, case, {"c": 1.0})


def test_serve_bundle_falls_back_to_the_cpu_rebuild_and_says_why(case, monkeypatch, caplog):
    made = _patch_engine(monkeypatch, case, [])

    def no_gpu(ordinal=0, binding="auto"):
        raise CudaError("no usable NVIDIA driver (simulated)")

    monkeypatch.setattr(gpu_rebuild, "open_device", no_gpu)
    with caplog.at_level(logging.INFO, logger="tvswitch.server"):
        server = serve_bundle(case["path"], "tensorrt", model="unused.onnx", base=case["base"])
    assert server.rebuild_on == "cpu" and "no usable NVIDIA driver" in server.rebuild_note
    assert "CPU rebuild" in caplog.text and made["engine"].stream == "host path"
    server.switch({"b": 0.5, "c": 0.5})
    _check(server, case, {"b": 0.5, "c": 0.5})
    with pytest.raises(TvswitchError, match="asked for.*no usable NVIDIA driver"):
        serve_bundle(case["path"], "tensorrt", model="unused.onnx", base=case["base"], gpu=True)
    assert serve_bundle(case["path"], "tensorrt", model="unused.onnx", base=case["base"], gpu=False).rebuild_note.startswith("CPU")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installed (no GPU here); the GPU-fed TensorRT engine runs only on a device")
def test_tensorrt_engine_fed_by_the_cuda_kernels_answers_like_onnxruntime(tmp_path, engine_models):
    from tvswitch.export.onnx_export import export_onnx
    from tvswitch.kernels.cuda import has_gpu

    why = has_gpu()
    if why:
        pytest.skip("no GPU: %s" % why)
    M = engine_models
    module, inputs, names = M.conv_case()
    bundle, base = M.make_bundle(tmp_path, module, ("head.",))
    graph = export_onnx(module, [inputs[n] for n in names], input_names=names)
    model = str(tmp_path / "g.onnx")
    with open(model, "wb") as f:
        f.write(graph.SerializeToString())
    gpu = serve_bundle(bundle.path, "tensorrt", model=model, base=base, gpu=True)
    ort = serve_bundle(bundle.path, "onnxruntime", model=model, base=base)
    assert gpu.rebuild_on == "gpu"
    for mix in ({"b": 1.0}, {"a": 0.5, "c": 0.5}, {"a": 1.0}):
        gpu.switch(mix)
        ort.switch(mix)
        np.testing.assert_allclose(gpu.infer(inputs)["output"], ort.infer(inputs)["output"], rtol=1e-3, atol=1e-4)
