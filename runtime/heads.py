"""Heads of different shapes on one engine: padded weights in, each task's own outputs out.

Tasks of one bundle rarely share their heads' shapes (3, 4 and 5 classes; 20 topics
against 2 sentiments), yet an engine has one set of weight buffers and one graph.  So
each task-specific tensor is laid out at the largest shape any task needs
(``padded_shapes``), every task's own values sit at the origin corner of it with zeros
elsewhere (``pad``), and what the padding adds to the outputs is cut away after
inference (``HeadCut``: per output, the task's length along each axis).

Why zeros change nothing (docs/engines.md section 2 has the whole argument): a zero row
of a classifier's weight and a zero bias give an extra logit that no real logit reads; a
zero output channel of a conv head is an extra channel no real channel reads; in a small
MLP head the padded hidden units get zero weights in and give zero weights out, so
whatever their activation makes of 0, the next layer multiplies it by zero columns.
What breaks it is an operation that mixes along a padded axis before the cut (a softmax
over the classes, a norm over a padded hidden layer): the exporter and the torch engine
check every head shape against the module at its own, unpadded shape and refuse a
network where the cut outputs differ (``torch_engine.fit_heads``).

The cut for a head shape comes from running the network at that shape: it is recorded
in the graph by ``tvswitch export-onnx --bundle`` (``onnx_graph.WeightRecord.heads``) and
learnt at load by the torch engine.  A head whose shapes equal the engine's weights
needs no cut; a smaller one that nothing recorded is refused, never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tvswitch.errors import TvswitchError

Shape = Tuple[int, ...]
#: Output name -> the task's length along each axis (None: that axis is not cut).
OutputCut = Dict[str, Tuple[Optional[int], ...]]


@dataclass(frozen=True)
class HeadCut:
    """How the outputs of a padded engine are cut for heads of ``shapes`` (tensor -> shape)."""

    shapes: Dict[str, Shape]
    outputs: OutputCut

    def record(self) -> dict:
        return {"shapes": {n: list(s) for n, s in sorted(self.shapes.items())},
                "outputs": {n: list(v) for n, v in sorted(self.outputs.items())}}

    @classmethod
    def from_record(cls, raw: Any, where: str) -> "HeadCut":
        """A cut read from a graph's record; TvswitchError naming ``where`` if malformed."""
        try:
            shapes = {str(n): tuple(_dim(d) for d in s) for n, s in raw["shapes"].items()}
            outputs = {str(n): tuple(None if d is None else _dim(d) for d in v) for n, v in raw["outputs"].items()}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise TvswitchError("%s: malformed head cut in the tvswitch record (%s)" % (where, exc)) from None
        return cls(shapes, outputs)


def _dim(d: Any) -> int:
    if isinstance(d, bool) or not isinstance(d, int) or d < 0:
        raise ValueError("%r is not a size" % (d,))
    return d


def padded_shapes(heads: Mapping[str, Mapping[str, Sequence[int]]]) -> Dict[str, Shape]:
    """Tensor -> the smallest shape that holds every task's (task -> tensor -> shape), axis by axis.

    A tensor of another rank in two tasks has no common layout: refused, naming both.
    """
    out: Dict[str, Shape] = {}
    owner: Dict[str, str] = {}
    for task, tensors in heads.items():
        for name, shape in tensors.items():
            shape = tuple(int(d) for d in shape)
            if name not in out:
                out[name], owner[name] = shape, task
            elif len(shape) != len(out[name]):
                raise TvswitchError("task-specific tensor %r is %s in task %r but %s in task %r: tensors of "
                                    "different ranks cannot share one engine weight"
                                    % (name, list(shape), task, list(out[name]), owner[name]))
            else:
                out[name] = tuple(max(a, b) for a, b in zip(out[name], shape))
    return out


def fits(shape: Sequence[int], padded: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` fits inside ``padded`` (same rank, no axis longer)."""
    return len(shape) == len(padded) and all(a <= b for a, b in zip(shape, padded))


def pad(a: np.ndarray, shape: Sequence[int], dtype: Any = None) -> np.ndarray:
    """``a`` at the origin corner of a zero array of ``shape`` (and ``dtype``, default ``a``'s)."""
    a = np.asarray(a)
    shape = tuple(int(d) for d in shape)
    if not fits(a.shape, shape):
        raise TvswitchError("a tensor of shape %s does not fit the engine's %s" % (list(a.shape), list(shape)))
    out = np.zeros(shape, dtype=dtype or a.dtype)
    out[tuple(slice(0, d) for d in a.shape)] = a
    return out


def output_cut(padded: Mapping[str, Sequence[int]], exact: Mapping[str, Sequence[int]]) -> OutputCut:
    """Per output, the lengths where the head's own outputs (``exact`` shapes) are shorter than
    the padded engine's (``padded``); outputs of equal shape are left out (nothing to cut).

    An output longer at the head's own shape, or of another rank, cannot be a corner of
    the padded one: refused.
    """
    cut: OutputCut = {}
    for name, big in padded.items():
        small = tuple(exact[name])
        big = tuple(big)
        if not fits(small, big):
            raise TvswitchError("output %r is %s at a task's own head shapes but %s padded: padding a head "
                                "must only lengthen outputs" % (name, list(small), list(big)))
        if small != big:
            cut[name] = tuple(s if s != b else None for s, b in zip(small, big))
    return cut


def cut_outputs(outputs: Mapping[str, np.ndarray], cut: Optional[OutputCut]) -> Dict[str, np.ndarray]:
    """The outputs cut to a head's own lengths (a copy of each cut output; the rest as they are)."""
    if not cut:
        return dict(outputs)
    out = dict(outputs)
    for name, lengths in cut.items():
        if name in out:
            a = out[name]
            out[name] = np.ascontiguousarray(a[tuple(slice(None) if n is None else slice(0, n) for n in lengths)])
    return out


@dataclass
class HeadLayout:
    """What an engine serves of each task's task-specific tensors (``layout_heads``)."""

    #: task -> tensor -> the task's value padded to the engine's shape (what a switch writes)
    padded: Dict[str, Dict[str, np.ndarray]]
    #: task -> how that task's outputs are cut (None: not at all)
    cuts: Dict[str, Optional[OutputCut]]
    #: task -> why this engine cannot serve it
    misfits: Dict[str, str]
    #: every task-specific tensor the engine serves
    names: List[str]

    def check(self, task: str) -> None:
        """Refuse serving ``task``'s head: one line saying why it does not fit."""
        if task in self.misfits:
            raise TvswitchError("task %r cannot be served by this network: %s" % (task, self.misfits[task]))


def layout_heads(task_tensors: Mapping[str, Mapping[str, np.ndarray]],
               engine_weights: Mapping[str, Tuple[Sequence[int], Any]],
               cuts: Sequence[HeadCut] = ()) -> HeadLayout:
    """Which task's head an engine serves, how: ``task_tensors`` is the bundle's task-specific
    tensors per task, ``engine_weights`` the engine's weight specs (name -> (shape, dtype)),
    ``cuts`` what the engine knows of head shapes smaller than its weights.

    A task serves when each of its tensors that the engine holds fits the engine's shape
    and, where smaller, a cut for exactly its shapes is known; the others are ``misfits``
    (a switch to them is refused: ``HeadLayout.check``).  A task lacking a tensor the
    engine holds for other tasks is a misfit too: its answer would read another task's
    values.
    """
    names = sorted({n for t in task_tensors.values() for n in t if n in engine_weights})
    padded: Dict[str, Dict[str, np.ndarray]] = {}
    task_cuts: Dict[str, Optional[OutputCut]] = {}
    misfits: Dict[str, str] = {}
    for task, tensors in task_tensors.items():
        mine = {n: tensors[n] for n in names if n in tensors}
        lacking = [n for n in names if n not in tensors]
        why = None
        if lacking:
            why = "it has no tensor %r, which the engine serves for other tasks" % lacking[0]
        exact = True
        for n, a in mine.items():
            shape = tuple(engine_weights[n][0])
            if why is None and not fits(np.shape(a), shape):
                why = "its tensor %r is %s, the network's weight is %s" % (n, list(np.shape(a)), list(shape))
            exact = exact and tuple(np.shape(a)) == shape
        cut: Optional[OutputCut] = None
        if why is None and not exact:
            shapes = {n: tuple(np.shape(a)) for n, a in mine.items()}
            found = next((c for c in cuts if c.shapes == shapes), None)
            if found is None:
                n = next(n for n, a in mine.items() if tuple(np.shape(a)) != tuple(engine_weights[n][0]))
                why = ("its tensor %r is %s, smaller than the network's %s, and the network records no output cut "
                       "for heads of that shape (export the graph with tvswitch export-onnx --bundle)"
                       % (n, list(np.shape(mine[n])), list(engine_weights[n][0])))
            else:
                cut = found.outputs
        if why is not None:
            misfits[task] = why
            padded[task], task_cuts[task] = {}, None
            continue
        padded[task] = {n: pad(a, engine_weights[n][0], np.dtype(engine_weights[n][1])) for n, a in mine.items()}
        task_cuts[task] = cut
    return HeadLayout(padded, task_cuts, misfits, names)
