"""runtime/zeroblocks.py: the 1024-element blocks it calls zero are +0.0 at every element
(checked against decode.h's numpy transcription), and in the compact layouts it finds
every such block."""
from __future__ import annotations

import numpy as np
import pytest

from tvswitch.kernels import reference
from tvswitch.runtime.mixtables import TableMaker
from tvswitch.runtime.zeroblocks import ZERO_BLOCK, blocks_of, zero_blocks

ROWS, WIDTH = 300, 48  # 14,400 elements: 14 full blocks and a short one


def row_sparse_checkpoints(seed: int = 0):
    """An embedding-like tensor whose tasks each move a few bands of rows a lot and the
    rest by far less than a quantisation step, and a dense tensor beside it; a base with
    zeros of both signs (what the sign rule of a skipped block is about)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(0, 0.05, (ROWS, WIDTH)).astype(np.float32)
    emb.reshape(-1)[rng.choice(emb.size, 300, replace=False)] = 0.0
    emb.reshape(-1)[rng.choice(emb.size, 300, replace=False)] = -0.0
    base = {"emb.weight": emb, "dense.weight": rng.normal(0, 0.05, (40, 30)).astype(np.float32)}
    fts = {}
    for i, task in enumerate("abc"):
        moved = np.zeros(ROWS, dtype=bool)
        for start in rng.choice(ROWS - 30, 3, replace=False):
            moved[start:start + rng.integers(5, 30)] = True
        tau = rng.normal(0, 1e-6, emb.shape)  # far below half a step: the zero code
        tau[moved] = rng.normal(0, 0.01 * (i + 1), (moved.sum(), WIDTH))
        fts[task] = {"emb.weight": (emb + tau).astype(np.float32),
                     "dense.weight": base["dense.weight"] + rng.normal(0, 0.003, (40, 30)).astype(np.float32)}
    return base, fts


SCHEMES = [("tvq", dict(bits=2, layout="streams")), ("tvq", dict(bits=2, layout="compact")),
           ("tvq", dict(bits=3, layout="compact")), ("tvq", dict(bits=4, layout="streams")),
           ("tvq", dict(bits=4, granularity="group:64", layout="compact")),
           ("tvq", dict(bits=3, granularity="channel", layout="streams")),
           ("rtvq", dict(layout="compact")), ("tswitch", dict(keep=0.05, layout="streams")),
           ("tswitch", dict(keep=0.05, layout="compact")), ("emr", dict(bits=4))]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from tvswitch.export.exporter import export_bundle

    base, fts = row_sparse_checkpoints()
    folder = tmp_path_factory.mktemp("zeroblocks")
    return {"%s %s" % (s, kw): export_bundle(base, fts, str(folder / ("%d.tvs" % i)), name=s, **kw)
            for i, (s, kw) in enumerate(SCHEMES)}


def _terms_and_values(bundle, task, name):
    """Each term of ``task``'s entry for ``name`` with its values as decode.h computes them."""
    n = bundle.shared_specs[name].numel
    tables = TableMaker(bundle, lambda k: bundle.payload(k).ctypes.data).tables({task: 1.0})
    by_address = {bundle.payload(k).ctypes.data: bundle.payload(k) for k in tables.keys}
    seg = tables.segments[tables.names.index(name)]
    rows = [tables.terms[j] for j in range(int(seg["term_begin"]), int(seg["term_begin"] + seg["term_count"]))]
    return [(t, reference.term_value(row, n, by_address)) for t, row in zip(bundle.entries(task)[name].terms, rows)]


def _truly_zero(values):
    bits = np.zeros(blocks_of(values.size) * ZERO_BLOCK, dtype=np.uint32)
    bits[:values.size] = values.astype(np.float32).view(np.uint32)
    return ~bits.reshape(-1, ZERO_BLOCK).any(axis=1)


@pytest.mark.parametrize("scheme", ["%s %s" % s for s in SCHEMES])
def test_blocks_called_zero_are_plus_zero_throughout(bundles, scheme):
    bundle = bundles[scheme]
    found = 0
    for task in bundle.tasks:
        for name in bundle.entries(task):
            for term, values in _terms_and_values(bundle, task, name):
                zero = zero_blocks(bundle, term, values.size)
                truth = _truly_zero(values)
                got = np.zeros_like(truth) if zero is None else zero
                assert not (got & ~truth).any(), (scheme, task, name)  # never a block that is not +0.0
                if term.layout in ("groups", "sparse") or (term.kind == "codes" and term.mask is None
                                                            and term.group >= values.size):
                    full = values.size // ZERO_BLOCK if term.layout == "streams" else truth.size
                    assert (got[:full] == truth[:full]).all(), (scheme, task, name)  # and every one that is
                found += int(got.sum())
    if "granularity" not in scheme and not scheme.startswith("emr"):
        # the row-sparse task vectors have zero blocks to find; finer scales fit the
        # noise of the rows that barely moved, and EMR's masks keep some of every block
        assert found, scheme


def test_a_code_that_is_not_plus_zero_is_not_called_zero(bundles):
    """An offset nudged off -z*scale makes the zero point's value -0.0 or a denormal:
    no block is zero any more."""
    bundle = bundles["tvq {'bits': 2, 'layout': 'compact'}"]
    term = bundle.entries("a")["emb.weight"].terms[0]
    params = bundle.payload(term.params)
    n = bundle.shared_specs["emb.weight"].numel
    assert zero_blocks(bundle, term, n) is not None
    saved = params.copy()
    try:
        params[1] = np.nextafter(params[1], np.float32(np.inf))
        from tvswitch.runtime import zeroblocks

        zeroblocks._CACHE.pop(bundle, None)
        assert zero_blocks(bundle, term, n) is None
    finally:
        params[:] = saved
        zeroblocks._CACHE.pop(bundle, None)


def test_a_zero_block_is_one_gpu_tile():
    """The GPU rebuild marks the blocks a launch writes in its own blocks and hands them to
    element_runs, which counts in zero blocks: the two sizes are one (FORMAT.md 3.5)."""
    from tvswitch.kernels import abi

    assert abi.BLOCK_ELEMS == ZERO_BLOCK
