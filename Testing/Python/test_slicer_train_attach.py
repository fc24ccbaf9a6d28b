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

import pytest

from slicer_harness import REPO_ROOT, ensure_module_on_path

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
