"""``tvswitch doctor`` and ``tvswitch plan`` through the CLI, as a user runs them."""
import json
import os
import subprocess
import sys

import pytest

from tvswitch.cli import main

FIX = os.path.join(os.path.dirname(__file__), "..", "jetson", "fixtures")
WHAT_IF = ["--params", "22.7e6", "--tasks", "8", "--bits", "2.375"]
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


@pytest.mark.parametrize("device,ms", [("nano-4gb", 7.36), ("orin-nano-8gb", 2.77)])
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
    (["plan", "--device", "nano-4gb", "--params", "22.7e6", "--tasks", "0", "--bits", "2.375"], "--tasks must be positive"),
    (["plan", "--device", "nano-4gb", "--params", "22.7e6", "--tasks", "8", "--bits", "0"], "--bits must be positive"),
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
