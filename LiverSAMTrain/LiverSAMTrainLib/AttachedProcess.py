"""A ``liversam train`` that holds a run folder but that this widget did not start (no Qt, no Slicer).

The training process outlives its widget: a module reload, or Slicer closed and opened again, makes a new widget whose
:class:`~LiverSAMTrainLib.TrainingProcess.TrainingProcess` knows nothing of it, and a run started from a terminal was
never known. The run holds its folder's lock (:mod:`liversam.run_folder_lock`: ``RUN_DIR/train.lock``, with its PID)
while it runs, so :meth:`AttachedProcess.find` finds it from the folder alone, and the widget polls it as it polls a
process it started (the same methods: :meth:`~AttachedProcess.read_lines`, :meth:`~AttachedProcess.is_running`,
:meth:`~AttachedProcess.stop`, :meth:`~AttachedProcess.escalate_stop`, :meth:`~AttachedProcess.kill`):

- its output: the module's ``console.log`` from where that process's output begins (the process record,
  :data:`~LiverSAMTrainLib.TrainingProcess.PROCESS_RECORD_NAME`, names the offset; it is taken as the holder's when it
  names the token the lock file names, or for files of an earlier version by PID and times:
  :meth:`AttachedProcess._is_record_of_holder`), with the ``--events`` lines the widget shows progress from; for a run
  it did not start (a terminal's, or a record lost or not the holder's), the trainer's own ``train.log`` from its last
  lines on;
- its end: the lock released (the kernel releases it when the process ends, however it ends) and then the PID gone
  (or :data:`END_WAIT_SECONDS` later: the process may print its error after it released the lock);
  :meth:`~AttachedProcess.outcome` tells how it ended as well as the folder can (``result.json`` written by this run:
  finished and registered; else the log's last line), since its exit code belongs to the process that started it;
- Stop: SIGTERM, then SIGKILL after the grace period, as for a process the widget started, each sent only after the
  lock holder was checked to be that process (:meth:`AttachedProcess._verified_holder`): the lock is held and its file
  names the PID; the holder runs on this machine, in this PID namespace (the host identity the run wrote after its
  PID: :class:`liversam.run_folder_lock.LockHolder`; a run in a container or on another machine sharing the folder
  names a PID that is another process here); and, on Linux, the process with that PID has the lock file open (some
  ``/proc/<pid>/fd/*`` is that file: the run keeps it open while it runs). The PID is pinned first, so it cannot be
  reused between the check and the signal: a pidfd on Linux 5.3+, a process handle on Windows. Anything that cannot be
  checked is refused (:class:`StopRefused`, which says why), never signalled: a lock file of an earlier version (no
  host identity) where there is no ``/proc`` (macOS, Windows), a process whose open files cannot be read (another
  user's). Without pidfds (Linux before 5.3, macOS) the check and ``os.kill`` are microseconds apart. Windows has no
  SIGTERM: the process is ended at once there (``TerminateProcess``; the epoch under way is lost, as for Stop on a
  process the widget started); that branch is tested with a stand-in for ``_winapi`` only.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .TrainingProcess import PROCESS_RECORD_NAME, STOP_GRACE_SECONDS, LogReader, read_process_record

if TYPE_CHECKING:
    from liversam.run_folder_lock import LockHolder

#: The trainer's own log in the run folder (liversam.training.trainer.TRAIN_LOG_NAME; that module imports torch, which
#: Slicer's Python has not: a test checks they are the same).
TRAIN_LOG_NAME = "train.log"
#: After the lock is released: how long the process is still taken as running while its PID exists (it prints its
#: summary or its error after it released the lock). A zombie (a child of this Slicer whose widget was reloaded away:
#: nothing reaps it) or a reused PID would otherwise keep it "running" for good.
END_WAIT_SECONDS = 2.0
#: At most this much of the process's earlier output is read when attaching (the rest: in the log file itself).
REPLAY_BYTES = 1 << 20
#: Lines of train.log shown when attaching to a run whose console is not known (a terminal's run).
TAIL_LINES = 10
#: A process record written this long after the lock file (its process took the lock after it was started) is not
#: the lock holder's, whatever its PID.
RECORD_CLOCK_SLACK_S = 5.0
#: Nor is a record written more than this long before the lock was taken (a run takes it seconds to minutes after it
#: starts: Python and torch imported): it is an earlier process's, whose PID the holder got again.
RECORD_MAX_AGE_S = 15 * 60.0
#: On Linux the record's start time must be this close to its PID's process start (``/proc/<pid>/stat``): the record is
#: written as soon as the process is started.
RECORD_START_SLACK_S = 30.0

_WINDOWS = sys.platform == "win32"
_LINUX = sys.platform.startswith("linux")
# Windows (winnt.h, winerror.h): what OpenProcess asks for, and its errors
_PROCESS_TERMINATE = 0x0001
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_SYNCHRONIZE = 0x00100000
_ERROR_ACCESS_DENIED = 5
_ERROR_INVALID_PARAMETER = 87  # OpenProcess: no process has this PID (any more)


class StopRefused(RuntimeError):
    """The attached process cannot be stopped from here: its PID unknown, another user's, or the lock holder cannot be
    verified to be the process with that PID (the message says which)."""


def _kill_signal() -> int:
    return getattr(signal, "SIGKILL", signal.SIGTERM)  # Windows: no SIGKILL; the process is ended at once there


def _pid_exists(pid: int) -> bool:
    """Whether ``pid`` still names a running process (on Linux a zombie, ended but not yet reaped by its parent, does
    not; elsewhere it does). Windows: True (unknown): ``os.kill(pid, 0)`` would end the process there (signal 0 is no
    probe on Windows: it is TerminateProcess with exit code 0)."""
    if sys.platform == "win32" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    try:  # the state follows the command name in parentheses, which may hold spaces and ')'
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):  # not Linux
        return True


def _winapi():
    """CPython's ``_winapi`` (Windows only; a test puts a stand-in in ``sys.modules``)."""
    return importlib.import_module("_winapi")


def _winerror(error: OSError) -> int | None:
    return getattr(error, "winerror", None)


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), on Linux (``/proc/<pid>/stat`` field 22, in clock ticks
    since boot, plus ``btime`` of ``/proc/stat``); None elsewhere or when it cannot be read."""
    if not _LINUX:
        return None
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])  # fields 3.. after the name
        with open("/proc/stat", encoding="ascii") as stat:
            boot = next(int(line.split()[1]) for line in stat if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _holds_open(pid: int, path: Path) -> bool | None:
    """Linux: whether process ``pid`` has ``path`` open (one of its ``/proc/<pid>/fd/*`` is that file: same device and
    inode); None when its open files cannot be read (another user's process, /proc mounted with hidepid)."""
    try:
        target = os.stat(path)
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:  # the process or the lock file is gone
        return False
    except OSError:
        return None
    for fd in fds:
        try:
            opened = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if (opened.st_dev, opened.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


def _tail(path: Path, lines: int) -> tuple[list[str], int]:
    """The last ``lines`` non-empty complete lines of ``path`` (within its last :data:`REPLAY_BYTES`), and the offset
    where its complete lines end (a line still being written is read later)."""
    try:
        with open(path, "rb") as handle:
            start = max(0, handle.seek(0, os.SEEK_END) - REPLAY_BYTES)
            handle.seek(start)
            data = handle.read()
    except OSError:
        return [], 0
    complete = data[: data.rfind(b"\n") + 1]
    text = complete.decode("utf-8", "replace")
    return [line.removesuffix("\r").split("\r")[-1] for line in text.split("\n") if line.strip()][-lines:], start + len(complete)


def _next_line(path: Path, offset: int) -> int:
    """The offset of the first line that begins at or after ``offset`` in ``path`` (``offset`` when it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, offset - 1))
            while chunk := handle.read(1 << 16):
                if (end := chunk.find(b"\n")) >= 0:
                    return handle.tell() - len(chunk) + end + 1
    except OSError:
        pass
    return offset


class AttachedProcess:
    """The ``liversam train`` holding ``run_dir`` (PID ``pid``; 0: the lock file's PID could not be read). Made by
    :meth:`find`; ``clock``: seconds, monotonic (a test passes its own); ``holder``: what the lock file told
    (:func:`liversam.run_folder_lock.holder_info`; read here when not given)."""

    def __init__(self, run_dir: str | Path, pid: int, clock: Callable[[], float] = time.monotonic,
                 holder: LockHolder | None = None) -> None:  # fmt: skip
        from liversam.run_folder_lock import LOCK_NAME, holder_info

        self.run_dir = Path(run_dir).absolute()  # (a relative path would change meaning with the working folder)
        self.pid = int(pid)
        self._clock = clock
        self._kill_at: float | None = None
        self._released_at: float | None = None
        self._ended = False
        #: the widget has shown this process's output before (it followed it, then another folder): not replayed again
        self.shown = False
        lock = self.run_dir / LOCK_NAME
        try:
            #: when the process took the lock (the lock file's mtime: it writes its PID there then); None: unknown
            self.since: float | None = lock.stat().st_mtime
        except OSError:
            self.since = None
        if holder is None:
            holder = holder_info(self.run_dir)
        record = read_process_record(self.run_dir / PROCESS_RECORD_NAME)
        #: the command of the process, when this module started it (its process record is the holder's)
        self.command: list[str] = []
        #: True: :meth:`read_lines` reads the process's console (its ``--events`` lines too); False: ``train.log``
        self.console = False
        #: the lines before attaching that :meth:`read_lines` does not return (train.log's last lines), for the widget
        self.earlier: list[str] = []
        #: True when the output before attaching was longer than :data:`REPLAY_BYTES` (its start is not read)
        self.skipped = False
        if record is not None and self._is_record_of_holder(record, holder):
            log, start = self._record_log(record), record["log_offset"]
            try:
                size = log.stat().st_size
            except OSError:
                size = start
            if size - start > REPLAY_BYTES:
                start, self.skipped = _next_line(log, size - REPLAY_BYTES), True
            self._log = LogReader(log, start)
            self.command, self.console = record["command"], True
        else:
            self.earlier, end = _tail(self.run_dir / TRAIN_LOG_NAME, TAIL_LINES)
            self._log = LogReader(self.run_dir / TRAIN_LOG_NAME, end)
        self._last_line = self.earlier[-1].strip() if self.earlier else ""

    def _record_log(self, record: dict) -> Path:
        """The record's console log; a relative path (a record of an earlier version, relative to the working folder
        of the Slicer that wrote it) is taken as that file in the run folder."""
        log = Path(record["log"])
        return log if log.is_absolute() else self.run_dir / log.name

    def _is_record_of_holder(self, record: dict, holder: LockHolder | None) -> bool:
        """The process record is the lock holder's. Both of this version: the token LiverSAMTrain gave the process is
        the one in the lock file (whatever the PIDs: on Windows a venv's launcher, whose PID the record names, starts the
        trainer as its child). Else by PID (the record of an earlier process whose PID the holder got again is not
        taken): the same PID, the record written at most :data:`RECORD_MAX_AGE_S` before the lock was taken (and not
        after), and on Linux when that PID's process started. Either way its console log still reaches the offset where
        its output begins (a log replaced since is not read from another file's offset)."""
        if holder is not None and holder.identified and record["token"]:
            matched = record["token"] == holder.token
        elif not self.pid or record["pid"] != self.pid:
            return False
        else:
            started = record["started"]
            if self.since is not None and not self.since - RECORD_MAX_AGE_S <= started <= self.since + RECORD_CLOCK_SLACK_S:
                return False
            process_start = _process_start_time(self.pid)
            matched = process_start is None or abs(started - process_start) <= RECORD_START_SLACK_S
        try:
            return matched and self._record_log(record).stat().st_size >= record["log_offset"]
        except OSError:
            return False

    @classmethod
    def find(cls, run_dir: str | Path, clock: Callable[[], float] = time.monotonic) -> AttachedProcess | None:
        """The process holding ``run_dir`` now, or None when none does, or when the folder cannot be looked at
        (permission denied: then nothing is followed, and Start says what is wrong). Never waits."""
        from liversam.run_folder_lock import holder_info

        if not run_dir:
            return None
        try:
            found = holder_info(run_dir)
            return None if found is None else cls(run_dir, found.pid, clock, found)
        except OSError:
            return None

    # --- what the widget reads --------------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self._log.path

    @property
    def epochs(self) -> int | None:
        """The run's ``--epochs``: from its command, else from the run folder's ``config.json`` (None: unknown)."""
        if "--epochs" in self.command[:-1]:
            try:
                return int(self.command[self.command.index("--epochs") + 1])
            except ValueError:
                pass
        import json

        try:
            return int(json.loads((self.run_dir / "config.json").read_text(encoding="utf-8"))["epochs"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def read_lines(self) -> list[str]:
        """Every complete line the process wrote since the last call (the first call: since it started, or since
        attaching when its console is not known)."""
        lines = self._log.read_lines()
        self._last_line = next((line.strip() for line in reversed(lines) if line.strip()), self._last_line)
        return lines

    def holds_folder(self) -> bool:
        """True while this PID holds the run folder's lock (asked now)."""
        from liversam.run_folder_lock import holder

        return holder(self.run_dir) == self.pid

    def is_running(self) -> bool:
        """True while the process holds the folder, and for its last lines after (:data:`END_WAIT_SECONDS` at most,
        until its PID is gone)."""
        if self._ended:
            return False
        if self.holds_folder():
            self._released_at = None
            return True
        now = self._clock()
        if self._released_at is None:
            self._released_at = now
        if not _pid_exists(self.pid) or now - self._released_at >= END_WAIT_SECONDS:
            self._ended = True
        return not self._ended

    @property
    def stoppable(self) -> bool:
        """False when Stop can send nothing: its PID unknown, or it no longer holds the folder (it is ending by
        itself)."""
        return bool(self.pid) and self._released_at is None and not self._ended

    @property
    def returncode(self) -> int | None:
        """Always None: the exit code goes to the process that started it, not to this one."""
        return None

    # --- stopping ---------------------------------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self._kill_at is not None

    @property
    def stopping(self) -> bool:
        return self._kill_at is not None and self.is_running()

    def _signal(self, signum: int) -> bool:
        """Send ``signum`` to the PID only while it is the run folder's lock holder (:meth:`_verified_holder`); True when
        sent, False when it no longer holds the folder (it ended; its PID may be another process's by now). Raises
        :class:`StopRefused` when it cannot be signalled: its PID unknown, another user's process, or the holder not
        verified to be that process."""
        if not self.pid:
            raise StopRefused(
                f"The training process in '{self.run_dir}' cannot be stopped from here: its PID could not be read from "
                f"'{self.run_dir / 'train.lock'}'. Stop it from the operating system (a 'liversam train' process)."
            )
        if _WINDOWS:
            return self._terminate_windows(signum)
        pidfd = None
        if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):  # Linux 5.3+: the PID stays this process's
            try:
                pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                return False
            except OSError:  # ENOSYS (an older kernel), EMFILE: the check and os.kill below, microseconds apart
                pidfd = None
        try:
            if not self._verified_holder():
                return False
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(self.pid, signum)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            raise StopRefused(self._another_users()) from None
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _another_users(self) -> str:
        return (f"The training process in '{self.run_dir}' (PID {self.pid}) belongs to another user: stop it as that "
                "user.")  # fmt: skip

    def _verified_holder(self) -> bool:
        """Whether the process with this PID (pinned by the caller) holds the run folder: True; False when the lock is
        free or names another PID (it ended). Raises :class:`StopRefused` when the lock names this PID but that may be
        another process here: the holder runs on another machine or in another PID namespace (its lock file says so),
        or, on Linux, the process with this PID does not have the lock file open (the holder wrote another process's
        PID, is in another namespace, or is writing its own PID just now) or its open files cannot be read; elsewhere,
        a lock file that does not say where its holder runs (an earlier version's)."""
        from liversam.run_folder_lock import LOCK_NAME, holder_info

        found = holder_info(self.run_dir)
        if found is None or found.pid != self.pid:
            return False
        lock = self.run_dir / LOCK_NAME
        here = found.here()
        if here is False:
            raise StopRefused(
                f"The training process holding '{self.run_dir}' runs on another machine or in another container (host "
                f"'{found.host}', as '{lock}' says): its PID, {self.pid}, is not that process here. Stop it where it "
                "runs."
            )
        if _LINUX:
            opened = _holds_open(self.pid, lock)
            if opened is None:
                raise StopRefused(
                    f"Whether PID {self.pid} is the training process holding '{self.run_dir}' cannot be checked: its open "
                    "files cannot be read here (another user's process). Stop it as that user."
                )
            if not opened:
                again = holder_info(self.run_dir)
                if again is None or again.pid != self.pid:
                    return False  # it ended (or let the folder go) while it was being checked: nothing to stop
                raise StopRefused(
                    f"Not stopped: PID {self.pid}, which '{lock}' names, does not have that lock file open, so it is not "
                    "the training process holding the run folder (that one runs in another container or on another "
                    "machine, or was writing its PID just now: try again). Nothing was sent to it."
                )
        elif here is None:
            raise StopRefused(
                f"The training process in '{self.run_dir}' (PID {self.pid}) cannot be verified from here: its lock file "
                f"'{lock}' does not say on which machine it runs (a liversam train of an earlier version), and this "
                "system cannot tell which process holds it. Stop it from the operating system."
            )
        return True

    def _terminate_windows(self, signum: int) -> bool:
        """Windows: the process opened by PID (the handle keeps that PID this process's), checked, then ended
        (``TerminateProcess``, exit code ``signum``). A PID no process has any more (``ERROR_INVALID_PARAMETER``) or a
        process that has exited: False; ``ERROR_ACCESS_DENIED`` from a running process: another user's
        (:class:`StopRefused`)."""
        winapi = _winapi()
        try:
            handle = winapi.OpenProcess(_PROCESS_TERMINATE | _SYNCHRONIZE | _PROCESS_QUERY_LIMITED_INFORMATION, False,
                                        self.pid)  # fmt: skip
        except OSError as error:
            if _winerror(error) == _ERROR_INVALID_PARAMETER:
                return False
            if _winerror(error) == _ERROR_ACCESS_DENIED:
                raise StopRefused(self._another_users()) from None
            raise StopRefused(f"The training process in '{self.run_dir}' (PID {self.pid}) could not be opened to stop "
                              f"it ({error}). Stop it from the operating system.") from None  # fmt: skip
        try:
            if winapi.GetExitCodeProcess(handle) != winapi.STILL_ACTIVE or not self._verified_holder():
                return False
            try:
                winapi.TerminateProcess(handle, int(signum))
            except PermissionError:  # also what an exiting process answers
                if winapi.GetExitCodeProcess(handle) != winapi.STILL_ACTIVE:
                    return False
                raise StopRefused(self._another_users()) from None
            return True
        finally:
            winapi.CloseHandle(handle)

    def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """Ask the process to end (SIGTERM; Windows: ended at once) and return without waiting; :meth:`escalate_stop`
        kills it if it still holds the folder ``grace_seconds`` later. Nothing is sent to a PID that no longer holds
        the run folder."""
        if not self.is_running() or self._kill_at is not None:
            return
        self._kill_at = self._clock() + max(0.0, grace_seconds)
        sent = False
        try:
            sent = self._signal(signal.SIGTERM)
        finally:
            if not sent:  # refused, or it no longer holds the folder: it ended by itself, not by this Stop
                self._kill_at = None

    def escalate_stop(self) -> bool:
        """After :meth:`stop`: kill the process when its grace period has passed and it still holds the folder.
        Returns :attr:`stopping`."""
        if self.stopping and self._clock() >= self._kill_at:
            self.kill()
        return self.stopping

    def kill(self) -> None:
        """Kill the process now (SIGKILL) if it still holds the run folder, without waiting for it."""
        if self.is_running():
            requested = self._kill_at
            if requested is None:
                self._kill_at = self._clock()
            sent = False
            try:
                sent = self._signal(_kill_signal())
            finally:
                if not sent:  # it no longer holds the folder: not killed here (a Stop before stays requested)
                    self._kill_at = requested

    # --- the end ----------------------------------------------------------------------------------------------------
    def outcome(self) -> tuple[dict | None, str]:
        """How the run ended, as the folder tells: ``(summary, last line)``. ``summary``: ``result.json`` when this run
        wrote it (it finished: ``best_checkpoint``, ``registered_name``, as in its ``LIVERSAM_DONE`` line), else None;
        ``last line``: the last non-empty line of its output read so far ("" : none)."""
        import json

        summary = None
        result = self.run_dir / "result.json"
        try:
            if self.since is None or result.stat().st_mtime >= self.since:
                loaded = json.loads(result.read_text(encoding="utf-8"))
                summary = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            summary = None
        return summary, self._last_line
