"""The fuzz and fault suite (bench/reliability.py) at test size: mutated bundles at every
layer through the API and the CLI, SIGKILLs during writes, concurrent requests over
switches with a sabotaged self-test, a leak run, a full disk, constant sessions at exit,
and byte-identical bundles run to run.  ``python -m bench.reliability`` runs it at 10,000
mutants per layer (docs/results/reliability.md)."""
import importlib.util
import json
import lzma
import os
import subprocess
import sys
import textwrap
import tracemalloc
import zlib

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzzer draws its mutants with hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location("tvswitch_bench_reliability",
                                                  os.path.join(ROOT, "bench", "reliability.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rel = _load()


def _needs_serving():
    pytest.importorskip("onnxruntime", reason="serving the example needs onnxruntime (the onnx extra)")
    pytest.importorskip("torch", reason="exporting the example's graph needs torch (the torch extra)")
    pytest.importorskip("onnx", reason="exporting the example's graph needs onnx (the onnx extra)")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz"))
    paths, base_path = rel.make_bundles(folder)
    originals = {p: rel.exercise(p, rel._load_base(base_path))[1] for p in paths}
    manifests = {p: rel._stored(p)[1]["tvswitch.manifest"] for p in paths}
    return folder, paths, base_path, originals, manifests


@pytest.mark.parametrize("layer", rel.LAYERS)
@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(rnd=st.randoms(use_true_random=False))
def test_no_mutant_crashes_writes_or_reads_back_wrong(bundles, layer, rnd):
    """Every mutant is refused in one line or read back as written; none crashes the API,
    gives the CLI a traceback, leaves an output from a refused run, writes NaN/inf, or (raw
    bytes, no checksum recomputed) opens with other contents than the original's."""
    folder, paths, base_path, originals, manifests = bundles
    src = rnd.choice(paths)
    dst = os.path.join(folder, "mutant.tvs")
    rel.mutate(layer, src, dst, rnd)
    result = rel.check_mutant(dst, src, base_path, folder, originals[src], manifests[src], layer)
    assert result["outcome"] in ("refused", "opened"), result
    assert result["cli"] == [], result


def test_a_decompression_bomb_is_refused_within_the_declared_size(bundles):
    """1 GiB of zeros in a few hundred kB of lzma, its CRC valid: refused having held about
    the declared payload, not the gigabyte."""

    from tvswitch.errors import TvswitchError
    from tvswitch.runtime.bundle import Bundle

    folder, paths, base_path, _, _ = bundles
    src = next(p for p in paths if "tswitch" in p)
    tensors, meta = rel._stored(src)
    manifest = json.loads(meta["tvswitch.manifest"])
    key = next(k for k, v in manifest["payloads"].items() if v["codec"] == "lzma")
    tensors[key] = rel.bomb("lzma")
    manifest["payloads"][key]["crc32"] = zlib.crc32(tensors[key].data)
    dst = os.path.join(folder, "bomb.tvs")
    rel._write(dst, tensors, manifest)
    tracemalloc.start()
    try:
        with pytest.raises(TvswitchError, match="more than|declares|size"):
            Bundle.open(dst).payload(key)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


def test_an_lzma_stream_asking_for_a_large_decoder_is_refused_before_it_decodes(bundles):
    """The stream's header names its dictionary, which the decoder allocates whatever the
    output: preset 9's 64 MiB is past what a reader allows, the writer's preset 6 is not."""

    from tvswitch.errors import TvswitchError
    from tvswitch.runtime.bundle import Bundle

    folder, paths, _, _, _ = bundles
    src = next(p for p in paths if "tswitch" in p)
    tensors, meta = rel._stored(src)
    manifest = json.loads(meta["tvswitch.manifest"])
    key = next(k for k, v in manifest["payloads"].items() if v["codec"] == "lzma")
    raw = lzma.LZMADecompressor().decompress(tensors[key].tobytes())
    tensors[key] = np.frombuffer(lzma.compress(raw, preset=9), dtype=np.uint8).copy()
    manifest["payloads"][key]["crc32"] = zlib.crc32(tensors[key].data)
    dst = os.path.join(folder, "dictionary.tvs")
    rel._write(dst, tensors, manifest)
    with pytest.raises(TvswitchError, match="lzma stream is refused"):
        Bundle.open(dst)


def test_sigkill_during_writes_loses_nothing_and_stale_temporaries_go(tmp_path):
    """Whether a kill lands mid-write is a matter of timing: a campaign in which none did
    proves nothing, so another seed runs (three at most); every campaign must lose nothing."""
    mid_write = 0
    for seed in (1, 2, 3):
        stats = rel.kill_campaign(str(tmp_path / str(seed)), kills=6, seed=seed, elements=4 << 20)
        assert stats["kills"] == 6 and stats["files lost"] == 0, stats
        assert stats["temporaries after the next write"] == 0, stats
        mid_write += stats["killed mid-write"]
        if mid_write:
            break
    assert mid_write > 0, "no kill of three campaigns landed mid-write: %s" % stats


def test_concurrent_answers_are_one_tasks_and_the_check_sees_torn_weights(tmp_path):
    _needs_serving()
    server, feeds, tasks = rel.demo_server(str(tmp_path), 2)
    try:
        report = rel.concurrency(server, feeds, tasks, 60)
    finally:
        server.close()
    assert report["requests"] > 0 and report["mismatches"] == 0, report
    server, feeds, tasks = rel.demo_server(str(tmp_path), 1)
    try:
        sabotaged = rel.concurrency(server, feeds, tasks, 60, sabotage=rel.torn_switcher(server, tasks))
    finally:
        server.close()
    assert sabotaged["mismatches"] > 0, "the check missed weights written without the lock: %s" % sabotaged


def test_switching_holds_no_more_python_objects_as_it_goes(tmp_path):
    _needs_serving()
    server, _, tasks = rel.demo_server(str(tmp_path), 1)
    try:
        report = rel.leak_run(server, tasks, 600)
    finally:
        server.close()
    assert report["blocks_growth"] < 0.01, report


def _script(tmp_path, body):
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)


def test_a_full_disk_is_one_line_naming_the_file_and_loses_nothing(tmp_path):
    """RLIMIT_FSIZE (SIGXFSZ ignored) fails writes past 16 kB as a full disk does: export,
    rebuild -o and add-task in place each say so in one line naming their output, exit 2,
    and leave the folder as it was."""
    from tvswitch.cli import main

    d = tmp_path / "demo"
    assert main(["example", str(d)]) == 0
    out = tmp_path / "out"
    out.mkdir()
    bundle, ck = out / "tasks.tvs", lambda t: str(d / (t + ".safetensors"))
    assert main(["export", "--base", ck("base"), "--task", "detect=" + ck("detect"), "-o", str(bundle),
                 "--no-progress"]) == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(str(out))}
    verbs = {
        str(out / "new.tvs"): ["export", "--base", ck("base"), "--task", "detect=" + ck("detect"), "--task",
                               "gauge=" + ck("gauge"), "-o", str(out / "new.tvs"), "--no-progress"],
        str(out / "w.safetensors"): ["rebuild", str(bundle), "--task", "detect", "--base", ck("base"), "-o",
                                     str(out / "w.safetensors"), "--no-progress"],
        str(bundle): ["add-task", str(bundle), "gauge=" + ck("gauge"), "--base", ck("base")],
    }
    for target, argv in verbs.items():
        r = _script(tmp_path, """
            import resource, signal, sys
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))
            from tvswitch.cli import main
            sys.exit(main(%r))
            """ % argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and target in lines[0], (argv[0], r.stderr)
        assert {n: (out / n).read_bytes() for n in os.listdir(str(out))} == before, argv[0]


def test_scripts_that_serve_with_constant_sessions_exit_cleanly(tmp_path):
    """Serve, switch, return without close(): the background session builds are joined at exit."""
    _needs_serving()
    server, _, _ = rel.demo_server(str(tmp_path), 1)
    server.close()
    body = """
        import numpy as np
        from tvswitch.runtime.server import serve_bundle
        server = serve_bundle(%r, model=%r, base=%r, constant_session=True, threads=1)
        for task in ("gauge", "line", "detect"):
            server.switch({task: 1.0})
            server.infer({"ids": np.load(%r)})
        """ % (str(tmp_path / "s.tvs"), str(tmp_path / "s.onnx"), str(tmp_path / "demo-serve" / "base.safetensors"),
               str(tmp_path / "demo-serve" / "ids.npy"))
    for _ in range(6):
        r = _script(tmp_path, body)
        assert r.returncode == 0 and "terminate" not in r.stderr, r.stderr


def test_the_same_export_gives_the_same_bytes_run_to_run(tmp_path):
    """Bundles are byte-identical across processes and hash seeds (reproducible builds, content hashes)."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    rel.make_bundles(str(folder))
    body = """
        import sys
        sys.path.insert(0, %r)
        from tvswitch.export.exporter import export_bundle
        from tvswitch.runtime.checkpoint import read_safetensors
        base = read_safetensors(%r)
        tasks = {t: {k: v + 0.01 * (i + 1) if v.dtype.kind == "f" else v for k, v in base.items()}
                 for i, t in enumerate(("b", "a", "c"))}
        for name, kw in (("tvq", {}), ("rtvq", {"include_base": "float16"}), ("tswitch", {"entropy": "lzma"})):
            export_bundle(base, tasks, sys.argv[1] + "/" + name + ".tvs", name=name, **kw)
        """ % (ROOT, str(folder / "base.safetensors"))
    script = tmp_path / "export.py"
    script.write_text(textwrap.dedent(body))
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / ("run" + seed)
        out.mkdir()
        subprocess.run([sys.executable, str(script), str(out)], check=True, env=dict(os.environ, PYTHONHASHSEED=seed))
        outputs.append({n: (out / n).read_bytes() for n in sorted(os.listdir(str(out)))})
    assert list(outputs[0]) == ["rtvq.tvs", "tswitch.tvs", "tvq.tvs"]
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], name


def test_the_bench_counts_a_crash_it_is_shown(monkeypatch, bundles):
    """The fuzz's own check: an exception that is not a refusal is counted as a crash, not hidden."""
    folder, paths, base_path, originals, manifests = bundles

    def broken(path, base):
        raise IndexError("a bug")

    monkeypatch.setattr(rel, "exercise", broken)
    result = rel.check_mutant(paths[0], paths[0], base_path, folder, originals[paths[0]], manifests[paths[0]], "bytes")
    assert result["outcome"] == "crash" and result["signature"].startswith("IndexError"), result
