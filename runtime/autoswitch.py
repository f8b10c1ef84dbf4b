"""Auto-Switch: pick the task mix for a batch by k-nearest neighbours over exemplar features.

T-Switch (CVPR 2025) needs no trained router: a few exemplar inputs per task are passed
through a router network (the base or the averaged model) once, offline, and their
features are stored as per-task query sets. At serving time the batch's features are
compared with every stored exemplar; each task gets the share of the k nearest neighbours
that are its exemplars, averaged over the batch (what the reference code does with
sklearn's KNeighborsClassifier.predict_proba, k = 10, Euclidean distance). The mix is
then rebuilt once for the batch. ``per_input`` gives each input's own shares, for
callers that can rebuild per input or group a batch by its dominant task.

numpy only, no torch and no sklearn, so it runs on the device; Python 3.8 compatible.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import numpy as np

DEFAULT_K = 10
DEFAULT_EXEMPLARS = 100


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

    def weights(self, features: np.ndarray) -> Dict[str, float]:
        """One mix for the whole batch: per-input shares averaged over the batch."""
        shares = self.per_input(features).mean(axis=0)
        return {t: float(w) for t, w in zip(self.tasks, shares)}

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
