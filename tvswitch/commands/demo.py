"""tvswitch demo: the quick start's main job (pack, one graph, serve and switch every task) in one verb."""
from __future__ import annotations

import argparse

from tvswitch.commands._common import human_bytes
from tvswitch.commands._inputs import threads

NAME = "demo"
HELP = "write the built-in example, pack it, make one graph and serve: switch through every task on one engine"
DESCRIPTION = ("the quick start in one verb: the built-in example's checkpoints (heads of 3, 4 and 5 classes), "
               "one RTVQ bundle, one weight-stripped ONNX graph for all tasks, then one ONNX Runtime engine "
               "switched through every task, each answer checked against torch on the task's rebuilt weights and "
               "timed against a fresh engine from the task's own checkpoint. Needs the onnx and torch extras")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="FOLDER", help="where to write the example, the bundle and the graphs")
    p.add_argument("--rounds", type=int, default=5, help="cycles through the tasks; times are medians (default 5)")
    p.add_argument("--threads", type=threads, default=1, help="CPU threads for rebuild and inference (default 1)")


def run(args: argparse.Namespace) -> int:
    from tvswitch.export.demo import run_demo

    report = run_demo(args.folder, rounds=args.rounds, threads=args.threads)
    print("bundle %s (%s) and graph %s (%s, no weights) replace %d fine-tuned checkpoints (%s)"
          % (report.bundle, human_bytes(report.bundle_bytes), report.graph, human_bytes(report.graph_bytes),
             len(report.rows), human_bytes(report.checkpoint_bytes)))
    print("one ONNX Runtime engine, medians of %d switches per task:" % args.rounds)
    print("  %-7s %10s %14s %22s %8s  %s" % ("task", "switch", "first answer", "naive: fresh engine", "speedup",
                                            "answer to input 0 (vs torch on the rebuilt weights)"))
    for r in report.rows:
        print("  %-7s %7.2f ms %11.2f ms %19.2f ms %7.1fx  %d classes %s (max diff %.1e)"
              % (r.task, r.switch_ms, r.first_answer_ms, r.naive_ms, r.naive_ms / r.first_answer_ms,
                 r.output.shape[1], "[" + " ".join("%+.3f" % v for v in r.output[0]) + "]", r.torch_error))
    print("the same steps one by one: tvswitch example, export, export-onnx --bundle, run (README.md)")
    return 0
