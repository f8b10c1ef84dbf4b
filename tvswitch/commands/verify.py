"""tvswitch verify: checksums, schema, and (given a base) the base fingerprint."""
from __future__ import annotations

import argparse

from tvswitch.commands._common import load_base, parse_task_args, print_json

NAME = "verify"
HELP = "check a bundle's checksums, and that it belongs to a base checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--base", help="the base checkpoint the bundle must have been exported against")
    p.add_argument("--against", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="also rebuild task NAME and report its error against its fine-tuned checkpoint, per tensor "
                   "and overall, relative to the task vector's norm; repeatable")
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
    against = parse_task_args(args.against, "--against")
    if against:
        from tvswitch.export.fidelity import rebuild_error

        result["against"] = [rebuild_error(bundle, task, path, base) for task, path in against.items()]
    if args.json:
        print_json(result)
        return 0
    print("ok: %s (%d tasks, %d payloads verified%s)" % (
        args.bundle, len(bundle.tasks), result["payloads_checked"],
        ", base fingerprint matches" if base is not None else ""))
    for r in result.get("against", []):
        worst = sorted(r["tensors"].items(), key=lambda kv: -kv[1]["relative"])[:3]
        print("task %s against %s: rebuild error %.4f of the task vector's norm overall; largest %s%s" % (
            r["task"], r["checkpoint"], r["relative"],
            ", ".join("%s %.4f" % (n, v["relative"]) for n, v in worst),
            "; heads %s" % ", ".join("%s %.1e" % kv for kv in r["heads"].items()) if r["heads"] else ""))
    return 0
