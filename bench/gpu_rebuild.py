"""GPU switch speed per scheme and width, as a fraction of the device's own copy bandwidth.

    python -m bench.gpu_rebuild [--networks minilm,vit] [--schemes all] [--tiles 4] [--repeat 20] [--out LOG]
    python -m bench.gpu_rebuild --null-device      # host time per switch only, no GPU needed

1. Checks the kernels on this GPU against the CPU build, bit for bit, for every scheme and
   width (TVQ 1..8 bits per tensor, channel and group; FQ; RTVQ; T-Switch; EMR) on fresh
   random weights of odd sizes, with poisoned outputs and poisoned guard bytes around and
   past them, for a 1-task and a 3-task mix in fp32, fp16 and bf16.  Timing only starts
   when every check passed.
2. Times a switch of whole networks, the MiniLM encoder (all-MiniLM-L6-v2: 6 layers, d=384,
   ff=1536, 30522 x 384 embeddings, 22.7 M weights) and a ViT-B/32-sized image encoder
   (87.8 M weights), fp16 base and output, 8 synthetic tasks: a 1-task switch and an
   8-task mix.  Per row: bytes a switch moves (base read + every term's packed payloads +
   output write, the switch floor of docs/architecture.md; an EMR mix reads the shared codes once per task),
   kernel time per switch (CUDA events around --repeat back-to-back launches of the
   switch's cached launch, so Python is not in the measurement), achieved bandwidth, that
   bandwidth over a cuMemcpyDtoD moving the same bytes in the same run, and, apart, the
   host time of one ``rebuild()`` call (the Python a switch costs on this CPU).  Targets
   (issue 4, H100): >= 0.75 for one task, >= 0.6 for 8.
   Before that, switches between tasks that leave most embedding rows at the zero point:
   each held to the CPU build bit for bit, then the launch that leaves out the zero blocks
   timed against the one that writes the changed tensors whole (``switches``).

``--null-device`` runs no kernel: it times ``GpuRebuilder.rebuild`` against a device that
does nothing, which is the host cost of a switch on this CPU (a Jetson's ARM cores are
where it matters).  Exits with status 2 and the reason where no GPU can be opened
otherwise.  Weights are synthetic: a switch's speed depends on the layout, not on the values.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from bench.shapes import minilm_shapes, vit_b32_shapes
from tvswitch.export.exporter import export_bundle
from tvswitch.kernels import abi, nvrtc, reference
from tvswitch.kernels.cuda import Device, has_gpu, open_device
from tvswitch.kernels.cuda import DeviceTensor
from tvswitch.runtime.gpu_rebuild import GpuRebuilder, arena_layout
from tvswitch.runtime.rebuild import CpuRebuilder

TASKS = ["t%d" % i for i in range(8)]
TARGET = {1: 0.75, 8: 0.6}

#: (label, scheme, exporter settings) timed per network.
TIMED = ([("tvq%d" % b, "tvq", dict(bits=b)) for b in range(1, 9)] + [
    ("tvq4-channel", "tvq", dict(bits=4, granularity="channel")),
    ("tvq4-group128", "tvq", dict(bits=4, granularity="group:128")),
    ("rtvq3+2", "rtvq", dict(base_bits=3, offset_bits=2)),
    ("tswitch", "tswitch", dict(keep=0.3)),
    ("emr4", "emr", dict(bits=4)),
])
#: Everything the correctness pass covers.
CHECKED = ([("tvq", dict(bits=b, granularity=g)) for b in range(1, 9) for g in ("tensor", "channel", "group:7")]
           + [("fq", dict(bits=4)), ("rtvq", dict(base_bits=3, offset_bits=2)), ("rtvq", dict(base_bits=5, offset_bits=3)),
              ("tswitch", dict(keep=0.3)), ("emr", dict(bits=4)), ("emr", dict(bits=2, granularity="channel"))])
#: Poisoned bytes before, between (arena padding) and after the outputs of the check.
GUARD = 256
POISON = 0xA5


NETWORKS = {"minilm": ("MiniLM-L6 encoder", minilm_shapes), "vit": ("ViT-B/32 image encoder", vit_b32_shapes)}


def synthetic(shapes: Dict[str, Tuple[int, ...]], tasks: List[str], dtype: str, seed: int):
    """A base and fine-tunes that differ from it by small dense noise."""
    rng = np.random.default_rng(seed)
    base = {n: rng.normal(0, 0.04, s).astype(dtype) for n, s in shapes.items()}
    fts = {t: {n: (v + rng.normal(0, 2e-3, v.shape).astype(np.float32)).astype(dtype) for n, v in base.items()}
           for t in tasks}
    return base, fts


def guarded_outputs(device: Device, specs: Dict[str, Tuple[int, ...]], dtype: str) -> Tuple[Dict[str, DeviceTensor], int, int]:
    """Output tensors in one poisoned arena with GUARD poisoned bytes before the first and after
    the last (and the arena's padding between them): (tensors, arena, arena bytes)."""
    itemsize = DeviceTensor(0, (), dtype).itemsize
    offsets, total = arena_layout([int(np.prod(s, dtype=np.int64)) * itemsize for s in specs.values()])
    arena = device.alloc(total + 2 * GUARD)
    device.memset(arena, POISON, total + 2 * GUARD)
    tensors = {n: DeviceTensor(arena + GUARD + off, shape, dtype) for (n, shape), off in zip(specs.items(), offsets)}
    return tensors, arena, total + 2 * GUARD


def written_outside(device: Device, tensors: Dict[str, DeviceTensor], arena: int, nbytes: int) -> List[int]:
    """Offsets into the arena of bytes outside every tensor that are no longer the poison."""
    host = np.empty(nbytes, np.uint8)
    device.download(host, arena)
    inside = np.zeros(nbytes, bool)
    for t in tensors.values():
        inside[t.ptr - arena:t.ptr - arena + t.nbytes] = True
    return np.flatnonzero(~inside & (host != POISON)).tolist()


def expected(ref: CpuRebuilder, mix: Dict[str, float], dtype: str) -> Dict[str, np.ndarray]:
    """What the kernels must write: the CPU build's output (bf16: its float32 result, rounded as decode.h does)."""
    want = ref.allocate("float32" if dtype == "bfloat16" else dtype)
    ref.rebuild(mix, want)
    if dtype == "bfloat16":
        return {n: reference._to_16bit(a.reshape(-1), abi.BF16).reshape(a.shape) for n, a in want.items()}
    return want


def check(device: Device, tmp: str, log) -> bool:
    """Every scheme and width on this GPU against the CPU build, bit for bit; True when all pass."""
    odd = {"a.weight": (37, 29), "b.weight": (1031, 7), "c.bias": (1,), "d.weight": (3, 2049), "e.weight": (11, 5, 3)}
    failures = 0
    for dtype in ("float32", "float16"):
        seed = int.from_bytes(os.urandom(4), "little")
        base, fts = synthetic(odd, ["x", "y", "z"], dtype, seed=seed)
        for scheme, kw in CHECKED:
            bundle = export_bundle(base, fts, os.path.join(tmp, "check.tvs"), name=scheme, **kw)
            ref = CpuRebuilder(bundle, base)
            with GpuRebuilder(bundle, base, device=device, tiles_per_block=2) as r:
                for mix in ({"y": 1.0}, {"x": 0.3, "y": 0.5, "z": -0.2}):
                    for out_dtype in ("float32", "float16", "bfloat16"):
                        out, arena, nbytes = guarded_outputs(device, {n: s.shape for n, s in bundle.shared_specs.items()},
                                                             out_dtype)
                        try:
                            r.rebuild(mix, out)
                            want = expected(ref, mix, out_dtype)
                            bad = [n for n, t in out.items() if r.download(t).tobytes() != want[n].tobytes()]
                            stray = written_outside(device, out, arena, nbytes)
                        finally:
                            device.free(arena)
                        if bad or stray:
                            failures += 1
                            log("MISMATCH %s %s base %s out %s mix %s (seed %d): %s%s" % (
                                scheme, kw, dtype, out_dtype, mix, seed, bad,
                                " and %d bytes written outside the outputs" % len(stray) if stray else ""))
    log("check: %d schemes/widths x 2 base dtypes x 2 mixes x 3 output dtypes against the CPU build: %s"
        % (len(CHECKED), "all bit-identical, guards untouched" if not failures else "%d MISMATCHES" % failures))
    return failures == 0


def events_ms(device: Device, fn: Callable[[], None], repeat: int) -> float:
    """Device time per call of ``fn`` (which only enqueues work): CUDA events around ``repeat`` calls."""
    for _ in range(3):
        fn()
    device.synchronize()
    start = device.event()
    for _ in range(repeat):
        fn()
    end = device.event()
    return device.elapsed_ms(start, end) / repeat


def host_us(fn: Callable[[], None], repeat: int, sync: Callable[[], None]) -> float:
    """Host time of one ``fn`` call (best of 5 batches; the queue drained between batches)."""
    best = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t) / repeat)
    sync()
    return best * 1e6


def copy_ms(device: Device, nbytes: int, repeat: int) -> float:
    """A cuMemcpyDtoD that moves ``nbytes`` (reads half, writes half), as a switch would."""
    half = nbytes // 2
    src, dst = device.alloc(half), device.alloc(half)
    try:
        return events_ms(device, lambda: device.copy(dst, src, half), repeat)
    finally:
        device.free(src)
        device.free(dst)


def switch_ms(device: Device, r: GpuRebuilder, mix: Dict[str, float], out: Dict[str, DeviceTensor],
              repeat: int, since: Optional[Dict[str, float]] = None) -> float:
    """Kernel time of one switch: the launch ``rebuild`` would make (from ``since``, with it), timed alone."""
    with device.current():
        launch = r.launch_of(mix, out, since)
    return events_ms(device, lambda: device.launch(*launch), repeat) if launch else 0.0


#: The word embedding of minilm_shapes, which fine-tuning leaves mostly at the zero point.
EMBEDDING = "embeddings.word_embeddings.weight"


def row_sparse(shapes: Dict[str, Tuple[int, ...]], tasks: List[str], dtype: str, seed: int):
    """As ``synthetic``, but each task moves a fifth of the embedding's rows (in bands) and the
    rest by far less than a quantisation step, as the real text8 fine-tunes do."""
    rng = np.random.default_rng(seed)
    base, fts = synthetic(shapes, tasks, dtype, seed)
    rows = shapes[EMBEDDING][0]
    for t in tasks:
        moved = np.zeros(rows, dtype=bool)
        for start in rng.choice(rows - 200, rows // 1000, replace=False):
            moved[start:start + 200] = True
        tau = rng.normal(0, 1e-7, shapes[EMBEDDING])
        tau[moved] = rng.normal(0, 2e-3, (int(moved.sum()), shapes[EMBEDDING][1]))
        fts[t][EMBEDDING] = (base[EMBEDDING].astype(np.float32) + tau).astype(dtype)
    return base, fts


def switches(device: Device, tmp: str, repeat: int, log) -> bool:
    """Switches that leave out the blocks zero in both tasks (decode.h's block_offset): checked
    against the CPU build bit for bit after each switch of a sequence, then timed against a
    rebuild of the same task writing every tensor whole (every tensor changes between these
    tasks).  True when every check passed."""
    tasks = TASKS[:3]
    base, fts = row_sparse(minilm_shapes(), tasks, "float16", seed=2)
    sequence = [{tasks[0]: 1.0}, {tasks[1]: 1.0}, {tasks[2]: 1.0}, {tasks[0]: 0.5, tasks[1]: -0.2},
                {tasks[2]: 1.0}, {tasks[0]: 1.0}]
    failures = 0
    for layout in ("auto", "streams"):
        bundle = export_bundle(base, fts, os.path.join(tmp, "rows.tvs"), name="tvq", bits=4, layout=layout)
        ref = CpuRebuilder(bundle, base)
        with GpuRebuilder(bundle, base, device=device, tiles_per_block=4, verify_base=False) as r:
            out = r.allocate()
            r.rebuild(sequence[0], out)
            for held, mix in zip(sequence, sequence[1:]):
                r.rebuild(mix, out, since=held)
                want = expected(ref, mix, "float16")
                bad = [n for n, t in out.items() if r.download(t).tobytes() != want[n].tobytes()]
                if bad:
                    failures += 1
                    log("MISMATCH switching from %s to %s (tvq4 %s): %s" % (held, mix, layout, bad))
            a, b = sequence[0], sequence[1]
            whole = r.bytes_moved(b)
            part = r.bytes_moved(b, since=a)
            r.rebuild(a, out)
            skipping = switch_ms(device, r, b, out, repeat, since=a)
            every = switch_ms(device, r, b, out, repeat)
            log("switch %s -> %s, tvq4 %s, MiniLM row-sparse: skipping zero blocks %.3f ms (%.1f MB), every tensor "
                "%.3f ms (%.1f MB): %.2fx" % (list(a)[0], list(b)[0], layout, skipping, part / 1e6, every, whole / 1e6,
                                             every / skipping if skipping else float("inf")))
    log("switch check: %d switches x 2 layouts leaving out zero blocks, against the CPU build: %s"
        % (len(sequence) - 1, "all bit-identical" if not failures else "%d MISMATCHES" % failures))
    return failures == 0


class NullDevice(Device):
    """A device that does nothing (no memory, no kernels): what is left of a switch is its Python."""

    binding, name, cc = "none", "no-op device", (8, 7)

    def __init__(self) -> None:
        self._next = 1 << 40

    def alloc(self, nbytes: int) -> int:
        ptr = self._next
        self._next += -(-max(int(nbytes), 1) // 256) * 256
        return ptr

    def free(self, ptr: int) -> None:
        pass

    def upload(self, ptr: int, array: np.ndarray) -> None:
        pass

    def download(self, array: np.ndarray, ptr: int) -> None:
        pass

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        pass

    def memset(self, ptr: int, byte: int, nbytes: int) -> None:
        pass

    def load_module(self, image: bytes) -> Any:
        return None

    def function(self, module: Any, name: str) -> Any:
        return name

    def launch(self, function: Any, grid: int, block: int, args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def host_overhead(networks: List[str], schemes: list, repeat: int, log) -> None:
    """Host time per ``rebuild()`` with a device that does nothing, per network, scheme and mix.

    The tensors keep the networks' names and count but are shrunk (every dimension at most
    4): a switch's Python touches each tensor, never its elements."""
    real_image = nvrtc.kernel_image
    nvrtc.kernel_image = lambda cc: (b"", "none (no-op device)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log("%-24s %-14s %5s %8s %12s" % ("network", "scheme", "tasks", "tensors", "host us/switch"))
            for key in networks:
                label, shapes_fn = NETWORKS[key]
                shapes = {n: tuple(min(d, 4) for d in s) for n, s in shapes_fn().items()}
                base, fts = synthetic(shapes, TASKS, "float16", seed=1)
                for scheme_label, scheme, kw in schemes:
                    bundle = export_bundle(base, fts, os.path.join(tmp, "net.tvs"), name=scheme, **kw)
                    with GpuRebuilder(bundle, base, device=NullDevice(), verify_base=False) as r:
                        out = r.allocate()
                        for ntasks, mix in ((1, {TASKS[0]: 1.0}), (8, {x: 0.3 for x in TASKS})):
                            r.rebuild(mix, out)
                            us = host_us(lambda: r.rebuild(mix, out, sync=False), repeat, r.device.synchronize)
                            log("%-24s %-14s %5d %8d %12.1f" % (label, scheme_label, ntasks, len(shapes), us))
    finally:
        nvrtc.kernel_image = real_image


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", default="minilm,vit", help="comma list of: %s" % ", ".join(NETWORKS))
    ap.add_argument("--schemes", default="all", help="comma list of labels (%s) or all" % ", ".join(l for l, _, _ in TIMED))
    ap.add_argument("--tiles", default="4", help="tiles per CUDA block to time, comma list (e.g. 1,2,4,8)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="base and output dtype")
    ap.add_argument("--skip-check", action="store_true", help="time without the correctness pass")
    ap.add_argument("--null-device", action="store_true", help="host time per switch only, against a no-op device")
    ap.add_argument("--out", help="log file (default: docs/results/gpu_rebuild-<device>.txt; none with --null-device)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.networks.split(",") if n not in NETWORKS]
    if unknown:
        ap.error("unknown network %r (choose from %s)" % (unknown[0], ", ".join(NETWORKS)))
    schemes = TIMED if args.schemes == "all" else [t for t in TIMED if t[0] in args.schemes.split(",")]
    if not schemes:
        ap.error("no scheme matches --schemes %s" % args.schemes)
    lines: List[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log("command: python -m bench.gpu_rebuild %s" % " ".join(argv if argv is not None else sys.argv[1:]))
    if args.null_device:
        log("device: none (host time only); host %s (%s); %s" % (platform.node(), platform.machine(),
                                                                 datetime.date.today().isoformat()))
        host_overhead(args.networks.split(","), schemes, max(args.repeat, 50), log)
        if args.out:
            _write_log(args.out, lines)
        return 0
    reason = has_gpu()
    if reason is not None:
        print("bench/gpu_rebuild.py: no GPU to run on: %s" % reason, file=sys.stderr)
        return 2
    device = open_device()
    name = "%s (sm_%d%d)" % ((device.name,) + tuple(device.cc))
    out_path = args.out or os.path.join("docs", "results", "gpu_rebuild-%s.txt"
                                        % "".join(c if c.isalnum() else "_" for c in device.name).strip("_"))
    log("device: %s via %s; host %s; %s" % (name, device.binding, platform.node(), datetime.date.today().isoformat()))
    tiles = [int(t) for t in args.tiles.split(",")]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_check:
            ok = check(device, tmp, log) and switches(device, tmp, args.repeat, log)
            if not ok:
                log("not timing: the kernels disagree with the CPU build on this GPU")
        if ok:
            header = "%-24s %-14s %5s %5s %10s %9s %9s %9s %6s %-11s %8s" % (
                "network", "scheme", "tasks", "tiles", "MB/switch", "kernel ms", "GB/s", "copy GB/s", "frac",
                "target", "host us")
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
                                r.rebuild(mix, out)  # tables up, outputs checked: what every later switch reuses
                                ms = switch_ms(device, r, mix, out, args.repeat)
                                us = host_us(lambda: r.rebuild(mix, out, sync=False), args.repeat, device.synchronize)
                                cms = copy_ms(device, nbytes, args.repeat)
                                frac = cms / ms
                                log("%-24s %-14s %5d %5d %10.1f %9.3f %9.1f %9.1f %6.2f %-11s %8.1f" % (
                                    label, scheme_label, ntasks, t, nbytes / 1e6, ms, nbytes / ms / 1e6,
                                    nbytes / cms / 1e6, frac,
                                    "%.2f %s" % (TARGET[ntasks], "met" if frac >= TARGET[ntasks] else "MISSED"), us))
                del base, fts
    device.close()
    _write_log(out_path, lines)
    return 0 if ok else 1


def _write_log(path: str, lines: List[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("log written to %s" % path)


if __name__ == "__main__":
    sys.exit(main())
