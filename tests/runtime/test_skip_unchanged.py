"""A switch rewrites only the tensors whose inputs changed (MixTables.since), and stays exact:
after any sequence of switches the buffers hold, bit for bit, a fresh rebuild of the current
mix. Held to that over random switch sequences for every scheme, on the CPU rebuild, the GPU
rebuild's host emulation and the server's three modes."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvswitch.kernels import cpu
from tvswitch.runtime.rebuild import CpuRebuilder

#: a changes the encoder only, b the MLP only, c everything: a LoRA-like split, so that
#: switches leave whole tensors as they were
TOUCHES = {"a": ("enc.",), "b": ("mlp.",), "c": ("",)}
SCHEMES = [("tvq", dict(bits=2)), ("tvq", dict(bits=3, granularity="channel")),
           ("tvq", dict(bits=4, granularity="group:16")), ("fq", dict(bits=4)), ("rtvq", {}),
           ("tswitch", dict(keep=0.25)), ("emr", dict(bits=4))]
#: weights drawn from a few values, so that consecutive mixes often share a task's weight
MIXES = st.dictionaries(st.sampled_from("abc"), st.sampled_from([1.0, 0.5, 0.3, -0.2]), min_size=1, max_size=3)


def partial_checkpoints():
    base, fts = _load("tests_conftest", "..", "conftest.py").make_checkpoints()
    for task, prefixes in TOUCHES.items():
        for name in fts[task]:
            if name in base and not name.startswith(prefixes):
                fts[task][name] = base[name].copy()
    return base, fts


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from tvswitch.export.exporter import export_bundle

    base, fts = partial_checkpoints()
    folder = tmp_path_factory.mktemp("skip")
    return base, {"%s %s" % (s, kw): export_bundle(base, fts, str(folder / ("%d.tvs" % i)), name=s, **kw)
                  for i, (s, kw) in enumerate(SCHEMES)}


def _fresh(rebuilder, mix, dtype=None):
    out = rebuilder.allocate(dtype)
    rebuilder.rebuild(mix, out)
    return out


def _same(got, want, what):
    for name, a in want.items():
        assert np.asarray(got[name]).tobytes() == a.tobytes(), (what, name)


def test_a_tensor_no_task_of_either_mix_changes_is_skipped(bundles):
    base, by_scheme = bundles
    r = CpuRebuilder(by_scheme["tvq {'bits': 2}"], base)
    full = r.mix_tables({"a": 1.0})
    # a -> b: the tensors neither touches keep the base; enc (a's) and mlp (b's) change
    assert sorted(full.since(r.mix_tables({"b": 1.0})).names) == ["enc.bias", "enc.weight", "mlp.weight"]
    # the encoder's weight unchanged, the MLP's changed: only the MLP is written
    assert full.since(r.mix_tables({"a": 1.0, "b": 0.5})).names == ["mlp.weight"]
    # going back to a: the MLP's base read and written, no payload (a stores nothing for it)
    assert r.bytes_moved({"a": 1.0}, since={"a": 1.0, "b": 0.5}) == 2 * base["mlp.weight"].nbytes
    assert r.mix_tables({"c": 1.0}).since(full).names == full.names  # c changes everything


@pytest.mark.parametrize("scheme", ["%s %s" % s for s in SCHEMES])
def test_every_scheme_stores_nothing_for_a_tensor_a_task_left_alone(bundles, scheme):
    base, by_scheme = bundles
    bundle = by_scheme[scheme]
    for task, prefixes in TOUCHES.items():
        stored = set(bundle.entries(task))
        touched = {n for n in bundle.shared_specs if n.startswith(prefixes)}
        assert stored <= touched, (task, sorted(stored - touched))


@pytest.mark.skipif(not cpu.available(), reason="CPU library not built: %s" % cpu.unavailable_reason())
@pytest.mark.parametrize("scheme", ["%s %s" % s for s in SCHEMES])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(MIXES, min_size=2, max_size=8), half=st.booleans())
def test_any_switch_sequence_ends_bit_for_bit_as_a_fresh_rebuild(bundles, scheme, sequence, half):
    base, by_scheme = bundles
    r = CpuRebuilder(by_scheme[scheme], base)
    dtype = "float16" if half else None
    out = _fresh(r, sequence[0], dtype)
    for previous, mix in zip(sequence, sequence[1:]):
        r.rebuild(mix, out, since=previous)
        _same(out, _fresh(r, mix, dtype), mix)


@pytest.mark.skipif(not cpu.available(), reason="CPU library not built: %s" % cpu.unavailable_reason())
@pytest.mark.parametrize("scheme", ["%s %s" % s for s in SCHEMES])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(MIXES, min_size=2, max_size=6))
def test_the_gpu_launch_tables_cover_only_what_changed_and_stay_exact(bundles, scheme, sequence, monkeypatch):
    """The GPU rebuild's tables uploaded to emulated device memory and run there (test_gpu_rebuild_host)."""
    from tvswitch.kernels import nvrtc
    from tvswitch.runtime.gpu_rebuild import GpuRebuilder

    host = _load("gpu_rebuild_host", "test_gpu_rebuild_host.py")
    monkeypatch.setattr(nvrtc, "kernel_image", lambda cc: (b"image", "test"))
    base, by_scheme = bundles
    bundle = by_scheme[scheme]
    device = host.HostDevice()
    g, ref = GpuRebuilder(bundle, base, device=device, tiles_per_block=3), CpuRebuilder(bundle, base)
    out = g.allocate()
    g.rebuild(sequence[0], out)
    for previous, mix in zip(sequence, sequence[1:]):
        launches = len(device.launches)
        g.rebuild(mix, out, since=previous)
        _same({n: g.download(t) for n, t in out.items()}, _fresh(ref, mix), mix)
        changed = ref.mix_tables(mix).since(ref.mix_tables(previous)).names
        if changed:  # one launch whose table covers exactly the changed tensors
            assert len(device.launches) == launches + 1
            assert len(set(device.launches[-1].segments["out"])) == len(changed)
        else:
            assert len(device.launches) == launches
    g.close()


@pytest.fixture(scope="module")
def row_bundles(tmp_path_factory):
    """Tasks that move a few bands of rows of an embedding-like tensor: whole 1024-element
    blocks are +0.0 in every term, and the base holds zeros of both signs."""
    from tvswitch.export.exporter import export_bundle

    rows = _load("test_zeroblocks_data", "test_zeroblocks.py")
    base, fts = rows.row_sparse_checkpoints()
    folder = tmp_path_factory.mktemp("rows")
    return base, {"%s %s" % (s, kw): export_bundle(base, fts, str(folder / ("%d.tvs" % i)), name=s, **kw)
                  for i, (s, kw) in enumerate(rows.SCHEMES)}


ROW_SCHEMES = ["tvq {'bits': 2, 'layout': 'streams'}", "tvq {'bits': 3, 'layout': 'compact'}",
               "rtvq {'layout': 'compact'}", "tswitch {'keep': 0.05, 'layout': 'compact'}",
               "tswitch {'keep': 0.05, 'layout': 'streams'}"]


@pytest.mark.skipif(not cpu.available(), reason="CPU library not built: %s" % cpu.unavailable_reason())
def test_a_switch_leaves_out_the_blocks_zero_in_both_mixes(row_bundles):
    base, by_scheme = row_bundles
    r = CpuRebuilder(by_scheme["tvq {'bits': 3, 'layout': 'compact'}"], base)
    cut = r.mix_tables({"b": 1.0}).since(r.mix_tables({"a": 1.0}))
    n = base["emb.weight"].size
    written = dict(zip(cut.names, cut.written()))
    assert cut.runs is not None and 0 < written["emb.weight"] < n
    assert written["dense.weight"] == base["dense.weight"].size  # no zero block there
    assert r.bytes_moved({"b": 1.0}, since={"a": 1.0}) < r.bytes_moved({"b": 1.0})
    # the runs are whole blocks (or a tensor's end), at most one CPU tile each
    assert (cut.runs["start"] % 1024 == 0).all() and (cut.runs["len"] <= 4096).all()


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("scheme", ROW_SCHEMES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(MIXES, min_size=2, max_size=7), half=st.booleans())
def test_switches_that_skip_blocks_end_bit_for_bit_as_a_fresh_rebuild(row_bundles, scheme, compiled, sequence,
                                                                       half, monkeypatch):
    """Negative weights and the base's -0.0 included: the sign rule of a skipped block."""
    if compiled and not cpu.available():
        pytest.skip("CPU library not built: %s" % cpu.unavailable_reason())
    base, by_scheme = row_bundles
    r = CpuRebuilder(by_scheme[scheme], base)
    r._compiled = compiled
    dtype = "float16" if half else None
    out = _fresh(r, sequence[0], dtype)
    for previous, mix in zip(sequence, sequence[1:]):
        r.rebuild(mix, out, since=previous)
        _same(out, _fresh(r, mix, dtype), mix)


@pytest.mark.skipif(not cpu.available(), reason="CPU library not built: %s" % cpu.unavailable_reason())
@pytest.mark.parametrize("scheme", ROW_SCHEMES)
@pytest.mark.parametrize("kernel_source", [False, True])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(MIXES, min_size=2, max_size=6))
def test_gpu_launches_leave_out_zero_blocks_and_stay_exact(row_bundles, emulated_kernel, scheme, kernel_source,
                                                           sequence, monkeypatch):
    """The launch tables of a switch list a tensor once per stretch of blocks it writes
    (decode.h's block_offset), run by the host emulation or by rebuild.cu itself."""
    from tvswitch.kernels import nvrtc
    from tvswitch.runtime.gpu_rebuild import GpuRebuilder

    host = _load("gpu_rebuild_host", "test_gpu_rebuild_host.py")
    monkeypatch.setattr(nvrtc, "kernel_image", lambda cc: (b"image", "test"))
    base, by_scheme = row_bundles
    bundle = by_scheme[scheme]
    device = host.KernelDevice(emulated_kernel) if kernel_source else host.HostDevice()
    g, ref = GpuRebuilder(bundle, base, device=device, tiles_per_block=2), CpuRebuilder(bundle, base)
    out = g.allocate()
    g.rebuild(sequence[0], out)
    for previous, mix in zip(sequence, sequence[1:]):
        g.rebuild(mix, out, since=previous)
        _same({n: g.download(t) for n, t in out.items()}, _fresh(ref, mix), mix)
    g.close()


def test_a_gpu_switch_between_row_sparse_tasks_launches_fewer_blocks(row_bundles, monkeypatch):
    from tvswitch.kernels import nvrtc
    from tvswitch.runtime.gpu_rebuild import GpuRebuilder, launch_segments

    host = _load("gpu_rebuild_host", "test_gpu_rebuild_host.py")
    monkeypatch.setattr(nvrtc, "kernel_image", lambda cc: (b"image", "test"))
    base, by_scheme = row_bundles
    g = GpuRebuilder(by_scheme["tvq {'bits': 3, 'layout': 'compact'}"], base, device=host.HostDevice())
    _, _, whole = launch_segments(g.host_tables({"b": 1.0}))
    segments, names, part = launch_segments(g.host_tables({"b": 1.0}, since={"a": 1.0}))
    emb = np.array([n == "emb.weight" for n in names])
    counts = np.diff(np.append(segments["first_block"].astype(np.int64), part))
    assert part < whole and 0 < counts[emb].sum() < -(-base["emb.weight"].size // 1024)
    assert segments["block_offset"][emb].any() or emb.sum() > 1  # the embedding written in part
    assert g.bytes_moved({"b": 1.0}, since={"a": 1.0}) < g.bytes_moved({"b": 1.0})
    g.close()


@pytest.fixture(scope="module")
def emulated_kernel(tmp_path_factory):
    """rebuild.cu on CPU threads (tests/kernels/emulate), as test_gpu_rebuild_host has it."""
    host = _load("gpu_rebuild_host_emulation", "test_gpu_rebuild_host.py")
    emulation = host._emulation()
    return emulation.load_emulator(emulation.build_emulator(str(tmp_path_factory.mktemp("emu") / "emulate.so")))


@pytest.mark.skipif(not cpu.available(), reason="CPU library not built: %s" % cpu.unavailable_reason())
def test_runs_outside_their_segment_are_refused_before_any_write(row_bundles):
    from tvswitch.errors import TvswitchError
    from tvswitch.kernels import abi

    base, by_scheme = row_bundles
    r = CpuRebuilder(by_scheme["tvq {'bits': 2, 'layout': 'streams'}"], base)
    out = _fresh(r, {"a": 1.0})
    before = {k: v.copy() for k, v in out.items()}
    cut = r.mix_tables({"b": 1.0}).since(r.mix_tables({"a": 1.0}))
    segments = cut.segments.copy()
    segments["out"] = [out[n].ctypes.data for n in cut.names]
    buffers = r._input_extents() + cpu.Extents(out.values())
    for field, value in [("segment", len(segments)), ("start", 16), ("len", 4097), ("len", 0),
                         ("start", int(segments[cut.runs[-1]["segment"]]["n"]))]:
        runs = cut.runs.copy()
        runs[-1][field] = value
        with pytest.raises(TvswitchError, match="run %d" % (len(runs) - 1)):
            cpu.rebuild_runs(segments, cut.terms, runs.astype(abi.RUN_DTYPE), buffers)
        _same(out, before, field)


def _load(name, *parts):
    """A module of tests/ by its path (the test folders are no packages)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), *parts))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
