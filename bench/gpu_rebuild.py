"""GPU switch speed per scheme and width, as a fraction of the device's own copy bandwidth.

    python -m bench.gpu_rebuild [--networks minilm,vit] [--schemes all] [--tiles 4] [--repeat 20] [--out LOG]

1. Checks the kernels on this GPU against the CPU build, bit for bit, for every scheme and
   width (TVQ 1..8 bits per tensor, channel and group; FQ; RTVQ; T-Switch) on fresh random
   weights of odd sizes, with poisoned outputs, for a 1-task and a 3-task mix in fp32 and
   fp16.  Timing only starts when every check passed.
2. Times a switch of whole networks, the MiniLM encoder (all-MiniLM-L6-v2: 6 layers, d=384,
   ff=1536, 30522 x 384 embeddings, 22.7 M weights) and a ViT-B/32-sized image encoder
   (87.8 M weights), fp16 base and output, 8 synthetic tasks: a 1-task switch and an
   8-task mix.  Per row: bytes a switch must move (base read + packed read + output write,
   DESIGN.md section 9), time per switch (CUDA events, mean over --repeat back-to-back
   launches), achieved bandwidth, and that bandwidth over a cuMemcpyDtoD moving the same
   bytes in the same run.  Targets (issue 4, H100): >= 0.75 for one task, >= 0.6 for 8.

Exits with status 2 and the reason where no GPU can be opened.  Weights are synthetic:
a switch's speed depends on the layout, not on the values.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np

from bench.shapes import minilm_shapes, vit_b32_shapes
from tvswitch.export.exporter import export_bundle
from tvswitch.kernels.cuda import Device, has_gpu, open_device
from tvswitch.runtime.gpu_rebuild import GpuRebuilder
from tvswitch.runtime.rebuild import CpuRebuilder

TASKS = ["t%d" % i for i in range(8)]
TARGET = {1: 0.75, 8: 0.6}

#: (label, scheme, exporter settings) timed per network.
TIMED = ([("tvq%d" % b, "tvq", dict(bits=b)) for b in range(1, 9)] + [
    ("tvq4-channel", "tvq", dict(bits=4, granularity="channel")),
    ("tvq4-group128", "tvq", dict(bits=4, granularity="group:128")),
    ("rtvq3+2", "rtvq", dict(base_bits=3, offset_bits=2)),
    ("tswitch", "tswitch", dict(keep=0.3)),
])
#: Everything the correctness pass covers.
CHECKED = ([("tvq", dict(bits=b, granularity=g)) for b in range(1, 9) for g in ("tensor", "channel", "group:7")]
           + [("fq", dict(bits=4)), ("rtvq", dict(base_bits=3, offset_bits=2)), ("rtvq", dict(base_bits=5, offset_bits=3)),
              ("tswitch", dict(keep=0.3))])


NETWORKS = {"minilm": ("MiniLM-L6 encoder", minilm_shapes), "vit": ("ViT-B/32 image encoder", vit_b32_shapes)}


def synthetic(shapes: Dict[str, Tuple[int, ...]], tasks: List[str], dtype: str, seed: int):
    """A base and fine-tunes that differ from it by small dense noise."""
    rng = np.random.default_rng(seed)
    base = {n: rng.normal(0, 0.04, s).astype(dtype) for n, s in shapes.items()}
    fts = {t: {n: (v + rng.normal(0, 2e-3, v.shape).astype(np.float32)).astype(dtype) for n, v in base.items()}
           for t in tasks}
    return base, fts


def check(device: Device, tmp: str, log) -> bool:
    """Every scheme and width on this GPU against the CPU build, bit for bit; True when all pass."""
    odd = {"a.weight": (37, 29), "b.weight": (1031, 7), "c.bias": (1,), "d.weight": (3, 2049), "e.weight": (11, 5, 3)}
    failures = 0
    for dtype in ("float32", "float16"):
        base, fts = synthetic(odd, ["x", "y", "z"], dtype, seed=int.from_bytes(os.urandom(4), "little"))
        for scheme, kw in CHECKED:
            bundle = export_bundle(base, fts, os.path.join(tmp, "check.tvs"), name=scheme, **kw)
            ref = CpuRebuilder(bundle, base)
            with GpuRebuilder(bundle, base, device=device, tiles_per_block=2) as r:
                for mix in ({"y": 1.0}, {"x": 0.3, "y": 0.5, "z": -0.2}):
                    for out_dtype in ("float32", "float16"):
                        out = r.allocate(out_dtype)
                        for t in out.values():
                            device.memset(t.ptr, 0xA5, t.nbytes)  # poison: an unwritten element fails
                        r.rebuild(mix, out)
                        want = ref.allocate(out_dtype)
                        ref.rebuild(mix, want)
                        bad = [n for n, t in out.items() if r.download(t).tobytes() != want[n].tobytes()]
                        if bad:
                            failures += 1
                            log("MISMATCH %s %s base %s out %s mix %s: %s" % (scheme, kw, dtype, out_dtype, mix, bad))
    log("check: %d schemes/widths x 2 base dtypes x 2 mixes x 2 output dtypes against the CPU build: %s"
        % (len(CHECKED), "all bit-identical" if not failures else "%d MISMATCHES" % failures))
    return failures == 0


def time_ms(device: Device, fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    device.synchronize()
    start = device.event()
    for _ in range(repeat):
        fn()
    end = device.event()
    return device.elapsed_ms(start, end) / repeat


def copy_ms(device: Device, nbytes: int, repeat: int) -> float:
    """A cuMemcpyDtoD that moves ``nbytes`` (reads half, writes half), as a switch would."""
    half = nbytes // 2
    src, dst = device.alloc(half), device.alloc(half)
    try:
        return time_ms(device, lambda: device.copy(dst, src, half), repeat)
    finally:
        device.free(src)
        device.free(dst)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", default="minilm,vit", help="comma list of: %s" % ", ".join(NETWORKS))
    ap.add_argument("--schemes", default="all", help="comma list of labels (%s) or all" % ", ".join(l for l, _, _ in TIMED))
    ap.add_argument("--tiles", default="4", help="tiles per CUDA block to time, comma list (e.g. 1,2,4,8)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="base and output dtype")
    ap.add_argument("--skip-check", action="store_true", help="time without the correctness pass")
    ap.add_argument("--out", help="log file (default: docs/results/gpu_rebuild-<device>.txt)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.networks.split(",") if n not in NETWORKS]
    if unknown:
        ap.error("unknown network %r (choose from %s)" % (unknown[0], ", ".join(NETWORKS)))
    reason = has_gpu()
    if reason is not None:
        print("bench/gpu_rebuild.py: no GPU to run on: %s" % reason, file=sys.stderr)
        return 2
    device = open_device()
    name = "%s (sm_%d%d)" % ((device.name,) + tuple(device.cc))
    out_path = args.out or os.path.join("docs", "results", "gpu_rebuild-%s.txt"
                                        % "".join(c if c.isalnum() else "_" for c in device.name).strip("_"))
    lines: List[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log("command: python -m bench.gpu_rebuild %s" % " ".join(argv if argv is not None else sys.argv[1:]))
    log("device: %s via %s; host %s; %s" % (name, device.binding, platform.node(), datetime.date.today().isoformat()))
    schemes = TIMED if args.schemes == "all" else [t for t in TIMED if t[0] in args.schemes.split(",")]
    tiles = [int(t) for t in args.tiles.split(",")]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_check:
            ok = check(device, tmp, log)
            if not ok:
                log("not timing: the kernels disagree with the CPU build on this GPU")
        if ok:
            header = "%-24s %-14s %5s %5s %10s %9s %9s %9s %6s %s" % (
                "network", "scheme", "tasks", "tiles", "MB/switch", "ms", "GB/s", "copy GB/s", "frac", "target")
            for key in args.networks.split(","):
                label, shapes_fn = NETWORKS[key]
                shapes = shapes_fn()
                log("\n%s: %.1f M weights in %d tensors, %s" % (label, sum(int(np.prod(s)) for s in shapes.values()) / 1e6,
                                                                 len(shapes), args.dtype))
                base, fts = synthetic(shapes, TASKS, args.dtype, seed=1)
                log(header)
                for scheme_label, scheme, kw in schemes:
                    bundle = export_bundle(base, fts, os.path.join(tmp, "net.tvs"), name=scheme, **kw)
                    for t in tiles:
                        with GpuRebuilder(bundle, base, device=device, tiles_per_block=t, verify_base=False) as r:
                            out = r.allocate()
                            for ntasks, mix in ((1, {TASKS[0]: 1.0}), (8, {x: 0.3 for x in TASKS})):
                                nbytes = r.bytes_moved(mix)
                                ms = time_ms(device, lambda: r.rebuild(mix, out, sync=False), args.repeat)
                                cms = copy_ms(device, nbytes, args.repeat)
                                frac = cms / ms
                                log("%-24s %-14s %5d %5d %10.1f %9.3f %9.1f %9.1f %6.2f %s" % (
                                    label, scheme_label, ntasks, t, nbytes / 1e6, ms, nbytes / ms / 1e6,
                                    nbytes / cms / 1e6, frac,
                                    "%.2f %s" % (TARGET[ntasks], "met" if frac >= TARGET[ntasks] else "MISSED")))
                del base, fts
    device.close()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("log written to %s" % out_path)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
