"""The ``hesse`` command line: one subcommand calls one public function.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` (which registers
the subcommand and sets ``func``) so that this file only wires them together. User mistakes
exit with code 2 and a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

# subcommand name -> module providing add_parser(subparsers)
SUBCOMMANDS = {
    "analyze": "hesse.report.analyze",
    "compress": "hesse.compress.cli",
}


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hesse",
        description="Curvature of PyTorch models: Hessian spectra, sharpness, compression.",
    )
    parser.add_argument("--version", action="version", version=f"hesse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"hesse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # solvers run with checkpoint= re-raise Ctrl-C with how to resume: show it
        hint = f" {e}" if str(e) else ""
        print(f"hesse {args.command}: interrupted.{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
