"""The Slicer module leaves no session and no job behind on a (possibly remote, shared) LiverSAM server.

1. A session the I/O thread opens after the module stopped needing its CT (the scene closed, the volume was removed,
   its voxels were edited while the CT was on its way) is not kept, and it is closed on the server once the request
   that opened it is done, not left to ``--idle-timeout``.
2. The widget's ``cleanup()`` (Slicer calls it when the module is reloaded and when Slicer exits) cancels the running
   propagation job and closes the module's sessions on a server that keeps running, within ``CLEANUP_TIMEOUT_S`` even
   when the server does not answer, and ends the I/O thread.

The real LiverSAM.py widget and logic (its connection in *remote* mode) on slicer-core's MRML, with the Qt stand-ins of
test_slicer_widget_state.py, against a real ``liversam serve``; the server's own /v1/info, session and job answers
show what is left.
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
import test_slicer_widget_state
from test_slicer_session_recovery import WINDOW, GatedClient, Module
from test_slicer_widget_state import Label, Timer, deliver

from slicer_harness import ensure_module_on_path

ensure_module_on_path()

from LiverSAMLib import MRMLBridge, ServerConnection, ServerRequests  # noqa: E402
from LiverSAMLib.Phantom import liver_phantom  # noqa: E402
from LiverSAMLib.ServerClient import (  # noqa: E402
    LiverSAMClient,
    LocalServerProcess,
    ServerRequestError,
    job_lost,
    session_lost,
)
from LiverSAMLib.ServerSegmentation import volume_key  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.model]
widgets = (
    test_slicer_widget_state.widgets
)  # the fixture: LiverSAM.py loaded with the application's parts stubbed
FINAL = ("done", "failed", "cancelled")
MAX_CLEANUP_S = 3.0  # how long cleanup may hold Slicer's exit up, whatever the server does


@pytest.fixture(scope="module")
def server():
    """``liversam serve`` without ``--max-sessions``: a session left open stays open (none is evicted for another)."""
    process = LocalServerProcess(sys.executable, extra_args=["--model", "litemedsam", "--device", "cpu"],
                                 startup_timeout=180)  # fmt: skip
    process.start()
    yield process
    process.stop()


class Settings:
    """Slicer's application settings (``qt.QSettings``) as the module's Server section leaves them: remote mode."""

    def __init__(self, url: str, token: str) -> None:
        self.values = {
            "LiverSAM/Server/mode": "remote",
            "LiverSAM/Server/url": url,
            "LiverSAM/Server/token": token,
        }

    def value(self, key: str, default=None):
        return self.values.get(key, default)

    def setValue(self, key: str, value) -> None:
        self.values[key] = value


class Gated(GatedClient):
    """GatedClient (counts CTs, holds an upload while ``hold``) with the URL and token the connection reads."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(url)
        self.token = token


@pytest.fixture
def module_widget(widgets, server, monkeypatch):
    """``make(ct) -> (Module, widget, gated client)``: LiverSAM.py's widget and logic on the Module's scene, connected
    (by the I/O thread, on first use) to ``server`` in remote mode through the gated client."""
    liversam, _train = widgets
    made = []

    def make(ct, url: str | None = None):
        """``url``: where the server is reached (default: the server's own)."""
        module = Module(ct)
        gated = Gated(url or server.url, server.token)
        monkeypatch.setattr(ServerConnection, "LiverSAMClient", lambda url, token: gated)
        logic = liversam.LiverSAMLogic(settingsStore=Settings(url or server.url, server.token))
        logic.server, logic.segmentation = module.server, module.logic
        widget = liversam.LiverSAMWidget.__new__(liversam.LiverSAMWidget)
        liversam.VTKObservationMixin.__init__(widget)
        widget.logic, widget._calls, widget._job = logic, module.calls, None
        widget._pollTimer, widget._jobTimer, widget._liveTimer = Timer(), Timer(), Timer()
        widget._serverPathTimer, widget._stopServerAtQuit, widget._guiConnection = Timer(), None, None
        widget._shortcuts, widget._parameterNode, widget._lesions = [], None, []
        table = SimpleNamespace(setRowCount=lambda n: None)
        widget.ui = SimpleNamespace(statusLabel=Label(), serverStatusLabel=Label(), reviewLabel=Label(),
                                    progressBar=SimpleNamespace(visible=False, value=0, maximum=0),
                                    lesionTable=table, reviewTable=table)  # fmt: skip
        widget._updateGUIState = widget._showServerState = lambda *args: None
        widget.errors = []
        widget._onError = lambda what, error: widget.errors.append(error)
        scene = module.scene
        widget.addObserver(scene, scene.StartCloseEvent, widget.onSceneStartClose)  # as setup() does
        widget.addObserver(scene, scene.NodeRemovedEvent, widget.onNodeRemoved)
        made.append((widget, gated))
        return module, widget, gated

    yield make
    # each test starts on a server without sessions, whatever the code under test left behind
    for widget, gated in made:
        widget.removeObservers()
        widget._calls.close()
        for session in gated.opened:
            with contextlib.suppress(ServerRequestError):
                server.client().close_session(session)


def live_update(module: Module, widget, liver: np.ndarray, k: int, answers: list, volume=None) -> None:
    """What onSegmentSlices submits: the prompted slice's request, planned now (main thread), run by the I/O thread."""
    requests = ServerRequests.slice_requests(module.prompts(liver[k], k))
    work = module.server.predict_slices_work(volume or module.volume, requests, WINDOW)
    widget._withClient(work, answers.append, "Live update", key="live")


def session_gone(client: LiverSAMClient, session: str) -> bool:
    try:
        client.session_info(session)
    except ServerRequestError as error:
        return session_lost(error)
    return False


def final_state(client: LiverSAMClient, job: str, timeout_s: float = 60.0) -> str:
    """The job's final state on the server; "gone" once the server has forgotten it (its session was closed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = client.job_status(job)["state"]
        except ServerRequestError as error:
            if job_lost(error):
                return "gone"
            raise
        if state in FINAL or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


@pytest.mark.parametrize("what", ["scene closed", "volume removed", "voxels edited"])
def test_a_session_opened_for_a_ct_dropped_meanwhile_is_closed_on_the_server(module_widget, server, what):
    """The CT is on its way to the server when the scene closes, the volume is removed or its voxels change: the
    session it opens is not kept by the module and is closed on the server right after its request (it used to stay
    open, holding the CT and its embeddings, until the server's idle timeout)."""
    ct, liver = liver_phantom(nk=6)
    module, widget, gated = module_widget(ct)
    observer = server.client()
    gated.hold, answers, k = True, [], 3
    live_update(module, widget, liver, k, answers)
    module.poll_until(gated.uploading, "the CT was never sent")
    if what == "scene closed":
        module.scene.Clear(0)  # StartCloseEvent: the widget's onSceneStartClose
    elif what == "volume removed":
        module.scene.RemoveNode(module.volume)  # NodeRemovedEvent: the widget's onNodeRemoved
    else:
        module.volume.GetImageData().Modified()  # an edit of the voxels (new modification time)
        live_update(module, widget, liver, k, answers)  # the next request plans with the edited voxels
    gated.go.set()
    deliver(widget._calls)

    assert widget.errors == []  # the request that opened the session was answered (or dropped: scene closed)
    first = gated.opened[0]
    assert session_gone(observer, first), f"session {first} ({what}) is still open on the server"
    if what == "voxels edited":
        assert len(answers) == 2 and k in answers[0][0] and k in answers[1][0]
        second = gated.opened[1]
        assert module.server.sessions.ids() == [second] and not session_gone(observer, second)
        assert observer.info()["sessions"] == 1
    else:
        assert module.server.sessions.ids() == []
        assert observer.info()["sessions"] == 0
        assert len(answers) == (0 if what == "scene closed" else 1)  # a closed scene's answer is dropped


def start_propagation(liversam_module, module: Module, widget, liver: np.ndarray, monkeypatch):
    """Press Propagate (the widget's onPropagate; markups, target segment and parameter node stubbed): a full
    propagation of the liver from a box on the middle slice. Returns the plan."""
    k = liver.shape[0] // 2
    prompts = module.prompts(liver[k], k)
    plan = module.server.plan_propagation(module.segmentation, module.volume, module.liver_id, None, prompts,
                                          dict(ServerRequests.PROPAGATION_DEFAULTS), WINDOW)  # fmt: skip
    widget._markupsPrompts, widget._targetSegment = (lambda: prompts), (lambda: (module.liver_id, None))
    widget.logic.planPropagation = lambda *args: plan
    monkeypatch.setattr(liversam_module.slicer.util, "tryWithErrorDisplay",
                        lambda *args, **kwargs: contextlib.nullcontext())  # fmt: skip
    widget.onPropagate()
    return plan


def two_sessions_and_a_running_job(liversam, module_widget, monkeypatch):
    """A 60-slice phantom and another CT, each with a session on the real server (a live update), and a propagation
    running on the first (a few slices propagated); (module, widget, gated client, plan)."""
    ct, liver = liver_phantom(nk=60)
    module, widget, gated = module_widget(ct)
    other = MRMLBridge.volume_node_from_ct(ct, "other", module.scene)  # another CT: a session of its own
    answers: list = []
    for volume in (module.volume, other):
        live_update(module, widget, liver, 30, answers, volume)
        deliver(widget._calls)
    assert widget.errors == [] and len(module.server.sessions.ids()) == 2
    plan = start_propagation(liversam, module, widget, liver, monkeypatch)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the job timer's ticks, until the server has propagated a few slices
        widget._pollJob()
        widget._calls.poll(0.1)
        if plan.job_id and (gated.job_status(plan.job_id).get("done") or 0) >= 2:
            break
    assert plan.job_id and gated.job_status(plan.job_id)["state"] == "running", "the job never ran"
    return module, widget, gated, plan


def test_cleanup_cancels_the_running_job_and_closes_the_modules_sessions(
    module_widget, widgets, server, monkeypatch
):
    """Reload (or exit) while a propagation runs on a remote server: the job used to run to its end and the module's
    sessions stayed open until the server's idle timeout."""
    liversam, _train = widgets
    module, widget, gated, plan = two_sessions_and_a_running_job(liversam, module_widget, monkeypatch)
    observer = server.client()
    assert observer.info()["sessions"] == 2

    started = time.monotonic()
    widget.cleanup()
    took = time.monotonic() - started
    print(f"cleanup: {took:.2f} s (job cancelled, 2 sessions closed)")
    assert took < MAX_CLEANUP_S
    info = observer.info()  # at once: the job no longer runs, no session is left
    assert info["jobs_running"] == 0 and info["jobs_queued"] == 0 and info["sessions"] == 0, info
    assert final_state(observer, plan.job_id) in ("cancelled", "gone")  # gone: forgotten with its session
    assert not widget._calls._thread.is_alive(), "the I/O thread still runs after cleanup"


def test_cleanup_while_the_ct_is_about_to_be_sent_sends_nothing_more(module_widget, widgets, server, monkeypatch):
    """Reload while the I/O thread is about to send the CT that starts a propagation: the CT is not sent after cleanup
    (it used to be sent, and the job started on it, only to be cancelled and its session closed); the server holds
    nothing of it."""
    liversam, _train = widgets
    ct, liver = liver_phantom(nk=60)
    module, widget, gated = module_widget(ct)
    observer = server.client()
    gated.hold = True
    plan = start_propagation(liversam, module, widget, liver, monkeypatch)
    module.poll_until(gated.uploading, "the CT was never sent")
    started = time.monotonic()
    widget.cleanup()
    took = time.monotonic() - started
    assert took < MAX_CLEANUP_S

    gated.go.set()  # the I/O thread goes on after the module was cleaned up (Slicer keeps running: a reload)
    widget._calls._thread.join(120)
    assert not widget._calls._thread.is_alive()
    assert not plan.job_id and gated.opened == []  # no CT sent, no job started
    info = observer.info()
    assert info["sessions"] == 0 and info["jobs_running"] == 0 and info["jobs_queued"] == 0, info


class SlowLink:
    """A slow network between the module and the server: a TCP relay that carries what the client sends at ``rate``
    bytes per second (the server's answers at full speed) and closes the server's side when the client closes its
    own, as a network does. Records how many bytes of the client it carried and when the client closed."""

    def __init__(self, port: int, rate: float) -> None:
        self.port, self.rate = port, float(rate)
        self.listener = socket.create_server(("127.0.0.1", 0))
        # small buffers on the relay's side: the bytes counted are the ones the client got out of its own buffer
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.carried = 0
        self.client_closed: float | None = None
        self.uploading = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        chunk = 16384
        try:
            while True:
                data = client.recv(chunk)
                if not data:
                    break
                upstream.sendall(data)
                self.carried += len(data)
                if self.carried > 1_000_000:
                    self.uploading.set()
                time.sleep(len(data) / self.rate)
        except OSError:
            pass
        if self.uploading.is_set() and self.client_closed is None:
            self.client_closed = time.monotonic()
        for sock in (upstream, client):
            with contextlib.suppress(OSError):
                sock.close()

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def test_cleanup_stops_a_ct_upload_under_way_and_the_server_keeps_nothing_of_it(
    module_widget, widgets, server, monkeypatch
):
    """Exit (or reload) while a CT of 40 MB is on its way to a remote server over a slow network (8 MB/s): the upload
    used to go on after cleanup, which waited 2 s for it in vain (Slicer's exit held up) and left it running: once the
    CT arrived the server opened a session for it, closed again only if Slicer still ran then (at exit, left to the
    server's idle timeout). Now cleanup stops it at once: the server drops the CT that did not arrive whole."""
    liversam, _train = widgets
    ct, liver = liver_phantom(nk=80, n=512)
    size = ct.array_kji.astype(np.int16).nbytes
    link = SlowLink(int(server.url.rsplit(":", 1)[1]), rate=8e6)
    try:
        module, widget, gated = module_widget(ct, url=link.url)
        observer = server.client()
        plan = start_propagation(liversam, module, widget, liver, monkeypatch)
        while not link.uploading.is_set():
            widget._calls.poll(0.05)
        started = time.monotonic()
        widget.cleanup()
        took = time.monotonic() - started
        while link.client_closed is None and time.monotonic() < started + 3.0:
            time.sleep(0.05)  # the relay carries what the client had in its send buffer (up to 4 MB), then sees it close
        print(f"cleanup during a {size / 1e6:.0f} MB upload: {took:.2f} s; the client closed the upload "
              f"{(link.client_closed or float('nan')) - started:.2f} s after cleanup began, "
              f"{link.carried / 1e6:.1f} MB carried")  # fmt: skip
        assert took < MAX_CLEANUP_S
        assert not widget._calls._thread.is_alive(), "the I/O thread still uploads after cleanup"
        assert link.client_closed is not None and link.client_closed - started < 1.5, "the upload went on"
        assert link.carried < size
        info = observer.info()
        assert info["sessions"] == 0 and info["jobs_running"] == 0 and info["jobs_queued"] == 0, info
        assert gated.opened == [] and not plan.job_id
    finally:
        link.close()


@contextlib.contextmanager
def hung_server(widget):
    """A remote server that accepts connections and never reads or answers (hung, or a network that drops the
    answers), made the widget's connected server; yields its listening socket."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # connections are accepted by the kernel; no one ever reads or answers
        connection = widget.logic.connection
        connection._client = LiverSAMClient(f"http://127.0.0.1:{hung.getsockname()[1]}", "token")
        connection.state = ServerConnection.READY
        yield hung


def a_running_job(module: Module, widget, liver: np.ndarray):
    """The module's state while job "j-running" propagates on a kept session "s-open" (nothing sent); the plan."""
    sessions = module.server.sessions
    sessions.ct_of(module.volume)
    assert sessions.keep((volume_key(module.volume), WINDOW), "s-open", sessions.generation)
    plan = module.server.plan_propagation(module.segmentation, module.volume, module.liver_id, None,
                                          module.prompts(liver[3], 3), {}, WINDOW)  # fmt: skip
    plan.job_id = "j-running"
    widget._job = {"plan": plan, "what": "Propagation", "cancelled": False}
    return plan


def assert_cancel_sent(hung: socket.socket) -> None:
    """The hung server received the cancel of job "j-running" (and never answered it)."""
    hung.settimeout(5)
    request, _address = hung.accept()
    request.settimeout(5)
    with request:
        assert b"/v1/jobs/j-running/cancel" in request.recv(4096)


def test_cleanup_gives_up_on_a_server_that_does_not_answer(module_widget):
    """A remote server that accepts connections and never answers (hung, or a network that drops the answers) holds
    Slicer's exit up for MAX_CLEANUP_S at most; the job's cancel was tried."""
    ct, liver = liver_phantom(nk=6)
    module, widget, _gated = module_widget(ct)
    with hung_server(widget) as hung:
        plan = a_running_job(module, widget, liver)
        started = time.monotonic()
        widget.cleanup()
        took = time.monotonic() - started
        print(f"cleanup with a server that does not answer: {took:.2f} s")
        assert took < MAX_CLEANUP_S
        assert_cancel_sent(hung)
    assert plan.cancelled and module.server.sessions.ids() == []


def test_a_request_whose_session_was_forgotten_and_lost_meanwhile_does_not_send_the_ct_again():
    """Its answer is dropped (scene closed, another server, module cleaned up): when the server has lost its session
    meanwhile (the module's cleanup closed it), the CT is not sent again only to open a session no one keeps."""
    ct, _liver = liver_phantom(nk=2, n=16)
    module, client = Module(ct), test_slicer_widget_state.Client()
    module.calls.close()
    session_of = module.server.session_work(module.volume, WINDOW)

    def request(session: str):
        module.server.forget()  # the main thread meanwhile: cleanup, or the scene closed; the session is closed
        raise ServerRequestError(
            404, f"unknown session '{session}': it does not exist", "POST", "/sessions/x/predict"
        )

    with pytest.raises(ServerRequestError, match="unknown session 's1'"):
        session_of.call(client, request)
    assert client.opened == ["s1"]  # no second upload


def test_closing_unkept_sessions_from_two_threads_at_once_does_not_fail():
    """The I/O thread (a job's end) and the cleanup thread (a cancel) may both close a request's unkept sessions: the
    other thread taking the last one between the emptiness check and the pop raised IndexError."""
    from LiverSAMLib.ServerSegmentation import CTSession

    class TakenMeanwhile(list):
        """A list that another thread empties right after this one has seen it non-empty (and closes its sessions;
        here this thread pops first, as the code now does without checking)."""

        def __bool__(self) -> bool:
            seen = len(self) > 0
            self.clear()
            return seen

        def __len__(self) -> int:
            return list.__len__(self)

    ct, _liver = liver_phantom(nk=2, n=16)
    module, client = Module(ct), test_slicer_widget_state.Client()
    module.calls.close()
    session_of = module.server.session_work(module.volume, WINDOW)
    assert isinstance(session_of, CTSession)
    session_of.unkept = TakenMeanwhile(["s-unkept"])
    session_of.close_unkept(client)  # no IndexError when the list is emptied between a check and a pop
    assert client.closed == ["s-unkept"] and list(session_of.unkept) == []
