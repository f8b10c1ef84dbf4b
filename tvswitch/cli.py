"""The ``tvswitch`` command: a thin layer over the public API.

Each verb is a module of ``tvswitch.commands`` with ``NAME``, ``HELP`` (one line; an
optional longer ``DESCRIPTION`` for its own --help), ``add_arguments(parser)`` and
``run(args) -> int``; they are found by listing that package, so adding a verb touches
nothing here. Bad input (``TvswitchError``) becomes
one line on stderr and exit code 2, never a traceback; so does an ``OSError`` that no
check caught first (a file system that refuses a write is the user's environment, not a
bug in tvswitch).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from typing import List, NoReturn, Optional

from tvswitch import __version__, commands
from tvswitch.errors import TvswitchError, missing_extra


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as every other bad input is reported: one line, exit 2.

    argparse's own error() prints the whole usage first; a script reading stderr, or a
    user on a small screen, wants the one line that names the flag.  Subparsers take
    this class from their parent.
    """

    def error(self, message: str) -> "NoReturn":
        self.exit(2, "%s: error: %s (see %s --help)\n" % (self.prog, message, self.prog))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tvswitch",
        description="Many fine-tuned variants of one network, stored once as packed task vectors "
                    "and switched in milliseconds.")
    parser.add_argument("--version", action="version", version="tvswitch " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(commands.__name__ + "." + info.name)
        p = sub.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


class _Messages(logging.Handler):
    """The library's log lines as the CLI prints them: ``tvswitch VERB: note: ...`` (the
    exporter's notes: names it mapped, tensors it handled without refusal) and
    ``tvswitch VERB: warning: ...`` (anything at WARNING), one line each, on stderr."""

    def __init__(self, verb: str) -> None:
        super().__init__(logging.INFO)
        self.verb = verb

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("tvswitch.export")

    def emit(self, record: logging.LogRecord) -> None:
        kind = "note" if record.levelno < logging.WARNING else "warning"
        print("tvswitch %s: %s: %s" % (self.verb, kind, record.getMessage()), file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logger = logging.getLogger("tvswitch")
    handler, level = _Messages(args.command), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return _run(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args._run(args) or 0)
    except TvswitchError as exc:
        print("tvswitch %s: error: %s" % (args.command, exc), file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional part (torch for export-onnx, onnxruntime for run)
        message = missing_extra(exc)
        if message is None:
            raise
        print("tvswitch %s: error: %s" % (args.command, message), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvswitch %s: interrupted" % args.command, file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tvswitch inspect B | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the user's file system said no (a folder, permissions, a full disk)
        print("tvswitch %s: error: %s" % (args.command, _os_error(exc)), file=sys.stderr)
        return 2


def _os_error(exc: OSError) -> str:
    """One line naming the file and the reason, whatever the OSError carries."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return reason
    names = [str(exc.filename)] + ([str(exc.filename2)] if exc.filename2 else [])
    return "%s: %s" % (" -> ".join(names), reason)


if __name__ == "__main__":
    sys.exit(main())
