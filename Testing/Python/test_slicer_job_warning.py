"""The Slicer module and a LiverSAM server short of memory; another server chosen while a job runs.

1. A finished job whose masks the server kept over its memory budget (``--session-memory-gb``) has a ``warning`` in
   its status: the module writes the result and says, on the status line, in plain words, that the result is complete
   and what the shortage means.
2. A mask upload the server refuses with 503 (its budget is full; it answers before reading the body and closes the
   connection, so the rest of the body is sent into a closed connection): the user sees the server's message, the
   module stays usable (not busy, the server not taken for lost, the CT's session kept), and no job was started.
3. Changing the server in the Server section cancels the running job and closes the module's sessions on the old
   (remote) server, within ``RECONFIGURE_TIMEOUT_S`` even when it does not answer.
4. Stop server while a job runs ends the propagation with the server it ran on, and starts no other.

The real LiverSAM.py widget and logic (remote mode) on slicer-core's MRML with the Qt stand-ins of
test_slicer_widget_state.py (the fixtures of test_slicer_session_cleanup.py), against a real ``liversam serve`` whose
session memory budget is 0.18 GiB: a 512 x 512 x 300 CT (150 MB as int16) opens, but a 75 MB mask more does not fit.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import test_slicer_session_cleanup
import test_slicer_widget_state
from test_slicer_session_cleanup import (
    MAX_CLEANUP_S,
    Settings,
    a_running_job,
    assert_cancel_sent,
    final_state,
    hung_server,
    live_update,
    session_gone,
    two_sessions_and_a_running_job,
)
from test_slicer_session_recovery import WINDOW, Module

from slicer_harness import ensure_module_on_path

ensure_module_on_path()

from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge, ServerConnection, ServerRequests  # noqa: E402
from LiverSAMLib.Phantom import liver_phantom  # noqa: E402
from LiverSAMLib.ServerClient import (  # noqa: E402
    LiverSAMClient,
    LocalServerProcess,
    ServerError,
    ServerUnavailable,
    UploadRefused,
)

pytestmark = [pytest.mark.slicer, pytest.mark.model]
# the fixtures: LiverSAM.py loaded with the application's parts stubbed; its widget on a Module (uses ``server`` below)
widgets = test_slicer_widget_state.widgets
module_widget = test_slicer_session_cleanup.module_widget
SESSION_MEMORY_GB = 0.18  # 184 MB: the large CT (150 MB) opens; 75 MB of masks more do not fit
FEW_SLICES = {**ServerRequests.PROPAGATION_DEFAULTS, "max_slices": 2}  # a short job on a shared CPU


@pytest.fixture(scope="module")
def server():
    process = LocalServerProcess(sys.executable, extra_args=["--model", "litemedsam", "--device", "cpu",
                                 "--session-memory-gb", str(SESSION_MEMORY_GB)], startup_timeout=180)  # fmt: skip
    process.start()
    yield process
    process.stop()


def large_ct(nk: int = 300, n: int = 512) -> tuple[CTVolume, np.ndarray]:
    """A thin-slice abdominal CT's size (512 x 512 x 300, int16): a liver-like ellipsoid (110 HU) in fat (-80 HU)
    in air, with seeded noise; made with open grids (the phantom's full grids would take GBs). (CT, liver mask)."""
    kk, jj, ii = np.ogrid[:nk, :n, :n]

    def ellipsoid(centre, radii):
        return (((kk - centre[0]) / radii[0]) ** 2 + ((jj - centre[1]) / radii[1]) ** 2
                + ((ii - centre[2]) / radii[2]) ** 2) <= 1  # fmt: skip

    liver = ellipsoid(((nk - 1) / 2, n / 2, n * 0.47), (nk / 2 - 1, n * 0.27, n * 0.33))
    hu = np.random.default_rng(7).integers(-8, 9, size=(nk, n, n), dtype=np.int16)
    hu += np.where(
        ellipsoid(((nk - 1) / 2, n / 2, n / 2), (nk, n * 0.47, n * 0.48)), np.int16(-80), np.int16(-1000)
    )
    hu[liver] += 190
    geometry = ImageGeometry((n, n, nk), (0.7, 0.7, 1.0), (0.0, 0.0, 0.0))
    return CTVolume(hu, geometry, source="phantom"), liver


def press_propagate(liversam, module: Module, widget, plan, prompts, monkeypatch) -> None:
    """Press Propagate with ``plan`` (the widget's onPropagate; markups, target segment and parameter node stubbed)."""
    widget._markupsPrompts, widget._targetSegment = (lambda: prompts), (lambda: (plan.segment_id, None))
    widget.logic.planPropagation = lambda *args: plan
    monkeypatch.setattr(liversam.slicer.util, "tryWithErrorDisplay", lambda *a, **k: contextlib.nullcontext())
    widget.onPropagate()


def run_job(widget, timeout_s: float = 600.0) -> None:
    """The job timer's ticks and the poll timer's, until the widget is no longer busy."""
    deadline = time.monotonic() + timeout_s
    while widget._job is not None:
        assert time.monotonic() < deadline, "the propagation did not end"
        if widget._jobTimer.active:
            widget._pollJob()
        widget._calls.poll(0.1)


# --- 1. a finished job's memory warning ---------------------------------------------------------------------------
def test_a_job_kept_over_the_memory_budget_is_written_and_its_warning_said_in_plain_words(
    module_widget, widgets, server, monkeypatch
):
    """The server keeps a finished job's masks over its budget and says so in the job's ``warning``: the module used
    to say only "Propagation done."."""
    liversam, _train = widgets
    ct, liver = large_ct()
    module, widget, _gated = module_widget(ct)
    widget._fillReviewTable = lambda report, numbering=None, volumeNode=None: None  # Qt's table widget
    k = liver.shape[0] // 2
    prompts = module.prompts(liver[k], k)
    plan = module.server.plan_propagation(module.segmentation, module.volume, module.liver_id, None, prompts,
                                          FEW_SLICES, WINDOW)  # fmt: skip
    press_propagate(liversam, module, widget, plan, prompts, monkeypatch)
    run_job(widget)

    assert widget.errors == []
    warning = server.client().job_status(plan.job_id).get("warning")
    assert warning and "memory budget" in warning, (
        "the server kept the job within its budget: no warning to show"
    )
    status = widget.ui.statusLabel.text
    print(f"status line: {status}")
    assert status.startswith("Propagation done.")  # the result was written ...
    assert "short of memory" in status and "Your result is complete" in status  # ... and the warning said
    assert "shared LiverSAM server" in status  # a remote server: other users share it
    written = MRMLBridge.segment_mask(module.segmentation, module.liver_id, module.volume)
    assert (
        written[k - 2 : k + 3].any(axis=(1, 2)).all()
        and not written[: k - 2].any()
        and not written[k + 3 :].any()
    )
    assert widget._job is None and not widget.ui.progressBar.visible


def test_the_memory_note_of_a_server_started_here_does_not_speak_of_colleagues(widgets):
    liversam, _train = widgets
    logic = liversam.LiverSAMLogic.__new__(liversam.LiverSAMLogic)
    logic.connection = type("Connection", (), {"started_here": True})()
    note = logic.memoryWarning()
    assert "on this computer" in note and "colleague" not in note and "administrator" not in note


# --- 2. a mask upload refused for lack of memory -----------------------------------------------------------------
def test_a_container_upload_refused_for_memory_says_why_and_leaves_the_module_usable(
    module_widget, widgets, server, monkeypatch
):
    """A tumour propagation sends the liver (its container) first; the server, out of budget, refuses it with 503
    before reading it and closes the connection. The module used to take that for a server that stopped answering:
    the server's message was lost, the connection failed (a local server was even stopped) and the CT's session was
    forgotten."""
    liversam, _train = widgets
    ct, liver = large_ct()
    module, widget, gated = module_widget(ct)
    shown: list[str] = []
    monkeypatch.setattr(liversam.slicer.util, "errorDisplay", lambda text, *a, **k: shown.append(text))
    widget._onError = liversam.LiverSAMWidget._onError.__get__(widget)  # the module's own error handling
    tumour_id = module.logic.ensure_segment(module.segmentation, "tumor")
    # the liver in the scene
    module.logic.write_mask(module.segmentation, module.liver_id, module.volume, liver)
    k = liver.shape[0] // 2
    tumour = np.zeros_like(liver[k])
    tumour[240:270, 230:260] = True
    prompts = module.prompts(tumour, k)
    plan = module.server.plan_propagation(module.segmentation, module.volume, tumour_id, module.liver_id, prompts,
                                          FEW_SLICES, WINDOW)  # fmt: skip
    assert plan.container is not None  # the liver goes first, as the tumour's container
    press_propagate(liversam, module, widget, plan, prompts, monkeypatch)
    run_job(widget, 300)

    status = widget.ui.statusLabel.text
    print(f"status line: {status}")
    assert "cannot keep mask 'container'" in status and "--session-memory-gb" in status  # the server's words
    assert "short of memory" in status  # and what they mean, in plain words
    assert len(shown) == 1 and "cannot keep mask 'container'" in shown[0]
    # not busy, and the server is not taken for lost
    assert widget._job is None and not widget._jobTimer.active and not widget.ui.progressBar.visible
    assert widget.logic.connection.state == ServerConnection.READY
    observer = server.client()
    assert not plan.job_id and observer.info()["jobs_running"] == 0 and observer.info()["jobs_queued"] == 0
    session = gated.opened[0]
    assert module.server.sessions.ids() == [session]  # the CT's session is kept ...
    assert observer.session_info(session)["masks"] == []  # ... and holds nothing of the refused mask

    answers: list = []  # still usable: a click is answered on the same session, the CT is not sent again
    live_update(module, widget, liver, k, answers)
    test_slicer_widget_state.deliver(widget._calls)
    assert len(answers) == 1 and answers[0][0][k].any() and gated.uploads == 1


class EarlyAnswerServer:
    """An HTTP server that refuses every upload before reading its body, as ``liversam serve`` does when its memory
    budget is full: it answers (``answer``: a 503) or not (None), then closes the connection with the body unread
    (the kernel resets it). ``GET /v1/info`` is answered."""

    INFO = b'{"memory": {"budget_mb": 184.3, "held_mb": 150.0}}'

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _address = self.socket.accept()
                with connection:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += connection.recv(65536)
                    if head.startswith(b"GET /v1/info"):
                        reply = self.INFO
                        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                           + str(len(reply)).encode() + b"\r\nConnection: close\r\n\r\n" + reply)  # fmt: skip
                    elif self.answer is not None:
                        connection.sendall(self.answer)

    def close(self) -> None:
        self.socket.close()


def test_the_client_reads_the_answer_of_a_server_that_refused_an_upload_before_reading_it():
    """16 MB of mask (a 512 x 512 x 500 CT) into a connection the server closed after answering 503: the server's
    message is read (it was ServerUnavailable, "the body may exceed its limits")."""
    detail = b"{\"detail\":\"the server cannot keep mask 'container' of session 's1' (125.0 MB): ... (--session-memory-gb)\"}"
    answer = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(detail)).encode() + b"\r\nConnection: close\r\n\r\n" + detail)  # fmt: skip
    fake = EarlyAnswerServer(answer)
    try:
        client = LiverSAMClient(fake.url, "token", timeout=10)
        with pytest.raises(ServerError) as refused:
            client.upload_mask("s1", "container", np.ones((500, 512, 512), bool))
        assert refused.value.status == 503 and "cannot keep mask 'container'" in refused.value.message
    finally:
        fake.close()


def test_an_upload_closed_without_a_readable_answer_is_not_a_lost_server():
    """A system that drops the answer with the reset (or a proxy that sends none): the server still answers, so the
    upload was refused, not the server lost (ServerUnavailable made the module stop the local server)."""
    fake = EarlyAnswerServer(None)
    try:
        client = LiverSAMClient(fake.url, "token", timeout=10)
        with pytest.raises(UploadRefused, match="refused the upload before reading it") as refused:
            client.upload_mask("s1", "container", np.ones((500, 512, 512), bool))
        assert not isinstance(refused.value, ServerUnavailable)
        assert "150.0 MB of their 184.3 MB memory budget" in str(refused.value)
    finally:
        fake.close()


# --- 3. another server chosen while a job runs ----------------------------------------------------------------------
def edit_server_settings(liversam, widget, monkeypatch, url: str) -> float:
    """The user types another remote server's URL in the Server section (the widget's _onServerSettingsEdited) and,
    asked whether to cancel the running propagation, presses OK; returns how long the GUI was held."""
    settings = ServerConnection.ServerSettings(mode=ServerConnection.REMOTE, url=url, token="other-token")
    widget._serverSettingsFromGui = lambda: settings
    monkeypatch.setattr(liversam.qt, "QSettings", lambda: Settings(url, "other-token"), raising=False)
    asked: list[str] = []
    monkeypatch.setattr(liversam.slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: asked.append(text) or True)
    monkeypatch.setattr(liversam.slicer, "app", SimpleNamespace(testingEnabled=lambda: False), raising=False)
    widget._asked = asked
    started = time.monotonic()
    widget._onServerSettingsEdited()
    return time.monotonic() - started


def test_changing_the_server_cancels_the_job_and_closes_the_sessions_on_the_old_one(
    module_widget, widgets, server, monkeypatch
):
    """The job used to run on to its end on the old server (and the job timer, polling the new server, started it
    again there), and the old server kept the module's sessions until its idle timeout."""
    liversam, _train = widgets
    module, widget, _gated, plan = two_sessions_and_a_running_job(liversam, module_widget, monkeypatch)
    observer = server.client()
    sessions = module.server.sessions.ids()

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        new_url = f"http://127.0.0.1:{unused.getsockname()[1]}"
    took = edit_server_settings(liversam, widget, monkeypatch, new_url)
    print(f"server changed: {took:.2f} s (job cancelled, 2 sessions closed)")
    assert took < MAX_CLEANUP_S
    info = observer.info()  # at once: the job no longer runs, no session is left
    assert info["jobs_running"] == 0 and info["jobs_queued"] == 0 and info["sessions"] == 0, info
    assert final_state(observer, plan.job_id) in ("cancelled", "gone")
    assert all(session_gone(observer, session) for session in sessions)
    assert widget._job is None and not widget._jobTimer.active and not widget.ui.progressBar.visible
    assert "cancelled" in widget.ui.statusLabel.text and plan.cancelled
    assert len(widget._asked) == 1 and "closed on the server" in widget._asked[0]  # asked first (remote: CTs closed)
    connection = widget.logic.connection
    assert connection.settings.url == new_url and connection.state == ServerConnection.STOPPED
    assert module.server.sessions.ids() == []
    assert module.logic.segment_is_empty(module.segmentation, module.liver_id)  # the job wrote nothing
    for _ in range(5):  # the job timer was stopped: nothing polls the new server for the old job
        widget._calls.poll(0.05)
    assert widget.errors == []


def test_changing_the_server_gives_up_on_an_old_server_that_does_not_answer(
    module_widget, widgets, monkeypatch
):
    """A remote server that accepts connections and never answers holds the GUI up for RECONFIGURE_TIMEOUT_S at
    most; the job's cancel was tried."""
    liversam, _train = widgets
    ct, liver = liver_phantom(nk=6)
    module, widget, _gated = module_widget(ct)
    with hung_server(widget) as hung:
        plan = a_running_job(module, widget, liver)
        took = edit_server_settings(liversam, widget, monkeypatch, "http://127.0.0.1:9")
        print(f"server changed, old one not answering: {took:.2f} s")
        assert took < MAX_CLEANUP_S
        assert_cancel_sent(hung)
    assert plan.cancelled and widget._job is None and module.server.sessions.ids() == []


class StandInProcess:
    """A local server process that only records being stopped."""

    stopped = False

    def running(self) -> bool:
        return not self.stopped

    def stop(self, timeout: float = 10.0) -> None:
        self.stopped = True


def a_local_server(widget) -> tuple[test_slicer_widget_state.Client, StandInProcess]:
    """The widget's connection as to a local server started here (ready), with a client that records every close and
    cancel."""
    client, process = test_slicer_widget_state.Client(), StandInProcess()
    connection = widget.logic.connection
    connection._client, connection._process, connection.state = client, process, ServerConnection.READY
    return client, process


def test_changing_from_a_local_server_stops_it_without_a_request(module_widget, widgets, monkeypatch):
    """The local server started here is stopped: its sessions and job go with it, nothing is sent."""
    liversam, _train = widgets
    ct, liver = liver_phantom(nk=6)
    module, widget, _gated = module_widget(ct)
    client, process = a_local_server(widget)
    sessions = module.server.sessions
    plan = a_running_job(module, widget, liver)

    took = edit_server_settings(liversam, widget, monkeypatch, "http://127.0.0.1:9")
    assert took < 0.5 and process.stopped and client.closed == [] and client.cancelled == [] and client.aborted
    assert plan.cancelled and widget._job is None and sessions.ids() == []


def test_stop_server_during_a_propagation_ends_it_and_starts_nothing(module_widget, widgets, monkeypatch):
    """Stop server (the local server started here) while a propagation runs: the propagation is cancelled with the
    server and says so; nothing is written, nothing is sent, and no server is started again. Before, the job timer
    kept polling: its next poll started a local server again and ran the propagation there from the start."""
    liversam, _train = widgets
    ct, liver = liver_phantom(nk=6)
    module, widget, _gated = module_widget(ct)
    client, process = a_local_server(widget)
    starts = []
    monkeypatch.setattr(widget.logic.connection, "ensure", lambda *args, **kwargs: starts.append(1) or client)
    plan = a_running_job(module, widget, liver)
    widget._setBusy(True)
    widget._jobTimer.start()  # as once the server has answered the job's start

    widget.onStopServer()

    assert process.stopped and plan.cancelled
    assert widget._job is None and not widget._jobTimer.active and not widget.ui.progressBar.visible
    assert "cancelled: the server was stopped" in widget.ui.statusLabel.text
    widget._pollJob()  # what the job timer's next tick would have done
    for _ in range(5):
        widget._calls.poll(0.05)
    assert starts == [] and client.closed == [] and client.cancelled == []
    assert module.logic.segment_is_empty(module.segmentation, module.liver_id)  # the job wrote nothing
    assert widget.errors == []


def test_an_upload_whose_tls_connection_the_server_closed_is_not_a_lost_server(monkeypatch):
    """Over HTTPS the server's early 503 cannot be read: urllib reports the TLS layer's EOF (SSLEOFError in a URLError),
    not a reset. The server still answers, so the upload was refused (it was ServerUnavailable: "not reachable")."""
    import ssl
    import urllib.error

    from LiverSAMLib import ServerClient

    def closed_during_the_upload(request, timeout=None):
        if request.data:
            raise urllib.error.URLError(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))
        raise AssertionError("only the upload goes through the opener here")

    monkeypatch.setattr(ServerClient._OPENER, "open", closed_during_the_upload)
    client = LiverSAMClient("https://liversam.example:8443", "token", timeout=10)
    monkeypatch.setattr(client, "info", lambda: {"memory": {"held_mb": 150.0, "budget_mb": 184.3}})
    with pytest.raises(UploadRefused, match="refused the upload before reading it") as refused:
        client.upload_mask("s1", "container", np.ones((100, 512, 512), bool))
    assert not isinstance(refused.value, ServerUnavailable)
    assert "150.0 MB of their 184.3 MB memory budget" in str(refused.value)
