"""Auto-Switch: pick the task mix for a batch by k-nearest neighbours over exemplar features.

T-Switch (CVPR 2025) needs no trained router: a few exemplar inputs per task (100 in the
reference code) are passed through a router network (the base or the averaged model)
once, offline, and their features are stored as per-task query sets
(``build_query_sets``). At serving time the batch's features are compared with every
stored exemplar; each task gets the share of the k nearest neighbours that are its
exemplars, averaged over the batch (what the reference code does with sklearn's
KNeighborsClassifier.predict_proba, k = 10, Euclidean distance). The mix is then rebuilt
once for the batch. ``AutoSwitch.split`` instead groups a batch by each input's own
shares, and ``serve_groups`` answers each group with its own mix.

The router's feature extractor is part of the model, not of the caller: ``RouterSpec``
(the bundle's ``router`` record) names the network, the engine output, the pooling and
the mask input, and ``RouterSpec.network_features`` runs the router network on an engine
and pools its output exactly as the record says, for the query sets
(``router_query_sets``, what ``tvswitch router`` stores) and at serving time alike.
``Router`` wires a bundle's record and query sets to an engine's ``infer``.

numpy only, no torch and no sklearn, so it runs on the device; Python 3.8 compatible.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.runtime.mix import Mix

if TYPE_CHECKING:
    from tvswitch.runtime.bundle import Bundle

DEFAULT_K = 10
DEFAULT_EXEMPLARS = 100
#: "mean": average over every axis but the first (inputs) and the last (features), only
#: where the mask input is nonzero if one is named; "none": the output is (inputs, features).
POOLS = ("mean", "none")
#: The router network: "average" (every task at 1/T, T-Switch's choice) or "base" (pretrained).
NETWORKS = ("average", "base")

Infer = Callable[[Mapping[str, np.ndarray], Mapping[str, float]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class RouterSpec:
    """How Auto-Switch's features are taken; stored in the bundle as its ``router`` record."""

    output: str
    pool: str = "mean"
    mask_input: Optional[str] = None
    k: int = DEFAULT_K
    network: str = "average"

    @classmethod
    def from_record(cls, record: Any, where: str = "bundle") -> "RouterSpec":
        """A validated spec; TvswitchError naming ``where`` (the bundle) and the field at fault."""
        fields = list(cls.__dataclass_fields__)
        if not isinstance(record, dict):
            raise TvswitchError("%s: the router record must be an object, got %r" % (where, record))
        unknown = sorted(set(record) - set(fields))
        if unknown:
            raise TvswitchError("%s: router record has unknown field %r (fields: %s)"
                                % (where, unknown[0], ", ".join(fields)))
        if "output" not in record:
            raise TvswitchError("%s: router record lacks 'output' (the network output features come from)" % where)
        spec = cls(**record)
        spec._check(where)
        return spec

    def _check(self, where: str) -> None:
        """TvswitchError naming ``where`` and the first field out of range."""
        def bad(field: str, want: str) -> TvswitchError:
            return TvswitchError("%s: router %s must be %s, got %r" % (where, field, want, getattr(self, field)))

        if not isinstance(self.output, str) or not self.output:
            raise bad("output", "an output name")
        if self.pool not in POOLS:
            raise bad("pool", " or ".join(POOLS))
        if self.mask_input is not None and (not isinstance(self.mask_input, str) or not self.mask_input):
            raise bad("mask_input", "an input name or null")
        if self.mask_input is not None and self.pool != "mean":
            raise bad("mask_input", "null unless pool is mean")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise bad("k", "an integer >= 1")
        if self.network not in NETWORKS:
            raise bad("network", " or ".join(NETWORKS))

    def record(self) -> dict:
        """The JSON form stored in a bundle's manifest."""
        return asdict(self)

    def network_mix(self, tasks: Sequence[str]) -> Mix:
        """The mix the router network is rebuilt from (all zero: the base weights)."""
        w = 1.0 / len(tasks) if self.network == "average" else 0.0
        return {t: w for t in tasks}

    def network_features(self, infer: Infer, tasks: Sequence[str], inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """(inputs, features) of a batch: one inference of the router network (the mix
        ``network_mix(tasks)`` on ``infer``, e.g. ``Server.infer``), pooled by ``features``."""
        return self.features(infer(inputs, self.network_mix(tasks)), inputs)

    def features(self, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """(inputs, features) float32 from the router network's outputs (and inputs, for the mask)."""
        if self.output not in outputs:
            raise TvswitchError("router output %r is not among the network's outputs (%s)"
                                % (self.output, ", ".join(outputs)))
        out = np.asarray(outputs[self.output], dtype=np.float32)
        if self.pool == "none":
            if out.ndim != 2:
                raise TvswitchError("router output %r is %s: pool 'none' needs (inputs, features)"
                                    % (self.output, list(out.shape)))
            return out
        if out.ndim < 2:
            raise TvswitchError("router output %r is %s: nothing to pool" % (self.output, list(out.shape)))
        flat = out.reshape(out.shape[0], -1, out.shape[-1])
        if self.mask_input is None:
            return flat.mean(axis=1)
        return _masked_mean(flat, self._mask(inputs, out.shape[:-1]))

    def _mask(self, inputs: Mapping[str, np.ndarray], shape: Tuple[int, ...]) -> np.ndarray:
        if self.mask_input not in inputs:
            raise TvswitchError("router mask input %r is not among the inputs (%s)"
                                % (self.mask_input, ", ".join(inputs)))
        mask = np.asarray(inputs[self.mask_input])
        if tuple(mask.shape) != tuple(shape):
            raise TvswitchError("router mask input %r is %s, the output %r needs %s"
                                % (self.mask_input, list(mask.shape), self.output, list(shape)))
        return mask.reshape(shape[0], -1) != 0


def _masked_mean(flat: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Mean over axis 1 of (n, L, d) where keep (n, L) is True; a row with nothing kept is 0."""
    w = keep.astype(np.float32)[:, :, None]
    return (flat * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1.0)


class AutoSwitch:
    """kNN router over per-task query sets of shape (n_t, d)."""

    def __init__(self, query_sets: Mapping[str, np.ndarray], k: int = DEFAULT_K) -> None:
        if not query_sets:
            raise ValueError("Auto-Switch needs at least one task's query set")
        dims = {np.shape(q)[-1] for q in query_sets.values()}
        if len(dims) != 1 or any(np.ndim(q) != 2 or len(q) == 0 for q in query_sets.values()):
            raise ValueError("query sets must be non-empty 2-D arrays of one feature width, got %s"
                             % {t: np.shape(q) for t, q in query_sets.items()})
        if k < 1:
            raise ValueError("k must be >= 1, got %r" % k)
        self.tasks: List[str] = list(query_sets)
        # Distances in float32 whatever the stored dtype (fp16 in bundles).
        self._points = np.concatenate([np.asarray(q, dtype=np.float32) for q in query_sets.values()])
        self._owner = np.concatenate([np.full(len(q), i) for i, q in enumerate(query_sets.values())])
        self._sq = (self._points ** 2).sum(axis=1)
        self.k = min(k, len(self._points))

    @property
    def dim(self) -> int:
        return int(self._points.shape[1])

    def per_input(self, features: np.ndarray) -> np.ndarray:
        """(n, T) share of each task among each input's k nearest exemplars; rows sum to 1."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.shape[1] != self.dim:
            raise ValueError("features have width %d, query sets %d" % (x.shape[1], self.dim))
        d2 = (x ** 2).sum(axis=1)[:, None] - 2.0 * x @ self._points.T + self._sq[None, :]
        # Ties in distance are broken by exemplar order (stable), as sklearn's brute force does.
        nearest = np.argsort(d2, axis=1, kind="stable")[:, : self.k]
        owners = self._owner[nearest]
        counts = np.zeros((len(x), len(self.tasks)), dtype=np.float64)
        for j in range(len(self.tasks)):
            counts[:, j] = (owners == j).sum(axis=1)
        return counts / self.k

    def weights(self, features: np.ndarray) -> Mix:
        """One mix for the whole batch: per-input shares averaged over the batch."""
        shares = self.per_input(features).mean(axis=0)
        return {t: float(w) for t, w in zip(self.tasks, shares)}

    def split(self, features: np.ndarray) -> List[Tuple[np.ndarray, Mix]]:
        """The batch grouped by each input's own mix: (row indices, mix without zero weights)
        per distinct mix, in order of first appearance. ``serve_groups`` answers each group
        with one rebuild, so per-input routing costs one rebuild per distinct mix."""
        per = self.per_input(features)
        groups: Dict[Tuple[float, ...], List[int]] = {}
        for i, row in enumerate(per):
            groups.setdefault(tuple(row), []).append(i)
        return [(np.asarray(rows), {t: float(w) for t, w in zip(self.tasks, key) if w > 0})
                for key, rows in groups.items()]

    def query_sets(self, dtype: Optional[np.dtype] = np.float16) -> Dict[str, np.ndarray]:
        """The stored form: task -> (n_t, d) array (fp16 by default, as bundles keep them)."""
        out = {}
        for i, t in enumerate(self.tasks):
            q = self._points[self._owner == i]
            out[t] = q.astype(dtype) if dtype is not None else q
        return out


def select_exemplars(features: np.ndarray, n: int = DEFAULT_EXEMPLARS, seed: int = 0) -> np.ndarray:
    """A seeded random subset of n rows: the reference code draws exemplars at random."""
    features = np.asarray(features)
    if len(features) <= n:
        return features
    idx = np.random.default_rng(seed).choice(len(features), size=n, replace=False)
    return features[np.sort(idx)]


def build_query_sets(features: Callable[[Any], np.ndarray], exemplars: Mapping[str, Sequence[Any]],
                     n: int = DEFAULT_EXEMPLARS, seed: int = 0) -> Dict[str, np.ndarray]:
    """Per-task query sets: ``features`` of ``n`` exemplar inputs per task drawn at random
    (seeded; all of them where a task has fewer), as (n_t, d) float32.

    ``exemplars[task]`` is a sequence of that task's inputs (an array is indexed along its
    first axis); ``features`` takes the chosen ones (same kind) and returns one row each,
    typically by running the router network and ``RouterSpec.features``.
    """
    if n < 1:
        raise ValueError("the number of exemplars per task must be >= 1, got %r" % n)
    out = {}
    for task, xs in exemplars.items():
        idx = select_exemplars(np.arange(len(xs)), n, seed)
        chosen = xs[idx] if isinstance(xs, np.ndarray) else [xs[i] for i in idx]
        q = np.asarray(features(chosen), dtype=np.float32)
        if q.ndim != 2 or len(q) != len(idx):
            raise ValueError("features of %d exemplars of task %r came back as %s, need (%d, d)"
                             % (len(idx), task, list(q.shape), len(idx)))
        out[task] = q
    return out


def router_query_sets(spec: RouterSpec, infer: Infer, tasks: Sequence[str],
                      exemplars: Mapping[str, Mapping[str, np.ndarray]], n: int = DEFAULT_EXEMPLARS, seed: int = 0,
                      batch: int = 64) -> Dict[str, np.ndarray]:
    """Per-task query sets taken as ``spec`` says, from named input arrays.

    ``exemplars[task]`` maps the network's input names to arrays whose rows (first axis)
    are that task's exemplar inputs; ``n`` rows per task are drawn as ``build_query_sets``
    draws them and run through the router network (``spec.network_features`` on ``infer``
    for the bundle's ``tasks``) ``batch`` rows at a time: the computation ``Router`` does at
    serving time, so stored and served features agree.
    """
    if batch < 1:
        raise TvswitchError("the batch size must be >= 1, got %r" % batch)
    out: Dict[str, np.ndarray] = {}
    for task, arrays in exemplars.items():
        rows = {len(a) if np.ndim(a) else 0 for a in arrays.values()}
        if not arrays or len(rows) != 1 or 0 in rows:
            raise TvswitchError("exemplars of task %r: need input arrays with one and the same number of rows "
                                "(>= 1), got %s" % (task, {k: list(np.shape(a)) for k, a in arrays.items()}))

        def features(idx: np.ndarray, arrays: Mapping[str, np.ndarray] = arrays) -> np.ndarray:
            return np.concatenate([spec.network_features(infer, tasks, {k: a[idx[s:s + batch]]
                                                                      for k, a in arrays.items()})
                                   for s in range(0, len(idx), batch)])

        out.update(build_query_sets(features, {task: np.arange(rows.pop())}, n, seed))
    return out


class Router:
    """A bundle's Auto-Switch wired to an engine: features by the bundle's router record,
    kNN over its query sets. ``Router(bundle, server.infer)`` is a ``Server.auto`` route."""

    def __init__(self, bundle: "Bundle", infer: Infer) -> None:
        queries = bundle.query_sets()
        if not queries:
            raise TvswitchError("%s has no Auto-Switch query sets: store them with tvswitch router (or export with "
                                "query sets)" % bundle.path)
        if bundle.router() is None:
            raise TvswitchError("%s has query sets but no router record saying how features are taken "
                                "(re-export it with router=RouterSpec(...))" % bundle.path)
        self.spec = RouterSpec.from_record(bundle.router(), bundle.path)
        self.switch = AutoSwitch(queries, k=self.spec.k)
        self._tasks = list(bundle.tasks)
        self._infer = infer

    def features(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The router network's features of a batch (one inference on the router's weights)."""
        return self.spec.network_features(self._infer, self._tasks, inputs)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> Mix:
        """The batch's mix (a ``Server.auto`` route)."""
        return self.switch.weights(self.features(inputs))

    def groups(self, inputs: Mapping[str, np.ndarray]) -> List[Tuple[np.ndarray, Mix]]:
        """Per-input routing: the batch grouped by each input's own mix (``serve_groups``)."""
        return self.switch.split(self.features(inputs))


def serve_groups(infer: Infer, inputs: Mapping[str, np.ndarray],
                 groups: Sequence[Tuple[np.ndarray, Mapping[str, float]]]
                 ) -> Dict[str, Union[np.ndarray, List[np.ndarray]]]:
    """Answer a batch group by group, each group with its own mix (``infer`` is
    ``Server.infer``: one rebuild per distinct mix), outputs reassembled in batch order.
    Inputs and outputs are batched along their first axis.

    Each group is answered by its own task's head at that head's size, so groups routed
    to tasks with different heads (3 classes, 5 classes) give answers no single array
    holds: such an output is then a list of one array per input, in batch order.
    """
    n = len(next(iter(inputs.values())))
    answers = [(rows, infer({k: v[rows] for k, v in inputs.items()}, mix)) for rows, mix in groups]
    out: Dict[str, Union[np.ndarray, List[np.ndarray]]] = {}
    for name in answers[0][1] if answers else ():
        parts = [(rows, np.asarray(answer[name])) for rows, answer in answers]
        if len({y.shape[1:] for _, y in parts}) == 1:
            whole = np.empty((n,) + parts[0][1].shape[1:], dtype=parts[0][1].dtype)
            for rows, y in parts:
                whole[rows] = y
            out[name] = whole
        else:
            each: List[np.ndarray] = [np.empty(0)] * n
            for rows, y in parts:
                for i, row in enumerate(rows):
                    each[int(row)] = y[i]
            out[name] = each
    return out
