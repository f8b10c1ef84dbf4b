"""The fuzz and fault suite: mutated bundles at every layer, SIGKILLs during writes, switching
under concurrent requests, and a long switch run for leaks.

    python -m bench.reliability [--mutants 10000] [--kills 100] [--requests 20000] [--switches 10000]

Prints the table of docs/results/reliability.md.  The test suite runs the same code at a
few hundred mutants (tests/runtime/test_reliability.py loads this file by path).

Mutants, four layers (each from one of several real bundles: TVQ, RTVQ with an embedded
base, T-Switch with lzma on flash, T-Switch in the sparse layout (ternary codes), TVQ in the sparse layout,
all with heads):
- ``bytes``: bytes anywhere in the file overwritten (no checksum recomputed): every
  mutant must be refused or read back exactly as the original (else: silent corruption);
- ``header``: the safetensors header's JSON changed (offsets, shapes, dtypes, entries);
- ``manifest``: the manifest's JSON tree changed at a random place, its digest recomputed;
- ``payload``: a payload's bytes changed, its CRC and the manifest digest recomputed.
Each mutant is opened, its embedded base read, and every task rebuilt into buffers: a
``TvswitchError`` is a clean refusal; any other exception is a crash (its type is the
signature); a rebuild that writes NaN or inf from a file that opened is counted too.
Peak memory per mutant is taken with tracemalloc (numpy's allocations included) and
compared with the bytes the original bundle declares.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zlib
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

LAYERS = ("bytes", "header", "manifest", "payload")


# ---- bundles to mutate -------------------------------------------------------------------

def make_bundles(folder: str) -> Tuple[List[str], str]:
    """Three small real bundles of one base (heads included) and that base's file."""
    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.checkpoint import write_safetensors

    rng = np.random.default_rng(0)
    base = {"enc.weight": rng.normal(0, 0.05, (37, 29)).astype(np.float32),
            "enc.bias": rng.normal(0, 0.01, 37).astype(np.float32),
            "half.weight": rng.normal(0, 0.05, (7, 13)).astype(np.float16),
            "bn.running_mean": rng.normal(0, 0.1, 11).astype(np.float32),
            "bn.num_batches_tracked": np.array(5, dtype=np.int64)}
    base["emb.weight"] = rng.normal(0, 0.05, (211, 32)).astype(np.float32)
    tasks = {}
    for i, t in enumerate(("a", "b", "c")):
        ft = {k: (v + rng.normal(0, 0.003 * (i + 1), v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
              for k, v in base.items()}
        ft["emb.weight"] = base["emb.weight"].copy()  # a few rows tuned: payloads lzma shrinks
        ft["emb.weight"][i::50] += 0.01
        ft["head.weight"] = rng.normal(0, 0.1, (3 + i, 37)).astype(np.float32)
        tasks[t] = ft
    paths = []
    for name, fields in (("tvq", dict(name="tvq", bits=3, entropy="zlib")),
                         ("rtvq", dict(name="rtvq", include_base="float16")),
                         ("tswitch", dict(name="tswitch", entropy="lzma", layout="streams")),
                         ("tswitch-sparse", dict(name="tswitch", keep=0.1, layout="compact")),
                         ("tvq-sparse", dict(name="tvq", bits=2, layout="compact"))):
        path = os.path.join(folder, name + ".tvs")
        export_bundle(base, tasks, path, **fields)
        paths.append(path)
    base_path = os.path.join(folder, "base.safetensors")
    write_safetensors(base_path, base)
    return paths, base_path


# ---- reading a bundle as a device would -----------------------------------------------------

def exercise(path: str, base: Dict[str, np.ndarray]) -> Tuple[str, Optional[Dict[str, np.ndarray]]]:
    """("refused" | "opened" | "nonfinite", decoded payloads) of one bundle: open it, read its
    embedded base, rebuild every task; other exceptions propagate (they are crashes)."""
    from tvswitch.errors import TvswitchError
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.rebuild import CpuRebuilder

    try:
        bundle = Bundle.open(path)
        embedded = bundle.embedded_base()
        rebuilder = CpuRebuilder(bundle, None if embedded else base)
        out = rebuilder.allocate("float32")
        finite = True
        for task in bundle.tasks:
            rebuilder.rebuild({task: 1.0}, out)
            bundle.task_specific(task)
            finite = finite and all(np.isfinite(a).all() for a in out.values())
    except TvswitchError:
        return "refused", None
    embedded = set((bundle.manifest["base"].get("embedded") or {}).values())
    payloads = {k: bundle.payload(k) for k in bundle.manifest["payloads"] if k not in embedded}
    return ("opened" if finite else "nonfinite"), payloads


# ---- mutators ------------------------------------------------------------------------------

def _split(data: bytes) -> Tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


_SCALARS = [None, True, 0, -1, 2 ** 31 - 1, 2 ** 63, 1e308, -1.5e38, "x", "@base/enc.weight"]


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(len(_SCALARS) + (2 if depth < 2 else 0))
    if pick < len(_SCALARS):
        return _SCALARS[pick]
    return [_random_json(rng, depth + 1)] if pick == len(_SCALARS) else {"k": _random_json(rng, depth + 1)}


def _places(tree: Any, path: Tuple = ()) -> List[Tuple]:
    """Every place in a JSON tree (paths of keys and indexes)."""
    out = [path]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _places(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree[:8]):
            out += _places(v, path + (i,))
    return out


def _mutate_tree(tree: Any, rng: random.Random) -> Any:
    places = [p for p in _places(tree) if p]
    if not places:
        return _random_json(rng)
    path = rng.choice(places)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    last, action = path[-1], rng.randrange(4)
    if action == 0 and isinstance(parent, dict):
        del parent[last]
    elif action == 1 and isinstance(parent[last], (int, float)) and not isinstance(parent[last], bool):
        parent[last] = rng.choice([parent[last] + 1, parent[last] - 1, -parent[last], parent[last] * 1000, 0])
    elif action == 2:
        parent[last] = "[" * rng.choice([1, 5]) if rng.random() < 0.1 else _random_json(rng)
    else:
        parent[last] = _random_json(rng)
    return tree


def _stored(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(path, framework="numpy") as f:
        meta = dict(f.metadata())
    return load_file(path), meta


def _write(path: str, tensors: Dict[str, np.ndarray], manifest: Any, raw_text: Optional[str] = None) -> None:
    import hashlib

    from tvswitch.runtime.checkpoint import write_safetensors

    text = raw_text if raw_text is not None else json.dumps(manifest, separators=(",", ":"))
    write_safetensors(path, tensors, {"tvswitch.manifest": text,
                                      "tvswitch.manifest.sha256": hashlib.sha256(text.encode()).hexdigest()})


def mutate(layer: str, src: str, dst: str, rng: random.Random) -> None:
    """Write one mutant of bundle ``src`` at ``layer`` to ``dst``."""
    data = open(src, "rb").read()
    if layer == "bytes":
        buf = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 8])):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        if rng.random() < 0.1:
            buf = buf[:rng.randrange(len(buf))]  # truncated
        open(dst, "wb").write(bytes(buf))
        return
    if layer == "header":
        header, body = _split(data)
        header = _mutate_tree({k: v for k, v in header.items() if k != "__metadata__"}, rng) or {}
        if isinstance(header, dict):
            header["__metadata__"] = _split(data)[0]["__metadata__"]
        open(dst, "wb").write(_join(header, body) if isinstance(header, dict) else data[:16])
        return
    tensors, meta = _stored(src)
    manifest = json.loads(meta["tvswitch.manifest"])
    if layer == "manifest":
        if rng.random() < 0.03:  # the deep nesting a JSON parser recurses on
            _write(dst, tensors, None, raw_text="[" * 100000 + "]" * 100000)
            return
        _write(dst, tensors, _mutate_tree(manifest, rng))
        return
    key = rng.choice(sorted(tensors))
    a = tensors[key].copy()
    raw = a.reshape(-1).view(np.uint8)
    if raw.size:
        choice = rng.randrange(3)
        if choice == 0:
            raw[rng.randrange(raw.size)] ^= 1 << rng.randrange(8)
        elif choice == 1 and a.dtype == np.float32:
            a.reshape(-1)[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, 3e38, -1e-45])
        else:
            raw[:] = rng.randrange(256)
    codec = manifest["payloads"][key]["codec"]
    if codec != "none" and rng.random() < 0.3:
        a = bomb(codec)
    tensors[key] = a
    manifest["payloads"][key]["crc32"] = zlib.crc32(a.reshape(-1).view(np.uint8).data)
    if list(a.shape) != manifest["payloads"][key]["shape"] and manifest["payloads"][key]["codec"] == "none":
        manifest["payloads"][key]["shape"] = list(a.shape)
    _write(dst, tensors, manifest)


_BOMBS: Dict[str, np.ndarray] = {}


def bomb(codec: str) -> np.ndarray:
    """A decompression bomb: 1 GiB of zeros in a few hundred kB of ``codec`` (made once)."""
    if codec not in _BOMBS:
        import lzma

        zeros, chunks = b"\0" * (1 << 24), []
        packer = zlib.compressobj(9) if codec == "zlib" else lzma.LZMACompressor(preset=1)
        for _ in range(64):
            chunks.append(packer.compress(zeros))
        chunks.append(packer.flush())
        _BOMBS[codec] = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    return _BOMBS[codec]


def declared_bytes(path: str) -> int:
    """Bytes a bundle's manifest says its payloads and tensors hold (the bound on a reader's memory)."""
    from tvswitch.runtime.bundle import Bundle

    b = Bundle.open(path)
    payloads = sum(int(np.prod(v["shape"], dtype=np.int64)) * np.dtype(v["dtype"]).itemsize
                   for v in b.manifest["payloads"].values())
    return payloads + 2 * b.base_nbytes


def check_mutant(mutant: str, src: str, base_path: str, folder: str, original: Dict[str, np.ndarray],
                 manifest: str, layer: str, track_memory: bool = False) -> Dict[str, Any]:
    """One mutant through the API (``exercise``) and the CLI (``verify``, ``rebuild -o``, in
    process): its outcome ("refused", "opened", "crash", "nonfinite", "silent"), the CLI's
    faults ("traceback", "written": an output left by a refused run) and the API's peak memory."""
    from tvswitch.cli import main as cli

    base = _load_base(base_path)
    result: Dict[str, Any] = {"signature": None, "cli": []}
    if track_memory:
        tracemalloc.start()
    try:
        outcome, payloads = exercise(mutant, base)
    except RecursionError:
        outcome, payloads, result["signature"] = "crash", None, "RecursionError"
    except Exception as exc:  # noqa: BLE001 - every other exception is a crash to count
        outcome, payloads = "crash", None
        result["signature"] = "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:80] if str(exc) else "")
    finally:
        if track_memory:
            result["peak"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    if outcome == "opened" and layer == "bytes" and not _same(payloads, original, mutant, manifest):
        outcome = "silent"
    result["outcome"] = outcome
    out = os.path.join(folder, "mutant-out.safetensors")
    fields = json.loads(manifest)
    embedded = bool(fields["base"].get("embedded"))
    rebuild = ["rebuild", mutant, "--task", sorted(fields["tasks"])[0], "-o", out, "--no-progress",
               "--threads", "1"] + ([] if embedded else ["--base", base_path])
    for argv in (["verify", mutant], rebuild):
        if os.path.exists(out):
            os.remove(out)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = cli(argv)
        except BaseException as exc:  # noqa: BLE001 - an exception out of main is a traceback for a user
            rc, text = 1, "Traceback: %s" % type(exc).__name__
        else:
            text = err.getvalue()
        if "Traceback" in text or rc not in (0, 2) or (rc == 2 and len(text.strip().splitlines()) != 1):
            result["cli"].append("traceback")
            result["signature"] = result["signature"] or "%s exit %d: %s" % (argv[0], rc, text.strip()[-80:])
        if rc != 0 and os.path.exists(out):
            result["cli"].append("written")
    return result


_BASES: Dict[str, Dict[str, np.ndarray]] = {}


def _load_base(path: str) -> Dict[str, np.ndarray]:
    if path not in _BASES:
        from tvswitch.runtime.checkpoint import read_safetensors

        _BASES[path] = read_safetensors(path)
    return _BASES[path]


def worker() -> int:
    """``--worker``: check the mutants named on stdin (one JSON line each), answer one JSON line
    each; run in its own process so that a signal or a hang is seen and counted by the parent."""
    originals: Dict[str, Tuple[Dict[str, np.ndarray], str]] = {}
    for line in sys.stdin:
        job = json.loads(line)
        if job["src"] not in originals:
            originals[job["src"]] = (exercise(job["src"], _load_base(job["base"]))[1],
                                     _stored(job["src"])[1]["tvswitch.manifest"])
        original, manifest = originals[job["src"]]
        result = check_mutant(job["mutant"], job["src"], job["base"], job["folder"], original, manifest,
                              job["layer"], track_memory=job["memory"])
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


class _Worker:
    """A ``--worker`` process, restarted after a signal or a hang."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None

    def check(self, job: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        import select

        if self.proc is None:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            self.proc = subprocess.Popen([sys.executable, "-m", "bench.reliability", "--worker"], cwd=root,
                                         text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        hung = not ready
        self.proc.kill()
        rc = self.proc.wait()
        self.proc = None
        return {"outcome": "hang" if hung else "signal", "cli": [], "signature": "hang" if hung else "signal %d" % -rc}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()


OUTCOMES = ("refused", "opened", "crash", "nonfinite", "silent", "signal", "hang")


def fuzz(paths: List[str], base_path: str, count: int, seed: int, folder: str, track_memory: bool = False,
         in_process: bool = False, timeout: float = 60.0) -> Dict[str, Any]:
    """``count`` mutants per layer: per layer the outcome counts, the CLI's faults, the crash
    signatures and the worst peak memory.  ``in_process`` (the tests) checks mutants in this
    process; otherwise in a worker process, so that signals and hangs are counted, not fatal."""
    rng = random.Random(seed)
    manifests = {p: _stored(p)[1]["tvswitch.manifest"] for p in paths}
    originals = {p: exercise(p, _load_base(base_path))[1] for p in paths} if in_process else {}
    bound = max(declared_bytes(p) for p in paths)
    pool = None if in_process else _Worker()
    report: Dict[str, Any] = {}
    try:
        for layer in LAYERS:
            counts: Counter = Counter()
            signatures: Counter = Counter()
            peak = 0
            for i in range(count):
                src = rng.choice(paths)
                dst = os.path.join(folder, "mutant.tvs")
                mutate(layer, src, dst, rng)
                if pool is None:
                    result = check_mutant(dst, src, base_path, folder, originals[src], manifests[src], layer,
                                          track_memory)
                else:
                    result = pool.check({"mutant": dst, "src": src, "base": base_path, "folder": folder,
                                         "layer": layer, "memory": track_memory}, timeout)
                counts[result["outcome"]] += 1
                counts.update(result["cli"])
                if result["signature"]:
                    signatures[result["signature"]] += 1
                peak = max(peak, result.get("peak", 0))
            print("  %s: %d mutants checked" % (layer, count), file=sys.stderr, flush=True)
            report[layer] = {"mutants": count, **{k: counts[k] for k in OUTCOMES + ("traceback", "written")},
                             "signatures": dict(signatures), "peak_bytes": peak, "declared_bytes": bound}
    finally:
        if pool is not None:
            pool.close()
    return report


def _same(payloads: Dict[str, np.ndarray], original: Dict[str, np.ndarray], path: str, manifest: str) -> bool:
    if set(payloads) != set(original) or any(not np.array_equal(payloads[k], original[k]) for k in original):
        return False
    return _stored(path)[1]["tvswitch.manifest"] == manifest


# ---- SIGKILL during writes -----------------------------------------------------------------

def kill_campaign(folder: str, kills: int, seed: int, elements: int = 6 << 20) -> Dict[str, int]:
    """``kills`` writes killed at a random moment of their run: export, add-task in place,
    remove-task in place, rebuild -o, on checkpoints of ``elements`` float32 weights (large
    enough that a write takes a good part of the run).  After each kill the target must be
    the old file or a complete new one (never lost, never half-written); then the
    temporaries the kills left, aged past the live-writer bound, must go on the next write."""
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.checkpoint import read_safetensors, write_safetensors

    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    ckpts = os.path.join(folder, "kill-ckpts")
    os.makedirs(ckpts, exist_ok=True)
    base = {"w%d" % i: np_rng.normal(0, 0.05, elements // 4).astype(np.float32) for i in range(4)}
    write_safetensors(os.path.join(ckpts, "base.safetensors"), base)
    for t in ("t1", "t2", "t3"):
        write_safetensors(os.path.join(ckpts, t + ".safetensors"),
                          {k: v + np_rng.normal(0, 0.002, v.shape).astype(np.float32) for k, v in base.items()})
    out = os.path.join(folder, "kill-out")
    os.makedirs(out, exist_ok=True)
    cli = [sys.executable, "-m", "tvswitch"]
    ck = lambda name: os.path.join(ckpts, name + ".safetensors")  # noqa: E731
    bundle, weights = os.path.join(out, "b.tvs"), os.path.join(out, "w.safetensors")
    writes = {
        "export": [*cli, "export", "--base", ck("base"), "--task", "t1=" + ck("t1"), "--task", "t2=" + ck("t2"),
                   "-o", bundle, "--no-progress"],
        "add-task": [*cli, "add-task", bundle, "t3=" + ck("t3"), "--base", ck("base")],
        "remove-task": [*cli, "remove-task", bundle, "t2"],
        "rebuild": [*cli, "rebuild", bundle, "--task", "t1", "--base", ck("base"), "-o", weights, "--no-progress"],
    }
    subprocess.run(writes["export"], check=True, capture_output=True)
    good = open(bundle, "rb").read()
    subprocess.run(writes["rebuild"], check=True, capture_output=True)
    durations = {}
    for verb, argv in writes.items():
        open(bundle, "wb").write(good)
        t0 = time.time()
        subprocess.run(argv, check=True, capture_output=True)
        durations[verb] = time.time() - t0

    def temporaries() -> List[str]:
        return [os.path.join(out, n) for n in os.listdir(out) if n.startswith(".tvswitch-")]

    stats = Counter({"files lost": 0})  # printed even when nothing is lost
    for _ in range(kills):
        verb = rng.choice(sorted(writes))
        open(bundle, "wb").write(good)  # every kill starts from the same good bundle
        before = set(temporaries())
        proc = subprocess.Popen(writes[verb], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rng.random() < 0.25:  # at any moment of the run
            time.sleep(rng.uniform(0.0, 1.0) * durations[verb])
        else:  # once its temporary file exists: mid-write, most of the time
            deadline = time.time() + durations[verb]
            while not set(temporaries()) - before and proc.poll() is None and time.time() < deadline:
                time.sleep(0.001)
            time.sleep(rng.choice([0.0, rng.uniform(0.0, 0.02)]))
        stats["killed mid-write"] += bool(set(temporaries()) - before)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stats["kills"] += 1
        for target, read in ((bundle, Bundle.open), (weights, read_safetensors)):
            try:
                read(target)
            except Exception:  # noqa: BLE001 - any failure to read back is a lost file
                stats["files lost"] += 1
    stats["temporaries the kills left"] = len(temporaries())
    stale = time.time() - 2 * 3600
    for path in temporaries():
        os.utime(path, (stale, stale))
    subprocess.run(writes["rebuild"], check=True, capture_output=True)
    stats["temporaries after the next write"] = len(temporaries())
    return dict(stats)


# ---- concurrency ---------------------------------------------------------------------------

def concurrency(server: Any, feeds: Dict[str, np.ndarray], tasks: List[str], switches: int, threads: int = 4,
                sabotage: Optional[Callable[[], None]] = None) -> Dict[str, int]:
    """Readers infer while the main thread switches ``switches`` times: every answer must
    equal, bit for bit, the answer of one task.  ``sabotage`` (a self-test) is run by the
    switcher instead of a switch: something writing the weights without the server's lock,
    which the check must catch as torn answers."""
    answers = {}
    for t in tasks:
        server.switch({t: 1.0})
        answers[t] = b"".join(v.tobytes() for v in server.infer(feeds).values())
    known = set(answers.values())
    done = threading.Event()
    requests, mismatches = [0] * threads, [0] * threads  # one slot per reader: no lock on the hot path

    def read(i: int) -> None:
        while not done.is_set():
            out = server.infer(feeds)
            requests[i] += 1
            if b"".join(v.tobytes() for v in out.values()) not in known:
                mismatches[i] += 1

    workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    try:
        for n in range(switches):
            if sabotage is not None:
                sabotage()
            else:
                server.switch({tasks[n % len(tasks)]: 1.0})
            time.sleep(0.0005)  # let the readers in between switches
    finally:
        done.set()
        for w in workers:
            w.join()
    return {"requests": sum(requests), "switches": switches, "mismatches": sum(mismatches)}


# ---- leaks ---------------------------------------------------------------------------------

def leak_run(server: Any, tasks: List[str], switches: int) -> Dict[str, float]:
    """Memory held after ``switches`` switches against after the first tenth: resident set
    size (Linux /proc) and Python's live allocated blocks after a collection."""
    import gc

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    warm = max(1, switches // 10)
    for i in range(warm):
        server.switch({tasks[i % len(tasks)]: 1.0})
    gc.collect()
    rss0, blocks0 = rss(), sys.getallocatedblocks()
    for i in range(warm, switches):
        server.switch({tasks[i % len(tasks)]: 1.0})
    gc.collect()
    rss1, blocks1 = rss(), sys.getallocatedblocks()
    return {"switches": switches, "rss_growth": (rss1 - rss0) / float(rss0), "blocks_growth": (blocks1 - blocks0) /
            float(blocks0), "rss_mb": rss1 / 1e6}


def torn_switcher(server: Any, tasks: List[str]) -> Callable[[], None]:
    """A switch that ignores the server's lock: each task's weights copied into the live
    buffers tensor by tensor, yielding between tensors (the self-test's sabotage)."""
    weights = {}
    for t in tasks:
        server.switch({t: 1.0})
        weights[t] = {k: v.copy() for k, v in server.engine.buffers(0).items()}
    live = server.engine.buffers(0)
    turn = [0]

    def switch() -> None:
        turn[0] += 1
        for name, value in weights[tasks[turn[0] % len(tasks)]].items():
            live[name][...] = value
            time.sleep(0)
    return switch


def table(report: Dict[str, Any]) -> List[str]:
    rows = ["| layer | mutants | refused cleanly | opened | crashes (API) | tracebacks (CLI) | signals | hangs | "
            "outputs written on refusal | NaN/inf written | silent corruption | worst peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for layer, r in report.items():
        rows.append("| %s | %d | %d | %d | %d | %d | %d | %d | %d | %d | %d | %.2f MB |" % (
            layer, r["mutants"], r["refused"], r["opened"], r["crash"], r["traceback"], r["signal"], r["hang"],
            r["written"], r["nonfinite"], r["silent"], r["peak_bytes"] / 1e6))
    return rows


def demo_server(folder: str, slots: int) -> Tuple[Any, Dict[str, np.ndarray], List[str]]:
    """The built-in example's three tasks served by ONNX Runtime from one graph."""
    from tvswitch.export.example import make_example
    from tvswitch.export.example_net import detect
    from tvswitch.export.exporter import export_bundle
    from tvswitch.export.onnx_export import export_onnx_for_bundle
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.server import serve_bundle

    demo, tasks = os.path.join(folder, "demo-serve"), ["detect", "gauge", "line"]
    bundle, graph = os.path.join(folder, "s.tvs"), os.path.join(folder, "s.onnx")
    if not os.path.exists(graph):
        make_example(demo)
        export_bundle(os.path.join(demo, "base.safetensors"),
                      {t: os.path.join(demo, t + ".safetensors") for t in tasks}, bundle)
        export_onnx_for_bundle(detect(), Bundle.open(bundle), [np.load(os.path.join(demo, "ids.npy"))], graph,
                               input_names=["ids"])
    server = serve_bundle(bundle, model=graph, base=os.path.join(demo, "base.safetensors"), slots=slots, threads=1)
    return server, {"ids": np.load(os.path.join(demo, "ids.npy"))}, tasks


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=int, default=10000, help="mutants per layer (default 10000)")
    ap.add_argument("--kills", type=int, default=100, help="SIGKILLs during writes (default 100)")
    ap.add_argument("--switches", type=int, default=10000, help="switches under concurrent requests and in the "
                    "leak run (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker()
    folder = tempfile.mkdtemp(prefix="tvswitch-reliability-")
    paths, base_path = make_bundles(folder)
    t0 = time.time()
    report = fuzz(paths, base_path, args.mutants, args.seed, folder, track_memory=True)
    print("mutants per layer: %d, each opened, its tasks rebuilt, then `verify` and `rebuild -o` (%.0f s)"
          % (args.mutants, time.time() - t0))
    print("\n".join(table(report)))
    print("largest bundle's declared bytes: %.3f MB; a decompression bomb's claim: %.0f MB"
          % (max(r["declared_bytes"] for r in report.values()) / 1e6, (1 << 30) / 1e6))
    for layer, r in report.items():
        for sig, n in sorted(r["signatures"].items(), key=lambda kv: -kv[1]):
            print("  %s: x%d %s" % (layer, n, sig))
    t0 = time.time()
    print("SIGKILL during writes: %s (%.0f s)" % (kill_campaign(folder, args.kills, args.seed), time.time() - t0))
    for slots in (1, 2):
        server, feeds, tasks = demo_server(folder, slots)
        t0 = time.time()
        print("concurrency, 4 readers, %d slot%s: %s (%.0f s)" % (slots, "" if slots == 1 else "s", concurrency(
            server, feeds, tasks, args.switches), time.time() - t0))
        server.close()
    server, feeds, tasks = demo_server(folder, 1)
    print("self-test, weights switched without the lock: %s"
          % concurrency(server, feeds, tasks, 200, sabotage=torn_switcher(server, tasks)))
    server.close()
    server, feeds, tasks = demo_server(folder, 1)
    t0 = time.time()
    print("leak run: %s (%.0f s)" % (leak_run(server, tasks, args.switches), time.time() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
