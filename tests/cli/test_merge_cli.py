"""tvswitch merge from the command line: AdaMerging learned end to end through a torch module,
and the refusals (non-finite numbers, flags the method would ignore, an output it cannot write)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tvswitch.cli import main

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def conv(tmp_path_factory, engine_models):
    """A conv net bundle (BatchNorm statistics stored as-is, a head per task), its base, a
    factory file and unlabelled inputs per task (each task's images around its own mean)."""
    from safetensors.numpy import save_file

    M = engine_models
    folder = tmp_path_factory.mktemp("merge")
    module, _, _ = M.conv_case()
    bundle, base = M.make_bundle(folder, module, ("head.",))
    save_file(base, str(folder / "base.safetensors"))
    M.write_factory_file(folder / "net.py", """
        def build():
            return M.ConvBN()

        def wider():  # another head size than the bundle's: each task's head runs at its own
            return M.ConvBN(classes=7)
    """)
    rng = np.random.default_rng(0)
    inputs = {}
    for i, t in enumerate(bundle.tasks):
        x = (rng.normal(size=(12, 3, 8, 8)) + i - 1).astype(np.float32)
        np.save(str(folder / ("x_%s.npy" % t)), x)
        inputs[t] = [x]
    return dict(folder=folder, M=M, bundle=bundle, base=base, inputs=inputs)


def _merge(conv, *args):
    f = conv["folder"]
    return main(["merge", str(f / "model.tvs"), "--base", str(f / "base.safetensors"), *map(str, args)])


def _learn_flags(conv):
    f = conv["folder"]
    flags = ["--method", "adamerging", "--module", str(f / "net.py") + ":build"]
    for t in conv["bundle"].tasks:
        flags += ["--inputs", "%s=%s" % (t, f / ("x_%s.npy" % t))]
    return flags


def test_bundle_forward_serves_each_task_with_its_own_head_and_statistics(conv):
    """The logits AdaMerging minimises the entropy of are the task's as the device serves it."""
    from tvswitch.export import merge
    from tvswitch.export.adamerging import bundle_forward

    M, bundle, base = conv["M"], conv["bundle"], conv["base"]
    taus = merge.task_vectors_from_bundle(bundle, base)
    names = merge.shared_names(taus)
    fixed = {n: base[n] for n in bundle.manifest["base"]["other"]}
    forward = bundle_forward(M.ConvBN().eval(), bundle, names, fixed)
    x = torch.from_numpy(conv["inputs"]["b"][0])
    params = {n: torch.from_numpy(base[n] + taus["b"][n]) for n in names}
    got = forward(params, "b", (x,))
    want = M.torch_reference(M.ConvBN().eval(), bundle, base, {"b": 1.0}, {"x": x.numpy()}, ["x"])
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_merge_learns_adamerging_coefficients_and_writes_the_merged_model(conv, capsys, granularity):
    from safetensors.numpy import load_file

    from tvswitch.export import merge
    from tvswitch.export.adamerging import learn_from_bundle

    f, bundle, base = conv["folder"], conv["bundle"], conv["base"]
    out, coeffs = f / ("m-%s.safetensors" % granularity), f / ("c-%s.json" % granularity)
    assert _merge(conv, *_learn_flags(conv), "--granularity", granularity, "--steps", 6, "--lr", 0.05,
                  "--batch", 4, "--coefficients-out", coeffs, "-o", out) == 0
    printed = capsys.readouterr()
    assert "adamerging (%s-wise, 6 steps, entropy" % granularity in printed.out
    assert "give --task NAME" in printed.err  # no --task: the heads are left out, and it says so

    # The same learning through the Python API: the CLI is a thin layer over it.
    want = learn_from_bundle(bundle, conv["M"].ConvBN(), conv["inputs"], base, granularity=granularity, steps=6,
                             lr=0.05, batch=4)
    assert want.entropy[-1] < want.entropy[0]
    got = merge.Coefficients.load(str(coeffs))
    assert got.tasks == list(bundle.tasks) and got.values.shape == (3, 1 if granularity == "task" else len(got.names))
    np.testing.assert_allclose(got.values, want.values, rtol=1e-6)
    assert not np.allclose(got.values, 0.3)  # it moved from the start

    taus = merge.task_vectors_from_bundle(bundle, base)
    merged = load_file(str(out))
    for n, a in merge.apply_delta({n: base[n] for n in got.names}, got.delta(taus)).items():
        np.testing.assert_allclose(merged[n], a, rtol=1e-5, atol=1e-6, err_msg=n)
    assert not [n for n in merged if n.startswith("head.")]
    # the saved coefficients apply again through --coefficients, with a task's head this time
    again = f / "again.safetensors"
    assert _merge(conv, "--method", "adamerging", "--coefficients", coeffs, "--task", "c", "-o", again) == 0
    again = load_file(str(again))
    for n in got.names:
        np.testing.assert_array_equal(again[n], merged[n])
    np.testing.assert_array_equal(again["head.weight"], bundle.task_specific("c")["head.weight"])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tvswitch", *map(str, args)], capture_output=True, text=True)


def _refused(conv, args, message):
    f = conv["folder"]
    before = sorted(os.listdir(str(f)))
    r = cli("merge", f / "model.tvs", "--base", f / "base.safetensors", *args)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr, r.stderr
    assert sorted(os.listdir(str(f))) == before  # nothing written


@pytest.mark.parametrize("args,message", [
    (["--method", "task_arithmetic", "--lambda", "nan"], "--lambda must be a finite number, got nan"),
    (["--method", "ties", "--lambda", "inf"], "--lambda must be a finite number, got inf"),
    (["--method", "ties", "--lambda", "1", "--keep", "1e-9"], "--keep: keep ratio 1e-09 keeps none of the"),
    (["--method", "ties", "--keep", "nan"], "--keep must be in (0, 1]"),
    (["--method", "average", "--lambda", "0.5"], "--lambda does not apply to --method average"),
    (["--method", "emr", "--task", "a", "--lambda", "0.5"], "--lambda does not apply to --method emr"),
    (["--method", "task_arithmetic", "--keep", "0.5"], "--keep does not apply to --method task_arithmetic"),
    (["--method", "ties", "--steps", "5"], "--steps does not apply to --method ties"),
    (["--method", "ties", "--normalize"], "--normalize does not apply to --method ties"),
    (["--method", "adamerging"], "needs --coefficients FILE (apply saved coefficients) or --module"),
    (["--method", "adamerging", "--coefficients", "c.json", "--steps", "3"], "--steps learns coefficients"),
])
def test_merge_refuses_with_one_line(conv, args, message):
    _refused(conv, args + ["-o", conv["folder"] / "bad.safetensors"], message)


def test_merge_refuses_non_finite_coefficients_naming_the_file(conv):
    f = conv["folder"]
    (f / "nan.json").write_text(json.dumps({"tasks": ["a", "b", "c"], "names": ["x"],
                                            "coefficients": [[0.3], [float("nan")], [0.3]]}))
    _refused(conv, ["--method", "adamerging", "--coefficients", f / "nan.json", "-o", f / "bad.safetensors"],
             "nan.json: the coefficient of task 'b' must be a finite number, got nan")


@pytest.mark.parametrize("where", [".", "missing/m.safetensors"])
def test_merge_refuses_an_output_it_cannot_write(conv, where):
    f = conv["folder"]
    _refused(conv, ["--method", "average", "-o", f / where], str(f / where))


def test_merge_learning_refuses_what_does_not_fit(conv):
    f = conv["folder"]
    flags = _learn_flags(conv)
    _refused(conv, flags[:-2] + ["--steps", "1", "-o", f / "bad.safetensors"],
             "no unlabelled inputs for task 'c'")
    wider = [a.replace(":build", ":wider") for a in flags]  # heads run at each task's own shape: any head size does
    assert _merge(conv, *wider, "--steps", "1", "-o", f / "wider.safetensors") == 0
    _refused(conv, flags + ["--lr", "0", "-o", f / "bad.safetensors"], "--lr must be > 0")
    _refused(conv, flags + ["--coefficients-out", f / "nowhere" / "c.json", "-o", f / "bad.safetensors"],
             "--coefficients-out")


def test_adamerging_learns_over_tasks_whose_heads_differ(tmp_path, capsys):
    """The built-in example's heads have 3, 4 and 5 classes: each task's entropy is taken through
    its own head at its own shape, with one module of any head size."""
    d = tmp_path / "demo"
    assert main(["example", str(d)]) == 0
    tasks = ("detect", "gauge", "line")
    assert main(["export", "--base", str(d / "base.safetensors"), "-o", str(d / "tasks.tvs"), "--no-progress",
                 *[a for t in tasks for a in ("--task", "%s=%s" % (t, d / (t + ".safetensors")))]]) == 0
    ids = np.random.default_rng(0).integers(0, 1000, size=(8, 16))
    np.save(str(d / "many.npy"), ids)
    assert main(["merge", str(d / "tasks.tvs"), "--base", str(d / "base.safetensors"), "--method", "adamerging",
                 "--module", "tvswitch.export.example_net:detect", *[a for t in tasks for a in
                                                                      ("--inputs", "%s=%s" % (t, d / "many.npy"))],
                 "--steps", "3", "--batch", "4", "--task", "line", "-o", str(d / "merged.safetensors")]) == 0
    assert "adamerging (layer-wise, 3 steps" in capsys.readouterr().out
