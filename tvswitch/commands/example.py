"""tvswitch example: write the small built-in example checkpoints for the quick start."""
from __future__ import annotations

import argparse

NAME = "example"
HELP = "write a small base checkpoint, three fine-tuned ones and an input to try tvswitch on"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from tvswitch.export.example import make_example

    import os

    for path in make_example(args.folder, args.seed) + [os.path.join(args.folder, "ids.npy")]:
        print(path)
    return 0
