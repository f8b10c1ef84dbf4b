"""The CLI end to end: the quick start's commands, and bad input as one line + exit 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tvswitch.cli import main
from tvswitch.errors import TvswitchError


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    from tvswitch.export.example import make_example

    folder = tmp_path_factory.mktemp("example")
    make_example(str(folder))
    return folder


def _tasks(folder):
    return sum((["--task", "%s=%s" % (t, folder / (t + ".safetensors"))] for t in ("detect", "gauge", "line")), [])


def cli(*args):
    """Run the installed console script: what a user runs, stderr and exit code included."""
    return subprocess.run([sys.executable, "-m", "tvswitch", *map(str, args)], capture_output=True, text=True)


def test_export_inspect_verify_rebuild(example, tmp_path, capsys):
    bundle = tmp_path / "t.tvs"
    assert main(["export", "--base", str(example / "base.safetensors"), *_tasks(example), "--scheme", "tswitch",
                 "--keep", "0.2", "--layout", "streams", "--no-progress", "-o", str(bundle)]) == 0
    assert main(["inspect", str(bundle), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert stats["tasks"] == ["detect", "gauge", "line"]
    assert stats["tensors"]["layers.0.mlp.up.weight"]["stored"] == "ternary"
    assert stats["tensors"]["pool.bn.running_mean"]["stored"] == "raw float16"
    assert 1.9 < stats["bits_per_task_vector_weight"] < 2.6
    assert main(["inspect", str(bundle)]) == 0
    scheme_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("scheme"))
    assert "keep=0.2" in scheme_line and "bits=" not in scheme_line  # only what T-Switch uses
    assert main(["verify", str(bundle), "--base", str(example / "base.safetensors")]) == 0
    capsys.readouterr()  # another task's checkpoint (its head has 4 classes, detect's 3): one line, exit 2
    assert main(["verify", str(bundle), "--base", str(example / "base.safetensors"),
                 "--against", "detect=%s" % (example / "gauge.safetensors")]) == 2
    assert "head tensor 'head.bias' is [4] in" in capsys.readouterr().err
    out = tmp_path / "gauge.safetensors"
    assert main(["rebuild", str(bundle), "--task", "gauge", "--base", str(example / "base.safetensors"),
                 "-o", str(out)]) == 0
    from safetensors.numpy import load_file
    got = load_file(str(out))
    ft = load_file(str(example / "gauge.safetensors"))
    assert set(got) == set(ft)  # heads and the integer buffer included
    # the head as stored (float16, --raw-dtype's default), in the checkpoint's one float dtype
    assert got["head.weight"].dtype == got["layers.0.mlp.up.weight"].dtype == np.float32
    assert np.array_equal(got["head.weight"], ft["head.weight"].astype(np.float16).astype(np.float32))
    half = tmp_path / "gauge16.safetensors"
    assert main(["rebuild", str(bundle), "--task", "gauge", "--base", str(example / "base.safetensors"),
                 "--dtype", "float16", "-o", str(half)]) == 0
    assert {a.dtype for k, a in load_file(str(half)).items() if k != "pool.bn.num_batches_tracked"} == {np.dtype(np.float16)}
    assert got["pool.bn.num_batches_tracked"] == ft["pool.bn.num_batches_tracked"]


def test_rebuild_and_merge_write_bfloat16(example, tmp_path, capsys, monkeypatch):
    """bfloat16 files (half the bytes of float32, what most checkpoints are now) straight from
    the rebuild, whose values are the float32 rebuild's rounded to nearest even."""
    pytest.importorskip("ml_dtypes")
    import json as _json
    import struct

    from tvswitch.kernels import abi, reference
    from tvswitch.runtime.checkpoint import read_safetensors

    base = str(example / "base.safetensors")
    bundle = tmp_path / "b.tvs"
    assert main(["export", "--base", base, *_tasks(example), "--no-progress", "-o", str(bundle)]) == 0
    wide, narrow, merged = (tmp_path / n for n in ("f32.safetensors", "bf16.safetensors", "m.safetensors"))
    for dtype, out in (("float32", wide), ("bfloat16", narrow)):
        assert main(["rebuild", str(bundle), "--mix", "detect=0.5,line=0.5", "--base", base, "--dtype", dtype,
                     "-o", str(out)]) == 0
    assert main(["merge", str(bundle), "--method", "task_arithmetic", "--task", "detect", "--base", base,
                 "--dtype", "bfloat16", "-o", str(merged)]) == 0
    for path in (narrow, merged):
        raw = path.read_bytes()
        header = _json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
        kinds = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        assert kinds == {"BF16", "I64"}, (path, kinds)  # every float tensor; the integer buffer kept
    f32, bf16 = read_safetensors(str(wide)), read_safetensors(str(narrow))  # bfloat16 read back exactly
    for name, a in f32.items():
        if a.dtype == np.float32:
            want = reference._to_16bit(a.reshape(-1), abi.BF16)
            got = (bf16[name].reshape(-1).view(np.uint32) >> 16).astype(np.uint16)
            assert np.array_equal(got, want), name
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    assert main(["rebuild", str(bundle), "--task", "detect", "--base", base, "--dtype", "bfloat16",
                 "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "--dtype bfloat16 needs the ml_dtypes package" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("scheme,flags,label", [
    ("tswitch", ["--keep", "0.05"], "ternary sparse"),
    ("tvq", ["--bits", "2"], "2 sparse bit"),
    ("rtvq", [], "3 sparse+2 sparse bit"),
])
def test_the_compact_layout_rebuilds_the_same_weights(example, tmp_path, capsys, scheme, flags, label):
    """compact against streams: the same weights bit for bit, from sparse codes; at keep 0.05
    T-Switch's sparse ternary codes hold under 0.6 of the bits."""
    from safetensors.numpy import load_file

    base = str(example / "base.safetensors")
    rebuilt = {}
    for layout in ("streams", "compact"):
        capsys.readouterr()
        bundle = tmp_path / (layout + ".tvs")
        assert main(["export", "--base", base, *_tasks(example), "--scheme", scheme, *flags,
                     "--layout", layout, "--no-progress", "-o", str(bundle)]) == 0
        assert main(["inspect", str(bundle), "--json"]) == 0
        stats = json.loads(capsys.readouterr().out.split("\n", 1)[1])
        rebuilt[layout] = stats["bits_per_task_vector_weight"]
        out = tmp_path / (layout + ".safetensors")
        assert main(["rebuild", str(bundle), "--mix", "detect=0.6,line=-0.4", "--base", base, "-o", str(out)]) == 0
        rebuilt[layout, "weights"] = load_file(str(out))
    assert stats["tensors"]["layers.0.mlp.up.weight"]["stored"] == label
    if scheme == "tswitch":
        assert rebuilt["compact"] < 0.6 * rebuilt["streams"], rebuilt
    for name, a in rebuilt["streams", "weights"].items():
        assert a.tobytes() == rebuilt["compact", "weights"][name].tobytes(), name


def test_mix_and_arithmetic(example, tmp_path):
    bundle = tmp_path / "r.tvs"
    base = example / "base.safetensors"
    assert main(["export", "--base", str(base), *_tasks(example), "--scheme", "rtvq", "--no-progress",
                 "-o", str(bundle)]) == 0
    from safetensors.numpy import load_file
    a, b = tmp_path / "mix.safetensors", tmp_path / "ta.safetensors"
    assert main(["rebuild", str(bundle), "--mix", "detect=0.3,gauge=0.3,line=0.3", "--base", str(base), "-o", str(a)]) == 0
    assert main(["rebuild", str(bundle), "--arithmetic", "0.3", "--base", str(base), "-o", str(b)]) == 0
    ma, mb = load_file(str(a)), load_file(str(b))
    # a tie: the heaviest task is the first of the bundle, whose head answers the mix (as a server serves it)
    np.testing.assert_array_equal(ma["head.weight"], load_file(str(example / "detect.safetensors"))["head.weight"]
                                  .astype(np.float16).astype(np.float32))
    for k in ma:
        assert np.array_equal(ma[k], mb[k])


def test_add_and_remove_task(example, tmp_path):
    bundle = tmp_path / "e.tvs"
    base = example / "base.safetensors"
    assert main(["export", "--base", str(base), "--task", "detect=%s" % (example / "detect.safetensors"),
                 "--no-progress", "-o", str(bundle)]) == 0
    assert main(["add-task", str(bundle), "line=%s" % (example / "line.safetensors"), "--base", str(base)]) == 0
    assert main(["remove-task", str(bundle), "detect"]) == 0
    from tvswitch.runtime.bundle import Bundle
    assert Bundle.open(str(bundle)).tasks == ["line"]


@pytest.mark.parametrize("args,message", [
    (["export", "--base", "nope.safetensors", "--task", "a=x.safetensors", "-o", "o.tvs"], "nope.safetensors: no such file"),
    (["export", "--base", "B", "--task", "a", "-o", "o.tvs"], "--task takes NAME=PATH"),
    (["export", "--base", "B", "--task", "a=B", "--granularity", "rows", "-o", "o.tvs"], "--granularity"),
    (["export", "--base", "B", "--task", "a=B", "--bits", "9", "-o", "o.tvs"], "--bits must be 1..8"),
    (["inspect", "missing.tvs"], "missing.tvs: no such bundle file"),
    (["rebuild", "missing.tvs", "--task", "a", "-o", "x.safetensors"], "missing.tvs"),
    # argparse's own refusals: one line too, not the usage text
    (["rebuild", "x.tvs", "--task", "a", "--mix", "a=1", "-o", "y"], "--mix: not allowed with argument --task"),
    (["export", "--base", "B", "--task", "a=B", "--bits", "four", "-o", "o.tvs"], "--bits: invalid int value"),
    (["no-such-verb"], "invalid choice: 'no-such-verb'"),
    # a flag the scheme would ignore is refused, naming the flag and the scheme
    (["export", "--base", "B", "--task", "a=B", "--keep", "0.1", "-o", "o.tvs"],
     "--keep does not apply to --scheme tvq"),
    (["export", "--base", "B", "--task", "a=B", "--scheme", "rtvq", "--bits", "3", "-o", "o.tvs"],
     "--bits does not apply to --scheme rtvq"),
    (["export", "--base", "B", "--task", "a=B", "--scheme", "tswitch", "--granularity", "channel", "-o", "o.tvs"],
     "--granularity does not apply to --scheme tswitch"),
    (["export", "--base", "B", "--task", "a=B", "--scheme", "tvq", "--base-bits", "3", "-o", "o.tvs"],
     "--base-bits does not apply to --scheme tvq"),
    (["rebuild", "x.tvs", "--task", "a", "--threads", "-3", "-o", "y.safetensors"],
     "argument --threads: must be 0 (all cores) or more, got -3"),
    (["run", "x.tvs", "--task", "a", "--input", "x.npy", "--threads", "-1", "-o", "y.npy"],
     "argument --threads: must be 0 (all cores) or more, got -1"),
    (["router", "x.tvs", "--inputs", "a=x.npy", "--output", "f", "--threads", "two"],
     "argument --threads: must be a whole number, got 'two'"),
    (["add-task", "x.tvs", "nameonly"], "the task argument takes NAME=PATH, got 'nameonly'"),
    # outputs that cannot be written are refused before any work
    (["export", "--base", "B", "--task", "a=B", "-o", "."], "-o .: is a folder"),
    (["rebuild", "x.tvs", "--task", "a", "-o", "."], "-o .: is a folder"),
    (["export", "--base", "B", "--task", "a=B", "-o", "no/such/dir/o.tvs"], "does not exist"),
    (["example", "B"], "exists and is not a folder"),
    (["example", "/proc/nope/demo"], "/proc/nope/demo: cannot create the folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, example, args, message):
    args = [str(example / "base.safetensors") if a == "B" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "tvswitch", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_corrupt_bundle_writes_no_output(example, tmp_path):
    bundle = tmp_path / "c.tvs"
    base = example / "base.safetensors"
    assert main(["export", "--base", str(base), *_tasks(example), "--no-progress", "-o", str(bundle)]) == 0
    data = bytearray(bundle.read_bytes())
    data[-5] ^= 0xFF
    bundle.write_bytes(bytes(data))
    out = tmp_path / "out.safetensors"
    r = cli("rebuild", bundle, "--task", "detect", "--base", base, "-o", out)
    assert r.returncode == 2 and "CRC-32" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tvswitch-")] == []
    r = cli("verify", bundle)
    assert r.returncode == 2 and "corrupt" in r.stderr
    for command in (("plan", bundle, "--device", "orin-nano-8gb"), ("inspect", bundle)):
        r = cli(*command)  # figures of a bundle that cannot be served would be a wrong answer
        assert r.returncode == 2 and "CRC-32" in r.stderr and "Traceback" not in r.stderr, command


def test_wrong_base_writes_no_output(example, tmp_path):
    bundle = tmp_path / "w.tvs"
    base = example / "base.safetensors"
    assert main(["export", "--base", str(base), *_tasks(example), "--no-progress", "-o", str(bundle)]) == 0
    out = tmp_path / "out.safetensors"
    r = cli("rebuild", bundle, "--task", "detect", "--base", example / "line.safetensors", "-o", out)
    assert r.returncode == 2 and "fingerprint" in r.stderr
    assert str(example / "line.safetensors") in r.stderr  # names the base file given
    assert not out.exists()


def test_an_os_error_no_check_caught_is_one_line_and_exit_2(monkeypatch, capsys):
    import tvswitch.export.example as ex

    def full_disk(folder, seed=0):
        raise OSError(28, "No space left on device", "/mnt/card/base.safetensors")
    monkeypatch.setattr(ex, "make_example", full_disk)
    assert main(["example", "demo"]) == 2
    err = capsys.readouterr().err
    assert err == "tvswitch example: error: /mnt/card/base.safetensors: No space left on device\n"


@pytest.mark.parametrize("missing", ["torch", "onnxruntime"])
def test_a_missing_optional_package_is_one_line_naming_its_extra(example, tmp_path, monkeypatch, capsys, missing):
    """A core install (numpy, safetensors, tqdm) runs the verbs that need torch or onnxruntime
    to a one-line error that says what to install, not to a traceback."""
    monkeypatch.setitem(sys.modules, missing, None)  # `import NAME` now fails as if it were not installed
    base, bundle = example / "base.safetensors", tmp_path / "t.tvs"
    assert main(["export", "--base", str(base), *_tasks(example), "--no-progress", "-o", str(bundle)]) == 0
    capsys.readouterr()
    argv = (["export-onnx", "--module", "tvswitch.export.example_net:detect", "--bundle", str(bundle), "--input",
             "ids=%s" % (example / "ids.npy"), "-o", str(tmp_path / "g.onnx")] if missing == "torch" else
            ["run", str(bundle), "--base", str(base), "--task", "detect", "--model", str(tmp_path / "none.onnx"),
             "--input", str(example / "ids.npy"), "-o", str(tmp_path / "out.npy")])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'tvswitch[%s]'" % ("torch" if missing == "torch" else "onnx") in err, err


def test_outputs_get_the_umask_mode(example, tmp_path):
    old = os.umask(0o027)
    try:
        bundle, out = tmp_path / "m.tvs", tmp_path / "m.safetensors"
        base = example / "base.safetensors"
        assert main(["export", "--base", str(base), *_tasks(example), "--no-progress", "-o", str(bundle)]) == 0
        assert main(["rebuild", str(bundle), "--task", "line", "--base", str(base), "-o", str(out)]) == 0
    finally:
        os.umask(old)
    assert os.stat(bundle).st_mode & 0o777 == 0o640
    assert os.stat(out).st_mode & 0o777 == 0o640
    os.chmod(bundle, 0o604)  # a rewrite in place keeps the file's mode
    assert main(["remove-task", str(bundle), "detect"]) == 0
    assert os.stat(bundle).st_mode & 0o777 == 0o604


def test_inspect_lists_heads_and_numeric_widths(example, tmp_path, capsys):
    bundle = tmp_path / "i.tvs"
    assert main(["export", "--base", str(example / "base.safetensors"), *_tasks(example), "--scheme", "rtvq",
                 "--no-progress", "-o", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(bundle), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tensors"]["layers.0.mlp.up.weight"]["widths"] == [3, 2]
    assert stats["tensors"]["layers.0.mlp.up.weight"]["stored"] == "3+2 bit"
    assert stats["tensors"]["pool.bn.running_mean"]["widths"] == [16]
    assert stats["task_specific"]["gauge"]["head.weight"] == {"shape": [4, 128], "dtype": "float16", "bytes": 1024}
    assert main(["inspect", str(bundle)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("head.weight") and "4x128" in line and "gauge" in line for line in lines)


def _network_file(path, body: str) -> str:
    """``--module``'s FILE.py:net for a network whose __init__ (after super()) is ``body``'s lines."""
    path.write_text("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n" + "".join("        %s\n" % line for line in body.splitlines())
                    + "def net():\n    return Net()\n")
    return "%s:net" % path


def test_a_base_carrying_a_buffer_the_network_keeps_unsaved_loads_into_it(tmp_path):
    """transformers saves ``embeddings.position_ids`` in some checkpoints and registers it
    unsaved in the network: the torch engine's weights must load anyway (export leaves it out)."""
    torch = pytest.importorskip("torch", reason="the torch engine's module (the torch extra)")
    from tvswitch.commands._inputs import load_module

    net = _network_file(tmp_path / "net.py", "self.lin = torch.nn.Linear(3, 2)\n"
                        "self.register_buffer('position_ids', torch.arange(4), persistent=False)")
    weights = {"lin.weight": np.ones((2, 3), np.float32), "lin.bias": np.zeros(2, np.float32),
               "position_ids": np.arange(4)}
    module = load_module(net, weights)
    assert torch.equal(module.lin.weight, torch.ones(2, 3))
    with pytest.raises(TvswitchError, match="no tensor 'extra.weight'"):
        load_module(net, dict(weights, **{"extra.weight": np.ones(2, np.float32)}))


def test_weights_without_a_tied_name_load_into_a_network_that_ties_it(tmp_path):
    """save_pretrained leaves a tied lm_head.weight out of the file: the name it is tied to
    brings its value; without that one, the weights are refused."""
    torch = pytest.importorskip("torch", reason="the torch engine's module (the torch extra)")
    from tvswitch.commands._inputs import load_module

    tied = _network_file(tmp_path / "tied.py", "self.emb = torch.nn.Embedding(5, 3)\n"
                         "self.out = torch.nn.Linear(3, 5, bias=False)\nself.out.weight = self.emb.weight")
    emb = np.arange(15, dtype=np.float32).reshape(5, 3)
    module = load_module(tied, {"emb.weight": emb})
    assert torch.equal(module.out.weight, torch.from_numpy(emb))
    with pytest.raises(TvswitchError, match="lack 'emb.weight'"):
        load_module(tied, {"out.weight": emb})
    # a DDP prefix on every name is mapped; a head of another shape is named
    module = load_module(tied, {"module.emb.weight": emb + 1})
    assert torch.equal(module.emb.weight, torch.from_numpy(emb + 1))
    with pytest.raises(TvswitchError, match="size mismatch for emb.weight"):
        load_module(tied, {"emb.weight": np.zeros((6, 3), np.float32)})


def test_an_npz_input_is_its_arrays_by_name_and_refused_under_one_name(tmp_path):
    from tvswitch.commands._inputs import parse_inputs

    np.savez(str(tmp_path / "in.npz"), input_ids=np.arange(6).reshape(1, 6), mask=np.ones((1, 6), np.int64))
    np.save(str(tmp_path / "x.npy"), np.zeros(3, np.float32))
    got = parse_inputs([str(tmp_path / "in.npz")])
    assert list(got) == ["input_ids", "mask"] and got["input_ids"].shape == (1, 6)
    assert list(parse_inputs([str(tmp_path / "x.npy")])) == ["input"]
    with pytest.raises(TvswitchError, match="is an .npz archive: give one .npy per input"):
        parse_inputs(["input_ids=%s" % (tmp_path / "in.npz")])
