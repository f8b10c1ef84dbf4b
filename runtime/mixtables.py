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
from typing import Callable, List, Mapping, Optional

import numpy as np

from tvswitch.errors import TvswitchError
from tvswitch.kernels import abi
from tvswitch.kernels.abi import FLOAT32_MAX
from tvswitch.runtime.bundle import Bundle


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

    def since(self, held: "MixTables") -> "MixTables":
        """These tables cut to the tensors whose inputs differ from ``held``'s (tables of the
        same rebuilder, so the same payload addresses): what a rebuild must write over buffers
        that hold ``held``'s result. Every other tensor already holds these bits, because a
        tensor's value is a fixed function of its base, coefficient and terms (decode.h's
        arithmetic contract), so leaving it alone is exact."""
        changed = [i for i, (a, b) in enumerate(zip(self.signatures, held.signatures)) if a != b]
        return self.subset(changed)

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
                         segment_reads=[self.segment_reads[i] for i in indices])


def build_tables(bundle: Bundle, mix: Mapping[str, float], address: Callable[[str], int],
                 base_bound: Optional[Callable[[str], float]] = None) -> MixTables:
    """Tables for ``mix`` (already checked), payload keys resolved through ``address``.

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
        for t, weight in merged.values():
            if weight != 0.0:
                rows.append(_term_row(bundle, t, weight, address))
                keys.update((k, None) for k in t.payloads)
                segment_reads += t.payloads
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
                     signatures=signatures, segment_reads=per_segment_reads)


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


def total_blocks(tables: MixTables) -> int:
    if not len(tables.segments):
        return 0
    last = tables.segments[-1]
    return int(last["first_block"]) + -(-int(last["n"]) // abi.BLOCK_ELEMS)


def bytes_moved(tables: MixTables, bundle: Bundle, base_itemsize: int, out_itemsize: int) -> int:
    """Bytes a rebuild of these tables moves: base read, every term's packed payloads (a payload
    two terms read counts twice: EMR's shared codes in a mix), output write."""
    total = sum(bundle.payload(k).nbytes for k in tables.reads)
    for s in tables.segments:
        n = int(s["n"])
        total += n * out_itemsize + (n * base_itemsize if float(s["base_coef"]) != 0.0 else 0)
    return total
