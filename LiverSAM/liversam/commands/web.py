"""``liversam web``: start the LiverSAM web app (a trame-slicer page on ``liversam serve``) and print its address.

The app runs in its own environment (trame-slicer needs slicer-core 5.11): ``$LIVERSAM_WEB_VENV`` (default
``~/.cache/liversam/web-venv``, made by ``bash setup.sh``). This command only launches it with this Python as
the local server's interpreter; every option after ``web`` goes to the app (``liversam web --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import LiverSAMError

REPO_ROOT = Path(__file__).resolve().parents[3]

# Signal received by `liversam web` -> signal passed on to the app. SIGHUP becomes SIGTERM: the app stops its
# `liversam serve` child on SIGTERM and SIGINT, but SIGHUP's default action would end it and orphan the server.
FORWARDED_SIGNALS = {
    getattr(signal, name): getattr(signal, target)
    for name, target in (("SIGTERM", "SIGTERM"), ("SIGINT", "SIGINT"), ("SIGHUP", "SIGTERM"))
    if hasattr(signal, name)
}


def web_python() -> Path:
    venv = Path(os.environ.get("LIVERSAM_WEB_VENV", Path.home() / ".cache/liversam/web-venv"))
    return venv / "bin" / "python"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("web", help="start the web app (browser front end) and print its address",
                              description=__doc__, add_help=False, prefix_chars="\x00")
    # every argument (options included) belongs to the web app, which has its own --help
    p.add_argument("app_args", nargs="*", help="options of the web app (see `liversam web --help`)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    python = web_python()
    app_dir = REPO_ROOT / "web"
    if not (app_dir / "liversam_web").is_dir():
        raise LiverSAMError(f"The web app is not in this installation ({app_dir} is missing); run `liversam web` "
                            "from a LiverSAM checkout.")
    if not python.is_file():
        raise LiverSAMError(f"The web app's environment {python.parent.parent} does not exist. Run `bash setup.sh` "
                            "in the LiverSAM checkout (or set LIVERSAM_WEB_VENV).")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(app_dir), env.get("PYTHONPATH")]))
    env.setdefault("LIVERSAM_SERVER_PYTHON", sys.executable)
    command = [str(python), "-m", "liversam_web", *args.app_args]
    return run_app(command, env)


def run_app(command: list[str], env: dict[str, str]) -> int:
    """Run the app until it ends; a signal sent to this process goes to the app, which then stops its server."""
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as exc:
        raise LiverSAMError(f"cannot start the web app with '{command[0]}': {exc}") from None
    with forward_signals(child):
        try:
            returncode = child.wait()
        except KeyboardInterrupt:  # only when the handlers could not be installed (not the main thread)
            child.send_signal(signal.SIGINT)
            returncode = child.wait()
    # a shell reports "killed by signal N" as 128 + N; a negative code would wrap to 256 - N
    return 128 - returncode if returncode < 0 else returncode


@contextlib.contextmanager
def forward_signals(child: subprocess.Popen) -> Iterator[None]:
    """Pass SIGTERM/SIGINT/SIGHUP on to ``child`` instead of dying and leaving it (and its server) running."""
    def forward(signum: int, _frame) -> None:
        if child.poll() is None:
            child.send_signal(FORWARDED_SIGNALS[signum])

    previous = {}
    try:
        for signum in FORWARDED_SIGNALS:
            previous[signum] = signal.signal(signum, forward)
    except ValueError:  # signal handlers can only be set in the main thread
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
