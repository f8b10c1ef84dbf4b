"""tvswitch export-onnx, run and bench-switch end to end on a small conv net with per-task heads."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tvswitch.cli import main

MODELS = os.path.join(os.path.dirname(__file__), "..", "runtime", "engines", "models.py")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A bundle, its base, an input and a factory file, then ``model.onnx`` made by export-onnx."""
    import importlib.util

    from safetensors.numpy import save_file

    spec = importlib.util.spec_from_file_location("engine_models", MODELS)
    M = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(M)
    folder = tmp_path_factory.mktemp("run")
    module, inputs, _ = M.conv_case()
    bundle, base = M.make_bundle(folder, module, ("head.",))
    save_file({n: t.numpy() for n, t in module.state_dict().items()}, str(folder / "base.safetensors"))
    np.save(str(folder / "x.npy"), inputs["x"])
    (folder / "net.py").write_text(textwrap.dedent("""
        import importlib.util
        spec = importlib.util.spec_from_file_location("engine_models", %r)
        M = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(M)

        def build():
            return M.ConvBN()
    """ % os.path.abspath(MODELS)))
    assert main(["export-onnx", "--module", str(folder / "net.py") + ":build", "--weights",
                 str(folder / "base.safetensors"), "--input", "x=" + str(folder / "x.npy"),
                 "-o", str(folder / "model.onnx")]) == 0
    return dict(folder=folder, M=M, module=module, bundle=bundle, base=base, inputs=inputs)


def test_run_serves_a_task_and_a_mix_like_torch(served, capsys):
    f = served["folder"]
    for flag, value, mix in (("--task", "b", {"b": 1.0}), ("--mix", "a=0.5,c=0.5", {"a": 0.5, "c": 0.5})):
        out = f / "y.npy"
        assert main(["run", str(f / "model.tvs"), flag, value, "--input", str(f / "x.npy"), "-o", str(out)]) == 0
        assert "onnxruntime (lock)" in capsys.readouterr().out
        ref = served["M"].torch_reference(served["module"], served["bundle"], served["base"], mix, served["inputs"],
                                          ["x"])
        np.testing.assert_allclose(np.load(str(out)), ref, rtol=1e-4, atol=1e-5)


def test_run_with_the_torch_engine_matches_onnxruntime(served):
    f = served["folder"]
    common = ["--task", "c", "-o"]
    assert main(["run", str(f / "model.tvs"), *common, str(f / "ort.npy"), "--input", str(f / "x.npy")]) == 0
    assert main(["run", str(f / "model.tvs"), "--engine", "torch", "--module", str(f / "net.py") + ":build",
                 "--base", str(f / "base.safetensors"), "--double-buffer", *common, str(f / "torch.npy"),
                 "--input", "x=" + str(f / "x.npy")]) == 0
    np.testing.assert_allclose(np.load(str(f / "torch.npy")), np.load(str(f / "ort.npy")), rtol=1e-4, atol=1e-5)


def test_run_auto_routes_the_batch_to_the_task_its_features_are_near(served, capsys):
    """Query sets placed so that the batch's router features sit among task b's exemplars."""
    import shutil

    from tvswitch.runtime.server import serve_bundle

    f = served["folder"]
    router_mix = {t: 1.0 / 3 for t in ("a", "b", "c")}
    feats = serve_bundle(str(f / "model.tvs"), initial=router_mix).infer(served["inputs"])["output"]
    # k = 10 neighbours: task b has 12 exemplars around the features, a and c 2 each, far away
    queries = {"a": feats + 50.0, "b": np.concatenate([feats + 0.01 * i for i in range(6)]), "c": feats - 50.0}
    served["M"].make_bundle(f, served["module"], ("head.",), name="auto.tvs", query_sets=queries)
    shutil.copy(str(f / "model.onnx"), str(f / "auto.onnx"))
    assert main(["run", str(f / "auto.tvs"), "--auto", "--input", str(f / "x.npy"), "-o", str(f / "auto.npy")]) == 0
    assert "wrote %s: b=1 on onnxruntime" % (f / "auto.npy") in capsys.readouterr().out
    ref = served["M"].torch_reference(served["module"], served["bundle"], served["base"], {"b": 1.0},
                                      served["inputs"], ["x"])
    np.testing.assert_allclose(np.load(str(f / "auto.npy")), ref, rtol=1e-4, atol=1e-5)


def test_run_auto_needs_query_sets(served):
    f = served["folder"]
    r = cli("run", f / "model.tvs", "--auto", "--input", f / "x.npy", "-o", f / "a.npy")
    assert r.returncode == 2 and "no Auto-Switch query sets" in r.stderr


def test_bench_switch_prints_percentiles(served, capsys):
    assert main(["bench-switch", str(served["folder"] / "model.tvs"), "--switches", "9", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 tasks, 9 switches" in out and "median" in out and "p99" in out


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tvswitch", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("args,message", [
    (["--task", "nope"], "has no task 'nope'"),
    (["--mix", "a=x"], "not a number"),
    (["--task", "a", "--engine", "torch"], "needs --module"),
    (["--task", "a", "--model", "missing.onnx"], "missing.onnx"),
])
def test_bad_input_is_one_line_and_exit_2(served, args, message):
    f = served["folder"]
    r = cli("run", f / "model.tvs", *args, "--input", f / "x.npy", "-o", f / "bad.npy")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (f / "bad.npy").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_without_tensorrt_says_what_to_install(served):
    f = served["folder"]
    r = cli("run", f / "model.tvs", "--engine", "tensorrt", "--task", "a", "--input", f / "x.npy", "-o", f / "t.npy")
    assert r.returncode == 2 and "TensorRT" in r.stderr
