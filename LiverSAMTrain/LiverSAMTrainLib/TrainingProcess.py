"""A training command in a background process that outlives Slicer, its output read from a log file (no Qt).

The widget polls :meth:`TrainingProcess.read_lines` from a ``QTimer``; nothing here blocks the caller, so
Slicer stays responsive for hours of training. The process writes to ``<run folder>/console.log`` (not to
a pipe whose reader dies with Slicer) and runs in its own session / process group without a console
window, so closing Slicer does not stop it: the log says so and where to look. Stopping never waits: it sends
the process SIGTERM and returns; the widget's timer then calls :meth:`TrainingProcess.escalate_stop`, which kills the
process once the grace period has passed and it is still running. The training command checkpoints after every
epoch, so starting it again resumes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

STOP_GRACE_SECONDS = 10.0  # after SIGTERM, the time a process gets to end by itself before it is killed


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
        self._log_path: Path | None = None
        self._offset = 0
        self._partial = ""
        self._clock = clock
        # set by stop(): when escalate_stop() kills a process still running
        self._kill_at: float | None = None

    def start(self, command: Sequence[str], log_path: str | Path, env: dict | None = None,
              cwd: str | None = None) -> None:  # fmt: skip
        """Start ``command`` with its output (stdout and stderr) appended to ``log_path``."""
        if self.is_running():
            raise RuntimeError("a training process is already running; stop it first")
        self._log_path = Path(log_path)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self._log_path.stat().st_size if self._log_path.is_file() else 0
        self._partial = ""
        self._kill_at = None
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env if env is not None else dict(os.environ), cwd=cwd, **detached_process_options(),
            )  # fmt: skip

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def read_lines(self) -> list[str]:
        """Every complete output line written since the last call (never blocks). tqdm's ``\\r`` updates
        keep the last state of each line."""
        if self._log_path is None or not self._log_path.is_file():
            return []
        with open(self._log_path, "rb") as log:
            log.seek(self._offset)
            data = log.read()
        self._offset += len(data)
        text = self._partial + data.decode("utf-8", "replace")
        *lines, self._partial = text.split("\n")
        return [line.split("\r")[-1] for line in lines]

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
