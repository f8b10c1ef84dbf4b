"""A torch module -> an ONNX graph whose switchable weights are inputs named as in its state_dict.

torch's ONNX exporter does not keep weight names: constant folding stores ``W.T`` of a
Linear as a new initializer ``onnx::MatMul_N``, an eval-mode export deduplicates
tensors of equal value (every freshly initialised LayerNorm weight is all ones, every
bias all zeros, and would become one shared initializer), and Conv + BatchNorm are fused
into new weights.  A rebuild writes tensors by state_dict name, so the graph must say
which input is which tensor, in which layout.

How ``export_onnx`` finds out, without relying on exporter internals: during the export
every float tensor of the state_dict temporarily holds distinct random values (a *tag*),
so no two are equal and each initializer of the exported graph can be traced by value
to the tensor it holds, as is, transposed or reshaped.  The graph is then rewritten:
each traced initializer becomes a graph input named by its tensor, in the state_dict's
layout, feeding a Transpose or Reshape node where the exporter had changed the layout
(ONNX Runtime fuses a Transpose into the MatMul it feeds, so this costs no copy per
run).  BatchNorm is exported unfused (``TrainingMode.PRESERVE`` on a module in eval
mode skips the fusion).  The real values go back into the module and into the graph as
each input's default, and the graph is run once with ONNX Runtime against the module on
the example inputs: an initializer computed from weights (which would hold values of the
tags) cannot pass that check.

The record of all this goes into the model's metadata (``runtime.engines.onnx_graph``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import sys
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.files import atomic_write
from tvswitch.runtime.checkpoint import contiguous
from tvswitch.runtime.binding import EngineBinding
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.engines.onnx_graph import WEIGHTS_KEY, WeightRecord, digest, read_record, unread_weights
from tvswitch.runtime.engines.torch_engine import (call_module, default_names, fit_heads, flatten_outputs, set_tensor,
                                                   tied_names)
from tvswitch.runtime.heads import HeadCut, pad

log = logging.getLogger("tvswitch.export")

if TYPE_CHECKING:
    import onnx

#: Default verification tolerance: |ort - torch| <= ATOL + RTOL * max|torch| per output.
ATOL = 1e-4
RTOL = 1e-3


def export_onnx(module: Any, example_inputs: Sequence[Any], out: Optional[str] = None, *,
                input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None,
                dynamic_axes: Optional[Mapping[str, Any]] = None, opset: int = 17, verify: bool = True,
                seed: int = 0, heads: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
                strip: bool = False) -> "onnx.ModelProto":
    """Export ``module`` for serving; write it to ``out`` (atomically) if given; return the ModelProto.

    ``example_inputs`` are tensors or arrays in forward's order.  ``dynamic_axes`` as in
    ``torch.onnx.export``; by default axis 0 of every input and output is dynamic (batch).
    ``verify`` runs the graph in ONNX Runtime against the module on the example inputs.

    ``heads`` (task -> tensor -> value: a bundle's task-specific tensors, see
    ``export_onnx_for_bundle``) makes one graph for every task: the module's tensors of
    those names are laid out at the largest shape any task has, each smaller head's
    output cut is learnt and checked against the module at that head's own shape
    (``torch_engine.fit_heads``) and recorded, and the graph is verified with the first
    task's padded head.  The module is left with its heads padded.  ``strip`` leaves every
    weight's value out of the graph (they come from the base and the bundle at load),
    after verification.
    """
    import onnx
    import torch

    inputs = tuple(torch.as_tensor(x) for x in example_inputs)
    input_names = list(input_names or default_names("input", len(inputs)))
    if len(input_names) != len(inputs):
        raise TvswitchError("%d input names for %d example inputs" % (len(input_names), len(inputs)))
    modes = [(m, m.training) for m in module.modules()]  # submodules may differ: restore each
    module.eval()
    try:
        cuts = _lay_out_heads(module, heads, input_names, inputs, output_names) if heads else []
        with torch.no_grad():
            reference = flatten_outputs(call_module(module, inputs, dict(zip(input_names, inputs))))
        output_names = list(output_names or default_names("output", len(reference)))
        if dynamic_axes is None:
            dynamic_axes = {n: {0: "batch"} for n in input_names + output_names}
        check_dynamic_axes(dynamic_axes, dict(zip(input_names, inputs)), dict(zip(output_names, reference)))
        state = module.state_dict()
        groups = _alias_groups(state)
        with _tagged(state, groups, seed) as tags, warnings.catch_warnings():
            # The legacy exporter warns about tracing and its own deprecation on every call.
            warnings.simplefilter("ignore")
            buf = io.BytesIO()
            try:
                with _held_stdout():  # a failed export prints the whole traced graph first
                    torch.onnx.export(module, inputs, buf, dynamo=False, input_names=input_names,
                                      output_names=output_names, dynamic_axes=dict(dynamic_axes),
                                      opset_version=opset, do_constant_folding=True,
                                      training=torch.onnx.TrainingMode.PRESERVE)
            except Exception as exc:  # noqa: BLE001 - UnsupportedOperatorError, RuntimeError, SymbolicValueError...
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise TvswitchError("torch's ONNX exporter cannot export the module (opset %d): %s"
                                    % (opset, first)) from None
        model = onnx.load_from_string(buf.getvalue())
        values = {name: state[name].detach().cpu().numpy() for name in groups}
        others = {n: t.detach().cpu().numpy() for n, t in state.items() if not t.is_floating_point()}
        record = _rewrite(model, tags, values, groups, others)
    finally:
        for m, training in modes:
            m.training = training
    if verify:
        _verify(model, input_names, [x.detach().cpu().numpy() for x in inputs], reference)
    record = dataclasses.replace(record, heads=cuts, stripped=strip)
    if strip:
        _strip(model, set(record.weights) | set(record.unused) | set(unread_weights(model, record.fixed)))
    prop = model.metadata_props.add()
    prop.key, prop.value = WEIGHTS_KEY, record.to_json()
    if out is not None:
        write_model(model, out)
    return model


@contextlib.contextmanager
def _held_stdout() -> Iterator[None]:
    """File descriptor 1 into a temporary file for the block, and out again only if it ends
    without an exception: torch prints a failed export's traced graph (thousands of lines
    for a transformer) from C++, past ``sys.stdout``, before it raises."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        try:
            yield
        except BaseException:
            os.dup2(saved, 1)
            raise
        else:
            os.dup2(saved, 1)
            held.seek(0)
            sys.stdout.write(held.read().decode(errors="replace"))
        finally:
            os.close(saved)


def check_dynamic_axes(dynamic_axes: Mapping[str, Any], inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
    """Refuse a dynamic axis torch's exporter would fail on with a traceback: a name that is
    no input or output, or an axis the tensor does not have (``--dynamic input_ids=0,5`` on
    a 2-D input)."""
    for name, axes in dynamic_axes.items():
        tensor = inputs.get(name, outputs.get(name))
        if tensor is None:
            raise TvswitchError("dynamic axes for %r: no input or output has that name (inputs %s, outputs %s)"
                                % (name, ", ".join(inputs), ", ".join(outputs)))
        rank = len(tensor.shape)
        for axis in (axes if isinstance(axes, (list, tuple)) else list(axes)):
            if not isinstance(axis, int) or not 0 <= axis < rank:
                raise TvswitchError("dynamic axis %r of %r: it is %d-D, so the axes are 0..%d"
                                    % (axis, name, rank, rank - 1))


def export_onnx_for_bundle(module: Any, bundle: Bundle, example_inputs: Sequence[Any], out: Optional[str] = None, *,
                           strip: bool = True, **options: Any) -> "onnx.ModelProto":
    """One graph that serves every task of ``bundle``: ``export_onnx`` with the bundle's heads,
    weight-stripped by default, and refused before it is written unless every tensor the
    bundle switches is one of its weights (the check ``tvswitch run`` makes at load).

    ``module`` is the network with any head (its heads are laid out anew; load the base
    into it first, or not: a stripped graph keeps none of its values).  ``options`` go to
    ``export_onnx``.
    """
    heads = {t: bundle.task_specific(t) for t in bundle.tasks}
    model = export_onnx(module, example_inputs, None, heads=heads, strip=strip, **options)
    binding = graph_binding(bundle, read_record(model))
    for task, why in binding.heads.misfits.items():
        log.warning("the graph cannot serve task %r of %s: %s", task, bundle.path, why)
    if out is not None:
        write_model(model, out)
    return model


def graph_binding(bundle: Bundle, record: WeightRecord) -> EngineBinding:
    """``bundle`` bound to a graph of that weight record, as ``tvswitch run`` binds it at load:
    refused unless every tensor it switches is a weight; ``servable`` the tasks it serves."""
    weights = {n: (shape, dtype) for n, (shape, dtype) in record.weights.items()}
    return EngineBinding(bundle, weights, unread=list(record.unused) + list(record.aliases), cuts=record.heads,
                         what="the exported graph")


def _lay_out_heads(module: Any, heads: Mapping[str, Mapping[str, np.ndarray]], input_names: Sequence[str],
                   inputs: Sequence[Any], output_names: Optional[Sequence[str]]) -> List[HeadCut]:
    """Pad the module's heads for every task (``fit_heads``) and load the first task's, padded:
    the graph is then verified on real head values, not on zeros that would answer zero."""
    import torch

    named = {n: x.detach().cpu().numpy() for n, x in zip(input_names, inputs)}
    cuts = fit_heads(module, heads, input_names, named, output_names)
    state = module.state_dict()
    first = next((t for t in heads.values() if any(n in state for n in t)), {})
    for name, value in first.items():
        if name in state:
            padded = pad(np.asarray(value), tuple(state[name].shape))
            set_tensor(module, name, torch.as_tensor(padded).to(state[name].dtype))
    return cuts


def _strip(model: "onnx.ModelProto", names: Set[str]) -> None:
    """Drop the initializers of ``names`` (weights and the tensors only the base needs)."""
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _alias_groups(state: Mapping[str, Any]) -> Dict[str, List[str]]:
    """Float state_dict tensors by storage: canonical name -> every name sharing it (tied weights)."""
    aliases = tied_names(state)
    groups = {n: [n] for n, t in state.items() if t.is_floating_point() and n not in aliases}
    for alias, name in aliases.items():
        groups[name].append(alias)
    return groups


class _tagged:
    """Context: each float tensor holds distinct random values; the originals come back on exit."""

    def __init__(self, state: Mapping[str, Any], groups: Mapping[str, List[str]], seed: int):
        self.state, self.groups, self.seed = state, groups, seed
        self.saved: Dict[str, Any] = {}

    def __enter__(self) -> Dict[bytes, str]:
        import torch

        gen = torch.Generator().manual_seed(self.seed)
        index: Dict[bytes, str] = {}
        try:
            with torch.no_grad():
                for name in self.groups:
                    t = self.state[name]
                    self.saved[name] = t.detach().clone()
                    # Positive values in [0.5, 1.5): a tagged variance stays a valid variance.
                    tag = torch.rand(t.shape, generator=gen, dtype=torch.float32) + 0.5
                    t.copy_(tag.to(t.dtype))
                    index[digest(t.detach().cpu().numpy())] = name
            if len(index) != len(self.groups):
                raise TvswitchError("two weights drew the same tag; export again with another seed")
        except BaseException:
            self.__exit__()  # __exit__ does not run when __enter__ fails: put the weights back here
            raise
        return index

    def __exit__(self, *exc: Any) -> None:
        import torch

        with torch.no_grad():
            for name, original in self.saved.items():
                self.state[name].copy_(original)


def _rewrite(model, tags: Mapping[bytes, str], values: Mapping[str, np.ndarray],
             groups: Mapping[str, List[str]], others: Mapping[str, np.ndarray]) -> WeightRecord:
    """Turn every traced initializer into a named weight input, store the untraced float
    tensors and ``others`` (non-float state) as initializers no node reads, and return the
    record of it all (``export_onnx`` writes it into the metadata)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    renamed: Dict[str, dict] = {}
    used: Dict[str, None] = {}
    keep, front = [], []
    for init in graph.initializer:
        a = numpy_helper.to_array(init)
        traced = _trace(a, tags, values) if np.issubdtype(a.dtype, np.floating) else None
        if traced is None:
            keep.append(init)
            continue
        name, layout = traced
        used[name] = None
        if init.name == name and layout == "identity":
            continue
        entry: Dict[str, Any] = {"name": name, "layout": layout}
        if layout == "transpose":
            entry["perm"] = [1, 0]
            front.append(helper.make_node("Transpose", [name], [init.name], perm=[1, 0],
                                          name="tvswitch.layout." + init.name))
        elif layout == "reshape":
            shape_name = init.name + ".tvswitch_shape"
            keep.append(numpy_helper.from_array(np.array(a.shape, dtype=np.int64), shape_name))
            front.append(helper.make_node("Reshape", [name, shape_name], [init.name],
                                          name="tvswitch.layout." + init.name))
        else:
            _rename_uses(graph, init.name, name)
        renamed[init.name] = entry
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    data_inputs = [i for i in graph.input if i.name not in used]
    del graph.input[:]
    graph.input.extend(data_inputs)
    weights = {}
    for name in used:
        v = values[name]
        graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                         list(v.shape)))
        graph.initializer.append(numpy_helper.from_array(contiguous(v), name))
        weights[name] = (tuple(v.shape), v.dtype.name)
    taken = {t.name for t in graph.initializer}
    unused = [name for name in groups if name not in used and name not in taken]
    stored = [(n, a) for n, a in others.items() if n not in taken] + [(n, values[n]) for n in unused]
    graph.initializer.extend(numpy_helper.from_array(contiguous(a), n) for n, a in stored)
    return WeightRecord(
        weights=weights, renamed=renamed,
        aliases={alias: name for name, names in groups.items() for alias in names[1:]},
        unused=unused, fixed=list(others),  # with those forward reads under their own name (position_ids)
    )


def _trace(a: np.ndarray, tags: Mapping[bytes, str], values: Mapping[str, np.ndarray]) -> Optional[Tuple[str, str]]:
    """(state_dict name, layout) of the tensor whose tag ``a`` holds, or None."""
    name = tags.get(digest(a))
    if name is not None:
        return name, "identity" if tuple(a.shape) == values[name].shape else "reshape"
    if a.ndim == 2:
        name = tags.get(digest(a.T))
        if name is not None and values[name].shape == a.T.shape:
            return name, "transpose"
    return None


def _rename_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:
            out.name = new


def _verify(model, input_names: Sequence[str], inputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> None:
    """Run the exported graph (weights at their defaults) and compare with the module's outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # weights with defaults are meant to be overridable: no warning per weight
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(input_names, inputs)))
    if len(got) != len(reference):
        raise TvswitchError("the graph has %d outputs, the module %d" % (len(got), len(reference)))
    for i, (g, r) in enumerate(zip(got, reference)):
        err = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
        bound = ATOL + RTOL * float(np.max(np.abs(r))) if r.size else 0.0
        if g.shape != r.shape or not err <= bound:
            raise TvswitchError("exported graph's output %d differs from the module's (max error %.3g > %.3g): "
                                "an initializer is probably computed from weights; see docs/engines.md"
                                % (i, err, bound))


def write_model(model: "onnx.ModelProto", path: str) -> None:
    """Write ``model`` atomically (temp file, fsync, rename)."""
    atomic_write(path, model.SerializeToString())
