"""tvswitch remove-task: drop one task and the payloads only it used."""
from __future__ import annotations

import argparse

NAME = "remove-task"
HELP = "remove a task from a bundle"
DESCRIPTION = ("remove a task from a bundle; the other tasks are carried over bit for bit (RTVQ's shared "
               "base stays as exported, so they rebuild exactly as before)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("task", metavar="NAME")
    p.add_argument("-o", "--output", help="write here instead of replacing BUNDLE")


def run(args: argparse.Namespace) -> int:
    from tvswitch.commands._inputs import check_output_path
    from tvswitch.export.edit import remove_task

    check_output_path(args.output or args.bundle, "-o" if args.output else "BUNDLE",
                      inputs=[args.bundle] if args.output else [])
    bundle = remove_task(args.bundle, args.task, args.output)
    print("wrote %s: %d tasks" % (args.output or args.bundle, len(bundle.tasks)))
    return 0
