"""A training command in a background process that outlives Slicer, its output read from a log file (no Qt).

The widget polls :meth:`TrainingProcess.read_lines` from a ``QTimer``; nothing here blocks the caller, so
Slicer stays responsive for hours of training. The process writes to ``<run folder>/console.log`` (not to
a pipe whose reader dies with Slicer) and runs in its own session / process group without a console
window, so closing Slicer does not stop it: the log says so and where to look. Stopping never waits: it sends
the process SIGTERM and returns; the widget's timer then calls :meth:`TrainingProcess.escalate_stop`, which kills the
process once the grace period has passed and it is still running. The training command checkpoints after every
epoch, so starting it again resumes.

A widget made again (the module reloaded, Slicer closed and opened again) has lost its :class:`TrainingProcess`; the
process record (:data:`PROCESS_RECORD_NAME`, written by :meth:`TrainingProcess.start`) tells
``AttachedProcess`` where that process's output begins in its log, so the new widget shows it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

STOP_GRACE_SECONDS = 10.0  # after SIGTERM, the time a process gets to end by itself before it is killed
#: In the run folder: the training process LiverSAMTrain started there (PID, start time, its console log and the offset
#: where its output begins in it, the command), for a widget made again while it runs (``AttachedProcess``).
PROCESS_RECORD_NAME = "console.json"


class LogReader:
    """The complete lines appended to a log file since the last call, from ``offset`` on (never blocks). A line is
    decoded once it is complete (a UTF-8 character split between two reads is read whole); a file that became shorter
    than the offset (truncated, or replaced by a new one) is read again from its start; a file that cannot be read
    (missing, permission denied) gives no lines, and is read again at the next call."""

    def __init__(self, path: str | Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self._partial = b""

    def read_lines(self) -> list[str]:
        """Every complete output line written since the last call. tqdm's ``\\r`` updates keep the last state of each
        line; a Windows line end (``\\r\\n``: Python's stdout in text mode there) is a line end, not an update."""
        try:
            with open(self.path, "rb") as log:
                if os.fstat(log.fileno()).st_size < self.offset:  # truncated or replaced: its lines start again
                    self.offset, self._partial = 0, b""
                log.seek(self.offset)
                data = log.read()
        except OSError:
            return []
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", "replace").removesuffix("\r").split("\r")[-1] for line in lines]


def write_process_record(path: str | Path, pid: int, log_path: str | Path, log_offset: int, command: Sequence[str],
                         started: float | None = None, token: str = "") -> None:  # fmt: skip
    """Write the process record (:data:`PROCESS_RECORD_NAME`) atomically; an error is left to the caller. ``token``:
    the one given to the process in ``$LIVERSAM_RUN_TOKEN`` (the run writes it into its lock file)."""
    from liversam.atomic_write import write_text_atomically

    record = {"pid": int(pid), "started": time.time() if started is None else started,
              "log": os.path.abspath(log_path), "log_offset": int(log_offset),
              "command": [str(part) for part in command], "token": str(token)}  # fmt: skip
    write_text_atomically(path, json.dumps(record, indent=2))


def read_process_record(path: str | Path) -> dict | None:
    """The process record at ``path``, or None when there is none or it cannot be read (partly written, another
    version's): the caller then knows nothing about the process it wrote. ``token``: "" in a record of an earlier
    version."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            return None
        return {"pid": int(record["pid"]), "started": float(record["started"]), "log": str(record["log"]),
                "log_offset": int(record["log_offset"]), "command": [str(c) for c in record.get("command", [])],
                "token": str(record.get("token") or "")}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def detached_process_options() -> dict:
    """Popen options: no console window on Windows, and a process group / session of its own everywhere,
    so the process neither flashes a console nor receives Slicer's Ctrl+C / hang-up."""
    if sys.platform == "win32":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        return {"creationflags": flags}
    return {"start_new_session": True}


class TrainingProcess:
    """One running command. ``start`` -> ``read_lines`` (repeatedly) -> ``returncode``; or ``stop`` ->
    ``escalate_stop`` (repeatedly, from a timer) until it is no longer running. ``clock``: seconds, monotonic (a
    test passes its own)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._process: subprocess.Popen | None = None
        self._log: LogReader | None = None
        self._clock = clock
        # set by stop(): when escalate_stop() kills a process still running
        self._kill_at: float | None = None

    def start(self, command: Sequence[str], log_path: str | Path, env: dict | None = None,
              cwd: str | None = None, record_path: str | Path | None = None) -> None:  # fmt: skip
        """Start ``command`` with its output (stdout and stderr) appended to ``log_path``. ``record_path``: where to
        write the process record (:func:`write_process_record`; a record that cannot be written is only logged: the
        process runs, and a widget made again while it runs shows its log from where it is then); the process then
        gets a new token in ``$LIVERSAM_RUN_TOKEN`` (``liversam train`` writes it into its lock file), which the record
        names too."""
        if self.is_running():
            raise RuntimeError("a training process is already running; stop it first")
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = LogReader(log_path, log_path.stat().st_size if log_path.is_file() else 0)
        self._kill_at = None
        env = dict(env if env is not None else os.environ)
        token = ""
        if record_path is not None:  # the run writes it into its lock file: the record is known to be its own
            from liversam.run_folder_lock import RUN_TOKEN_ENV

            token = env[RUN_TOKEN_ENV] = uuid.uuid4().hex
        with open(log_path, "ab") as log:
            self._process = subprocess.Popen(
                list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, **detached_process_options(),
            )  # fmt: skip
        if record_path is not None:
            try:
                write_process_record(record_path, self._process.pid, log_path, self._log.offset, command, token=token)
            except OSError as error:
                import logging

                logging.getLogger(__name__).warning("could not write '%s' (%s)", record_path, error)

    @property
    def log_path(self) -> Path | None:
        return None if self._log is None else self._log.path

    def read_lines(self) -> list[str]:
        """Every complete output line written since the last call (never blocks). tqdm's ``\\r`` updates
        keep the last state of each line."""
        return [] if self._log is None else self._log.read_lines()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def stop_requested(self) -> bool:
        """True once :meth:`stop` (or :meth:`kill`) was called for the current process."""
        return self._kill_at is not None

    @property
    def stopping(self) -> bool:
        """True from :meth:`stop` until the process has ended."""
        return self._kill_at is not None and self.is_running()

    def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """Ask the process to end (SIGTERM; on Windows it ends at once) and return without waiting for it. A process
        still running ``grace_seconds`` later is killed by :meth:`escalate_stop`, which the caller's timer calls."""
        if not self.is_running() or self._kill_at is not None:
            return
        assert self._process is not None
        self._kill_at = self._clock() + max(0.0, grace_seconds)
        self._process.terminate()

    def escalate_stop(self) -> bool:
        """After :meth:`stop`: kill the process when its grace period has passed and it still runs. Never waits
        (the exit is reaped by a later :meth:`is_running`). Returns :attr:`stopping`."""
        if self.stopping and self._clock() >= self._kill_at:
            self.kill()
        return self.stopping

    def kill(self) -> None:
        """Kill the process now (SIGKILL), without waiting for it."""
        if self.is_running():
            assert self._process is not None
            if self._kill_at is None:
                self._kill_at = self._clock()
            self._process.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        if self._process is None:
            return None
        return self._process.wait(timeout=timeout)
