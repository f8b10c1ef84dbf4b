"""The ONNX Runtime engine: switchable weights are graph inputs bound to fixed buffers.

Host weights (the CPU provider's default): each slot's weights are numpy arrays wrapped
once as ``OrtValue``s with ``OrtValue.ortvalue_from_numpy``, which shares the array's
memory: a rebuild written into the array in place is what the next run reads, with no
copy and no new session.

Device weights (the default with the CUDA provider first; ``weights_device``): host
arrays bound to a CUDA session would be copied to the GPU on *every run*, all of them.
Instead each weight is an ``OrtValue`` that ONNX Runtime allocates on the device once
(``ortvalue_from_shape_and_type``); the numpy slot is a host staging area the rebuild
writes, and ``publish`` copies it up with ``update_inplace``, which keeps each value's
address, so the bindings stay valid.  The engine is then *staged* (``publish_copies``):
the server lets requests run during the rebuild and holds them only for the upload.
Memory: the weights twice (host staging + device).  The staging logic runs on the CPU
in the tests (``weights_device="cpu"``: ONNX Runtime-owned host memory); the CUDA device
itself has not been run here.

The values are bound through ``IOBinding``; a binding carries its outputs, so one
binding serves one thread at a time: each thread gets its own per slot, made on its
first request and kept for its life.

Weights as inputs cost some speed: ONNX Runtime neither folds nor pre-packs what it
cannot see at session creation (docs/engines.md has the measured ratio).  Constant
weights would be faster but can only change by making a new session, which is the slow
path this project replaces.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.engines import onnx_graph
from tvswitch.runtime.engines.base import Engine, cast_input, run_failed

#: ONNX Runtime's log severities: 2 = warnings (its default), 3 = errors only.
WARNINGS, ERRORS = 2, 3


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise TvswitchError("the onnxruntime engine needs onnxruntime: pip install 'tvswitch[onnx]'") from None
    return onnxruntime


def _provider_name(provider: Any) -> str:
    """The name of a ``providers`` entry: a name, or a (name, options) pair as ONNX Runtime takes."""
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


def _weights_device(providers: Sequence[Any], asked: Optional[str] = None) -> Optional[Tuple[str, int]]:
    """(device type, id) where the weights live in ONNX Runtime's memory, or None for shared host arrays.

    ``asked`` ("cuda", "cpu") wins; otherwise CUDA when it is the first provider (its
    ``device_id`` option, default 0), because host weights would be uploaded every run.
    """
    first = providers[0]
    options = first[1] if isinstance(first, (tuple, list)) and len(first) > 1 else {}
    device_id = int(options.get("device_id", 0))
    if asked is not None:
        return asked, device_id
    return ("cuda", device_id) if _provider_name(first) == "CUDAExecutionProvider" else None


class OnnxRuntimeEngine(Engine):
    """An ONNX Runtime session whose weights are bound from slot buffers."""

    kind = "onnxruntime"

    def __init__(self, model: onnx_graph.ModelLike, *, names: Optional[Iterable[str]] = None, slots: int = 1,
                 providers: Optional[Sequence[Any]] = None, threads: int = 0,
                 session_options: Optional[object] = None, verbose: bool = False,
                 weights_device: Optional[str] = None):
        """Load ``model`` (path, bytes or ModelProto) and allocate ``slots`` weight sets.

        ``names`` picks the switchable weights of a graph without the exporter's record
        (normally a bundle's tensor names).  ``threads`` > 0 sets ONNX Runtime's
        intra-op threads.  ONNX Runtime logs errors only unless ``verbose`` (its warnings
        would otherwise land on the CLI's stderr); ``session_options``, where given,
        replace both.  ``weights_device`` puts the weights in ONNX Runtime's memory on
        that device (see the module docstring; default: CUDA when it is the first
        provider).  The values the file holds for its weights are bound
        into every slot and kept in ``defaults`` (the base it was exported with, which a
        rebuild can read; set it to None to free it where another base is used).
        """
        ort = _ort()
        if slots not in (1, 2):
            raise TvswitchError("slots must be 1 (in place) or 2 (double buffer), got %r" % slots)
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        self._device = _weights_device(providers, weights_device)
        if self._device is not None and slots != 1:
            raise TvswitchError("weights on %s are staged (publish uploads them while requests run): slots must be 1"
                                % self._device[0])
        proto = onnx_graph.load_model(model)
        weights = onnx_graph.find_weights(proto, names)
        if not weights:
            raise TvswitchError("the graph has no switchable weights: export it with tvswitch export-onnx, "
                                "or name its weights after the bundle's tensors")
        serving, self.defaults, self._specs = onnx_graph.serving_graph(proto, weights)
        self.unread_weights = onnx_graph.recorded_unread(proto)
        self._inputs = onnx_graph.data_inputs(serving, weights)
        declared = {i.name: i for i in serving.graph.input}
        self._input_specs = {n: onnx_graph.input_spec(declared[n]) for n in self._inputs}
        if session_options is None:
            session_options = session_options_for(threads, verbose)
        self.session = new_session(serving.SerializeToString(), session_options, providers)
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.slots = slots
        self.publish_copies = self._device is not None
        self._arrays: List[Dict[str, np.ndarray]] = []
        self._values: List[Dict[str, Any]] = []
        for _ in range(slots):
            arrays = {n: np.zeros(shape, dtype=dtype) for n, (shape, dtype) in self._specs.items()}
            self._arrays.append(arrays)
            self._values.append(self._ort_values(ort, arrays))
        self._local = threading.local()
        if all(n in self.defaults for n in self._specs):
            self.bind(self.defaults)

    def _ort_values(self, ort, arrays: Mapping[str, np.ndarray]) -> Dict[str, Any]:
        """The values the session is bound to: views of the arrays, or ONNX Runtime's own memory."""
        if self._device is None:
            return {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
        kind, device_id = self._device
        return {n: ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), a.dtype, kind, device_id)
                for n, a in arrays.items()}

    @property
    def input_names(self) -> Sequence[str]:
        return self._inputs

    @property
    def output_names(self) -> Sequence[str]:
        return self._outputs

    @property
    def weight_specs(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        return self._specs

    def buffers(self, slot: int = 0) -> Dict[str, np.ndarray]:
        return self._arrays[slot]

    def publish(self, slot: int = 0) -> None:
        """Host weights: nothing, the session reads the slot's arrays.  Device weights: upload the slot."""
        if self._device is not None:
            for name, value in self._values[slot].items():
                value.update_inplace(self._arrays[slot][name])

    def _binding(self, slot: int):
        bindings = getattr(self._local, "bindings", None)
        if bindings is None:
            bindings = self._local.bindings = {}
        binding = bindings.get(slot)
        if binding is None:
            binding = self.session.io_binding()
            for name, value in self._values[slot].items():
                binding.bind_ortvalue_input(name, value)
            for name in self._outputs:
                binding.bind_output(name)
            bindings[slot] = binding
        return binding

    def infer(self, inputs: Mapping[str, np.ndarray], slot: int = 0) -> Dict[str, np.ndarray]:
        self.check_inputs(inputs)
        arrays = {name: cast_input(name, inputs[name], self._input_specs[name][1], self._input_specs[name][0])
                  for name in self._inputs}
        binding = self._binding(slot)
        for name, a in arrays.items():
            binding.bind_cpu_input(name, a)
        binding.clear_binding_outputs()  # else the last run's outputs are reused, sized for its batch
        for name in self._outputs:
            binding.bind_output(name)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own exception types (a dynamic axis that does not fit)
            raise run_failed("ONNX Runtime", arrays, exc) from None
        return dict(zip(self._outputs, binding.copy_outputs_to_cpu()))


def session_options_for(threads: int = 0, verbose: bool = False):
    """SessionOptions with ``threads`` intra-op threads (0: ONNX Runtime's choice) and errors-only logs
    unless ``verbose``: shared with the benchmark's constant-weight sessions."""
    options = _ort().SessionOptions()
    options.log_severity_level = WARNINGS if verbose else ERRORS
    if threads > 0:
        options.intra_op_num_threads = int(threads)
    return options


def new_session(model: Any, options: Any, providers: Sequence[Any]):
    """An InferenceSession that really runs on ``providers[0]``, or a TvswitchError saying why not.

    ONNX Runtime falls back to the CPU, with a warning, when a provider is missing or
    fails to load; a benchmark or a server would then report CPU figures as CUDA ones.
    """
    ort = _ort()
    wanted = _provider_name(providers[0])
    if wanted not in ort.get_available_providers():
        raise TvswitchError("ONNX Runtime %s has no %s (it offers %s)"
                            % (ort.__version__, wanted, ", ".join(ort.get_available_providers())))
    session = ort.InferenceSession(model, sess_options=options, providers=list(providers))
    active = session.get_providers()
    if not active or active[0] != wanted:
        raise TvswitchError("ONNX Runtime could not enable %s (the session runs on %s)"
                            % (wanted, ", ".join(active) or "nothing"))
    return session
