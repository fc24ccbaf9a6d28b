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
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_slicer_widget_state import Label, Log, Timer, widgets  # noqa: F401  (the fixture)

from slicer_harness import REPO_ROOT, ensure_module_on_path, fresh_scene

ensure_module_on_path()
TRAIN_DIR = REPO_ROOT / "LiverSAMTrain"
if str(TRAIN_DIR) not in sys.path:
    sys.path.insert(0, str(TRAIN_DIR))

from liversam.run_folder_lock import LOCK_NAME, acquire, holder, release  # noqa: E402
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
#: signals it gets there. argv: run folder, LiverSAM package folder, mode (run | ignore-term | release | name-other
#: (argv[4]: the PID its lock file names instead of its own) | other-host (its lock file says it runs elsewhere) |
#: old-format (its lock file as an earlier version writes it: the PID alone) | no-pid (no PID readable)).
HOLDER = r"""
import json, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from liversam.run_folder_lock import acquire, release
PID_FIELD_BYTES = 32  # (liversam.run_folder_lock.PID_FIELD_BYTES)
run, mode = Path(sys.argv[1]), sys.argv[3]
def log(text):
    with open(run / 'train.log', 'a') as handle:
        handle.write(text + '\n')
def on_term(signum, frame):
    log('got SIGTERM')
    print('got SIGTERM', flush=True)
    time.sleep(0.5)  # ends a moment later, as a run finishing its step does: Stop's 'Stopping...' is seen first
    sys.exit(143)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == 'ignore-term' else on_term)
run.mkdir(parents=True, exist_ok=True)
lock = acquire(run)
lock.seek(1 + PID_FIELD_BYTES)
identity = lock.read()
if mode == 'name-other':
    lock.seek(1)
    lock.write(f'{sys.argv[4]}\n'.ljust(PID_FIELD_BYTES).encode())
elif mode == 'no-pid':
    lock.seek(1)
    lock.write(b' ' * PID_FIELD_BYTES)
elif mode == 'old-format':
    lock.seek(1)
    lock.truncate()
    lock.write(f'{os.getpid()}\n'.encode())
elif mode == 'other-host':
    elsewhere = dict(json.loads(identity or b'{}'), host='elsewhere', boot_id='another-boot')
    lock.seek(1)
    lock.truncate()
    lock.write(f'{os.getpid()}\n'.ljust(PID_FIELD_BYTES).encode() + (json.dumps(elsewhere) + '\n').encode())
lock.flush()
log('INFO liversam.training.trainer: training started')
print('training on 3 epochs', flush=True)
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


def _holder_command(run: Path, mode: str = "run", *args: str) -> list[str]:
    return [sys.executable, "-c", HOLDER, str(run), str(REPO_ROOT / "LiverSAM"), mode, *args]


def _started(run: Path) -> bool:
    """The holder has taken the lock, written its lock file and logged "training started" (run folders here start
    without that line)."""
    try:
        return "training started" in (run / "train.log").read_text()
    except OSError:
        return False


def _start_elsewhere(run: Path, mode: str = "run", *args: str) -> subprocess.Popen:
    """A ``liversam train`` started from a terminal (not by the module): returns once it holds the run folder, its
    lock file written and "training started" in its train.log."""
    process = subprocess.Popen(_holder_command(run, mode, *args), stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: _started(run) or process.poll() is not None, "the run did not start")
        assert _started(run) and holder(run) is not None, "the run did not take its folder's lock"
    except BaseException:
        _end(process)
        raise
    return process


def _start_by_module(run: Path, mode: str = "run") -> TrainingProcess:
    """Started as LiverSAMTrainLogic.start does (console.log, the process record); returns once it holds the folder."""
    process = TrainingProcess()
    process.start(_holder_command(run, mode), run / "console.log", record_path=run / PROCESS_RECORD_NAME)
    try:
        _wait(lambda: _started(run) or not process.is_running(), "the run did not start")
        assert _started(run) and holder(run) == process.pid, "the run did not take its folder's lock"
    except BaseException:
        _end(process)
        raise
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
    bystander = _bystander()
    frozen = lambda: 0.0  # noqa: E731 - within END_WAIT_SECONDS for good: is_running() stays True, holds_folder() decides
    try:
        attached = AttachedProcess.find(run, clock=frozen)
        (run / "finish-now").touch()  # it releases the lock and keeps running
        _wait(lambda: holder(run) is None, "the lock was not released")
        assert attached.is_running() and not attached.holds_folder()
        attached.stop(grace_seconds=0)
        attached.kill()
        assert not attached.stop_requested and attached.is_running()  # nothing sent
        assert "got SIGTERM" not in (run / "train.log").read_text() and process.poll() is None

        # the lock held by one process, the attached PID another's (a PID reused): that other process is not signalled
        held = _start_elsewhere(tmp_path / "other")
        try:
            reused = AttachedProcess(tmp_path / "other", bystander.pid, clock=frozen)
            assert not reused.holds_folder() and reused.is_running()
            reused.stop(grace_seconds=0)
            reused.kill()
            assert not reused.stop_requested and held.poll() is None
        finally:
            _end(held)
        assert _bystander_report(bystander) == "nothing"
    finally:
        _end(process)
        _end(bystander)


BYSTANDER = r"""
import signal, sys
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
print('ready', flush=True)
sys.stdin.readline()
print('got SIGTERM' if got else 'nothing', flush=True)
"""


def _bystander() -> subprocess.Popen:
    """A process that is no training run; :func:`_bystander_report` tells whether it got SIGTERM (a signal sent before
    the report is asked for is handled before it reads the request)."""
    process = subprocess.Popen([sys.executable, "-c", BYSTANDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def _bystander_report(process: subprocess.Popen) -> str:
    out, _ = process.communicate("report\n", timeout=60)
    return out.strip()


@POSIX_SIGNALS
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/<pid>/fd")
def test_a_process_whose_pid_the_lock_file_names_but_that_does_not_hold_it_is_never_signalled(tmp_path):
    """holds_folder() checked that the lock is held and that train.lock names the PID, not that the process with that
    PID holds it: a holder that named another process (or one in another PID namespace, on another machine, or writing
    its PID just now) had that process signalled. The process must have the lock file open (/proc/<pid>/fd)."""
    run = tmp_path / "run"
    bystander = _bystander()
    process = _start_elsewhere(run, "name-other", str(bystander.pid))
    try:
        attached = AttachedProcess.find(run, clock=lambda: 0.0)
        assert attached.pid == bystander.pid and attached.holds_folder()
        with pytest.raises(StopRefused, match=f"PID {bystander.pid}, which .* names, does not have that lock file open"):
            attached.stop(grace_seconds=0)
        with pytest.raises(StopRefused):
            attached.kill()
        assert not attached.stop_requested
        assert _bystander_report(bystander) == "nothing" and process.poll() is None
    finally:
        _end(process)
        _end(bystander)


@POSIX_SIGNALS
def test_a_run_whose_lock_file_says_it_runs_elsewhere_is_not_signalled(tmp_path):
    """A run in a container or on another machine sharing the folder: its PID is another process here."""
    run = tmp_path / "run"
    process = _start_elsewhere(run, "other-host")
    try:
        attached = AttachedProcess.find(run, clock=lambda: 0.0)
        assert attached.pid == process.pid
        with pytest.raises(StopRefused, match="runs on another machine or in another container .*host 'elsewhere'"):
            attached.stop(grace_seconds=0)
        assert not attached.stop_requested and process.poll() is None
        assert "got SIGTERM" not in (run / "train.log").read_text()
    finally:
        _end(process)


@POSIX_SIGNALS
def test_a_run_of_an_earlier_version_is_stopped_on_linux_and_refused_where_it_cannot_be_verified(tmp_path, monkeypatch):
    """An earlier version's lock file holds the PID alone: on Linux the open lock file tells the holder; where there is
    no /proc (macOS) nothing can verify it, and Stop is refused with the reason."""
    run = tmp_path / "run"
    process = _start_elsewhere(run, "old-format")
    try:
        assert (run / LOCK_NAME).read_bytes()[1:] == f"{process.pid}\n".encode()
        attached = AttachedProcess.find(run)
        with monkeypatch.context() as elsewhere:
            elsewhere.setattr(attached_module, "_LINUX", False, raising=False)
            with pytest.raises(StopRefused, match="does not say on which machine it runs"):
                attached.stop(grace_seconds=30)
            assert not attached.stop_requested
        if sys.platform.startswith("linux"):
            attached.stop(grace_seconds=30)
            assert attached.stop_requested and process.wait(30) == 143
    finally:
        _end(process)


@POSIX_SIGNALS
def test_stop_works_where_signal_has_no_pidfd_send_signal(tmp_path, monkeypatch):
    """os.pidfd_open alone was checked; signal.pidfd_send_signal may be missing (a Python built without it)."""
    run = tmp_path / "run"
    process = _start_elsewhere(run)
    try:
        monkeypatch.delattr(signal, "pidfd_send_signal", raising=False)
        attached = AttachedProcess.find(run)
        attached.stop(grace_seconds=30)
        assert attached.stop_requested and process.wait(30) == 143
    finally:
        _end(process)


def test_a_run_whose_pid_is_unknown_is_not_stopped_from_here(tmp_path):
    run = tmp_path / "run"
    process = _start_elsewhere(run, "no-pid")
    try:
        unknown = AttachedProcess.find(run)
        assert unknown.pid == 0 and not unknown.stoppable
        with pytest.raises(StopRefused, match="PID could not be read"):
            unknown.stop()
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


# --- whose process record (console.json) it is --------------------------------------------------------------------
def _record(run: Path, pid: int, started: float, log_offset: int = 0, token: str = "", log: str | None = None) -> None:
    (run / PROCESS_RECORD_NAME).write_text(json.dumps({
        "pid": pid, "started": started, "log": log or str(run / "console.log"), "log_offset": log_offset,
        "command": ["liversam", "train", "--epochs", "7"], "token": token}))  # fmt: skip


def test_a_record_of_an_earlier_process_whose_pid_the_holder_got_again_is_not_taken_for_it(tmp_path):
    """console.json names the holder's PID but was written for an earlier process with that PID (PIDs are reused): only
    a record written after the lock was taken was rejected, so an old record was taken for the current run, and its
    console (another run's output) was shown as this run's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "console.log").write_text("an earlier run's output\n")
    process = _start_elsewhere(run)
    try:
        since = (run / LOCK_NAME).stat().st_mtime
        _record(run, process.pid, since - 3600)  # an hour before the lock was taken
        assert not AttachedProcess.find(run).console
        _record(run, process.pid, since - 120)  # minutes before: not when this process started (Linux tells)
        if sys.platform.startswith("linux"):
            assert not AttachedProcess.find(run).console
        _record(run, process.pid, since, log_offset=10_000)  # console.log replaced since: shorter than the offset
        assert not AttachedProcess.find(run).console
        _record(run, process.pid, since, token="another run's token")  # this version's record: the token decides
        assert not AttachedProcess.find(run).console
        _record(run, process.pid, since, log="console.log")  # an earlier version's relative path: the run folder's
        found = AttachedProcess.find(run)
        assert found.console and found.log_path == run / "console.log" and found.epochs == 7
    finally:
        _end(process)


LAUNCHER = r"""
import subprocess, sys
sys.exit(subprocess.run(sys.argv[1:]).returncode)
"""


def test_a_run_started_through_a_launcher_is_matched_by_its_token(tmp_path):
    """On Windows a venv's python.exe is a launcher that starts the real interpreter as its child: console.json named
    the launcher's PID, train.lock the child's, and the module's own run was taken for a terminal's (train.log shown,
    no events). The module now gives the process a token that the run writes into its lock file."""
    run = tmp_path / "run"
    process = TrainingProcess()
    process.start([sys.executable, "-c", LAUNCHER, *_holder_command(run)], run / "console.log",
                  record_path=run / PROCESS_RECORD_NAME)  # fmt: skip
    try:
        _wait(lambda: _started(run) or not process.is_running(), "the run did not start")
        record = read_process_record(run / PROCESS_RECORD_NAME)
        child = holder(run)
        assert child not in (None, process.pid) and record["pid"] == process.pid and len(record["token"]) == 32
        attached = AttachedProcess.find(run)
        assert attached.pid == child and attached.console and attached.log_path == run / "console.log"
        lines: list[str] = []
        _wait(lambda: lines.extend(attached.read_lines()) or any("LIVERSAM_EPOCH" in line for line in lines),
              "its console was not read")  # fmt: skip
    finally:
        _end(process)


def test_the_process_record_names_its_console_by_an_absolute_path(tmp_path, monkeypatch):
    """A relative console path in console.json meant another file once Slicer ran from another folder."""
    from LiverSAMTrainLib.TrainingProcess import write_process_record

    monkeypatch.chdir(tmp_path)
    write_process_record("console.json", 1, Path("run") / "console.log", 0, ["x"])
    assert read_process_record(tmp_path / "console.json")["log"] == str(tmp_path / "run" / "console.log")


# --- reading a log ---------------------------------------------------------------------------------------------------
def test_a_character_split_between_two_reads_is_read_whole(tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes("Größe: ".encode() + "é".encode()[:1])
    reader = LogReader(path)
    assert reader.read_lines() == []
    with open(path, "ab") as log:
        log.write("é".encode()[1:] + b" \xe2\x9c\x93\n")
    assert reader.read_lines() == ["Größe: é \u2713"]


def test_a_log_truncated_or_replaced_is_read_from_its_start(tmp_path):
    path = tmp_path / "console.log"
    path.write_text("a first line of some length\nanother one\n")
    reader = LogReader(path)
    assert reader.read_lines() == ["a first line of some length", "another one"]
    path.write_text("new\n")  # shorter than what was read
    assert reader.read_lines() == ["new"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_a_log_or_run_folder_that_cannot_be_read_gives_nothing_instead_of_an_error(tmp_path):
    """PermissionError escaped: from LogReader (the widget's timer raised before it could stop, at every tick, and the
    end was never reported), from holder() (Path.is_file raises on EACCES) and from AttachedProcess.find (setup and
    Start raised before they updated the buttons or said anything)."""
    from test_write_permissions import without_permission_override

    locked = tmp_path / "locked"
    run = locked / "run"
    run.mkdir(parents=True)
    release(acquire(run))  # a lock file in it
    unreadable = tmp_path / "console.log"
    unreadable.write_text("a line\n")
    unreadable.chmod(0)
    locked.chmod(0)  # cannot be searched: run/train.lock cannot even be looked at
    script = (
        "import sys; sys.path[:0] = sys.argv[1:3]\n"
        "from liversam.run_folder_lock import holder\n"
        "from LiverSAMTrainLib.AttachedProcess import AttachedProcess\n"
        "from LiverSAMTrainLib.TrainingProcess import LogReader\n"
        "print(holder(sys.argv[3]), AttachedProcess.find(sys.argv[3]), LogReader(sys.argv[4]).read_lines())\n"
    )
    try:
        answer = subprocess.run(without_permission_override(
            [sys.executable, "-c", script, str(REPO_ROOT / "LiverSAM"), str(TRAIN_DIR), str(run), str(unreadable)]),
            capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        locked.chmod(0o755)
        unreadable.chmod(0o644)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "None None []"


# --- Windows (no SIGTERM, no pidfd): a stand-in for _winapi ---------------------------------------------------------
class WinApi:
    """CPython's ``_winapi`` as the Windows branch uses it, for processes in ``states``: PID -> "running" | "exiting"
    (TerminateProcess answers ERROR_ACCESS_DENIED, then the process has exited) | "other user" (OpenProcess: access
    denied); a PID not there: no such process (ERROR_INVALID_PARAMETER)."""

    STILL_ACTIVE = 259

    def __init__(self, states: dict[int, str]) -> None:
        self.states, self.terminated, self.open_handles = states, [], set()
        self.killed: list[tuple[int, int]] = []  # by os.kill (the PID not pinned)

    @staticmethod
    def _error(winerror: int) -> OSError:
        error = (PermissionError if winerror == 5 else OSError)(22, "stand-in")
        error.winerror = winerror
        return error

    def OpenProcess(self, access: int, inherit: bool, pid: int) -> int:  # noqa: N802 - _winapi's names
        state = self.states.get(pid)
        if state is None:
            raise self._error(87)
        if state == "other user":
            raise self._error(5)
        self.open_handles.add(pid)
        return pid

    def GetExitCodeProcess(self, handle: int) -> int:  # noqa: N802
        return 1 if self.states[handle] == "exited" else self.STILL_ACTIVE

    def TerminateProcess(self, handle: int, code: int) -> None:  # noqa: N802
        if self.states[handle] == "exiting":
            self.states[handle] = "exited"
            raise self._error(5)
        self.terminated.append((handle, code))

    def CloseHandle(self, handle: int) -> None:  # noqa: N802
        self.open_handles.discard(handle)


@pytest.fixture
def windows(monkeypatch):
    """The Windows branch on this machine: the flags, no pidfd, and ``os.kill`` as on Windows (TerminateProcess by PID:
    never ProcessLookupError; a PID no process has: OSError, winerror 87; an exiting process: winerror 5) for the
    processes' states set by the test (``WinApi.states``)."""
    api = WinApi({})

    def windows_kill(pid: int, signum: int) -> None:
        state = api.states.get(pid)
        if state is None:
            raise WinApi._error(87)
        if state in ("exiting", "other user"):
            raise WinApi._error(5)
        api.killed.append((pid, signum))

    monkeypatch.setattr(attached_module, "_WINDOWS", True, raising=False)
    monkeypatch.setattr(attached_module, "_LINUX", False, raising=False)
    monkeypatch.setitem(sys.modules, "_winapi", api)
    windows_os = types.ModuleType("os")  # the module's os only (the test's cleanup kills with the real one)
    windows_os.__dict__.update({k: v for k, v in vars(os).items() if k != "pidfd_open"}, kill=windows_kill)
    monkeypatch.setattr(attached_module, "os", windows_os)
    return api


def test_windows_a_pid_that_is_gone_is_not_an_error_and_nothing_is_sent(tmp_path, windows):  # noqa: F811
    run = tmp_path / "run"
    process = _start_elsewhere(run)
    try:
        attached = AttachedProcess.find(run, clock=lambda: 0.0)
        attached.stop(grace_seconds=0)  # the PID names no process any more (winerror 87): it ended
        attached.kill()
        assert not attached.stop_requested and windows.terminated == []
    finally:
        _end(process)


def test_windows_an_exiting_process_is_not_said_to_be_another_users(tmp_path, windows):  # noqa: F811
    run = tmp_path / "run"
    process = _start_elsewhere(run)
    try:
        windows.states[process.pid] = "exiting"
        attached = AttachedProcess.find(run, clock=lambda: 0.0)
        attached.stop(grace_seconds=0)  # TerminateProcess: access denied, as it exits: nothing sent, no StopRefused
        assert not attached.stop_requested and not windows.open_handles
        windows.states[process.pid] = "other user"
        with pytest.raises(StopRefused, match="belongs to another user"):
            attached.stop(grace_seconds=0)
    finally:
        _end(process)


def test_windows_the_process_is_pinned_by_a_handle_checked_then_terminated(tmp_path, windows):  # noqa: F811
    run = tmp_path / "run"
    process = _start_elsewhere(run)
    try:
        windows.states[process.pid] = "running"
        attached = AttachedProcess.find(run, clock=lambda: 0.0)
        attached.stop(grace_seconds=10)
        assert windows.terminated == [(process.pid, int(signal.SIGTERM))] and not windows.open_handles
        assert attached.stop_requested and windows.killed == []
    finally:
        _end(process)


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


class Settings:
    """``qt.QSettings()``: Slicer's settings, the same ``store`` for every instance."""

    def __init__(self, store: dict) -> None:
        self.store = store

    def value(self, key: str, default=None):
        return self.store.get(key, default)

    def setValue(self, key: str, value) -> None:  # noqa: N802 - Qt's name
        self.store[key] = value


def set_up(train, monkeypatch, run_dir: Path | None, settings: dict | None = None, field: str = ""):
    """``LiverSAMTrainWidget()`` + ``setup()`` as Slicer runs them, its .ui's widgets stood in for. The run folder field
    holds ``field``: empty, as loadUI makes it (a module reloaded, Slicer opened again). Slicer's settings hold
    ``settings``; by default ``run_dir`` as the run folder of the last run started or followed."""
    fresh_scene()
    if settings is None:
        settings = {} if run_dir is None else {train.RUN_FOLDER_SETTING: str(run_dir)}
    monkeypatch.setattr(train.qt, "QSettings", lambda: Settings(settings), raising=False)
    ui = SimpleNamespace(
        outputPathLineEdit=Widget(currentPath=field), dataPathLineEdit=Widget(currentPath=""),
        runFolderStatusLabel=Widget(text="", visible=True),
        statusLabel=Label(), logTextEdit=Log(), progressBar=Widget(maximum=100, value=0),
        curvesComboBox=Widget(currentIndex=0),
        **{name: Widget(enabled=True) for name in ("dataManifestButton", "addPairButton", "clearPairsButton",
                                                    "startButton", "resumeButton", "stopButton")},
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


def stand_in_plots(train, monkeypatch) -> None:
    """The Plots module, which shows a chart in the layout (slicer.modules made first, as set_up does)."""
    fresh_scene()
    monkeypatch.setattr(train.slicer.modules, "plots", SimpleNamespace(logic=lambda: SimpleNamespace(
        ShowChartInLayout=lambda chart: None)), raising=False)  # fmt: skip


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
    settings: dict = {}  # Slicer's, kept across the reload
    first = set_up(train, monkeypatch, None, settings, field=str(run))  # the run folder typed
    assert buttons(first) == (True, True, False)
    first._settings = train.TrainingLogic.TrainingSettings(data="d", out=str(run), epochs=3)
    first._check = SimpleNamespace(done=lambda: True, problem=None, python=sys.executable)  # the environment checked
    first._startChecked()  # Start
    try:
        pid = first.logic.process.pid
        assert pid and settings == {train.RUN_FOLDER_SETTING: str(run)}  # the run folder put back at the next setup
        _wait(lambda: _started(run), "the run did not start")
        _wait(lambda: "LIVERSAM_EPOCH" in (run / "console.log").read_text(), "no epoch")
        first.cleanup()  # Reload: the process keeps running
        widget = set_up(train, monkeypatch, None, settings)  # the new widget: its field empty, as loadUI makes it
        assert widget.ui.outputPathLineEdit.currentPath == str(run)
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
    stand_in_plots(train, monkeypatch)
    process = None
    try:
        process = _start_elsewhere(run)  # (returns once "training started" is in its train.log)
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
        if process is not None:
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
        assert train.qt.QSettings().value(train.RUN_FOLDER_SETTING) == str(busy)  # followed: put back at setup

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


def test_a_run_folder_that_cannot_be_looked_at_leaves_setup_working_and_start_says_why(widgets, tmp_path, monkeypatch):  # noqa: F811
    """Path.is_file raises PermissionError when the folder cannot be searched: it escaped from setup (the buttons were
    never set) and from Start (before any message). (This test runs as root here: the permission error is stood in
    for; test_a_log_or_run_folder_that_cannot_be_read_gives_nothing_instead_of_an_error has the real one.)"""
    _liversam, train = widgets
    locked = tmp_path / "locked"
    run = locked / "run"
    real_is_file = Path.is_file

    def is_file(path: Path) -> bool:
        if locked in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", is_file)
    widget = set_up(train, monkeypatch, run)
    assert buttons(widget) == (True, True, False)  # updateButtons ran (Stop starts enabled in the stand-in)
    assert widget.ui.outputPathLineEdit.currentPath == str(run) and not widget.ui.runFolderStatusLabel.visible
    shown: list[str] = []
    monkeypatch.setattr(train.slicer.util, "errorDisplay", lambda text, **kwargs: shown.append(text))
    monkeypatch.setattr(train.slicer.app, "testingEnabled", lambda: False)
    with pytest.raises(PermissionError):  # shown, then raised on by tryWithErrorDisplay (Slicer prints it)
        widget.onStart()
    assert len(shown) == 1 and shown[0].startswith("Could not start training.") and "Permission denied" in shown[0]
    widget.cleanup()


def test_stop_on_a_run_that_released_its_folder_says_nothing_was_sent(widgets, tmp_path, monkeypatch):  # noqa: F811
    """The run released its lock (it is ending by itself): Stop sent nothing, yet the status said "Stopping..." and Stop
    stayed enabled."""
    _liversam, train = widgets
    run = tmp_path / "run"
    process = _start_elsewhere(run, "release")
    try:
        widget = set_up(train, monkeypatch, run)
        assert buttons(widget) == (False, False, True)
        widget.logic.process._clock = lambda: 0.0  # within END_WAIT_SECONDS for good: it is still taken as running
        (run / "finish-now").touch()  # it releases the lock and keeps running
        _wait(lambda: holder(run) is None, "the lock was not released")
        widget.onStop()
        assert widget.ui.statusLabel.text.startswith("Not stopped: the training process")
        assert "no longer holds the run folder" in widget.ui.statusLabel.text
        assert buttons(widget) == (False, False, False) and not widget.logic.process.stop_requested
        assert process.poll() is None and "got SIGTERM" not in (run / "train.log").read_text()
        widget.cleanup()
    finally:
        _end(process)


def test_a_run_whose_pid_is_unknown_has_stop_disabled(widgets, tmp_path, monkeypatch):  # noqa: F811
    _liversam, train = widgets
    run = tmp_path / "run"
    process = _start_elsewhere(run, "no-pid")
    try:
        widget = set_up(train, monkeypatch, run)
        assert "PID unknown" in widget.ui.runFolderStatusLabel.text and "Stop stops it" not in widget.ui.statusLabel.text
        assert buttons(widget) == (False, False, False)  # Start refused (the folder is held), Stop could send nothing
        widget.cleanup()
    finally:
        _end(process)


def test_following_a_run_again_neither_replays_its_output_twice_nor_keeps_its_progress_meanwhile(
    widgets, tmp_path, monkeypatch  # noqa: F811
):
    """Another folder chosen, then the run's again: its output was replayed a second time, and while another folder was
    chosen the bar kept the run's progress. Its earlier output is appended at once (it was one line per call: up to
    a MB on the UI thread)."""
    _liversam, train = widgets
    idle, busy = tmp_path / "idle", tmp_path / "busy"
    idle.mkdir()
    busy.mkdir()
    (busy / "console.log").write_text("")
    (busy / "config.json").write_text(json.dumps({"epochs": 3}))  # (as liversam train writes it)
    stand_in_plots(train, monkeypatch)
    process = _start_by_module(busy)
    try:
        _wait(lambda: "LIVERSAM_EPOCH" in (busy / "console.log").read_text(), "no epoch")
        with open(busy / "console.log", "a") as console:
            console.write("".join(f"cache line {n}\n" for n in range(200)))
        widget = set_up(train, monkeypatch, busy)
        log = widget.ui.logTextEdit
        assert widget.logic.process.console and log.lines.count("training on 3 epochs") == 1
        assert log.lines.count("cache line 199") == 1 and log.calls < 10
        assert (widget.ui.progressBar.value, widget.ui.progressBar.maximum) == (1, 3)
        field = widget.ui.outputPathLineEdit
        field.currentPath = str(idle)
        widget._followRunInFolder()
        assert widget.ui.progressBar.value == 0 and not widget._timer.active  # not the idle folder's progress
        with open(busy / "console.log", "a") as console:
            console.write("written meanwhile\n")
        (busy / "history.csv").write_text("epoch,train_loss,val_loss,val_dice_mean\n0,,0.4,0.81\n1,0.5,0.35,0.86\n")
        field.currentPath = str(busy)
        widget._followRunInFolder()
        assert (widget.ui.progressBar.value, widget.ui.progressBar.maximum) == (1, 3)  # (its events are not read again)
        assert log.lines.count("training on 3 epochs") == 1 and log.lines.count("cache line 199") == 1
        assert log.lines.count("written meanwhile") == 1 and any("Following it again" in line for line in log.lines)
        assert buttons(widget) == (False, False, True)
        widget.cleanup()
    finally:
        _end(process)


def test_a_kill_that_is_refused_neither_breaks_the_timer_nor_cleanup(widgets, tmp_path, monkeypatch):  # noqa: F811
    """escalate_stop() raised from poll() at every tick (the Windows branch's OSError, a StopRefused), and kill() from
    cleanup()."""
    _liversam, train = widgets
    widget = set_up(train, monkeypatch, tmp_path / "idle")
    widget._settings = train.TrainingLogic.TrainingSettings(data="", out=str(tmp_path / "idle"))

    def refused():
        raise OSError(22, "The parameter is incorrect")

    widget.logic.process = SimpleNamespace(escalate_stop=refused, kill=refused, is_running=lambda: True,
                                           read_lines=lambda: [], stopping=True, stop_requested=True, returncode=None,
                                           pid=1, log_path=None)  # fmt: skip
    widget.poll()
    widget.poll()
    assert [line for line in widget.ui.logTextEdit.lines if line.startswith("Not killed")] == [
        "Not killed: [Errno 22] The parameter is incorrect"]  # said once
    widget.cleanup()


def test_one_folder_is_the_same_folder_even_through_a_symbolic_link_loop(widgets, tmp_path):  # noqa: F811
    _liversam, train = widgets
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert not train._sameFolder(tmp_path / "a", tmp_path / "c") and train._sameFolder(tmp_path / "a", tmp_path / "a")


def test_the_curves_are_the_run_folder_chosen_never_the_last_runs(widgets, tmp_path, monkeypatch):  # noqa: F811
    """The widget stopped following a run (another folder chosen, the field cleared, the run ended and another folder
    chosen) and the plot charts still showed that run's curves, as if they were the folder's now chosen. They are now
    the chosen folder's own history.csv (a run that ended there), else empty; a run followed before its first epoch
    shows none either."""
    _liversam, train = widgets
    busy, idle, done, fresh = (tmp_path / name for name in ("busy", "idle", "done", "fresh"))
    for folder in (busy, idle, done):
        folder.mkdir()
    history = "epoch,train_loss,val_loss,val_dice_mean\n0,,0.4,0.81\n1,0.5,0.35,0.86\n"
    (busy / "history.csv").write_text(history)
    (done / "history.csv").write_text(history + "2,0.45,0.33,0.88\n")
    stand_in_plots(train, monkeypatch)
    process = _start_elsewhere(busy)
    later = None
    try:
        widget = set_up(train, monkeypatch, busy)
        folder_of = train.TrainingLogic.curves_folder

        def curves() -> tuple[int, str | None]:
            table = widget.logic.tableNode
            return table.GetTable().GetNumberOfRows(), folder_of(table)

        assert buttons(widget) == (False, False, True) and curves() == (2, str(busy))
        chart = widget.logic.chartNodes["dice"]
        field = widget.ui.outputPathLineEdit
        for folder, expected in ((idle, (0, "")), (done, (3, str(done))), ("", (0, "")), (busy, (2, str(busy)))):
            field.currentPath = str(folder)
            widget._followRunInFolder()
            assert curves() == expected, folder
            assert widget.logic.chartNodes["dice"] is chart  # the same nodes: the plot view keeps showing the chart
        (busy / "finish-now").touch()  # the run ends; then another folder is chosen
        poll_until_ended(widget)
        assert process.wait(30) == 0 and curves() == (2, str(busy))  # its own curves while its folder is chosen
        field.currentPath = str(idle)
        widget._followRunInFolder()
        assert curves() == (0, "") and chart.GetTitle().endswith(f"({train.TrainingLogic.NO_CURVES_NOTE})")
        field.currentPath = str(done)
        widget._followRunInFolder()
        assert curves() == (3, str(done))
        later = _start_elsewhere(fresh)  # a run still building its caches: no history.csv yet
        field.currentPath = str(fresh)
        widget._followRunInFolder()
        assert buttons(widget) == (False, False, True) and curves() == (0, "")
        widget.poll()
        assert curves() == (0, "")
        widget.cleanup()
    finally:
        _end(process)
        if later is not None:
            _end(later)


def test_opening_the_module_leaves_the_curves_in_the_scene_alone(widgets, tmp_path, monkeypatch):  # noqa: F811
    """Opening the module (or reloading it) with no run in the remembered run folder emptied the curves of a scene the
    user had loaded (a colleague's saved run, its history.csv not on this machine: lost at the next save), or put the
    remembered folder's curves over them; in an empty scene it added a table, 3 charts and 5 series, so that Slicer
    asked to save a scene the user never touched. Opening the module now leaves the scene's curves as they are;
    choosing a run folder (a user's act) still shows that folder's curves, or none."""
    _liversam, train = widgets
    colleague, remembered = tmp_path / "colleague", tmp_path / "remembered"
    for folder in (colleague, remembered):
        folder.mkdir()
    history = "epoch,train_loss,val_loss,val_dice_mean\n0,,0.4,0.81\n1,0.5,0.35,0.86\n"
    (colleague / "history.csv").write_text(history)
    (remembered / "history.csv").write_text(history + "2,0.45,0.33,0.88\n")
    stand_in_plots(train, monkeypatch)
    counts = [("vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode")]

    def nodes(scene) -> tuple[int, ...]:
        return tuple(scene.GetNumberOfNodesByClass(name) for name in counts[0])

    scene = fresh_scene()
    set_up(train, monkeypatch, remembered)  # an empty scene: nothing added
    assert nodes(scene) == (0, 0, 0)
    table, _charts = train.TrainingLogic.update_curves(colleague / "history.csv", scene=scene)  # the loaded scene's
    (colleague / "history.csv").unlink()
    this_module = sys.modules[__name__]
    monkeypatch.setattr(this_module, "fresh_scene", lambda: scene)  # set_up keeps the scene as loaded
    for folder in (remembered, tmp_path / "none-there"):
        widget = set_up(train, monkeypatch, folder)
        assert nodes(scene) == (1, 3, 3) and table.GetTable().GetNumberOfRows() == 2
        assert train.TrainingLogic.curves_folder(table) == str(colleague)
        assert buttons(widget) == (True, True, False)
    widget.ui.outputPathLineEdit.currentPath = str(remembered)  # the user chooses a run folder: its curves
    widget._followRunInFolder()
    assert table.GetTable().GetNumberOfRows() == 3 and train.TrainingLogic.curves_folder(table) == str(remembered)


def test_a_run_folder_whose_history_csv_another_tool_wrote_shows_no_curves_and_says_why(widgets, tmp_path, monkeypatch):  # noqa: F811
    """Choosing a folder whose history.csv liversam train did not write (fastai's CSVLogger names its file so) raised
    ValueError in the field's timer callback: a traceback, the buttons not updated, the last folder's curves left. The
    curves are now emptied and the log says which file and why."""
    _liversam, train = widgets
    mine, other = tmp_path / "mine", tmp_path / "fastai"
    for folder in (mine, other):
        folder.mkdir()
    (mine / "history.csv").write_text("epoch,train_loss,val_loss,val_dice_mean\n0,,0.4,0.81\n1,0.5,0.35,0.86\n")
    (other / "history.csv").write_text("epoch,train_loss,valid_loss,accuracy,time\n0,0.52,0.41,0.81,00:05\n")
    stand_in_plots(train, monkeypatch)
    widget = set_up(train, monkeypatch, None)
    field = widget.ui.outputPathLineEdit
    field.currentPath = str(mine)
    widget._followRunInFolder()
    table = widget.logic.tableNode
    assert table.GetTable().GetNumberOfRows() == 2
    field.currentPath = str(other)
    widget.ui.startButton.enabled = False  # (updateButtons runs: enabled again)
    assert widget._followRunInFolder() is False
    assert table.GetTable().GetNumberOfRows() == 0 and train.TrainingLogic.curves_folder(table) == ""
    assert "column 'time': '00:05' is not a number" in "\n".join(widget.ui.logTextEdit.lines)
    assert buttons(widget) == (True, True, False)
