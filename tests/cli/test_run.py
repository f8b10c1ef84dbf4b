"""tvswitch export-onnx, run and bench-switch end to end on a small conv net with per-task heads."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tvswitch.cli import build_parser, main


@pytest.fixture(scope="module")
def served(tmp_path_factory, engine_models):
    """A bundle, its base, an input and a factory file, then ``model.onnx`` made by export-onnx."""
    from safetensors.numpy import save_file

    M = engine_models
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

        def base():  # the network with the bundle's base weights: serves with no --base
            return M.conv_case()[0]

        class TwoOutputs(M.ConvBN):
            def forward(self, x):
                y = super().forward(x)
                return y, 2 * y

        def two_outputs():
            net = TwoOutputs()
            net.load_state_dict(base().state_dict())
            return net
    """ % os.path.abspath(M.__file__)))
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


def _auto_bundle(served, name, router):
    """A bundle whose query sets put the batch's router features among task b's exemplars."""
    import shutil

    from tvswitch.runtime.server import serve_bundle

    f = served["folder"]
    router_mix = {t: 1.0 / 3 for t in ("a", "b", "c")}
    feats = serve_bundle(str(f / "model.tvs"), initial=router_mix).infer(served["inputs"])["output"]
    # k = 10 neighbours: task b has 12 exemplars around the features, a and c 2 each, far away
    queries = {"a": feats + 50.0, "b": np.concatenate([feats + 0.01 * i for i in range(6)]), "c": feats - 50.0}
    served["M"].make_bundle(f, served["module"], ("head.",), name=name + ".tvs", query_sets=queries, router=router)
    shutil.copy(str(f / "model.onnx"), str(f / (name + ".onnx")))
    return f / (name + ".tvs")


@pytest.mark.parametrize("per_input", [[], ["--per-input"]])
def test_run_auto_routes_the_batch_to_the_task_its_features_are_near(served, capsys, per_input):
    f = served["folder"]
    bundle = _auto_bundle(served, "auto", {"output": "output", "pool": "none"})
    out = f / "auto.npy"
    assert main(["run", str(bundle), "--auto", *per_input, "--input", str(f / "x.npy"), "-o", str(out)]) == 0
    assert "wrote %s: b=1 on onnxruntime" % out in capsys.readouterr().out  # one mix: every input is near b
    ref = served["M"].torch_reference(served["module"], served["bundle"], served["base"], {"b": 1.0},
                                      served["inputs"], ["x"])
    np.testing.assert_allclose(np.load(str(out)), ref, rtol=1e-4, atol=1e-5)


def test_run_auto_needs_query_sets_and_a_router_record(served):
    f = served["folder"]
    r = cli("run", f / "model.tvs", "--auto", "--input", f / "x.npy", "-o", f / "a.npy")
    assert r.returncode == 2 and "no Auto-Switch query sets" in r.stderr
    bundle = _auto_bundle(served, "norouter", None)
    r = cli("run", bundle, "--auto", "--input", f / "x.npy", "-o", f / "a.npy")
    assert r.returncode == 2 and "no router record" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", f / "model.tvs", "--task", "a", "--per-input", "--input", f / "x.npy", "-o", f / "a.npy")
    assert r.returncode == 2 and "--per-input" in r.stderr


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


def _reference(served, mix):
    return served["M"].torch_reference(served["module"], served["bundle"], served["base"], mix, served["inputs"],
                                       ["x"])


def _one_line_exit_2(r):
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_run_with_the_torch_engine_and_no_base_serves_the_modules_own_weights(served):
    """The conv net has BatchNorm: the base must include num_batches_tracked, which only the module's
    whole state_dict has (its float parameters alone fail the bundle's fingerprint)."""
    f = served["folder"]
    assert main(["run", str(f / "model.tvs"), "--engine", "torch", "--module", str(f / "net.py") + ":base",
                 "--task", "b", "--input", "x=" + str(f / "x.npy"), "-o", str(f / "nobase.npy")]) == 0
    np.testing.assert_allclose(np.load(str(f / "nobase.npy")), _reference(served, {"b": 1.0}), rtol=1e-4, atol=1e-5)


def test_run_writes_exactly_the_path_given(served):
    f = served["folder"]
    assert main(["run", str(f / "model.tvs"), "--task", "a", "--input", str(f / "x.npy"), "-o", str(f / "y.txt")]) == 0
    assert not (f / "y.txt.npy").exists()
    np.testing.assert_allclose(np.load(str(f / "y.txt")), _reference(served, {"a": 1.0}), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["missing/z.npy", "."])
def test_run_refuses_an_output_it_cannot_write_before_running(served, where):
    f = served["folder"]
    before = sorted(os.listdir(str(f)))
    r = cli("run", f / "model.tvs", "--task", "a", "--input", f / "x.npy", "-o", f / where)
    _one_line_exit_2(r)
    assert str(f / where) in r.stderr
    assert sorted(os.listdir(str(f))) == before  # nothing written, not even a temp file


def test_run_refuses_several_outputs_into_one_npy_and_writes_them_to_npz(served):
    f = served["folder"]
    common = ["--engine", "torch", "--module", str(f / "net.py") + ":two_outputs", "--task", "a",
              "--input", "x=" + str(f / "x.npy"), "-o"]
    r = cli("run", f / "model.tvs", *common, f / "two.npy")
    _one_line_exit_2(r)
    assert "2 outputs" in r.stderr and not (f / "two.npy").exists()
    assert main(["run", str(f / "model.tvs"), *common, str(f / "two.npz")]) == 0
    with np.load(str(f / "two.npz")) as z:
        assert sorted(z.files) == ["output_0", "output_1"]
        np.testing.assert_allclose(z["output_1"], 2 * z["output_0"], rtol=1e-6)
        np.testing.assert_allclose(z["output_0"], _reference(served, {"a": 1.0}), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("count", ["0", "-3"])
def test_bench_switch_refuses_no_switches(served, count):
    r = cli("bench-switch", served["folder"] / "model.tvs", "--switches", count)
    _one_line_exit_2(r)
    assert "--switches" in r.stderr


def test_bench_switch_with_tensorrt_needs_inputs_for_its_shapes(served):
    r = cli("bench-switch", served["folder"] / "model.tvs", "--engine", "tensorrt")
    _one_line_exit_2(r)
    assert "needs --input" in r.stderr


def test_tensorrt_profile_is_keyed_by_the_graphs_input_name(served):
    """A bare --input X.npy is called 'input'; the graph's input is 'x', and TensorRT's profile must say 'x'."""
    from tvswitch.commands._inputs import parse_inputs
    from tvswitch.commands.run import engine_options

    f = served["folder"]
    args = build_parser().parse_args(["run", str(f / "model.tvs"), "--engine", "tensorrt", "--task", "a",
                                      "--input", str(f / "x.npy"), "-o", str(f / "t.npy")])
    inputs, options = engine_options(args, parse_inputs(args.input))
    shape = served["inputs"]["x"].shape
    assert list(inputs) == ["x"] and options["profile"] == {"x": (shape, shape, shape)}


def test_export_onnx_refuses_an_output_folder_that_does_not_exist(served):
    f = served["folder"]
    r = cli("export-onnx", "--module", str(f / "net.py") + ":build", "--input", "x=" + str(f / "x.npy"),
            "-o", f / "missing" / "m.onnx")
    _one_line_exit_2(r)
    assert str(f / "missing") in r.stderr
