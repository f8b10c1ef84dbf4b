"""Doctor: the path ranking on every Jetson line's probe set, host probes injected, boards
described from the support matrix. Nothing here depends on what this machine has installed
except ``test_this_machine_probes_really_run``, which asserts only what holds everywhere."""
import os

import pytest

from tvswitch.jetson import doctor, probes
from tvswitch.jetson.devices import JETPACK_LINES
from tvswitch.jetson.probes import Probe

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def P(name, ok=True, **data):
    return Probe(name, ok, version=data.pop("version", ""), data=data)


ORT_CPU = P("onnxruntime:CPUExecutionProvider")
CPU = P(doctor.CPU_REBUILD)


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


def test_the_cpu_path_is_ranked_by_the_cpu_rebuild_probe():
    assert "numpy reference" in doctor.fastest_path([ORT_CPU]).rebuild
    assert "numpy reference" in doctor.fastest_path([ORT_CPU, P(doctor.CPU_REBUILD, ok=False)]).rebuild


def test_ort_cuda_needs_a_working_provider_not_a_listed_one():
    listed_only = [ORT_CPU, P("onnxruntime:CUDAExecutionProvider", ok=False), P("cuda-driver"), P("nvrtc")]
    assert doctor.fastest_path(listed_only).name == "onnxruntime-cpu"
    works = [ORT_CPU, P("onnxruntime:CUDAExecutionProvider"), P("cuda-driver"), P("nvrtc")]
    assert doctor.fastest_path(works).name == "onnxruntime-cuda"
    assert doctor.fastest_path([]) is None


def test_this_machine_probes_really_run():
    pytest.importorskip("onnxruntime")
    onnx = probes.probe_onnxruntime()
    cpu = next(p for p in onnx if p.name == "onnxruntime:CPUExecutionProvider")
    assert cpu.ok, cpu.reason
    nv = probes.probe_nvrtc(((5, 3), (8, 7)))
    if nv.ok:  # the cu12 wheel is installed in CI: both Jetson extremes must compile
        assert nv.data["compiled"] == ["sm_53", "sm_87"]
    drv = probes.probe_cuda_driver()
    assert drv.ok or drv.reason


def test_live_doctor_runs_the_injected_probes_and_the_cpu_rebuild_probe():
    ran = []

    def fake(name, ok):
        def fn():
            ran.append(name)
            return P(name, ok)
        return fn

    r = doctor.run_doctor("/", cpu_rebuild=fake(doctor.CPU_REBUILD, True),
                          host_probes=[lambda: [ORT_CPU], fake("tensorrt", False)])
    assert r.probes_ran and ran == ["tensorrt", doctor.CPU_REBUILD]
    assert r.fastest.name == "onnxruntime-cpu" and "C, OpenMP" in r.fastest.rebuild


@pytest.mark.parametrize("tree,line,path", [
    ("nano-4gb-jp46", "4.6", "onnxruntime-cpu"),
    ("xavier-nx-jp51", "5.1", "tensorrt-host-refit"),
    ("agx-orin-64gb-jp60", "6.0", "tensorrt-host-refit"),
    ("orin-nano-8gb-jp62", "6.2", "tensorrt-device-refit"),
])
def test_a_captured_tree_is_described_from_its_line_not_probed(tree, line, path):
    def must_not_run():
        raise AssertionError("a host probe ran for a captured tree")

    r = doctor.run_doctor(os.path.join(FIX, tree), cpu_rebuild=must_not_run, host_probes=[must_not_run])
    assert not r.probes_ran and r.fastest.name == path
    assert all("JetPack %s support matrix" % line in (p.detail if p.ok else p.reason) for p in r.probes)
    assert r.to_dict()["probes_ran"] is False


def test_nano_tree_explains_python_and_tensorrt_without_contradiction():
    r = doctor.run_doctor(os.path.join(FIX, "nano-4gb-jp46"), cpu_rebuild=lambda: CPU)
    trt = r.probe("tensorrt")
    assert not trt.ok and "built for Python 3.6" in trt.reason
    assert r.python == (3, 6) and r.python_ok is False
    assert any("install python3.8" in a for a in r.advice)
    assert any("JetPack 4.6" in a and "cannot run on" in a for a in r.advice)
    assert not any("--system-site-packages" in a for a in r.advice)
    assert r.probe("pycuda").ok and not r.probe("cuda-driver").ok
    assert r.to_dict()["platform"]["device_key"] == "nano-4gb"


def test_an_x86_tree_has_no_line_and_no_path():
    r = doctor.run_doctor(os.path.join(FIX, "x86-workstation"), cpu_rebuild=lambda: CPU)
    assert not r.probes_ran and r.probes == [] and r.fastest is None


def test_only_jetpack_6_2_refits_from_device_memory():
    refit = {name: line.device_refit for name, line in JETPACK_LINES.items()}
    assert refit == {"4.6": False, "5.1": False, "6.0": False, "6.2": True}


def test_tensorrt_probe_names_the_system_python_it_was_built_for(monkeypatch):
    monkeypatch.setattr(probes, "_import", lambda name: (None, "ModuleNotFoundError: No module named 'tensorrt'"))
    other = probes.probe_tensorrt("3.6.9", "8.2.1")
    assert not other.ok and "built for the system Python 3.6" in other.reason
    running = "%d.%d.0" % tuple(__import__("sys").version_info[:2])
    same = probes.probe_tensorrt(running, "10.3.0")
    assert "--system-site-packages" in same.reason


@pytest.mark.parametrize("tree,route", [("xavier-nx-jp51", "cuda-python 11.8 + NVRTC 11.4"),
                                        ("agx-orin-64gb-jp60", "cuda-bindings 12 + NVRTC 12"),
                                        ("orin-nano-8gb-jp62", "cuda-bindings 12 + NVRTC 12")])
def test_the_fastest_path_names_the_lines_binding(tree, route):
    """JetPack 5 compiles through cuda-python 11.8 and NVRTC 11.4, not cuda.bindings + NVRTC 12."""
    r = doctor.run_doctor(os.path.join(FIX, tree), cpu_rebuild=lambda: CPU)
    assert r.fastest.rebuild == "CUDA kernel via %s" % route or r.fastest.rebuild.startswith(
        "CUDA kernel via %s," % route)


def test_a_live_route_names_the_binding_package_found():
    got = doctor.fastest_path([ORT_CPU, CPU, P("cuda-driver", binding="cuda-python 11.8.2"),
                               P("nvrtc", version="11.4"), P("tensorrt", version="8.5.2", device_refit=False)])
    assert got.rebuild == "CUDA kernel via cuda-python 11.8.2 + NVRTC 11.4"


@pytest.mark.parametrize("name", sorted(JETPACK_LINES))
def test_board_probes_give_the_lines_install_advice(name):
    line = JETPACK_LINES[name]
    found = {p.name: p for p in doctor.board_probes(line)}
    for probe, advice in (("cuda-driver", line.install.driver), ("nvrtc", line.install.nvrtc)):
        p = found[probe]
        assert advice in (p.detail if p.ok else p.reason)
    if line.nvrtc:  # a line whose NVRTC is CUDA 11 must not be told to install NVRTC 12
        assert ("install 'tvswitch[nvrtc12]'" in line.install.nvrtc) == line.nvrtc.startswith("12")


def test_live_probes_advise_for_the_line_they_run_on(monkeypatch):
    """On a JetPack 5 board without cuda-python, the advice is cuda-python 11.8 and JetPack's NVRTC."""
    monkeypatch.setattr(probes, "_import", lambda name: (None, "ModuleNotFoundError: No module named 'cuda'"))
    jp5 = JETPACK_LINES["5.1"].install
    drv = probes.probe_cuda_driver(jp5)
    nv = probes.probe_nvrtc(install=jp5)
    assert "cuda-python 11.8" in drv.reason and "tvswitch[cuda]" in drv.reason
    assert "cuda-nvrtc-11-4" in nv.reason and "not the nvrtc12 extra" in nv.reason
    x86 = probes.probe_cuda_driver()
    assert "cuda-bindings 12" in x86.reason
