"""Outputs: no verb writes over one of its inputs, a device or a FIFO; links are written through;
every kind of output gets the mode a plain write gives; a killed writer's temporary files go."""
import hashlib
import os
import stat
import subprocess
import time

import numpy as np
import pytest

from tvswitch.cli import main


def run(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def refused(r, *words):
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def digest(path):
    with open(str(path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs")
    assert main(["example", str(d)]) == 0
    assert main(["export", "--base", str(d / "base.safetensors"), "--task", "detect=%s" % (d / "detect.safetensors"),
                 "--task", "gauge=%s" % (d / "gauge.safetensors"), "-o", str(d / "tasks.tvs"), "--no-progress"]) == 0
    return d


def cases(d):
    """(argv, the input it must leave as it was) for every writing verb aimed at one of its inputs."""
    base, detect, bundle = d / "base.safetensors", d / "detect.safetensors", d / "tasks.tvs"
    return [
        (["rebuild", bundle, "--task", "detect", "--base", base, "-o", bundle], bundle),
        (["rebuild", bundle, "--task", "detect", "--base", base, "-o", base], base),
        (["export", "--base", base, "--task", "t=%s" % detect, "-o", base], base),
        (["export", "--base", base, "--task", "t=%s" % detect, "-o", detect], detect),
        (["add-task", bundle, "line=%s" % (d / "line.safetensors"), "--base", base, "-o", base], base),
        (["run", bundle, "--base", base, "--task", "detect", "--input", d / "ids.npy", "-o", bundle], bundle),
        (["run", bundle, "--base", base, "--task", "detect", "--input", d / "ids.npy", "-o", d / "ids.npy"],
         d / "ids.npy"),
        (["merge", bundle, "--method", "task_arithmetic", "--base", base, "-o", bundle], bundle),
        (["export-onnx", "--module", "tvswitch.export.example_net:detect", "--weights", detect, "--input",
          "ids=%s" % (d / "ids.npy"), "-o", detect], detect),
    ]


@pytest.mark.parametrize("index", range(9))
def test_an_output_that_is_one_of_the_inputs_is_refused_and_the_input_untouched(demo, capsys, index):
    argv, victim = cases(demo)[index]
    if argv[0] in ("run", "export-onnx"):
        pytest.importorskip("onnx", reason="needs the onnx extra")
        pytest.importorskip("torch", reason="needs torch")
    before = digest(victim)
    refused(run(capsys, *argv), "also an input" if argv[0] != "export" or "-o" not in argv else "input")
    assert digest(victim) == before


def test_an_output_through_a_link_to_an_input_is_refused_too(demo, capsys, tmp_path):
    link = tmp_path / "alias.tvs"
    os.symlink(str(demo / "tasks.tvs"), str(link))
    before = digest(demo / "tasks.tvs")
    refused(run(capsys, "rebuild", demo / "tasks.tvs", "--task", "detect", "--base", demo / "base.safetensors",
                "-o", link), "also an input")
    assert digest(demo / "tasks.tvs") == before and os.path.islink(str(link))


@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_devices_and_fifos_are_refused_as_outputs(demo, capsys, tmp_path, kind):
    target = tmp_path / "pipe"
    if kind == "fifo":
        os.mkfifo(str(target))
    else:
        target = "/dev/null"
    refused(run(capsys, "rebuild", demo / "tasks.tvs", "--task", "detect", "--base", demo / "base.safetensors",
                "-o", target), "tvswitch writes regular files only")
    mode = os.stat(str(target)).st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)


def test_editing_a_bundle_through_a_link_edits_its_target_and_keeps_the_link(demo, capsys, tmp_path):
    import shutil

    real = tmp_path / "real.tvs"
    shutil.copy(str(demo / "tasks.tvs"), str(real))
    link = tmp_path / "link.tvs"
    os.symlink(str(real), str(link))
    assert run(capsys, "remove-task", link, "gauge").returncode == 0
    assert os.path.islink(str(link))
    from tvswitch.runtime.bundle import Bundle

    assert Bundle.open(str(real)).tasks == ["detect"]


def test_a_repeated_task_name_is_refused(demo, capsys, tmp_path):
    refused(run(capsys, "export", "--base", demo / "base.safetensors", "--task", "a=%s" % (demo / "detect.safetensors"),
                "--task", "a=%s" % (demo / "gauge.safetensors"), "-o", tmp_path / "x.tvs"), "names task 'a' twice")
    assert not (tmp_path / "x.tvs").exists()


@pytest.mark.parametrize("weight", ["1e39", "3e38", "-1e308", "1e30"])
def test_mix_weights_that_overflow_or_mean_nothing_are_refused(demo, capsys, tmp_path, weight):
    refused(run(capsys, "rebuild", demo / "tasks.tvs", "--mix", "detect=%s" % weight, "--base",
                demo / "base.safetensors", "-o", tmp_path / "x.safetensors"), "task 'detect'")
    assert not (tmp_path / "x.safetensors").exists()


def test_the_api_refuses_overflowing_mixes_numpy_scalars_are_weights_and_lists_are_not(demo):
    from tvswitch.errors import TvswitchError
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.checkpoint import read_safetensors
    from tvswitch.runtime.rebuild import CpuRebuilder

    bundle = Bundle.open(str(demo / "tasks.tvs"))
    rebuilder = CpuRebuilder(bundle, read_safetensors(str(demo / "base.safetensors")))
    out = rebuilder.allocate()
    rebuilder.rebuild({"detect": np.float32(0.5)}, out)
    with pytest.raises(TvswitchError, match="a mix is a mapping of task to weight"):
        rebuilder.rebuild([("detect", 1.0)], out)
    before = {n: a.copy() for n, a in out.items()}
    with pytest.raises(TvswitchError, match="weight of task 'detect' is 1e\\+07"):
        rebuilder.rebuild({"detect": 1e7}, out)
    assert all(np.array_equal(out[n], a) for n, a in before.items())  # nothing written


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_every_kind_of_output_gets_the_mode_a_plain_write_gives(demo, capsys, tmp_path):
    pytest.importorskip("onnxruntime", reason="the graph and run outputs need the onnx extra")
    pytest.importorskip("torch", reason="export-onnx needs torch")
    want = 0o666 & ~_umask()
    d = demo
    outputs = {
        "bundle": (["export", "--base", d / "base.safetensors", "--task", "t=%s" % (d / "detect.safetensors"),
                    "--no-progress"], tmp_path / "m.tvs"),
        "weights": (["rebuild", d / "tasks.tvs", "--task", "gauge", "--base", d / "base.safetensors"],
                    tmp_path / "w.safetensors"),
        "graph": (["export-onnx", "--module", "tvswitch.export.example_net:detect", "--bundle", d / "tasks.tvs",
                   "--input", "ids=%s" % (d / "ids.npy")], tmp_path / "g.onnx"),
        "answers": (["run", d / "tasks.tvs", "--model", tmp_path / "g.onnx", "--base", d / "base.safetensors",
                     "--task", "gauge", "--input", d / "ids.npy"], tmp_path / "y.npy"),
    }
    for what, (argv, out) in outputs.items():
        assert run(capsys, *argv, "-o", out).returncode == 0, what
        assert stat.S_IMODE(os.stat(str(out)).st_mode) == want, what


def test_a_killed_writers_temporary_files_are_removed_on_the_next_write_and_a_live_ones_kept(demo, capsys, tmp_path):
    from tvswitch.files import STALE_SECONDS

    stale, live, other = tmp_path / ".tvswitch-dead.tmp", tmp_path / ".tvswitch-live.tmp", tmp_path / ".other.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"x" * 100)
    old = time.time() - STALE_SECONDS - 60
    os.utime(str(stale), (old, old))
    os.utime(str(other), (old, old))
    assert run(capsys, "rebuild", demo / "tasks.tvs", "--task", "gauge", "--base", demo / "base.safetensors",
               "-o", tmp_path / "w.safetensors").returncode == 0
    assert not stale.exists() and live.exists() and other.exists()
