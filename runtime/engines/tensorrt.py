"""The TensorRT engine: a refittable, weight-stripped plan refitted from registered buffers.

Written against the documented TensorRT Python API (docs/engines.md section 3) and **never
run on TensorRT**: no GPU and no TensorRT on the machines this was written on
(docs/engines.md says what was and was not run).  The code itself runs in the tests,
for TensorRT 8.5, 8.6, 10.1 and 10.3, against a fake TensorRT
(tests/runtime/engines/fake_tensorrt.py) that records the calls, enforces the
documented contracts and computes with ONNX Runtime from the weights refitted: that
checks our call sequence against the documentation, not against TensorRT.

Build: the ONNX graph with every switchable weight an initializer and each BatchNorm
unfolded into named Mul/Add constants (``onnx_graph.tensorrt_graph``), so that every
refit name is one we know.  TensorRT >= 10.2: ``REFIT_INDIVIDUAL`` with only those
weights marked refittable (the others keep their fusions); older: ``REFIT`` (all weights).
TensorRT >= 10: ``STRIP_PLAN``, so the plan on flash holds no weights; they are refitted
once at load from the ONNX file (``OnnxParserRefitter``) and from the slot.  Plans are
cached under a key of the graph's structure, precision, shapes, TensorRT version and
GPU, so a new JetPack or another board builds a new plan instead of loading a wrong one.

Switch (``publish``), two paths:

* GPU (TensorRT 10 with the CUDA kernels; ``use_device_buffers``, wired by
  ``serve_bundle`` through ``runtime.gpu_source.GpuBundleSource``): the kernels have
  written the rebuilt weights straight into the device buffers registered once with
  ``set_named_weights(..., TensorLocation.DEVICE)``; ``publish`` refits with
  ``refit_cuda_engine_async`` on the rebuild's stream.  BatchNorm folds: the rebuilt
  gamma/beta/mean/var (per-channel vectors, in device buffers not registered with
  TensorRT) come down, the folds are computed on the host and go up: the only per-switch
  host traffic, 4C floats down and 2C up per BatchNorm of C channels.
* Host (TensorRT 8, or no CUDA kernels): BatchNorm folds are recomputed from the host
  slot, the slot is copied to the registered device buffers (TensorRT 10) and
  ``refit_cuda_engine_async`` runs on the engine's stream; TensorRT 8 refits from host
  memory with ``refit_cuda_engine`` (it has no ``OnnxParserRefitter``, no device
  weights and no asynchronous refit, and this path uses none of them).

Under ``REFIT`` every weight is refittable, the graph's constants too; where TensorRT
combined a constant with a switchable weight it reports the constant missing
(``get_missing_weights``) and a refit without it fails.  Before each refit the engine
supplies such constants from the graph (``_supply_missing``).

The refit copies into the engine's own memory (TensorRT needs the registered memory only
until the refit completes), so the slot, host or device, is a staging area
(``publish_copies``): the server writes it while requests run and holds requests only
for the refit.  ``publish`` also takes the engine's lock, the one ``infer`` holds while
its work is enqueued: TensorRT must not refit an engine with work in flight, whoever
the caller.

A switchable weight that TensorRT does not keep refittable would silently keep its
build-time value through every switch: the build refuses a weight that
``mark_weights_refittable`` rejects, and the load refuses one missing from the
refitter's names unless no node reads it (``refit_sources``).  A cached plan that does
not deserialize is rebuilt and replaces the cache file (``load_or_build``).

Inference uses the ``execute_async_v3`` API (TensorRT 8.5+); TensorRT 8.2 (JetPack 4) is
not covered.  CUDA calls go through cuda-python.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.files import atomic_write
from tvswitch.kernels.cuda import cuda_python
from tvswitch.runtime.engines import onnx_graph
from tvswitch.runtime.engines.base import Engine, cast_input

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("tvswitch.tensorrt")

Shape = Tuple[int, ...]
#: name -> (min, opt, max) shapes of a dynamic data input.
Profile = Mapping[str, Tuple[Shape, Shape, Shape]]


def _trt():
    try:
        import tensorrt
    except ImportError:
        raise TvswitchError("the tensorrt engine needs TensorRT's Python bindings (JetPack ships them; "
                            "on x86: pip install tensorrt)") from None
    return tensorrt


def _cudart():
    try:
        return cuda_python("runtime")
    except ImportError:
        raise TvswitchError("the tensorrt engine needs cuda-python: pip install 'tvswitch[cuda]'") from None


def parse_version(text: str) -> Tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)``."""
    parts = []
    for p in text.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def refit_flag(version: Tuple[int, ...]) -> str:
    """``REFIT_INDIVIDUAL`` from TensorRT 10.2 (refit only marked weights), else ``REFIT``."""
    return "REFIT_INDIVIDUAL" if version >= (10, 2) else "REFIT"


def strips_weights(version: Tuple[int, ...]) -> bool:
    """Weight-stripped plans (``STRIP_PLAN``) and ``OnnxParserRefitter`` exist from TensorRT 10."""
    return version >= (10,)


def graph_digest(model: "onnx.ModelProto", weights: Iterable[str]) -> str:
    """sha256 of what a plan depends on: the graph, with the *values* of switchable weights left out.

    Those are refitted at every load, so a plan serves any base and any task of the same
    network; every other constant is part of the plan and of the key.
    """
    skip = set(weights)
    h = hashlib.sha256()
    graph = model.graph
    for t in graph.initializer:
        h.update(("init|%s|%d|%s\n" % (t.name, t.data_type, list(t.dims))).encode())
        if t.name not in skip:
            h.update(t.SerializeToString())
    for part in (graph.input, graph.output):
        for v in part:
            h.update(("io|" + v.SerializeToString().hex() + "\n").encode())
    for node in graph.node:
        h.update(node.SerializeToString())
    for op in model.opset_import:
        h.update(("opset|%s|%d\n" % (op.domain, op.version)).encode())
    return h.hexdigest()


def plan_key(digest: str, trt_version: str, device: str, fp16: bool, profile: Optional[Profile] = None) -> str:
    """The cache key of a plan: the graph, the precision, the shapes, TensorRT's version, the GPU.

    A plan is only valid for the TensorRT version and the GPU (name and compute
    capability) it was built on; any change of them must build anew.
    """
    shapes = sorted((n, [list(s) for s in mmo]) for n, mmo in (profile or {}).items())
    text = "|".join([digest, "trt=" + trt_version, "device=" + device, "fp16=%d" % bool(fp16), repr(shapes)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class PlanCache:
    """Serialized plans in one folder, one file per key, written atomically."""

    def __init__(self, folder: str):
        self.folder = folder

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key + ".plan")

    def load(self, key: str) -> Optional[bytes]:
        try:
            with open(self.path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def store(self, key: str, plan: bytes) -> str:
        os.makedirs(self.folder, exist_ok=True)
        atomic_write(self.path(key), plan)
        return self.path(key)


def load_or_build(cache: Optional[PlanCache], key: str, build: Callable[[], bytes],
                  deserialize: Callable[[bytes], Any]) -> Any:
    """The engine of ``key``: from the cached plan if it deserializes, else built (and cached).

    A cached plan that TensorRT cannot load (a file damaged on flash, or from a TensorRT
    build the key cannot tell apart) is not fatal: a device that can build must not stop
    serving over a cache.  It is rebuilt, and the new plan replaces the file atomically
    once it has loaded, so a plan that fails even fresh is never cached.
    """
    plan = cache.load(key) if cache else None
    if plan is not None:
        engine = deserialize(plan)
        if engine is not None:
            return engine
        log.warning("cached TensorRT plan %s does not load: building it again", cache.path(key))
    plan = build()
    engine = deserialize(plan)
    if engine is None:
        raise TvswitchError("TensorRT could not load the plan it has just built (see its log above)")
    if cache:
        cache.store(key, plan)
    return engine


def mark_refittable(network: Any, names: Iterable[str]) -> None:
    """``network.mark_weights_refittable`` for each of ``names`` (REFIT_INDIVIDUAL), refusing a False.

    TensorRT answers False for a name that is no weight of the parsed network or that it
    cannot refit; that weight would keep its build-time value at every switch.
    """
    for name in names:
        if not network.mark_weights_refittable(name):
            raise TvswitchError("TensorRT cannot make weight %r refittable (not a weight of the parsed network, or "
                                "not refittable): the engine could not switch it" % name)


def refit_sources(trt_names: Iterable[str], weights: Iterable[str], folds: Sequence[onnx_graph.FoldedBatchNorm],
                  unread: Iterable[str] = ()) -> Tuple[List[str], List[str]]:
    """Sort the refittable names TensorRT reports: (switchable weights from the slot, graph constants).

    Every fold, and every switchable weight a node reads, must be reported (REFIT keeps
    every weight refittable, REFIT_INDIVIDUAL the marked ones); one that is not would
    keep its build-time value through every switch, so it is refused by name.  Absent by
    design: the parameters of each unfolded BatchNorm (the graph reads its folds
    instead) and ``unread`` weights, which no node reads (``onnx_graph.unread_weights``).
    """
    trt_set = set(trt_names)
    weights = list(weights)
    fold_names = {n for bn in folds for n in (bn.scale, bn.shift)}
    lost = sorted(fold_names - trt_set)
    if lost:
        raise TvswitchError("TensorRT did not keep weight %r refittable; the engine cannot switch it" % lost[0])
    expected_absent = set(unread) | {p for bn in folds for p in (bn.gamma, bn.beta, bn.mean, bn.var)}
    lost = [n for n in weights if n not in trt_set and n not in expected_absent]
    if lost:
        raise TvswitchError("TensorRT did not keep switchable weight %r refittable (%d such); a switch would leave it "
                            "at its build-time value" % (lost[0], len(lost)))
    from_slot = [n for n in weights if n in trt_set]
    constants = sorted(trt_set - set(weights) - fold_names)
    return from_slot, constants


def device_identity() -> str:
    """GPU name and compute capability, e.g. ``"Orin sm_87"``: part of the plan key."""
    cudart = _cudart()
    err, device = cudart.cudaGetDevice()
    _check(err, "cudaGetDevice")
    err, props = cudart.cudaGetDeviceProperties(device)
    _check(err, "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return "%s sm_%d%d" % (name, props.major, props.minor)


def _check(err, what: str) -> None:
    code = err[0] if isinstance(err, tuple) else err
    if int(code) != 0:
        raise TvswitchError("CUDA error in %s: %s" % (what, code))


class TensorRTEngine(Engine):
    """A refittable TensorRT engine whose switchable weights are refitted from a staging slot."""

    kind = "tensorrt"
    slots = 1
    publish_copies = True

    def __init__(self, model: onnx_graph.ModelLike, *, names: Optional[Iterable[str]] = None,
                 weights: Optional[Mapping[str, np.ndarray]] = None, fp16: bool = False,
                 profile: Optional[Profile] = None, cache_dir: Optional[str] = None, workspace_mb: int = 1024,
                 verbose: bool = False):
        """Build (or load from ``cache_dir``) a plan for ``model`` and refit it with ``weights``.

        ``weights`` default to the values the ONNX file holds for its weights.  Dynamic
        data inputs need a ``profile`` entry (min, opt, max shapes).  TensorRT logs errors
        only unless ``verbose`` (then warnings too).
        """
        trt = self._trt = _trt()
        cudart = self._cudart = _cudart()
        self._version = parse_version(trt.__version__)
        proto = onnx_graph.load_model(model)
        names_list = onnx_graph.find_weights(proto, names)
        self.weight_copies = onnx_graph.weight_copies(proto, names_list)
        self.weight_aliases = onnx_graph.recorded_aliases(proto)
        _, defaults, specs = onnx_graph.serving_graph(proto, names_list)
        values = dict(defaults)
        values.update(weights or {})
        # A weight-stripped graph (export-onnx --bundle) holds no values, and heads are never in
        # the base: TensorRT builds those with zeros, which the first switch's refit replaces.
        build_values = dict(values)
        build_values.update((n, np.zeros(specs[n][0], dtype=specs[n][1])) for n in names_list if n not in values)
        self.defaults = values  # the base a rebuild reads, as for the ONNX Runtime engine
        graph, self._folds = onnx_graph.tensorrt_graph(proto, names_list, build_values)
        bn_params = [p for bn in self._folds for p in (bn.gamma, bn.beta, bn.mean, bn.var)]
        unread = onnx_graph.unread_weights(graph, names_list)
        self._graph_bytes = graph.SerializeToString()
        self._inputs = onnx_graph.data_inputs(graph, [])
        self._index_inputs = onnx_graph.index_inputs(graph, self._inputs, names_list)
        self._outputs = [o.name for o in graph.graph.output]
        self._logger = trt.Logger(trt.Logger.WARNING if verbose else trt.Logger.ERROR)
        fold_names = [n for bn in self._folds for n in (bn.scale, bn.shift)]
        cache = PlanCache(cache_dir) if cache_dir else None
        key = plan_key(graph_digest(graph, names_list + fold_names), trt.__version__, device_identity(), fp16, profile)
        marked = [n for n in names_list if n not in set(bn_params) and n not in set(unread)] + fold_names
        self.plan_key = key
        self._runtime = trt.Runtime(self._logger)  # kept alive as long as the engine it made
        self._engine = load_or_build(cache, key, lambda: self._build(marked, fp16, profile, workspace_mb),
                                     self._runtime.deserialize_cuda_engine)
        self._input_dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in self._inputs}
        self._input_dims = {n: tuple(self._engine.get_tensor_shape(n)) for n in self._inputs}
        self._profile = dict(profile or {})
        self._context = self._engine.create_execution_context()
        err, self._stream = cudart.cudaStreamCreate()
        _check(err, "cudaStreamCreate")
        self._refitter = trt.Refitter(self._engine, self._logger)
        self._from_slot, constants = refit_sources(self._refitter.get_all_weights(), names_list, self._folds, unread)
        self.unread_weights = onnx_graph.recorded_unread(proto) + [n for n in unread if n not in set(bn_params)]
        self.head_cuts = onnx_graph.recorded_heads(proto)
        self._constants = constants
        self._constant_values: Optional[Dict[str, np.ndarray]] = None  # read from the graph when first wanted
        # Switchable BatchNorm parameters: no layer reads them (the graph's Mul/Add read the
        # folds), so TensorRT does not report them, but the folds are derived from them.
        self._bn_params = [n for n in names_list if n in set(bn_params) and n not in self._from_slot]
        slot_names = self._from_slot + self._bn_params
        self._fold_inputs = [n for n in slot_names if n in set(bn_params)]  # what a device publish brings down
        self._bn_constants = graph_arrays(graph, [p for p in bn_params if p not in slot_names])
        self._specs = {n: specs[n] for n in slot_names}
        self._staging = {n: np.zeros(self._specs[n][0], dtype=self._weight_dtype(n)) for n in slot_names}
        self._weight_specs = {n: (tuple(a.shape), a.dtype) for n, a in self._staging.items()}
        self._registered: List[str] = []
        self._feed_stream: Optional[int] = None
        self._from_device = False
        self._fold_arrays = {n: np.zeros(bn.shape, dtype=self._weight_dtype(n))
                             for bn in self._folds for n in (bn.scale, bn.shift)}
        self._lock = threading.Lock()  # one execution context, and no refit while its work is enqueued
        self._device: Dict[str, int] = {}
        self._onnx_refitter = None
        if strips_weights(self._version):
            if constants:
                # REFIT (10.0/10.1) strips every weight: the constants come from the graph, once.  This
                # registers host copies of our weights too, which the device buffers below replace.
                # The parser refitter owns the host memory of the weights it set, which TensorRT reads
                # when it refits: it lives as long as the engine, not just until the first refit.
                self._onnx_refitter = trt.OnnxParserRefitter(self._refitter, self._logger)
                if not self._onnx_refitter.refit_from_bytes(self._graph_bytes):
                    raise TvswitchError("TensorRT could not refit the plan's constants from the ONNX graph")
            self._register_device_buffers()
        self.bind({n: build_values[n] for n in slot_names})

    def _build(self, refittable: List[str], fp16: bool, profile: Optional[Profile], workspace_mb: int) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        flags = 0 if self._version >= (10,) else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(self._graph_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TvswitchError("TensorRT's ONNX parser refused the graph: %s" % errors)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if refit_flag(self._version) == "REFIT_INDIVIDUAL":
            config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
            mark_refittable(network, refittable)
        else:
            config.set_flag(trt.BuilderFlag.REFIT)
        if strips_weights(self._version):
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        dynamic = [network.get_input(i) for i in range(network.num_inputs)
                   if any(d < 0 for d in network.get_input(i).shape)]
        if dynamic:
            missing = [t.name for t in dynamic if t.name not in (profile or {})]
            if missing:
                raise TvswitchError("input %r has dynamic dimensions: give its (min, opt, max) shapes" % missing[0])
            opt = builder.create_optimization_profile()
            for t in dynamic:
                opt.set_shape(t.name, *profile[t.name])
            config.add_optimization_profile(opt)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise TvswitchError("TensorRT failed to build the engine (see its log above)")
        return bytes(plan)

    def _weight_dtype(self, name: str) -> np.dtype:
        """The dtype TensorRT expects for ``name``: TensorRT 10 says; on TensorRT 8 the graph's
        (float32 for the folds, which ``tensorrt_graph`` writes in float32)."""
        if hasattr(self._refitter, "get_weights_prototype") and name not in self._bn_params:
            return np.dtype(self._trt.nptype(self._refitter.get_weights_prototype(name).dtype))
        return np.dtype(self._specs[name][1]) if name in self._specs else np.dtype(np.float32)

    def _register_device_buffers(self) -> None:
        """Allocate one device buffer per refitted weight and register it once (TensorRT 10).

        Switchable BatchNorm parameters get device buffers too, not registered: a GPU
        rebuild writes them there and ``publish`` derives the folds from them.
        """
        trt, cudart = self._trt, self._cudart
        self._refitter.weights_validation = False
        arrays = dict(self._staging)
        arrays.update(self._fold_arrays)
        for name, a in arrays.items():
            err, ptr = cudart.cudaMalloc(max(a.nbytes, 1))
            _check(err, "cudaMalloc")
            self._device[name] = int(ptr)
            if name in self._bn_params:
                continue
            w = trt.Weights(trt_weights_dtype(trt, a.dtype, name), int(ptr), a.size)
            if not self._refitter.set_named_weights(name, w, trt.TensorLocation.DEVICE):
                raise TvswitchError("TensorRT refused device weights for %r" % name)
            self._registered.append(name)

    # ---- the Engine interface ----
    @property
    def input_names(self) -> Sequence[str]:
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._outputs

    @property
    def weight_specs(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        return dict(self._weight_specs)

    def buffers(self, slot: int = 0) -> Dict[str, np.ndarray]:
        """The host staging slot (after ``use_device_buffers``: only BatchNorm's parameters,
        where ``publish`` brings them down to derive the folds)."""
        return self._staging

    def device_buffers(self) -> Optional[Dict[str, object]]:
        """The registered device buffers (and those of switchable BatchNorm parameters) as
        ``DeviceTensor``s; None on TensorRT 8, which refits from host memory only."""
        if not self._device:
            return None
        from tvswitch.kernels.cuda import DeviceTensor

        return {n: DeviceTensor(self._device[n], shape, np.dtype(dtype))
                for n, (shape, dtype) in self._weight_specs.items()}

    def use_device_buffers(self, stream: Optional[int] = None) -> None:
        """Refit from what a GPU rebuild wrote into ``device_buffers()``, on ``stream``.

        The host staging of every weight but BatchNorm's parameters is dropped: on a
        Jetson host and device memory are the same DRAM.
        """
        if not self._device:
            raise TvswitchError("TensorRT %s refits from host memory only: no device buffers to write"
                                % self._trt.__version__)
        self._feed_stream = stream
        self._from_device = True
        self._staging = {n: self._staging[n] for n in self._fold_inputs}

    def publish(self, slot: int = 0) -> None:
        """Refit the engine with the slot, host or device (folds recomputed); returns when it is done.

        Holds the engine's lock: no refit while an inference is enqueued (docs/engines.md section 3).
        """
        with self._lock:
            self._refit()

    def _refit(self) -> None:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        stream = self._feed_stream if self._from_device and self._feed_stream is not None else self._stream
        if self._from_device and self._folds:
            d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            for name in self._fold_inputs:  # queued after the rebuild on its stream
                a = self._staging[name]
                _check(cudart.cudaMemcpyAsync(a.ctypes.data, self._device[name], a.nbytes, d2h, stream),
                       "cudaMemcpyAsync")
            _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        for bn in self._folds:
            values = dict(self._bn_constants)
            values.update(self._staging)
            scale, shift = onnx_graph.derive_batchnorm(bn, values)
            np.copyto(self._fold_arrays[bn.scale], scale, casting="same_kind")
            np.copyto(self._fold_arrays[bn.shift], shift, casting="same_kind")
        if self._device:
            arrays = dict(self._fold_arrays)
            if not self._from_device:
                arrays.update((n, a) for n, a in self._staging.items() if n in self._registered)
            for name, a in arrays.items():
                _check(cudart.cudaMemcpyAsync(self._device[name], a.ctypes.data, a.nbytes, h2d, stream),
                       "cudaMemcpyAsync")
            self._supply_missing()
            ok = self._refitter.refit_cuda_engine_async(int(stream))
            _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        else:
            arrays = {n: a for n, a in self._staging.items() if n in self._from_slot}
            arrays.update(self._fold_arrays)
            for name, a in arrays.items():
                if not self._refitter.set_named_weights(name, self._trt.Weights(a)):
                    raise TvswitchError("TensorRT refused the weights of %r (shape or dtype differ from the plan's)"
                                        % name)
            self._supply_missing()
            ok = self._refitter.refit_cuda_engine()
        if not ok:
            missing = list(self._refitter.get_missing_weights())
            raise TvswitchError("TensorRT refit failed%s" % (" (missing weights: %s)" % ", ".join(missing[:5])
                                                            if missing else ""))

    def _supply_missing(self) -> None:
        """Set the graph's own values of the constants TensorRT reports missing for the next refit.

        Under ``REFIT`` every weight is refittable, constants too, and where TensorRT has
        combined a constant with a switchable weight (a scale folded into a MatMul) it
        wants both for a refit of either (``get_missing_weights``).  Their values never
        change: they are read from the graph once, the first time one is wanted, and kept
        (TensorRT reads host weights when it refits).  A missing name that is no constant
        of the graph is refused by name.
        """
        missing = list(self._refitter.get_missing_weights())
        if not missing:
            return
        if self._constant_values is None:
            from onnx import load_from_string

            graph = load_from_string(self._graph_bytes)
            self._constant_values = {n: self._host_constant(n, a)
                                     for n, a in graph_arrays(graph, self._constants).items()}
        unknown = [n for n in missing if n not in self._constant_values]
        if unknown:
            raise TvswitchError("TensorRT wants weight %r for the refit, which is no switchable weight and no "
                                "constant of the graph (%d such)" % (unknown[0], len(unknown)))
        trt = self._trt
        for name in missing:
            w = trt.Weights(self._constant_values[name])
            ok = (self._refitter.set_named_weights(name, w, trt.TensorLocation.HOST) if strips_weights(self._version)
                  else self._refitter.set_named_weights(name, w))
            if not ok:
                raise TvswitchError("TensorRT refused the graph's own value of constant %r" % name)

    def _host_constant(self, name: str, a: np.ndarray) -> np.ndarray:
        """A constant's value in the dtype TensorRT holds it in (TensorRT 10 says; TensorRT 8's parser
        makes int32 of int64 and float32 of float64)."""
        if hasattr(self._refitter, "get_weights_prototype"):
            dtype = self._trt.nptype(self._refitter.get_weights_prototype(name).dtype)
        else:
            dtype = {np.dtype(np.int64): np.int32, np.dtype(np.float64): np.float32}.get(a.dtype, a.dtype)
        return np.ascontiguousarray(a, dtype=dtype)

    def infer(self, inputs: Mapping[str, np.ndarray], slot: int = 0) -> Dict[str, np.ndarray]:
        """Copy inputs in, ``execute_async_v3`` on the engine's stream, copy outputs out."""
        self.check_inputs(inputs)
        with self._lock:
            return self._infer(inputs)

    def _infer(self, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        trt, cudart = self._trt, self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        allocations = []
        try:
            for name in self._inputs:
                a = cast_input(name, inputs[name], self._input_dtypes[name], self._input_dims[name],
                               index=name in self._index_inputs)
                if not self._context.set_input_shape(name, a.shape):
                    low, _, high = self._profile.get(name, (None, None, None))
                    raise TvswitchError("input %r is %s; the TensorRT engine was built for shapes %s to %s"
                                        % (name, list(a.shape), list(low or ()), list(high or ())))
                ptr = self._malloc(a.nbytes, allocations)
                _check(cudart.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, h2d, self._stream), "cudaMemcpyAsync")
                self._context.set_tensor_address(name, ptr)
            outputs = {}
            for name in self._outputs:
                out = np.empty(tuple(self._context.get_tensor_shape(name)),
                               dtype=trt.nptype(self._engine.get_tensor_dtype(name)))
                ptr = self._malloc(out.nbytes, allocations)
                self._context.set_tensor_address(name, ptr)
                outputs[name] = (out, ptr)
            if not self._context.execute_async_v3(int(self._stream)):
                raise TvswitchError("TensorRT inference failed")
            for out, ptr in outputs.values():
                _check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self._stream), "cudaMemcpyAsync")
            _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return {name: out for name, (out, _) in outputs.items()}
        finally:
            for ptr in allocations:
                self._cudart.cudaFree(ptr)

    def _malloc(self, nbytes: int, allocations: List[int]) -> int:
        err, ptr = self._cudart.cudaMalloc(max(nbytes, 1))
        _check(err, "cudaMalloc")
        allocations.append(int(ptr))
        return int(ptr)


def graph_arrays(model: "onnx.ModelProto", names: Iterable[str]) -> Dict[str, np.ndarray]:
    """The values of the graph's initializers and Constant nodes named in ``names``: TensorRT
    makes a weight of each, named as in the graph."""
    from onnx import numpy_helper

    wanted = set(names)
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in wanted:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                out[node.output[0]] = numpy_helper.to_array(value)
    return out


def trt_weights_dtype(trt: Any, dtype: np.dtype, name: str) -> Any:
    """TensorRT's DataType for a weight of numpy ``dtype``: float32 or float16, else a TvswitchError naming it."""
    attr = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(np.dtype(dtype))
    if attr is None:
        raise TvswitchError("weight %r is %s: the tensorrt engine refits float32 and float16 weights only"
                            % (name, np.dtype(dtype)))
    return getattr(trt, attr)
