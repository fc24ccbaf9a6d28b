"""The module's server connection and its I/O thread, without Slicer: settings, the once-only check, the
local server's lifetime, call coalescing and delivery on the polling thread (issue 12 items 2 and 6)."""

from __future__ import annotations

import threading
import time

import pytest

from slicer_harness import ensure_module_on_path

ensure_module_on_path()

from LiverSAMLib import ServerConnection as connection_module  # noqa: E402
from LiverSAMLib.BackgroundCalls import CallQueue  # noqa: E402
from LiverSAMLib.ServerClient import ServerUnavailable  # noqa: E402
from LiverSAMLib.ServerConnection import (  # noqa: E402
    FAILED,
    LOCAL,
    REMOTE,
    STOPPED,
    ServerConnection,
    ServerSettings,
    server_environment,
)


class Store:
    """qt.QSettings' value/setValue on a dict."""

    def __init__(self) -> None:
        self.values: dict = {}

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value) -> None:  # noqa: N802 - QSettings' name
        self.values[key] = value


def test_settings_round_trip_and_say_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVERSAM_PYTHON", "")
    monkeypatch.setenv("LIVERSAM_VENV", str(tmp_path / "no-venv"))
    store = Store()
    settings = ServerSettings.load(store)
    assert settings.mode == LOCAL and settings.python == "" and "setup.sh" in settings.problem()
    settings = ServerSettings(mode=REMOTE, url="gpu:8123", token="")
    assert "URL" in settings.problem()
    settings.url = "http://gpu:8123"
    assert "token" in settings.problem()
    settings.token = "abc"
    assert settings.problem() is None
    settings.save(store)
    assert ServerSettings.load(store) == settings
    local = ServerSettings(python=str(tmp_path / "missing" / "python"))
    assert "does not exist" in local.problem()
    assert ServerSettings(model="litemedsam", device="cpu").serve_arguments() == ["--model", "litemedsam", "--device", "cpu"]
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    monkeypatch.setenv("LIVERSAM_VENV", str(tmp_path / "venv"))
    assert ServerSettings.load(Store()).python == str(venv_python)  # setup.sh's environment by default


def test_a_failed_connection_is_checked_once_not_at_every_click(monkeypatch, tmp_path):
    """Issue 12 item 6: an unreachable server (or a missing environment) fails once with the reason; later
    requests (every live update) get that reason without starting anything again, until Connect resets it."""
    starts = []

    class FailingProcess:
        def __init__(self, *args, **kwargs):
            starts.append(args)

        def start(self):
            raise ServerUnavailable("the LiverSAM server exited with code 1 while starting: no module liversam")

        def stop(self, timeout=10.0):
            pass

        def running(self):
            return False

    python = tmp_path / "python"
    python.write_text("")
    monkeypatch.setattr(connection_module, "LocalServerProcess", FailingProcess)
    connection = ServerConnection(ServerSettings(python=str(python)))
    for _ in range(5):
        with pytest.raises(ServerUnavailable, match="no module liversam"):
            connection.ensure()
    assert len(starts) == 1 and connection.state == FAILED and "no module liversam" in connection.message
    connection.reset()  # the Connect button
    assert connection.state == STOPPED
    with pytest.raises(ServerUnavailable):
        connection.ensure()
    assert len(starts) == 2


def test_stop_does_not_wait_for_a_server_that_is_starting(monkeypatch, tmp_path):
    """Stop server, Connect, a settings edit or quitting Slicer call stop() on the main thread while the I/O thread
    starts the server (up to two minutes): the UI must not freeze until the start ends, and the start then fails."""
    started, stopped = threading.Event(), threading.Event()

    class SlowProcess:
        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            started.set()
            if stopped.wait(10.0):
                raise ServerUnavailable("the LiverSAM server exited with code -15 while starting")
            raise AssertionError("stop() never reached the starting process")

        def stop(self, timeout=10.0):
            stopped.set()

        def running(self):
            return not stopped.is_set()

    python = tmp_path / "python"
    python.write_text("")
    monkeypatch.setattr(connection_module, "LocalServerProcess", SlowProcess)
    connection = ServerConnection(ServerSettings(python=str(python)))
    errors: list = []

    def connect() -> None:
        try:
            connection.connect()
        except ServerUnavailable as error:
            errors.append(error)

    io_thread = threading.Thread(target=connect)
    io_thread.start()
    assert started.wait(5.0)
    with pytest.raises(ServerUnavailable, match="still starting"):  # no second server while the first starts
        connection.connect()
    t0 = time.monotonic()
    connection.stop()  # the main thread
    assert time.monotonic() - t0 < 1.0 and stopped.is_set()
    io_thread.join(5.0)
    assert not io_thread.is_alive() and len(errors) == 1 and connection.client is None


def test_the_server_environment_drops_slicers_python_variables(monkeypatch):
    monkeypatch.setenv("PYTHONHOME", "/slicer/lib/Python")
    monkeypatch.setenv("PYTHONPATH", "/slicer/lib/Python/site-packages")
    monkeypatch.delenv("LIVERSAM_SERVER_PYTHONPATH", raising=False)
    environment = server_environment()
    assert "PYTHONHOME" not in environment and "PYTHONPATH" not in environment
    monkeypatch.setenv("LIVERSAM_SERVER_PYTHONPATH", "/checkout/LiverSAM")
    assert server_environment()["PYTHONPATH"] == "/checkout/LiverSAM"


def test_inside_slicer_the_server_gets_the_environment_slicer_was_started_with(monkeypatch):
    """Slicer's launcher puts its own libpython on LD_LIBRARY_PATH; the server's Python must not load it."""
    import slicer

    started_with = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/usr/lib", "HOME": "/home/reader"}
    read_on: list[str] = []

    def startup_environment() -> dict:  # a Qt call (qSlicerCoreApplication): the main thread only
        read_on.append(threading.current_thread().name)
        return dict(started_with)

    monkeypatch.setattr(slicer, "app", object(), raising=False)
    monkeypatch.setattr(slicer.util, "startupEnvironment", startup_environment, raising=False)
    monkeypatch.setattr(connection_module, "_startup_environment", None)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/Slicer/lib/Python/lib:/usr/lib")
    monkeypatch.setenv("PYTHONHOME", "/opt/Slicer/lib/Python")
    monkeypatch.setenv("LIVERSAM_HOME", "/data/liversam")
    ServerConnection(ServerSettings())  # the module's logic makes it on the main thread
    found: list[dict] = []
    io_thread = threading.Thread(target=lambda: found.append(server_environment()), name="LiverSAM server calls")
    io_thread.start()  # the server is started from the I/O thread
    io_thread.join(5.0)
    environment = found[0]
    assert environment["LD_LIBRARY_PATH"] == "/usr/lib" and environment["PATH"] == "/usr/bin"
    assert "PYTHONHOME" not in environment and environment["LIVERSAM_HOME"] == "/data/liversam"
    assert read_on == [threading.main_thread().name]  # read once, on the main thread, never on the I/O thread


def test_calls_run_on_one_thread_and_callbacks_on_the_polling_thread():
    calls = CallQueue()
    main = threading.get_ident()
    seen = []
    for n in range(3):
        calls.submit(lambda n=n: (n, threading.get_ident()), lambda value: seen.append((value, threading.get_ident())))
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        calls.poll(0.01)
    assert [value[0] for value, _ in seen] == [0, 1, 2]
    workers = {value[1] for value, _ in seen}
    assert len(workers) == 1 and main not in workers  # one I/O thread, never the main one
    assert {thread for _, thread in seen} == {main}  # callbacks on the thread that polls
    errors = []
    calls.submit(lambda: 1 / 0, on_error=errors.append)
    while not errors and time.monotonic() < deadline:
        calls.poll(0.01)
    assert isinstance(errors[0], ZeroDivisionError)
    calls.close()


def test_a_burst_of_live_updates_sends_only_the_latest():
    calls = CallQueue()
    gate = threading.Event()
    sent = []
    calls.submit(lambda: gate.wait(5), name="in flight")
    for n in range(5):
        calls.submit(lambda n=n: sent.append(n), key="live")
    gate.set()
    deadline = time.monotonic() + 10
    while not calls.idle() and time.monotonic() < deadline:
        calls.poll(0.01)
    assert sent == [4]
    calls.close()


def test_polling_lets_the_io_thread_run():
    """Issue 12 item 2: the main thread's poll waits on the result queue (releasing the GIL), so a request
    finishes within a few ticks; it never waits longer than one tick when nothing is ready."""
    calls = CallQueue(poll_wait_s=0.004)
    started = time.monotonic()
    assert calls.poll() == 0 and time.monotonic() - started < 0.5
    done = []
    calls.submit(lambda: sum(range(10000)), done.append)
    ticks = 0
    while not done and ticks < 500:
        calls.poll()
        ticks += 1
    assert done == [sum(range(10000))] and ticks < 50
    calls.close()


def test_every_propagation_setting_is_sent_when_the_client_takes_them():
    from LiverSAMLib import ServerRequests
    from LiverSAMLib.ServerClient import LiverSAMClient

    settings = dict(ServerRequests.PROPAGATION_DEFAULTS, min_score=0.7, box_margin_mm=6.0)
    sent = {}

    class Client:
        def start_propagation(self, session, segments, max_slices=None, intensity_refinement=True, settings=None):
            sent.update(settings)

        def old_start_propagation(self, session, segments, max_slices=None, intensity_refinement=True):
            sent.update(max_slices=max_slices, intensity_refinement=intensity_refinement)

    ServerRequests.call_with_settings(Client().start_propagation, "s", [], settings=settings)
    assert sent == settings
    assert ServerRequests.unsupported_settings(LiverSAMClient.start_propagation, settings) == []
    assert ServerRequests.unsupported_settings(LiverSAMClient.start_repropagation, settings) == []
    # An older client: only the two it takes are sent, and the others are named for the user.
    sent.clear()
    ServerRequests.call_with_settings(Client().old_start_propagation, "s", [], settings=settings)
    assert sent == {"max_slices": None, "intensity_refinement": True}
    assert ServerRequests.unsupported_settings(Client.old_start_propagation, settings) == ["min_score", "box_margin_mm"]


def test_a_server_on_this_computer_is_reached_past_a_proxy_from_the_environment(monkeypatch):
    """Python sends even 127.0.0.1 through ``http_proxy`` unless ``no_proxy`` names it: on a hospital network with a
    proxy set, the local server's health check went to the proxy (and the start timed out), with the token."""
    import http.server
    import json
    import urllib.request

    from LiverSAMLib import ServerClient

    class Health(http.server.BaseHTTPRequestHandler):
        seen: list[str] = []

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            Health.seen.append(self.path)
            body = json.dumps({"status": "ok", "version": "test"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # the environment's proxy: a port where nothing listens (as a proxy the machine cannot reach)
        for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(ServerClient, "_OPENER", urllib.request.build_opener(*ServerClient._HANDLERS))
        port = server.server_address[1]
        for host in ("127.0.0.1", "localhost"):
            assert ServerClient.LiverSAMClient(f"http://{host}:{port}", "t").health()["status"] == "ok"
        assert Health.seen == ["/v1/health"] * 2
    finally:
        server.shutdown()
        server.server_close()
    # a server elsewhere still goes through the proxy the environment names
    assert ServerClient._opener_for("http://gpu.hospital.example:8000/api/v1/info") is ServerClient._OPENER
    assert [ServerClient.is_loopback_url(u) for u in ("http://[::1]:8000", "http://127.0.0.2", "http://10.0.0.1")] == [
        True, True, False,
    ]  # fmt: skip
