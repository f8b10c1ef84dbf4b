"""Atomic task switching in front of an engine: no request ever sees half-written weights.

A ``Server`` owns one engine and one weight source (a bundle's rebuild).  ``switch``
changes the task or mix; ``infer`` answers a request; ``infer(..., mix=...)`` pins a mix
for one request (what Auto-Switch does per batch: route, rebuild if the mix differs,
infer).  All are safe to call from many threads.

How a switch stays atomic depends on what the engine declares (``engines.base``):

* **Lock** (``slots == 1``, inference reads the slot itself: ONNX Runtime, CPU torch).
  The switch waits for running requests to finish, holds new ones back, rebuilds in
  place and lets them go.  Memory: the switchable weights once, plus the base the
  rebuild reads.  Cost: requests wait for the rebuild (the switch latency).
* **Double buffer** (``slots == 2``).  The rebuild writes the idle slot while requests
  keep running on the live one, then one pointer flip under the lock makes it live;
  before writing a slot again it waits for the requests still reading it.  Memory: the
  switchable weights twice, plus the base.  Cost: requests never wait for a rebuild.
* **Staged** (``publish_copies``: TensorRT refit, torch on a GPU).  The slot is a staging
  area the engine does not infer from, so it is written while requests run; only
  ``publish`` (the refit) waits for running requests and holds new ones.  Memory: the
  staging buffers plus the engine's own weights, plus the base.

Where the rebuild runs is the weight source's business: ``BundleSource`` (the CPU
rebuild into the engine's host buffers) or ``runtime.gpu_source.GpuBundleSource`` (the
CUDA kernels writing the engine's device buffers: TensorRT 10, staged, no host copy of a
weight per switch).  ``serve_bundle`` picks the GPU one where it can and says which in
``Server.rebuild_on`` and a log line.

Failure: the mix is checked before anything is written, so a bad task name or weight
leaves everything as it was.  A failure after writing began (a corrupt payload, a CUDA
error) is undone: with a double buffer the live slot was never touched; otherwise the
previous mix is rebuilt into the slot before requests resume.  Should that fail too,
the server refuses requests (``TvswitchError``) until a switch succeeds, rather than
answer with mixed weights.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.engines.base import Engine, copy_into
from tvswitch.runtime.mix import check_mix
from tvswitch.runtime.rebuild import CpuRebuilder

Mix = Dict[str, float]
EngineWeights = Mapping[str, Tuple[Tuple[int, ...], Any]]

log = logging.getLogger("tvswitch.server")


def check_engine_names(bundle: Bundle, engine_weights: EngineWeights, *, unread: Iterable[str] = (),
                       allow_unmatched: bool = False, what: str = "the engine") -> List[str]:
    """Refuse a bundle tensor that the engine would leave unswitched; returns those allowed to stay.

    A tensor a task changes (shared, or a task's own head) but that is no weight of the
    engine would keep the graph's own value through every switch: the engine would
    answer with a mixture of the task's weights and the graph's, with no error.  That
    is what a graph from a plain ``torch.onnx.export`` gives (constant folding renames
    most weights ``onnx::MatMul_N``), so it is refused, naming a few such tensors.
    ``unread`` are tensors the graph's record says no node reads (unused, tied
    aliases): their values change no output.  ``allow_unmatched`` accepts a graph that
    serves a subset on purpose; the caller warns with the list returned.  A bundle
    that names none of the engine's weights, or a shared tensor of another shape, is
    refused either way.
    """
    shared = bundle.shared_specs
    if engine_weights and not any(n in engine_weights for n in shared):
        raise TvswitchError("none of the %d tensors of %s is a weight of %s: names differ (bundle %r, "
                            "engine %r); export the graph with tvswitch export-onnx, which keeps the state_dict "
                            "names, from the network the bundle's checkpoints belong to"
                            % (len(shared), bundle.path, what, next(iter(shared)), next(iter(engine_weights))))
    for name, spec in shared.items():
        if name in engine_weights and tuple(engine_weights[name][0]) != spec.shape:
            raise TvswitchError("bundle tensor %r is %s, the weight of %s is %s"
                                % (name, list(spec.shape), what, list(engine_weights[name][0])))
    skip = set(unread)
    switched = list(shared) + sorted({n for t in bundle.tasks for n in bundle.task_specific(t)} - set(shared))
    missing = [n for n in switched if n not in engine_weights and n not in skip]
    if missing and not allow_unmatched:
        raise TvswitchError("%d of the %d tensors %s switches are not weights of %s (%s): every switch would "
                            "leave them at the graph's own values and answer wrong; export the graph with "
                            "tvswitch export-onnx, which keeps the state_dict names, or allow it "
                            "(--allow-unmatched) if the graph serves a subset on purpose"
                            % (len(missing), len(switched), bundle.path, what, _some(missing)))
    return missing


def _some(names: Sequence[str], count: int = 3) -> str:
    """The first ``count`` of ``names``, quoted, and how many more."""
    shown = ", ".join(repr(n) for n in names[:count])
    return shown + (" and %d more" % (len(names) - count) if len(names) > count else "")


def head_misfits(bundle: Bundle, engine_weights: EngineWeights) -> Dict[str, str]:
    """Task -> why this graph cannot serve it: a task-specific tensor of another shape than its weight.

    Tasks of one bundle may have heads of different sizes (3, 4, 5 classes) while a graph
    has one: the graph serves the tasks whose heads fit, and a switch to another is
    refused (``check_source_mix``), not the whole bundle at load.
    """
    misfits: Dict[str, str] = {}
    for task in bundle.tasks:
        for n, a in bundle.task_specific(task).items():
            if n in engine_weights and tuple(a.shape) != tuple(engine_weights[n][0]):
                misfits[task] = "its tensor %r is %s, the network's weight is %s" % (
                    n, list(a.shape), list(engine_weights[n][0]))
                break
    return misfits


def task_heads(bundle: Bundle, engine_weights: EngineWeights) -> Tuple[Dict[str, Dict[str, np.ndarray]], List[str]]:
    """Each task's task-specific tensors that the engine serves and that fit it, and all their names.

    A task with a head that does not fit (``head_misfits``) gets none of its tensors here,
    so nothing of it is ever copied; ``check_source_mix`` refuses it.
    """
    misfits = head_misfits(bundle, engine_weights)
    heads: Dict[str, Dict[str, np.ndarray]] = {}
    names = set()
    for task in bundle.tasks:
        mine = {} if task in misfits else {n: a for n, a in bundle.task_specific(task).items() if n in engine_weights}
        heads[task] = mine
        names.update(mine)
    return heads, sorted(names)


def check_source_mix(bundle: Bundle, mix: Mapping[str, float], heads: Mapping[str, Mapping[str, Any]],
                     head_names: Sequence[str], shapes: Optional[EngineWeights] = None) -> Mix:
    """The mix, validated (tasks, weights, the heaviest task's heads); raises before anything is written.

    ``shapes`` (the engine's weight specs) only make the message of a head that does not
    fit name the graph's shape too.
    """
    mix = check_mix(mix, bundle.tasks, bundle.path)
    head = head_task(mix)
    lacking = [n for n in head_names if n not in heads[head]]
    if lacking:
        own = bundle.task_specific(head)
        name = next((n for n in lacking if n in own), None)
        if name is None:
            raise TvswitchError("task %r has no tensor %r, which the engine serves" % (head, lacking[0]))
        graph = "is %s" % list(shapes[name][0]) if shapes is not None and name in shapes else "has another shape"
        raise TvswitchError("task %r cannot be served by this network: its tensor %r is %s, the network's weight %s "
                            "(a graph exported for that task's head serves it)"
                            % (head, name, list(own[name].shape), graph))
    return mix


def head_task(mix: Mapping[str, float]) -> str:
    """The task whose task-specific tensors (head) serve ``mix``: its heaviest."""
    return max(mix, key=lambda t: mix[t])


class BundleSource:
    """Writes a bundle's tasks and mixes into an engine's weight buffers with the CPU rebuild.

    Shared tensors (task vectors, BatchNorm statistics) are rebuilt by ``CpuRebuilder``;
    shared tensors the graph does not read (``unread``, or allowed ``unmatched``) go to
    scratch buffers made once.  A task-specific tensor (a classification head) that the
    engine serves is copied from the mix's heaviest task: a head answers one task's
    classes, so a mix of tasks is served with the head of the task it leans on most, as
    Auto-Switch does.  A task whose head does not fit the graph's (another number of
    classes) is refused when switched to (``head_misfits``), the previous task serving on.
    """

    #: Where the rebuild runs (``Server.rebuild_on``).
    where = "cpu"

    def __init__(self, bundle: Bundle, engine_weights: Union[Engine, EngineWeights],
                 base: Optional[Mapping[str, np.ndarray]] = None, threads: int = 0, verify_base: bool = True, *,
                 unread: Iterable[str] = (), allow_unmatched: bool = False):
        """Write into the weights of ``engine_weights``: an engine (its ``weight_specs`` and
        ``unread_weights``), or weight specs alone.  ``unread`` and ``allow_unmatched`` as for
        ``check_engine_names``; ``unmatched`` then lists the tensors left at the graph's values."""
        if isinstance(engine_weights, Engine):
            unread = list(unread) + list(engine_weights.unread_weights)
            engine_weights = engine_weights.weight_specs
        self.bundle = bundle
        self.unmatched = check_engine_names(bundle, engine_weights, unread=unread, allow_unmatched=allow_unmatched)
        self.rebuilder = CpuRebuilder(bundle, base, threads=threads, verify_base=verify_base)
        self._scratch = {n: np.empty(spec.shape, dtype=spec.dtype) for n, spec in bundle.shared_specs.items()
                         if n not in engine_weights}
        self._shapes = dict(engine_weights)
        self._heads, self._head_names = task_heads(bundle, engine_weights)

    @property
    def tasks(self) -> List[str]:
        return self.bundle.tasks

    def check(self, mix: Mapping[str, float]) -> Mix:
        """The mix, validated; raises before any buffer is written."""
        mix = check_source_mix(self.bundle, mix, self._heads, self._head_names, self._shapes)
        self.rebuilder.plan(mix)
        return mix

    def write(self, mix: Mix, buffers: Dict[str, np.ndarray]) -> None:
        out = dict(self._scratch)
        out.update((n, buffers[n]) for n in self.bundle.shared_specs if n in buffers)
        self.rebuilder.rebuild(mix, out)
        for name, value in self._heads[head_task(mix)].items():
            copy_into(buffers[name], value, name)


class Server:
    """One engine serving one task or mix at a time, switched atomically."""

    def __init__(self, engine: Engine, source: Any, initial: Mapping[str, float]):
        """Serve ``initial`` (a mix; ``{task: 1.0}`` for one task) on ``engine``.

        ``source`` is a ``BundleSource``, a ``gpu_source.GpuBundleSource`` or anything with
        their ``check(mix)`` and ``write(mix, host_buffers)``.
        """
        self.engine = engine
        self.source = source
        #: ``"cpu"`` (CPU rebuild into host buffers) or ``"gpu"`` (CUDA kernels into device buffers).
        self.rebuild_on = getattr(source, "where", "cpu")
        #: Why that path (set by ``serve_bundle``: the GPU's name, or why the GPU path is not used).
        self.rebuild_note = ""
        #: The tasks this engine can serve (``serve_bundle``: those whose heads fit the graph).
        self.servable: List[str] = list(getattr(source, "tasks", []))
        #: Bundle tensors that are no weight of the engine, allowed to keep the graph's values.
        self.unmatched: List[str] = list(getattr(source, "unmatched", []))
        self.mode = "staged" if engine.publish_copies else ("double" if engine.slots == 2 else "lock")
        self._cond = threading.Condition()
        self._switch_lock = threading.Lock()
        self._readers = [0] * engine.slots
        self._writing = False
        self._active = 0
        self._mix: Optional[Mix] = None
        self._broken: Optional[str] = None
        self.switch(initial)

    @property
    def mix(self) -> Optional[Mix]:
        """The mix now serving (a copy)."""
        return dict(self._mix) if self._mix is not None else None

    def switch(self, mix: Mapping[str, float]) -> bool:
        """Serve ``mix`` from now on; False if it was already serving (nothing rebuilt)."""
        with self._switch_lock:
            return self._switch(mix)

    def infer(self, inputs: Mapping[str, np.ndarray],
              mix: Optional[Mapping[str, float]] = None) -> Dict[str, np.ndarray]:
        """Answer one request; with ``mix``, switch to it first and hold it for this request."""
        if mix is None:
            slot = self._begin_read()
        else:
            with self._switch_lock:
                self._switch(mix)
                slot = self._begin_read()
        try:
            return self.engine.infer(inputs, slot)
        finally:
            self._end_read(slot)

    def auto(self, inputs: Mapping[str, np.ndarray], route: Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]
             ) -> Tuple[Mix, Dict[str, np.ndarray]]:
        """Auto-Switch: ``route`` gives the batch's mix, rebuilt if it differs, then inference.

        ``route`` is typically ``lambda x: router.weights(features(x))`` with
        ``runtime.autoswitch.AutoSwitch``; tasks it gives no weight are left out of the rebuild.
        """
        mix = {t: float(w) for t, w in route(inputs).items() if w != 0}
        return mix, self.infer(inputs, mix)

    # ---- readers ----
    def _begin_read(self) -> int:
        with self._cond:
            while self._writing:
                self._cond.wait()
            if self._broken is not None:
                raise TvswitchError("no task is serving: %s; switch to a task first" % self._broken)
            slot = self._active
            self._readers[slot] += 1
            return slot

    def _end_read(self, slot: int) -> None:
        with self._cond:
            self._readers[slot] -= 1
            self._cond.notify_all()

    def _hold_readers(self, slot: int) -> None:
        """Hold new requests back and wait until none reads ``slot`` (caller owns the switch lock)."""
        with self._cond:
            self._writing = True
            while self._readers[slot]:
                self._cond.wait()

    def _release_readers(self) -> None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()

    # ---- switching (the switch lock is held) ----
    def _switch(self, mix: Mapping[str, float]) -> bool:
        mix = self.source.check(mix)
        if mix == self._mix and self._broken is None:
            return False
        if self.mode == "double":
            target = 1 - self._active
            with self._cond:
                while self._readers[target]:
                    self._cond.wait()
            self.source.write(mix, self.engine.buffers(target))
            self.engine.publish(target)
            with self._cond:
                self._active = target
                self._broken = None
        elif self.mode == "staged":
            self.source.write(mix, self.engine.buffers(0))
            self._hold_readers(0)
            try:
                self._commit(mix, lambda: self.engine.publish(0))
            finally:
                self._release_readers()
        else:
            self._hold_readers(0)
            try:
                self._commit(mix, lambda: (self.source.write(mix, self.engine.buffers(0)), self.engine.publish(0)))
            finally:
                self._release_readers()
        self._mix = mix
        return True

    def _commit(self, mix: Mix, step: Callable[[], object]) -> None:
        """Run ``step`` on the live weights; on failure put the previous mix back, or mark broken."""
        try:
            step()
            self._broken = None
        except BaseException as exc:
            try:
                if self._mix is None:
                    raise TvswitchError("nothing served before")
                self.source.write(self._mix, self.engine.buffers(0))
                self.engine.publish(0)
            except BaseException as again:
                self._mix = None
                self._broken = "switch to %s failed (%s) and restoring the previous weights failed (%s)" % (
                    _describe(mix), exc, again)
            raise


def _describe(mix: Mapping[str, float]) -> str:
    return ",".join("%s=%g" % kv for kv in mix.items())


def default_model_path(bundle_path: str) -> str:
    """Where ``tvswitch export-onnx`` puts a bundle's graph by default: beside it, ``.onnx``."""
    return os.path.splitext(bundle_path)[0] + ".onnx"


def serve_bundle(bundle: str, engine: str = "onnxruntime", *, model: Any = None,
                 base: Optional[Mapping[str, np.ndarray]] = None, initial: Optional[Mapping[str, float]] = None,
                 slots: int = 1, threads: int = 0, module: Any = None, input_names: Optional[Sequence[str]] = None,
                 gpu: Optional[bool] = None, device: Any = None, allow_unmatched: bool = False,
                 **options: Any) -> Server:
    """Open ``bundle``, load ``engine`` and serve ``initial`` (default: the first task the graph serves).

    Every tensor the bundle switches must be a weight of the engine (``check_engine_names``);
    ``allow_unmatched`` serves a graph that holds a subset on purpose, with a warning on
    the ``tvswitch.server`` logger naming what keeps the graph's values.  The tasks whose
    heads fit the graph are ``Server.servable`` (a warning names the others and why).

    Where the engine offers device buffers for its weights (TensorRT 10) and a CUDA
    device and the kernels are there, the CUDA kernels rebuild straight into them
    (``GpuBundleSource``); else the CPU rebuild writes the host buffers.  ``gpu=True``
    insists on the GPU path (raises with the reason it cannot), ``gpu=False`` keeps the
    CPU one; ``device`` is a ``kernels.cuda.Device`` to use (one is opened otherwise).
    ``Server.rebuild_on`` says which ran (``"gpu"`` / ``"cpu"``), ``rebuild_note`` why,
    and the ``tvswitch.server`` logger says it once at INFO.

    The base the rebuild reads is ``base`` if given, else the one the bundle embeds, else
    the weights the engine was loaded with (the ONNX file's defaults, or the module's
    own); it is checked against the bundle's fingerprint either way.  Only one copy of
    the base is kept: the engine's defaults are dropped where another base is used.
    """
    from tvswitch.runtime.engines import load_engine

    opened = Bundle.open(bundle)
    names = list(opened.shared_specs) + sorted({n for t in opened.tasks for n in opened.task_specific(t)})
    if engine != "torch" and model is None:
        model = default_model_path(bundle)
        if not os.path.isfile(model):
            raise TvswitchError("no graph for %s: %s does not exist (make it with tvswitch export-onnx, or give "
                                "--model)" % (bundle, model))
    eng = load_engine(engine, model, names=names, slots=slots, threads=threads, module=module,
                      input_names=input_names, **options)
    what = "the torch module" if engine == "torch" else "the graph %s" % (model if isinstance(model, str) else "given")
    unmatched = check_engine_names(opened, eng.weight_specs, unread=eng.unread_weights,
                                   allow_unmatched=allow_unmatched, what=what)
    if unmatched:
        log.warning("%d tensors of %s are not weights of %s and keep its own values through every switch "
                    "(allowed): %s", len(unmatched), bundle, what, ", ".join(unmatched))
    misfits = head_misfits(opened, eng.weight_specs)
    servable = [t for t in opened.tasks if t not in misfits]
    if misfits:
        log.warning("%s serves task%s %s of %s, not %s", what, "" if len(servable) == 1 else "s",
                    ", ".join(servable) or "none", bundle, "; ".join("%s (%s)" % kv for kv in misfits.items()))
    if base is None and not opened.has_embedded_base:
        base = getattr(eng, "defaults", None) or {n: np.array(a) for n, a in eng.buffers(0).items()}
        lacking = [n for n in opened.shared_specs if n not in base]
        if lacking:
            raise TvswitchError("%s cannot serve as the base of %s: it does not hold %s; give the base checkpoint "
                                "(--base)" % (what, bundle, _some(lacking)))
    elif getattr(eng, "defaults", None) is not None:
        eng.defaults = None  # another base serves the rebuild: the graph's copy would only hold memory
    source: Any = None
    if gpu is False:
        note = "CPU rebuild asked for (gpu=False)"
    elif eng.device_buffers() is None:
        note = "the %s engine takes its weights from host memory only" % engine
    else:
        from tvswitch.runtime.gpu_source import GpuBundleSource

        try:
            source = GpuBundleSource(opened, eng, base, device=device, allow_unmatched=allow_unmatched)
        except (RuntimeError, ImportError, OSError, TvswitchError) as exc:  # CudaError, KernelBuildError
            note = "no GPU rebuild (%s)" % exc
        else:
            note = "CUDA kernels write the %s engine's device buffers on %s (%s)" % (
                engine, source.device.name, source.device.binding)
            if getattr(eng, "defaults", None) is not None:
                eng.defaults = None  # the base now lives on the device
            base = None
    if source is None:
        if gpu:
            raise TvswitchError("the GPU rebuild was asked for and cannot run: %s" % note)
        source = BundleSource(opened, eng, base, threads=threads, allow_unmatched=allow_unmatched)
    log.info("%s on %s: %s rebuild: %s; serves %s", bundle, engine, source.where.upper(), note,
             ", ".join(servable) or "no task")
    server = Server(eng, source, initial or {(servable or opened.tasks)[0]: 1.0})
    server.rebuild_note = note
    server.servable = servable
    server.unmatched = unmatched
    return server
