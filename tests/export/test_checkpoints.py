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
    (lambda ft: ft.pop("enc.bias"), "'enc.bias' of base base.st is missing from task 'a' \\(a.st\\)"),
    (lambda ft: ft.update({"enc.weight": np.zeros((29, 37), np.float32)}), "'enc.weight' is float32\\[37, 29\\] in base base.st but float32\\[29, 37\\]"),
    (lambda ft: ft.update({"enc.bias": np.zeros(37, np.float16)}), "'enc.bias' is float32\\[37\\] in base base.st but float16"),
    (lambda ft: ft.update({"bn.num_batches_tracked": np.array(6, np.int64)}), "non-float tensor 'bn.num_batches_tracked' differs"),
])
def test_mismatches_name_the_tensor_and_both_files(checkpoints, edit, message):
    base, fts = checkpoints
    ft = dict(fts["a"])
    edit(ft)
    with pytest.raises(TvswitchError, match=message):
        classify(*_pair(base, ft), [])


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
    with pytest.raises(TvswitchError, match="evil.pt: not a loadable torch state_dict"):
        load_checkpoint(str(path))


def test_modules_mark_their_buffers(checkpoints):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ck = load_checkpoint(net)
    assert "1.running_mean" in ck.buffers and "1.num_batches_tracked" in ck.tensors
    layout = classify(ck, {"t": load_checkpoint(net)}, [])
    assert "1.running_var" in layout.as_is and "0.weight" in layout.vectors
    assert layout.fixed == ["1.num_batches_tracked"]
