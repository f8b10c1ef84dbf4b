"""runtime/mixtables.py: a TableMaker's tables, made from the one layout it keeps for its
bundle, are those of a plain loop over tensors, tasks and terms (the definition, below),
field for field and byte for byte, for every scheme, for mixes of any subset of tasks
in any order, and where weights cancel to exactly zero."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvswitch.errors import TvswitchError
from tvswitch.kernels import abi
from tvswitch.runtime.mixtables import TableMaker, _term_row, element_runs, term_bound, zero_signs_of
from tvswitch.runtime.zeroblocks import ZERO_BLOCK, blocks_of, zero_blocks

from tests.runtime.test_zeroblocks import row_sparse_checkpoints

SCHEMES = [("tvq", dict(bits=2, layout="compact")), ("tvq", dict(bits=4, granularity="channel", layout="streams")),
           ("rtvq", dict(layout="auto")), ("tswitch", dict(keep=0.1, layout="compact")), ("emr", dict(bits=4)),
           ("fq", dict(bits=8))]


def definition(bundle, mix, address, base_bound, base_of):
    """The tables of ``mix`` by their definition, one term at a time (what the maker's
    layouts must reproduce); ``base_of(name)`` the base tensor as float32."""
    names = list(bundle.shared_specs)
    segments = np.zeros(len(names), dtype=abi.SEGMENT_DTYPE)
    rows, reads, per_segment, zero, zero_keys, signatures = [], [], [], [], [], []
    first_block = 0
    for s, name in enumerate(names):
        numel = bundle.shared_specs[name].numel
        coef, merged = 1.0, OrderedDict()
        for task in bundle.tasks:
            w = mix.get(task)
            entry = bundle.entries(task).get(name) if w else None
            if entry is None:
                continue
            if entry.mode == "absolute":
                coef -= w
            for t in entry.terms:
                key = (t.kind, t.codes or t.values, t.params, t.mask, t.bits, t.group, t.layout, t.fill)
                if key in merged:
                    merged[key][1] += w * t.scale
                else:
                    merged[key] = [t, w * t.scale]
        bound = abs(coef) * (base_bound(name) if coef else 0.0) + sum(abs(w) * term_bound(bundle, t)
                                                                      for t, w in merged.values())
        if not bound <= abi.FLOAT32_MAX:
            raise TvswitchError("tensor %r" % name)
        begin, seg_reads, all_zero, plus = len(rows), [], np.ones(blocks_of(numel), dtype=bool), False
        for t, w in merged.values():
            if w != 0.0:
                rows.append(_term_row(bundle, t, w, address))
                seg_reads += t.payloads
                plus = plus or not np.signbit(np.float32(w))
                m = zero_blocks(bundle, t, numel)
                all_zero = None if m is None or all_zero is None else all_zero & m
        zero.append(all_zero if all_zero is not None else np.zeros(blocks_of(numel), dtype=bool))
        c = np.float32(coef)
        with np.errstate(under="ignore"):
            product = c * base_of(name)  # decode.h's c * base, in float32
        zero_keys.append((c.tobytes(), plus, bool(c != 0 and (np.signbit(product) & (product == 0)).any())))
        reads += seg_reads
        per_segment.append(seg_reads)
        signatures.append(c.tobytes() + np.array(rows[begin:], dtype=abi.TERM_DTYPE).tobytes())
        segments[s]["n"], segments[s]["first_block"], segments[s]["base_coef"] = numel, first_block, coef
        segments[s]["term_begin"], segments[s]["term_count"] = begin, len(rows) - begin
        first_block += -(-numel // abi.BLOCK_ELEMS)
    return dict(names=names, segments=segments, terms=np.array(rows, dtype=abi.TERM_DTYPE), reads=reads,
                keys=list(OrderedDict.fromkeys(reads)), segment_reads=per_segment,
                zero=np.concatenate(zero + [np.zeros(0, dtype=bool)]), zero_keys=zero_keys,
                signatures=signatures)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from tvswitch.export.exporter import export_bundle

    base, fts = row_sparse_checkpoints(seed=3)
    dense = base["dense.weight"].reshape(-1)  # values c * base takes to -0.0 for |c| <= 0.5 (FQ's mixes)
    dense[:3] = (-1e-45, 1e-45, -1e-40)
    folder = tmp_path_factory.mktemp("mixtables")
    return base, [export_bundle(base, fts, str(folder / ("%d.tvs" % i)), name=s, **kw)
                  for i, (s, kw) in enumerate(SCHEMES)]


def _maker(bundle, base):
    def address(key):
        return bundle.payload(key).ctypes.data

    def bound(name):
        return float(np.abs(base[name]).max())

    return TableMaker(bundle, address, bound, lambda name: zero_signs_of(base[name])), (
        address, bound, lambda name: base[name].astype(np.float32))


def _mixes(tasks, rng):
    """Mixes of every subset of tasks, given in shuffled order, some weights cancelling."""
    for _ in range(40):
        members = [t for t in tasks if rng.random() < 0.6] or [tasks[0]]
        weights = rng.normal(0, 1, len(members))
        if len(members) > 1 and rng.random() < 0.3:
            weights[1] = -weights[0]  # RTVQ's shared base vector (and FQ's coefficient) cancel
        order = rng.permutation(len(members))
        yield {members[k]: float(weights[k]) for k in order}


@pytest.mark.parametrize("scheme", range(len(SCHEMES)), ids=["%s %s" % s for s in SCHEMES])
def test_a_maker_s_tables_are_those_of_the_definition(bundles, scheme):
    base, all_bundles = bundles
    bundle = all_bundles[scheme]
    maker, hooks = _maker(bundle, base)
    rng = np.random.default_rng(scheme)
    for mix in _mixes(list(bundle.tasks), rng):
        got, want = maker.tables(mix), definition(bundle, mix, *hooks)
        assert got.names == want["names"]
        for field in ("n", "first_block", "base_coef", "term_begin", "term_count"):
            np.testing.assert_array_equal(got.segments[field], want["segments"][field], err_msg=field)
        assert got.terms.tobytes() == want["terms"].tobytes()
        for field in ("reads", "keys", "segment_reads", "zero_keys", "signatures"):
            assert getattr(got, field) == want[field], field
        np.testing.assert_array_equal(got.zero, want["zero"])


def test_a_cancelled_term_is_left_out_and_its_tensor_s_zero_blocks_follow(bundles):
    base, all_bundles = bundles
    bundle = all_bundles[[s for s, _ in SCHEMES].index("rtvq")]
    maker, _ = _maker(bundle, base)
    a, b = list(bundle.tasks)[:2]
    both = maker.tables({a: 0.5, b: 0.25})
    cancelled = maker.tables({a: 0.5, b: -0.5})  # the shared base vector's weight is exactly 0
    assert len(cancelled.terms) < len(both.terms)
    assert all(w != 0 for w in cancelled.terms["weight"])


def test_a_mix_past_float32_is_refused_naming_the_tensor(bundles):
    base, all_bundles = bundles
    bundle = all_bundles[0]
    maker, _ = _maker(bundle, base)
    task = list(bundle.tasks)[0]
    maker.tables({task: 1.0})
    with pytest.raises(TvswitchError, match="tensor '(emb|dense).weight' of .* past float32's range"):
        maker.tables({task: 1e300})


class _TermsReversed:
    """A bundle whose second task lists each tensor's terms last to first: the term its
    tasks share (RTVQ's base vector) comes after its own there, so a loop over a mix of
    some tasks meets the terms in another order than a loop over all of them."""

    def __init__(self, bundle):
        self._bundle = bundle
        self._flipped = list(bundle.tasks)[1]

    def __getattr__(self, name):
        return getattr(self._bundle, name)

    def entries(self, task):
        found = self._bundle.entries(task)
        if task != self._flipped:
            return found
        return {n: dataclasses.replace(e, terms=tuple(reversed(e.terms))) for n, e in found.items()}


def test_rows_come_in_the_order_of_a_loop_over_the_mix_s_own_tasks(bundles):
    base, all_bundles = bundles
    bundle = _TermsReversed(all_bundles[[s for s, _ in SCHEMES].index("rtvq")])
    maker, hooks = _maker(bundle, base)
    a, b, c = list(bundle.tasks)[:3]
    maker.tables({a: 0.3, b: 0.3, c: 0.4})  # the layout, made over every task
    for mix in ({b: 0.6, c: 0.4}, {a: 0.5, b: 0.5}, {b: 1.0}):
        got, want = maker.tables(mix), definition(bundle, mix, *hooks)
        assert got.terms.tobytes() == want["terms"].tobytes()
        assert got.signatures == want["signatures"]


def _runs_by_definition(n, write):
    """Per segment, each stretch of marked blocks, cut every CPU_TILE elements from its start."""
    per_tile, out, b = abi.CPU_TILE // ZERO_BLOCK, [], 0
    for s, count in enumerate(n):
        marks = write[b:b + blocks_of(count)]
        b += blocks_of(count)
        k = 0
        while k < len(marks):
            if not marks[k]:
                k += 1
                continue
            end = k
            while end < len(marks) and marks[end]:
                end += 1
            for first in range(k, end, per_tile):
                stop = min(first + per_tile, end)
                out.append((s, first * ZERO_BLOCK, min(stop * ZERO_BLOCK, count) - first * ZERO_BLOCK))
            k = end
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 12 * ZERO_BLOCK), min_size=0, max_size=8), st.integers(0, 2**32 - 1))
def test_element_runs_are_the_stretches_of_written_blocks_cut_into_tiles(sizes, seed):
    rng = np.random.default_rng(seed)
    n = np.array(sizes, dtype=np.int64)
    total = int(blocks_of(n).sum()) if len(n) else 0
    write = rng.random(total) < rng.choice([0.0, 0.3, 0.8, 1.0])
    runs = element_runs(n, write)
    assert [tuple(int(x) for x in r) for r in runs[["segment", "start", "len"]]] == _runs_by_definition(sizes, write)
