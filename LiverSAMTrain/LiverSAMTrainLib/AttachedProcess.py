"""A ``liversam train`` that holds a run folder but that this widget did not start (no Qt, no Slicer).

The training process outlives its widget: a module reload, or Slicer closed and opened again, makes a new widget whose
:class:`~LiverSAMTrainLib.TrainingProcess.TrainingProcess` knows nothing of it, and a run started from a terminal was
never known. The run holds its folder's lock (:mod:`liversam.run_folder_lock`: ``RUN_DIR/train.lock``, with its PID)
while it runs, so :meth:`AttachedProcess.find` finds it from the folder alone, and the widget polls it as it polls a
process it started (the same methods: :meth:`~AttachedProcess.read_lines`, :meth:`~AttachedProcess.is_running`,
:meth:`~AttachedProcess.stop`, :meth:`~AttachedProcess.escalate_stop`, :meth:`~AttachedProcess.kill`):

- its output: the module's ``console.log`` from where that process's output begins (the process record,
  :data:`~LiverSAMTrainLib.TrainingProcess.PROCESS_RECORD_NAME`, names the PID and the offset), with the ``--events``
  lines the widget shows progress from; for a run it did not start (a terminal's, or a record lost), the trainer's own
  ``train.log`` from its last lines on;
- its end: the lock released (the kernel releases it when the process ends, however it ends) and then the PID gone
  (or :data:`END_WAIT_SECONDS` later: the process may print its error after it released the lock);
  :meth:`~AttachedProcess.outcome` tells how it ended as well as the folder can (``result.json`` written by this run:
  finished and registered; else the log's last line), since its exit code belongs to the process that started it;
- Stop: SIGTERM, then SIGKILL after the grace period, as for a process the widget started, each sent only after the
  PID was checked to still hold the folder's lock (PIDs are reused: a process that does not hold the lock is never
  signalled). On Linux the PID is pinned with a pidfd before the check, so it cannot be reused between the check and
  the signal. Windows has no SIGTERM: ``os.kill`` ends the process at once there (the epoch under way is lost, as
  for Stop on a process the widget started), after the same check; the lock code is tested on Linux / POSIX only.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .TrainingProcess import PROCESS_RECORD_NAME, STOP_GRACE_SECONDS, LogReader, read_process_record

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


class StopRefused(RuntimeError):
    """The attached process cannot be stopped from here (its PID unknown, or another user's)."""


def _kill_signal() -> int:
    return getattr(signal, "SIGKILL", signal.SIGTERM)  # Windows: no SIGKILL; SIGTERM ends the process at once there


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
    :meth:`find`; ``clock``: seconds, monotonic (a test passes its own)."""

    def __init__(self, run_dir: str | Path, pid: int, clock: Callable[[], float] = time.monotonic) -> None:
        from liversam.run_folder_lock import LOCK_NAME

        self.run_dir = Path(run_dir)
        self.pid = int(pid)
        self._clock = clock
        self._kill_at: float | None = None
        self._released_at: float | None = None
        self._ended = False
        lock = self.run_dir / LOCK_NAME
        try:
            #: when the process took the lock (the lock file's mtime: it writes its PID there then); None: unknown
            self.since: float | None = lock.stat().st_mtime
        except OSError:
            self.since = None
        record = read_process_record(self.run_dir / PROCESS_RECORD_NAME)
        #: the command of the process, when this module started it (its process record names its PID)
        self.command: list[str] = []
        #: True: :meth:`read_lines` reads the process's console (its ``--events`` lines too); False: ``train.log``
        self.console = False
        #: the lines before attaching that :meth:`read_lines` does not return (train.log's last lines), for the widget
        self.earlier: list[str] = []
        #: True when the output before attaching was longer than :data:`REPLAY_BYTES` (its start is not read)
        self.skipped = False
        if self._is_record_of_holder(record):
            log = Path(record["log"])
            start = record["log_offset"]
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

    def _is_record_of_holder(self, record: dict | None) -> bool:
        """The process record names this process: its PID, written before (or just after) the lock was taken."""
        if record is None or not self.pid or record["pid"] != self.pid:
            return False
        return self.since is None or record["started"] <= self.since + RECORD_CLOCK_SLACK_S

    @classmethod
    def find(cls, run_dir: str | Path, clock: Callable[[], float] = time.monotonic) -> AttachedProcess | None:
        """The process holding ``run_dir`` now, or None when none does (never waits)."""
        from liversam.run_folder_lock import holder

        if not run_dir:
            return None
        pid = holder(run_dir)
        return None if pid is None else cls(run_dir, pid, clock)

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
        """Send ``signum`` to the PID only while it holds the run folder's lock; True when sent, False when it no
        longer holds it (it ended; its PID may be another process's by now). Raises :class:`StopRefused` when it
        cannot be signalled (its PID unknown, another user's process)."""
        if not self.pid:
            raise StopRefused(
                f"The training process in '{self.run_dir}' cannot be stopped from here: its PID could not be read from "
                f"'{self.run_dir / 'train.lock'}'. Stop it from the operating system (a 'liversam train' process)."
            )
        pidfd = None
        if hasattr(os, "pidfd_open"):  # Linux 5.3+: the PID cannot be reused while the pidfd is open
            try:
                pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                return False
            except OSError:  # ENOSYS (an older kernel), EMFILE: the check and os.kill below, microseconds apart
                pidfd = None
        try:
            if not self.holds_folder():
                return False
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(self.pid, signum)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            raise StopRefused(
                f"The training process in '{self.run_dir}' (PID {self.pid}) belongs to another user: stop it as that "
                "user."
            ) from None
        finally:
            if pidfd is not None:
                os.close(pidfd)

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
