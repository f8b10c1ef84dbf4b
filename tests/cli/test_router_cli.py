"""tvswitch router end to end: query sets built from exemplar inputs through the bundle's ONNX
graph, stored in the bundle with every other payload carried over, then `tvswitch run --auto`
routing clustered inputs to the right task."""
import hashlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tvswitch.cli import main

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

#: Each task's inputs use its own few tokens: their features form one cluster per task.
TOKENS = {"a": (0, 6), "b": (20, 26), "c": (40, 46)}


def _sequences(rng, task, n):
    lo, hi = TOKENS[task]
    ids = rng.integers(lo, hi, size=(n, 8))
    mask = np.ones((n, 8), dtype=np.int64)
    for i in range(n):
        mask[i, rng.integers(4, 9):] = 0
    return ids, mask


@pytest.fixture(scope="module")
def enc(tmp_path_factory, engine_models):
    """A small transformer encoder bundle (tasks a, b, c), its graph from export-onnx, 30
    exemplars per task (.npz with ids and mask) and 6 held-out inputs per task."""
    from safetensors.numpy import save_file

    M = engine_models
    folder = tmp_path_factory.mktemp("router")
    module, inputs, _ = M.encoder_case()
    bundle, base = M.make_bundle(folder, module)
    save_file(base, str(folder / "base.safetensors"))
    for n in ("ids", "mask"):
        np.save(str(folder / ("%s.npy" % n)), inputs[n])
    M.write_factory_file(folder / "net.py", """
        def build():
            return M.TinyEncoder()
    """)
    assert main(["export-onnx", "--module", str(folder / "net.py") + ":build", "--weights",
                 str(folder / "base.safetensors"), "--input", "ids=" + str(folder / "ids.npy"),
                 "--input", "mask=" + str(folder / "mask.npy"), "-o", str(folder / "model.onnx")]) == 0
    rng = np.random.default_rng(0)
    exemplars, held_out = {}, {}
    for t in bundle.tasks:
        ids, mask = _sequences(rng, t, 30)
        np.savez(str(folder / ("%s.npz" % t)), ids=ids, mask=mask)
        exemplars[t] = {"ids": ids, "mask": mask}
        held_out[t] = dict(zip(("ids", "mask"), _sequences(rng, t, 6)))
    return dict(folder=folder, M=M, module=module, bundle=bundle, base=base, exemplars=exemplars,
                held_out=held_out)


def _inputs_flags(enc, tasks=("a", "b", "c")):
    flags = []
    for t in tasks:
        flags += ["--inputs", "%s=%s" % (t, enc["folder"] / ("%s.npz" % t))]
    return flags


def _copy(enc, name):
    """A copy of the bundle and its graph under ``name`` (run finds NAME.onnx beside NAME.tvs)."""
    f = enc["folder"]
    shutil.copy(str(f / "model.tvs"), str(f / (name + ".tvs")))
    shutil.copy(str(f / "model.onnx"), str(f / (name + ".onnx")))
    return f / (name + ".tvs")


def _features(enc, spec, rows):
    """The router features the query sets must hold: RouterSpec.network_features on the served graph."""
    from tvswitch.runtime.server import serve_bundle

    server = serve_bundle(str(enc["folder"] / "model.tvs"))
    return {t: spec.network_features(server.infer, enc["bundle"].tasks, {k: a[rows] for k, a in x.items()})
            for t, x in enc["exemplars"].items()}


def _stored(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_router_stores_query_sets_and_run_auto_routes_clustered_inputs(enc, capsys):
    from tvswitch.runtime.autoswitch import RouterSpec, select_exemplars
    from tvswitch.runtime.bundle import Bundle

    f = enc["folder"]
    out = f / "auto.tvs"
    shutil.copy(str(f / "model.onnx"), str(f / "auto.onnx"))
    assert main(["router", str(f / "model.tvs"), *_inputs_flags(enc), "--output", "output", "--mask-input", "mask",
                 "--exemplars", "20", "--k", "5", "-o", str(out)]) == 0
    assert "query sets of 20/20/20 exemplars (32 features each, fp16" in capsys.readouterr().out

    auto = Bundle.open(str(out))
    spec = RouterSpec(output="output", pool="mean", mask_input="mask", k=5, network="average")
    assert auto.router() == spec.record()
    want = _features(enc, spec, select_exemplars(np.arange(30), 20, seed=0))
    for t, q in auto.query_sets().items():
        assert q.dtype == np.float16 and q.shape == (20, 32)
        np.testing.assert_array_equal(q, want[t].astype(np.float16))
    # every other payload byte for byte, and the manifest but for the queries
    before, after = _stored(f / "model.tvs"), _stored(out)
    assert sorted(k for k in after if not k.startswith("@query/")) == sorted(before)
    for k, a in before.items():
        assert a.dtype == after[k].dtype and a.tobytes() == after[k].tobytes(), k
    for key in ("tasks", "entries", "task_specific", "tensors", "base", "scheme"):
        assert auto.manifest[key] == enc["bundle"].manifest[key], key

    M = enc["M"]
    for t, x in enc["held_out"].items():  # a batch of one task's inputs: that task, alone
        y = f / ("y_%s.npy" % t)
        assert main(["run", str(out), "--auto", "--input", "ids=%s" % _save(f, "ids_" + t, x["ids"]),
                     "--input", "mask=%s" % _save(f, "mask_" + t, x["mask"]), "-o", str(y)]) == 0
        assert "wrote %s: %s=1 on onnxruntime" % (y, t) in capsys.readouterr().out
        ref = M.torch_reference(enc["module"], enc["bundle"], enc["base"], {t: 1.0}, x, ["ids", "mask"])
        np.testing.assert_allclose(np.load(str(y)), ref, rtol=1e-4, atol=1e-5)

    # per input: a batch of 2 inputs of a and 4 of c is answered in two groups of other sizes
    x = {k: np.concatenate([enc["held_out"]["a"][k][:2], enc["held_out"]["c"][k][:4]]) for k in ("ids", "mask")}
    y = f / "y_mixed.npy"
    assert main(["run", str(out), "--auto", "--per-input", "--input", "ids=%s" % _save(f, "ids_m", x["ids"]),
                 "--input", "mask=%s" % _save(f, "mask_m", x["mask"]), "-o", str(y)]) == 0
    assert "wrote %s: a=1 | c=1 on onnxruntime" % y in capsys.readouterr().out
    for rows, t in ((slice(0, 2), "a"), (slice(2, 6), "c")):
        ref = M.torch_reference(enc["module"], enc["bundle"], enc["base"], {t: 1.0},
                                {k: v[rows] for k, v in x.items()}, ["ids", "mask"])
        np.testing.assert_allclose(np.load(str(y))[rows], ref, rtol=1e-4, atol=1e-5)


def _save(folder, name, array):
    path = folder / ("%s.npy" % name)
    np.save(str(path), array)
    return path


def test_router_rewrites_in_place_from_the_stored_record(enc):
    """A second run in place keeps the stored record but for the flags given; all 30 exemplars
    (fewer than the default 100), in batches of 8 with a remainder of 6."""
    from tvswitch.runtime.autoswitch import RouterSpec
    from tvswitch.runtime.bundle import Bundle

    path = _copy(enc, "inplace")
    common = [str(path), *_inputs_flags(enc), "--output", "output", "--mask-input", "mask"]
    assert main(["router", *common, "--exemplars", "5", "--network", "base"]) == 0
    assert main(["router", *common[:-4], "--k", "3", "--batch", "8"]) == 0
    auto = Bundle.open(str(path))
    spec = RouterSpec(output="output", mask_input="mask", k=3, network="base")
    assert auto.router() == spec.record()
    want = _features(enc, spec, np.arange(30))
    for t, q in auto.query_sets().items():
        assert q.shape == (30, 32)
        np.testing.assert_array_equal(q, want[t].astype(np.float16))
    assert sorted(auto.manifest["queries"]) == ["a", "b", "c"]
    assert len([k for k in _stored(path) if k.startswith("@query/")]) == 3  # the old sets replaced, not kept


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tvswitch", *map(str, args)], capture_output=True, text=True)


def _digest(path):
    with open(str(path), "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.mark.parametrize("args,message", [
    (["--inputs", "a=A", "--output", "output"], "no --inputs for task 'b'"),
    (["ALL", "--inputs", "d=D", "--output", "output"], "has no task 'd'"),
    (["ALL"], "has no router record yet: give --output NAME"),
    (["ALL", "--output", "hidden"], "--output hidden: the graph has no such output (outputs: output)"),
    (["ALL", "--output", "output", "--mask-input", "attention"], "--mask-input attention: the graph has no such "
                                                                 "input (inputs: ids, mask)"),
    (["ALL", "--output", "output", "--pool", "none", "--mask-input", "mask"], "router mask_input must be null"),
    (["ALL", "--output", "output", "--k", "0"], "router k must be an integer >= 1"),
    (["ALL", "--output", "output", "--exemplars", "0"], "--exemplars must be >= 1"),
    (["ALL", "--output", "output", "-o", "."], "is a folder"),
    (["ALL", "--output", "output", "-o", "missing/x.tvs"], "does not exist"),
])
def test_router_refuses_with_one_line_and_leaves_the_bundle(enc, args, message):
    f = enc["folder"]
    path = _copy(enc, "refused")
    before = _digest(path)
    args = [a for x in args for a in (_inputs_flags(enc) if x == "ALL" else [x])]
    args = [str(f / a) if a in (".", "missing/x.tvs") else a.replace("=A", "=%s" % (f / "a.npz"))
            .replace("=D", "=%s" % (f / "a.npz")) for a in args]
    r = cli("router", path, *args)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr, r.stderr
    assert _digest(path) == before
