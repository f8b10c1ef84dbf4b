"""tvswitch inspect: what a bundle holds and what it costs."""
from __future__ import annotations

import argparse

from tvswitch.commands._common import human_bytes, print_json, times_smaller

COMMON = ("raw_dtype", "task_specific", "entropy")

NAME = "inspect"
HELP = "show a bundle's tasks, schemes, per-tensor widths and sizes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.bundle.manifest import SCHEMES
    from tvswitch.runtime.stats import bundle_stats

    stats = bundle_stats(Bundle.open(args.bundle))
    if args.json:
        print_json(stats)
        return 0
    scheme = dict(stats["scheme"])
    shown = ("name",) + SCHEMES.get(scheme.get("name"), tuple(scheme)) + COMMON
    print("bundle   %s" % stats["path"])
    print("scheme   %s" % ", ".join("%s=%s" % (k, scheme[k]) for k in shown if scheme.get(k) not in ([], None)))
    print("tasks    %d: %s" % (len(stats["tasks"]), ", ".join(stats["tasks"])))
    print("base     %s%s" % (stats["base_fingerprint"][:23] + "...",
                              " (embedded, %s)" % human_bytes(stats["base_embedded_bytes"])
                              if stats["base_embedded_bytes"] else " (not embedded)"))
    print("size     %s on disk, %s of task data; %.3f bits per task-vector weight"
          % (human_bytes(stats["file_bytes"]), human_bytes(stats["task_bytes_on_disk"]),
             stats["bits_per_task_vector_weight"]))
    print("changed  %d of %d task-vector weights (over all tasks) changed: %.3f bits per changed weight"
          % (stats["changed_weights"], stats["shared_params"] * len(stats["tasks"]), stats["bits_per_changed_weight"]))
    if "budget_bits" in scheme:
        print("budget   %.3f bits per weight and task in the task vectors' codes (what --budget-bits %g holds to); "
              "%.3f over everything in the file" % (stats["budget_bits_per_weight"], scheme["budget_bits"],
                                                   stats["bits_per_task_vector_weight"]))
    print("vs       %s than FP32 checkpoints (%s), %s than FP16 (%s)"
          % (times_smaller(stats["ratio_to_fp32_checkpoints"]), human_bytes(stats["fp32_checkpoints_bytes"]),
             times_smaller(stats["ratio_to_fp16_checkpoints"]), human_bytes(stats["fp16_checkpoints_bytes"])))
    print("with base %s: task data + the base (%s%s), %s than the FP32 checkpoints"
          % (human_bytes(stats["with_base_bytes"]), human_bytes(stats["base_bytes"]),
             ", embedded" if stats["base_embedded_bytes"] else " at its dtype, beside the bundle",
             times_smaller(stats["ratio_with_base_to_fp32_checkpoints"])))
    print("resident %s packed, %s query sets" % (human_bytes(stats["resident_packed_bytes"]),
                                                 human_bytes(stats["query_bytes"])))
    print("\n%-60s %-16s %s" % ("tensor", "shape", "stored as"))
    for name, t in stats["tensors"].items():
        print("%-60s %-16s %s" % (name, _shape(t["shape"]), t["stored"]))
    if stats["task_specific"]:
        print("\n%-60s %-16s %s" % ("task-specific tensor (stored as-is)", "shape", "task"))
        for task, per in stats["task_specific"].items():
            for name, t in per.items():
                print("%-60s %-16s %s (%s)" % (name, _shape(t["shape"]), task, t["dtype"]))
    return 0


def _shape(shape: list) -> str:
    return "x".join(map(str, shape)) or "scalar"
