"""A camera app that switches task on command: the loop an embedded developer copies.

    python examples/camera_switch/camera_switch.py            # built-in demo, commands on stdin
    python examples/camera_switch/camera_switch.py --port 5055 # commands on a localhost socket
    python examples/camera_switch/camera_switch.py --bundle my.tvs --model my.onnx --base base.safetensors

With no arguments it builds its own example first (a small frame classifier, a base and
three fine-tuned "jobs" exported to a bundle in a temp folder), so one command shows the
whole path: open bundle -> ONNX Runtime engine with weights bound as inputs -> serve
frames -> on ``task NAME`` rebuild that task's weights in place and go on serving.
Commands (one per line): ``task NAME``, ``mix A=0.5,B=0.5``, ``tasks``, ``quit``.
Every switch prints its time in milliseconds; every ``--print-every``-th frame (default:
once a second of camera time) prints its inference time and the mean since the last line.
"""
from __future__ import annotations

import argparse
import os
import queue
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

FRAME = (1, 3, 24, 32)  # N, C, H, W: a downscaled camera frame
HIDDEN, CLASSES = 64, 4


def build_demo(folder: str) -> Dict[str, str]:
    """A tiny frame classifier, its base weights and three fine-tuned jobs, as a bundle."""
    import onnx
    from onnx import TensorProto, helper
    from safetensors.numpy import save_file

    from tvswitch.export.exporter import export_bundle

    rng = np.random.default_rng(0)
    inputs = int(np.prod(FRAME[1:]))
    base = {"fc1.weight": (rng.standard_normal((inputs, HIDDEN)) / np.sqrt(inputs)).astype(np.float32),
            "fc1.bias": np.zeros(HIDDEN, np.float32),
            "fc2.weight": (rng.standard_normal((HIDDEN, CLASSES)) / 8).astype(np.float32),
            "fc2.bias": np.zeros(CLASSES, np.float32)}
    jobs = {}
    for job in ("detect_parts", "read_gauge", "follow_line"):
        jobs[job] = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    paths = {"base": os.path.join(folder, "base.safetensors"), "bundle": os.path.join(folder, "jobs.tvs"),
             "model": os.path.join(folder, "classifier.onnx")}
    save_file(base, paths["base"])
    export_bundle(paths["base"], jobs, paths["bundle"], name="rtvq")
    nodes = [helper.make_node("Flatten", ["frame"], ["x"]),
             helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]), helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]),
             helper.make_node("MatMul", ["h", "fc2.weight"], ["y0"]), helper.make_node("Add", ["y0", "fc2.bias"], ["logits"])]
    graph = helper.make_graph(nodes, "camera_classifier",
                              [helper.make_tensor_value_info("frame", TensorProto.FLOAT, list(FRAME))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
                              [onnx.numpy_helper.from_array(a, n) for n, a in base.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, paths["model"])
    return paths


def camera(seed: int = 1) -> Iterator[np.ndarray]:
    """Camera-like frames: a moving gradient plus sensor noise, uint8 scaled to [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:FRAME[2], 0:FRAME[3]]
    t = 0
    while True:
        img = (128 + 100 * np.sin((xx + t) / 5.0) * np.cos(yy / 7.0))[None, None]
        img = np.repeat(img, FRAME[1], axis=1) + rng.normal(0, 8, FRAME)
        yield (np.clip(img, 0, 255).astype(np.uint8).astype(np.float32) / 255.0)
        t += 1


def command_source(port: Optional[int]) -> Tuple["queue.Queue[str]", Callable[[], None]]:
    """Lines from stdin, or from clients of a localhost TCP port, onto one queue, and a stop.

    The port is bound before this returns, so a client may connect as soon as the
    "listening" line is printed; calling stop frees it (shutdown wakes the accept that
    the reader thread is blocked in, which a bare close does not).
    """
    q = queue.Queue()  # type: queue.Queue[str]

    def stdin_reader() -> None:
        for line in sys.stdin:
            q.put(line.strip())
        q.put("quit")

    if not port:
        threading.Thread(target=stdin_reader, daemon=True).start()
        return q, lambda: None
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1)

    def socket_reader() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:  # stopped
                return
            with conn, conn.makefile("r") as f:
                for line in f:
                    q.put(line.strip())

    def stop() -> None:
        try:
            srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        srv.close()

    threading.Thread(target=socket_reader, daemon=True).start()
    print("listening on 127.0.0.1:%d (send 'task NAME' lines)" % port, flush=True)
    return q, stop


def parse_mix(text: str) -> Dict[str, float]:
    """``NAME`` (that task alone) or ``A=0.5,B=0.5``; ValueError naming the bad part."""
    if "=" not in text:
        return {text.strip(): 1.0}
    mix = {}  # type: Dict[str, float]
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            if not name.strip():
                raise ValueError
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ValueError("mix takes NAME=WEIGHT[,NAME=WEIGHT...], got %r" % part.strip()) from None
    return mix


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle"), ap.add_argument("--model"), ap.add_argument("--base")
    ap.add_argument("--port", type=int, help="read commands from this localhost TCP port instead of stdin")
    ap.add_argument("--fps", type=float, default=30.0, help="frames per second the camera delivers")
    ap.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: until 'quit')")
    ap.add_argument("--print-every", type=int, default=0, metavar="N",
                    help="print every Nth frame's inference time (default: once a second, N = --fps; 1: every frame)")
    args = ap.parse_args(argv)
    if args.print_every < 0:
        ap.error("--print-every must be 0 (once a second) or positive, got %d" % args.print_every)

    from safetensors.numpy import load_file

    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.engines.onnxruntime import OnnxRuntimeEngine
    from tvswitch.runtime.rebuild import CpuRebuilder

    tmp = None
    if not args.bundle:
        tmp = tempfile.TemporaryDirectory()
        paths = build_demo(tmp.name)
        args.bundle, args.model, args.base = paths["bundle"], paths["model"], paths["base"]
    bundle = Bundle.open(args.bundle)
    base = load_file(args.base) if args.base else None
    rebuilder = CpuRebuilder(bundle, base)
    engine = OnnxRuntimeEngine(args.model, names=list(bundle.shared_specs))
    weights = engine.buffers()
    task = bundle.tasks[0]
    t0 = time.perf_counter()
    rebuilder.rebuild({task: 1.0}, weights)
    engine.publish()
    print("tasks: %s; serving %s (first rebuild %.2f ms)" % (", ".join(bundle.tasks), task,
                                                             (time.perf_counter() - t0) * 1e3), flush=True)
    commands, stop = command_source(args.port)
    try:
        return serve(bundle, rebuilder, engine, weights, task, commands, args)
    finally:
        stop()


def switch(cmd: str, bundle: Any, rebuilder: Any, engine: Any, weights: Dict[str, np.ndarray], task: str) -> str:
    """Carry out one command; returns the task now serving (the old one if the switch failed)."""
    if cmd == "tasks":
        print("tasks: " + ", ".join(bundle.tasks), flush=True)
    elif cmd.startswith(("task ", "mix ")):
        what = cmd.split(None, 1)[1]
        try:
            t0 = time.perf_counter()
            rebuilder.rebuild(parse_mix(what), weights)  # a bad mix raises before any write
            engine.publish()
            print("switch to %s: %.2f ms" % (what, (time.perf_counter() - t0) * 1e3), flush=True)
            return what
        except Exception as exc:  # noqa: BLE001 - keep serving the previous task
            print("switch refused (%s); still serving %s" % (exc, task), flush=True)
    elif cmd:
        print("commands: task NAME | mix A=0.5,B=0.5 | tasks | quit", flush=True)
    return task


def serve(bundle: Any, rebuilder: Any, engine: Any, weights: Dict[str, np.ndarray], task: str,
          commands: "queue.Queue[str]", args: argparse.Namespace) -> int:
    """Serve frames, between frames carrying out every command that has arrived."""
    period = 1.0 / args.fps if args.fps > 0 else 0.0
    every = args.print_every or max(1, int(round(args.fps)))
    since = []  # type: List[float]
    for n, frame in enumerate(camera(), 1):
        while not commands.empty():
            cmd = commands.get_nowait()
            if cmd == "quit":
                return 0
            task = switch(cmd, bundle, rebuilder, engine, weights, task)
        t0 = time.perf_counter()
        logits = engine.infer({"frame": frame})["logits"]
        ms = (time.perf_counter() - t0) * 1e3
        since.append(ms)
        if n % every == 0:
            print("frame %d  task %-14s class %d  infer %.2f ms (mean of last %d: %.2f ms)"
                  % (n, task, int(np.argmax(logits)), ms, len(since), sum(since) / len(since)), flush=True)
            since = []
        if args.frames and n >= args.frames:
            return 0
        time.sleep(period)
    return 0

if __name__ == "__main__":
    sys.exit(main())
