"""Which of a bundle's tensors an engine serves, and how: names, shapes, heads, and each mix.

Both weight sources (``server.BundleSource`` on the CPU, ``gpu_source.GpuBundleSource``
on a GPU) bind a bundle to an engine the same way, here: every tensor a switch writes
must be a weight of the engine (``check_engine_names``), each task's head is padded to
the engine's weights and its outputs cut back (``runtime.heads``), and a mix is checked
once, before anything is written (``EngineBinding.check``).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from tvswitch.errors import TvswitchError
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.heads import HeadCut, HeadLayout, OutputCut, layout_heads
from tvswitch.runtime.mix import Mix, check_mix, head_task

if TYPE_CHECKING:
    from tvswitch.runtime.engines.base import Engine

EngineWeights = Mapping[str, Tuple[Tuple[int, ...], Any]]


def check_engine_names(bundle: Bundle, engine_weights: EngineWeights, *, unread: Iterable[str] = (),
                       constants: Iterable[str] = (), copies: Mapping[str, Tuple[str, str]] = MappingProxyType({}),
                       aliases: Mapping[str, str] = MappingProxyType({}), allow_unmatched: bool = False,
                       what: str = "the engine") -> List[str]:
    """Refuse a bundle tensor that the engine would leave unswitched; returns those allowed to stay.

    A tensor a task changes (shared, or a task's own head) but that is no weight of the
    engine would keep the graph's own value through every switch: the engine would
    answer with a mixture of the task's weights and the graph's, with no error.  That
    is what a graph from a plain ``torch.onnx.export`` gives (constant folding renames
    most weights ``onnx::MatMul_N``), so it is refused, naming a few such tensors.
    ``unread`` are tensors the graph's record says no node reads (unused, tied
    aliases): their values change no output.  ``constants`` are weights the engine holds
    as constants (``Engine.constants``): served, but only a ``base_only`` tensor may be one,
    since a switch cannot change them.  ``copies`` are the graph's constants that hold a
    weight's value under another name (``Engine.weight_copies``): a weight some task changes
    that has one would be switched in some of its uses only.  ``aliases`` are tied names
    (``Engine.weight_aliases``): the graph reads the weight for the alias too, so a task
    that stores the alias but not the weight (a LoRA adapter on a tied output projection)
    would be served as the base there; it is refused.  ``allow_unmatched`` accepts a
    graph that serves a subset on purpose; the caller warns with the list returned.  A bundle
    that names none of the engine's weights, or a shared tensor of another shape, is
    refused either way.
    """
    shared = bundle.shared_specs
    if engine_weights and shared and not any(n in engine_weights for n in shared):
        raise TvswitchError("none of the %d tensors of %s is a weight of %s: names differ (bundle %r, "
                            "engine %r); export the graph with tvswitch export-onnx, which keeps the state_dict "
                            "names, from the network the bundle's checkpoints belong to"
                            % (len(shared), bundle.path, what, next(iter(shared)), next(iter(engine_weights))))
    for name, spec in shared.items():
        if name in engine_weights and tuple(engine_weights[name][0]) != spec.shape:
            raise TvswitchError("bundle tensor %r is %s, the weight of %s is %s"
                                % (name, list(spec.shape), what, list(engine_weights[name][0])))
    switched = list(shared) + sorted(bundle.head_names - set(shared))
    held = set(constants)
    fixed = set(bundle.base_only)
    changed = [n for n in switched if n in held and n not in fixed]
    if changed:
        raise TvswitchError("%s holds %s as constants, but tasks of %s change them, which a switch then could "
                            "not: serve them as switchable weights" % (what, some(changed), bundle.path))
    changing = set(switched) - fixed
    copied = {w: (c, how) for c, (w, how) in copies.items() if w in changing}
    if copied and not allow_unmatched:
        name, (copy, how) = next(iter(copied.items()))
        raise TvswitchError("%s holds weight %r a second time, as constant %r (%s, folded by the ONNX exporter), "
                            "which a switch cannot reach: the answers would mix the task's weights with the base's "
                            "(weights held so: %s); export the graph with tvswitch export-onnx, which reads every "
                            "use from the weight, or allow it (--allow-unmatched)"
                            % (what, name, copy, "its transpose" if how == "transposed" else "the same values",
                               some(sorted(copied))))
    for task in bundle.tasks:
        stored = bundle.entries(task)
        lost = [(a, w) for a, w in aliases.items() if a in stored and w not in stored]
        if lost:
            raise TvswitchError("task %r of %s changes %r, which %s ties to %r (one tensor, read for both), but "
                                "not %r: served, the change would be lost; give the task's change to both names "
                                "(a checkpoint of the merged model holds both), or serve it with a graph that "
                                "reads %r as a weight of its own" % (task, bundle.path, lost[0][0], what,
                                                                     lost[0][1], lost[0][1], lost[0][0]))
    skip = set(unread) | held
    missing = [n for n in switched if n not in engine_weights and n not in skip] + sorted(copied)
    if missing and not allow_unmatched:
        raise TvswitchError("%d of the %d tensors %s switches are not weights of %s (%s): every switch would "
                            "leave them at the graph's own values and answer wrong; export the graph with "
                            "tvswitch export-onnx, which keeps the state_dict names, or allow it "
                            "(--allow-unmatched) if the graph serves a subset on purpose"
                            % (len(missing), len(switched), bundle.path, what, some(missing)))
    return missing


def some(names: Sequence[str], count: int = 3) -> str:
    """The first ``count`` of ``names``, quoted, and how many more."""
    shown = ", ".join(repr(n) for n in names[:count])
    return shown + (" and %d more" % (len(names) - count) if len(names) > count else "")


class EngineBinding:
    """A bundle bound to an engine's weights: the names checked, every task's head laid out.

    ``cuts`` are the head shapes the engine knows how to cut its outputs for
    (``Engine.head_cuts``).  ``servable`` lists the tasks whose heads fit; a switch to
    another is refused by ``check`` with the reason, the previous task serving on.  With
    tasks whose heads all fit none of them, the bundle is refused here, at load: such an
    engine would answer with its own head whatever task is asked for.
    """

    def __init__(self, bundle: Bundle, engine_weights: EngineWeights, *, unread: Iterable[str] = (),
                 constants: Iterable[str] = (), copies: Mapping[str, Tuple[str, str]] = MappingProxyType({}),
                 aliases: Mapping[str, str] = MappingProxyType({}), allow_unmatched: bool = False,
                 cuts: Sequence[HeadCut] = (), what: str = "the engine"):
        self.bundle = bundle
        self.unmatched = check_engine_names(bundle, engine_weights, unread=unread, constants=constants,
                                            copies=copies, aliases=aliases, allow_unmatched=allow_unmatched,
                                            what=what)
        self.heads: HeadLayout = layout_heads({t: bundle.task_specific(t) for t in bundle.tasks}, engine_weights, cuts)
        self.servable = [t for t in bundle.tasks if t not in self.heads.misfits]
        if not self.servable and self.heads.names:
            raise TvswitchError("%s serves none of the tasks of %s: %s" % (
                what, bundle.path, "; ".join("%s: %s" % kv for kv in self.heads.misfits.items())))

    @classmethod
    def of_engine(cls, bundle: Bundle, engine: "Engine", *, unread: Iterable[str] = (),
                  allow_unmatched: bool = False, what: str = "the engine") -> "EngineBinding":
        """The bundle bound to ``engine``: its weights and what it says of them (unread
        weights, constants, copies, tied names, head cuts); ``unread`` adds to its own."""
        return cls(bundle, engine.weight_specs, unread=list(unread) + list(engine.unread_weights),
                   constants=engine.constants, copies=engine.weight_copies, aliases=engine.weight_aliases,
                   allow_unmatched=allow_unmatched, cuts=engine.head_cuts, what=what)

    def check(self, mix: Mapping[str, float]) -> Mix:
        """The mix validated (tasks, weights, its heaviest task's head); raises before anything is written."""
        mix = check_mix(mix, self.bundle.tasks, self.bundle.path)
        self.heads.check(head_task(mix))
        return mix

    def cut(self, mix: Mix) -> Optional[OutputCut]:
        """How the engine's outputs are cut to the answer of ``mix`` (its heaviest task's head)."""
        return self.heads.cuts.get(head_task(mix))


class BoundSource:
    """What a weight source (CPU or GPU rebuild) answers from its ``binding`` and
    ``rebuilder`` alone: a mix checked before any buffer is written, and the cut of its answer."""

    binding: EngineBinding
    rebuilder: Any

    def check(self, mix: Mapping[str, float]) -> Mix:
        """The mix, validated; raises before any buffer is written."""
        mix = self.binding.check(mix)
        self.rebuilder.mix_tables(mix)
        return mix

    def cut(self, mix: Mix) -> Optional[OutputCut]:
        """How the engine's outputs are cut to ``mix``'s answer (its heaviest task's size)."""
        return self.binding.cut(mix)
