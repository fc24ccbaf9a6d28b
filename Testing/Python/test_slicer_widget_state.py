"""The widgets' own code (LiverSAM.py, LiverSAMTrain.py) on slicer-core's real MRML, without the Slicer application.

Only what the application provides is replaced by small stand-ins: ``qt`` (a timer that records start / stop; labels and
buttons as plain attributes), ``slicer.i18n``, ``slicer.ScriptedLoadableModule`` and the parameter node wrapper (it
needs Qt). The scene, its events, ``slicer.util.VTKObservationMixin``, ``vtk.calldata_type``, the module's
``ServerSegmentation`` / ``CallQueue`` and the training process are the real ones.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import sys
import threading
import time
import types
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from slicer_harness import MODULE_DIR, REPO_ROOT, ensure_module_on_path, fresh_scene

ensure_module_on_path()
TRAIN_DIR = REPO_ROOT / "LiverSAMTrain"
if str(TRAIN_DIR) not in sys.path:
    sys.path.insert(0, str(TRAIN_DIR))

from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge, PromptPlacement  # noqa: E402
from LiverSAMLib.BackgroundCalls import CallQueue  # noqa: E402
from LiverSAMLib.SegmentationLogic import LIVER, SegmentationLogic  # noqa: E402
from LiverSAMLib.ServerClient import ServerRequestError  # noqa: E402
from LiverSAMLib.ServerSegmentation import ServerSegmentation  # noqa: E402
from LiverSAMTrainLib.TrainingProcess import TrainingProcess  # noqa: E402

pytestmark = pytest.mark.slicer
WINDOW = (40.0, 400.0)


class Timer:
    """``qt.QTimer`` as the widgets use it: start() (re)starts, stop() stops; counts both."""

    def __init__(self) -> None:
        self.active, self.starts, self.stops = False, 0, 0

    def start(self) -> None:
        self.active, self.starts = True, self.starts + 1

    def stop(self) -> None:
        self.active, self.stops = False, self.stops + 1

    def isActive(self) -> bool:
        return self.active


class Label:
    def __init__(self) -> None:
        self.text = ""

    def setText(self, text: str) -> None:
        self.text = text


class Log:
    """QPlainTextEdit: each line of the text appended is a paragraph of its own; ``calls`` counts the appends."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.calls = 0

    def appendPlainText(self, text: str) -> None:
        self.lines.extend(text.split("\n"))
        self.calls += 1


def _stub_module(monkeypatch, name: str, **members) -> None:
    module = types.ModuleType(name)
    for key, value in members.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def widgets(monkeypatch):
    """``(LiverSAM module, LiverSAMTrain module)`` loaded from their files with the application's parts stubbed."""
    base = {"__init__": lambda self, *args, **kwargs: None}
    _stub_module(monkeypatch, "qt", QTimer=Timer, QSettings=dict, QLabel=object)
    _stub_module(monkeypatch, "slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    names = ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
             "ScriptedLoadableModuleWidget")  # fmt: skip
    _stub_module(monkeypatch, "slicer.ScriptedLoadableModule", **{n: type(n, (), dict(base)) for n in names})
    parameters = ("LiverSAMParameterNode", "PostprocessParameters", "PropagationParameters")
    _stub_module(monkeypatch, "LiverSAMLib.Parameters", **dict.fromkeys(parameters, object))
    loaded = []
    for name, path in (
        ("LiverSAM", MODULE_DIR / "LiverSAM.py"),
        ("LiverSAMTrain", TRAIN_DIR / "LiverSAMTrain.py"),
    ):
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded.append(module)
    return tuple(loaded)


class Client:
    """The server calls the module makes when a CT is sent, closed or a job cancelled."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.cancelled: list[str] = []

    def open_volume(self, *args, **kwargs) -> dict:
        self.opened.append(f"s{len(self.opened) + 1}")
        return {"session_id": self.opened[-1]}

    def close_session(self, session: str) -> None:
        self.closed.append(session)

    def cancel_job(self, job: str) -> dict:
        self.cancelled.append(job)
        return {"state": "cancelled"}

    aborted = False

    def abort(self) -> int:
        """LiverSAMClient.abort: the connection gives this client up (server stopped or changed, module cleaned up)."""
        self.aborted = True
        return 0


def small_ct() -> CTVolume:
    geometry = ImageGeometry((8, 8, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    return CTVolume(np.arange(128, dtype=np.int16).reshape(2, 8, 8), geometry)


def deliver(calls: CallQueue) -> None:
    """Run the submitted calls and deliver their outcomes, as the widget's poll timer does (up to 2 minutes: on a
    2-core machine at load 8 a real server's calls took more than the 20 s this allowed before)."""
    for _ in range(12000):
        calls.poll(0.01)
        if calls.idle():
            return
    raise AssertionError("the I/O thread did not finish its calls")


@pytest.fixture
def liversam_widget(widgets):
    """The LiverSAM widget observing slicer-core's scene as ``setup()`` does; its logic reaches a fake server."""
    module, _train = widgets
    scene = fresh_scene()
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    module.VTKObservationMixin.__init__(widget)
    widget._calls, widget._jobTimer, widget._job = CallQueue(), Timer(), None
    widget.ui = SimpleNamespace(statusLabel=Label(), progressBar=SimpleNamespace(visible=False, value=0))
    widget._updateGUIState = lambda *args: None
    client = Client()
    widget.logic = SimpleNamespace(server=ServerSegmentation(SegmentationLogic(scene=scene)),
                                   connection=SimpleNamespace(client=client))  # fmt: skip
    for name in ("volumeRemoved", "cancelJob", "forgetSessions"):
        if hasattr(
            module.LiverSAMLogic, name
        ):  # (an older module lacks one: its test then fails on the behaviour)
            setattr(widget.logic, name, getattr(module.LiverSAMLogic, name).__get__(widget.logic))
    if hasattr(widget, "onNodeRemoved"):
        widget.addObserver(scene, scene.NodeRemovedEvent, widget.onNodeRemoved)  # as setup() does
    yield widget, scene, client
    widget.removeObservers()
    widget._calls.close()


def test_removing_a_volume_frees_its_ct_copy_and_closes_its_server_session(liversam_widget):
    """The CT copy kept to send the CT again (as large as the CT) used to stay until the scene closed."""
    widget, scene, client = liversam_widget
    volume = MRMLBridge.volume_node_from_ct(small_ct(), "ct", scene)
    other = MRMLBridge.volume_node_from_ct(small_ct(), "other", scene)
    assert widget.logic.server.session_work(volume, WINDOW)(client) == "s1"
    assert widget.logic.server.session_work(other, WINDOW)(client) == "s2"
    copy = weakref.ref(widget.logic.server.sessions.ct_of(volume).array_kji)

    scene.RemoveNode(volume)
    deliver(widget._calls)
    gc.collect()
    assert copy() is None  # the copy of the removed volume is gone
    assert client.closed == ["s1"]  # and its session closed on the server; the other volume's stays
    assert widget.logic.server.sessions.ids() == ["s2"]


def test_a_propagation_of_a_removed_volume_is_cancelled(liversam_widget):
    widget, scene, client = liversam_widget
    volume = MRMLBridge.volume_node_from_ct(small_ct(), "ct", scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")

    class Plan:
        volume_node, segmentation_node, cancelled, job_id = volume, segmentation, False, "j1"

        def cancel(self, client) -> None:
            self.cancelled = True
            client.cancel_job(self.job_id)

    plan = Plan()
    widget._job = {"plan": plan, "what": "Propagation", "cancelled": False}
    widget._jobTimer.start()
    scene.RemoveNode(volume)
    deliver(widget._calls)
    assert widget._job is None and not widget._jobTimer.active and plan.cancelled
    assert client.cancelled == ["j1"]  # the server stops the job: it would only be written into nothing
    assert "removed from the scene" in widget.ui.statusLabel.text


def test_a_volume_removed_unobserved_loses_its_copy_at_the_next_request():
    """Without the widget (the logic from the console): the next request drops the copies of removed volumes."""
    scene = fresh_scene()
    server, client = ServerSegmentation(SegmentationLogic(scene=scene)), Client()
    volume = MRMLBridge.volume_node_from_ct(small_ct(), "ct", scene)
    other = MRMLBridge.volume_node_from_ct(small_ct(), "other", scene)
    server.session_work(volume, WINDOW)(client)
    copy = weakref.ref(server.sessions.ct_of(volume).array_kji)
    scene.RemoveNode(volume)
    server.session_work(other, WINDOW)(client)
    gc.collect()
    assert copy() is None and server.sessions.ids() == ["s2"]


def test_a_session_opened_for_a_volume_removed_meanwhile_is_not_kept():
    scene = fresh_scene()
    server, client = ServerSegmentation(SegmentationLogic(scene=scene)), Client()
    volume = MRMLBridge.volume_node_from_ct(small_ct(), "ct", scene)
    session_of = server.session_work(volume, WINDOW)  # main thread; the I/O thread opens it later
    node_id = volume.GetID()
    scene.RemoveNode(volume)
    assert server.volume_removed(node_id) == []
    assert session_of(client) == "s1"
    assert server.sessions.ids() == []


def test_a_session_lost_twice_forgets_that_session_only(liversam_widget, widgets):
    """A click whose CT the server loses again after it was sent again fails with the server's message; the next
    click sends that CT again, while the other CTs' sessions and copies stay (they used to be forgotten too, so each
    was sent again, and left open on the server)."""
    module, _train = widgets
    widget, scene, client = liversam_widget
    volume = MRMLBridge.volume_node_from_ct(small_ct(), "ct", scene)
    other = MRMLBridge.volume_node_from_ct(small_ct(), "other", scene)
    server = widget.logic.server
    assert server.session_work(other, WINDOW)(client) == "s1"

    def lost(session: str):
        raise ServerRequestError(
            404, f"unknown session '{session}': it does not exist", "POST", f"/sessions/{session}/predict"
        )

    widget.logic.connection.state, widget.logic.connection.ensure = module.READY, lambda: client
    errors: list = []
    widget._serverLost, widget._showServerState = (lambda error: None), (lambda: None)
    widget._onError = lambda what, error: errors.append(error)
    session_of = server.session_work(volume, WINDOW)
    widget._withClient(lambda c: session_of.call(c, lost), lambda value: None, "Segment slice")
    deliver(widget._calls)
    assert [e.message for e in errors] == [
        "unknown session 's3': it does not exist"
    ]  # s2 lost, s3 lost again
    assert client.opened == ["s1", "s2", "s3"] and server.sessions.ids() == ["s1"]
    other_copy = server.sessions.ct_of(other)
    assert server.session_work(other, WINDOW).ct is other_copy  # no new copy of the other CT
    assert server.session_work(volume, WINDOW)(client) == "s4"  # the lost CT is sent again


class StartingClient(Client):
    """Starts a propagation only when the test lets it (the CT and masks on their way meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.starting, self.go = threading.Event(), threading.Event()

    def start_propagation(self, session: str, segments, settings=None) -> str:
        self.starting.set()
        assert self.go.wait(30), "the test never let the job start"
        return "j1"


def test_cancel_while_the_propagation_starts_cancels_the_job_on_the_server(
    liversam_widget, widgets, monkeypatch
):
    """Cancel pressed while the CT was on its way to start the job (and before the connection was made) used to do
    nothing: the job ran, polled and was written anyway, and Propagate could start a second one meanwhile."""
    module, _train = widgets
    widget, scene, _client = liversam_widget
    client = StartingClient()
    volume = MRMLBridge.volume_node_from_ct(small_ct(), "ct", scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    logic = widget.logic.server.segmentation
    logic.prepare_segmentation(segmentation, volume)
    liver_id = logic.ensure_segment(segmentation, LIVER)
    geometry = MRMLBridge.geometry_from_volume_node(volume)
    roi = PromptPlacement.new_box_node(scene)
    corners = geometry.ijk_to_ras(np.array([[1.0, 1.0, 0.0], [5.0, 5.0, 0.0]]))
    roi.SetCenterWorld(*corners.mean(axis=0))
    roi.SetSizeWorld(*(np.abs(corners[1] - corners[0]) + [0.0, 0.0, 0.5]))
    prompts = MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi])
    plan = widget.logic.server.plan_propagation(segmentation, volume, liver_id, None, prompts, {}, WINDOW)

    connection = widget.logic.connection
    connection.client, connection.state = None, module.READY  # connected by the start, on the I/O thread

    def ensure():
        connection.client = client
        return client

    connection.ensure = ensure
    widget._markupsPrompts, widget._targetSegment = (lambda: prompts), (lambda: (liver_id, None))
    widget._parameterNode, widget.logic.planPropagation = None, (lambda *args: plan)
    widget.logic.segmentation = logic
    monkeypatch.setattr(
        module.slicer.util, "tryWithErrorDisplay", lambda *args, **kwargs: contextlib.nullcontext()
    )

    widget.onPropagate()
    assert widget._job is not None  # busy at once: Propagate disabled, Cancel enabled
    deadline = time.monotonic() + 30
    while not client.starting.is_set() and time.monotonic() < deadline:
        widget._calls.poll(0.01)
    assert client.starting.is_set(), "the job was never started"
    widget.onCancel()
    client.go.set()
    deliver(widget._calls)
    assert client.cancelled == ["j1"] and plan.cancelled
    assert widget._job is None and not widget._jobTimer.active


# --- LiverSAMTrain ---------------------------------------------------------------------------------------------------
# A training command that, asked to stop, finishes its last step and reports DONE (exit code 0), as a run in its final
# epoch does; the test's fake clock keeps the grace period from running out.
FINISHING_SCRIPT = """
import json, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *args: stop.append(1))
print('ready', flush=True)
deadline = time.monotonic() + 60
while sys.argv[1] == 'wait-for-stop' and not stop and time.monotonic() < deadline:
    time.sleep(0.02)
print('LIVERSAM_DONE ' + json.dumps({'best_checkpoint': 'best.pth', 'registered_name': 'mine'}), flush=True)
"""


@pytest.fixture
def train_widget(widgets, tmp_path):
    _module, module = widgets
    widget = module.LiverSAMTrainWidget.__new__(module.LiverSAMTrainWidget)
    widget._check, widget._timer, widget._finished = None, Timer(), False
    widget._settings, widget._historyStamp = SimpleNamespace(epochs=1, out=str(tmp_path / "run")), None
    widget.logic = module.LiverSAMTrainLogic(process=TrainingProcess(clock=lambda: 0.0))
    buttons = {name: SimpleNamespace(enabled=True) for name in ("startButton", "resumeButton", "stopButton")}
    bar = SimpleNamespace(maximum=1, value=0)  # QProgressBar: its maximum is read when the run ends
    bar.setMaximum, bar.setValue = (lambda n: setattr(bar, "maximum", n)), (lambda n: setattr(bar, "value", n))
    widget.ui = SimpleNamespace(statusLabel=Label(), logTextEdit=Log(), progressBar=bar, **buttons)
    yield widget
    if widget.logic.process.is_running():
        widget.logic.process.kill()
        widget.logic.process.wait(30)


def _start(widget, tmp_path: Path, mode: str) -> None:
    """Start the stand-in command as ``_startChecked`` does; returns once its SIGTERM handler is in place."""
    widget.logic.process.start([sys.executable, "-c", FINISHING_SCRIPT, mode], tmp_path / "console.log")
    widget._timer.start()
    widget.ui.statusLabel.setText("Training...")
    log, deadline = tmp_path / "console.log", time.monotonic() + 60
    while (
        "ready" not in log.read_text() and time.monotonic() < deadline
    ):  # read here: the widget reads every line
        time.sleep(0.05)
    assert "ready" in log.read_text(), "the training command did not start"


def _poll_until_ended(widget) -> None:
    """The widget's timer ticks until it stops itself (the process has ended)."""
    deadline = time.monotonic() + 60
    while widget._timer.active and time.monotonic() < deadline:
        widget.poll()
        time.sleep(0.05)
    assert not widget._timer.active, "the training process did not end"


@pytest.mark.skipif(sys.platform == "win32", reason="a process cannot catch SIGTERM on Windows")
def test_a_run_that_finishes_during_the_stop_grace_period_says_done(train_widget, tmp_path):
    """Stop pressed in the last epoch: the run still completes (DONE, best model registered); the status used to say
    "Stopped. Resume continues from the last completed epoch."."""
    widget = train_widget
    _start(widget, tmp_path, "wait-for-stop")
    widget.onStop()
    assert widget.ui.statusLabel.text == "Stopping..." and not widget.ui.stopButton.enabled
    _poll_until_ended(widget)
    assert widget.logic.process.returncode == 0
    assert widget.ui.statusLabel.text.startswith("Done. Best model: best.pth (registered as 'mine')")
    assert not any("stopped" in line for line in widget.ui.logTextEdit.lines)
    assert (
        widget.ui.startButton.enabled and widget.ui.resumeButton.enabled and not widget.ui.stopButton.enabled
    )


def test_stop_after_the_run_ended_by_itself_reports_its_end_not_a_stop(train_widget, tmp_path):
    """The run finished between two timer ticks and the user pressed Stop: it was not stopped."""
    widget = train_widget
    _start(widget, tmp_path, "finish")
    widget.logic.process.wait(30)
    widget.onStop()
    assert widget.ui.statusLabel.text.startswith("Done. Best model: best.pth")
    assert not widget._timer.active and widget.ui.startButton.enabled and not widget.ui.stopButton.enabled


def test_the_done_event_line_is_what_the_trainer_prints():
    """The stand-in command's DONE line parses as the trainer's does (``TrainingLogic.parse_event``)."""
    from LiverSAMTrainLib import TrainingLogic

    line = "LIVERSAM_DONE " + json.dumps({"best_checkpoint": "best.pth"})
    assert TrainingLogic.parse_event(line) == ("DONE", {"best_checkpoint": "best.pth"})


def test_a_typed_server_python_path_is_applied_once_it_settles_not_at_each_keystroke(widgets, monkeypatch):
    """ctkPathLineEdit emits currentPathChanged at every keystroke (ctkPathLineEdit.cpp, updateHasValidInput): each
    one used to save the half-typed path, cancel the running propagation and stop the local server."""
    from LiverSAMLib.ServerConnection import ServerSettings

    module, _train = widgets
    saved: list[dict] = []

    class Store(dict):
        def setValue(self, key, value) -> None:
            self[key] = value

        def __del__(self) -> None:
            saved.append(dict(self))

    monkeypatch.setattr(module.qt, "QSettings", Store, raising=False)
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    widget._serverPathTimer = Timer()
    path = SimpleNamespace(currentPath="")
    widget.ui = SimpleNamespace(serverModeComboBox=SimpleNamespace(currentData="local"), serverPythonPathLineEdit=path,
                                serverUrlLineEdit=SimpleNamespace(text=""), serverTokenLineEdit=SimpleNamespace(text=""),
                                modelComboBox=SimpleNamespace(currentData="litemedsam"),
                                deviceComboBox=SimpleNamespace(currentText="auto"))  # fmt: skip
    widget.logic = SimpleNamespace(connection=SimpleNamespace(settings=ServerSettings(python="/old/bin/python")))
    reconfigured: list[ServerSettings] = []
    widget._reconfigureServer = lambda settings: reconfigured.append(settings)
    widget._showServerState = lambda: None

    for n in range(1, len("/opt/venv/bin/python") + 1):  # typed one character at a time
        path.currentPath = "/opt/venv/bin/python"[:n]
        widget._onServerPythonPathEdited(path.currentPath)
    assert reconfigured == [] and saved == []  # nothing applied while typing
    assert widget._serverPathTimer.active  # the settle timer runs (single-shot: restarted at each keystroke)

    widget._onServerSettingsEdited()  # the timer's timeout(): the path has settled
    assert [s.python for s in reconfigured] == ["/opt/venv/bin/python"]
    assert saved and saved[-1]["LiverSAM/Server/python"] == "/opt/venv/bin/python"
    assert not widget._serverPathTimer.active


def test_the_poll_never_blocks_slicer_when_no_call_is_outstanding():
    """The widget's 30 ms poll timer runs as long as the module exists: with nothing to deliver it used to wait 4 ms on
    every tick (13 % of Slicer's main thread), also while the user worked in other modules."""
    calls = CallQueue(poll_wait_s=0.5)
    waits: list = []
    real_get = calls._results.get

    def get(block=True, timeout=None):
        waits.append(timeout if block else 0.0)  # (get_nowait() is get(block=False))
        return real_get(block, timeout)

    calls._results.get = get
    try:
        assert calls.poll() == 0 and waits == [0.0]  # idle: no wait at all
        waits.clear()
        gate = threading.Event()
        calls.submit(lambda: gate.wait(5))
        gate.set()
        deliver(calls)
        assert 0.01 in waits  # a call outstanding: the poll waits (the I/O thread runs meanwhile)
    finally:
        calls.close()


def test_switching_the_target_segment_switches_the_prompts_sent(widgets):
    """A liver box kept while the user went on to the tumour was sent with the tumour's live update: the liver's
    whole cross-section was written into the tumour (clipped to the liver). Each segment now has its own prompts."""
    module, _train = widgets
    scene = fresh_scene()
    geometry = ImageGeometry((32, 32, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    volume = MRMLBridge.volume_node_from_ct(CTVolume(np.zeros((6, 32, 32), np.int16), geometry), "ct", scene)
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    module.VTKObservationMixin.__init__(widget)
    widget._interactionNode, widget._observedPromptNodes = None, []
    widget._parameterNode = SimpleNamespace(inputVolume=volume, targetSegmentID="", positivePoints=None,
                                            negativePoints=None, boxROI=None, liveUpdate=False)  # fmt: skip
    widget.logic = SimpleNamespace(segmentation=SimpleNamespace(end_user_action=lambda: None))

    def draw_box(k: int) -> None:
        roi = widget._promptNode(PromptPlacement.BOX)
        corners = geometry.ijk_to_ras(np.array([[4, 4, k], [20, 20, k]], float))
        roi.SetCenterWorld(*corners.mean(axis=0))
        roi.SetSizeWorld(*(np.abs(corners[1] - corners[0]) + [0.0, 0.0, 0.5]))

    draw_box(2)  # the liver's box, before any segment was chosen
    widget._parameterNode.targetSegmentID = "liver"  # the first segmentation made the liver the target
    assert widget._markupsPrompts().slices == [2]
    widget.onTargetSegmentChanged("tumor")
    assert widget._markupsPrompts().is_empty()  # the liver's box is not the tumour's
    draw_box(4)
    assert widget._markupsPrompts().slices == [4]
    widget.onTargetSegmentChanged("liver")  # back to the liver: its box again, not the lesion's
    assert widget._markupsPrompts().slices == [2]
    # a point placed with no target chosen, then a target chosen in the selector: the point is that segment's
    widget.onTargetSegmentChanged("")
    point = widget._promptNode(PromptPlacement.POSITIVE)
    point.AddControlPoint(*geometry.ijk_to_ras(np.array([[10.0, 10.0, 3.0]]))[0])
    assert widget._markupsPrompts().slices == [3]
    widget.onTargetSegmentChanged("vessels")
    assert widget._markupsPrompts().slices == [3] and widget._parameterNode.positivePoints is point
    widget.removeObservers()


def test_a_closing_scene_leaves_no_observation_on_its_prompt_nodes(widgets):  # noqa: F811
    """onSceneStartClose sets no parameter node: the prompt nodes' observations (holding the nodes about to be removed,
    and the widget's callbacks on them) used to stay until the module was shown again."""
    import vtk

    module, _train = widgets
    scene = fresh_scene()
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    module.VTKObservationMixin.__init__(widget)
    widget._parameterNode, widget._guiConnection, widget._observedPromptNodes = None, None, []
    widget._updateGUIState = lambda *args: None  # (Qt widgets)
    points = PromptPlacement.new_prompt_node(scene, PromptPlacement.POSITIVE, "liver")
    box = PromptPlacement.new_box_node(scene, "liver")
    parameters = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")  # the parameter node, its members as attributes
    parameters.positivePoints, parameters.negativePoints, parameters.targetSegmentID = points, None, "liver"
    widget._parameterNode = parameters
    widget.addObserver(parameters, vtk.vtkCommand.ModifiedEvent, widget._updateGUIState)  # as setParameterNode does
    widget._observePromptNodes()
    assert len(widget.Observations) > 0 and widget._observedPromptNodes == [points, box]
    widget.setParameterNode(None)  # a scene closing
    assert widget._observedPromptNodes == [] and widget.Observations == [], "the prompt nodes are still observed"
    scene.Clear(0)  # (the scene closes: its prompt nodes removed)
