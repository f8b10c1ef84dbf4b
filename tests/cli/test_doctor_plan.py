"""``tvswitch doctor`` and ``tvswitch plan`` through the CLI, as a user runs them."""
import json
import os
import subprocess
import sys

import pytest

from tvswitch.cli import main

FIX = os.path.join(os.path.dirname(__file__), "..", "jetson", "fixtures")
#: RTVQ's defaults on 8 tasks: a 3-bit base vector all share, 2-bit offsets each
WHAT_IF = ["--params", "22.7e6", "--tasks", "8", "--bits", "2", "--base-bits", "3"]
TREES = ["nano-4gb-jp46", "xavier-nx-jp51", "agx-orin-64gb-jp60", "orin-nano-8gb-jp62"]
PROBES = {"onnxruntime", "onnxruntime:CPUExecutionProvider", "cuda-driver", "nvrtc", "pycuda", "tensorrt", "cpu-rebuild"}


def cli(*args):
    """The installed entry point in a fresh interpreter: stderr and exit code as a user sees them."""
    return subprocess.run([sys.executable, "-m", "tvswitch", *map(str, args)], capture_output=True, text=True)


def test_doctor_json_on_this_machine(capsys):
    pytest.importorskip("onnxruntime")
    assert main(["doctor", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["probes_ran"] is True
    assert PROBES <= {p["name"] for p in d["probes"]}
    assert d["fastest"] is not None  # onnxruntime's CPU provider runs wherever it is installed
    assert all(p["ok"] or p["reason"] for p in d["probes"])
    from tvswitch.kernels import cpu

    if cpu.available():  # the instruction path the rebuild takes here is reported
        assert next(p for p in d["probes"] if p["name"] == "cpu-rebuild")["data"]["path"] == cpu.path()


@pytest.mark.parametrize("tree,fastest", [("nano-4gb-jp46", "onnxruntime-cpu"), ("agx-orin-64gb-jp60", "tensorrt-host-refit"),
                                          ("orin-nano-8gb-jp62", "tensorrt-device-refit")])
def test_doctor_json_on_a_captured_tree(capsys, tree, fastest):
    assert main(["doctor", "--json", "--root", os.path.join(FIX, tree)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["probes_ran"] is False and {p["name"] for p in d["probes"]} == PROBES | {"onnxruntime:CUDAExecutionProvider"}
    assert d["fastest"]["name"] == fastest


def test_doctor_text(capsys):
    pytest.importorskip("onnxruntime")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "fastest path:" in out and "[ok ] onnxruntime:CPUExecutionProvider" in out
    assert "host probes not run" not in out


def test_doctor_text_on_a_tree_says_nothing_ran(capsys):
    assert main(["doctor", "--root", os.path.join(FIX, "nano-4gb-jp46")]) == 0
    out = capsys.readouterr().out
    assert "host probes not run" in out and "fastest path on that board: onnxruntime-cpu" in out
    assert "TensorRT 8.2.1" in out and "NvMap holds 187.37 MiB" in out
    assert "system Python 3.6 (TOO OLD" in out
    assert "line      JetPack 4.6 (L4T R32.7+, Ubuntu 18.04): CUDA 10.2, cuDNN 8.2, TensorRT 8.2, Python 3.6" in out


# (tree, clocks line, memory line): the fixtures' sysfs clocks and /proc/meminfo, as text
DOCTOR_TEXT = {
    "nano-4gb-jp46": ("CPU 2 cores at 918 MHz (caps 918 MHz), GPU at 76.8 MHz (cap 640 MHz): below the power "
                      "mode's max",
                      "3.87 GiB total, 3.01 GiB usable (MemAvailable 2.98 GiB + NvMap's unused page pool 26.77 MiB), "
                      "2.35 GiB free, NvMap holds 187.37 MiB"),
    "xavier-nx-jp51": ("CPU 6 cores at 1420.8 MHz (caps 1420.8 MHz), GPU at 1109.25 MHz (cap 1109.25 MHz): at the "
                       "power mode's max",
                       "7.41 GiB total, 6.32 GiB usable (MemAvailable 6.32 GiB + NvMap's unused page pool 0 B), "
                       "5.64 GiB free, NvMap holds 101.28 MiB"),
    "agx-orin-64gb-jp60": ("CPU 12 cores at 2201.6 MHz (caps 2201.6 MHz), GPU at 1300.5 MHz (cap 1300.5 MHz): at "
                           "the power mode's max",
                           "61.01 GiB total, 58.10 GiB usable (MemAvailable), 56.66 GiB free"),
    "orin-nano-8gb-jp62": ("CPU 6 cores at 729.6 MHz (caps 1728 MHz), GPU at 306 MHz (cap 1020 MHz): below the "
                           "power mode's max: `sudo jetson_clocks`",
                           "7.44 GiB total, 5.82 GiB usable (MemAvailable), 4.69 GiB free"),
}


@pytest.mark.parametrize("tree", TREES)
def test_doctor_text_shows_clocks_and_free_memory(capsys, tree):
    """The text says what --json says: clocks against the mode's caps, and what is free."""
    clocks, memory = DOCTOR_TEXT[tree]
    assert main(["doctor", "--root", os.path.join(FIX, tree)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("clocks    " + clocks) for line in lines), lines
    assert "memory    " + memory in lines
    assert main(["doctor", "--json", "--root", os.path.join(FIX, tree)]) == 0
    d = json.loads(capsys.readouterr().out)["platform"]
    assert d["clocks"]["at_max"] == ("at the power mode's max" in clocks)


@pytest.mark.parametrize("tree,fastest,route", [
    ("nano-4gb-jp46", "onnxruntime-cpu", "tvswitch CPU library"),
    ("xavier-nx-jp51", "tensorrt-host-refit", "CUDA kernel via cuda-python 11.8 + NVRTC 11.4"),
    ("agx-orin-64gb-jp60", "tensorrt-host-refit", "CUDA kernel via cuda-bindings 12 + NVRTC 12"),
    ("orin-nano-8gb-jp62", "tensorrt-device-refit", "CUDA kernel via cuda-bindings 12 + NVRTC 12"),
])
def test_doctor_text_names_each_boards_fastest_path(capsys, tree, fastest, route):
    assert main(["doctor", "--root", os.path.join(FIX, tree)]) == 0
    out = capsys.readouterr().out
    assert "fastest path on that board: %s\n  rebuild: %s" % (fastest, route) in out


@pytest.mark.parametrize("tree", TREES)
def test_plan_this_on_every_tree_is_its_row_on_the_detected_line(capsys, tree):
    """The row gives bandwidth and DRAM; the JetPack line (reserve, engine support) is the one
    detected there, not the row's last line: the AGX Orin tree runs JetPack 6.0."""
    from tvswitch.jetson.devices import JETPACK_LINES, lookup
    from tvswitch.jetson.platform import detect

    root = os.path.join(FIX, tree)
    r = detect(root)
    assert main(["plan", "--device", "this", "--root", root, "--engine", "tensorrt", "--json"] + WHAT_IF) == 0
    d = json.loads(capsys.readouterr().out)
    row, line = lookup(r.device_key), JETPACK_LINES[r.jetpack_line]
    assert d["device"]["key"] == row.key and d["device"]["jetpack"] == line.name
    assert d["switch_floor"]["bandwidth_gbs"] == row.bandwidth_gbs
    assert d["memory_budget_bytes"] == row.dram_bytes - line.reserve_bytes
    assert bool(d["warnings"]) == (not line.trt_python)
    assert main(["plan", "--device", "this", "--root", root] + WHAT_IF) == 0
    assert "JetPack %s, %.1f GB/s peak" % (line.name, row.bandwidth_gbs) in capsys.readouterr().out


def test_plan_on_the_jetpack_6_0_orin_says_6_0_and_host_refit(capsys):
    assert main(["plan", "--device", "this", "--root", os.path.join(FIX, "agx-orin-64gb-jp60"),
                 "--engine", "tensorrt"] + WHAT_IF) == 0
    out = capsys.readouterr().out
    assert "JetPack 6.0" in out and "JetPack 6.2" not in out
    assert "note: TensorRT 8.6 on JetPack 6.0 refits from host memory only" in out


def test_plan_tensorrt_on_a_nano_warns(capsys):
    assert main(["plan", "--device", "nano-4gb", "--engine", "tensorrt"] + WHAT_IF) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("WARNING: TensorRT does not run with tvswitch on JetPack 4.6")
    assert main(["plan", "--device", "orin-nano-8gb", "--engine", "tensorrt"] + WHAT_IF) == 0
    assert "WARNING" not in capsys.readouterr().out


# one task reads the base (4 bytes), its 2-bit offsets and the 3-bit base vector, and
# writes the weights: 22.7e6 * (8 + 5/8) bytes at 25.6 and 68 GB/s
@pytest.mark.parametrize("device,ms", [("nano-4gb", 7.648), ("orin-nano-8gb", 2.879)])
def test_plan_what_if(capsys, device, ms):
    assert main(["plan", "--device", device, "--json"] + WHAT_IF) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["switch_floor"]["one_task_ms"] == pytest.approx(ms, abs=0.01)
    assert d["fits"] is True


def test_plan_this_measures_bandwidth(capsys):
    assert main(["plan", "--json"] + WHAT_IF) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["device"]["measured"] and d["switch_floor"]["bandwidth_gbs"] > 0.5
    assert d["memory_budget_source"] == "MemAvailable now"


def test_plan_this_on_a_tree_is_that_boards_table_row(capsys):
    """This host's bandwidth says nothing about the captured Nano: the plan is the Nano row's."""
    root = os.path.join(FIX, "nano-4gb-jp46")
    assert main(["plan", "--device", "this", "--root", root, "--json"] + WHAT_IF) == 0
    this = json.loads(capsys.readouterr().out)
    assert main(["plan", "--device", "nano-4gb", "--json"] + WHAT_IF) == 0
    row = json.loads(capsys.readouterr().out)
    assert this["device"]["measured"] is False and this["device"]["key"] == "nano-4gb"
    assert this["switch_floor"] == row["switch_floor"] and this["memory_budget_bytes"] == row["memory_budget_bytes"]
    assert root in this["source"]


@pytest.mark.parametrize("args,message", [
    (["plan", "--device", "nano-4gb", "--params", "22.7e6", "--tasks", "0", "--bits", "2"], "--tasks must be positive"),
    (["plan", "--device", "nano-4gb", "--params", "22.7e6", "--tasks", "8", "--bits", "0"], "--bits must be positive"),
    (["plan", "--device", "nano-4gb", "--params", "22.7e6", "--tasks", "8", "--bits", "2", "--base-bits", "-3"],
     "--base-bits cannot be negative"),
    (["plan", "x.tvs", "--device", "nano-4gb", "--base-bits", "3"], "not both"),
    (["plan", "--device", "nano-4gb", "--params", "0", "--tasks", "8", "--bits", "2"], "--params must be positive"),
    (["plan", "--device", "nano-4gb", "--reserve-mb", "-100"] + WHAT_IF, "--reserve-mb cannot be negative"),
    (["plan", "--device", "nano-4gb", "--workspace-mb", "-1"] + WHAT_IF, "--workspace-mb cannot be negative"),
    (["plan", "--device", "nano-8gb"] + WHAT_IF, "argument --device: invalid choice: 'nano-8gb'"),
    (["plan", "--device", "nano-4gb", "--engine", "tflite"] + WHAT_IF, "argument --engine: invalid choice"),
    (["plan", "--device", "nano-4gb", "--dtype", "int8"] + WHAT_IF, "argument --dtype: invalid choice"),
    (["plan", "--device", "nano-4gb", "--tasks", "abc"], "argument --tasks: invalid int value"),
    (["doctor", "--roots", "/"], "unrecognized arguments: --roots"),
    (["plan", "--root", "/nonexistent"] + WHAT_IF, "/nonexistent: no such folder"),
    (["plan", "--device", "nano-4gb", "--root", FIX] + WHAT_IF, "--root names the board for --device this"),
    (["plan", "--root", os.path.join(FIX, "x86-workstation")] + WHAT_IF, "match no row of the device table"),
    (["plan", "--device", "nano-4gb"], "give a bundle file, or all of"),
    (["plan", "missing.tvs", "--device", "nano-4gb"], "missing.tvs: no such bundle file"),
    (["plan", "x.tvs", "--device", "nano-4gb"] + WHAT_IF, "not both"),
    (["doctor", "--root", "/nonexistent"], "--root /nonexistent: no such folder"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_plan_on_a_real_bundle(capsys, tmp_path):
    bundle = _tiny_bundle(tmp_path)
    assert main(["plan", bundle, "--device", "orin-nano-8gb", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["bundle"]["tasks"] == 2 and d["bundle"]["num_shared_params"] == 64 * 32 + 32
    b = d["bundle"]
    assert 0 < b["task_read_nbytes"] < b["mix_read_nbytes"] <= b["packed_nbytes"]
    # RTVQ: one task reads the shared base vector too, so more than half of a 2-task mix
    assert b["task_read_nbytes"] > b["mix_read_nbytes"] / 2
    # the task-data ratio is the one inspect prints, and adding the FP16 base only lowers it
    assert main(["inspect", bundle, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert d["flash"]["saving_task_data"] == pytest.approx(stats["ratio_to_fp16_checkpoints"])
    assert d["flash"]["saving_with_base"] < d["flash"]["saving_task_data"]
    assert main(["plan", bundle, "--device", "orin-nano-8gb"]) == 0
    text = capsys.readouterr().out
    assert "one FP16 checkpoint per task" in text and "%.1fx the tvswitch total" % d["flash"]["saving_with_base"] in text
    assert "KiB" in text and " kB" not in text and " MB" not in text  # binary units, as inspect prints them


def _tiny_bundle(tmp_path):
    np = pytest.importorskip("numpy")
    from tvswitch.export.exporter import export_bundle

    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": np.zeros(32, np.float32)}
    tasks = {t: {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
             for t in ("a", "b")}
    path = str(tmp_path / "tiny.tvs")
    export_bundle(base, tasks, path, name="rtvq")
    return path


def test_what_if_rtvq_plans_what_a_real_rtvq_bundle_plans(capsys, tmp_path):
    """The what-if of an RTVQ bundle (--bits 2 --base-bits 3) reads what the exported bundle
    reads on a switch: one task pulls the shared base vector too. The per-task average alone
    (the old what-if) left that out."""
    np = pytest.importorskip("numpy")
    from tvswitch.export.exporter import export_bundle

    rng = np.random.default_rng(1)
    base = {"w": rng.standard_normal((512, 256)).astype(np.float32), "b": np.zeros(256, np.float32)}
    tasks = {t: {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
             for t in ("a", "b", "c", "d")}
    path = str(tmp_path / "rtvq.tvs")
    export_bundle(base, tasks, path, name="rtvq", layout="streams")  # the what-if's layout: b bits per weight
    assert main(["plan", path, "--device", "nano-4gb", "--json"]) == 0
    real = json.loads(capsys.readouterr().out)
    params = real["bundle"]["num_shared_params"]
    what_if = ["--params", str(params), "--tasks", "4", "--bits", "2"]
    assert main(["plan", "--device", "nano-4gb", "--json", "--base-bits", "3"] + what_if) == 0
    planned = json.loads(capsys.readouterr().out)
    for key in ("one_task_bytes", "all_tasks_mix_bytes"):
        assert planned["switch_floor"][key] == pytest.approx(real["switch_floor"][key], rel=0.005), key
    assert planned["bundle"]["packed_nbytes"] == pytest.approx(real["bundle"]["packed_nbytes"], rel=0.01)
    # the per-task average without the shared vector undercounts one task by more than 3 %
    assert main(["plan", "--device", "nano-4gb", "--json", "--bits", "2.75"] + what_if[:-2]) == 0
    average = json.loads(capsys.readouterr().out)
    assert average["switch_floor"]["one_task_bytes"] < 0.97 * real["switch_floor"]["one_task_bytes"]


def test_doctor_text_on_the_x86_tree_says_it_is_no_jetson(capsys):
    assert main(["doctor", "--root", os.path.join(FIX, "x86-workstation")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("platform  not a Jetson (the tree under")
    assert "memory    31.25 GiB total, 26.70 GiB usable (MemAvailable), 19.07 GiB free" in lines
    assert not any(line.startswith(("clocks", "power", "line ")) for line in lines)
    assert "fastest path: unknown without a JetPack line; run tvswitch doctor on the board itself" in lines


def test_plan_counts_the_serving_graph_beside_the_bundle_and_the_fp32_checkpoints(capsys, tmp_path):
    d = tmp_path / "demo"
    assert main(["example", str(d)]) == 0
    assert main(["export", "--base", str(d / "base.safetensors"), "--task", "a=%s" % (d / "detect.safetensors"),
                 "--task", "b=%s" % (d / "gauge.safetensors"), "-o", str(d / "tasks.tvs"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["plan", str(d / "tasks.tvs"), "--device", "orin-nano-8gb", "--json"]) == 0
    without = json.loads(capsys.readouterr().out)["flash"]
    assert without["graph_bytes"] == 0
    (d / "tasks.onnx").write_bytes(b"x" * 12345)  # a graph beside the bundle is found by name
    assert main(["plan", str(d / "tasks.tvs"), "--device", "orin-nano-8gb", "--json"]) == 0
    flash = json.loads(capsys.readouterr().out)["flash"]
    assert flash["graph_bytes"] == 12345 and flash["total_bytes"] == without["total_bytes"] + 12345
    assert flash["fp32_checkpoints_bytes"] == 2 * flash["fp16_checkpoints_bytes"]
    assert flash["shipped_bytes"] == flash["task_data_bytes"] + 12345 + 2 * flash["base_fp16_bytes"]  # FP32 base
    r = cli("plan", d / "tasks.tvs", "--model", d / "missing.onnx", "--device", "orin-nano-8gb")
    assert r.returncode == 2 and "--model" in r.stderr and "no such file" in r.stderr
