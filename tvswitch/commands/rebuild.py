"""tvswitch rebuild: the full weights of one task or a mix, as a safetensors file."""
from __future__ import annotations

import argparse
import time

from tvswitch.commands._common import OUTPUT_DTYPES, cast_floats, load_base, output_dtype, print_json
from tvswitch.commands._inputs import check_output_path, threads

NAME = "rebuild"
HELP = "write the full weights of a task or a mix of tasks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="one task")
    which.add_argument("--mix", metavar="NAME=W,NAME=W", help="a weighted mix: base + sum_i w_i tau_i")
    which.add_argument("--arithmetic", type=float, metavar="LAMBDA",
                       help="task arithmetic: every task at weight LAMBDA")
    p.add_argument("--base", help="base checkpoint (needed unless the bundle embeds it)")
    p.add_argument("--dtype", choices=OUTPUT_DTYPES,
                   help="output dtype of the floating tensors (default: the base's as read; a bfloat16 file is "
                        "read as float32)")
    p.add_argument("--threads", type=threads, default=0, help="CPU threads (default 0: all)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (one shows over the tensors when a rebuild takes over half a second)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")


def run(args: argparse.Namespace) -> int:
    from tvswitch.export.merge import whole_model
    from tvswitch.runtime.bundle import Bundle
    from tvswitch.runtime.checkpoint import write_safetensors
    from tvswitch.runtime.mix import check_mix, head_task, parse_mix, task_arithmetic
    from tvswitch.runtime.rebuild import CpuRebuilder

    check_output_path(args.output, "-o", inputs=[args.bundle, args.base])
    dtype = output_dtype(args.dtype)
    bundle = Bundle.open(args.bundle)
    if args.task is not None:
        mix = {args.task: 1.0}
    elif args.mix is not None:
        mix = parse_mix(args.mix)
    else:
        mix = task_arithmetic(bundle.tasks, args.arithmetic)
    base = load_base(args.base, bundle)
    rebuilder = CpuRebuilder(bundle, base, threads=args.threads, base_label=args.base or "the base")
    out = rebuilder.allocate(dtype)
    rebuilder.mix_tables(mix)  # refuses a bad mix before any work
    start = time.perf_counter()
    rebuilder.rebuild(mix, out, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    head = head_task(check_mix(mix, bundle.tasks, bundle.path))  # as a server answers the mix
    tensors = cast_floats(whole_model(bundle, dict(out), base, head).tensors, dtype)
    write_safetensors(args.output, tensors, {"tvswitch.mix": repr(sorted(mix.items()))})
    result = {"output": args.output, "mix": mix, "tensors": len(tensors), "head_of": head, "rebuild_seconds": seconds}
    if args.json:
        print_json(result)
    else:
        note = "" if args.task is not None or not bundle.task_specific(head) else \
            " (task-specific tensors such as heads from task %r, the mix's heaviest, as a server answers it)" % head
        print("wrote %s: %d tensors, rebuilt in %.1f ms%s" % (args.output, len(tensors), 1e3 * seconds, note))
    return 0
