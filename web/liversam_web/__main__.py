"""``python -m liversam_web``: start the LiverSAM web app (and, by default, a local ``liversam serve``).

Prints ``LiverSAM web app: http://HOST:PORT/`` once the page can be opened. See docs/WEB.md.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import socket
import sys
from pathlib import Path

# Views render off screen; with no display VTK must use EGL (Mesa's software renderer when there is no GPU).
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

from .server_client import REPO_ROOT, AuthError, LiverSAMClient, LocalServerProcess, ServerUnavailable  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    # the docstring's first line without its reST markup: `liversam web --help` prints it as it is
    parser = argparse.ArgumentParser(prog="liversam web", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--host", default="127.0.0.1", help="address of the page (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port of the page (default 0: a free port)")
    parser.add_argument("--server-url", help="use this running `liversam serve` (e.g. http://gpu-box:8123) "
                        "instead of starting one")
    parser.add_argument("--token", help="token of --server-url (or LIVERSAM_TOKEN)")
    parser.add_argument("--token-file", help="file holding the token of --server-url")
    parser.add_argument("--server-python", default=os.environ.get("LIVERSAM_SERVER_PYTHON"),
                        help="Python with the liversam package, to start the local server "
                        "(default: $LIVERSAM_SERVER_PYTHON, else ~/.cache/liversam/venv/bin/python)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra `liversam serve` option for the local server (repeatable), e.g. "
                        "--server-arg=--device=cpu")
    parser.add_argument("--ct", help="path to put in the page's CT field (e.g. examples/lits117/ct.nii.gz)")
    return parser


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def connect(args: argparse.Namespace) -> tuple[LiverSAMClient, LocalServerProcess | None, str]:
    """A client of the given server, or of a local one started here (stopped when this process ends)."""
    if args.server_url:
        token = args.token or os.environ.get("LIVERSAM_TOKEN")
        if args.token_file:
            token = Path(args.token_file).read_text(encoding="utf-8").split()[0]
        client = LiverSAMClient(args.server_url, token)
        client.info()  # fails now (unreachable, wrong token) rather than at the first click
        return client, None, f"server {args.server_url}"
    python = args.server_python or str(Path.home() / ".cache/liversam/venv/bin/python")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "LiverSAM"), env.get("PYTHONPATH")]))
    env.pop("VTK_DEFAULT_OPENGL_WINDOW", None)
    process = LocalServerProcess(python=python, extra_args=args.server_arg, env=env, startup_timeout=120.0)
    client = process.start()
    atexit.register(process.stop)
    return client, process, f"local server {process.url}"


def _exit_on_sigterm(signum: int, _frame) -> None:
    """SIGTERM before the app runs (the local server starting, VTK loading): unwind, so that the server's start-up
    or the exit handler stops the server and removes its token folder (the default action left both)."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # replaced by `stop` below once the app runs
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("liversam_web").setLevel(
        logging.DEBUG if os.environ.get("LIVERSAM_WEB_TRACE") == "1" else logging.INFO  # every mouse prompt, traced
    )
    try:
        client, process, label = connect(args)
    except AuthError as exc:
        print(f"liversam web: error: {exc}. Pass the server's token with --token or --token-file.", file=sys.stderr)
        return 2
    except (ServerUnavailable, OSError) as exc:
        print(f"liversam web: error: {exc}", file=sys.stderr)
        return 2

    from .app import LiverSAMWebApp  # imports VTK / slicer-core: after the server check

    if os.environ.get("LIVERSAM_WEB_TRACE") == "1":
        from .interaction_trace import trace_clients, trace_interaction_events

        trace_interaction_events()
    app = LiverSAMWebApp(client, server_label=label)
    if os.environ.get("LIVERSAM_WEB_TRACE") == "1":
        trace_clients(app.ctrl)
    if args.ct:
        app.state.ct_path = args.ct
    port = args.port or free_port(args.host)

    def stop(*_args) -> None:
        if process is not None:
            process.stop()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    sys.argv = sys.argv[:1]  # trame parses the command line too

    def announce(**_kwargs) -> None:  # once the page can be opened
        print(f"LiverSAM web app: http://{args.host}:{port}/  ({label})", flush=True)

    app.ctrl.on_server_ready.add(announce)
    try:
        app.server.start(host=args.host, port=port, open_browser=False, show_connection_info=False, timeout=0)
    finally:
        if process is not None:
            process.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
