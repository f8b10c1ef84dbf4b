"""The term layouts of docs/FORMAT.md side by side: resident bits against switch time.

    python -m bench.layouts [--cache ~/.cache/tvswitch/text8] [--repeat 12] [--out FILE]

For T-Switch at keep 0.1, 0.3 and 0.5, TVQ at 2, 3 and 4 bits and RTVQ(3+2) on the eight
MiniLM fine-tunes of bench/text8 (or synthetic task vectors of the same shapes,
bench/rebuild_cpu.load_checkpoints), one bundle per layout (streams: code streams and
bitmaps; compact: sparse codes, section 3.4, T-Switch's ternary codes included; auto: compact
where that at least halves a term, the exporter's default), then per layout:
bits per weight resident (the packed payloads), and the CPU rebuild of one task and of the
8-task mix on one thread, into the same fp32 buffers. The layouts' rebuilds alternate call
by call with a plain copy of each layout's bytes (bench/copyref.py) and each figure is the
fastest of ``repeat`` (a shared machine's noise falls on all alike); the ratio to copy is
the copy's time over the rebuild's, both fastest of ``repeat``. Every
rebuild of the other bundles is checked bit for bit against the streams bundle's.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
from typing import Callable, Dict, List, Mapping

import numpy as np

from bench.copyref import copiers
from bench.rebuild_cpu import load_checkpoints
from tvswitch.export.exporter import export_bundle
from tvswitch.kernels import cpu
from tvswitch.runtime.bundle import Bundle
from tvswitch.runtime.rebuild import CpuRebuilder

LAYOUTS = ("streams", "compact", "auto")
#: (label, export settings) of each scheme measured.
SCHEMES = [("T-Switch keep %.1f" % k, dict(name="tswitch", keep=k)) for k in (0.1, 0.3, 0.5)] + [
    ("TVQ-INT2", dict(name="tvq", bits=2)), ("TVQ-INT3", dict(name="tvq", bits=3)), ("TVQ-INT4", dict(name="tvq", bits=4)),
    ("RTVQ(3+2)", dict(name="rtvq"))]


def resident_bits(bundle: Bundle) -> float:
    """Bits per shared weight the packed payloads of the task vectors take."""
    keys = {k for task in bundle.tasks for name, e in bundle.entries(task).items() if name in bundle.shared_specs
            for term in e.terms for k in term.payloads}
    return 8 * sum(bundle.payload(k).nbytes for k in keys) / (bundle.num_shared_params * len(bundle.tasks))


def fastest(calls: Mapping[str, Callable[[], object]], repeat: int) -> Dict[str, float]:
    """Seconds of the fastest of ``repeat`` calls of each, alternating them call by call."""
    best = {label: float("inf") for label in calls}
    for call in calls.values():
        call()  # warm up: tables built, pages touched
    for _ in range(repeat):
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            best[label] = min(best[label], time.perf_counter() - start)
    return best


def same_bits(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return all(np.array_equal(a[n].view(np.uint8), b[n].view(np.uint8)) for n in a)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="~/.cache/tvswitch/text8", help="bench/text8's fine-tuning cache")
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    base, tasks, source = load_checkpoints(pathlib.Path(os.path.expanduser(args.cache)))
    first = next(iter(tasks))
    mixes = {"1 task": {first: 1.0}, "8-task mix": {t: 1.0 / len(tasks) for t in tasks}}
    lines = ["- task vectors: %s" % source, "- CPU library path: %s, 1 thread; date: %s" % (
        cpu.path(), time.strftime("%Y-%m-%d")), "",
        "| scheme | layout | resident bits | mix | ms | ratio to copy | time vs streams | bits identical |",
        "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for label, settings in SCHEMES:
            bundles = {}
            for layout in LAYOUTS:
                path = os.path.join(tmp, "%s.tvs" % layout)
                bundles[layout] = export_bundle(base, tasks, path, layout=layout, **settings)
            rebuilders = {layout: CpuRebuilder(b, base, threads=1) for layout, b in bundles.items()}
            bits = {layout: resident_bits(b) for layout, b in bundles.items()}
            out = rebuilders["streams"].allocate("float32")
            for mix_label, mix in mixes.items():
                moved = {layout: r.bytes_moved(mix) for layout, r in rebuilders.items()}
                with copiers([moved[layout] for layout in LAYOUTS]) as copies:
                    calls = {layout: (lambda r=r: r.rebuild(mix, out)) for layout, r in rebuilders.items()}
                    calls.update({"copy " + layout: copy for layout, copy in zip(LAYOUTS, copies)})
                    seconds = fastest(calls, args.repeat)
                results = {}
                for layout, r in rebuilders.items():
                    r.rebuild(mix, out)
                    results[layout] = {n: a.copy() for n, a in out.items()}
                identical = all(same_bits(results["streams"], results[layout]) for layout in LAYOUTS)
                for layout in rebuilders:
                    ratio = seconds["copy " + layout] / seconds[layout]
                    lines.append("| %s | %s | %.3f | %s | %.2f | %.2f | %.2fx | %s |" % (
                        label, layout, bits[layout], mix_label, 1e3 * seconds[layout], ratio,
                        seconds[layout] / seconds["streams"], "yes" if identical else "NO"))
                print("\n".join(lines[-len(LAYOUTS):]), flush=True)
            for b in bundles.values():
                os.unlink(b.path)
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
