"""A training command in a background process, its output read on a thread (no Qt).

The widget polls :meth:`TrainingProcess.read_lines` from a ``QTimer``; nothing here blocks the caller, so
Slicer stays responsive for hours of training. Stopping terminates the process (then kills it after a
grace period); the training command checkpoints after every epoch, so starting it again resumes.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence


class TrainingProcess:
    """One running command. ``start`` -> ``read_lines`` (repeatedly) -> ``returncode`` / ``stop``."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader: threading.Thread | None = None

    def start(self, command: Sequence[str], env: dict | None = None, cwd: str | None = None) -> None:
        if self.is_running():
            raise RuntimeError("a training process is already running; stop it first")
        creation = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32" else {}
        self._process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            **creation,
        )
        self._lines = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self._process,), daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:  # tqdm writes '\r' updates: keep the last state of each line
            self._lines.put(line.rstrip("\n").split("\r")[-1])
        process.stdout.close()

    def read_lines(self) -> list[str]:
        """Every output line received since the last call (never blocks)."""
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Terminate the process; kill it when it has not ended after ``grace_seconds``."""
        if not self.is_running():
            return
        assert self._process is not None
        self._process.terminate()
        try:
            self._process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def wait(self, timeout: float | None = None) -> int | None:
        if self._process is None:
            return None
        code = self._process.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code
