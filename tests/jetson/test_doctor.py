"""Doctor's probes on this machine, and the path ranking on every Jetson line's probe set."""
import os

from tvswitch.jetson import doctor, probes
from tvswitch.jetson.probes import Probe

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def P(name, ok=True, **data):
    return Probe(name, ok, version=data.pop("version", ""), data=data)


ORT_CPU = P("onnxruntime:CPUExecutionProvider")
CPU = P("cpu-rebuild")


def test_orin_with_trt10_and_cuda_refits_from_device():
    got = doctor.fastest_path([ORT_CPU, CPU, P("cuda-driver"), P("nvrtc"),
                               P("tensorrt", version="10.3.0", device_refit=True)])
    assert got.name == "tensorrt-device-refit"


def test_xavier_trt8_refits_from_host():
    got = doctor.fastest_path([ORT_CPU, CPU, P("cuda-driver"), P("nvrtc"),
                               P("tensorrt", version="8.5.2", device_refit=False)])
    assert got.name == "tensorrt-host-refit" and "NVRTC" in got.rebuild


def test_nano_without_trt_python_serves_on_cpu():
    got = doctor.fastest_path([ORT_CPU, CPU, P("cuda-driver", ok=False), P("nvrtc", ok=False),
                               P("tensorrt", ok=False)])
    assert got.name == "onnxruntime-cpu" and "C, OpenMP" in got.rebuild


def test_ort_cuda_needs_a_working_provider_not_a_listed_one():
    listed_only = [ORT_CPU, P("onnxruntime:CUDAExecutionProvider", ok=False), P("cuda-driver"), P("nvrtc")]
    assert doctor.fastest_path(listed_only).name == "onnxruntime-cpu"
    works = [ORT_CPU, P("onnxruntime:CUDAExecutionProvider"), P("cuda-driver"), P("nvrtc")]
    assert doctor.fastest_path(works).name == "onnxruntime-cuda"
    assert doctor.fastest_path([]) is None


def test_this_machine_probes_really_run():
    onnx = probes.probe_onnxruntime()
    cpu = next(p for p in onnx if p.name == "onnxruntime:CPUExecutionProvider")
    assert cpu.ok, cpu.reason
    nv = probes.probe_nvrtc(((5, 3), (8, 7)))
    if nv.ok:  # the cu12 wheel is installed in CI: both Jetson extremes must compile
        assert nv.data["compiled"] == ["sm_53", "sm_87"]
    drv = probes.probe_cuda_driver()
    assert drv.ok or drv.reason


def test_doctor_on_nano_fixture_explains_python_and_tensorrt():
    r = doctor.run_doctor(os.path.join(FIX, "nano-4gb-jp46"), probe_fns=[])
    trt = r.probe("tensorrt")
    assert not trt.ok and "system Python 3.6" in trt.reason
    assert any("JetPack 4.6" in a for a in r.advice)
    text = doctor.format_text(r)
    assert "TensorRT 8.2.1" in text and "NvMap" in text
    assert r.to_dict()["platform"]["device_key"] == "nano-4gb"
