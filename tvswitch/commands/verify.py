"""tvswitch verify: checksums, schema, and (given a base) the base fingerprint."""
from __future__ import annotations

import argparse

from tvswitch.commands._common import load_base, print_json

NAME = "verify"
HELP = "check a bundle's checksums, and that it belongs to a base checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--base", help="the base checkpoint the bundle must have been exported against")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from tvswitch.runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle, verify=True)
    base = load_base(args.base)
    if base is not None:
        bundle.check_base(base, args.base)
    elif bundle.has_embedded_base:
        bundle.embedded_base()  # reads and CRC-checks the embedded weights
    result = {"bundle": args.bundle, "ok": True, "tasks": bundle.tasks,
              "payloads_checked": len(bundle.manifest["payloads"]),
              "base_checked": args.base is not None}
    if args.json:
        print_json(result)
    else:
        print("ok: %s (%d tasks, %d payloads verified%s)" % (
            args.bundle, len(bundle.tasks), result["payloads_checked"],
            ", base fingerprint matches" if base is not None else ""))
    return 0
