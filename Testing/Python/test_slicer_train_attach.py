"""LiverSAMTrain follows a ``liversam train`` it did not start, or lost track of (``LiverSAMTrainLib.AttachedProcess``).

The training process outlives its widget (its own session, its output in a log file): after a module reload, or Slicer
closed and opened again, the new widget knew nothing of it: no progress, no Stop, and Start was refused because the run
folder was locked. The widget now finds the process that holds the run folder's lock (at setup, and when the run folder
field changes), shows its output and curves, stops it as it stops its own (SIGTERM, SIGKILL after the grace period) but
only while that PID still holds the lock, and says how it ended.

The processes here are real: a small Python script takes the run folder's lock with ``liversam.run_folder_lock`` as
``liversam train`` does, prints ``--events`` lines, and records the signals it gets in its own ``train.log``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_slicer_widget_state import Label, Log, Timer, widgets  # noqa: F401  (the fixture)

from slicer_harness import REPO_ROOT, ensure_module_on_path, fresh_scene

ensure_module_on_path()
TRAIN_DIR = REPO_ROOT / "LiverSAMTrain"
if str(TRAIN_DIR) not in sys.path:
    sys.path.insert(0, str(TRAIN_DIR))

from liversam.run_folder_lock import LOCK_NAME, holder  # noqa: E402
from LiverSAMTrainLib import AttachedProcess as attached_module  # noqa: E402
from LiverSAMTrainLib.AttachedProcess import AttachedProcess, StopRefused  # noqa: E402
from LiverSAMTrainLib.TrainingProcess import (  # noqa: E402
    PROCESS_RECORD_NAME,
    LogReader,
    TrainingProcess,
    read_process_record,
)

pytestmark = pytest.mark.slicer
POSIX_SIGNALS = pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be caught or ignored on Windows")

#: ``liversam train`` as far as the module sees it: holds the run folder, prints events, logs to train.log; records the
#: signals it gets there. argv: run folder, LiverSAM package folder, mode (run | ignore-term | finish | release).
HOLDER = r"""
import json, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from liversam.run_folder_lock import acquire, release
run, mode = Path(sys.argv[1]), sys.argv[3]
def log(text):
    with open(run / 'train.log', 'a') as handle:
        handle.write(text + '\n')
def on_term(signum, frame):
    log('got SIGTERM')
    print('got SIGTERM', flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == 'ignore-term' else on_term)
run.mkdir(parents=True, exist_ok=True)
lock = acquire(run)
log('INFO liversam.training.trainer: training started')
print('LIVERSAM_EPOCH ' + json.dumps({'epoch': 1, 'epochs': 3, 'val_dice_mean': 0.9, 'best_epoch': 1}), flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if (run / 'finish-now').exists():
        if mode == 'release':  # the lock released, the process still running (its PID holds nothing any more)
            release(lock)
            log('released')
            (run / 'finish-now').unlink()
            continue
        (run / 'result.json').write_text(json.dumps({'best_checkpoint': str(run / 'best.pt'), 'registered_name': 'mine'}))
        print('LIVERSAM_DONE ' + json.dumps({'best_checkpoint': str(run / 'best.pt'), 'registered_name': 'mine'}), flush=True)
        log('INFO liversam.training.trainer: finished')
        break
    time.sleep(0.02)
"""


def _wait(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition(), what


def _holder_command(run: Path, mode: str = "run") -> list[str]:
    return [sys.executable, "-c", HOLDER, str(run), str(REPO_ROOT / "LiverSAM"), mode]


def _start_elsewhere(run: Path, mode: str = "run") -> subprocess.Popen:
    """A ``liversam train`` started from a terminal (not by the module): returns once it holds the run folder."""
    process = subprocess.Popen(_holder_command(run, mode), stdout=subprocess.DEVNULL, start_new_session=True)
    _wait(lambda: holder(run) == process.pid, "the run did not take its folder's lock")
    return process


def _start_by_module(run: Path, mode: str = "run") -> TrainingProcess:
    """Started as LiverSAMTrainLogic.start does (console.log, the process record); returns once it holds the folder."""
    process = TrainingProcess()
    process.start(_holder_command(run, mode), run / "console.log", record_path=run / PROCESS_RECORD_NAME)
    _wait(lambda: holder(run) == process.pid, "the run did not take its folder's lock")
    return process


def _end(process) -> None:
    if isinstance(process, subprocess.Popen):
        if process.poll() is None:
            process.kill()
        process.wait(30)
    elif process.is_running():
        process.kill()
        process.wait(30)


def _ended(attached: AttachedProcess, timeout_s: float = 30.0) -> bool:
    """Poll as the widget's timer does until the attached process is seen to have ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        attached.escalate_stop()
        if not attached.is_running():
            return True
        time.sleep(0.02)
    return False


# --- the logic -------------------------------------------------------------------------------------------------------
def test_a_run_the_module_started_is_found_with_its_console_from_where_its_output_begins(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "console.log").write_text('LIVERSAM_DONE {"best_checkpoint": "an earlier run"}\nearlier run\n')
    assert AttachedProcess.find(run) is None and AttachedProcess.find("") is None  # nobody holds it
    process = _start_by_module(run)
    try:
        record = read_process_record(run / PROCESS_RECORD_NAME)
        assert record["pid"] == process.pid and record["log_offset"] == len(b'LIVERSAM_DONE {"best_checkpoint": '
                                                                            b'"an earlier run"}\nearlier run\n')
        attached = AttachedProcess.find(run)
        assert attached.pid == process.pid and attached.console and attached.log_path == run / "console.log"
        assert attached.is_running() and attached.holds_folder() and attached.returncode is None
        assert attached.since == pytest.approx((run / LOCK_NAME).stat().st_mtime)
        assert abs(attached.since - time.time()) < 60 and attached.epochs is None  # (no --epochs in this command)
        lines: list[str] = []
        _wait(lambda: lines.extend(attached.read_lines()) or any("LIVERSAM_EPOCH" in line for line in lines),
              "its output was not read")  # fmt: skip
        assert "earlier run" not in lines and not any("an earlier run" in line for line in lines)  # not the last run's
    finally:
        _end(process)


def test_a_long_output_is_replayed_from_its_last_lines_only(tmp_path, monkeypatch):
    """Hours of cache progress make a long console: only its end is read again, from a line's start."""
    monkeypatch.setattr(attached_module, "REPLAY_BYTES", 100)
    run = tmp_path / "run"
    run.mkdir()
    (run / "console.log").write_text("".join(f"line {n:03d} of an earlier run\n" for n in range(5)))
    process = _start_by_module(run)
    try:
        _wait(lambda: "LIVERSAM_EPOCH" in (run / "console.log").read_text(), "no epoch")  # (it prints nothing more)
        with open(run / "console.log", "a") as console:
            console.write("".join(f"line {n:03d} of this run\n" for n in range(50)))
        attached = AttachedProcess.find(run)
        assert attached.console and attached.skipped
        lines = attached.read_lines()  # 21 bytes a line: the last 4 whole lines of the last 100 bytes
        assert lines == [f"line {n:03d} of this run" for n in range(46, 50)], lines
    finally:
        _end(process)


def test_a_run_started_elsewhere_is_read_from_its_own_log(tmp_path):
    """A terminal's run (or a process record naming another PID): its console is not known; train.log is read, from
    its last lines on."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("".join(f"earlier line {n}\n" for n in range(30)))
    (run / PROCESS_RECORD_NAME).write_text(json.dumps({"pid": 1, "started": 0, "log": str(run / "console.log"),
                                                       "log_offset": 0, "command": []}))  # fmt: skip
    (run / "config.json").write_text(json.dumps({"epochs": 12}))
    process = _start_elsewhere(run)
    try:
        _wait(lambda: "training started" in (run / "train.log").read_text(), "the run wrote nothing")
        attached = AttachedProcess.find(run)
        assert attached.pid == process.pid and not attached.console and attached.log_path == run / "train.log"
        assert attached.epochs == 12  # from the run's config.json
        assert attached.earlier[0] == "earlier line 21" and attached.earlier[-1].endswith("training started")
        assert len(attached.earlier) == attached_module.TAIL_LINES
        (run / "train.log").open("a").write("a new line\n")
        assert "a new line" in attached.read_lines()
    finally:
        _end(process)


@POSIX_SIGNALS
def test_stop_sends_the_lock_holder_sigterm_and_its_end_is_noticed(tmp_path):
    run = tmp_path / "run"
    process = _start_elsewhere(run)
    try:
        attached = AttachedProcess.find(run)
        attached.stop(grace_seconds=30)
        assert attached.stop_requested
        assert _ended(attached)
        assert process.wait(30) == 143  # it ended by itself, on SIGTERM (its handler ran): not killed
        assert "got SIGTERM" in (run / "train.log").read_text()
        assert not attached.stopping and not attached.is_running() and holder(run) is None
        attached.read_lines()  # (the widget's poll reads them)
        summary, last = attached.outcome()
        assert summary is None and last == "got SIGTERM"
    finally:
        _end(process)


@POSIX_SIGNALS
def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    now = [0.0]
    run = tmp_path / "run"
    process = _start_elsewhere(run, "ignore-term")
    try:
        attached = AttachedProcess(run, process.pid, clock=lambda: now[0])
        attached.stop(grace_seconds=10)
        now[0] = 9.9
        assert attached.escalate_stop() is True and process.poll() is None  # within the grace period
        now[0] = 10.0
        attached.escalate_stop()
        assert process.wait(30) == -signal.SIGKILL
        now[0] = 10.0 + attached_module.END_WAIT_SECONDS
        assert _ended(attached)
    finally:
        _end(process)


@POSIX_SIGNALS
def test_a_pid_that_no_longer_holds_the_run_folder_is_never_signalled(tmp_path):
    """PIDs are reused: the PID in train.lock, or the one attached to, may name another process by the time Stop is
    pressed. Only the process holding the lock is signalled."""
    run = tmp_path / "run"
    process = _start_elsewhere(run, "release")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        attached = AttachedProcess.find(run)
        (run / "finish-now").touch()  # it releases the lock and keeps running
        _wait(lambda: holder(run) is None, "the lock was not released")
        attached.stop(grace_seconds=0)
        attached.kill()
        assert process.poll() is None and bystander.poll() is None  # neither was signalled
        assert "got SIGTERM" not in (run / "train.log").read_text() and not attached.stop_requested

        # the lock held by one process, the attached PID another's (a PID reused): that other process is not signalled
        held = _start_elsewhere(tmp_path / "other")
        try:
            reused = AttachedProcess(tmp_path / "other", bystander.pid)
            assert not reused.holds_folder()
            reused.stop(grace_seconds=0)
            reused.kill()
            time.sleep(0.2)
            assert bystander.poll() is None and held.poll() is None
        finally:
            _end(held)
    finally:
        _end(process)
        _end(bystander)


def test_a_run_whose_pid_is_unknown_is_not_stopped_from_here(tmp_path):
    run = tmp_path / "run"
    process = _start_elsewhere(run)
    try:
        unknown = AttachedProcess(run, 0)
        with pytest.raises(StopRefused, match="PID could not be read"):
            unknown._signal(signal.SIGTERM)
        assert process.poll() is None
    finally:
        _end(process)


def test_a_finished_run_tells_its_best_model_and_an_earlier_result_is_not_taken_for_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"best_checkpoint": "old.pt"}))
    os.utime(run / "result.json", (time.time() - 3600, time.time() - 3600))  # an earlier run's
    process = _start_by_module(run)
    try:
        attached = AttachedProcess.find(run)
        assert attached.outcome()[0] is None  # the earlier run's result.json
        (run / "finish-now").touch()
        assert _ended(attached) and process.wait(30) == 0
        lines = attached.read_lines()
        summary, last = attached.outcome()
        assert summary["registered_name"] == "mine" and summary["best_checkpoint"] == str(run / "best.pt")
        assert any(line.startswith("LIVERSAM_DONE") for line in lines) and last.startswith("LIVERSAM_DONE")
    finally:
        _end(process)


def test_log_lines_with_windows_line_ends_are_read():
    """Python's stdout on Windows ends lines with \\r\\n; a line's last \\r was taken for a tqdm update: every line
    came out empty there, its events too."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "console.log"
        path.write_bytes(b'LIVERSAM_EPOCH {"epoch": 1}\r\n10%\r50%\r\npartial')
        assert LogReader(path).read_lines() == ['LIVERSAM_EPOCH {"epoch": 1}', "50%"]


# --- the widget ------------------------------------------------------------------------------------------------------
class QtTimer(Timer):
    def setInterval(self, ms: int) -> None:  # noqa: N802 - Qt's names
        self.interval = ms

    def setSingleShot(self, single: bool) -> None:  # noqa: N802
        self.single = single

    def connect(self, signal_name: str, slot) -> None:
        self.slot = slot


class Widget(SimpleNamespace):
    """A Qt widget: its properties as attributes, its signals connected by name."""

    def connect(self, signal_name: str, slot) -> None:
        self.__dict__.setdefault("slots", {})[signal_name] = slot

    def setText(self, text: str) -> None:  # noqa: N802
        self.text = text

    def setMaximum(self, value: int) -> None:  # noqa: N802
        self.maximum = value

    def setValue(self, value: int) -> None:  # noqa: N802
        self.value = value


def set_up(train, monkeypatch, run_dir: Path):
    """``LiverSAMTrainWidget()`` + ``setup()`` as Slicer runs them, its .ui's widgets stood in for; the run folder field
    holding ``run_dir`` (Slicer keeps the field's last path across a reload)."""
    fresh_scene()
    ui = SimpleNamespace(
        outputPathLineEdit=Widget(currentPath=str(run_dir)), dataPathLineEdit=Widget(currentPath=""),
        runFolderStatusLabel=Widget(text="", visible=True),
        statusLabel=Label(), logTextEdit=Log(), progressBar=Widget(maximum=100, value=0),
        curvesComboBox=Widget(currentIndex=0),
        **{name: Widget(enabled=True) for name in ("addPairButton", "clearPairsButton", "startButton", "resumeButton",
                                                    "stopButton")},
    )  # fmt: skip
    monkeypatch.setattr(train.qt, "QTimer", QtTimer, raising=False)
    monkeypatch.setattr(train.slicer, "app", SimpleNamespace(
        majorVersion=5, minorVersion=10, testingEnabled=lambda: True,  # (error dialogs are logged only)
        setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None), raising=False)  # fmt: skip
    monkeypatch.setattr(train.qt, "Qt", SimpleNamespace(WaitCursor=3), raising=False)
    monkeypatch.setattr(train.ScriptedLoadableModuleWidget, "setup", lambda self: None, raising=False)
    monkeypatch.setattr(train.slicer.util, "loadUI", lambda path: SimpleNamespace(setMRMLScene=lambda scene: None))
    monkeypatch.setattr(train.slicer.util, "childWidgetVariables", lambda widget: ui)
    widget = train.LiverSAMTrainWidget()
    widget.layout = SimpleNamespace(addWidget=lambda w: None)
    widget.resourcePath = lambda path: path
    widget.setup()
    return widget


def buttons(widget) -> tuple[bool, bool, bool]:
    return widget.ui.startButton.enabled, widget.ui.resumeButton.enabled, widget.ui.stopButton.enabled


def poll_until_ended(widget) -> None:
    _wait(lambda: widget.poll() or not widget._timer.active, "the widget did not notice the end")


@POSIX_SIGNALS
def test_a_widget_made_again_follows_the_run_its_predecessor_started_and_stops_it(widgets, tmp_path, monkeypatch):  # noqa: F811
    """The module reloaded while its training runs: the new widget shows the run (PID, since when), its output since it
    started and its progress, Stop enabled; Stop sends SIGTERM (the run ends by itself), and Start comes back."""
    _liversam, train = widgets
    run = tmp_path / "run"
    monkeypatch.setattr(train.TrainingLogic, "environment_problem", lambda python: None)
    monkeypatch.setattr(train.TrainingLogic, "build_train_command", lambda settings, python: _holder_command(run))
    first = set_up(train, monkeypatch, run)
    assert buttons(first) == (True, True, False)
    first.logic.start(train.TrainingLogic.TrainingSettings(data="d", out=str(run), epochs=3), sys.executable)
    pid = first.logic.process.pid
    _wait(lambda: holder(run) == pid, "the run did not take its folder's lock")
    _wait(lambda: "LIVERSAM_EPOCH" in (run / "console.log").read_text(), "no epoch")
    first.cleanup()  # Reload: the process keeps running
    try:
        widget = set_up(train, monkeypatch, run)  # the new widget
        assert buttons(widget) == (False, False, True) and widget._timer.active  # Stop enabled, Start / Resume not
        note = widget.ui.runFolderStatusLabel.text
        assert f"PID {pid}" in note and "since 20" in note and widget.ui.runFolderStatusLabel.visible
        assert widget.ui.statusLabel.text.startswith("Epoch 1/3: validation Dice 0.900")  # its output, read again
        assert widget.ui.progressBar.value == 1 and widget.ui.progressBar.maximum == 3
        widget.onStop()
        assert widget.ui.statusLabel.text == "Stopping..." and buttons(widget) == (False, False, False)
        poll_until_ended(widget)
        assert first.logic.process.wait(30) == 143 and "got SIGTERM" in (run / "train.log").read_text()
        assert widget.ui.statusLabel.text == "Stopped. Resume continues from the last completed epoch."
        assert "has ended" in widget.ui.runFolderStatusLabel.text and buttons(widget) == (True, True, False)
        widget.cleanup()
    finally:
        _end(first.logic.process)


def test_a_terminals_run_that_finishes_says_done_and_which_model_it_registered(widgets, tmp_path, monkeypatch):  # noqa: F811
    """A run started from a terminal prints no events into a file the module reads: its progress comes from
    history.csv, its log from train.log, and its end from result.json."""
    _liversam, train = widgets
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 5}))
    (run / "history.csv").write_text("epoch,train_loss,val_loss,val_dice_mean\n0,,0.4,0.81\n1,0.5,0.35,0.86\n")
    process = _start_elsewhere(run)
    monkeypatch.setattr(train.slicer.modules, "plots", SimpleNamespace(logic=lambda: SimpleNamespace(
        ShowChartInLayout=lambda chart: None)), raising=False)  # fmt: skip
    try:
        widget = set_up(train, monkeypatch, run)
        assert buttons(widget) == (False, False, True)
        assert f"PID {process.pid}" in widget.ui.runFolderStatusLabel.text
        assert widget.ui.statusLabel.text.startswith("Epoch 1/5 done: validation Dice 0.860")
        assert (widget.ui.progressBar.value, widget.ui.progressBar.maximum) == (1, 5)
        assert widget.logic.tableNode.GetTable().GetNumberOfRows() == 2  # the curves
        assert any("training started" in line for line in widget.ui.logTextEdit.lines)  # train.log's last lines
        (run / "finish-now").touch()
        poll_until_ended(widget)
        assert process.wait(30) == 0
        assert widget.ui.statusLabel.text == f"Done. Best model: {run / 'best.pt'} (registered as 'mine')"
        assert "has finished" in widget.ui.runFolderStatusLabel.text and buttons(widget) == (True, True, False)
        widget.cleanup()
    finally:
        _end(process)


def test_choosing_another_run_folder_follows_its_run_and_leaves_the_last_one_running(widgets, tmp_path, monkeypatch):  # noqa: F811
    _liversam, train = widgets
    idle, busy = tmp_path / "idle", tmp_path / "busy"
    idle.mkdir()
    process = _start_elsewhere(busy)
    try:
        widget = set_up(train, monkeypatch, idle)
        assert buttons(widget) == (True, True, False)
        assert not widget.ui.runFolderStatusLabel.visible  # hidden: nothing runs in the run folder
        field = widget.ui.outputPathLineEdit
        for n in range(1, len(str(busy)) + 1):  # typed: looked at once it settles, not at each keystroke
            field.currentPath = str(busy)[:n]
            field.slots["currentPathChanged(QString)"](field.currentPath)
        assert widget._runFolderTimer.active and buttons(widget) == (True, True, False)
        widget._runFolderTimer.slot()  # settled
        assert buttons(widget) == (False, False, True)
        assert f"PID {process.pid}" in widget.ui.runFolderStatusLabel.text and widget.ui.runFolderStatusLabel.visible

        field.currentPath = str(idle)  # another folder: that run is followed no longer, and keeps running
        widget._followRunInFolder()
        assert buttons(widget) == (True, True, False) and not widget.ui.runFolderStatusLabel.visible
        assert not widget._timer.active and process.poll() is None
        assert any(f"(PID {process.pid})" in line and "keeps running" in line for line in widget.ui.logTextEdit.lines)
        widget.cleanup()
    finally:
        _end(process)


def test_start_in_a_folder_a_run_took_meanwhile_follows_that_run(widgets, tmp_path, monkeypatch):  # noqa: F811
    """A run started from a terminal after the folder was chosen: Start follows it instead of refusing it."""
    _liversam, train = widgets
    run = tmp_path / "run"
    widget = set_up(train, monkeypatch, run)
    assert buttons(widget) == (True, True, False)
    process = _start_elsewhere(run)
    try:
        widget.onStart()
        assert widget._check is None  # nothing started
        assert buttons(widget) == (False, False, True)
        assert f"PID {process.pid}" in widget.ui.runFolderStatusLabel.text
        assert any("already running in this run folder" in line for line in widget.ui.logTextEdit.lines)
        widget.cleanup()
    finally:
        _end(process)
