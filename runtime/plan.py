"""From a mix to decode.h's tables: which terms each tensor sums, with what weights.

Shared by the CPU and GPU rebuilders; they differ only in the addresses the payloads
have (host arrays or device memory), which ``address`` supplies.  Terms that several
tasks share (RTVQ's base vector) are merged into one term whose weight is the sum, so a
mix of eight RTVQ tasks reads the shared base once.  Terms that share codes but not masks
(EMR's unified vector under each task's mask) stay separate terms, so a K-task EMR mix
reads the shared codes K times, and ``bytes_moved`` counts them K times.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Mapping

import numpy as np

from tvswitch.kernels import abi
from tvswitch.runtime.bundle import Bundle


@dataclass
class Plan:
    """Tables for one mix; ``segments`` lack base/out addresses, which belong to the caller."""

    names: List[str]
    segments: np.ndarray  # abi.SEGMENT_DTYPE, one per name, in order
    terms: np.ndarray  # abi.TERM_DTYPE
    keys: List[str]  # payloads the terms read, each once
    reads: List[str]  # payloads the terms read, once per term that reads them (what really moves)


def build_plan(bundle: Bundle, mix: Mapping[str, float], address: Callable[[str], int]) -> Plan:
    """Tables for ``mix`` (already checked), payload keys resolved through ``address``."""
    names = list(bundle.shared_specs)
    segments = np.zeros(len(names), dtype=abi.SEGMENT_DTYPE)
    rows: List[tuple] = []
    keys: "OrderedDict[str, None]" = OrderedDict()
    reads: List[str] = []
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
                key = (t.kind, t.codes or t.values, t.params, t.mask, t.bits, t.group)
                if key in merged:
                    merged[key][1] += w * t.scale
                else:
                    merged[key] = [t, w * t.scale]
        begin = len(rows)
        for t, weight in merged.values():
            if weight != 0.0:
                rows.append(_term_row(bundle, t, weight, address))
                read = [k for k in (t.codes, t.params, t.values, t.mask) if k]
                keys.update((k, None) for k in read)
                reads += read
        n = spec.numel
        segments[s]["n"] = n
        segments[s]["first_block"] = first_block
        segments[s]["base_coef"] = base_coef
        segments[s]["term_begin"] = begin
        segments[s]["term_count"] = len(rows) - begin
        first_block += -(-n // abi.BLOCK_ELEMS)
    terms = np.array(rows, dtype=abi.TERM_DTYPE) if rows else np.zeros(0, dtype=abi.TERM_DTYPE)
    return Plan(names=names, segments=segments, terms=terms, keys=list(keys), reads=reads)


def _term_row(bundle: Bundle, t, weight: float, address: Callable[[str], int]) -> tuple:
    if t.kind == "codes":
        return (address(t.codes), address(t.mask) if t.mask else 0, address(t.params), t.group,
                weight, abi.KIND_CODES, t.bits, 0)
    values = bundle.payload(t.values)
    kind = abi.KIND_RAW_F32 if values.dtype == np.float32 else abi.KIND_RAW_F16
    return (address(t.values), address(t.mask) if t.mask else 0, 0, 1, weight, kind, 0, 0)


def mix_key(mix: Mapping[str, float]) -> tuple:
    return tuple(sorted(mix.items()))


def total_blocks(plan: Plan) -> int:
    if not len(plan.segments):
        return 0
    last = plan.segments[-1]
    return int(last["first_block"]) + -(-int(last["n"]) // abi.BLOCK_ELEMS)


def bytes_moved(plan: Plan, bundle: Bundle, base_itemsize: int, out_itemsize: int) -> int:
    """Bytes a rebuild of this plan moves: base read, every term's packed payloads (a payload
    two terms read counts twice: EMR's shared codes in a mix), output write."""
    total = sum(bundle.payload(k).nbytes for k in plan.reads)
    for s in plan.segments:
        n = int(s["n"])
        total += n * out_itemsize + (n * base_itemsize if float(s["base_coef"]) != 0.0 else 0)
    return total
