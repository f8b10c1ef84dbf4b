"""tvswitch export: checkpoints -> one packed bundle."""
from __future__ import annotations

import argparse

from tvswitch.commands._common import human_bytes, parse_task_args, plural, print_json, times_smaller
from tvswitch.commands._inputs import check_output_path
from tvswitch.errors import TvswitchError
from tvswitch.export.exporter import MAX_RELATIVE_NORM
from tvswitch.runtime.bundle.manifest import SCHEMES

NAME = "export"
HELP = "pack the task vectors of fine-tuned checkpoints into a bundle"

#: The scheme settings and their flags: a flag the chosen scheme does not read is refused,
#: not silently ignored (``--keep`` with tvq would otherwise look like it did something).
FLAGS = {"bits": "--bits", "granularity": "--granularity", "base_bits": "--base-bits",
         "offset_bits": "--offset-bits", "budget_bits": "--budget-bits", "keep": "--keep",
         "layout": "--layout"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True,
                   help="pretrained checkpoint: a safetensors or torch state_dict file, a shard index, or a "
                   "save_pretrained folder")
    p.add_argument("--task", action="append", required=True, metavar="NAME=PATH",
                   help="a fine-tuned checkpoint (as --base takes them) or a PEFT LoRA adapter folder; repeat per "
                   "task. Names that differ from the base's by a prefix (bert., model., base_model.model.) are "
                   "mapped, with a note")
    p.add_argument("--strict", action="store_true",
                   help="refuse a task vector far larger than a fine-tune's (norm above %g of the base's) instead of "
                   "warning" % MAX_RELATIVE_NORM)
    p.add_argument("--scheme", choices=list(SCHEMES), default="tvq",
                   help="tvq (default), rtvq, tswitch, fq (baseline), or emr (EMR-Merging: unified "
                        "vector at --bits, per-task masks and rescalers)")
    p.add_argument("--bits", type=int, help="fq/tvq/emr: code width, 1..8 (default 4)")
    p.add_argument("--granularity", help="fq/tvq/rtvq/emr: tensor | channel | group:G (default tensor)")
    p.add_argument("--base-bits", type=int, help="rtvq: width of the shared base vector (default 3)")
    p.add_argument("--offset-bits", type=int, help="rtvq: width of the per-task offsets (default 2)")
    p.add_argument("--budget-bits", type=float,
                   help="tvq/rtvq: choose per-tensor widths so that the task vectors' stored bits (codes, "
                        "the (scale, offset) pairs of every group, RTVQ's shared base split over the tasks) "
                        "average at most X per weight, each width priced in the --layout it is written "
                        "in; tensors stored as-is (norm statistics, --task-specific, heads) and the file "
                        "header are outside it")
    p.add_argument("--keep", type=float, help="tswitch: share of entries kept (default 0.3)")
    p.add_argument("--layout", choices=["auto", "streams", "compact"],
                   help="fq/tvq/rtvq/tswitch: how codes are held in memory. streams (b bits per weight; "
                        "T-Switch one ternary 2-bit code: dropped, -scale, +scale), compact (groups of four weights that hold "
                        "nothing of their own left out: below one bit per weight where most codes are "
                        "the zero point, TVQ-INT2, or few weights are kept, T-Switch at small --keep; "
                        "a switch decodes slower), or auto (default: compact for the tensors where it at "
                        "least halves the bits)")
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


def scheme_settings(args: argparse.Namespace) -> dict:
    """The scheme flags given, refusing one the chosen scheme does not read."""
    reads = SCHEMES[args.scheme]
    given = {field: getattr(args, field) for field in FLAGS if getattr(args, field) is not None}
    for field in given:
        if field not in reads:
            raise TvswitchError("%s does not apply to --scheme %s (it reads %s)"
                                % (FLAGS[field], args.scheme, ", ".join(FLAGS[f] for f in reads)))
    return given


def run(args: argparse.Namespace) -> int:
    from tvswitch.export.exporter import export_bundle
    from tvswitch.runtime.stats import bundle_stats

    settings = scheme_settings(args)
    tasks = parse_task_args(args.task)
    check_output_path(args.output, "-o", inputs=[args.base] + list(tasks.values()))
    bundle = export_bundle(
        args.base, tasks, args.output, name=args.scheme, task_specific=list(args.task_specific),
        raw_dtype=args.raw_dtype, include_base=args.include_base, entropy=args.entropy,
        progress=not args.no_progress, strict=args.strict, **settings)
    stats = bundle_stats(bundle)
    if args.json:
        print_json(stats)
    else:
        budget = ("; %.3f in the codes --budget-bits holds to" % stats["budget_bits_per_weight"]
                  if args.budget_bits is not None else "")
        print("wrote %s: %s, scheme %s, %s, %.3f bits per task-vector weight (%.3f per weight that changed%s), "
              "%s than FP16 checkpoints; %s than FP32 ones with the base counted"
              % (args.output, plural(len(bundle.tasks), "task"), args.scheme, human_bytes(stats["file_bytes"]),
                 stats["bits_per_task_vector_weight"], stats["bits_per_changed_weight"], budget,
                 times_smaller(stats["ratio_to_fp16_checkpoints"]),
                 times_smaller(stats["ratio_with_base_to_fp32_checkpoints"])))
    return 0
