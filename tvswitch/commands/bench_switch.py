"""tvswitch bench-switch: how long a task switch takes on an engine (rebuild + engine update)."""
from __future__ import annotations

import argparse
import time
from typing import Dict, Sequence

import numpy as np

from tvswitch.commands._common import print_json
from tvswitch.commands._inputs import parse_inputs
from tvswitch.commands.run import add_engine_arguments, open_server
from tvswitch.errors import TvswitchError

NAME = "bench-switch"
HELP = "print switch latency percentiles of a bundle on an engine"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--switches", type=int, default=50, help="timed switches (default 50), cycling through the tasks")
    p.add_argument("--input", action="append", default=[], metavar="[NAME=]X.npy",
                   help="an input array (bare X.npy for a one-input network, else NAME=X.npy per input). Needed by "
                   "torch (names forward's arguments) and tensorrt (the shapes its engine is built for); with "
                   "inputs, an inference after each switch is timed too")
    p.add_argument("--json", action="store_true")


def percentiles(seconds: Sequence[float]) -> Dict[str, float]:
    """Median, p90, p99 and max of ``seconds``, in milliseconds, and the count (shared with bench/).

    p99 of fewer than 100 samples is in effect the maximum: read ``n`` with it.
    """
    ms = 1e3 * np.asarray(seconds, dtype=np.float64)
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "n": int(ms.size)}


def run(args: argparse.Namespace) -> int:
    if args.switches < 1:
        raise TvswitchError("--switches must be at least 1, got %d" % args.switches)
    if args.engine == "tensorrt" and not args.input:
        raise TvswitchError("--engine tensorrt needs --input: TensorRT builds its engine for the inputs' shapes")
    inputs = parse_inputs(args.input) if args.input else {}
    server, inputs = open_server(args, inputs)
    tasks = server.source.tasks
    if len(tasks) > 1:  # the server starts on tasks[0]; cycling from tasks[1] makes every switch a rebuild
        mixes = [{tasks[(i + 1) % len(tasks)]: 1.0} for i in range(args.switches)]
    else:  # one task: alternate it with the base (weight 0)
        mixes = [{tasks[0]: float(i % 2)} for i in range(args.switches)]
    switch, infer = [], []
    for mix in mixes:
        start = time.perf_counter()
        server.switch(mix)
        switch.append(time.perf_counter() - start)
        if inputs:
            start = time.perf_counter()
            server.infer(inputs)
            infer.append(time.perf_counter() - start)
    result = {"engine": args.engine, "mode": server.mode, "tasks": len(tasks), "switch": percentiles(switch)}
    if infer:
        result["infer"] = percentiles(infer)
    if args.json:
        print_json(result)
        return 0
    print("%s engine (%s), %d tasks, %d switches" % (args.engine, server.mode, len(tasks), len(switch)))
    for what in ("switch", "infer"):
        if what in result:
            r = result[what]
            print("  %-6s median %.2f ms  p90 %.2f ms  p99 %.2f ms  max %.2f ms"
                  % (what, r["median_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"]))
    return 0
