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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Tuple

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
    #: per segment, per ZERO_BLOCK block, True where every term is +0.0 (None: no such
    #: block), and what the value there is a function of: ``zero_keys`` (FORMAT.md 3.5)
    zero: List[Optional[np.ndarray]] = field(default_factory=list)
    zero_keys: List[tuple] = field(default_factory=list)
    #: None: every element of every segment is written; else the element ranges that are
    #: (``abi.RUN_DTYPE``, set by ``since`` where whole blocks hold the same bits)
    runs: Optional[np.ndarray] = None

    def since(self, held: "MixTables") -> "MixTables":
        """These tables cut to what differs from ``held``'s (tables of the same rebuilder, so
        the same payload addresses): what a rebuild must write over buffers that hold
        ``held``'s result.  A tensor's value is a fixed function of its base, coefficient and
        terms (decode.h's arithmetic contract), so a tensor whose inputs are the same in both
        already holds these bits; so does a block of a tensor where every term of both
        mixes is +0.0 and the base's coefficient is the same (``zero_keys``), so those
        blocks are left out of ``runs``.  Leaving either alone is exact."""
        changed = [i for i, (a, b) in enumerate(zip(self.signatures, held.signatures)) if a != b]
        keep, skips = [], []
        for i in changed:
            skip = self._same_blocks(held, i)
            if skip is not None and skip.all():
                continue  # every block of it holds these bits already
            keep.append(i)
            skips.append(skip)
        cut = self.subset(keep)
        if any(skip is not None for skip in skips):
            cut.runs = element_runs(cut.segments["n"], skips)
        return cut

    def _same_blocks(self, held: "MixTables", i: int) -> Optional[np.ndarray]:
        """Blocks of segment ``i`` that hold the same bits under both tables (None: none)."""
        mine, theirs = self.zero[i], held.zero[i]
        if mine is None or theirs is None or not _same_value(self.zero_keys[i], held.zero_keys[i]):
            return None
        both = mine & theirs
        return both if both.any() else None

    def subset(self, indices: List[int]) -> "MixTables":
        """The tables of the segments at ``indices`` only, launch blocks counted afresh; the
        term table stays whole (the segments index into it)."""
        segments = self.segments[indices].copy() if indices else self.segments[:0].copy()
        blocks = -(-segments["n"].astype(np.int64) // abi.BLOCK_ELEMS)
        segments["first_block"] = np.concatenate([[0], np.cumsum(blocks)[:-1]]) if len(blocks) else blocks
        reads = [k for i in indices for k in self.segment_reads[i]]
        return MixTables(names=[self.names[i] for i in indices], segments=segments, terms=self.terms,
                         keys=list(OrderedDict.fromkeys(reads)), reads=reads,
                         signatures=[self.signatures[i] for i in indices],
                         segment_reads=[self.segment_reads[i] for i in indices],
                         zero=[self.zero[i] for i in indices], zero_keys=[self.zero_keys[i] for i in indices])

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


def element_runs(n: np.ndarray, skips: List[Optional[np.ndarray]]) -> np.ndarray:
    """The element ranges (``abi.RUN_DTYPE``) that cover each segment's blocks but those
    ``skips[s]`` marks, at most ``abi.CPU_TILE`` elements each, in segment order.  One
    pass over all blocks at once: a switch makes these for every pair of mixes it meets."""
    per_tile = abi.CPU_TILE // ZERO_BLOCK
    counts = n.astype(np.int64)
    nblocks = -(-counts // ZERO_BLOCK)
    write = np.concatenate([np.ones(b, dtype=bool) if skip is None else ~skip
                            for b, skip in zip(nblocks, skips)] + [np.zeros(0, dtype=bool)])
    segment_of = np.repeat(np.arange(len(counts)), nblocks)
    block_in = np.arange(len(write)) - np.repeat(np.cumsum(nblocks) - nblocks, nblocks)
    picked = np.flatnonzero(write)
    if not len(picked):
        return np.zeros(0, dtype=abi.RUN_DTYPE)
    seg, blk = segment_of[picked], block_in[picked]
    new_stretch = np.ones(len(picked), dtype=bool)
    new_stretch[1:] = (np.diff(picked) != 1) | (seg[1:] != seg[:-1])
    stretch_head = np.flatnonzero(new_stretch)
    position = np.arange(len(picked)) - stretch_head[np.cumsum(new_stretch) - 1]
    head = np.flatnonzero(new_stretch | (position % per_tile == 0))
    tail = np.concatenate([head[1:] - 1, [len(picked) - 1]])
    runs = np.zeros(len(head), dtype=abi.RUN_DTYPE)
    start = blk[head] * ZERO_BLOCK
    runs["segment"], runs["start"] = seg[head], start
    runs["len"] = np.minimum((blk[tail] + 1) * ZERO_BLOCK, counts[seg[head]]) - start
    return runs


def build_tables(bundle: Bundle, mix: Mapping[str, float], address: Callable[[str], int],
                 base_bound: Optional[Callable[[str], float]] = None,
                 zero_signs: Optional[Callable[[str], Tuple[bool, bool]]] = None) -> MixTables:
    """Tables for ``mix`` (already checked), payload keys resolved through ``address``.

    ``zero_signs(name)``: whether the base tensor holds -0.0 and +0.0 (``zero_signs_of``),
    which lets a switch skip more blocks (``MixTables.since``); without it a block is
    skipped only where both mixes add a +0.0 term there or neither does.

    Refused (``TvswitchError``) before any table exists: a mix whose folded weights would
    take some tensor past float32's range.  Each element is bounded by
    ``|c| * max|base| + sum_j |w_j| * max|v_j|`` (``base_bound(name)`` gives max|base|;
    ``term_bound`` a term's largest value), which is what decode.h's float32 sum can reach.
    """
    names = list(bundle.shared_specs)
    segments = np.zeros(len(names), dtype=abi.SEGMENT_DTYPE)
    rows: List[tuple] = []
    keys: "OrderedDict[str, None]" = OrderedDict()
    reads: List[str] = []
    signatures: List[bytes] = []
    per_segment_reads: List[List[str]] = []
    zero: List[Optional[np.ndarray]] = []
    zero_keys: List[tuple] = []
    first_block = 0
    for s, name in enumerate(names):
        spec = bundle.shared_specs[name]
        base_coef = 1.0
        merged: "OrderedDict[tuple, list]" = OrderedDict()
        for task in bundle.tasks:
            w = mix.get(task)
            if not w:
                continue
            entry = bundle.entries(task).get(name)
            if entry is None:
                continue
            if entry.mode == "absolute":
                base_coef -= w
            for t in entry.terms:
                key = (t.kind, t.codes or t.values, t.params, t.mask, t.bits, t.group, t.layout, t.fill)
                if key in merged:
                    merged[key][1] += w * t.scale
                else:
                    merged[key] = [t, w * t.scale]
        _check_range(bundle, mix, name, base_coef, merged.values(), base_bound)
        begin = len(rows)
        segment_reads: List[str] = []
        all_zero: Optional[np.ndarray] = None  # so far: None before the first term, or its AND
        adds_plus_zero = False
        for t, weight in merged.values():
            if weight != 0.0:
                rows.append(_term_row(bundle, t, weight, address))
                keys.update((k, None) for k in t.payloads)
                segment_reads += t.payloads
                adds_plus_zero = adds_plus_zero or not np.signbit(np.float32(weight))
                if all_zero is not None or len(rows) == begin + 1:
                    term_zero = zero_blocks(bundle, t, spec.numel)
                    all_zero = None if term_zero is None else (term_zero if all_zero is None
                                                               else all_zero & term_zero)
        if len(rows) == begin:  # no term: the base alone in every block
            all_zero = np.ones(blocks_of(spec.numel), dtype=bool)
        zero.append(all_zero if all_zero is not None and all_zero.any() else None)
        coef = np.float32(base_coef)
        neg, pos = zero_signs(name) if zero_signs is not None else (True, True)
        minus_zero = bool(coef != 0 and (neg if coef > 0 else pos))  # c * base can be -0.0
        zero_keys.append((coef.tobytes(), adds_plus_zero, minus_zero))
        reads += segment_reads
        per_segment_reads.append(segment_reads)
        signatures.append(np.float32(base_coef).tobytes() + np.array(rows[begin:], dtype=abi.TERM_DTYPE).tobytes())
        n = spec.numel
        segments[s]["n"] = n
        segments[s]["first_block"] = first_block
        segments[s]["base_coef"] = base_coef
        segments[s]["term_begin"] = begin
        segments[s]["term_count"] = len(rows) - begin
        first_block += -(-n // abi.BLOCK_ELEMS)
    terms = np.array(rows, dtype=abi.TERM_DTYPE) if rows else np.zeros(0, dtype=abi.TERM_DTYPE)
    return MixTables(names=names, segments=segments, terms=terms, keys=list(keys), reads=reads,
                     signatures=signatures, segment_reads=per_segment_reads, zero=zero, zero_keys=zero_keys)


def zero_signs_of(a: np.ndarray) -> Tuple[bool, bool]:
    """Whether ``a`` holds -0.0 and whether it holds +0.0 (``build_tables``' zero_signs)."""
    zeros = np.signbit(a[a == 0])
    return bool(zeros.any()), bool((~zeros).any())


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


def _check_range(bundle: Bundle, mix: Mapping[str, float], name: str, base_coef: float, terms,
                 base_bound: Optional[Callable[[str], float]]) -> None:
    bound = abs(base_coef) * (base_bound(name) if base_bound is not None and base_coef else 0.0)
    bound += sum(abs(weight) * term_bound(bundle, t) for t, weight in terms)
    if not bound <= FLOAT32_MAX:
        raise TvswitchError("the mix %s would take tensor %r of %s past float32's range (|value| up to %.3g): "
                            "every weight it writes there would be inf" % (
                                ",".join("%s=%g" % kv for kv in mix.items()), name, bundle.path, bound))


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
