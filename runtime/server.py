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

Failure: the mix is checked before anything is written, so a bad task name or weight
leaves everything as it was.  A failure after writing began (a corrupt payload, a CUDA
error) is undone: with a double buffer the live slot was never touched; otherwise the
previous mix is rebuilt into the slot before requests resume.  Should that fail too,
the server refuses requests (``TvswitchError``) until a switch succeeds, rather than
answer with mixed weights.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.engines.base import Engine, copy_into
from tvswitch.runtime.mix import check_mix
from tvswitch.runtime.rebuild import CpuRebuilder

Mix = Dict[str, float]


class BundleSource:
    """Writes a bundle's tasks and mixes into an engine's weight buffers with the CPU rebuild.

    Shared tensors (task vectors, BatchNorm statistics) are rebuilt by ``CpuRebuilder``;
    shared tensors the graph does not read go to scratch buffers made once.  A
    task-specific tensor (a classification head) that the engine serves is copied from
    the mix's heaviest task: a head answers one task's classes, so a mix of tasks is
    served with the head of the task it leans on most, as Auto-Switch does.
    """

    def __init__(self, bundle: Bundle, engine_weights: Mapping[str, Tuple[Tuple[int, ...], np.dtype]],
                 base: Optional[Mapping[str, np.ndarray]] = None, threads: int = 0, verify_base: bool = True):
        self.bundle = bundle
        self.rebuilder = CpuRebuilder(bundle, base, threads=threads, verify_base=verify_base)
        shared = bundle.shared_specs
        if engine_weights and not any(n in engine_weights for n in shared):
            raise TvswitchError("none of the %d tensors of %s is a weight of the engine: names differ (bundle %r, "
                                "engine %r); export the graph and the bundle from the same state_dict"
                                % (len(shared), bundle.path, next(iter(shared)), next(iter(engine_weights))))
        for name, spec in shared.items():
            if name in engine_weights and tuple(engine_weights[name][0]) != spec.shape:
                raise TvswitchError("bundle tensor %r is %s, the engine's weight is %s"
                                    % (name, list(spec.shape), list(engine_weights[name][0])))
        self._scratch = {n: np.empty(spec.shape, dtype=spec.dtype) for n, spec in shared.items()
                         if n not in engine_weights}
        self._heads: Dict[str, Dict[str, np.ndarray]] = {}
        head_names = set()
        for task in bundle.tasks:
            heads = {n: a for n, a in bundle.task_specific(task).items() if n in engine_weights}
            for n, a in heads.items():
                if tuple(a.shape) != tuple(engine_weights[n][0]):
                    raise TvswitchError("task %r's tensor %r is %s, the engine's weight is %s"
                                        % (task, n, list(a.shape), list(engine_weights[n][0])))
            self._heads[task] = heads
            head_names.update(heads)
        self._head_names = sorted(head_names)

    @property
    def tasks(self) -> List[str]:
        return self.bundle.tasks

    def check(self, mix: Mapping[str, float]) -> Mix:
        """The mix, validated; raises before any buffer is written."""
        mix = check_mix(mix, self.bundle.tasks, self.bundle.path)
        head = self._head_task(mix)
        lacking = [n for n in self._head_names if n not in self._heads[head]]
        if lacking:
            raise TvswitchError("task %r has no tensor %r, which the engine serves" % (head, lacking[0]))
        self.rebuilder.plan(mix)
        return mix

    def write(self, mix: Mix, buffers: Dict[str, np.ndarray]) -> None:
        out = dict(self._scratch)
        out.update((n, buffers[n]) for n in self.bundle.shared_specs if n in buffers)
        self.rebuilder.rebuild(mix, out)
        for name, value in self._heads[self._head_task(mix)].items():
            copy_into(buffers[name], value, name)

    @staticmethod
    def _head_task(mix: Mix) -> str:
        return max(mix, key=lambda t: mix[t])


class Server:
    """One engine serving one task or mix at a time, switched atomically."""

    def __init__(self, engine: Engine, source: BundleSource, initial: Mapping[str, float]):
        """Serve ``initial`` (a mix; ``{task: 1.0}`` for one task) on ``engine``."""
        self.engine = engine
        self.source = source
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
                 **options: Any) -> Server:
    """Open ``bundle``, load ``engine`` and serve ``initial`` (default: the first task).

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
    if base is None and not opened.has_embedded_base:
        base = getattr(eng, "defaults", None) or {n: np.array(a) for n, a in eng.buffers(0).items()}
    elif getattr(eng, "defaults", None) is not None:
        eng.defaults = None  # another base serves the rebuild: the graph's copy would only hold memory
    source = BundleSource(opened, eng.weight_specs, base, threads=threads)
    return Server(eng, source, initial or {opened.tasks[0]: 1.0})
