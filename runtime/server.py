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

Heads: tasks whose heads differ in shape share the engine's weights laid out at the
largest shape (``runtime.heads``), and each answer is cut to its head's size.  Which cut
a request gets is read with the slot it reads, under the same lock, and changes only
when that slot's weights do: no request pairs one task's weights with another task's
output size.

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
from tvswitch.runtime.binding import BoundSource, EngineBinding, EngineWeights, some
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.checkpoint import as_tensors
from tvswitch.runtime.engines.base import Engine, copy_into
from tvswitch.runtime.heads import OutputCut, cut_outputs
from tvswitch.runtime.mix import Mix, head_task
from tvswitch.runtime.rebuild import CpuRebuilder

log = logging.getLogger("tvswitch.server")


class BundleSource(BoundSource):
    """Writes a bundle's tasks and mixes into an engine's weight buffers with the CPU rebuild.

    Shared tensors (task vectors, BatchNorm statistics) are rebuilt by ``CpuRebuilder``;
    shared tensors the graph does not read (``unread``, or allowed ``unmatched``) go to
    scratch buffers made once.  A task-specific tensor (a classification head) that the
    engine serves is copied from the mix's heaviest task, padded to the engine's shape
    (``runtime.heads``): a head answers one task's classes, so a mix of tasks is served
    with the head of the task it leans on most, as Auto-Switch does, and its outputs are
    cut to that task's size (``cut``).  A task whose head does not fit the engine is
    refused when switched to, the previous task serving on.
    """

    #: Where the rebuild runs (``Server.rebuild_on``).
    where = "cpu"

    def __init__(self, bundle: Bundle, engine_weights: Union[Engine, EngineWeights],
                 base: Optional[Mapping[str, np.ndarray]] = None, threads: int = 0, verify_base: bool = True, *,
                 unread: Iterable[str] = (), allow_unmatched: bool = False, what: str = "the engine",
                 binding: Optional[EngineBinding] = None, base_label: str = "the base"):
        """Write into the weights of ``engine_weights``: an engine (its ``weight_specs``,
        ``unread_weights`` and ``head_cuts``), or weight specs alone.  ``unread`` and
        ``allow_unmatched`` as for ``binding.check_engine_names``; ``unmatched`` then lists
        the tensors left at the graph's values; ``what`` names the engine in refusals.
        ``binding``: the bundle already bound to this engine (``serve_bundle`` binds first,
        so a graph that does not fit is refused before the base is looked for)."""
        constants: Mapping[str, np.ndarray] = {}
        if isinstance(engine_weights, Engine):
            constants = engine_weights.constants
            binding = binding or EngineBinding.of_engine(bundle, engine_weights, unread=unread,
                                                         allow_unmatched=allow_unmatched, what=what)
            engine_weights = engine_weights.weight_specs
        self.bundle = bundle
        self.binding = binding or EngineBinding(bundle, engine_weights, unread=unread,
                                                allow_unmatched=allow_unmatched, what=what)
        self.unmatched = self.binding.unmatched
        self.rebuilder = CpuRebuilder(bundle, base, threads=threads, verify_base=verify_base, base_label=base_label)
        check_constants(constants, self.rebuilder.base, what)
        fixed = set(bundle.base_only)  # the rebuild need not write these (held as constants, or read by nothing)
        self._scratch = {n: np.empty(spec.shape, dtype=spec.dtype) for n, spec in bundle.shared_specs.items()
                         if n not in engine_weights and n not in fixed}

    @property
    def tasks(self) -> List[str]:
        return self.bundle.tasks

    #: ``write`` takes ``since`` (``Server`` then passes what the buffers hold).
    skips_unchanged = True

    def write(self, mix: Mix, buffers: Dict[str, np.ndarray], since: Optional[Mix] = None) -> None:
        """Write ``mix`` into ``buffers``; with ``since``, the mix they hold whole, only what
        differs (``CpuRebuilder.rebuild``), and the head only if another task's."""
        out = dict(self._scratch)
        out.update((n, buffers[n]) for n in self.bundle.shared_specs if n in buffers)
        self.rebuilder.rebuild(mix, out, since=since)
        if since is not None and head_task(since) == head_task(mix):
            return
        for name, value in self.binding.heads.padded[head_task(mix)].items():
            copy_into(buffers[name], value, name)


def check_constants(constants: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], what: str) -> None:
    """Refuse an engine constant that is not the base's bits: every mix serves the base there,
    so the engine would answer with other weights (serve_bundle hands the base's own arrays,
    which pass at once)."""
    for name, value in constants.items():
        want = base.get(name)
        if want is None or value is want:
            continue
        if value.shape != want.shape:
            raise TvswitchError("%s holds weight %r as a constant of shape %s, the base's is %s"
                                % (what, name, list(value.shape), list(want.shape)))
        # in another dtype (a float16 graph), what a rebuild writes: numpy's rounding, the library's
        expect = np.ascontiguousarray(want if value.dtype == want.dtype else want.astype(value.dtype))
        if not np.array_equal(np.ascontiguousarray(value).view(np.uint8), expect.view(np.uint8)):
            raise TvswitchError("%s holds weight %r as a constant whose values are not the base's" % (what, name))


class Server:
    """One engine serving one task or mix at a time, switched atomically."""

    def __init__(self, engine: Engine, source: Any, initial: Mapping[str, float], skip_unchanged: bool = True):
        """Serve ``initial`` (a mix; ``{task: 1.0}`` for one task) on ``engine``.

        ``source`` is a ``BundleSource``, a ``gpu_source.GpuBundleSource`` or anything with
        their ``check(mix)`` and ``write(mix, host_buffers)``. ``skip_unchanged=False``
        rewrites every tensor at every switch (what a benchmark compares skipping with).
        """
        self.engine = engine
        self.source = source
        #: ``"cpu"`` (CPU rebuild into host buffers) or ``"gpu"`` (CUDA kernels into device buffers).
        self.rebuild_on = getattr(source, "where", "cpu")
        #: Why that path (set by ``serve_bundle``: the GPU's name, or why the GPU path is not used).
        self.rebuild_note = ""
        binding = getattr(source, "binding", None)
        #: The tasks this engine can serve (those whose heads fit it).
        self.servable: List[str] = list(binding.servable if binding is not None else getattr(source, "tasks", []))
        #: Bundle tensors that are no weight of the engine, allowed to keep the graph's values.
        self.unmatched: List[str] = list(getattr(source, "unmatched", []))
        self.mode = "staged" if engine.publish_copies else ("double" if engine.slots == 2 else "lock")
        self._cond = threading.Condition()
        self._switch_lock = threading.Lock()
        self._readers = [0] * engine.slots
        self._writing = False
        self._active = 0
        #: per slot, how its outputs are cut to the answer of the mix it holds (its head's size)
        self._cuts: List[Optional[OutputCut]] = [None] * engine.slots
        self._mix: Optional[Mix] = None
        self._broken: Optional[str] = None
        #: per slot, the mix its buffers hold whole (None: unknown, e.g. after a failed write),
        #: so that a switch rewrites only what differs where the source can (``skips_unchanged``)
        self._held: List[Optional[Mix]] = [None] * engine.slots
        self._skips = skip_unchanged and bool(getattr(source, "skips_unchanged", False))
        self.switch(initial)

    def close(self) -> None:
        """Stop the engine's background work and free the weight source's device memory, if any."""
        self.engine.close()
        closer = getattr(self.source, "close", None)
        if closer is not None:
            closer()

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
            slot, cut = self._begin_read()
        else:
            with self._switch_lock:
                self._switch(mix)
                slot, cut = self._begin_read()
        try:
            return cut_outputs(self.engine.infer(inputs, slot), cut)
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
    def _begin_read(self) -> Tuple[int, Optional[OutputCut]]:
        """(the live slot, how its outputs are cut), read together: a request never pairs
        one task's weights with another task's output size."""
        with self._cond:
            while self._writing:
                self._cond.wait()
            if self._broken is not None:
                raise TvswitchError("no task is serving: %s; switch to a task first" % self._broken)
            slot = self._active
            self._readers[slot] += 1
            return slot, self._cuts[slot]

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
        cut = self.source.cut(mix) if hasattr(self.source, "cut") else None
        if self.mode == "double":
            target = 1 - self._active
            with self._cond:
                while self._readers[target]:
                    self._cond.wait()
            self._write(mix, target)
            self.engine.publish(target)
            with self._cond:
                self._cuts[target] = cut
                self._active = target
                self._broken = None
        elif self.mode == "staged":
            self._write(mix, 0)
            self._hold_readers(0)
            try:
                self._commit(mix, cut, lambda: self.engine.publish(0))
            finally:
                self._release_readers()
        else:
            self._hold_readers(0)
            try:
                self._commit(mix, cut, lambda: (self._write(mix, 0), self.engine.publish(0)))
            finally:
                self._release_readers()
        self._mix = mix
        return True

    def _write(self, mix: Mix, slot: int) -> None:
        """The source writes ``mix`` into ``slot``'s buffers: only what differs from the mix
        they hold, where that is known and the source can; the slot counts as unknown until
        the write has finished, so a write that fails half way is followed by a whole one."""
        since, self._held[slot] = self._held[slot], None
        if since is not None and self._skips:
            self.source.write(mix, self.engine.buffers(slot), since=since)
        else:
            self.source.write(mix, self.engine.buffers(slot))
        self._held[slot] = mix

    def _commit(self, mix: Mix, cut: Optional[OutputCut], step: Callable[[], object]) -> None:
        """Run ``step`` on the live weights (readers held); on failure put the previous mix back,
        or mark broken.  The slot's cut changes only with its weights."""
        try:
            step()
            self._cuts[0] = cut
            self._broken = None
        except BaseException as exc:
            try:
                if self._mix is None:
                    raise TvswitchError("nothing served before")
                self._write(self._mix, 0)
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


def serve_bundle(bundle: Union[str, Bundle], engine: str = "onnxruntime", *, model: Any = None,
                 base: Union[None, str, Mapping[str, np.ndarray]] = None,
                 initial: Optional[Mapping[str, float]] = None, slots: int = 1, threads: int = 0,
                 module: Any = None, input_names: Optional[Sequence[str]] = None,
                 example_inputs: Optional[Mapping[str, np.ndarray]] = None, gpu: Optional[bool] = None,
                 device: Any = None, allow_unmatched: bool = False, constants: bool = True,
                 base_label: Optional[str] = None, **options: Any) -> Server:
    """Open ``bundle`` (a path, or a ``Bundle`` already open), load ``engine`` and serve
    ``initial`` (default: the first task the engine serves).

    Every tensor the bundle switches must be a weight of the engine
    (``binding.check_engine_names``); ``allow_unmatched`` serves a graph that holds a
    subset on purpose, with a warning on the ``tvswitch.server`` logger naming what keeps
    the graph's values.  Tasks whose heads differ in shape are served by one engine
    with its task-specific weights at the largest shape (``runtime.heads``): a graph from
    ``tvswitch export-onnx --bundle`` records how each head's outputs are cut, and the
    torch engine learns it by running ``module`` once per head shape on
    ``example_inputs`` (name -> array, as ``infer`` takes them), which it then needs.
    The tasks whose heads fit are ``Server.servable`` (a warning names the others and
    why); an engine that serves none of them is refused.

    Where the engine offers device buffers for its weights (TensorRT 10) and a CUDA
    device and the kernels are there, the CUDA kernels rebuild straight into them
    (``GpuBundleSource``); else the CPU rebuild writes the host buffers.  ``gpu=True``
    insists on the GPU path (raises with the reason it cannot), ``gpu=False`` keeps the
    CPU one; ``device`` is a ``kernels.cuda.Device`` to use (one is opened otherwise).
    ``Server.rebuild_on`` says which ran (``"gpu"`` / ``"cpu"``), ``rebuild_note`` why,
    and the ``tvswitch.server`` logger says it once at INFO.

    The base the rebuild reads is ``base`` if given (a mapping, or a safetensors path;
    ``base_label`` names it in refusals, default its path),
    else the one the bundle embeds, else the weights the engine was loaded with (an ONNX
    file's defaults, or the module's own; a graph from ``export-onnx --bundle`` carries none); it is checked against the
    bundle's fingerprint either way.  Only one copy of the base is kept: the engine's
    defaults are dropped where another base is used.

    ``constants`` (ONNX Runtime): the bundle's ``base_only`` tensors, which no task
    changes (the layers a LoRA adapter or a partial fine-tune leaves alone), are served
    as constants of the session, not as switchable inputs: ONNX Runtime pre-packs them,
    which at small batches is most of what weights as inputs cost, and no slot holds them
    (docs/engines.md section 2 has what it costs in memory).
    """
    from tvswitch.runtime.engines import load_engine

    opened = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    path = opened.path
    if base_label is None:
        base_label = os.fspath(base) if isinstance(base, (str, os.PathLike)) else "the base"
    base = opened.base_view(as_tensors(base))
    verify_base = True
    if not isinstance(constants, bool):
        raise TvswitchError("constants is True or False (whether the bundle's base-only tensors are constants of "
                            "the session), got %r" % (constants,))
    if engine == "onnxruntime" and constants and opened.base_only:
        if base is None and opened.has_embedded_base:  # the bundle's own copy: not checked, as before
            base, verify_base = opened.embedded_base(), False
        elif base is not None:  # a wrong base is the base's error, not the constants'
            opened.check_base_shapes(base, base_label, names=opened.base_only)
        # the arrays the rebuild reads serve them too (a base lacking one is refused, naming it, once
        # the graph is bound); without a base, the graph's own values where it holds them
        options["constants"] = {n: base[n] if base is not None else None for n in opened.base_only
                                if base is None or n in base}
    heads = {t: opened.task_specific(t) for t in opened.tasks}
    names = list(opened.shared_specs) + sorted({n for t in heads.values() for n in t})
    if engine == "torch":
        what = "the torch module"
        if module is not None:
            from tvswitch.runtime.engines.torch_engine import fit_heads

            options["head_cuts"] = fit_heads(module, heads, input_names, example_inputs)
    else:
        if model is None:
            model = default_model_path(path)
            if not os.path.isfile(model):
                raise TvswitchError("no graph for %s: %s does not exist (make it with tvswitch export-onnx, or give "
                                    "--model)" % (path, model))
        what = "the graph %s" % (model if isinstance(model, str) else "given")
        if engine == "tensorrt" and "weights" not in options and (base is not None or opened.has_embedded_base):
            options["weights"] = dict(base if base is not None else opened.embedded_base())  # what it builds with
    eng = load_engine(engine, model, names=names, slots=slots, threads=threads, module=module,
                      input_names=input_names, **options)
    binding = EngineBinding.of_engine(opened, eng, allow_unmatched=allow_unmatched, what=what)
    if base is None and not opened.has_embedded_base:
        base = getattr(eng, "defaults", None)
        if not base:
            raise TvswitchError("%s carries no weights (a graph from export-onnx --bundle holds none): give the base "
                                "checkpoint (--base), or export %s with --include-base" % (what, path))
        lacking = [n for n in opened.shared_specs if n not in base]
        if lacking:
            raise TvswitchError("%s cannot serve as the base of %s: it does not hold %s; give the base checkpoint "
                                "(--base)" % (what, path, some(lacking)))
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
            source = GpuBundleSource(opened, eng, base, device=device, binding=binding, base_label=base_label)
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
        source = BundleSource(opened, eng, base, threads=threads, binding=binding, verify_base=verify_base,
                              base_label=base_label)
    server = Server(eng, source, initial or {binding.servable[0]: 1.0})  # a refused first mix says only that
    server.rebuild_note = note
    if binding.unmatched:
        log.warning("%d tensors of %s are not weights of %s and keep its own values through every switch "
                    "(allowed): %s", len(binding.unmatched), path, what, ", ".join(binding.unmatched))
    if binding.heads.misfits:
        log.warning("%s serves task%s %s of %s, not %s", what, "" if len(binding.servable) == 1 else "s",
                    ", ".join(binding.servable), path,
                    "; ".join("%s (%s)" % kv for kv in binding.heads.misfits.items()))
    log.info("%s on %s: %s rebuild: %s; serves %s%s", path, engine, source.where.upper(), note,
             ", ".join(binding.servable), "; %d tensors no task changes are constants of the session"
             % len(eng.constants) if eng.constants else "")
    return server
