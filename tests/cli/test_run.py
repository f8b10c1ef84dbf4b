"""tvswitch export-onnx, run and bench-switch end to end on a small conv net with per-task heads."""
import os
import subprocess
import sys

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="run and bench-switch serve on onnxruntime (the onnx extra)")
pytest.importorskip("torch", reason="the graphs served are exported from torch (the torch extra)")

from tvswitch.cli import build_parser, main  # noqa: E402
from tvswitch.errors import TvswitchError  # noqa: E402

_ORT_GPU = ort.get_device() == "GPU"


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
    M.write_factory_file(folder / "net.py", """
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
    """)
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


@pytest.mark.parametrize("base", [False, True])
def test_run_serves_what_no_task_changes_as_constants_or_not_alike(served, tmp_path, base):
    """Tasks that change the first convolution only (the rest the base in every task): run holds
    the rest as constants of the session (from --base, whose BatchNorm counters the bundle's
    fingerprint covers, or from the graph's own values), --no-constants as inputs; both answer
    as torch."""
    from tvswitch.commands.run import open_server

    M = served["M"]
    bundle, base_weights = M.make_bundle(tmp_path, served["module"], ("head.",), name="partial.tvs",
                                         only=("c1.weight",))
    assert "c2.weight" in bundle.base_only
    ref = M.torch_reference(served["module"], bundle, base_weights, {"b": 1.0}, served["inputs"], ["x"])
    f = served["folder"]
    common = ["run", str(tmp_path / "partial.tvs"), "--task", "b", "--model", str(f / "model.onnx"),
              "--input", str(f / "x.npy")] + (["--base", str(f / "base.safetensors")] if base else [])
    for flags, held in (([], set(bundle.base_only)), (["--no-constants"], set())):
        out = tmp_path / "y.npy"
        assert main(common + ["-o", str(out)] + flags) == 0
        np.testing.assert_allclose(np.load(str(out)), ref, rtol=1e-4, atol=1e-5)
        args = build_parser().parse_args(common + ["-o", str(out)] + flags)
        server, _ = open_server(args, {"x": served["inputs"]["x"]})
        assert set(server.engine.constants) == held


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
    from tvswitch.runtime.engines.options import engine_options

    f = served["folder"]
    args = build_parser().parse_args(["run", str(f / "model.tvs"), "--engine", "tensorrt", "--task", "a",
                                      "--input", str(f / "x.npy"), "-o", str(f / "t.npy")])
    inputs, options = engine_options("tensorrt", parse_inputs(args.input), graph=str(f / "model.onnx"))
    shape = served["inputs"]["x"].shape
    assert list(inputs) == ["x"] and options["profile"] == {"x": (shape, shape, shape)}


def test_export_onnx_refuses_an_output_folder_that_does_not_exist(served):
    f = served["folder"]
    r = cli("export-onnx", "--module", str(f / "net.py") + ":build", "--input", "x=" + str(f / "x.npy"),
            "-o", f / "missing" / "m.onnx")
    _one_line_exit_2(r)
    assert str(f / "missing") in r.stderr


def main_(capsys, *args):
    """``tvswitch ARGS`` in this process (no interpreter start-up per call): its exit code and stderr.

    main() turns a TvswitchError into one line and exit 2 as the command does; anything else
    would raise here and fail the test, as a traceback would."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, *capsys.readouterr())


def test_a_plain_torch_onnx_export_is_refused_pointing_to_export_onnx(served, capsys):
    """torch.onnx.export with constant folding fuses Conv + BatchNorm into new weights: no shared
    tensor keeps its name (the head does).  Served as is, every switch would change the head alone."""
    import io
    import warnings

    import torch

    f = served["folder"]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(served["M"].conv_case()[0], (torch.from_numpy(served["inputs"]["x"]),), buf, dynamo=False,
                          input_names=["x"], output_names=["output"], do_constant_folding=True)
    (f / "plain.onnx").write_bytes(buf.getvalue())
    for allow in ([], ["--allow-unmatched"]):  # a graph that matches nothing is refused either way
        r = main_(capsys, "run", f / "model.tvs", *allow, "--model", f / "plain.onnx", "--task", "b",
                  "--input", f / "x.npy", "-o", f / "plain.npy")
        _one_line_exit_2(r)
        assert "none of the 11 tensors" in r.stderr and "tvswitch export-onnx" in r.stderr
        assert not (f / "plain.npy").exists()


def test_a_graph_lacking_one_tensor_is_refused_unless_allowed_and_then_keeps_it(served, capsys):
    """model.onnx with c2.weight renamed as an exporter would (record dropped): refused naming it;
    with --allow-unmatched served, c2.weight staying at the graph's (base) value through switches."""
    import copy

    import onnx
    import torch

    f = served["folder"]
    model = onnx.load(str(f / "model.onnx"))
    del model.metadata_props[:]
    for t in list(model.graph.initializer) + list(model.graph.input):
        if t.name == "c2.weight":
            t.name = "onnx::Conv_9"
    for node in model.graph.node:
        node.input[:] = ["onnx::Conv_9" if n == "c2.weight" else n for n in node.input]
    onnx.save(model, str(f / "renamed.onnx"))
    common = ["--model", f / "renamed.onnx", "--task", "b", "--input", f / "x.npy", "-o", f / "renamed.npy"]
    r = main_(capsys, "run", f / "model.tvs", *common)
    _one_line_exit_2(r)
    assert "1 of the 13 tensors" in r.stderr and "('c2.weight')" in r.stderr and "--allow-unmatched" in r.stderr
    # a subprocess: the warning is what a user sees on stderr (in-process, pytest captures the log)
    r = cli("run", f / "model.tvs", "--allow-unmatched", "--base", f / "base.safetensors", *common)
    assert r.returncode == 0, r.stderr
    assert "1 tensors" in r.stderr and "c2.weight" in r.stderr and "keep its own values" in r.stderr
    ref = copy.deepcopy(served["module"])
    bundle, base = served["bundle"], served["base"]
    from tvswitch.runtime.rebuild import CpuRebuilder

    rebuilder = CpuRebuilder(bundle, base)
    weights = rebuilder.allocate()
    rebuilder.rebuild({"b": 1.0}, weights)
    weights.update(bundle.task_specific("b"))
    weights["c2.weight"] = base["c2.weight"]
    ref.load_state_dict({n: torch.from_numpy(np.asarray(a)) for n, a in weights.items()}, strict=False)
    with torch.no_grad():
        want = ref(torch.from_numpy(served["inputs"]["x"])).numpy()
    np.testing.assert_allclose(np.load(str(f / "renamed.npy")), want, rtol=1e-4, atol=1e-5)
    assert np.abs(want - _reference(served, {"b": 1.0})).max() > 1e-3  # c2.weight did matter


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_run_refuses_inputs_of_the_wrong_dtype_or_shape_in_one_line(served, engine, capsys):
    f = served["folder"]
    x = served["inputs"]["x"]
    np.save(str(f / "x_complex.npy"), x.astype(np.complex64))
    np.save(str(f / "x_3d.npy"), x[0])
    torch_flags = ["--engine", "torch", "--module", str(f / "net.py") + ":base"] if engine == "torch" else []
    for bad, given in (("x_complex.npy", "complex64[2, 3, 8, 8]"), ("x_3d.npy", "float32[3, 8, 8]")):
        r = main_(capsys, "run", f / "model.tvs", *torch_flags, "--task", "a", "--input", "x=" + str(f / bad),
                  "-o", f / "bad.npy")
        _one_line_exit_2(r)
        assert ("input 'x' is " + given if engine == "onnxruntime" else "(x %s)" % given) in r.stderr, r.stderr
        assert not (f / "bad.npy").exists()


def test_export_onnx_refuses_an_example_input_the_module_cannot_take_in_one_line(served, capsys):
    f = served["folder"]
    np.save(str(f / "x_3d.npy"), served["inputs"]["x"][0])
    r = main_(capsys, "export-onnx", "--module", str(f / "net.py") + ":build", "--input",
              "x=" + str(f / "x_3d.npy"), "-o", f / "bad.onnx")
    _one_line_exit_2(r)
    assert "x float32[3, 8, 8]" in r.stderr and not (f / "bad.onnx").exists()


@pytest.mark.skipif(_ORT_GPU, reason="ONNX Runtime has CUDA here")
@pytest.mark.parametrize("verb", ["run", "bench-switch"])
def test_provider_cuda_is_refused_with_the_reason_where_it_cannot_run(served, verb, capsys):
    f = served["folder"]
    extra = ["--task", "a", "--input", f / "x.npy", "-o", f / "cuda.npy"] if verb == "run" else ["--switches", "2"]
    r = main_(capsys, verb, f / "model.tvs", "--provider", "cuda", *extra)
    _one_line_exit_2(r)
    assert "CUDAExecutionProvider" in r.stderr and not (f / "cuda.npy").exists()
    r = main_(capsys, verb, f / "model.tvs", "--provider", "cuda", "--engine", "torch", "--module",
              str(f / "net.py") + ":base", *(["--input", "x=" + str(f / "x.npy")] if verb == "bench-switch" else extra))
    _one_line_exit_2(r)
    assert "provider cuda: torch" in r.stderr and "no CUDA GPU" in r.stderr
    r = main_(capsys, verb, f / "model.tvs", "--provider", "cpu", "--engine", "tensorrt", "--input", f / "x.npy",
              *(extra[:2] + extra[4:] if verb == "run" else []))
    _one_line_exit_2(r)
    assert "CUDA GPU only" in r.stderr


def test_provider_cpu_serves_like_the_default(served):
    f = served["folder"]
    assert main(["run", str(f / "model.tvs"), "--provider", "cpu", "--task", "a", "--input", str(f / "x.npy"),
                 "-o", str(f / "cpu.npy")]) == 0
    np.testing.assert_allclose(np.load(str(f / "cpu.npy")), _reference(served, {"a": 1.0}), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The quick start's built-in example: example -> export -> export-onnx --bundle (one graph,
    ``tasks.onnx``), and, for the refusals, the graph of one task's head alone (``detect.onnx``)."""
    from tvswitch.export.example import TASKS

    d = tmp_path_factory.mktemp("example") / "demo"
    assert main(["example", str(d)]) == 0
    assert main(["export", "--base", str(d / "base.safetensors"), "--scheme", "rtvq", "-o", str(d / "tasks.tvs"),
                 *[a for t in TASKS for a in ("--task", "%s=%s" % (t, d / (t + ".safetensors")))]]) == 0
    assert main(["export-onnx", "--module", "tvswitch.export.example_net:detect", "--bundle", str(d / "tasks.tvs"),
                 "--input", "ids=" + str(d / "ids.npy"), "-o", str(d / "tasks.onnx")]) == 0
    assert main(["export-onnx", "--module", "tvswitch.export.example_net:detect", "--weights",
                 str(d / "detect.safetensors"), "--input", "ids=" + str(d / "ids.npy"),
                 "-o", str(d / "detect.onnx")]) == 0
    return d


def _example_reference(d, mix):
    """The example network in torch with the weights the bundle rebuilds for ``mix``, built at the
    shape of its heaviest task's head, with that head: what the device must answer."""
    import torch

    from tvswitch.export.example import CLASSES
    from tvswitch.export.example_net import build
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.checkpoint import read_safetensors
    from tvswitch.runtime.mix import check_mix, head_task
    from tvswitch.runtime.rebuild import CpuRebuilder

    bundle = Bundle.open(str(d / "tasks.tvs"))
    base = read_safetensors(str(d / "base.safetensors"))
    rebuilder = CpuRebuilder(bundle, base)
    weights = rebuilder.allocate()
    rebuilder.rebuild(mix, weights)
    head = head_task(check_mix(mix, bundle.tasks))  # in the bundle's order, as the server sees it
    weights.update(bundle.task_specific(head))
    weights["pool.bn.num_batches_tracked"] = base["pool.bn.num_batches_tracked"]
    net = build(CLASSES[head])
    net.load_state_dict({n: torch.from_numpy(np.asarray(a)) for n, a in weights.items()}, strict=True)
    with torch.no_grad():
        return net(torch.from_numpy(np.load(str(d / "ids.npy")))).numpy()


def test_one_graph_serves_every_task_of_the_example_each_at_its_own_size_like_torch(example):
    from tvswitch.export.example import TASKS

    d = example
    outs = {}
    for task in TASKS:
        assert main(["run", str(d / "tasks.tvs"), "--model", str(d / "tasks.onnx"), "--base",
                     str(d / "base.safetensors"), "--task", task, "--input", str(d / "ids.npy"),
                     "-o", str(d / (task + "_out.npy"))]) == 0
        outs[task] = np.load(str(d / (task + "_out.npy")))
        np.testing.assert_allclose(outs[task], _example_reference(d, {task: 1.0}), rtol=1e-4, atol=1e-5)
    assert [o.shape for o in outs.values()] == [(2, 3), (2, 4), (2, 5)]
    for module in ("detect", "line"):  # the torch engine lays any head out for every task
        assert main(["run", str(d / "tasks.tvs"), "--engine", "torch", "--module",
                     "tvswitch.export.example_net:" + module, "--base", str(d / "base.safetensors"), "--task",
                     "gauge", "--input", "ids=" + str(d / "ids.npy"), "-o", str(d / "gauge_torch.npy")]) == 0
        np.testing.assert_allclose(np.load(str(d / "gauge_torch.npy")), outs["gauge"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("slots", [1, 2])
def test_one_server_switches_through_the_tasks_and_mixes_answering_with_the_heaviest_tasks_head(example, slots):
    from tvswitch.runtime.checkpoint import read_safetensors
    from tvswitch.runtime.server import serve_bundle

    d = example
    server = serve_bundle(str(d / "tasks.tvs"), model=str(d / "tasks.onnx"), slots=slots, threads=1,
                          base=read_safetensors(str(d / "base.safetensors")))
    assert server.servable == ["detect", "gauge", "line"]
    feeds = {"ids": np.load(str(d / "ids.npy"))}
    for mix in ({"line": 1.0}, {"detect": 1.0}, {"gauge": 0.6, "detect": 0.4}, {"line": 0.5, "gauge": 0.5},
                {"gauge": 1.0}, {"detect": 0.3, "line": 0.3, "gauge": 0.3}):
        server.switch(mix)
        got = server.infer(feeds)["output"]
        want = _example_reference(d, mix)
        assert got.shape == want.shape  # a tie goes to the task first in the bundle: gauge, then detect
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_one_graph_holds_no_weights_and_asks_for_the_base(example, capsys):
    import onnx

    d = example
    assert os.path.getsize(str(d / "tasks.onnx")) * 20 < os.path.getsize(str(d / "detect.onnx"))
    graph = onnx.load(str(d / "tasks.onnx"))
    assert all(t.data_type == onnx.TensorProto.INT64 for t in graph.graph.initializer)  # shapes and indices only
    r = main_(capsys, "run", d / "tasks.tvs", "--model", d / "tasks.onnx", "--task", "gauge", "--input",
              d / "ids.npy", "-o", d / "no_base.npy")
    _one_line_exit_2(r)
    assert "carries no weights" in r.stderr and "--base" in r.stderr and not (d / "no_base.npy").exists()


def test_a_graph_that_fits_none_of_the_bundles_tasks_is_refused_never_served(example, capsys):
    d = example
    assert main(["export", "--base", str(d / "base.safetensors"), "--task", "gauge=%s" % (d / "gauge.safetensors"),
                 "--task", "line=%s" % (d / "line.safetensors"), "-o", str(d / "two.tvs"), "--no-progress"]) == 0
    r = main_(capsys, "run", d / "two.tvs", "--model", d / "detect.onnx", "--task", "gauge", "--input",
              d / "ids.npy", "-o", d / "none.npy")
    _one_line_exit_2(r)
    assert "serves none of the tasks of" in r.stderr and "'head." in r.stderr and not (d / "none.npy").exists()


def test_a_task_whose_head_does_not_fit_the_graph_is_refused_at_switch_and_the_old_one_serves(example, capsys):
    from tvswitch.runtime.checkpoint import read_safetensors
    from tvswitch.runtime.server import serve_bundle

    d = example
    r = main_(capsys, "run", d / "tasks.tvs", "--model", d / "detect.onnx", "--base", d / "base.safetensors",
              "--task", "gauge", "--input", d / "ids.npy", "-o", d / "gauge_on_detect.npy")  # one head's graph
    _one_line_exit_2(r)
    assert "task 'gauge' cannot be served by this network: its tensor 'head." in r.stderr
    assert "is [4" in r.stderr and "the network's weight is [3" in r.stderr
    assert not (d / "gauge_on_detect.npy").exists()
    server = serve_bundle(str(d / "tasks.tvs"), model=str(d / "detect.onnx"),
                          base=read_safetensors(str(d / "base.safetensors")), threads=1)
    assert server.servable == ["detect"] and server.mix == {"detect": 1.0}
    feeds = {"ids": np.load(str(d / "ids.npy"))}
    before = server.infer(feeds)["output"]
    with pytest.raises(TvswitchError, match="'line' cannot be served"):
        server.switch({"line": 1.0})
    with pytest.raises(TvswitchError, match="'gauge' cannot be served"):
        server.switch({"gauge": 0.6, "detect": 0.4})  # a mix is served with its heaviest task's head
    assert server.mix == {"detect": 1.0}
    np.testing.assert_array_equal(server.infer(feeds)["output"], before)
    server.switch({"detect": 0.6, "gauge": 0.4})  # detect's head: fits


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_token_ids_of_the_wrong_dtype_or_rank_are_refused_in_one_line(example, capsys, engine):
    d = example
    ids = np.load(str(d / "ids.npy"))
    np.save(str(d / "ids_float.npy"), ids.astype(np.float32))
    np.save(str(d / "ids_3d.npy"), ids[None])
    flags = ["--engine", "torch", "--module", "tvswitch.export.example_net:detect"] if engine == "torch" else []
    for bad, given in (("ids_float.npy", "float32[2, 16]"), ("ids_3d.npy", "int64[1, 2, 16]")):
        r = main_(capsys, "run", d / "tasks.tvs", "--model", d / "tasks.onnx", "--base", d / "base.safetensors",
                  *flags, "--task", "detect", "--input", "ids=" + str(d / bad), "-o", d / "bad.npy")
        _one_line_exit_2(r)
        assert ("input 'ids' is " if engine == "onnxruntime" else "(ids ") + given in r.stderr, r.stderr
        if engine == "onnxruntime":
            assert "the network takes int64" in r.stderr
    r = main_(capsys, "export-onnx", "--module", "tvswitch.export.example_net:detect", "--input",
              "ids=" + str(d / "ids_float.npy"), "-o", d / "bad.onnx")
    _one_line_exit_2(r)
    assert "(ids float32[2, 16])" in r.stderr and "Long" in r.stderr and not (d / "bad.onnx").exists()
