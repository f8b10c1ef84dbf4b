"""FAKE TensorRT and CUDA runtime for tests: a test double, NOT TensorRT.

``FakeTensorRT(version)`` is a module-like object standing in for ``import tensorrt``;
``FakeCudart`` stands in for cuda-python's ``cuda.bindings.runtime``.  They implement the
subset of the documented TensorRT Python API that ``runtime/engines/tensorrt.py`` uses
(Builder, NetworkDefinition, OnnxParser, BuilderConfig and its flags, Runtime,
ICudaEngine, IExecutionContext, Refitter, OnnxParserRefitter, Weights, TensorLocation,
DataType) as the TensorRT 8.5/8.6/10.x documentation describes it, so that the engine's
own code runs here, and they do two things TensorRT does not:

* **record** every call (``calls``: a list of ``(what, details)``), so a test can check
  the sequence our code makes (which flags, which weights marked, registered, refitted,
  on which stream);
* **enforce the documented contracts** and fail loudly (``ContractViolation``) where
  TensorRT's behaviour would be undefined, or answer ``False`` where TensorRT answers
  ``False`` (and log the reason through the logger given, as TensorRT does):

  - API by version: TensorRT 8 has no ``TensorLocation`` argument to
    ``set_named_weights`` (host weights only), no ``refit_cuda_engine_async``, no
    ``get_weights_prototype``, no ``weights_validation``, no ``OnnxParserRefitter``, no
    ``BuilderFlag.STRIP_PLAN`` and no ``BuilderFlag.REFIT_INDIVIDUAL`` /
    ``mark_weights_refittable`` (``AttributeError``/``TypeError`` as a pybind module
    gives); the last two arrive with 10.2 here, as docs/engines.md section 3 has it.
    TensorRT 8's parser needs an ``EXPLICIT_BATCH`` network and casts int64 data inputs
    to int32.
  - Build: ``REFIT`` makes every weight refittable, ``REFIT_INDIVIDUAL`` the marked ones
    (``mark_weights_refittable`` answers False for a name that is not a weight of the
    network); ``STRIP_PLAN`` leaves the refittable weights' values out of the plan.  A
    plan records the TensorRT version and the GPU it was built on; a ``Runtime`` of
    another version, or on another GPU, answers ``None`` to ``deserialize_cuda_engine``.
  - Refit: ``set_named_weights`` answers False for a name that is not refittable or a
    count or dtype that differs; weights set stay registered and are *read at refit
    time* (host memory, or device memory for ``TensorLocation.DEVICE``, which must be an
    allocation of ``FakeCudart`` big enough, and host weights must not point into one).
    ``refit_cuda_engine``/``_async`` answer False while ``get_missing_weights`` is not
    empty: weights stripped from the plan and never supplied, and the fusion partners of
    a weight that was set (``fusions``: TensorRT may combine weights, e.g. fold a scale
    constant into a MatMul's weights; which ones it combines is TensorRT's business, so
    a test says).  ``refit_cuda_engine_async(stream)`` with work of the engine pending on
    another stream is a ``ContractViolation``.  ``fail_refits = n`` makes the next n
    refits write half of the weights and answer False, as the documentation allows ("a
    subset of weights may have been refitted").
  - Inference: ``execute_async_v3`` needs every I/O address set to ``FakeCudart``
    memory big enough, input shapes inside the optimization profile
    (``set_input_shape`` answers False otherwise), and no weight still stripped.

What it computes: ``execute_async_v3`` runs the parsed ONNX graph **in ONNX Runtime**
with the weights the engine holds after the refits (its own copies, as TensorRT keeps
weights in its own memory), reading inputs from and writing outputs to the fake device
memory.  So a test can tell whether our calls put the right numbers into the engine.
It does not emulate TensorRT's kernels, fusions, precision (FP16 is recorded, not
applied), timing or memory; nothing here has run on TensorRT.
"""
from __future__ import annotations

import ctypes
import json
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

PLAN_MAGIC = b"FAKE-TRT-PLAN\n"


class ContractViolation(AssertionError):
    """A call that the TensorRT/CUDA documentation leaves undefined or forbids."""


# ---- CUDA runtime (cuda-python's cuda.bindings.runtime), on host memory ----

class _CudaError(int):
    """cudaError_t: ``int(err) == 0`` is cudaSuccess."""


SUCCESS = _CudaError(0)


class FakeCudart:
    """The cuda-python runtime calls the engine makes; device memory is host memory.

    Allocations are tracked so that the fake TensorRT can tell device pointers from host
    ones; streams record work that is pending until synchronized.
    """

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's names
        cudaMemcpyHostToDevice = "HtoD"
        cudaMemcpyDeviceToHost = "DtoH"

    def __init__(self, name: str = "Orin", cc: Tuple[int, int] = (8, 7)):
        self.name, self.cc = name, cc
        self.mem: Dict[int, Any] = {}  # pointer -> ctypes buffer
        self.streams: Dict[int, List[str]] = {}  # stream -> pending work
        self.calls: List[Tuple[str, Any]] = []
        self._next_stream = 0x100

    # device
    def cudaGetDevice(self):  # noqa: N802
        return SUCCESS, 0

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return SUCCESS, SimpleNamespace(name=self.name.encode(), major=self.cc[0], minor=self.cc[1])

    # memory
    def cudaMalloc(self, nbytes):  # noqa: N802
        buf = ctypes.create_string_buffer(b"\xa5" * int(nbytes), int(nbytes))  # poisoned
        ptr = ctypes.addressof(buf)
        self.mem[ptr] = buf
        self.calls.append(("cudaMalloc", int(nbytes)))
        return SUCCESS, ptr

    def cudaFree(self, ptr):  # noqa: N802
        if int(ptr) not in self.mem:
            raise ContractViolation("cudaFree of %#x, which cudaMalloc did not return (or was freed)" % int(ptr))
        del self.mem[int(ptr)]
        return (SUCCESS,)

    def device_span(self, ptr: int) -> Optional[Tuple[int, int]]:
        """(base, size) of the device allocation holding ``ptr``, or None for host memory."""
        for base, buf in self.mem.items():
            if base <= ptr < base + ctypes.sizeof(buf):
                return base, ctypes.sizeof(buf)
        return None

    def check_device(self, ptr: int, nbytes: int, what: str) -> None:
        span = self.device_span(int(ptr))
        if span is None or int(ptr) + nbytes > span[0] + span[1]:
            raise ContractViolation("%s: %d bytes at %#x are not device memory from cudaMalloc" % (what, nbytes, ptr))

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: N802
        dst, src, nbytes = int(dst), int(src), int(nbytes)
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.check_device(dst, nbytes, "cudaMemcpyAsync HtoD destination")
        elif kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost:
            self.check_device(src, nbytes, "cudaMemcpyAsync DtoH source")
        else:
            raise ContractViolation("unknown cudaMemcpyKind %r" % (kind,))
        ctypes.memmove(dst, src, nbytes)  # done at once; still pending on the stream until synchronized
        self.streams.setdefault(int(stream), []).append("memcpy")
        self.calls.append(("cudaMemcpyAsync", (kind, nbytes, int(stream))))
        return (SUCCESS,)

    # streams
    def cudaStreamCreate(self):  # noqa: N802
        self._next_stream += 1
        self.streams[self._next_stream] = []
        return SUCCESS, self._next_stream

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.streams[int(stream)] = []
        self.calls.append(("cudaStreamSynchronize", int(stream)))
        return (SUCCESS,)

    def read(self, ptr: int, dtype: Any, count: int) -> np.ndarray:
        out = np.empty(count, dtype=dtype)
        ctypes.memmove(out.ctypes.data, int(ptr), out.nbytes)
        return out


# ---- TensorRT ----

class _Enum:
    """A pybind-like enum member: compares by identity, has a name."""

    def __init__(self, owner: str, name: str, value: int = 0):
        self.owner, self.name, self.value = owner, name, value

    def __repr__(self) -> str:
        return "%s.%s" % (self.owner, self.name)

    def __int__(self) -> int:
        return self.value


def _enum(owner: str, *names: str) -> SimpleNamespace:
    return SimpleNamespace(**{n: _Enum(owner, n, i) for i, n in enumerate(names)})


_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
       "BOOL": np.bool_}


class _Strict:
    """Objects that refuse attributes the real class does not have, as pybind objects do."""

    _attrs: Tuple[str, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and name not in self._attrs:
            raise AttributeError("'%s' object has no attribute '%s'" % (type(self).__name__, name))
        object.__setattr__(self, name, value)


class Weights:
    """trt.Weights: ``Weights(array)`` (host memory, kept alive) or ``Weights(dtype, ptr, count)``."""

    def __init__(self, *args: Any):
        if len(args) == 1:
            a = np.ascontiguousarray(args[0])
            self.array = a  # TensorRT's Weights keeps the array's buffer alive
            self.dtype = _dtype_of(a.dtype)
            self.ptr, self.count = a.ctypes.data, a.size
        elif len(args) == 3:
            self.array = None
            self.dtype, self.ptr, self.count = args[0], int(args[1]), int(args[2])
        else:
            raise TypeError("Weights(array) or Weights(type, ptr, count)")


_DTYPES = _enum("DataType", "FLOAT", "HALF", "INT8", "INT32", "BOOL", "INT64")


def _dtype_of(np_dtype: Any) -> _Enum:
    for name, t in _NP.items():
        if np.dtype(t) == np.dtype(np_dtype):
            return getattr(_DTYPES, name)
    raise TypeError("no TensorRT DataType for %s" % np_dtype)


class FakeTensorRT:
    """``import tensorrt`` as TensorRT ``version`` documents it, on ``cuda`` (a FakeCudart).

    ``fusions``: weight name -> names of other weights TensorRT combined it with under
    ``REFIT`` (see the module docstring).  ``calls``: everything our code asked.
    """

    def __init__(self, version: str, cuda: FakeCudart, fusions: Optional[Mapping[str, Iterable[str]]] = None):
        self.__version__ = version
        self._v = tuple(int(p) for p in version.split(".")[:2])
        self._cuda = cuda
        self.fusions = {k: list(v) for k, v in (fusions or {}).items()}
        self.calls: List[Tuple[str, Any]] = []
        self.builds = 0
        self.fail_refits = 0
        fake = self

        self.float32, self.float16, self.int32, self.int8, self.bool = (
            _DTYPES.FLOAT, _DTYPES.HALF, _DTYPES.INT32, _DTYPES.INT8, _DTYPES.BOOL)
        self.DataType = _DTYPES
        if self._v >= (10, 0):
            self.int64 = _DTYPES.INT64
        self.TensorLocation = _enum("TensorLocation", "DEVICE", "HOST")
        self.MemoryPoolType = _enum("MemoryPoolType", "WORKSPACE")
        self.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH")
        flags = ["FP16", "REFIT"] + (["STRIP_PLAN"] if self._v >= (10, 0) else []) + (
            ["REFIT_INDIVIDUAL"] if self._v >= (10, 2) else [])
        self.BuilderFlag = _enum("BuilderFlag", *flags)
        self.Weights = Weights

        class Logger:
            WARNING, ERROR, INFO, VERBOSE = "WARNING", "ERROR", "INFO", "VERBOSE"

            def __init__(self, severity: str = "WARNING"):
                self.severity = severity
                self.messages: List[str] = []

            def log(self, message: str) -> None:
                self.messages.append(message)
                fake.calls.append(("log", message))

        self.Logger = Logger
        self.Builder = lambda logger: _Builder(fake, logger)
        self.OnnxParser = lambda network, logger: _OnnxParser(fake, network, logger)
        self.Runtime = lambda logger: _Runtime(fake, logger)
        self.Refitter = lambda engine, logger: (_Refitter10 if self._v >= (10, 0) else _Refitter8)(fake, engine,
                                                                                                   logger)
        if self._v >= (10, 0):
            self.OnnxParserRefitter = lambda refitter, logger: _OnnxParserRefitter(fake, refitter, logger)

    def nptype(self, dtype: _Enum) -> Any:
        return _NP[dtype.name]

    def record(self, what: str, details: Any = None) -> None:
        self.calls.append((what, details))

    def called(self, what: str) -> List[Any]:
        """The details of every recorded call named ``what``."""
        return [d for w, d in self.calls if w == what]

    def device_identity(self) -> str:
        return "%s sm_%d%d" % (self._cuda.name, self._cuda.cc[0], self._cuda.cc[1])


# ---- the network and its weights, from the ONNX graph ----

class _Tensor:
    def __init__(self, name: str, shape: Tuple[int, ...], dtype: _Enum):
        self.name, self.shape, self.dtype = name, shape, dtype


def _graph_weights(model: Any) -> Dict[str, np.ndarray]:
    """The float initializers some node reads and the float Constant nodes of ``model``: what
    TensorRT's parser makes weights of (an initializer no node reads becomes no layer)."""
    from onnx import numpy_helper

    read = {n for node in model.graph.node for n in node.input}
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in read}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return {n: a for n, a in out.items() if np.issubdtype(a.dtype, np.floating)}


class _Network(_Strict):
    def __init__(self, fake: FakeTensorRT, flags: int):
        self._fake, self._flags = fake, flags
        self._model = None
        self._weights: Dict[str, np.ndarray] = {}
        self._marked: List[str] = []
        self._inputs: List[_Tensor] = []
        self._outputs: List[_Tensor] = []
        if fake._v >= (10, 2):
            object.__setattr__(self, "mark_weights_refittable", self._mark)

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    def get_input(self, i: int) -> _Tensor:
        return self._inputs[i]

    def _mark(self, name: str) -> bool:
        self._fake.record("mark_weights_refittable", name)
        if name not in self._weights:
            return False
        self._marked.append(name)
        return True


def _io(fake: FakeTensorRT, value_info: Any) -> _Tensor:
    from onnx import helper

    t = value_info.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))
    if np_dtype == np.int64 and fake._v < (10, 0):
        np_dtype = np.dtype(np.int32)  # TensorRT 8 has no INT64 tensors: its parser casts them down
    return _Tensor(value_info.name, shape, _dtype_of(np_dtype))


class _OnnxParser:
    def __init__(self, fake: FakeTensorRT, network: _Network, logger: Any):
        self._fake, self._network, self._errors = fake, network, []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, i: int) -> str:
        return self._errors[i]

    def parse(self, data: bytes) -> bool:
        import onnx

        self._fake.record("parse", len(data))
        if self._fake._v < (10, 0) and not self._network._flags & (1 << int(
                self._fake.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)):
            self._errors.append("the ONNX parser needs an explicit batch network (TensorRT 8)")
            return False
        model = onnx.load_from_string(bytes(data))
        net = self._network
        net._model = model
        net._weights = _graph_weights(model)
        inits = {t.name for t in model.graph.initializer}
        net._inputs = [_io(self._fake, i) for i in model.graph.input if i.name not in inits]
        net._outputs = [_io(self._fake, o) for o in model.graph.output]
        return True


class _Profile(_Strict):
    def __init__(self) -> None:
        self._shapes: Dict[str, Tuple[Tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
        self._shapes[name] = (tuple(mn), tuple(opt), tuple(mx))


class _Config(_Strict):
    def __init__(self, fake: FakeTensorRT):
        self._fake, self._flags, self._profiles = fake, set(), []

    def set_flag(self, flag: _Enum) -> None:
        self._fake.record("set_flag", flag.name)
        self._flags.add(flag.name)

    def set_memory_pool_limit(self, pool: _Enum, size: int) -> None:
        self._fake.record("set_memory_pool_limit", (pool.name, size))

    def add_optimization_profile(self, profile: _Profile) -> int:
        self._profiles.append(profile)
        return len(self._profiles) - 1


class _Builder(_Strict):
    def __init__(self, fake: FakeTensorRT, logger: Any):
        self._fake = fake

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(self._fake, flags)

    def create_builder_config(self) -> _Config:
        return _Config(self._fake)

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> Optional[bytes]:
        """The plan: a JSON header (version, GPU, flags, refittable and stripped names, I/O, profile)
        and the ONNX graph, with the stripped weights' values left out."""
        from onnx import numpy_helper

        fake = self._fake
        fake.builds += 1
        flags = config._flags
        if "REFIT" in flags and "REFIT_INDIVIDUAL" in flags:
            raise ContractViolation("REFIT and REFIT_INDIVIDUAL together")
        if "REFIT_INDIVIDUAL" in flags:
            refittable = list(dict.fromkeys(network._marked))
        elif "REFIT" in flags:
            refittable = list(network._weights)
        else:
            refittable = []
        dynamic = [t.name for t in network._inputs if any(d < 0 for d in t.shape)]
        shapes = config._profiles[0]._shapes if config._profiles else {}
        lacking = [n for n in dynamic if n not in shapes]
        if lacking:
            network._fake.record("log", "no optimization profile for dynamic input %s" % lacking[0])
            return None
        stripped = refittable if "STRIP_PLAN" in flags else []
        model = network._model
        from onnx import ModelProto

        plan_model = ModelProto()
        plan_model.CopyFrom(model)
        for t in plan_model.graph.initializer:
            if t.name in stripped:  # the value is not in the plan: the name, shape and type are
                t.CopyFrom(numpy_helper.from_array(np.zeros((0,), numpy_helper.to_array(t).dtype), t.name))
        header = dict(version=fake.__version__, device=fake.device_identity(), flags=sorted(flags),
                      refittable=refittable, stripped=stripped, profile={n: [list(s) for s in v]
                                                                          for n, v in shapes.items()},
                      inputs=[[t.name, list(t.shape), t.dtype.name] for t in network._inputs],
                      outputs=[[t.name, list(t.shape), t.dtype.name] for t in network._outputs],
                      shapes={n: list(a.shape) for n, a in network._weights.items()},
                      dtypes={n: str(a.dtype) for n, a in network._weights.items()})
        fake.record("build_serialized_network", dict(flags=sorted(flags), refittable=len(refittable)))
        head = json.dumps(header).encode()
        return PLAN_MAGIC + len(head).to_bytes(8, "little") + head + plan_model.SerializeToString()


class _Runtime(_Strict):
    def __init__(self, fake: FakeTensorRT, logger: Any):
        self._fake, self._logger = fake, logger

    def deserialize_cuda_engine(self, plan: bytes) -> Optional["_Engine"]:
        import onnx

        fake = self._fake
        plan = bytes(plan)
        fake.record("deserialize_cuda_engine", len(plan))
        if not plan.startswith(PLAN_MAGIC):
            self._logger.log("plan is not a TensorRT plan")
            return None
        n = int.from_bytes(plan[len(PLAN_MAGIC):len(PLAN_MAGIC) + 8], "little")
        start = len(PLAN_MAGIC) + 8
        try:
            header = json.loads(plan[start:start + n])
            model = onnx.load_from_string(plan[start + n:])
        except ValueError:
            self._logger.log("plan is damaged")
            return None
        if header["version"] != fake.__version__:
            self._logger.log("plan was built by TensorRT %s, this is %s" % (header["version"], fake.__version__))
            return None
        if header["device"] != fake.device_identity():
            self._logger.log("plan was built on %s, this is %s" % (header["device"], fake.device_identity()))
            return None
        return _Engine(fake, header, model)


class _Engine(_Strict):
    """ICudaEngine: its own copy of every weight (None while stripped), the graph to run them with."""

    def __init__(self, fake: FakeTensorRT, header: dict, model: Any):
        self._fake, self._header, self._model = fake, header, model
        values = _graph_weights(model)
        self._weights: Dict[str, Optional[np.ndarray]] = {
            n: (None if n in header["stripped"] else values[n].copy()) for n in header["shapes"]}
        self._io = {name: (tuple(shape), getattr(_DTYPES, dt)) for name, shape, dt in header["inputs"]
                    + header["outputs"]}
        self._inputs = [i[0] for i in header["inputs"]]
        self._outputs = [o[0] for o in header["outputs"]]

    def get_tensor_dtype(self, name: str) -> _Enum:
        return self._io[name][1]

    def get_tensor_shape(self, name: str) -> Tuple[int, ...]:
        return self._io[name][0]

    def create_execution_context(self) -> "_Context":
        return _Context(self)

    def run(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        """The graph in ONNX Runtime with the engine's weights: what a TensorRT engine would compute."""
        import onnxruntime as ort
        from onnx import ModelProto, numpy_helper

        stripped = [n for n, a in self._weights.items() if a is None]
        if stripped:
            raise ContractViolation("inference on a weight-stripped engine before %r (and %d more) was refitted"
                                    % (stripped[0], len(stripped) - 1))
        model = ModelProto()
        model.CopyFrom(self._model)
        for t in model.graph.initializer:
            if t.name in self._weights:
                t.CopyFrom(numpy_helper.from_array(self._weights[t.name], t.name))
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output[0] in self._weights:
                for attr in node.attribute:
                    if attr.name == "value":
                        attr.t.CopyFrom(numpy_helper.from_array(self._weights[node.output[0]], node.output[0]))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        declared = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        from onnx import helper

        cast = {n: a.astype(helper.tensor_dtype_to_np_dtype(declared[n])) for n, a in feeds.items()}
        return session.run(self._outputs, cast)


class _Context(_Strict):
    def __init__(self, engine: _Engine):
        self._engine, self._shapes, self._addresses = engine, {}, {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        declared = self._engine._io[name][0]
        profile = self._engine._header["profile"].get(name)
        ok = len(shape) == len(declared) and all(d < 0 or d == s for d, s in zip(declared, shape))
        if ok and profile is not None:
            mn, _, mx = profile
            ok = all(a <= s <= b for a, s, b in zip(mn, shape, mx))
        if ok:
            self._shapes[name] = shape
        return ok

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self._addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name: str) -> Tuple[int, ...]:
        if name in self._shapes:
            return self._shapes[name]
        declared = self._engine._io[name][0]
        if name in self._engine._inputs or all(d >= 0 for d in declared):
            return declared
        missing = [n for n in self._engine._inputs if n not in self._shapes]
        if missing:
            return declared  # unknown until every input shape is set: -1 dims, as TensorRT answers
        return tuple(self._run_shapes()[name])

    def _feeds(self) -> Dict[str, np.ndarray]:
        cuda = self._engine._fake._cuda
        feeds = {}
        for name in self._engine._inputs:
            shape = self._shapes.get(name, self._engine._io[name][0])
            dtype = self._engine._fake.nptype(self._engine._io[name][1])
            count = int(np.prod(shape))
            if name not in self._addresses:
                raise ContractViolation("execute_async_v3 before the address of input %r was set" % name)
            cuda.check_device(self._addresses[name], count * np.dtype(dtype).itemsize, "input %r" % name)
            feeds[name] = cuda.read(self._addresses[name], dtype, count).reshape(shape)
        return feeds

    def _run_shapes(self) -> Dict[str, Tuple[int, ...]]:
        outs = self._engine.run({n: np.zeros(self._shapes[n], self._engine._fake.nptype(self._engine._io[n][1]))
                                 for n in self._engine._inputs})
        return {n: o.shape for n, o in zip(self._engine._outputs, outs)}

    def execute_async_v3(self, stream_handle: int) -> bool:
        fake, cuda = self._engine._fake, self._engine._fake._cuda
        stream = int(stream_handle)
        fake.record("execute_async_v3", stream)
        dynamic = [n for n in self._engine._inputs if any(d < 0 for d in self._engine._io[n][0])]
        unset = [n for n in dynamic if n not in self._shapes]
        if unset:
            raise ContractViolation("execute_async_v3 before the shape of dynamic input %r was set" % unset[0])
        outs = self._engine.run(self._feeds())
        for name, out in zip(self._engine._outputs, outs):
            if name not in self._addresses:
                raise ContractViolation("execute_async_v3 before the address of output %r was set" % name)
            out = np.ascontiguousarray(out, dtype=fake.nptype(self._engine._io[name][1]))
            cuda.check_device(self._addresses[name], out.nbytes, "output %r" % name)
            ctypes.memmove(self._addresses[name], out.ctypes.data, out.nbytes)
        cuda.streams.setdefault(stream, []).append("inference")
        return True


# ---- refit ----

class _Refitter8(_Strict):
    """trt.Refitter as TensorRT 8 documents it: host weights, refit_cuda_engine()."""

    def __init__(self, fake: FakeTensorRT, engine: _Engine, logger: Any):
        self._fake, self._engine, self._logger = fake, engine, logger
        self._set: Dict[str, Tuple[Weights, str]] = {}
        fake.record("Refitter")

    def get_all_weights(self) -> List[str]:
        return list(self._engine._header["refittable"])

    def get_missing_weights(self) -> List[str]:
        """Weights stripped and not supplied, and fusion partners of weights set but not set themselves."""
        refittable = self._engine._header["refittable"]
        missing = [n for n in self._engine._header["stripped"] if n not in self._set]
        if "REFIT" in self._engine._header["flags"]:
            for name in self._set:
                missing += [p for p in self._fake.fusions.get(name, ()) if p in refittable and p not in self._set]
        return list(dict.fromkeys(missing))

    def _check(self, name: str, weights: Weights, location: str) -> bool:
        header, cuda = self._engine._header, self._fake._cuda
        if name not in header["refittable"]:
            self._logger.log("%s is not a refittable weight" % name)
            return False
        count = int(np.prod(header["shapes"][name]))
        if weights.count != count or self._fake.nptype(weights.dtype) != np.dtype(header["dtypes"][name]):
            self._logger.log("weights %s: %s[%d] given, %s[%d] expected" % (
                name, weights.dtype.name, weights.count, header["dtypes"][name], count))
            return False
        nbytes = count * np.dtype(header["dtypes"][name]).itemsize
        if location == "DEVICE":
            cuda.check_device(weights.ptr, nbytes, "DEVICE weights %r" % name)
        elif cuda.device_span(weights.ptr) is not None:
            raise ContractViolation("HOST weights %r point into device memory" % name)
        return True

    def set_named_weights(self, name: str, weights: Weights) -> bool:
        self._fake.record("set_named_weights", (name, "HOST"))
        if not self._check(name, weights, "HOST"):
            return False
        self._set[name] = (weights, "HOST")
        return True

    def _refit(self) -> bool:
        if self.get_missing_weights():
            self._logger.log("refit with missing weights: %s" % ", ".join(self.get_missing_weights()))
            return False
        cuda = self._fake._cuda
        header = self._engine._header
        names = list(self._set)
        if self._fake.fail_refits:
            self._fake.fail_refits -= 1
            names = names[:len(names) // 2]  # "a subset of weights may have been refitted"
        for name in names:
            weights, _ = self._set[name]
            value = cuda.read(weights.ptr, header["dtypes"][name], weights.count).reshape(header["shapes"][name])
            self._engine._weights[name] = value
        return len(names) == len(self._set)

    def refit_cuda_engine(self) -> bool:
        self._fake.record("refit_cuda_engine")
        busy = {s: n for s, n in self._fake._cuda.streams.items() if "inference" in n}
        if busy:
            raise ContractViolation("refit while inference is enqueued on stream %#x" % next(iter(busy)))
        return self._refit()


class _Refitter10(_Refitter8):
    """trt.Refitter as TensorRT 10 documents it: host or device weights, asynchronous refit."""

    _attrs = ("weights_validation",)

    def __init__(self, fake: FakeTensorRT, engine: _Engine, logger: Any):
        super().__init__(fake, engine, logger)
        self.weights_validation = True

    def set_named_weights(self, name: str, weights: Weights, location: Any = None) -> bool:  # type: ignore[override]
        where = "HOST" if location is None else location.name
        self._fake.record("set_named_weights", (name, where))
        if not self._check(name, weights, where):
            return False
        self._set[name] = (weights, where)
        return True

    def get_weights_prototype(self, name: str) -> Weights:
        header = self._engine._header
        return Weights(_dtype_of(np.dtype(header["dtypes"][name])), 0, int(np.prod(header["shapes"][name])))

    def refit_cuda_engine_async(self, stream: int) -> bool:
        stream = int(stream)
        self._fake.record("refit_cuda_engine_async", stream)
        busy = [s for s, n in self._fake._cuda.streams.items() if s != stream and "inference" in n]
        if busy:
            raise ContractViolation("refit_cuda_engine_async on stream %#x while the engine has work pending on "
                                    "stream %#x" % (stream, busy[0]))
        ok = self._refit()
        self._fake._cuda.streams.setdefault(stream, []).append("refit")
        return ok


class _OnnxParserRefitter(_Strict):
    """trt.OnnxParserRefitter (TensorRT 10): sets every refittable weight the ONNX graph holds."""

    def __init__(self, fake: FakeTensorRT, refitter: _Refitter10, logger: Any):
        self._fake, self._refitter = fake, refitter
        self._arrays: List[np.ndarray] = []  # host memory of the weights it set: alive as long as this is

    def refit_from_bytes(self, data: bytes) -> bool:
        import onnx

        self._fake.record("refit_from_bytes", len(data))
        values = _graph_weights(onnx.load_from_string(bytes(data)))
        ok = True
        for name in self._refitter.get_all_weights():
            if name not in values:
                ok = False
                continue
            a = np.ascontiguousarray(values[name])
            self._arrays.append(a)
            ok = self._refitter.set_named_weights(name, Weights(a), self._fake.TensorLocation.HOST) and ok
        return ok


def install(monkeypatch: Any, version: str, *, device: str = "Orin", cc: Tuple[int, int] = (8, 7),
            fusions: Optional[Mapping[str, Iterable[str]]] = None, cuda: Optional[FakeCudart] = None
            ) -> FakeTensorRT:
    """Make ``import tensorrt`` and the engine's CUDA runtime the fakes, for one test."""
    import sys

    from tvswitch.runtime.engines import tensorrt as engine_module

    cuda = cuda or FakeCudart(device, cc)
    fake = FakeTensorRT(version, cuda, fusions)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(engine_module, "_cudart", lambda: cuda)
    return fake


__all__ = ["ContractViolation", "FakeCudart", "FakeTensorRT", "Weights", "install"]
