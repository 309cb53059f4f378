"""The ``hesse`` command line: thin shells, one subcommand per public function.

Each subcommand module exposes ``add_parser(subparsers)`` (registering the subcommand and
setting ``func``); options, user-module loading and the output folder are shared in
:mod:`hesse.cli._common`. User mistakes exit with code 2 and a one-line message, never a
traceback; Ctrl-C exits 130 after saving what was finished.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__
from ._common import UsageError

__all__ = ["SUBCOMMANDS", "UsageError", "build_parser", "main"]

# subcommand name -> module providing add_parser(subparsers)
SUBCOMMANDS = {
    "analyze": "hesse.cli.analyze",
    "compress": "hesse.cli.compress",
    "track": "hesse.cli.track",
    "plot": "hesse.cli.plot",
    "compare": "hesse.cli.plot",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hesse",
        description="Curvature of PyTorch models: Hessian spectra, sharpness, compression.",
    )
    parser.add_argument("--version", action="version", version=f"hesse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
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
