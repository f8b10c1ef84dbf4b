"""The ONNX Runtime engine's constants: what no task changes is a constant of the session.

A bundle of partial fine-tunes (the tasks change the attention projections only, as
LoRA adapters do) leaves most tensors at the base in every mix (``Bundle.base_only``).
``serve_bundle`` serves those as constants of the session, from the rebuild's own base
arrays, and keeps slots for the rest only; each switch must still answer as torch does
with the rebuilt weights, and every refusal must come before anything is served wrong.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the engine is checked against torch (the torch extra)")
pytest.importorskip("onnx", reason="the graphs are exported with onnx (the onnx extra)")
pytest.importorskip("onnxruntime", reason="the engine needs onnxruntime (the onnx extra)")

from tvswitch.errors import TvswitchError
from tvswitch.export.onnx_export import export_onnx, export_onnx_for_bundle
from tvswitch.runtime.engines.onnxruntime import OnnxRuntimeEngine, session_options_for
from tvswitch.runtime.rebuild import CpuRebuilder
from tvswitch.runtime.server import BundleSource, Server, serve_bundle

ADAPTED = ("q.weight", "v.weight")  # the tensors the tasks change
MIXES = [{"a": 1.0}, {"b": 1.0}, {"a": 0.5, "c": 0.5}, {"c": 1.0}, {"a": 1.0}]


@pytest.fixture(scope="module")
def case(tmp_path_factory, engine_models):
    torch.set_num_threads(1)
    module, inputs, names = engine_models.encoder_case()
    folder = tmp_path_factory.mktemp("partial")
    bundle, base = engine_models.make_bundle(folder, module, only=ADAPTED)
    graph = str(folder / "model.onnx")  # beside the bundle, where serve_bundle looks for it
    export_onnx(module, [inputs[n] for n in names], graph, input_names=names)
    refs = {repr(m): engine_models.torch_reference(module, bundle, base, m, inputs, names) for m in MIXES}
    return dict(module=module, inputs=inputs, names=names, bundle=bundle, base=base, graph=graph, refs=refs,
                folder=folder)


def _answers(server, case):
    out = []
    for mix in MIXES:
        server.switch(mix)
        got = next(iter(server.infer(case["inputs"]).values()))
        np.testing.assert_allclose(got, case["refs"][repr(mix)], rtol=1e-4, atol=1e-5)
        out.append(got)
    assert np.abs(case["refs"][repr(MIXES[0])] - case["refs"][repr(MIXES[1])]).max() > 1e-3  # tasks differ
    return out


def test_the_bundle_knows_what_no_task_changes(case):
    bundle = case["bundle"]
    assert bundle.base_only and set(bundle.base_only) == {n for n in bundle.shared_specs if not n.endswith(ADAPTED)}


@pytest.mark.parametrize("given_base", [True, False])
def test_serve_bundle_holds_base_only_tensors_as_constants_and_answers_as_torch(case, given_base):
    """Given the base or reading the graph's own values: the constants are the rebuild's base
    arrays themselves (no second copy), no slot holds them, and every switch answers as torch."""
    server = serve_bundle(case["bundle"].path, model=case["graph"], base=case["base"] if given_base else None,
                          threads=1, slots=2)
    engine, base = server.engine, server.source.rebuilder.base
    assert sorted(engine.constants) == sorted(case["bundle"].base_only)
    assert all(engine.constants[n] is base[n] for n in engine.constants)
    for slot in range(2):
        assert set(engine.buffers(slot)) == {n for n in case["bundle"].shared_specs if n.endswith(ADAPTED)}
    answers = _answers(server, case)
    plain = serve_bundle(case["bundle"].path, model=case["graph"], base=case["base"], threads=1, constants=False)
    assert not plain.engine.constants
    for got, want in zip(answers, _answers(plain, case)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_weight_stripped_graph_takes_its_constants_from_the_base(case, tmp_path):
    """export-onnx --bundle writes no weight values: the constants come from the base given;
    asked to keep the file's values, it has none, so the weights stay inputs; and with no base
    at all the refusal says to give one, as without constants."""
    bundle = case["bundle"]
    stripped = str(tmp_path / "stripped.onnx")
    export_onnx_for_bundle(case["module"], bundle, [case["inputs"][n] for n in case["names"]], stripped,
                           input_names=case["names"])
    server = serve_bundle(bundle.path, model=stripped, base=case["base"], threads=1)
    assert sorted(server.engine.constants) == sorted(bundle.base_only)
    _answers(server, case)
    engine = OnnxRuntimeEngine(stripped, threads=1, constants={bundle.base_only[0]: None})
    assert not engine.constants and bundle.base_only[0] in engine.weight_specs
    with pytest.raises(TvswitchError, match="give the base checkpoint"):
        serve_bundle(bundle.path, model=stripped, threads=1)


def test_a_base_lacking_a_tensor_is_refused_naming_it(case):
    lacking = dict(case["base"])
    name = case["bundle"].base_only[0]
    del lacking[name]
    with pytest.raises(TvswitchError, match=repr(name)):
        serve_bundle(case["bundle"].path, model=case["graph"], base=lacking, threads=1)


def test_a_base_tensor_of_another_shape_is_the_bases_error_not_the_constants(case):
    wrong = dict(case["base"])
    name = case["bundle"].base_only[0]
    wrong[name] = np.zeros(wrong[name].size + 1, np.float32)
    for constants in (True, False):
        with pytest.raises(TvswitchError, match="the base: tensor %r is float32\\[%d\\], bundle .* expects"
                           % (name, wrong[name].size)):
            serve_bundle(case["bundle"].path, model=case["graph"], base=wrong, threads=1, constants=constants)
    other = {n: a + np.float32(1.0) if np.issubdtype(a.dtype, np.floating) else a for n, a in case["base"].items()}
    with pytest.raises(TvswitchError, match="^other.safetensors is not the base bundle"):
        serve_bundle(case["bundle"].path, model=case["graph"], base=other, base_label="other.safetensors", threads=1)
    with pytest.raises(TvswitchError, match="is a folder: give a safetensors file"):
        serve_bundle(case["bundle"].path, model=case["graph"], base=os.path.dirname(case["bundle"].path), threads=1)


def test_the_slots_hold_what_a_fresh_rebuild_writes(case):
    """After switches through the server (skipping what did not change), each slot array is byte
    for byte a fresh rebuild of the mix served."""
    server = serve_bundle(case["bundle"].path, model=case["graph"], base=case["base"], threads=1)
    fresh = CpuRebuilder(case["bundle"], case["base"])
    want = fresh.allocate()
    for mix in MIXES:
        server.switch(mix)
        fresh.rebuild(mix, want)
        for name, a in server.engine.buffers().items():
            if name in want:
                assert a.tobytes() == want[name].tobytes(), (mix, name)


def test_constants_are_float_weights(case):
    name = case["bundle"].base_only[0]
    with pytest.raises(TvswitchError, match="constants are float weights"):
        OnnxRuntimeEngine(case["graph"], threads=1,
                          constants={name: np.zeros(case["base"][name].shape, np.int32)})


def test_a_rebuild_leaves_out_only_base_only_tensors(case):
    bundle = case["bundle"]
    rebuilder = CpuRebuilder(bundle, case["base"])
    whole = rebuilder.allocate()
    rebuilder.rebuild({"a": 0.5, "b": 0.5}, whole)
    adapted = {n: np.full_like(a, np.nan) for n, a in whole.items() if n not in bundle.base_only}
    rebuilder.rebuild({"a": 0.5, "b": 0.5}, adapted)
    for name, a in adapted.items():
        assert a.tobytes() == whole[name].tobytes(), name
    changed = next(n for n in adapted)
    with pytest.raises(TvswitchError, match="lack tensor %r" % changed):
        rebuilder.rebuild({"a": 1.0}, {n: a for n, a in adapted.items() if n != changed})
    # what it moves: base, payloads and output of the tensors it writes, the others not at all
    mix = {"a": 0.5, "b": 0.5}
    left_out = sum(2 * whole[n].nbytes for n in bundle.base_only)  # a base-only tensor: base read, output write
    assert rebuilder.bytes_moved(mix, leaving_out=bundle.base_only) == rebuilder.bytes_moved(mix) - left_out
    with pytest.raises(TvswitchError, match="tensor %r is not base-only" % changed):
        rebuilder.bytes_moved(mix, leaving_out=[changed])


def test_a_constant_a_task_changes_is_refused_before_serving(case):
    bundle = case["bundle"]
    changed = next(n for n in bundle.shared_specs if n not in bundle.base_only)
    engine = OnnxRuntimeEngine(case["graph"], threads=1, constants={changed: case["base"][changed]})
    with pytest.raises(TvswitchError, match="holds %r as constants, but tasks of .* change them" % changed):
        BundleSource(bundle, engine, case["base"], threads=1)


def test_a_constant_that_is_not_the_base_is_refused(case):
    bundle = case["bundle"]
    name = bundle.base_only[0]
    other = case["base"][name].copy()
    other.flat[0] += 1.0
    engine = OnnxRuntimeEngine(case["graph"], threads=1, constants={name: other})
    with pytest.raises(TvswitchError, match="weight %r as a constant whose values are not the base's" % name):
        BundleSource(bundle, engine, case["base"], threads=1)
    same = OnnxRuntimeEngine(case["graph"], threads=1, constants={name: case["base"][name].copy()})
    server = Server(same, BundleSource(bundle, same, case["base"], threads=1), {"a": 1.0})
    np.testing.assert_allclose(next(iter(server.infer(case["inputs"]).values())), case["refs"][repr({"a": 1.0})],
                               rtol=1e-4, atol=1e-5)


def test_session_options_given_with_constants_serve_one_engine(case):
    name = case["bundle"].base_only[0]
    options = session_options_for(1)
    OnnxRuntimeEngine(case["graph"], session_options=options, constants={name: case["base"][name]})
    with pytest.raises(TvswitchError, match="take no constant %r" % name):
        OnnxRuntimeEngine(case["graph"], session_options=options, constants={name: case["base"][name]})


def test_a_constant_of_another_shape_is_refused_naming_it(case):
    name = case["bundle"].base_only[0]
    with pytest.raises(TvswitchError, match="constant weight %r is" % name):
        OnnxRuntimeEngine(case["graph"], threads=1, constants={name: np.zeros(3, np.float32)})
