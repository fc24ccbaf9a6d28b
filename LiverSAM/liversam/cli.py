"""The ``liversam`` command line: ``liversam <command> ...``.

Each command lives in ``liversam.commands.<name>`` with ``add_parser(subparsers)`` and ``run(args) -> int``.
Errors a user can fix (:class:`LiverSAMError`) are printed as one clear message with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import LiverSAMError

COMMAND_MODULES = ("segment", "evaluate", "train", "export", "benchmark", "serve", "web")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liversam",
        description="Liver and liver-tumour segmentation in CT with Segment Anything models.",
    )
    parser.add_argument("--version", action="version", version=f"liversam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"liversam.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"liversam.commands.{name}":
                continue  # command not part of this build
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args) or 0)
    except LiverSAMError as exc:
        print(f"liversam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"liversam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
