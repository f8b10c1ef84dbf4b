"""tvswitch add-task: one more task in an existing bundle, others carried over byte for byte."""
from __future__ import annotations

import argparse

NAME = "add-task"
HELP = "add a fine-tuned checkpoint to a bundle as a new task"
DESCRIPTION = ("add a fine-tuned checkpoint to a bundle as a new task; the other tasks are carried over "
               "bit for bit. RTVQ keeps its shared base (the mean of the tasks exported), so the added "
               "task's error is about T/(T-1) that of a fresh export (x1.15 for the 8th task); re-export "
               "from the checkpoints to re-centre it")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("task", metavar="NAME=PATH")
    p.add_argument("--base", help="base checkpoint (needed unless the bundle embeds it)")
    p.add_argument("-o", "--output", help="write here instead of replacing BUNDLE")


def run(args: argparse.Namespace) -> int:
    from tvswitch.commands._common import parse_task_args
    from tvswitch.commands._inputs import check_output_path
    from tvswitch.export.edit import add_task

    (name, path), = parse_task_args([args.task], "the task argument").items()
    check_output_path(args.output or args.bundle, "-o" if args.output else "BUNDLE",
                      inputs=[path, args.base] + ([args.bundle] if args.output else []))
    bundle = add_task(args.bundle, name, path, args.base, args.output)
    print("wrote %s: %d tasks" % (args.output or args.bundle, len(bundle.tasks)))
    return 0
