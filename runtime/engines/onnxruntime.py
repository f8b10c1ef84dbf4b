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
cannot see at session creation (docs/engines.md has the measured ratio: little at 8 x 64
tokens, a third of the time at 1 x 16, nearly all of it pre-packing).  Constant weights
are faster but can only change by making a new session, which is the slow path this
project replaces.  ``constant_session=True`` has both: a switch is served at once
through the bound inputs, and a constant-weight session of the new weights, made in the
background, takes over once it is ready (``_ConstantSessions``; memory about 2x the
switchable weights more).  Weights that no switch changes (a bundle's ``base_only``
tensors: ``constants``) are constants of the session from the start, pre-packed, with
no slot of their own.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.checkpoint import contiguous
from tvswitch.runtime.engines import onnx_graph
from tvswitch.runtime.engines.base import Engine, cast_input, run_failed

#: ONNX Runtime's log severities: 2 = warnings (its default), 3 = errors only.
WARNINGS, ERRORS = 2, 3

log = logging.getLogger("tvswitch.onnxruntime")

#: Constants' bytes beyond which the graph that carries them would pass protobuf's 2 GB limit.
PROTO_LIMIT = (2 << 30) - (64 << 20)


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
                 weights_device: Optional[str] = None, constant_session: bool = False,
                 constants: Optional[Mapping[str, Optional[np.ndarray]]] = None):
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
        ``constant_session`` keeps a constant-weight session of the weights served, made
        in the background after each switch (see ``use_constant_sessions``).
        ``constants`` (name -> array, or None for the value the file holds, where it holds
        one) are weights that no switch changes (a bundle's ``base_only`` tensors;
        ``serve_bundle`` passes them): they are constants of the session, which pre-packs
        them as it does a constant-weight graph's, with no slot arrays.  On the CPU provider
        the arrays are handed to ONNX Runtime (``SessionOptions.add_initializer``, added to
        the options given, which then serve this engine only), which reads those it does not
        transform from them rather than from a copy; they must not change.  Names that are
        no weight of the graph are ignored, and so are all of them where the graph carrying
        them would pass protobuf's 2 GB (a warning says so): ``Engine.constants`` lists what
        is held.
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
        serving, self.defaults, specs = onnx_graph.serving_graph(proto, weights)
        self.constants = held_constants(constants or {}, specs, self.defaults)
        self._specs = {n: spec for n, spec in specs.items() if n not in self.constants}
        self.unread_weights = onnx_graph.recorded_unread(proto)
        self.weight_copies = onnx_graph.weight_copies(proto, weights)
        self.weight_aliases = onnx_graph.recorded_aliases(proto)
        self.head_cuts = onnx_graph.recorded_heads(proto)
        self._inputs = onnx_graph.data_inputs(serving, weights)
        self._index_inputs = onnx_graph.index_inputs(serving, self._inputs, weights)
        declared = {i.name: i for i in serving.graph.input}
        self._input_specs = {n: onnx_graph.input_spec(declared[n]) for n in self._inputs}
        if session_options is None:
            session_options = session_options_for(threads, verbose)
        # host arrays on a CUDA session would be copied to the device anyway (from the graph's copy)
        on_cpu = _provider_name(providers[0]) == "CPUExecutionProvider"
        self._shared = share_constants(session_options, self.constants) if on_cpu else []  # kept alive here
        self.session = new_session(onnx_graph.constant_graph(serving, self.constants).SerializeToString(),
                                   session_options, providers)
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
        self._constant: Optional[_ConstantSessions] = None
        if constant_session:
            if self._device is not None:
                raise TvswitchError("constant_session serves host weights: not with weights on %s" % self._device[0])
            self._constant = _ConstantSessions(self, serving, session_options, providers)
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
        """The slot's arrays; with constant sessions, asking for them retires the slot's constant
        session (whoever asks is about to write them)."""
        if self._constant is not None:
            self._constant.retire(slot)
        return self._arrays[slot]

    def publish(self, slot: int = 0) -> None:
        """Host weights: nothing, the session reads the slot's arrays.  Device weights: upload the slot.
        With constant sessions, one of the slot's weights starts being made in the background."""
        if self._device is not None:
            for name, value in self._values[slot].items():
                value.update_inplace(self._arrays[slot][name])
        if self._constant is not None:
            self._constant.renew(slot)

    def close(self) -> None:
        """Stop making constant-weight sessions and wait for the one in progress (see ``_ConstantSessions``)."""
        if self._constant is not None:
            self._constant.close()

    def wait_constant(self, slot: int = 0, timeout: Optional[float] = None) -> bool:
        """Wait until the constant-weight session of what ``slot`` holds serves; False on timeout
        (or without ``constant_session``)."""
        return self._constant is not None and self._constant.wait(slot, timeout)

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
        arrays = {name: cast_input(name, inputs[name], self._input_specs[name][1], self._input_specs[name][0],
                                   index=name in self._index_inputs)
                  for name in self._inputs}
        constant = self._constant.session(slot) if self._constant is not None else None
        if constant is not None:
            try:
                return dict(zip(self._outputs, constant.run(self._outputs, arrays)))
            except Exception as exc:  # onnxruntime's own exception types (a dynamic axis that does not fit)
                raise run_failed("ONNX Runtime", arrays, exc) from None
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


class _ConstantSessions:
    """Per slot, a session with the slot's weights as constants, made in the background after a switch.

    Why: weights as inputs cost ONNX Runtime its pre-packing of constant weights (MLAS
    packs a MatMul's constant B once at session creation; an input B is packed at every
    run), which is most of a small batch's time (MiniLM, 1 x 16 tokens: ~0.65 of the
    constant-weight speed; 8 x 64: ~0.93; docs/engines.md section 6).  A switch stays
    the in-place rebuild, served at once through the bound inputs; meanwhile one worker
    thread copies the slot into a graph, makes a constant-weight session of it (what the
    naive way does per switch, here off the request path) and, if the slot was not
    rewritten in the meantime, requests on that slot use it.  Generations make that
    safe: asking for a slot's buffers (which a writer does before writing: the server
    does, and a caller writing them must take them afresh each time) and publishing
    each move the slot on, and a session is only used for the generation it was made
    from, so a copy torn by a write that began during it is never served.  Cost: the
    constant session's memory (its weights and their packed copies, about 2x the
    switchable weights, plus the graph's copy while one is made) and one session
    creation of CPU time per switch; a switch that comes before the last one's session
    is ready supersedes it.  A session that cannot be made is logged (``tvswitch.onnxruntime``)
    and the bound inputs go on serving.

    The worker is not a daemon thread: ONNX Runtime aborts the process ("terminate called
    without an active exception") when the interpreter exits while a session is being
    made on a daemon thread, so exit waits for the session in progress (under a second for
    MiniLM), and ``close`` drops the jobs not begun and waits for that one.
    """

    def __init__(self, engine: "OnnxRuntimeEngine", serving: Any, options: Any, providers: Sequence[Any]):
        self._engine, self._serving, self._options, self._providers = engine, serving, options, list(providers)
        self._cond = threading.Condition()
        self._generation = [0] * engine.slots
        self._sessions: List[Optional[Tuple[int, Any]]] = [None] * engine.slots
        self._wanted: Dict[int, int] = {}  # slot -> generation to make a session of
        self._working = False
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._retired: List[Any] = []  # freed by the worker: freeing a session takes the switch tens of ms

    def retire(self, slot: int) -> None:
        with self._cond:
            self._generation[slot] += 1
            if self._sessions[slot] is not None:
                self._retired.append(self._sessions[slot])
                self._sessions[slot] = None

    def renew(self, slot: int) -> None:
        self.retire(slot)
        with self._cond:
            if self._closed:
                return
            self._wanted[slot] = self._generation[slot]
            if not self._working:
                self._working = True
                self._thread = threading.Thread(target=self._work, name="tvswitch-constant-session", daemon=False)
                self._thread.start()

    def close(self) -> None:
        """Make no more sessions; wait for the one being made, if any."""
        with self._cond:
            self._closed = True
            self._wanted.clear()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def session(self, slot: int) -> Any:
        entry = self._sessions[slot]
        return entry[1] if entry is not None and entry[0] == self._generation[slot] else None

    def wait(self, slot: int, timeout: Optional[float]) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.session(slot) is not None, timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                retired, self._retired = self._retired, []
                job = self._wanted.popitem() if self._wanted else None
                if job is None and not retired:
                    self._working = False
                    return
            del retired  # sessions freed here, outside the lock
            if job is None:
                continue
            slot, generation = job
            try:  # the graph copies the slot's values: no snapshot of them is needed first
                model = onnx_graph.constant_graph(self._serving, {**self._engine.constants,
                                                                  **self._engine._arrays[slot]})
            except Exception as exc:  # noqa: BLE001 - the bound inputs keep serving; nothing is lost
                log.warning("no constant-weight session for slot %d: %s", slot, exc)
                continue
            with self._cond:
                if self._generation[slot] != generation:  # a write began while they were copied: torn
                    continue
            try:
                session = new_session(model.SerializeToString(), self._options, self._providers)
            except Exception as exc:  # noqa: BLE001
                log.warning("no constant-weight session for slot %d: %s", slot, exc)
                continue
            with self._cond:
                if self._generation[slot] == generation:
                    self._sessions[slot] = (generation, session)
                    self._cond.notify_all()


def held_constants(asked: Mapping[str, Optional[np.ndarray]], specs: onnx_graph.WeightSpecs,
                   defaults: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The arrays of the weights asked to be constants, as the graph declares them: None takes
    the value the file holds; another float dtype is converted as a rebuild's output would be
    (numpy's rounding, which the CPU library's float16 conversion is held to)."""
    held: Dict[str, np.ndarray] = {}
    for name, value in asked.items():
        if name not in specs:
            continue
        shape, dtype = specs[name]
        if value is None:
            value = defaults.get(name)
            if value is None:  # a weight-stripped graph: the weight stays an input
                continue
        value = np.asarray(value)
        if tuple(value.shape) != tuple(shape):
            raise TvswitchError("constant weight %r is %s, the graph's is %s" % (name, list(value.shape), list(shape)))
        if not (np.issubdtype(dtype, np.floating) and np.issubdtype(value.dtype, np.floating)):
            raise TvswitchError("constant weight %r is %s, the graph takes %s: constants are float weights"
                                % (name, value.dtype, dtype))
        held[name] = contiguous(value if value.dtype == dtype else value.astype(dtype))
    total = sum(a.nbytes for a in held.values())
    if total > PROTO_LIMIT:
        log.warning("the %d weights no switch changes (%.1f GB) stay graph inputs: a graph carrying them would pass "
                    "protobuf's 2 GB limit", len(held), total / 1e9)
        return {}
    return held


def share_constants(options: Any, constants: Mapping[str, np.ndarray]) -> List[Any]:
    """Make ``options`` hand the session these arrays as its initializers of those names (the
    graph still carries their values, which ONNX Runtime checks and then leaves for these).
    What a node reads as it is (an embedding, a bias, a norm) is then read from the array,
    not from a copy; what ONNX Runtime transforms (a MatMul weight it transposes and
    pre-packs) it copies anyway."""
    ort = _ort()
    values = []
    for name, array in constants.items():
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        try:
            options.add_initializer(name, values[-1])
        except Exception as exc:  # onnxruntime's own type (a name added before: options reused)
            raise TvswitchError("the session options take no constant %r (%s): options given with constants "
                                "serve one engine; make new ones" % (name, exc)) from None
    return values


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
