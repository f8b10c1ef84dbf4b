"""Heads of different shapes on one engine: padding, the cut, and the argument that padding changes nothing."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvswitch.errors import TvswitchError
from tvswitch.runtime.heads import HeadCut, cut_outputs, fits, output_cut, pad, padded_shapes, layout_heads


def test_padded_shapes_take_the_largest_size_along_each_axis_and_refuse_other_ranks():
    shapes = padded_shapes({"a": {"w": (3, 8), "b": (3,)}, "b": {"w": (5, 6), "b": (5,)}, "c": {}})
    assert shapes == {"w": (5, 8), "b": (5,)}
    with pytest.raises(TvswitchError, match="'w' is \\[3\\] in task 'b' but \\[3, 8\\] in task 'a'"):
        padded_shapes({"a": {"w": (3, 8)}, "b": {"w": (3,)}})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3).flatmap(
    lambda small: st.tuples(st.just(tuple(small)), st.tuples(*[st.integers(0, 3) for _ in small]))))
def test_pad_puts_the_tensor_at_the_origin_corner_and_zeros_elsewhere(case):
    small, extra = case
    a = np.random.default_rng(0).normal(size=small).astype(np.float32) + 10  # no zero inside
    big = tuple(s + e for s, e in zip(small, extra))
    p = pad(a, big)
    assert p.shape == big and p.dtype == a.dtype
    np.testing.assert_array_equal(p[tuple(slice(0, s) for s in small)], a)
    assert np.count_nonzero(p) == a.size
    cut = output_cut({"y": big}, {"y": small})
    np.testing.assert_array_equal(cut_outputs({"y": p}, cut)["y"], a)


def test_pad_refuses_what_does_not_fit():
    assert fits((3, 4), (3, 5)) and not fits((3, 4), (2, 5)) and not fits((3,), (3, 1))
    with pytest.raises(TvswitchError, match="does not fit"):
        pad(np.ones((4, 2)), (3, 2))


def test_output_cut_names_only_the_axes_that_shrink_and_refuses_growth():
    assert output_cut({"logits": (2, 5), "features": (2, 8)}, {"logits": (2, 3), "features": (2, 8)}) == {
        "logits": (None, 3)}
    with pytest.raises(TvswitchError, match="must only lengthen"):
        output_cut({"y": (2, 3)}, {"y": (2, 4)})


def test_plan_heads_serves_exact_heads_and_recorded_cuts_and_names_every_misfit():
    w = np.ones((3, 4), np.float32)
    tasks = {"exact": {"head.w": np.ones((5, 4))}, "cut": {"head.w": w}, "unknown": {"head.w": np.ones((2, 4))},
             "big": {"head.w": np.ones((6, 4))}, "none": {}}
    plan = layout_heads(tasks, {"head.w": ((5, 4), np.float16)}, [HeadCut({"head.w": (3, 4)}, {"y": (None, 3)})])
    assert plan.names == ["head.w"]
    assert plan.cuts["exact"] is None and plan.cuts["cut"] == {"y": (None, 3)}
    assert plan.padded["cut"]["head.w"].dtype == np.float16 and plan.padded["cut"]["head.w"].shape == (5, 4)
    assert set(plan.misfits) == {"unknown", "big", "none"}
    assert "records no output cut" in plan.misfits["unknown"] and "is [6, 4]" in plan.misfits["big"]
    assert "has no tensor 'head.w'" in plan.misfits["none"]
    with pytest.raises(TvswitchError, match="task 'big' cannot be served by this network"):
        plan.check("big")
    plan.check("cut")


# ---- the argument, on networks: padded and cut outputs equal the network at each head's own shape ----

torch = pytest.importorskip("torch", reason="the heads of a network are laid out with torch (pip install torch)")


class Trunk(torch.nn.Module):
    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = head


class LinearNet(Trunk):
    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class ConvNet(Trunk):
    """A dense head: per-pixel classes, padded along the channel axis of a 4-D output."""

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class SoftmaxNet(LinearNet):
    def forward(self, x):
        return torch.softmax(super().forward(x), dim=-1)


class ReshapeNet(LinearNet):
    def forward(self, x):
        return super().forward(x).reshape(-1, 3)


def mlp(hidden: int, classes: int):
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Sigmoid(), torch.nn.Linear(hidden, classes))


NETS = {
    "linear": (LinearNet, lambda c: torch.nn.Linear(8, c), (3, 5, 2)),
    # sigmoid(0) = 0.5: the padded hidden units are not zero, the zero columns after them are what cancels them
    "mlp": (LinearNet, lambda hc: mlp(*hc), ((6, 3), (4, 5), (2, 2))),
    "conv": (ConvNet, lambda c: torch.nn.Conv2d(8, c, 1), (3, 5, 2)),
}


def task_heads(kind, seed=0):
    net_cls, head, sizes = NETS[kind]
    torch.manual_seed(seed)
    heads = {}
    for i, size in enumerate(sizes):
        module = net_cls(head(size))
        heads["t%d" % i] = {n: t.detach().numpy().copy() for n, t in module.state_dict().items() if n.startswith("head.")}
    return net_cls, head, sizes, heads


@pytest.mark.parametrize("kind", list(NETS))
def test_padding_every_head_changes_no_tasks_answer(kind):
    from tvswitch.runtime.engines.torch_engine import fit_heads

    net_cls, head, sizes, heads = task_heads(kind)
    torch.manual_seed(1)
    module = net_cls(head(sizes[0])).eval()
    trunk = {n: t.clone() for n, t in module.state_dict().items() if not n.startswith("head.")}
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    cuts = fit_heads(module, heads, ["x"], {"x": x})
    padded = padded_shapes({t: {n: a.shape for n, a in h.items()} for t, h in heads.items()})
    assert {n: tuple(t.shape) for n, t in module.state_dict().items() if n in padded} == padded
    smaller = [t for t, h in heads.items() if any(a.shape != padded[n] for n, a in h.items())]
    assert len(cuts) == len(smaller) == (3 if kind == "mlp" else 2)  # a head at the padded shape needs no cut
    plan = layout_heads(heads, {n: (s, np.float32) for n, s in padded.items()}, cuts)
    assert not plan.misfits
    for task, own in heads.items():
        for n, a in plan.padded[task].items():
            module.get_parameter(n).data = torch.from_numpy(a)
        with torch.no_grad():
            got = cut_outputs({"output": module(torch.from_numpy(x)).numpy()}, plan.cuts[task])["output"]
        size = sizes[int(task[1:])]
        reference = net_cls(head(size)).eval()
        reference.load_state_dict(dict(trunk, **{n: torch.from_numpy(a) for n, a in own.items()}))
        with torch.no_grad():
            want = reference(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_network_that_mixes_along_a_padded_axis_is_refused():
    from tvswitch.runtime.engines.torch_engine import fit_heads

    _, head, sizes, heads = task_heads("linear")
    x = np.ones((2, 3, 6, 6), np.float32)
    with pytest.raises(TvswitchError, match="padding the heads changes task 't0'.*softmax over classes"):
        fit_heads(SoftmaxNet(head(3)).eval(), heads, ["x"], {"x": x})
    with pytest.raises(TvswitchError, match="does not run with its task-specific tensors padded to head.bias \\[5\\]"):
        fit_heads(ReshapeNet(head(3)).eval(), heads, ["x"], {"x": x})
    with pytest.raises(TvswitchError, match="heads differ in shape.*give example inputs"):
        fit_heads(LinearNet(head(3)).eval(), heads, ["x"], None)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_one_onnx_graph_serves_every_head_equal_to_the_network_at_its_own_shape(tmp_path, kind):
    """The whole path for a small MLP head and a conv head: bundle, export-onnx --bundle, ONNX Runtime."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'tvswitch[onnx]')")
    from tvswitch.export.exporter import export_bundle
    from tvswitch.export.onnx_export import export_onnx_for_bundle
    from tvswitch.runtime.server import serve_bundle

    net_cls, head, sizes, heads = task_heads(kind)
    torch.manual_seed(1)
    base = {n: t.numpy().copy() for n, t in net_cls(head(sizes[0])).state_dict().items() if not n.startswith("head.")}
    rng = np.random.default_rng(2)
    tasks = {}
    for task, own in heads.items():
        ft = {n: (a + rng.normal(0, 0.01, a.shape)).astype(a.dtype) if a.dtype.kind == "f" else a
              for n, a in base.items()}
        tasks[task] = dict(ft, **own)
    bundle = export_bundle(base, tasks, str(tmp_path / "m.tvs"), name="tvq", bits=8, raw_dtype="float32")
    x = np.random.default_rng(3).normal(size=(2, 3, 6, 6)).astype(np.float32)
    export_onnx_for_bundle(net_cls(head(sizes[1])), bundle, [x], str(tmp_path / "m.onnx"), input_names=["x"])
    server = serve_bundle(bundle, model=str(tmp_path / "m.onnx"), base=base, threads=1)
    from tvswitch.runtime.rebuild import CpuRebuilder

    rebuilder = CpuRebuilder(bundle, base)
    for task in bundle.tasks:
        server.switch({task: 1.0})
        got = server.infer({"x": x})["output"]
        weights = rebuilder.allocate()
        rebuilder.rebuild({task: 1.0}, weights)
        reference = net_cls(head(sizes[int(task[1:])])).eval()
        state = dict(base, **weights, **bundle.task_specific(task))
        reference.load_state_dict({n: torch.from_numpy(np.asarray(a)) for n, a in state.items()})
        with torch.no_grad():
            want = reference(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
