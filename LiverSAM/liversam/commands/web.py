"""``liversam web``: start the LiverSAM web app (a trame-slicer page on ``liversam serve``) and print its address.

The app runs in its own environment (trame-slicer needs slicer-core 5.11): ``$LIVERSAM_WEB_VENV`` (default
``~/.cache/liversam/web-venv``, made by ``bash setup.sh``). This command only launches it with this Python as
the local server's interpreter; every option after ``web`` goes to the app (``liversam web --help``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..errors import LiverSAMError

REPO_ROOT = Path(__file__).resolve().parents[3]


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
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130
