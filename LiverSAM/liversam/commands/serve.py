"""``liversam serve``: run the LiverSAM server (see docs/SERVER.md and :mod:`liversam.server`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from ..atomic_write import describe_write_error
from ..errors import LiverSAMError, OutputError
from ..output_paths import folder_write_problem
from . import arg_types

#: The folder a starter (the Slicer module's and the web app's LocalServerProcess) makes for the token file; the server
#: removes it when empty as it deletes the token: a starter killed outright cannot (LOCAL_SERVER_FOLDER_PREFIX there).
STARTER_FOLDER_PREFIX = "liversam-server-"

#: Seconds a stopping server gives the requests in progress to finish before it cancels them and closes the sessions.
GRACEFUL_SHUTDOWN_S = 3.0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the LiverSAM server (model + embedding cache + sessions) for the Slicer module or a web app",
        description="Serve the LiverSAM core over HTTP. Binds 127.0.0.1 on a free port with a random token by "
        "default; every endpoint but /v1/health needs 'Authorization: Bearer <token>'.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    p.add_argument("--port", type=arg_types.port, default=0, help="port (default 0: a free port, printed at start)")
    p.add_argument("--token", action="append", default=[],
                   help="accept this token (repeatable: one per user; a session belongs to the token that opened it)")
    p.add_argument("--token-file", help="token file: if it exists, its tokens (one a line) are accepted; "
                   "otherwise a random token is written there (mode 0600)")
    p.add_argument("--model", default="litemedsam", help="model name, NAME=PATH or checkpoint (loaded on first use)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--accelerate", default="auto", choices=("auto", "plain", "openvino", "onnxruntime", "torch"),
                   help="CPU encoder backend (as in liversam segment)")
    p.add_argument("--max-sessions", type=arg_types.positive_int, default=4, help="open CTs held at once (least recently used goes)")
    p.add_argument("--max-voxels", type=arg_types.positive_int, default=512 * 512 * 1000, help="largest CT accepted, in voxels")
    p.add_argument("--idle-timeout", type=arg_types.positive, default=3600.0, help="close sessions idle this many seconds")
    p.add_argument("--cache-mb", type=arg_types.positive, default=1024.0, help="embedding cache per session, MB")
    p.add_argument("--session-memory-gb", type=arg_types.positive, default=None,
                   help="memory all sessions may hold together, GiB: CTs, embedding caches, masks, kept job results "
                        "(default: half of the machine's memory; a new CT evicts the least recently used idle "
                        "sessions to fit, or is refused with 503)")
    p.add_argument("--data-root", action="append", default=[],
                   help="folder CTs may be opened from by path (repeatable); without it only a loopback server "
                   "opens paths, anywhere its user can read")
    p.add_argument("--threads", type=arg_types.non_negative_int, default=0, help="CPU threads for torch (0 = torch default)")
    p.add_argument("--exit-with-stdin", action="store_true",
                   help="stop when standard input closes: for a server started by another program (the Slicer module) "
                        "with a pipe as its input, so that it ends with that program even when it crashes")
    p.set_defaults(run=run)


def resolve_tokens(args: argparse.Namespace) -> tuple[list[str], Path | None]:
    """(accepted tokens, the token file to write the new random token to, or None).

    ``--token`` values are accepted; an existing ``--token-file`` adds its tokens; a ``--token-file`` that does
    not exist yet (or, with neither option, the default file) receives a new random token. A host other
    than loopback needs an explicit token (``--token`` or an existing token file).
    """
    from ..server.config import is_loopback, new_token, read_tokens

    tokens = list(args.token)
    token_file = Path(args.token_file).expanduser() if args.token_file else None
    if token_file is not None and token_file.exists():
        return tokens + read_tokens(token_file), None
    if not is_loopback(args.host) and not tokens:
        raise LiverSAMError(
            f"liversam serve --host {args.host} is reachable from other machines: give an explicit token "
            "(--token TOKEN, or an existing --token-file FILE with one token a line) and share it with your users only."
        )
    if tokens and token_file is None:
        return tokens, None
    return [new_token(), *tokens], token_file or _default_token_file()


def _default_token_file() -> Path:
    from ..models.checkpoints import user_models_dir

    return user_models_dir().parent / "server-token"


def run(args: argparse.Namespace) -> int:
    from ..server.config import ServerConfig, write_token_file

    tokens, written = resolve_tokens(args)
    unsaved = None  # the default token file, when it cannot be written: the token is then only printed
    if written is not None and (problem := folder_write_problem(written.parent)) is not None:
        if args.token_file:  # asked for: the program that reads it would wait for it in vain
            raise OutputError(
                f"--token-file '{written}': {problem}; give a token file in a folder you can write to."
            )
        written, unsaved = None, written
        print(
            f"liversam serve: warning: the token file '{unsaved}' cannot be written ({problem}); the token is only "
            "printed below. Set LIVERSAM_HOME to a folder you can write to, or pass --token-file FILE.",
            file=sys.stderr, flush=True,
        )
    config = ServerConfig(
        tokens=tokens, host=args.host, model=args.model, device=args.device, accelerate=args.accelerate,
        max_sessions=args.max_sessions, max_voxels=args.max_voxels, idle_timeout_s=args.idle_timeout,
        cache_mb=args.cache_mb, data_roots=[Path(p) for p in args.data_root], threads=args.threads,
        session_memory_gb=args.session_memory_gb,
    )
    for root in config.data_roots:
        if not root.is_dir():
            raise LiverSAMError(f"--data-root '{root}' is not a folder.")
    import uvicorn  # after the checks above: a wrong option fails at once

    from ..server.app import create_app

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise LiverSAMError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}.") from exc
    port = sock.getsockname()[1]
    if written is not None:
        try:
            write_token_file(written, tokens[0])
        except OSError as exc:
            sock.close()
            raise OutputError(describe_write_error(written, exc)) from exc
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"liversam serve: listening on http://{host}:{port}", flush=True)
    if written is not None:
        if args.token_file:  # the caller asked for a file: the token stays out of logs
            print(f"liversam serve: token written to {written} (mode 0600)", flush=True)
        else:
            print(f"liversam serve: token {tokens[0]} (also in {written}, mode 0600)", flush=True)
    elif unsaved is not None:
        print(f"liversam serve: token {tokens[0]} (not saved: '{unsaved}' cannot be written)", flush=True)
    app = create_app(config)

    def forget_token() -> None:
        if written is not None:
            with contextlib.suppress(OSError):
                written.unlink()  # the token dies with the server
            if written.parent.name.startswith(STARTER_FOLDER_PREFIX):
                with contextlib.suppress(OSError):  # only when empty: never anything but the starter's own folder
                    written.parent.rmdir()

    # timeout_graceful_shutdown: when told to stop (SIGTERM, SIGINT, standard input closed), requests still open after
    # this many seconds are cancelled; without it uvicorn waits for them for ever (a client that stopped sending in the
    # middle of an upload) and only then closes the sessions, which is what cancels a running job
    server = _make_server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30,
                                          limit_concurrency=64, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S),
                          on_stop=forget_token)
    if args.exit_with_stdin:
        _stop_when_stdin_closes(server)
    try:
        server.run(sockets=[sock])
    finally:
        forget_token()
    return 0


def _make_server(config, on_stop: Callable[[], None]):
    """uvicorn's server, running ``on_stop`` once it has shut down, also when it was stopped by a signal: uvicorn then
    raises the signal again with its default action (SIGTERM ends the process at once, so a ``finally`` around
    ``run`` never runs, and the token file the docs promise to delete would stay)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    on_stop()

    return Server(config)


def _stop_when_stdin_closes(server) -> None:
    """Ask ``server`` (uvicorn's) to stop once standard input reaches its end. The program that started the server
    holds the pipe's other end; the operating system closes it when that program ends, a crash or a kill included
    (its own "stop at exit" does not run then), so the model and its memory are not left behind."""

    def wait_for_end() -> None:
        # os.read on the descriptor, not sys.stdin: a thread blocked in sys.stdin's read holds its buffer's lock, and a
        # process this one forks (OpenVINO's telemetry does, from a thread) closes sys.stdin as it starts
        # (multiprocessing) and waited for that lock for ever, keeping a copy of the server's memory
        with contextlib.suppress(OSError, ValueError):
            fd = sys.stdin.fileno()
            while os.read(fd, 65536):
                pass
        server.should_exit = True  # first: the starter's end may have closed our output too (a print then fails)
        with contextlib.suppress(OSError, ValueError):
            print("liversam serve: standard input closed (the program that started the server ended): stopping",
                  flush=True)

    threading.Thread(target=wait_for_end, name="liversam-stdin-watch", daemon=True).start()
