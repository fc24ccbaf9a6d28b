"""One ``liversam train`` per run folder: the run holds an operating-system lock on ``RUN_DIR/train.lock`` while it runs.

The lock is the kernel's (``flock`` on POSIX, ``msvcrt.locking`` on Windows), not the file's existence: it ends with the
process however that ends (finished, failed, killed, the machine restarted), so a lock file left behind never blocks a
later run. The file holds the holder's PID after its first byte (the byte locked on Windows, where a locked byte cannot
be read). Standard library only: the Slicer module (LiverSAMTrain) asks :func:`holder` before it replaces a run
folder's exported data or starts a second process in it.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import IO

LOCK_NAME = "train.lock"

log = logging.getLogger(__name__)


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder (``pid``: 0 when it could not be read)."""

    def __init__(self, run_dir: Path, pid: int) -> None:
        self.run_dir, self.pid = run_dir, pid
        who = f"(PID {pid})" if pid else "(PID unknown)"
        super().__init__(
            f"Run folder '{run_dir}' is in use by another liversam train process {who}: two runs in one folder would "
            "overwrite each other's checkpoints. Wait for it to end (its progress is in the folder's train.log), stop "
            "it, or use another --out folder."
        )


def _try_lock(handle: IO[bytes]) -> bool:
    """Lock ``handle`` without waiting: True when locked, False when another process holds it. Raises OSError when
    the file system cannot lock (some network file systems)."""
    try:
        if sys.platform == "win32":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if isinstance(error, (BlockingIOError, PermissionError)) or error.errno in (
            errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK
        ):  # fmt: skip
            return False
        raise


def _unlock(handle: IO[bytes]) -> None:
    if sys.platform == "win32":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _open(run_dir: Path) -> IO[bytes]:
    path = Path(run_dir) / LOCK_NAME
    return open(path, "r+b" if path.is_file() else "w+b")  # never truncated before it is locked


def _pid_in(handle: IO[bytes]) -> int:
    try:
        handle.seek(1)
        return int(handle.read(32).decode("ascii", "replace").strip() or 0)
    except (OSError, ValueError):
        return 0


def acquire(run_dir: str | Path) -> IO[bytes] | None:
    """Hold ``run_dir`` for this process until :func:`release` (or the process ends). Raises :class:`RunFolderBusy`
    when another process holds it; None (logged) when the file system cannot lock: the run goes on unguarded."""
    run_dir = Path(run_dir)
    created = not (run_dir / LOCK_NAME).is_file()
    handle = _open(run_dir)
    try:
        locked = _try_lock(handle)
    except OSError as error:
        handle.close()
        if created:  # a lock file that locks nothing would tell LiverSAMTrain that this run guards its folder
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
        log.warning("cannot lock run folder '%s' (%s): another liversam train in it would not be noticed", run_dir, error)
        return None
    if not locked:
        pid = _pid_in(handle)
        handle.close()
        raise RunFolderBusy(run_dir, pid)
    handle.seek(1)
    handle.truncate()
    handle.write(f"{os.getpid()}\n".encode("ascii"))
    handle.flush()
    return handle


def release(handle: IO[bytes] | None) -> None:
    if handle is not None:
        try:
            _unlock(handle)
        finally:
            handle.close()


def holder(run_dir: str | Path) -> int | None:
    """The PID of the live process that holds ``run_dir`` (0 when it cannot be read), or None when none does (no lock
    file, a lock file its process left behind, or a file system that cannot lock). Never waits."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:  # read access is enough to lock: another user's run, a read-only share
            if _try_lock(handle):
                _unlock(handle)
                return None
            return _pid_in(handle)
    except OSError:
        return None
