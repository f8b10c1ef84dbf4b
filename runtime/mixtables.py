"""From a mix to decode.h's tables: which terms each tensor sums, with what weights.

Shared by the CPU and GPU rebuilders; they differ only in the addresses the payloads
have (host arrays or device memory), which ``address`` supplies.  Terms that several
tasks share (RTVQ's base vector) are merged into one term whose weight is the sum, so a
mix of eight RTVQ tasks reads the shared base once.  Terms that share codes but not masks
(EMR's unified vector under each task's mask) stay separate terms, so a K-task EMR mix
reads the shared codes K times, and ``bytes_moved`` counts them K times.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.kernels import abi
from tvswitch.kernels.abi import FLOAT32_MAX
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.zeroblocks import ZERO_BLOCK, blocks_of, zero_blocks


@dataclass
class MixTables:
    """Tables for one mix; ``segments`` lack base/out addresses, which belong to the caller."""

    names: List[str]
    segments: np.ndarray  # abi.SEGMENT_DTYPE, one per name, in order
    terms: np.ndarray  # abi.TERM_DTYPE
    keys: List[str]  # payloads the terms read, each once
    reads: List[str]  # payloads the terms read, once per term that reads them (what really moves)
    #: per segment, everything its output depends on but the base and the output buffer:
    #: the base's coefficient and the term rows (payload addresses, weights, widths), as bytes
    signatures: List[bytes] = field(default_factory=list)
    #: per segment, the payloads its terms read (``reads``, split by segment)
    segment_reads: List[List[str]] = field(default_factory=list)
    #: per ZERO_BLOCK block of each segment in turn (``blocks_of(n)`` each), True where
    #: every term is known to be +0.0; per segment, what the value there is a function of:
    #: ``zero_keys`` (FORMAT.md 3.5)
    zero: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    zero_keys: List[tuple] = field(default_factory=list)
    #: None: every element of every segment is written; else the element ranges that are
    #: (``abi.RUN_DTYPE``, set by ``since`` where whole blocks hold the same bits)
    runs: Optional[np.ndarray] = None
    _left_out: Dict[FrozenSet[str], "MixTables"] = field(default_factory=dict, repr=False, compare=False)

    def since(self, held: "MixTables") -> "MixTables":
        """These tables cut to what differs from ``held``'s (tables of the same rebuilder, so
        the same payload addresses): what a rebuild must write over buffers that hold
        ``held``'s result.  A tensor's value is a fixed function of its base, coefficient and
        terms (decode.h's arithmetic contract), so a tensor whose inputs are the same in both
        already holds these bits; so does a block of a tensor where every term of both
        mixes is +0.0 and the base's coefficient is the same (``zero_keys``), so those
        blocks are left out of ``runs``.  Leaving either alone is exact."""
        count = len(self.names)
        changed = np.fromiter((a != b for a, b in zip(self.signatures, held.signatures)), dtype=bool, count=count)
        same = np.fromiter((_same_value(a, b) for a, b in zip(self.zero_keys, held.zero_keys)), dtype=bool,
                           count=count)
        nblocks = blocks_of(self.segments["n"].astype(np.int64))
        both = self.zero & held.zero & np.repeat(changed & same, nblocks)
        total = np.concatenate([[0], np.cumsum(both)])
        offsets = np.concatenate([[0], np.cumsum(nblocks)])
        skipped = total[offsets[1:]] - total[offsets[:-1]]  # per segment, its blocks both leave alone
        keep = changed & ~((skipped == nblocks) & (nblocks > 0))  # a tensor all of whose blocks hold these bits
        cut = self.subset(np.flatnonzero(keep).tolist())
        if (skipped[keep] > 0).any():
            cut.runs = element_runs(cut.segments["n"], ~both[np.repeat(keep, nblocks)])
        return cut

    def subset(self, indices: List[int]) -> "MixTables":
        """The tables of the segments at ``indices`` (ascending) only, launch blocks counted
        afresh; the term table stays whole (the segments index into it)."""
        segments = self.segments[indices].copy() if indices else self.segments[:0].copy()
        blocks = -(-segments["n"].astype(np.int64) // abi.BLOCK_ELEMS)
        segments["first_block"] = np.concatenate([[0], np.cumsum(blocks)[:-1]]) if len(blocks) else blocks
        reads = [k for i in indices for k in self.segment_reads[i]]
        picked = np.zeros(len(self.names), dtype=bool)
        picked[indices] = True
        return MixTables(names=[self.names[i] for i in indices], segments=segments, terms=self.terms,
                         keys=list(dict.fromkeys(reads)), reads=reads,
                         signatures=[self.signatures[i] for i in indices],
                         segment_reads=[self.segment_reads[i] for i in indices],
                         zero=self.zero[np.repeat(picked, blocks_of(self.segments["n"].astype(np.int64)))],
                         zero_keys=[self.zero_keys[i] for i in indices])

    def leaving_out(self, names: FrozenSet[str]) -> "MixTables":
        """A mix's whole tables less the segments of ``names`` (tensors the caller's buffers
        do not hold, being the base in every mix), cached per set of names.  ``since``'s
        cuts never need it: such a tensor's inputs are the same in every mix."""
        cut = self._left_out.get(names)
        if cut is None:
            cut = self._left_out[names] = self.subset([i for i, n in enumerate(self.names) if n not in names])
        return cut

    def written(self) -> np.ndarray:
        """Elements written per segment (all of it, or what ``runs`` cover)."""
        n = self.segments["n"].astype(np.int64)
        if self.runs is None:
            return n
        return np.bincount(self.runs["segment"], weights=self.runs["len"], minlength=len(n)).astype(np.int64)


def _same_value(a: tuple, b: tuple) -> bool:
    """Whether an all-zero block is the same function of the base under zero keys ``a``
    and ``b`` = (coefficient as float32 bytes, a term adds +0.0, c * base can be -0.0):
    acc = c * base, then +-0.0 per term, which changes nothing but -0.0 + +0.0 = +0.0."""
    return a[0] == b[0] and (a[1] == b[1] or not (a[2] or b[2]))


def element_runs(n: np.ndarray, write: np.ndarray) -> np.ndarray:
    """The element ranges (``abi.RUN_DTYPE``) that cover the blocks ``write`` marks (one
    flag per block of each segment in turn: ``blocks_of(n)`` each), at most
    ``abi.CPU_TILE`` elements each, in segment order: each stretch of marked blocks inside
    a segment, cut every CPU_TILE elements from its start.  A switch makes these for every
    pair of mixes it meets, so the passes over all blocks are few (finding the stretches)
    and the rest is per stretch."""
    per_tile = abi.CPU_TILE // ZERO_BLOCK
    counts = n.astype(np.int64)
    nblocks = blocks_of(counts)
    offsets = np.cumsum(nblocks) - nblocks
    edges = np.diff(np.concatenate([[0], write.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    inner = offsets[(offsets > 0) & (offsets < len(write)) & (nblocks > 0)]
    cross = inner[write[inner] & write[inner - 1]]  # a stretch running on into the next segment
    if len(cross):
        starts, ends = np.sort(np.concatenate([starts, cross])), np.sort(np.concatenate([ends, cross]))
    if not len(starts):
        return np.zeros(0, dtype=abi.RUN_DTYPE)
    seg = np.searchsorted(offsets, starts, side="right") - 1  # the last of equal offsets: the one with blocks
    pieces = -(-(ends - starts) // per_tile)
    piece = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # within its stretch
    first = np.repeat(starts, pieces) + per_tile * piece
    last = np.minimum(first + per_tile, np.repeat(ends, pieces))  # past its last block
    run_seg = np.repeat(seg, pieces)
    runs = np.zeros(len(first), dtype=abi.RUN_DTYPE)
    start = (first - offsets[run_seg]) * ZERO_BLOCK
    runs["segment"], runs["start"] = run_seg, start
    runs["len"] = np.minimum((last - offsets[run_seg]) * ZERO_BLOCK, counts[run_seg]) - start
    return runs


class TableMaker:
    """Tables of mixes of one bundle for one rebuilder (``address`` resolves payload keys).

    Everything in a mix's tables but its weights (which terms each tensor sums, where
    they read, which blocks are zero) is a function of which tasks it holds, and every
    task's part is made once (``_Layout``: a loop over some 800 terms for eight MiniLM
    tasks, 3 ms), so a new mix costs array operations, and one of a set of tasks met
    before (Auto-Switch's per-batch case) reuses its structure too.

    ``base_bound(name)``: max|base| of a tensor, for the range check; ``zero_signs(name)``:
    the smallest magnitudes of the base tensor's negative and non-negative values
    (``zero_signs_of``), which say where ``c * base`` can be -0.0 and so let a switch
    skip more blocks (``MixTables.since``); without it a block is skipped only where the
    base's coefficient is 0, or both mixes add a +0.0 term there, or neither does.
    """

    def __init__(self, bundle: Bundle, address: Callable[[str], int],
                 base_bound: Optional[Callable[[str], float]] = None,
                 zero_signs: Optional[Callable[[str], Tuple[float, float]]] = None):
        self.bundle = bundle
        self.address = address
        self.names = list(bundle.shared_specs)
        self._base_bound = base_bound
        self._zero_signs = zero_signs
        self._layout: Optional[_Layout] = None
        self._bounds: Optional[np.ndarray] = None
        self._signs: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def tables(self, mix: Mapping[str, float]) -> MixTables:
        """Tables for ``mix`` (already checked: ``mix.check_mix``).

        Refused (``TvswitchError``) before any table exists: a mix whose folded weights
        would take some tensor past float32's range.  Each element is bounded by
        ``|c| * max|base| + sum_j |w_j| * max|v_j|`` (``term_bound`` a term's largest
        value), which is what decode.h's float32 sum can reach.
        """
        weights = np.array([mix.get(t) or 0.0 for t in self.bundle.tasks], dtype=np.float64)
        return self._the_layout().tables(self, weights, mix)

    def payload_keys(self) -> List[str]:
        """Every payload the terms of some mix read, each once."""
        return list(dict.fromkeys(k for keys in self._the_layout().payloads for k in keys))

    def _the_layout(self) -> "_Layout":
        if self._layout is None:  # made at the first mix: a loop over every task's terms
            self._layout = _Layout(self)
        return self._layout

    def base_bounds(self) -> np.ndarray:
        if self._bounds is None:
            self._bounds = np.array([self._base_bound(n) if self._base_bound is not None else 0.0
                                     for n in self.names], dtype=np.float64)
        return self._bounds

    def base_signs(self) -> Tuple[np.ndarray, np.ndarray]:
        """Per tensor, float32: the smallest magnitude of the base's negative values and of
        its non-negative ones (``zero_signs_of``; 0 when unknown: as if it held both zeros)."""
        if self._signs is None:
            signs = [self._zero_signs(n) if self._zero_signs is not None else (0.0, 0.0) for n in self.names]
            self._signs = (np.array([a for a, _ in signs], dtype=np.float32),
                           np.array([b for _, b in signs], dtype=np.float32))
        return self._signs


_MAX_STRUCTURES = 256


class _Layout:
    """The weight-free part of the tables of every mix of a bundle: one entry per term
    each tensor sums (a term several tasks share, RTVQ's base vector, is one entry whose
    weight is the sum of theirs), and each contribution to an entry's weight (entry +=
    mix[task] * scale), in the order of a loop over tensors, tasks and terms.  A mix's
    rows are its tasks' entries in the order of their first contribution from those
    tasks, so a mix of some tasks has the rows, in the order, of a loop over them alone."""

    def __init__(self, maker: TableMaker):
        bundle = maker.bundle
        rows: List[tuple] = []
        segment: List[int] = []
        self.payloads: List[List[str]] = []
        zero_maps: List[Optional[np.ndarray]] = []
        bounds: List[float] = []
        entry_of, task_of, scale_of = [], [], []
        absolute: List[List[int]] = []  # per tensor, the tasks that store it whole (FQ)
        for s, name in enumerate(maker.names):
            numel = bundle.shared_specs[name].numel
            merged: Dict[tuple, int] = {}
            absolute.append([])
            for j, task in enumerate(bundle.tasks):
                entry = bundle.entries(task).get(name)
                if entry is None:
                    continue
                if entry.mode == "absolute":
                    absolute[-1].append(j)
                for t in entry.terms:
                    key = (t.kind, t.codes or t.values, t.params, t.mask, t.bits, t.group, t.layout, t.fill)
                    e = merged.get(key)
                    if e is None:
                        e = merged[key] = len(rows)
                        rows.append(_term_row(bundle, t, 0.0, maker.address))
                        segment.append(s)
                        self.payloads.append(list(t.payloads))
                        zero_maps.append(zero_blocks(bundle, t, numel))
                        bounds.append(term_bound(bundle, t))
                    entry_of.append(e)
                    task_of.append(j)
                    scale_of.append(t.scale)
        self.rows = np.array(rows, dtype=abi.TERM_DTYPE) if rows else np.zeros(0, dtype=abi.TERM_DTYPE)
        self.segment = np.array(segment, dtype=np.int64)
        self.numel = np.array([bundle.shared_specs[n].numel for n in maker.names], dtype=np.int64)
        nblocks = blocks_of(self.numel)
        block_start = np.cumsum(nblocks) - nblocks
        self.total_blocks = int(nblocks.sum())
        #: per entry, the blocks (counted over every tensor in turn) where it is not known
        #: +0.0: a range (first, end) where that is all of its tensor's, else their indices
        self.nonzero = [(int(block_start[s]), int(block_start[s] + nblocks[s])) if m is None
                        else (block_start[s] + np.flatnonzero(~m)).astype(np.int32)
                        for s, m in zip(segment, zero_maps)]
        self.bounds = np.array(bounds, dtype=np.float64)
        self.entry_of = np.array(entry_of, dtype=np.int64)
        self.task_of = np.array(task_of, dtype=np.int64)
        self.scale_of = np.array(scale_of, dtype=np.float64)
        width = max((len(a) for a in absolute), default=0)
        self.absolute = np.full((len(absolute), width), -1, dtype=np.int64)
        for s, tasks in enumerate(absolute):
            self.absolute[s, :len(tasks)] = tasks
        blocks = -(-self.numel // abi.BLOCK_ELEMS)
        self.first_block = np.cumsum(blocks) - blocks
        self._structures: Dict[bytes, tuple] = {}  # per set of rows (their entries, in order)

    def tables(self, maker: TableMaker, weights: np.ndarray, mix: Mapping[str, float]) -> MixTables:
        """``weights``: per task of the bundle, 0.0 for one the mix does not hold."""
        live = (weights != 0.0)[self.task_of]  # the contributions of the mix's tasks, in loop order
        entry_of = self.entry_of[live]
        weight = np.bincount(entry_of, weights=weights[self.task_of[live]] * self.scale_of[live],
                             minlength=len(self.rows))
        if live.all():  # entries are numbered by their first contribution
            order = np.arange(len(self.rows))
        else:
            present, first = np.unique(entry_of, return_index=True)
            order = present[np.argsort(first, kind="stable")]
        # from 1.0 down, term by term, as a loop would (a task not in the mix subtracts 0.0: exact)
        base_coef = np.ones(len(self.numel), dtype=np.float64)
        for j in range(self.absolute.shape[1]):
            has = self.absolute[:, j] >= 0
            base_coef[has] -= weights[self.absolute[has, j]]
        self._check_range(maker, mix, base_coef, weight)
        kept = order[weight[order] != 0.0]
        count, zero, segment_reads, reads, keys = self._structure(kept)
        terms = self.rows[kept]
        terms["weight"] = weight[kept]
        names = maker.names
        segments = np.zeros(len(names), dtype=abi.SEGMENT_DTYPE)
        begin = np.cumsum(count) - count
        segments["n"] = self.numel
        segments["first_block"] = self.first_block
        segments["base_coef"] = base_coef
        segments["term_begin"] = begin
        segments["term_count"] = count
        coef = base_coef.astype(np.float32)
        plus = np.bincount(self.segment[kept], weights=~np.signbit(terms["weight"]), minlength=len(names)) > 0
        neg, pos = maker.base_signs()
        # c * base can be -0.0: a zero, or an underflow, of the sign opposite to c's (where c
        # is 0 the product may be 0 * inf, and the first term masks it)
        with np.errstate(under="ignore", invalid="ignore"):
            minus = (coef != 0) & (np.abs(coef) * np.where(coef > 0, neg, pos) == 0)
        row_bytes, size = terms.tobytes(), abi.TERM_DTYPE.itemsize
        coef_bytes = coef.tobytes()
        coefs = [coef_bytes[4 * s:4 * s + 4] for s in range(len(names))]
        signatures = [c + row_bytes[size * b:size * (b + k)] for c, b, k in zip(coefs, begin.tolist(), count.tolist())]
        return MixTables(names=list(names), segments=segments, terms=terms, keys=list(keys), reads=list(reads),
                         signatures=signatures, segment_reads=list(segment_reads), zero=zero,
                         zero_keys=list(zip(coefs, plus.tolist(), minus.tolist())))

    def _structure(self, kept: np.ndarray) -> tuple:
        """Per tensor, for the entries ``kept`` (grouped by tensor): how many rows, which
        blocks every one of them is +0.0 in (the base alone where none), the payloads they
        read; then those payloads in one list, and each once.  Kept per set of entries."""
        key = kept.tobytes()
        found = self._structures.get(key)
        if found is not None:
            return found
        count = np.bincount(self.segment[kept], minlength=len(self.numel))
        entries = kept.tolist()
        touched = np.zeros(self.total_blocks, dtype=bool)  # some kept term is not +0.0 there
        parts = []
        for e in entries:
            blocks = self.nonzero[e]
            if isinstance(blocks, tuple):
                touched[blocks[0]:blocks[1]] = True
            else:
                parts.append(blocks)
        if parts:
            touched[np.concatenate(parts)] = True
        segment_reads: List[List[str]] = []
        end = 0
        for c in count.tolist():
            segment_reads.append([k for e in entries[end:end + c] for k in self.payloads[e]])
            end += c
        reads = [k for r in segment_reads for k in r]
        flat = ~touched  # the base alone where no term
        flat.flags.writeable = False  # every mix of these rows shares it
        found = (count, flat, segment_reads, reads, list(dict.fromkeys(reads)))
        if len(self._structures) >= _MAX_STRUCTURES:
            self._structures.clear()
        self._structures[key] = found
        return found

    def _check_range(self, maker: TableMaker, mix: Mapping[str, float], base_coef: np.ndarray,
                     weight: np.ndarray) -> None:
        bound = np.abs(base_coef) * np.where(base_coef != 0, maker.base_bounds(), 0.0)
        bound += np.bincount(self.segment, weights=np.abs(weight) * self.bounds, minlength=len(bound))
        bad = np.flatnonzero(~(bound <= FLOAT32_MAX))
        if len(bad):
            raise TvswitchError("the mix %s would take tensor %r of %s past float32's range (|value| up to %.3g): "
                                "every weight it writes there would be inf" % (
                                    ",".join("%s=%g" % kv for kv in mix.items()), maker.names[bad[0]],
                                    maker.bundle.path, bound[bad[0]]))


def abs_max(a: np.ndarray) -> float:
    """max|a| (0 for an empty tensor): a base tensor's bound in ``TableMaker``'s range check."""
    return float(np.abs(a.astype(np.float32, copy=False)).max()) if a.size else 0.0


def zero_signs_of(a: np.ndarray) -> Tuple[float, float]:
    """The smallest magnitude among ``a``'s values with the sign bit set (-0.0 counts, as
    0) and among those without (inf where there is none): ``c * base`` is -0.0 somewhere
    exactly when the float32 product of |c| and the smallest magnitude of the sign
    opposite to c's is 0, a zero of that sign or one that underflows (``TableMaker``)."""
    y = a.astype(np.float32, copy=False).ravel()
    x, negative = np.abs(y), np.signbit(y)
    number = ~np.isnan(x)  # a NaN writes NaN whatever its neighbours' signs
    neg = x[negative & number]
    pos = x[~negative & number]
    return (float(neg.min()) if neg.size else np.inf), (float(pos.min()) if pos.size else np.inf)


def _term_row(bundle: Bundle, t, weight: float, address: Callable[[str], int]) -> tuple:
    """decode.h's tv_term for one term, as abi.TERM_DTYPE's tuple (``fill`` last)."""
    if t.layout == "groups":  # decode.h's GROUPS term: the bytes in codes, the index in mask
        return (address(t.codes), address(t.mask), address(t.params), t.group, weight, abi.KIND_GROUPS, 1,
                bundle.payload(t.codes).size, 0)
    if t.layout == "sparse":  # SPARSE: the stored groups' codes in codes, the index in mask
        return (address(t.codes), address(t.mask), address(t.params), t.group, weight, abi.KIND_SPARSE, t.bits,
                bundle.payload(t.codes).size, t.fill)
    if t.kind == "codes":
        return (address(t.codes), address(t.mask) if t.mask else 0, address(t.params), t.group,
                weight, abi.KIND_CODES, t.bits, 0, 0)
    values = bundle.payload(t.values)
    kind = abi.KIND_RAW_F32 if values.dtype == np.float32 else abi.KIND_RAW_F16
    return (address(t.values), address(t.mask) if t.mask else 0, 0, 1, weight, kind, 0, 0, 0)


def term_bound(bundle: Bundle, t) -> float:
    """The largest magnitude a term's value reaches: ``max(|offset|, |scale * (2^b - 1) + offset|)``
    over its groups for codes, ``max|values|`` for raw values (computed once per payload)."""
    cache = _BOUNDS.setdefault(bundle, {})
    key = (t.kind, t.codes or t.values, t.params, t.bits)
    if key not in cache:
        if t.kind == "codes":
            params = bundle.payload(t.params).astype(np.float64).reshape(-1, 2)
            top = params[:, 0] * float((1 << t.bits) - 1) + params[:, 1]
            cache[key] = float(max(np.abs(params[:, 1]).max(), np.abs(top).max())) if len(params) else 0.0
        else:
            values = bundle.payload(t.values)
            cache[key] = float(np.abs(values.astype(np.float64)).max()) if values.size else 0.0
    return cache[key]


_BOUNDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def mix_key(mix: Mapping[str, float]) -> tuple:
    return tuple(sorted(mix.items()))


def bytes_moved(tables: MixTables, bundle: Bundle, base_itemsize: int, out_itemsize: int) -> int:
    """Bytes a rebuild of these tables moves: base read, every term's packed payloads (a payload
    two terms read counts twice: EMR's shared codes in a mix), output write.  Where ``runs``
    cover part of a tensor, its base and output count for the elements written and its
    payloads pro rata (the blocks left out are read no further than their index records)."""
    total = 0.0
    for s, written, reads in zip(tables.segments, tables.written(), tables.segment_reads):
        n, m = int(s["n"]), int(written)
        total += m * out_itemsize + (m * base_itemsize if float(s["base_coef"]) != 0.0 else 0)
        total += sum(bundle.payload(k).nbytes for k in reads) * (m / n if n else 1.0)
    return int(round(total))
