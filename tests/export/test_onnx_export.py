"""ONNX export for serving: weights become inputs named as in the state_dict, whatever torch renamed."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (the onnx extra)")
torch = pytest.importorskip("torch", reason="ONNX export traces with torch (the torch extra)")
pytest.importorskip("onnxruntime", reason="the exported graphs are checked on onnxruntime (the onnx extra)")

from tvswitch.errors import TvswitchError
from tvswitch.export.onnx_export import export_onnx, write_model
from tvswitch.runtime.engines import onnx_graph
from tvswitch.runtime.engines.onnxruntime import OnnxRuntimeEngine


class Block(torch.nn.Module):
    """Linear on a 3-D input (torch stores W.T as ``onnx::MatMul_N``), LayerNorm (all ones at
    init), zero biases, a tied weight, an unused tensor and BatchNorm."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.ln2 = torch.nn.LayerNorm(8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.out = torch.nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight  # tied
        self.unused = torch.nn.Linear(3, 3)
        for lin in (self.up, self.down):
            torch.nn.init.zeros_(lin.bias)

    def forward(self, ids):
        x = self.ln(self.emb(ids))
        x = self.ln2(x + self.down(torch.relu(self.up(x))))
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.out(x)


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2)
    ids = torch.randint(0, 20, (2, 5))
    return m, ids, export_onnx(m, [ids], input_names=["ids"])


def test_every_used_weight_is_an_input_named_as_in_the_state_dict(exported):
    m, _, model = exported
    record = onnx_graph.read_record(model)
    state = m.state_dict()
    expected = {n for n in state if state[n].is_floating_point() and not n.startswith(("unused.", "out."))}
    assert set(record.weights) == expected
    inputs = {i.name for i in model.graph.input}
    assert expected <= inputs
    for name, (shape, dtype) in record.weights.items():
        assert shape == tuple(state[name].shape) and dtype == "float32"
    # equal-valued tensors (ones, zeros) stay separate inputs: no deduplication
    assert {"ln.weight", "ln2.weight", "up.bias", "down.bias"} <= set(record.weights)


def test_renamed_and_transposed_weights_are_mapped_back(exported):
    _, _, model = exported
    record = onnx_graph.read_record(model)
    by_name = {r["name"]: (old, r) for old, r in record.renamed.items()}
    for name in ("up.weight", "down.weight"):
        old, r = by_name[name]
        assert old.startswith("onnx::MatMul") and r["layout"] == "transpose" and r["perm"] == [1, 0]
    assert record.aliases == {"out.weight": "emb.weight"}
    assert set(record.unused) == {"unused.weight", "unused.bias"}
    assert "bn.num_batches_tracked" in record.fixed
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" in ops  # not fused into the neighbouring weights


def test_weights_written_in_place_change_the_output_like_torch(exported):
    m, ids, model = exported
    engine = OnnxRuntimeEngine(model)
    new = {n: (p.detach().numpy() * 1.1 + 0.01).astype(np.float32) for n, p in m.state_dict().items()
           if n in engine.weight_specs}
    for n, a in new.items():
        engine.buffers(0)[n][...] = a
    state = {**m.state_dict(), **{n: torch.from_numpy(a) for n, a in new.items()}}
    state["out.weight"] = state["emb.weight"]  # tied: one input serves both names
    ref = Block()
    ref.load_state_dict(state)
    with torch.no_grad():
        want = ref.eval()(ids).numpy()
    np.testing.assert_allclose(engine.infer({"ids": ids.numpy()})["output"], want, rtol=1e-4, atol=1e-5)


def test_the_module_keeps_its_weights_and_modes(exported):
    m = Block().train()
    m.bn.eval()  # mixed modes, as a wrapper around an eval-mode model has
    before = {n: t.clone() for n, t in m.state_dict().items()}
    export_onnx(m, [torch.randint(0, 20, (2, 5))], verify=False)
    assert m.training and m.up.training and not m.bn.training
    for n, t in m.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_a_weight_computed_inside_forward_fails_verification():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ (self.w * 2.0 + 1.0).t()  # constant folding stores a value computed from w

    with pytest.raises(TvswitchError, match="differs from the module"):
        export_onnx(Scaled(), [torch.randn(2, 4)])


def test_what_torchs_exporter_cannot_do_is_one_error_not_a_traceback(capfd):
    """An operator it has no ONNX form for (its traced graph, printed before it raises, is
    held back), and a dynamic axis the input does not have."""
    class Diff(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.diff(self.lin(x), dim=1)

    capfd.readouterr()
    with pytest.raises(TvswitchError, match="cannot export the module .*'aten::diff'"):
        export_onnx(Diff(), [torch.randn(2, 4)])
    assert "graph" not in capfd.readouterr().out
    with pytest.raises(TvswitchError, match="dynamic axis 5 of 'input': it is 2-D"):
        export_onnx(Diff(), [torch.randn(2, 4)], dynamic_axes={"input": [0, 5]})
    with pytest.raises(TvswitchError, match="dynamic axes for 'ids': no input or output"):
        export_onnx(Diff(), [torch.randn(2, 4)], dynamic_axes={"ids": [0]})


def test_a_users_own_onnx_with_matching_names_is_accepted():
    """No tvswitch record: the weights are found by the bundle's names, initializers or inputs."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc.weight"], ["y"])], "user",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(w, "fc.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    engine = OnnxRuntimeEngine(model, names=["fc.weight", "not.in.graph"])
    assert list(engine.weight_specs) == ["fc.weight"] and engine.input_names == ["x"]
    x = np.ones((1, 2), dtype=np.float32)
    np.testing.assert_array_equal(engine.infer({"x": x})["y"], x @ w)
    engine.buffers(0)["fc.weight"][...] = 2 * w
    np.testing.assert_array_equal(engine.infer({"x": x})["y"], x @ (2 * w))
    with pytest.raises(TvswitchError, match="no switchable weights"):
        OnnxRuntimeEngine(model, names=["other"])


def test_write_model_is_atomic_and_readable(exported, tmp_path):
    _, _, model = exported
    path = tmp_path / "m.onnx"
    write_model(model, str(path))
    assert onnx_graph.read_record(onnx.load(str(path))) == onnx_graph.read_record(model)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_a_transformers_bert_model_exports_with_every_weight_named():
    """The real BertModel code (tiny random config, nothing downloaded), as the MiniLM benchmark uses it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    model = export_onnx(Encoder().eval(), [ids, mask], input_names=["input_ids", "attention_mask"])
    record = onnx_graph.read_record(model)
    floats = [n for n, t in Encoder().state_dict().items() if t.is_floating_point()]
    assert sorted(list(record.weights) + record.unused) == sorted(floats)
    assert sum(r["layout"] == "transpose" for r in record.renamed.values()) == 12  # 6 Linear weights per layer
    engine = OnnxRuntimeEngine(model)
    for name, a in engine.buffers(0).items():
        a *= 1.01
    with torch.no_grad():
        for name, p in bert.named_parameters():
            p.mul_(1.01)
        want = Encoder().eval()(ids, mask).numpy()
    got = engine.infer({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["output"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
