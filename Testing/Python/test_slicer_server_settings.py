"""The LiverSAM module's Server section: its own code (``_setupServerSection``, ``_onServerSettingsEdited``,
``_showServerState``, ``onConnectServer``) on stand-ins for its Qt widgets that emit the signals the section connects to,
as Qt does (``currentIndexChanged(int)`` when the index changes and signals are not blocked).

1. Another model, device, Python or server chosen while a propagation runs used to cancel it and stop the local server
   without a word (review R1): the user is now asked first (``slicer.util.confirmOkCancelDisplay``), and Cancel keeps
   the propagation and puts the earlier choice back in the GUI.
2. The status line after such a change said "Not connected." (read as a failure); it now says what happens next
   (review R3).
3. The model list (review R2): entries no longer offered are removed; the configured model stays, marked; a registered
   model configured before a Slicer restart becomes "NAME (trained)" once the list is read; another LiverSAM Python
   drops the old environment's entries; a remote server's models are shown read-only, and the local choice is kept.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import slicer.util
from test_slicer_widget_state import Label, Timer, widgets  # noqa: F401  (the fixture)

from LiverSAMLib.BackgroundCalls import CallQueue

pytestmark = pytest.mark.slicer
#: Slicer's own helper (slicer-core's util.py, the same code as 5.10's), kept before a fixture replaces it
SLICERS_CONFIRM_OK_CANCEL = slicer.util.confirmOkCancelDisplay


class Signals:
    """``QObject.connect`` / ``blockSignals`` as PythonQt offers them."""

    def __init__(self) -> None:
        self.slots: dict[str, list] = {}
        self.blocked = False
        self.toolTip = ""
        self.enabled = True

    def connect(self, signal: str, slot) -> None:
        self.slots.setdefault(signal, []).append(slot)

    def blockSignals(self, block: bool) -> bool:  # noqa: N802 - Qt's name
        before, self.blocked = self.blocked, block
        return before

    def emit(self, signal: str, *args) -> None:
        if not self.blocked:
            for slot in self.slots.get(signal, []):
                slot(*args)


class Combo(Signals):
    """``QComboBox``: items (text, data, tooltip); setCurrentIndex emits currentIndexChanged(int) on a change."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[dict] = []
        self.currentIndex = -1

    def addItem(self, text: str, data=None) -> None:  # noqa: N802
        self.items.append({"text": text, "data": data, "tip": ""})
        if self.currentIndex < 0:
            self.setCurrentIndex(0)

    def clear(self) -> None:
        self.items = []
        self.setCurrentIndex(-1)

    def findData(self, data) -> int:  # noqa: N802
        return next((i for i, item in enumerate(self.items) if item["data"] == data), -1)

    def findText(self, text) -> int:  # noqa: N802
        return next((i for i, item in enumerate(self.items) if item["text"] == text), -1)

    def setItemData(self, index: int, value, role) -> None:  # noqa: N802
        assert role == "ToolTipRole"
        self.items[index]["tip"] = value

    def setCurrentIndex(self, index: int) -> None:  # noqa: N802
        if index != self.currentIndex:
            self.currentIndex = index
            self.emit("currentIndexChanged(int)", index)

    def choose(self, text: str) -> None:
        """The user picks an entry."""
        index = self.findText(text)
        assert index >= 0, (text, self.texts())
        self.setCurrentIndex(index)

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def currentData(self):  # noqa: N802
        return self.items[self.currentIndex]["data"] if self.currentIndex >= 0 else None

    @property
    def currentText(self) -> str:  # noqa: N802
        return self.items[self.currentIndex]["text"] if self.currentIndex >= 0 else ""

    def texts(self) -> list[str]:
        return [item["text"] for item in self.items]

    def tips(self) -> dict[str, str]:
        return {item["text"]: item["tip"] for item in self.items}


class PathEdit(Signals):
    """``ctkPathLineEdit``: setting currentPath emits currentPathChanged(QString)."""

    def __init__(self) -> None:
        super().__init__()
        self._path = ""

    @property
    def currentPath(self) -> str:  # noqa: N802
        return self._path

    @currentPath.setter
    def currentPath(self, path: str) -> None:  # noqa: N802
        if path != self._path:
            self._path = path
            self.emit("currentPathChanged(QString)", path)


class LineEdit(Signals):
    def __init__(self) -> None:
        super().__init__()
        self.text = ""


class Store(dict):
    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value) -> None:  # noqa: N802
        self[key] = value


def model(name: str, kind: str = "built-in", available: bool = True, description: str = "") -> dict:
    return {"name": name, "kind": kind, "available": available, "description": description}


@pytest.fixture
def server_section(widgets, monkeypatch, tmp_path):  # noqa: F811
    """``make(store, **settings) -> (module, widget, asked)``: the widget's Server section set up by its own
    ``_setupServerSection`` from the saved settings; ``asked``: the questions shown, answered by ``answer[0]``."""
    module, _train = widgets
    asked: list[str] = []
    answer = [True]
    monkeypatch.setattr(module.qt, "Qt", SimpleNamespace(ToolTipRole="ToolTipRole"), raising=False)
    monkeypatch.setattr(module.slicer.util, "confirmOkCancelDisplay",
                        lambda text, **kwargs: asked.append(text) or answer[0])  # fmt: skip
    monkeypatch.setattr(module.slicer, "app", SimpleNamespace(testingEnabled=lambda: False), raising=False)
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    made = []

    def make(**settings):
        store = Store({f"LiverSAM/Server/{k}": v for k, v in {"mode": "local", "python": str(python), **settings}.items()})
        monkeypatch.setattr(module.qt, "QSettings", lambda: store, raising=False)
        widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
        widget.logic = module.LiverSAMLogic(settingsStore=store)
        widget._calls, widget._job = CallQueue(), None
        widget._serverPathTimer, widget._jobTimer = Timer(), Timer()
        widget._updateGUIState = lambda *args: None
        model_combo = Combo()
        model_combo.toolTip = "the .ui's tooltip"
        widget.ui = SimpleNamespace(
            serverModeComboBox=Combo(), serverPythonPathLineEdit=PathEdit(), serverUrlLineEdit=LineEdit(),
            serverTokenLineEdit=LineEdit(), deviceComboBox=Combo(), modelComboBox=model_combo,
            addCheckpointButton=Signals(), serverConnectButton=Signals(), serverStopButton=Signals(),
            serverPythonLabel=Signals(), serverStatusLabel=Label(), statusLabel=Label(),
            progressBar=SimpleNamespace(visible=False, value=0),
        )  # fmt: skip
        widget._setupServerSection()
        widget.store, widget.answer = store, answer
        made.append(widget)
        return module, widget, asked

    yield make
    for widget in made:
        widget._calls.close()


def running_job(widget) -> dict:
    job = {"plan": SimpleNamespace(cancelled=False), "what": "Propagation", "cancelled": False}
    widget._job = job
    widget._jobTimer.start()
    widget.ui.progressBar.visible = True
    return job


def test_another_model_while_a_propagation_runs_asks_first_and_cancel_keeps_both(server_section):
    """Choosing another model used to cancel the running propagation and stop the local server at once."""
    module, widget, asked = server_section(model="litemedsam")
    connection = widget.logic.connection
    connection.models = [model("litemedsam"), model("runA", "registered")]
    widget._showServerState()
    job = running_job(widget)
    combo = widget.ui.modelComboBox

    widget.answer[0] = False  # the user presses Cancel
    combo.choose("runA (trained)")
    assert len(asked) == 1 and "A propagation is running" in asked[0] and "stopped" in asked[0]
    assert widget._job is job and not job["cancelled"] and not job["plan"].cancelled  # the propagation goes on
    assert widget._jobTimer.active and widget.ui.progressBar.visible
    assert combo.currentData == "litemedsam" and connection.settings.model == "litemedsam"  # the choice put back
    assert widget.store["LiverSAM/Server/model"] == "litemedsam"  # nothing saved

    widget.ui.deviceComboBox.choose("cpu")  # the same for the device (and the other settings)
    assert len(asked) == 2 and widget._job is job and widget.ui.deviceComboBox.currentText == "auto"

    widget.answer[0] = True  # OK: the settings change, the propagation is cancelled and says so
    combo.choose("runA (trained)")
    assert len(asked) == 3 and widget._job is None and job["plan"].cancelled and not widget._jobTimer.active
    assert connection.settings.model == "runA" and widget.store["LiverSAM/Server/model"] == "runA"
    assert "cancelled: the server was changed" in widget.ui.statusLabel.text


def test_no_question_without_a_propagation_and_the_status_says_what_happens_next(server_section):
    """The status line said "Not connected." after a model change: it reads as a failure (review R3)."""
    module, widget, asked = server_section(model="litemedsam")
    widget.logic.connection.models = [model("litemedsam"), model("runA", "registered")]
    widget._showServerState()
    widget.ui.modelComboBox.choose("runA (trained)")
    assert asked == [] and widget.logic.connection.settings.model == "runA"
    status = widget.ui.serverStatusLabel.text
    assert status == "Settings changed: the local server starts with model 'runA' at the next request (or press Connect)."
    widget.ui.deviceComboBox.choose("cpu")
    assert "starts with model 'runA' on cpu" in widget.ui.serverStatusLabel.text


def test_connect_during_a_propagation_with_other_settings_asks_too(server_section):
    """Connect applies a path still being typed and starts again after a failure: both cancel the propagation."""
    module, widget, asked = server_section()
    job = running_job(widget)
    submitted = []
    widget._withClient = lambda work, done, what, key=None: submitted.append(what)
    widget.answer[0] = False
    widget.ui.serverPythonPathLineEdit.blockSignals(True)
    widget.ui.serverPythonPathLineEdit.currentPath = "/typed/but/not/applied/python"
    widget.ui.serverPythonPathLineEdit.blockSignals(False)
    before = widget.logic.connection.settings.python
    widget.onConnectServer()
    assert len(asked) == 1 and widget._job is job and submitted == []
    assert widget.ui.serverPythonPathLineEdit.currentPath == before == widget.logic.connection.settings.python


def test_stale_models_are_removed_and_the_configured_one_is_marked(server_section):
    """The list only grew: a model removed from the registry or whose weights were deleted stayed, unmarked."""
    module, widget, _asked = server_section(model="runA")
    connection = widget.logic.connection
    combo = widget.ui.modelComboBox
    assert combo.texts() == ["litemedsam", "runA"]  # after a Slicer restart: the list is not read yet
    assert combo.currentData == "runA"

    connection.models = [model("litemedsam"), model("runA", "registered", description="liver, 12 studies"),
                         model("runB", "registered"), model("gone", "registered", available=False)]  # fmt: skip
    widget._showServerState()  # the list read (first request, or Connect)
    assert combo.texts() == ["litemedsam", "runA (trained)", "runB (trained)"]  # "runA" is now "runA (trained)"
    assert combo.currentData == "runA" and combo.tips()["runA (trained)"] == "liver, 12 studies"

    connection.models = [model("litemedsam"), model("runA", "registered", available=False)]  # runB unregistered,
    widget._showServerState()  # runA's checkpoint deleted: read again at Connect
    assert combo.texts() == ["litemedsam", "runA (weights missing)"] and combo.currentData == "runA"
    assert "no longer has this model's weights" in combo.tips()["runA (weights missing)"]

    connection.models = [model("litemedsam")]  # runA removed from the registry too
    widget._showServerState()
    assert combo.texts() == ["litemedsam", "runA (not found)"] and combo.currentData == "runA"
    assert "does not list 'runA'" in combo.tips()["runA (not found)"]
    assert connection.settings.model == "runA"  # marking chose nothing


def test_another_python_environment_drops_the_old_environments_models(server_section, tmp_path):
    module, widget, asked = server_section(model="litemedsam")
    connection = widget.logic.connection
    connection.models = [model("litemedsam"), model("runA", "registered"), model("sam_vit_b")]
    widget._showServerState()
    assert widget.ui.modelComboBox.texts() == ["litemedsam", "runA (trained)", "sam_vit_b"]
    other = tmp_path / "other" / "python"
    other.parent.mkdir()
    other.write_text("")
    widget.ui.serverPythonPathLineEdit.currentPath = str(other)  # typed / browsed: applied once it settles
    widget._onServerSettingsEdited()  # the settle timer's timeout
    assert connection.settings.python == str(other) and asked == []
    assert widget.ui.modelComboBox.texts() == ["litemedsam"]  # runA was the old environment's (choosing it would fail)


def test_a_remote_servers_models_are_shown_read_only_and_the_local_choice_is_kept(server_section):
    """A remote server runs the model it was started with; its list was never offered. The model list now shows what
    the remote server runs (its other models in the tooltip), disabled, and the local choice comes back with local."""
    module, widget, asked = server_section(model="runA", mode="remote", url="http://gpu:8123", token="t" * 24)
    connection = widget.logic.connection
    combo = widget.ui.modelComboBox
    assert combo.texts() == ["the server's model"] and not combo.enabled
    connection.state, connection.info = module.READY, {"model": {"name": "/srv/models/liver-v2.pt", "device": "cuda"}}
    connection.models = [model("litemedsam"), model("runX", "registered"), model("old", "registered", available=False)]
    widget._showServerState()
    assert combo.texts() == ["liver-v2.pt"] and not combo.enabled
    assert "runs 'liver-v2.pt'" in combo.toolTip and "litemedsam, runX (trained)" in combo.toolTip
    assert "old" not in combo.toolTip and "/srv" not in combo.toolTip
    assert widget._serverSettingsFromGui().model == "runA"  # the remote list does not change the local choice
    widget._showServerState()
    assert widget.store["LiverSAM/Server/model"] == "runA"

    widget.ui.serverModeComboBox.choose("local (started by LiverSAM)")
    assert connection.settings.mode == "local" and connection.settings.model == "runA"
    assert combo.texts() == ["litemedsam", "runA"] and combo.currentData == "runA"
    assert combo.toolTip == "the .ui's tooltip"
    assert combo.enabled


def test_a_checkpoint_file_stays_in_the_list(server_section, tmp_path, monkeypatch):
    """A checkpoint file chosen by hand (Checkpoint...) is not in the server's list: it stays, and so does LiteMedSAM
    to go back to (the list not read yet)."""
    module, widget, asked = server_section(model="litemedsam")
    path = str(tmp_path / "sam_vit_b_01ec64.pth")
    monkeypatch.setattr(module.qt, "QFileDialog", SimpleNamespace(getOpenFileName=lambda *args: path), raising=False)
    widget.parent = None
    widget.onAddCheckpoint()
    combo = widget.ui.modelComboBox
    assert combo.texts() == ["litemedsam", "sam_vit_b_01ec64.pth"] and widget.logic.connection.settings.model == path
    widget.logic.connection.models = [model("litemedsam"), model("runA", "registered")]
    widget._showServerState()
    assert combo.texts() == ["litemedsam", "runA (trained)", "sam_vit_b_01ec64.pth"] and combo.currentData == path
    combo.choose("litemedsam")  # and back
    assert widget.logic.connection.settings.model == "litemedsam" and "sam_vit_b_01ec64.pth" in combo.texts()


def test_a_list_rebuilt_while_the_question_is_open_still_shows_the_model_chosen(server_section):
    """The model list read again while the propagation question is open (a Connect's answer arriving) selected the
    model of then; after OK the list kept showing it, as the entries had not changed, and the next edit of another
    setting read it back: the server went back to the old model without a word (second review, D1)."""
    module, widget, asked = server_section(model="litemedsam")
    connection = widget.logic.connection
    connection.models = [model("litemedsam"), model("runA", "registered")]
    widget._showServerState()
    running_job(widget)

    def ok_after_a_rebuild(text, **kwargs):
        asked.append(text)
        widget._onConnected((None, [model("litemedsam"), model("runA", "registered"), model("runB", "registered")]))
        return True

    module.slicer.util.confirmOkCancelDisplay = ok_after_a_rebuild
    widget.ui.modelComboBox.choose("runA (trained)")
    assert connection.settings.model == "runA" and widget.ui.modelComboBox.currentData == "runA"
    widget.ui.deviceComboBox.choose("cpu")  # another setting: the model list is read with it
    assert connection.settings.model == "runA" and connection.settings.device == "cpu"


def test_connect_reading_a_remote_servers_list_again_updates_its_tooltip(server_section):
    """A remote server's other models are named in the list's tooltip; a model registered there later never appeared
    in it, as a list of the same entries was left alone, its tooltip too (second review, D2)."""
    module, widget, _asked = server_section(model="runA", mode="remote", url="http://gpu:8123", token="t" * 24)
    connection = widget.logic.connection
    connection.state, connection.info = module.READY, {"model": {"name": "litemedsam", "device": "cuda"}}
    connection.models = [model("litemedsam")]
    widget._showServerState()
    assert "runNew" not in widget.ui.modelComboBox.toolTip
    widget._onConnected((None, [model("litemedsam"), model("runNew", "registered")]))  # Connect: the list read again
    assert "runNew" in widget.ui.modelComboBox.toolTip


def test_a_python_path_typed_during_a_propagation_waits_for_it_to_end(server_section, tmp_path):
    """The path field reports every keystroke; a pause of 1.5 s while typing during a propagation asked about the
    half-typed path (Cancel erased the typing, OK applied it). It now waits, and is applied once no propagation runs."""
    module, widget, asked = server_section()
    job = running_job(widget)
    other = tmp_path / "other" / "bin" / "python"
    other.parent.mkdir(parents=True)
    other.write_text("")
    widget.ui.serverPythonPathLineEdit.currentPath = str(other)
    widget._onServerPathSettled()  # the settle timer fires while the propagation runs
    assert asked == [] and widget._job is job and widget.logic.connection.settings.python != str(other)
    widget._job = None  # the propagation ended
    widget._onServerPathSettled()
    assert asked == [] and widget.logic.connection.settings.python == str(other)


def test_in_slicers_testing_mode_a_change_during_a_propagation_is_applied(server_section, monkeypatch):
    """Slicer's testing mode (ctest, ``--testing``) shows no dialog. 5.10's ``confirmOkCancelDisplay`` (the same code as
    slicer-core's util.py, used here) then answers Cancel although its docstring says OK: it compares its testing answer
    True with ``QMessageBox.Ok``. A test changing a server setting during a propagation saw it put back without a word;
    the module now answers as documented, whatever Slicer's version: the change is applied, the propagation cancelled."""
    module, widget, asked = server_section(model="litemedsam")
    slicers_own = SLICERS_CONFIRM_OK_CANCEL
    monkeypatch.setattr(module.slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: asked.append(text) or
                        slicers_own(text, **kwargs))  # fmt: skip
    monkeypatch.setattr(module.slicer, "app", SimpleNamespace(testingEnabled=lambda: True, applicationName="Slicer"),
                        raising=False)  # fmt: skip
    monkeypatch.setattr(module.qt, "QMessageBox", SimpleNamespace(Ok=0x400, Cancel=0x400000, Question=4), raising=False)
    assert slicers_own("A question?") is False  # Slicer's helper in testing mode: Cancel
    connection = widget.logic.connection
    connection.models = [model("litemedsam"), model("runA", "registered")]
    widget._showServerState()
    job = running_job(widget)
    widget.ui.modelComboBox.choose("runA (trained)")
    assert asked == []  # the module answers by itself in testing mode
    assert widget._job is None and job["plan"].cancelled and connection.settings.model == "runA"
    assert widget.store["LiverSAM/Server/model"] == "runA"
