"""tvswitch export: checkpoints -> one packed bundle."""
from __future__ import annotations

import argparse

from tvswitch.commands._common import human_bytes, parse_task_args, print_json

NAME = "export"
HELP = "pack the task vectors of fine-tuned checkpoints into a bundle"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="pretrained checkpoint (safetensors, or torch state_dict file)")
    p.add_argument("--task", action="append", required=True, metavar="NAME=PATH",
                   help="a fine-tuned checkpoint; repeat per task")
    p.add_argument("--scheme", choices=["fq", "tvq", "rtvq", "tswitch", "emr"], default="tvq",
                   help="tvq (default), rtvq, tswitch, fq (baseline), or emr (EMR-Merging: unified "
                        "vector at --bits, per-task masks and rescalers)")
    p.add_argument("--bits", type=int, default=4, help="code width of fq/tvq/emr (1..8; default 4)")
    p.add_argument("--granularity", default="tensor", help="tensor | channel | group:G (default tensor)")
    p.add_argument("--base-bits", type=int, default=3, help="rtvq: width of the shared base vector (default 3)")
    p.add_argument("--offset-bits", type=int, default=2, help="rtvq: width of the per-task offsets (default 2)")
    p.add_argument("--budget-bits", type=float, help="tvq/rtvq: choose per-tensor widths under this average "
                   "bits per task-vector weight")
    p.add_argument("--keep", type=float, default=0.3, help="tswitch: share of entries kept (default 0.3)")
    p.add_argument("--task-specific", action="append", default=[], metavar="PATTERN",
                   help="glob of tensors stored per task as-is (e.g. 'classifier.*'); repeatable")
    p.add_argument("--raw-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of tensors stored as-is (default float16)")
    p.add_argument("--include-base", choices=["float16", "float32"],
                   help="embed the base weights for a self-contained bundle")
    p.add_argument("--entropy", choices=["none", "zlib", "lzma"], default="none",
                   help="lossless coding of payloads on flash, decoded once at load (default none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the bundle's statistics as JSON")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE")


def run(args: argparse.Namespace) -> int:
    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.stats import bundle_stats

    bundle = export_bundle(
        args.base, parse_task_args(args.task), args.output,
        name=args.scheme, bits=args.bits, granularity=args.granularity, base_bits=args.base_bits,
        offset_bits=args.offset_bits, budget_bits=args.budget_bits, keep=args.keep,
        task_specific=list(args.task_specific), raw_dtype=args.raw_dtype,
        include_base=args.include_base, entropy=args.entropy, progress=not args.no_progress,
    )
    stats = bundle_stats(bundle)
    if args.json:
        print_json(stats)
    else:
        print("wrote %s: %d tasks, scheme %s, %s, %.3f bits per task-vector weight, %.1fx smaller than FP16 checkpoints"
              % (args.output, len(bundle.tasks), args.scheme, human_bytes(stats["file_bytes"]),
                 stats["bits_per_task_vector_weight"], stats["ratio_to_fp16_checkpoints"]))
    return 0
