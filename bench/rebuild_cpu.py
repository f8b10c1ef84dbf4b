"""Bundle size and CPU rebuild speed on the MiniLM encoder, 8 tasks (issue 2's figures).

    python -m bench.rebuild_cpu [--cache ~/.cache/tvswitch/text8] [--repeat 15] [--out FILE]

Task vectors: the 8 fine-tuned checkpoints of bench/text8 when the cache holds them
(real), otherwise synthetic ones of the same shapes (a rank-8 change plus dense noise at
0.2% of each tensor's RMS), and the output says which.  Speed is reported as achieved
bandwidth (bytes a rebuild must move: base read + packed read + output write) over the
bandwidth of a plain memory copy of the same number of bytes, measured in the same run
(bench/copyref.py, the reference of every benchmark).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np

from bench.copyref import timed_beside_copy
from bench.shapes import minilm_shapes
from tvswitch.export.exporter import export_bundle
from tvswitch.kernels import cpu
from tvswitch.runtime.checkpoint import read_safetensors
from tvswitch.runtime.rebuild import CpuRebuilder
from tvswitch.runtime.stats import bundle_stats

SYNTHETIC_TASKS = ["t%d" % i for i in range(8)]


def load_checkpoints(cache: pathlib.Path) -> Tuple[Dict[str, np.ndarray], Dict[str, Dict[str, np.ndarray]], str]:
    """(base, tasks, description): real fine-tunes if cached, else synthetic ones."""
    files = sorted(p for p in cache.glob("*.safetensors") if p.stem != "pretrained")
    if (cache / "pretrained.safetensors").exists() and len(files) >= 8:
        base = read_safetensors(str(cache / "pretrained.safetensors"))
        return base, {f.stem: read_safetensors(str(f)) for f in files[:8]}, \
            "real: fine-tuned MiniLM checkpoints %s from %s" % (", ".join(f.stem for f in files[:8]), cache)
    rng = np.random.default_rng(0)
    base = {n: rng.normal(0, 0.04, s).astype(np.float32) for n, s in minilm_shapes().items()}
    tasks = {}
    for t in SYNTHETIC_TASKS:
        ft = {}
        for n, w in base.items():
            rms = float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
            tau = rng.normal(0, 2e-3 * rms, w.shape)
            if w.ndim == 2:
                tau += 2e-3 * rms * (rng.normal(0, 1, (w.shape[0], 8)) @ rng.normal(0, 1, (8, w.shape[1]))) / 8
            ft[n] = (w + tau).astype(np.float32)
        ft["head.weight"] = rng.normal(0, 0.05, (10, 384)).astype(np.float32)
        tasks[t] = ft
    return base, tasks, "synthetic task vectors of MiniLM's shapes (no cached fine-tunes in %s)" % cache


def groups_bits(keep: float) -> float:
    """Nominal bits per weight of T-Switch's compact form with kept elements spread at
    random: the index's 1/32 plus a byte per group of four holding one (its four ternary
    codes in the sparse layout, docs/FORMAT.md 3.4; the groups layout of 3.3 took the same)."""
    return 1 / 32 + 2 * (1 - (1 - keep) ** 4)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="~/.cache/tvswitch/text8", help="bench/text8's fine-tuning cache")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", help="also write the report to this markdown file")
    args = ap.parse_args(argv)
    base, tasks, source = load_checkpoints(pathlib.Path(os.path.expanduser(args.cache)))
    lines = ["# CPU rebuild and bundle size, MiniLM encoder, 8 tasks", "",
             "- task vectors: %s" % source,
             "- machine: %s, %d cores, Python %s, numpy %s" % (platform.machine(), os.cpu_count(),
                                                              platform.python_version(), np.__version__),
             "- CPU library path: %s; date: %s" % (cpu.path(), time.strftime("%Y-%m-%d")),
             "- command: `python -m bench.rebuild_cpu%s`" % (" " + " ".join(argv or sys.argv[1:])).rstrip(),
             ""]
    streams = dict(layout="streams")
    configs = [
        ("TVQ-INT4", dict(name="tvq", bits=4, **streams), 4.0),
        ("TVQ-INT3", dict(name="tvq", bits=3, **streams), 3.0),
        ("TVQ-INT2", dict(name="tvq", bits=2, **streams), 2.0),
        ("TVQ-INT2, auto", dict(name="tvq", bits=2, layout="auto"), 2.0),
        ("RTVQ(3+2)", dict(name="rtvq", **streams), 2.0 + 3 / 8),
        ("RTVQ(3+2), auto", dict(name="rtvq", layout="auto"), 2.0 + 3 / 8),
        ("RTVQ budget 2.375", dict(name="rtvq", budget_bits=2.375, **streams), 2.375),
        ("RTVQ budget 2.375, auto", dict(name="rtvq", budget_bits=2.375, layout="auto"), 2.375),
        ("T-Switch keep 0.3, streams", dict(name="tswitch", keep=0.3, **streams), 2.0),
        ("T-Switch keep 0.3, compact", dict(name="tswitch", keep=0.3, layout="compact"), groups_bits(0.3)),
        ("T-Switch keep 0.1, compact", dict(name="tswitch", keep=0.1, layout="compact"), groups_bits(0.1)),
        ("TVQ-INT2 + lzma", dict(name="tvq", bits=2, entropy="lzma", **streams), 2.0),
        ("RTVQ(3+2) + lzma", dict(name="rtvq", entropy="lzma", **streams), 2.375),
        ("T-Switch keep 0.3, streams + lzma", dict(name="tswitch", keep=0.3, entropy="lzma", **streams), 2.0),
    ]
    size_rows, speed_rows = [], []
    first = next(iter(tasks))
    mixes = {"1 task": {first: 1.0}, "8-task mix": {t: 0.3 for t in tasks}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw, nominal in configs:
            path = os.path.join(tmp, "b.tvs")
            t0 = time.perf_counter()
            bundle = export_bundle(base, tasks, path, **kw)
            export_s = time.perf_counter() - t0
            stats = bundle_stats(bundle)
            bits = stats["bits_per_task_vector_weight"]
            size_rows.append("| %s | %.3f | %.3f | %+.1f%% | %.2f MB | %.1fx | %.1f s |" % (
                label, nominal, bits, 100 * (bits / nominal - 1), stats["file_bytes"] / 1e6,
                stats["ratio_to_fp32_checkpoints"], export_s))
            if "entropy" in kw or "budget_bits" in kw:
                continue
            for mix_label, mix in mixes.items():
                for threads in (1, 2):
                    r = CpuRebuilder(bundle, base, threads=threads)
                    out = r.allocate()
                    moved = r.bytes_moved(mix)
                    t = timed_beside_copy(lambda: r.rebuild(mix, out), moved, args.repeat, threads)
                    speed_rows.append("| %s | %s | %d | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |" % (
                        label, mix_label, threads, moved / 1e6, 1e3 * t.seconds, moved / t.seconds / 1e9,
                        t.copy_bw / 1e9, t.ratio, 1e3 * t.fastest_seconds, t.fastest_ratio))
            os.unlink(path)
    lines += ["## Bytes on disk per task-vector weight (everything in the file included)", "",
              "| scheme | nominal bits | measured bits | vs nominal | file (8 tasks) | vs FP32 checkpoints | export |",
              "|---|---|---|---|---|---|---|", *size_rows, "",
              "## CPU rebuild into preallocated fp32 buffers", "",
              "Bandwidth = bytes that must move / median time; copy = bench/copyref.py: a numpy copy of the "
              "same bytes on as many threads as the rebuild uses, timed in turn with the rebuild. Ratio: "
              "the copy's time over the rebuild's, medians; fastest: the same of the fastest of each.", "",
              "| scheme | mix | threads | MB moved | ms | GB/s | copy GB/s | ratio to copy | fastest ms | "
              "fastest ratio |",
              "|---|---|---|---|---|---|---|---|---|---|", *speed_rows, ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        pathlib.Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
