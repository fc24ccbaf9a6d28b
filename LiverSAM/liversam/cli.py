"""The ``liversam`` command line: ``liversam <command> ...``.

Each command lives in ``liversam.commands.<name>`` with ``add_parser(subparsers)`` and ``run(args) -> int``.

Exit codes: 0 success; 2 a problem the user can fix (:class:`LiverSAMError`: bad CT, prompts, output path,
model; also command-line usage errors), printed as one clear message; 3 an unexpected internal error: a
one-line message and the path of a log file holding the traceback (never a traceback on the terminal);
130 interrupted (Ctrl+C). Outputs are written atomically, so a failed or interrupted run leaves them as
they were.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import Cancelled, LiverSAMError
from .progress import close_open_bars
from .progress import configure as configure_progress

COMMAND_MODULES = ("segment", "evaluate", "train", "export", "benchmark", "serve", "web")
QUIET_HELP = "no progress display and only warnings and errors in the log (results are still printed)"

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liversam",
        description="Liver and liver-tumour segmentation in CT with Segment Anything models.",
        epilog="Exit codes: 0 success, 2 bad input or usage (message says what to fix), "
        "3 internal error (details in the log file named), 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"liversam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"liversam.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"liversam.commands.{name}":
                continue  # command not part of this build
            raise
        module.add_parser(subparsers)
    for sub in subparsers.choices.values():  # `liversam COMMAND ... --quiet` works too
        if "-" not in sub.prefix_chars:
            continue  # `web` hands every argument to the web app
        sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return parser


def _internal_error(command: str, exc: BaseException, argv: list[str] | None) -> int:
    from .crash_log import write_crash_log

    log_path = write_crash_log(exc, argv)
    what = "ran out of memory" if isinstance(exc, MemoryError) else f"failed unexpectedly ({type(exc).__name__}"
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    if not isinstance(exc, MemoryError):
        what += f": {detail})" if detail else ")"
    where = f"Details were written to {log_path}" if log_path else "No log file could be written"
    print(
        f"liversam {command}: internal error: {what}. {where}; please include that file when you report it. "
        "No output was changed.",
        file=sys.stderr,
    )
    return EXIT_INTERNAL_ERROR


#: What Ctrl-C leaves behind, per command: outputs are written atomically, a run folder keeps its finished epochs.
INTERRUPTED_DEFAULT = "interrupted; no output was changed."
INTERRUPTED = {
    "serve": "stopped.",
    "web": "stopped.",
    "train": "interrupted; the run folder keeps its last finished epoch (and the caches of the studies already "
    "encoded): run the same command again to resume.",
}


def main(argv: list[str] | None = None) -> int:
    command = "?"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command
        configure_progress(quiet=args.quiet)
        level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        return int(args.run(args) or 0)
    except LiverSAMError as exc:
        close_open_bars("stopped")  # before the message, never redrawn after it
        print(f"liversam {command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (KeyboardInterrupt, Cancelled):
        close_open_bars("interrupted")
        print(f"liversam {command}: {INTERRUPTED.get(command, INTERRUPTED_DEFAULT)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise  # argparse: --help, --version, usage errors (exit 2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence (MemoryError too): never a traceback
        close_open_bars("stopped")
        return _internal_error(command, exc, argv)


if __name__ == "__main__":
    sys.exit(main())
