"""What the module leaves behind, and how long it holds Slicer up, when Slicer exits (or the module is reloaded).

1. ``LiverSAMClient.abort()`` stops a request under way on another thread at once (a CT upload: a server that reads
   slowly sees the connection close and gets no whole body) and refuses later requests except those that free the
   server's resources (close a session, delete a mask, cancel a job).
2. The widget's ``cleanup()`` stops the local server it started within its exit budget (``CLEANUP_TIMEOUT_S``), also a
   server that does not end when asked (busy in native code, or hung): it is killed. It used to wait 10 s for it.

Stand-in servers only (a socket server that reads an upload slowly; a "python" that serves /health and /info and
ignores SIGTERM); test_slicer_session_cleanup.py checks the same cleanup against a real ``liversam serve`` behind a
slow link.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_slicer_widget_state import Label, Timer, widgets  # noqa: F401  (the fixture)

from slicer_harness import ensure_module_on_path

ensure_module_on_path()

from LiverSAMLib.BackgroundCalls import CallQueue  # noqa: E402
from LiverSAMLib.ServerClient import LiverSAMClient, RequestAborted  # noqa: E402

pytestmark = pytest.mark.slicer
MAX_CLEANUP_S = 3.0  # CLEANUP_TIMEOUT_S (2 s) and the little that follows it


class SlowReader:
    """A server that accepts an upload and reads it at ``rate`` bytes/s, never answering; records what it read and
    whether (and when) the client closed the connection before the whole body arrived."""

    def __init__(self, rate: float = 1e6) -> None:
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.received = 0
        self.closed_at: float | None = None
        self.reading = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _address = self.listener.accept()
        with connection:
            while True:
                try:
                    data = connection.recv(16384)
                except OSError:
                    data = b""
                if not data:
                    self.closed_at = time.monotonic()
                    return
                self.received += len(data)
                if self.received > 200_000:
                    self.reading.set()
                time.sleep(len(data) / self.rate)

    def close(self) -> None:
        self.listener.close()


def test_abort_stops_an_upload_under_way_and_refuses_later_requests_but_the_freeing_ones():
    server = SlowReader(rate=2e6)
    client = LiverSAMClient(server.url, "token", timeout=60)
    ct = np.zeros((40, 256, 256), np.int16)  # 5 MB: 2.5 s at the server's pace
    outcome: list = []

    def upload() -> None:
        try:
            client.open_volume(ct, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        assert server.reading.wait(10), "the upload never started"
        started = time.monotonic()
        assert client.bounded(1.0).abort() == 1  # a bounded copy stops the client's own requests too
        thread.join(5)
        print(f"upload stopped {time.monotonic() - started:.2f} s after abort(), {server.received / 1e6:.1f} of "
              f"{ct.nbytes / 1e6:.1f} MB read")  # fmt: skip
        assert not thread.is_alive() and len(outcome) == 1 and isinstance(outcome[0], RequestAborted)
        deadline = time.monotonic() + 5
        while server.closed_at is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.closed_at is not None and server.received < ct.nbytes  # the server saw it cut off
        assert client.aborted
        for refused in (lambda: client.info(), lambda: client.open_volume(ct, (1, 1, 1), (0, 0, 0)),
                        lambda: client.predict_slice("s", 0), lambda: client.start_propagation("s", [])):  # fmt: skip
            with pytest.raises(RequestAborted, match="not sent"):
                refused()
    finally:
        server.close()


def test_after_abort_the_requests_that_free_the_servers_resources_are_still_sent():
    sent: list[tuple[str, str]] = []
    client = LiverSAMClient("http://127.0.0.1:9", "token")
    client.abort()

    def send(request, method, path, *args):
        sent.append((method, path))
        return SimpleNamespace(json=lambda: {})

    client._send = send
    client.close_session("s1")
    client.delete_mask("s1", "container")
    client.cancel_job("j1")
    assert sent == [("DELETE", "/sessions/s1"), ("DELETE", "/sessions/s1/masks/container"), ("POST", "/jobs/j1/cancel")]


STUBBORN_SERVER = r'''
import http.server, json, os, signal, sys, threading
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # busy in native code, or hung: it does not end when asked
token_file = sys.argv[sys.argv.index("--token-file") + 1]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "model": {"name": "stub", "device": "cpu"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(token_file, "w") as handle:
    handle.write("stub-token")
print(f"liversam serve: listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
'''


@pytest.fixture
def stubborn_python(tmp_path: Path) -> str:
    """A "python" for the Server section whose ``-m liversam serve`` is a server that ignores SIGTERM."""
    script = tmp_path / "stubborn_server.py"
    script.write_text(STUBBORN_SERVER)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    return str(python)


class Settings(dict):
    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value) -> None:
        self[key] = value


def cleanup_widget(module, logic):
    """The widget as setup() leaves it, as far as cleanup() reads it."""
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    module.VTKObservationMixin.__init__(widget)
    widget.logic, widget._calls, widget._job = logic, CallQueue(), None
    widget._pollTimer, widget._jobTimer, widget._liveTimer, widget._serverPathTimer = Timer(), Timer(), Timer(), Timer()
    widget._stopServerAtQuit, widget._shortcuts, widget._guiConnection = None, [], None
    widget.ui = SimpleNamespace(statusLabel=Label())
    return widget


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script as the server's python")
def test_cleanup_kills_a_local_server_that_does_not_end_within_the_exit_budget(widgets, stubborn_python):  # noqa: F811
    module, _train = widgets
    logic = module.LiverSAMLogic(settingsStore=Settings({"LiverSAM/Server/mode": "local",
                                                         "LiverSAM/Server/python": stubborn_python}))  # fmt: skip
    logic.connection.connect()
    process = logic.connection._process.process
    assert logic.connection.started_here
    widget = cleanup_widget(module, logic)
    started = time.monotonic()
    try:
        widget.cleanup()
        took = time.monotonic() - started
        print(f"cleanup with a local server that ignores SIGTERM: {took:.2f} s")
        assert took < MAX_CLEANUP_S, "Slicer's exit waited for the local server"
        assert process.poll() is not None, "the local server still runs"
        assert not logic.connection.started_here
    finally:
        with contextlib.suppress(OSError):
            process.kill()


def test_the_aboutToQuit_slot_stops_the_server_within_the_exit_budget(widgets):  # noqa: F811
    module, _train = widgets
    waits: list[float] = []
    logic = module.LiverSAMLogic.__new__(module.LiverSAMLogic)
    logic.server = SimpleNamespace(forget=lambda: [])
    logic.connection = SimpleNamespace(stop=waits.append)
    logic.stopServerAtQuit()
    assert waits == [module.CLEANUP_TIMEOUT_S]


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script as the server's python")
def test_the_slot_setup_connects_to_aboutToQuit_kills_a_stubborn_server_within_the_exit_budget(  # noqa: N802
    widgets, stubborn_python, monkeypatch  # noqa: F811
):
    """The slot setup() connects to aboutToQuit() (its _connectQuitSlot), run as Slicer runs it at exit. Connecting
    logic.stopServer instead (its 10 s wait for a server that does not end) passed the earlier tests: they checked a
    prefix of the line, and called stopServerAtQuit themselves."""
    module, _train = widgets
    connected: dict = {}
    app = SimpleNamespace(connect=lambda signal, slot: connected.__setitem__(signal, slot))
    monkeypatch.setattr(module.slicer, "app", app, raising=False)
    logic = module.LiverSAMLogic(settingsStore=Settings({"LiverSAM/Server/mode": "local",
                                                         "LiverSAM/Server/python": stubborn_python}))  # fmt: skip
    logic.connection.connect()
    process = logic.connection._process.process
    widget = cleanup_widget(module, logic)
    try:
        widget._connectQuitSlot()
        started = time.monotonic()
        connected["aboutToQuit()"]()
        took = time.monotonic() - started
        print(f"aboutToQuit() with a local server that ignores SIGTERM: {took:.2f} s")
        assert took < MAX_CLEANUP_S, "Slicer's exit waited for the local server"
        assert process.poll() is not None and not logic.connection.started_here
    finally:
        with contextlib.suppress(OSError):
            process.kill()
        widget._calls.close()


class Unkillable:
    """A ``subprocess.Popen`` that ends neither when asked nor when killed (uninterruptible sleep in a driver)."""

    pid, stdin = 4242, None

    def __init__(self) -> None:
        self.killed = False

    def poll(self):
        return None

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        self.killed = True

    def wait(self, timeout=None):
        time.sleep(min(timeout or 0.0, 0.05))
        raise subprocess.TimeoutExpired("liversam serve", timeout)


def test_stopping_a_server_that_does_not_end_when_killed_raises_nothing_and_removes_its_token(tmp_path, caplog):
    """LocalServerProcess.stop waited 10 s for a killed process and let TimeoutExpired out of cleanup() and out of the
    aboutToQuit() slot (the rest of the cleanup, and Slicer's exit handlers, were skipped)."""
    from LiverSAMLib.ServerClient import LocalServerProcess

    server = LocalServerProcess(sys.executable)
    server.process, server._folder = Unkillable(), str(tmp_path / "liversam-server-x")
    (tmp_path / "liversam-server-x").mkdir()
    (tmp_path / "liversam-server-x" / "token-1").write_text("t")
    process = server.process
    with caplog.at_level("WARNING"):
        server.stop(0.1)
    assert process.killed and server.process is None and not (tmp_path / "liversam-server-x").exists()
    assert "has not ended" in caplog.text


def test_cleanup_and_the_quit_slot_raise_nothing_when_stopping_the_server_fails(widgets):  # noqa: F811
    module, _train = widgets

    def fails(*args, **kwargs):
        raise RuntimeError("the server could not be stopped")

    logic = module.LiverSAMLogic.__new__(module.LiverSAMLogic)
    logic.server = SimpleNamespace(forget=lambda: [])
    logic.connection = SimpleNamespace(stop=fails, abort_requests=fails, client=None, started_here=True)
    logic.stopServerAtQuit()  # no exception out of Slicer's aboutToQuit() handler
    widget = cleanup_widget(module, logic)
    widget._disconnectGui = fails
    widget.cleanup()  # nothing was raised, and the steps after the failing ones ran
    assert widget._calls._closed and widget._stopServerAtQuit is None and widget._parameterNode is None





CLEANUP_STEPS = ("removeObservers", "_uninstallShortcuts", "_pollTimer", "_jobTimer", "_liveTimer", "_serverPathTimer",
                 "app.disconnect", "calls.invalidate", "calls.close", "_disconnectGui", "abort_requests",
                 "releaseServer", "stopServerSafely", "calls.close(wait)")  # fmt: skip


def test_cleanup_runs_every_step_when_any_one_of_them_raises(widgets, monkeypatch, caplog):  # noqa: F811
    """cleanup() says it never raises and that a failing step does not skip the next ones: only the GUI's disconnection
    and the server's release were guarded, and an observer, shortcut, timer or aboutToQuit() disconnection that raised
    left the local server running (review R6). Each step is made to raise in turn."""
    module, _train = widgets
    for failing in CLEANUP_STEPS:
        ran: list[str] = []

        def step(name: str, ran=ran, failing=failing):
            def run(*args, **kwargs):
                ran.append(name)
                if name == failing:
                    raise RuntimeError(f"{name} failed")
                return True

            return run

        widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
        widget.removeObservers, widget._uninstallShortcuts = step("removeObservers"), step("_uninstallShortcuts")
        for timer in ("_pollTimer", "_jobTimer", "_liveTimer", "_serverPathTimer"):
            setattr(widget, timer, SimpleNamespace(stop=step(timer)))
        widget._stopServerAtQuit = object()
        monkeypatch.setattr(module.slicer, "app", SimpleNamespace(disconnect=step("app.disconnect")), raising=False)
        widget._calls = SimpleNamespace(
            invalidate=step("calls.invalidate"),
            close=lambda wait_s=None: step("calls.close" if wait_s is None else "calls.close(wait)")(),
        )
        widget._job, widget._disconnectGui = None, step("_disconnectGui")
        widget.logic = SimpleNamespace(connection=SimpleNamespace(abort_requests=step("abort_requests")),
                                       releaseServer=step("releaseServer"), stopServerSafely=step("stopServerSafely"))  # fmt: skip
        caplog.clear()
        widget.cleanup()  # raises nothing
        assert list(ran) == list(CLEANUP_STEPS), failing
        assert f"{failing} failed" in caplog.text  # logged, with what it was doing
        assert widget._stopServerAtQuit is None and widget._parameterNode is None
