import numpy as np
import pytest

from tvswitch.errors import TvswitchError
from tvswitch.export.checkpoints import Checkpoint, classify, load_checkpoint


def test_layout_sorts_tensors(checkpoints):
    base, fts = checkpoints
    layout = classify(Checkpoint(base, "base.st"), {t: Checkpoint(f, t + ".st") for t, f in fts.items()}, ["norm.*"])
    assert layout.vectors == ["enc.weight", "enc.bias", "mlp.weight", "half.weight"]
    assert layout.as_is == ["norm.weight", "bn.running_mean"]
    assert layout.fixed == ["bn.num_batches_tracked"]
    assert layout.task_only["a"] == ["head.weight"]


def _pair(base, ft):
    return Checkpoint(base, "base.st"), {"a": Checkpoint(ft, "a.st")}


@pytest.mark.parametrize("edit,message", [
    (lambda ft: ft.pop("enc.bias"), "task 'a' \\(a.st\\) matches 6 of the 7 tensors of base base.st by name .*"
                                    "1 are missing, nearest: 'enc.bias' \\(none near\\)"),
    (lambda ft: ft.update({"enc.weight": np.zeros((29, 37), np.float32)}), "'enc.weight' is float32\\[37, 29\\] in base base.st but float32\\[29, 37\\]"),
    (lambda ft: ft.update({"enc.bias": np.zeros(37, np.float16)}), "'enc.bias' is float32\\[37\\] in base base.st but float16"),
])
def test_mismatches_name_the_tensor_and_both_files(checkpoints, edit, message):
    base, fts = checkpoints
    ft = dict(fts["a"])
    edit(ft)
    with pytest.raises(TvswitchError, match=message):
        classify(*_pair(base, ft), [])


def test_a_non_float_tensor_that_differs_is_refused_but_a_batchnorm_counter_keeps_the_bases(checkpoints, caplog):
    base, fts = checkpoints
    base = dict(base, **{"steps": np.arange(3)})
    ft = dict(fts["a"], **{"steps": np.arange(3) + 1, "bn.num_batches_tracked": np.array(6, np.int64)})
    with pytest.raises(TvswitchError, match="non-float tensor 'steps' differs"):
        classify(*_pair(base, ft), [])
    ft["steps"] = base["steps"]
    with caplog.at_level("INFO", logger="tvswitch.export"):
        layout = classify(*_pair(base, ft), [])
    assert "bn.num_batches_tracked" in layout.fixed and "the base's value is kept" in caplog.text


def test_torch_files_load_with_weights_only(tmp_path, checkpoints):
    torch = pytest.importorskip("torch")
    base, _ = checkpoints
    path = tmp_path / "base.pt"
    torch.save({k: torch.from_numpy(v) for k, v in base.items()}, path)
    ck = load_checkpoint(str(path))
    assert set(ck.tensors) == set(base)
    assert np.array_equal(ck.tensors["enc.weight"], base["enc.weight"])


def test_pickled_objects_are_refused(tmp_path):
    torch = pytest.importorskip("torch")

    import argparse

    path = tmp_path / "evil.pt"  # any class outside torch's allow-list stands for a payload
    torch.save({"w": torch.zeros(2), "obj": argparse.Namespace(run="code")}, path)
    with pytest.raises(TvswitchError) as err:
        load_checkpoint(str(path))
    message = str(err.value)
    assert "evil.pt: holds a pickled argparse.Namespace" in message
    assert "\x1b" not in message and "\n" not in message and message.endswith("safetensors file")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(TvswitchError, match="garbage.pt: not a loadable torch state_dict") as err:
        load_checkpoint(str(garbage))
    assert "\n" not in str(err.value) and "weights_only` set to `False" not in str(err.value)


@pytest.mark.parametrize("where", ["base", "task", "head"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_naming_tensor_and_file(tmp_path, checkpoints, where, bad):
    from safetensors.numpy import save_file

    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints
    base, ft = dict(base), dict(fts["a"])
    name = {"base": "enc.weight", "task": "bn.running_mean", "head": "head.weight"}[where]
    target = base if where == "base" else ft
    target[name] = target[name].copy()
    target[name].flat[3] = bad
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "a.safetensors"))
    with pytest.raises(TvswitchError) as err:
        export_bundle(str(tmp_path / "base.safetensors"), {"a": str(tmp_path / "a.safetensors")},
                      str(tmp_path / "out.tvs"))
    file = "base.safetensors" if where == "base" else "a.safetensors"
    assert "%r" % name in str(err.value) and file in str(err.value) and "NaN/inf" in str(err.value)
    assert not (tmp_path / "out.tvs").exists()


def test_quantize_refuses_non_finite_values():
    from tvswitch.export.quantize import quantize

    with pytest.raises(TvswitchError, match="NaN/inf"):
        quantize(np.array([0.0, np.nan, 1.0]), 4, 3)


def test_zero_d_tensors_stay_zero_d(tmp_path):
    """A torch BatchNorm's num_batches_tracked is 0-d: read, fingerprinted (FORMAT.md section 2)
    and written back with shape (), not (1,)."""
    torch = pytest.importorskip("torch")
    import hashlib

    from safetensors.torch import save_file

    from tvswitch.cli import main
    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.checkpoint import read_safetensors

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5))
    base = {k: v.clone() for k, v in net.state_dict().items()}
    assert base["1.num_batches_tracked"].shape == ()
    save_file(base, str(tmp_path / "base.safetensors"))
    ft = {k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in base.items()}
    save_file(ft, str(tmp_path / "ft.safetensors"))
    bundle = export_bundle(str(tmp_path / "base.safetensors"), {"t": str(tmp_path / "ft.safetensors")},
                           str(tmp_path / "b.tvs"), name="tvq")
    assert bundle.manifest["base"]["other"] == ["1.num_batches_tracked"]
    # FORMAT.md section 2, by hand: name|dtype.str|shape as Python's list repr, then the bytes
    h = hashlib.sha256()
    names = sorted(list(bundle.manifest["tensors"]) + bundle.manifest["base"]["other"])
    for name in names:
        a = base[name].numpy()
        h.update(("%s|%s|%s\n" % (name, a.dtype.str, list(a.shape))).encode())
        h.update(a.tobytes())
    assert "1.num_batches_tracked|<i8|[]\n" in "".join(
        "%s|%s|%s\n" % (n, base[n].numpy().dtype.str, list(base[n].shape)) for n in names)
    assert bundle.base_fingerprint == "sha256:" + h.hexdigest()
    out = tmp_path / "out.safetensors"
    assert main(["rebuild", str(bundle.path), "--task", "t", "--base", str(tmp_path / "base.safetensors"),
                 "-o", str(out)]) == 0
    got = read_safetensors(str(out))
    assert got["1.num_batches_tracked"].shape == () and int(got["1.num_batches_tracked"]) == 0
    assert set(got) == set(base)


def test_modules_mark_their_buffers(checkpoints):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ck = load_checkpoint(net)
    assert "1.running_mean" in ck.buffers and "1.num_batches_tracked" in ck.tensors
    layout = classify(ck, {"t": load_checkpoint(net)}, [])
    assert "1.running_var" in layout.as_is and "0.weight" in layout.vectors
    assert layout.fixed == ["1.num_batches_tracked"]


def test_a_base_module_no_task_has_is_left_out_and_one_some_tasks_lack_is_refused(tmp_path, checkpoints, caplog):
    """A backbone saved alone keeps its pooler, which the tasks' networks do not have."""
    import logging

    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints
    pooled = dict(base, **{"pooler.dense.weight": np.ones((4, 4), np.float32), "pooler.dense.bias": np.ones(4, np.float32)})
    for ft in fts.values():  # a new head of the pooler's shape (RoBERTa's classifier.dense): not a renaming
        ft["classifier.dense.weight"] = np.random.default_rng(0).normal(0, 0.02, (4, 4)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="tvswitch"):
        bundle = export_bundle(pooled, fts, str(tmp_path / "p.tvs"), name="tvq", bits=4)
    assert "pooler.dense.weight" not in bundle.shared_specs and "no task has, left out" in caplog.text
    fts["a"]["pooler.dense.weight"] = np.ones((4, 4), np.float32)  # one task has it, the others lack it
    with pytest.raises(TvswitchError, match="task 'b' .* missing"):
        export_bundle(pooled, fts, str(tmp_path / "q.tvs"), name="tvq", bits=4)


def test_task_specific_heads_may_differ_in_shape_from_task_to_task(tmp_path, checkpoints):
    """--task-specific 'head.*' over a base head of 3 outputs and tasks of 3, 4 and 5."""
    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints
    base = dict(base, **{"head.weight": fts["a"]["head.weight"] + np.float32(0.5)})
    bundle = export_bundle(base, fts, str(tmp_path / "h.tvs"), name="tvq", bits=4, task_specific=["head.*"])
    assert [bundle.task_specific(t)["head.weight"].shape[0] for t in "abc"] == [3, 4, 5]
    assert "head.weight" not in bundle.shared_specs


def test_a_task_tensor_that_copies_one_of_its_own_is_a_tie_not_a_head(tmp_path, checkpoints, caplog):
    """torch.save of a tied network keeps both names (GPT-2's lm_head.weight beside wte)."""
    import logging

    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints
    fts["a"]["out.weight"] = fts["a"]["mlp.weight"].copy()
    fts["b"]["out.weight"] = fts["b"]["mlp.weight"] + np.float32(1.0)  # not a copy: b's own tensor
    with caplog.at_level(logging.INFO, logger="tvswitch"):
        bundle = export_bundle(base, fts, str(tmp_path / "t.tvs"), name="tvq", bits=4)
    assert "out.weight" not in bundle.task_specific("a") and "copy of mlp.weight (tied weights)" in caplog.text
    assert "out.weight" in bundle.task_specific("b")


def test_the_bundle_takes_the_names_of_the_whole_network_whatever_the_task_order(tmp_path, checkpoints):
    """A bare backbone task first, the classification network (prefixed names, a head) second:
    the bundle is named as the network a graph is exported from."""
    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints
    bare = {n: a for n, a in fts["a"].items() if n != "head.weight"}
    whole = {("head.weight" if n == "head.weight" else "model." + n): a for n, a in fts["b"].items()}
    bundle = export_bundle(base, {"raw": bare, "cls": whole}, str(tmp_path / "o.tvs"), name="tvq", bits=4)
    assert "model.enc.weight" in bundle.shared_specs and "enc.weight" not in bundle.shared_specs
    assert list(bundle.task_specific("cls")) == ["head.weight"]


def test_add_task_drops_a_tied_copy_and_warns_where_the_bundle_routes_and_remove_task_does_not(
        tmp_path, checkpoints, caplog):
    import logging

    from tvswitch.export.edit import add_task, remove_task
    from tvswitch.export.exporter import export_bundle

    base, fts = checkpoints
    queries = {t: np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32) for t in "abc"}
    bundle = export_bundle(base, fts, str(tmp_path / "r.tvs"), name="tvq", bits=4, query_sets=queries,
                           router={"output": "out", "pool": "none"})
    grown = dict(fts["a"], **{"out.weight": fts["a"]["mlp.weight"].copy()})  # a tie torch.save kept
    with caplog.at_level(logging.WARNING, logger="tvswitch"):
        added = add_task(bundle.path, "d", grown, base=base)
    assert "out.weight" not in added.task_specific("d")
    assert "task 'd' has no Auto-Switch query sets" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tvswitch"):
        remove_task(added.path, "b")
    assert "query sets" not in caplog.text


def test_one_module_moved_onto_another_is_no_renaming(checkpoints):
    """A prefix change must move most names: classifier.dense -> pooler.dense is two tensors."""
    from tvswitch.export.checkpoints import best_renaming

    names = ["enc.weight", "enc.bias", "mlp.weight", "classifier.dense.weight"]
    assert best_renaming(names, ["enc.weight", "enc.bias", "mlp.weight", "pooler.dense.weight"]) is None
    assert best_renaming(["module." + n for n in names], names).describe() == "'module.' stripped"
