"""The ONNX Runtime engine: switchable weights are graph inputs bound to fixed buffers.

Each slot's weights are numpy arrays wrapped once as ``OrtValue``s with
``OrtValue.ortvalue_from_numpy``, which shares the array's memory on the CPU: a rebuild
written into the array in place is what the next run reads, with no copy and no new
session.  The values are bound through ``IOBinding``; a binding carries its outputs, so
one binding serves one thread at a time: each thread gets its own per slot, made on its
first request and kept for its life.

Weights as inputs cost some speed: ONNX Runtime neither folds nor pre-packs what it
cannot see at session creation (docs/engines.md has the measured ratio).  Constant
weights would be faster but can only change by making a new session, which is the slow
path this project replaces.
"""
from __future__ import annotations

import threading
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.engines import onnx_graph
from tvswitch.runtime.engines.base import Engine


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise TvswitchError("the onnxruntime engine needs onnxruntime: pip install 'tvswitch[onnx]'") from None
    return onnxruntime


class OnnxRuntimeEngine(Engine):
    """An ONNX Runtime session whose weights are bound from slot buffers."""

    kind = "onnxruntime"

    def __init__(self, model: onnx_graph.ModelLike, *, names: Optional[Iterable[str]] = None, slots: int = 1,
                 providers: Optional[Sequence[str]] = None, threads: int = 0,
                 session_options: Optional[object] = None):
        """Load ``model`` (path, bytes or ModelProto) and allocate ``slots`` weight sets.

        ``names`` picks the switchable weights of a graph without the exporter's record
        (normally a bundle's tensor names).  ``threads`` > 0 sets ONNX Runtime's
        intra-op threads.  The values the file holds for its weights are bound into
        every slot and kept in ``defaults`` (the base it was exported with, which a
        rebuild can read; set it to None to free it where another base is used).
        """
        ort = _ort()
        if slots not in (1, 2):
            raise TvswitchError("slots must be 1 (in place) or 2 (double buffer), got %r" % slots)
        proto = onnx_graph.load_model(model)
        weights = onnx_graph.find_weights(proto, names)
        if not weights:
            raise TvswitchError("the graph has no switchable weights: export it with tvswitch export-onnx, "
                                "or name its weights after the bundle's tensors")
        serving, self.defaults, self._specs = onnx_graph.serving_graph(proto, weights)
        self._inputs = onnx_graph.data_inputs(serving, weights)
        declared = {i.name: i for i in serving.graph.input}
        self._input_dtypes = {n: onnx_graph.input_spec(declared[n])[1] for n in self._inputs}
        if session_options is None:
            session_options = ort.SessionOptions()
            if threads > 0:
                session_options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(serving.SerializeToString(), sess_options=session_options,
                                            providers=list(providers) if providers else ["CPUExecutionProvider"])
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.slots = slots
        self._arrays: List[Dict[str, np.ndarray]] = []
        self._values: List[Dict[str, object]] = []
        for _ in range(slots):
            arrays = {n: np.zeros(shape, dtype=dtype) for n, (shape, dtype) in self._specs.items()}
            self._arrays.append(arrays)
            self._values.append({n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()})
        self._local = threading.local()
        if all(n in self.defaults for n in self._specs):
            self.bind(self.defaults)

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
        """Nothing to do: the session reads the slot's arrays through their OrtValues."""

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
        binding = self._binding(slot)
        for name in self._inputs:
            binding.bind_cpu_input(name, np.ascontiguousarray(inputs[name], dtype=self._input_dtypes[name]))
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own exception types for bad shapes or dtypes
            raise TvswitchError("ONNX Runtime could not run the inputs given (%s)" % str(exc).splitlines()[0]) from None
        return dict(zip(self._outputs, binding.copy_outputs_to_cpu()))
