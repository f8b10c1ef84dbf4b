"""ONNX graphs for serving: which tensors are switchable weights, and the graph each engine wants.

The exporter (``tvswitch.export.onnx_export``) writes graphs whose switchable weights are
graph inputs named exactly as in the torch state_dict, each with a default value (an
initializer of the same name: the base the graph was exported with), and records them in
the model's metadata under ``WEIGHTS_KEY``.  A user's own ONNX file works too: its
weights are found by name (the bundle's tensor names) or, lacking names, as the inputs
that carry a default value.

ONNX Runtime wants the weights as plain inputs (no default: the session would keep a
second copy), fed from buffers the rebuild writes.  TensorRT wants them as initializers,
because only initializers become refittable weights; and its ONNX parser folds a
BatchNormalization whose inputs are all initializers into weights it names itself
(``tmp_weight_N`` / ``tmp_refittable_weight_N``, numbered in parse order), which a refit
would have to reproduce by guessing that order.  ``tensorrt_graph`` instead rewrites each
such BatchNormalization into ``x * scale + shift`` over two initializers whose names we
choose, and ``derive_batchnorm`` computes them from the rebuilt weights at each switch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, FrozenSet, Iterable, List, Mapping, Optional, Set, Tuple, Union

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.checkpoint import contiguous
from tvswitch.runtime.heads import HeadCut

if TYPE_CHECKING:  # onnx is imported lazily: a device serving with TensorRT alone may lack it
    import onnx

#: Metadata key of the exporter's record (JSON; see ``WeightRecord``).
WEIGHTS_KEY = "tvswitch.weights"
#: Version 2 added ``heads`` and ``stripped``: a version-1 reader would serve a padded
#: graph's outputs uncut, so it must refuse these graphs, and does (it reads only 1).
RECORD_VERSION = 2
READS_VERSIONS = (1, 2)

ModelLike = Union[str, bytes, "onnx.ModelProto"]
#: Switchable weight name -> (shape, dtype) of its buffers.
WeightSpecs = Dict[str, Tuple[Tuple[int, ...], np.dtype]]


@dataclass(frozen=True)
class WeightRecord:
    """What the exporter wrote into the graph's metadata.

    ``weights``: switchable graph inputs, state_dict name -> (shape, dtype name).
    ``renamed``: exporter's initializer name -> (state_dict name, layout), layout being
    ``"identity"``, ``"transpose"`` (with ``perm``) or ``"reshape"``, kept so a user can
    trace every ``onnx::MatMul_N`` back to its tensor.
    ``aliases``: tied state_dict names -> the one name the graph uses.
    ``unused``: float state_dict tensors the traced graph does not read (a pooler).
    ``fixed``: non-float state_dict tensors (BatchNorm's ``num_batches_tracked``, a
    ``position_ids`` buffer).  Both are kept as initializers (no node reads them, except
    a fixed tensor that ``forward`` reads itself), so the graph carries everything a
    bundle's base fingerprint covers and can serve as the base, unless ``stripped``.
    ``heads``: for each head shape of the bundle the graph was exported for
    (``export-onnx --bundle``), how its outputs are cut (``runtime.heads.HeadCut``).
    ``stripped``: the graph holds no value of any weight, ``unused`` or ``fixed`` tensor
    (but a fixed one a node reads, which stays): they come from the base and the bundle
    at load.
    """

    weights: Dict[str, Tuple[Tuple[int, ...], str]]
    renamed: Dict[str, dict]
    aliases: Dict[str, str]
    unused: List[str]
    fixed: List[str]
    heads: List[HeadCut] = field(default_factory=list)
    stripped: bool = False

    def to_json(self) -> str:
        return json.dumps({
            "version": RECORD_VERSION,
            "weights": {n: {"shape": list(s), "dtype": d} for n, (s, d) in self.weights.items()},
            "renamed": self.renamed, "aliases": self.aliases, "unused": self.unused, "fixed": self.fixed,
            "heads": [h.record() for h in self.heads], "stripped": self.stripped,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "model") -> "WeightRecord":
        try:
            raw = json.loads(text)
            if raw.get("version") not in READS_VERSIONS:
                raise TvswitchError("%s: tvswitch weight record version %r, this tvswitch reads %s"
                                    % (where, raw.get("version"), " and ".join(map(str, READS_VERSIONS))))
            weights = {n: (tuple(int(x) for x in v["shape"]), str(v["dtype"])) for n, v in raw["weights"].items()}
            heads = [HeadCut.from_record(h, where) for h in raw.get("heads", [])]
            stripped = raw.get("stripped", False)
            if not isinstance(stripped, bool):
                raise TypeError("stripped is %r" % (stripped,))
            return cls(weights, dict(raw["renamed"]), dict(raw["aliases"]), list(raw["unused"]), list(raw["fixed"]),
                       heads, stripped)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TvswitchError("%s: unreadable tvswitch weight record (%s)" % (where, exc)) from None


def _onnx():
    try:
        import onnx
    except ImportError:
        raise TvswitchError("ONNX graphs need the onnx package: pip install 'tvswitch[onnx]'") from None
    return onnx


def load_model(model: ModelLike) -> "onnx.ModelProto":
    """A ModelProto from a path, serialized bytes or a ModelProto (returned as is)."""
    onnx = _onnx()
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, (bytes, bytearray)):
            return onnx.load_from_string(bytes(model))
        return onnx.load(str(model))
    except (OSError, ValueError) as exc:
        raise TvswitchError("%s: not a readable ONNX model (%s)" % (model if isinstance(model, str) else "model",
                                                                     exc)) from None
    except Exception as exc:  # protobuf raises its own DecodeError type
        raise TvswitchError("%s: not an ONNX model (%s)" % (model if isinstance(model, str) else "model",
                                                            type(exc).__name__)) from None


def read_record(model: "onnx.ModelProto") -> Optional[WeightRecord]:
    """The exporter's record in ``model``'s metadata, or None for a graph from elsewhere."""
    for prop in model.metadata_props:
        if prop.key == WEIGHTS_KEY:
            return WeightRecord.from_json(prop.value)
    return None


def find_weights(model: "onnx.ModelProto", names: Optional[Iterable[str]] = None) -> List[str]:
    """The switchable weights of ``model``, in graph order.

    The exporter's record wins; else every initializer or input whose name is in
    ``names`` (a bundle's tensors); else every input that has a default value.
    """
    record = read_record(model)
    graph = model.graph
    inits = [t.name for t in graph.initializer]
    inputs = [i.name for i in graph.input]
    if record is not None:
        found = list(record.weights)
        missing = [n for n in found if n not in inputs and n not in inits]
        if missing:
            raise TvswitchError("graph lacks weight %r that its tvswitch record names" % missing[0])
        return found
    if names is not None:
        wanted = set(names)
        return [n for n in dict.fromkeys(inputs + inits) if n in wanted]
    init_set = set(inits)
    return [n for n in inputs if n in init_set]


def recorded_heads(model: "onnx.ModelProto") -> List[HeadCut]:
    """The head shapes the graph was exported for and how each cuts the outputs (empty: none recorded)."""
    record = read_record(model)
    return [] if record is None else list(record.heads)


def recorded_unread(model: "onnx.ModelProto") -> List[str]:
    """State_dict tensors the exporter's record says no node reads: ``unused`` ones and tied aliases.

    A bundle holds them like any tensor; a graph need not serve them (empty for a graph
    without the record, which says nothing of the kind).
    """
    record = read_record(model)
    return [] if record is None else list(record.unused) + list(record.aliases)


def recorded_aliases(model: "onnx.ModelProto") -> Dict[str, str]:
    """Tied names the exporter's record lists (alias -> the weight the graph reads for it)."""
    record = read_record(model)
    return {} if record is None else dict(record.aliases)


def _elem_dtype(elem_type: int) -> np.dtype:
    onnx = _onnx()
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def input_spec(value_info: "onnx.ValueInfoProto") -> Tuple[Tuple[Optional[int], ...], np.dtype]:
    """(dims, dtype) of a graph input; a dynamic or symbolic dim is None."""
    t = value_info.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return dims, _elem_dtype(t.elem_type)


def serving_graph(model: "onnx.ModelProto", weights: List[str]
                  ) -> Tuple["onnx.ModelProto", Dict[str, np.ndarray], WeightSpecs]:
    """(graph with every weight a plain input, the defaults the file held, weight specs).

    The defaults (and the record's ``unused`` and ``fixed`` tensors, and tied aliases,
    which share their weight's array) are returned once and dropped from the graph so
    that ONNX Runtime holds no second copy of them; a ``fixed`` tensor that a node reads
    (an int64 ``position_ids``) stays in the graph as well.  A weight the file has no
    value for must be bound by the caller.  Weight shapes must be static: a rebuild
    writes fixed buffers.
    """
    onnx = _onnx()
    from onnx import numpy_helper

    model_out = onnx.ModelProto()
    model_out.CopyFrom(model)
    graph = model_out.graph
    record = read_record(model)
    wanted = set(weights) | set(record.fixed + record.unused if record else ())
    read = _read_names(graph)
    defaults: Dict[str, np.ndarray] = {}
    keep = []
    for t in graph.initializer:
        if t.name in wanted:
            defaults[t.name] = numpy_helper.to_array(t)
        if t.name not in wanted or (t.name not in weights and t.name in read):
            keep.append(t)
    for alias, name in (record.aliases.items() if record else ()):
        if name in defaults:
            defaults[alias] = defaults[name]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    declared = {i.name: i for i in graph.input}
    specs: WeightSpecs = {}
    for name in weights:
        if name in declared:
            shape, dtype = input_spec(declared[name])
            if any(d is None for d in shape):
                if name not in defaults:
                    raise TvswitchError("weight input %r has a dynamic shape and no value to fix it" % name)
                shape = tuple(defaults[name].shape)
        elif name in defaults:
            shape, dtype = tuple(defaults[name].shape), defaults[name].dtype
            graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(dtype), list(shape)))
        else:
            raise TvswitchError("graph has no input or initializer named %r" % name)
        specs[name] = (tuple(int(d) for d in shape), np.dtype(dtype))
    return model_out, defaults, specs


def data_inputs(model: "onnx.ModelProto", weights: Iterable[str]) -> List[str]:
    """Graph inputs that are not weights: what a request supplies."""
    skip = set(weights) | {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in skip]


def index_inputs(model: "onnx.ModelProto", inputs: Iterable[str], tables: Iterable[str] = ()) -> FrozenSet[str]:
    """The ``inputs`` a Gather reads as its indices into a table of weights (an embedding:
    an initializer or one of ``tables``, the switchable weights).  ONNX's Gather takes a
    negative index from the end of the table, so a -1 among token ids is answered with the
    last row's embedding; the engines refuse it (``cast_input``), as torch's embedding
    does.  A Gather over activations (``x[:, idx]``, where torch takes negative indices
    too) is left alone, and only inputs a Gather reads directly are known to be indices."""
    wanted = set(inputs)
    weights = set(tables) | {t.name for t in model.graph.initializer}
    return frozenset(node.input[1] for node in model.graph.node
                     if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in wanted
                     and node.input[0] in weights)


# ---- TensorRT ----

@dataclass(frozen=True)
class FoldedBatchNorm:
    """A BatchNormalization rewritten as ``x * scale + shift`` for TensorRT."""

    scale: str  # initializer names we created
    shift: str
    gamma: str  # the BN's own inputs
    beta: str
    mean: str
    var: str
    epsilon: float
    shape: Tuple[int, ...]  # broadcast shape of scale/shift, e.g. (C, 1, 1)


def derive_batchnorm(bn: FoldedBatchNorm, values: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of one folded BatchNorm from the current weights, in float32.

    The same arithmetic as TensorRT's parser and ``OnnxParserRefitter`` (scale =
    gamma / sqrt(var + eps), shift = beta - mean * scale), so a refit gives the numbers a
    fresh build would.
    """
    gamma, beta, mean, var = (np.asarray(values[n], dtype=np.float32) for n in (bn.gamma, bn.beta, bn.mean, bn.var))
    scale = gamma / np.sqrt(var + np.float32(bn.epsilon))
    shift = beta - mean * scale
    return scale.reshape(bn.shape), shift.reshape(bn.shape)


def constant_graph(model: "onnx.ModelProto", values: Mapping[str, np.ndarray]) -> "onnx.ModelProto":
    """A copy of ``model`` where each tensor named in ``values`` is a constant holding that value.

    What TensorRT builds from, and what a constant-weight ONNX Runtime session (the
    naive way of serving one task) is made of.
    """
    onnx = _onnx()
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    kept_inputs = [i for i in graph.input if i.name not in values]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    kept_inits = [t for t in graph.initializer if t.name not in values]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    graph.initializer.extend(numpy_helper.from_array(contiguous(a), n) for n, a in values.items())
    return out


def tensorrt_graph(model: "onnx.ModelProto", weights: List[str], values: Mapping[str, np.ndarray]
                   ) -> Tuple["onnx.ModelProto", List[FoldedBatchNorm]]:
    """(graph with every weight an initializer and BatchNorms of weights unfolded, the folds).

    ``values`` gives each weight's array (the base: TensorRT builds with real numbers, and
    a weight-stripped plan refits them all at load).  Every BatchNormalization whose four
    parameters are weights or initializers becomes Mul + Add over named initializers.
    """
    from onnx import helper, numpy_helper

    missing = [n for n in weights if n not in values]
    if missing:
        raise TvswitchError("no value for weight %r to build the TensorRT graph with" % missing[0])
    wanted = set(weights)
    out = constant_graph(model, {n: values[n] for n in weights})
    graph = out.graph
    constants = {t.name: t for t in graph.initializer}
    ranks = _ranks(out)
    folds: List[FoldedBatchNorm] = []
    nodes = []
    for index, node in enumerate(graph.node):
        params = list(node.input[1:5])
        if node.op_type != "BatchNormalization" or len(node.output) != 1 or not all(p in constants for p in params):
            nodes.append(node)
            continue
        rank = ranks.get(node.input[0])
        if rank is None or rank < 2:
            raise TvswitchError("BatchNormalization %r: the rank of its input is unknown; run ONNX shape "
                                "inference on the graph first" % (node.name or node.output[0]))
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        channels = int(np.prod(constants[params[0]].dims))
        shape = (channels,) + (1,) * (rank - 2)
        stem = "tvswitch.bn.%d.%s" % (index, node.name or node.output[0])
        bn = FoldedBatchNorm(stem + ".scale", stem + ".shift", *params, epsilon=float(eps), shape=shape)
        arrays = {p: values[p] if p in wanted else numpy_helper.to_array(constants[p]) for p in params}
        scale, shift = derive_batchnorm(bn, arrays)
        graph.initializer.extend([numpy_helper.from_array(scale, bn.scale), numpy_helper.from_array(shift, bn.shift)])
        scaled = stem + ".scaled"
        nodes.append(helper.make_node("Mul", [node.input[0], bn.scale], [scaled], name=stem + ".mul"))
        nodes.append(helper.make_node("Add", [scaled, bn.shift], [node.output[0]], name=stem + ".add"))
        folds.append(bn)
    del graph.node[:]
    graph.node.extend(nodes)
    return out, folds


def digest(a: np.ndarray) -> bytes:
    """A tensor's values as float32 bytes, hashed: how a weight is recognised in a graph by
    value (export_onnx traces its tags so, and ``weight_copies`` a plain export's copies)."""
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).digest()


def weight_copies(model: "onnx.ModelProto", weights: Iterable[str]) -> Dict[str, Tuple[str, str]]:
    """Constants of ``model`` that hold one of its ``weights``' values under another name
    (constant name -> (weight, "copy" or "transposed")).

    Constant folding in a plain ``torch.onnx.export`` turns ``x @ w.t()`` into a new
    initializer ``onnx::MatMul_N`` beside ``w``: the graph still has a weight of the
    bundle's name, but a switch would reach only some of its uses and the answers would mix
    the task's weights and the base's, with no error.  Found by value: an initializer or
    ``Constant`` node whose float32 bytes are a weight's own, or its transpose's.  Weights of
    one repeated value (zeros, ones) are left out, since any constant of that size would
    match.  Empty for a graph with the exporter's record, which wrote every copy as a
    node over the weight itself.
    """
    from onnx import TensorProto, numpy_helper

    if read_record(model) is not None:
        return {}
    wanted = set(weights)
    inits = {t.name: t for t in model.graph.initializer}
    constants = dict((n, t) for n, t in inits.items() if n not in wanted)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] not in wanted:
            constants.update((node.output[0], a.t) for a in node.attribute if a.name == "value")

    def floating(t) -> bool:
        return t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)

    sizes = {int(np.prod(t.dims)) for t in constants.values() if floating(t)}
    found: Dict[bytes, Tuple[str, str]] = {}
    for name in wanted:
        t = inits.get(name)
        if t is None or not floating(t) or int(np.prod(t.dims)) not in sizes:
            continue
        a = numpy_helper.to_array(t)
        if a.size < 2 or np.all(a == a.flat[0]):
            continue
        found.setdefault(digest(a), (name, "copy"))
        if a.ndim == 2:
            found.setdefault(digest(a.T), (name, "transposed"))
    if not found:
        return {}
    copies = {}
    for name, t in constants.items():
        if floating(t) and int(np.prod(t.dims)) in sizes:
            hit = found.get(digest(numpy_helper.to_array(t)))
            if hit is not None:
                copies[name] = hit
    return copies


def unread_weights(model: "onnx.ModelProto", weights: Iterable[str]) -> List[str]:
    """The ``weights`` no node of ``model`` reads (subgraphs included), in the order given.

    In a ``tensorrt_graph`` these are the parameters of every unfolded BatchNorm (the
    graph reads their folds) and tensors the network never used: TensorRT has no weight
    to refit for them, so their absence from its refittable names is expected.
    """
    read = _read_names(model.graph)
    return [n for n in weights if n not in read]


def _read_names(graph: "onnx.GraphProto") -> Set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _read_names(sub)
    return names


def _ranks(model: "onnx.ModelProto") -> Dict[str, int]:
    onnx = _onnx()
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    return ranks
