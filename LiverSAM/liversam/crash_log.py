"""Where an unexpected error's details go: a log file the user can attach to a bug report.

The command line never shows a traceback: :func:`write_crash_log` writes it (with the command line, the
versions and the platform) to ``$LIVERSAM_HOME/logs`` (default ``~/.liversam/logs``), or to the system
temporary folder when that is not writable, and returns the file's path for a one-line message.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path


def log_folders() -> list[Path]:
    home = Path(os.environ.get("LIVERSAM_HOME", Path.home() / ".liversam"))
    return [home / "logs", Path(tempfile.gettempdir()) / "liversam-logs"]


def write_crash_log(exc: BaseException, argv: list[str] | None = None) -> Path | None:
    """Write ``exc``'s traceback and context to a new log file; its path, or None if nothing is writable."""
    from . import __version__

    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = "".join(
        [
            f"liversam {__version__} crash report, {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n",
            f"command: liversam {' '.join(argv if argv is not None else sys.argv[1:])}\n",
            f"python {sys.version.split()[0]} on {platform.platform()}\n\n",
            *traceback.format_exception(type(exc), exc, exc.__traceback__),
        ]
    )
    for folder in log_folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None
