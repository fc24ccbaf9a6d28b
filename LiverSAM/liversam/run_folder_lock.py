"""One ``liversam train`` per run folder: the run holds an operating-system lock on ``RUN_DIR/train.lock`` while it runs.

The lock is the kernel's (``flock`` on POSIX, ``msvcrt.locking`` on Windows), not the file's existence: it ends with the
process however that ends (finished, failed, killed, the machine restarted), so a lock file left behind never blocks a
later run. The file holds the holder's PID after its first byte (the byte locked on Windows, where a locked byte cannot
be read). Standard library only: the Slicer module (LiverSAMTrain) asks :func:`holder` before it replaces a run
folder's exported data or starts a second process in it.

Asking without taking the lock (session 39): :func:`holder` took the lock for an instant to see whether it was free,
and a ``liversam train`` starting in that instant was refused as if the folder were in use. On Linux a run now also
holds an open-file-description lock (``F_OFD_SETLK``) on the first byte, which :func:`holder` asks about with
``F_OFD_GETLK`` without taking anything. ``F_OFD_GETLK`` cannot see a ``flock`` (another kind of lock), and a run of
an earlier version holds only that; so the ``flock`` stays (runs of both versions exclude each other), and when no OFD
lock is held :func:`holder` still takes the ``flock`` for an instant to find such a run. A run starting at that
instant is no longer refused: on POSIX, a run that finds the ``flock`` taken (and, on Linux, its OFD lock free, so no
run of this version holds the folder) tries again for :data:`FLOCK_RETRY_SECONDS` before it gives up; a
:func:`holder` holds it for microseconds, a run for good. Where OFD locks are not available (macOS, a file system
without them) :func:`holder` takes the ``flock`` for an instant as before, and the retry covers it. Windows is
unchanged (``msvcrt.locking`` has no way to ask and no retry: the instant remains there).

Who holds it (session 40): LiverSAMTrain stops a run it follows only after checking that the PID in the lock file is
a process of this machine and PID namespace that holds the lock. The file's PID line is padded with spaces to
:data:`PID_FIELD_BYTES` (readers of earlier versions read those bytes as the PID, unchanged) and followed by one JSON
line: the holder's host identity (:func:`host_identity`: host name; on Linux the boot id and the PID namespace; on
macOS, since session 41, the boot session, as a Mac's host name can change with the network) and the
token LiverSAMTrain gave the process it started (``$LIVERSAM_RUN_TOKEN``: its process record names the same token, so
the module tells its own process from another run whatever the PIDs: a Windows venv launcher's PID is not the
trainer's). :func:`holder_info` reads both; a lock file of an earlier version has neither (``LockHolder.here()`` is
None then).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOCK_NAME = "train.lock"

#: The bytes after the first that hold the holder's PID line, padded with spaces: readers before session 40 read
#: exactly these as the PID (``int()`` ignores the spaces), so they still read it; the host identity follows.
PID_FIELD_BYTES = 32
#: The environment variable in which LiverSAMTrain gives the process it starts a token; the run writes it into its lock
#: file and LiverSAMTrain into its process record (console.json), which is how it knows the record is this run's.
RUN_TOKEN_ENV = "LIVERSAM_RUN_TOKEN"

#: How long a run retries a taken ``flock`` on POSIX when no run of this version holds the folder (a holder() holds
#: it for an instant; a run of an earlier version, or of this one where there are no OFD locks, for good).
FLOCK_RETRY_SECONDS = 0.5

#: ``struct flock`` (l_type, l_whence, l_start, l_len, l_pid; off_t is 64-bit for OFD locks), padded to its alignment.
_FLOCK_STRUCT = "hhqqi0q"

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


def _ofd(handle: IO[bytes], command: str, lock_type: str) -> bytes | None:
    """``fcntl(handle, F_OFD_<command>)`` on the file's first byte; None where OFD locks do not exist (not Linux)."""
    if not sys.platform.startswith("linux"):  # _FLOCK_STRUCT is Linux's struct flock (illumos has the constants too)
        return None
    import fcntl

    if not hasattr(fcntl, f"F_OFD_{command}"):
        return None
    request = struct.pack(_FLOCK_STRUCT, getattr(fcntl, lock_type), os.SEEK_SET, 0, 1, 0)  # l_pid must be 0
    return fcntl.fcntl(handle.fileno(), getattr(fcntl, f"F_OFD_{command}"), request)


def _take_ofd_lock(handle: IO[bytes]) -> bool | None:
    """The OFD write lock on the first byte, without waiting: True when taken, False when another open file holds it,
    None when this system or file system has no OFD locks (then only ``flock`` guards the folder)."""
    try:
        if _ofd(handle, "SETLK", "F_WRLCK") is None:
            return None
        return True
    except OSError as error:
        if isinstance(error, (BlockingIOError, PermissionError)) or error.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # EINVAL (a kernel before 3.15), ENOLCK / EOPNOTSUPP (a file system without POSIX locks)


def _ofd_lock_held(handle: IO[bytes]) -> bool | None:
    """Whether another open file holds the OFD lock, asked without taking it (``F_OFD_GETLK``); None when it cannot
    be asked here."""
    try:
        answer = _ofd(handle, "GETLK", "F_WRLCK")
    except OSError:
        return None
    if answer is None:
        return None
    import fcntl

    return struct.unpack(_FLOCK_STRUCT, answer)[0] != fcntl.F_UNLCK


def _lock(handle: IO[bytes]) -> bool:
    """Take the run folder's locks without waiting (see the module docstring): True when this process holds the
    folder, False when another process does. Raises OSError when the file system cannot lock at all."""
    ofd = _take_ofd_lock(handle)
    if ofd is False:
        return False  # a run of this version holds it
    deadline = time.monotonic() + (0.0 if sys.platform == "win32" else FLOCK_RETRY_SECONDS)
    while True:
        try:
            if _try_lock(handle):
                return True
        except OSError:
            if ofd:
                return True  # the OFD lock guards the folder; the flock only keeps out earlier versions
            raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _unlock(handle: IO[bytes]) -> None:
    if sys.platform == "win32":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _open(run_dir: Path) -> IO[bytes]:
    # never truncated on opening: two runs starting at once in a new folder would erase what the first one wrote
    fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "r+b")


def _pid_in(handle: IO[bytes]) -> int:
    try:
        handle.seek(1)
        return int(handle.read(PID_FIELD_BYTES).decode("ascii", "replace").strip() or 0)
    except (OSError, ValueError):
        return 0


#: macOS's boot session UUID: made by the kernel once per boot (XNU's ``bootsessionuuid_string``), the same after
#: sleep and wake. Not ``kern.boottime``: that is a wall-clock time, which moves when the clock is set.
_DARWIN_BOOT_SESSION_SYSCTL = b"kern.bootsessionuuid"


def _darwin_boot_session() -> str:
    """This boot of this Mac (``sysctl kern.bootsessionuuid``, asked through libc's ``sysctlbyname``: no process
    started, no package); "" when it cannot be read."""
    import ctypes
    import ctypes.util
    import uuid

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        query = libc.sysctlbyname
        query.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                          ctypes.c_size_t]  # fmt: skip
        query.restype = ctypes.c_int
        size = ctypes.c_size_t(64)  # a UUID string is 36 characters and its NUL
        buffer = ctypes.create_string_buffer(size.value)
        if query(_DARWIN_BOOT_SESSION_SYSCTL, buffer, ctypes.byref(size), None, 0) != 0:
            return ""
        session = buffer.value.decode("ascii").strip()
        uuid.UUID(session)  # (ValueError for anything else)
        return session
    except (OSError, AttributeError, ValueError, TypeError):  # no libc, no such function, not a UUID
        return ""


@functools.lru_cache(maxsize=1)
def host_identity() -> dict[str, str]:
    """Where this process runs: ``host`` (the host name) and, on Linux, ``boot_id`` (this boot of this machine) and
    ``pid_ns`` (this PID namespace: a container has its own); on macOS ``boot_session`` (this boot of this Mac: its
    host name can change with the network, from DHCP or a reverse DNS lookup, while a run goes on). A PID means this
    process only where they match (:meth:`LockHolder.here`).

    Windows keeps the host name alone: its computer name is set by an administrator (the network does not rename it),
    and it has no boot identity to ask without extra packages or a WMI process (seconds): a boot time made from
    ``GetTickCount64`` drifts with the clock, the kernel's boot time (``NtQuerySystemInformation``) moves when the
    clock is set, and a Fast Startup resume is not a new boot."""
    identity = {"host": socket.gethostname()}
    if sys.platform == "darwin":
        session = _darwin_boot_session()
        if session:
            identity["boot_session"] = session
        return identity
    try:
        identity["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        identity["pid_ns"] = os.readlink("/proc/self/ns/pid")
    except (OSError, ValueError):  # not Linux (or no /proc): the host name alone
        identity.pop("boot_id", None)
    return identity


@dataclass(frozen=True)
class LockHolder:
    """The process holding a run folder, as its lock file tells: ``pid`` (0: unreadable), and what this version writes
    after it (empty in a lock file of an earlier version, or one being written): the :func:`host_identity` of the
    holder and its LiverSAMTrain token (``$LIVERSAM_RUN_TOKEN``; "" when it was not started by LiverSAMTrain)."""

    pid: int
    host: str = ""
    boot_id: str = ""
    pid_ns: str = ""
    token: str = ""
    boot_session: str = ""  # macOS (session 41; a lock file of an earlier version written on a Mac has the host alone)

    @property
    def identified(self) -> bool:
        """True when the lock file holds the holder's host identity (written by this version)."""
        return bool(self.host)

    def here(self) -> bool | None:
        """Whether the holder runs on this machine, in this PID namespace (its PID is then a PID here): compared by
        boot id and PID namespace where both sides have them (Linux), by boot session where both have one (macOS: the
        host name may have changed meanwhile), else by host name (Windows; a Mac's lock file of an earlier version);
        None when the lock file does not tell (a version before session 40). A lock file written under Linux is never
        here on a system without a Linux boot id (a WSL run seen from Windows has its host name), nor the other way
        round, and one with a boot session never here on a system without one."""
        if not self.identified:
            return None
        mine = host_identity()
        if self.boot_id and self.pid_ns and mine.get("boot_id") and mine.get("pid_ns"):
            return (self.boot_id, self.pid_ns) == (mine["boot_id"], mine["pid_ns"])
        if bool(self.boot_id) != bool(mine.get("boot_id")):
            return False  # one side a Linux kernel, the other not (a WSL run seen from Windows has its host name)
        if self.boot_session and mine.get("boot_session"):
            return self.boot_session == mine["boot_session"]
        if self.boot_session:
            return False  # a Mac's run seen from a system that cannot tell its boot (Windows): its PID is not one here
        return self.host == mine["host"]


def _identity_in(handle: IO[bytes]) -> dict:
    """The JSON line after the PID field ({} when there is none: an earlier version's lock file, one being written)."""
    try:
        handle.seek(1 + PID_FIELD_BYTES)
        loaded = json.loads(handle.read(4096).split(b"\n", 1)[0].decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _holder_in(handle: IO[bytes]) -> LockHolder:
    identity = _identity_in(handle)
    fields = {key: str(identity.get(key) or "") for key in ("host", "boot_id", "pid_ns", "token", "boot_session")}
    return LockHolder(_pid_in(handle), **fields)


def _lock_content() -> bytes:
    """This process as the holder: its PID line padded to :data:`PID_FIELD_BYTES`, then its identity and token."""
    identity = {**host_identity(), "token": os.environ.get(RUN_TOKEN_ENV, "")}
    return f"{os.getpid()}\n".ljust(PID_FIELD_BYTES).encode("ascii") + (json.dumps(identity) + "\n").encode("ascii")


def acquire(run_dir: str | Path) -> IO[bytes] | None:
    """Hold ``run_dir`` for this process until :func:`release` (or the process ends). Raises :class:`RunFolderBusy`
    when another process holds it; None (logged) when the file system cannot lock: the run goes on unguarded."""
    run_dir = Path(run_dir)
    created = not (run_dir / LOCK_NAME).is_file()
    handle = _open(run_dir)
    try:
        locked = _lock(handle)
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
    handle.write(_lock_content())  # in place, then cut: a reader sees the old or the new PID field, never none
    handle.truncate()
    handle.flush()
    return handle


def release(handle: IO[bytes] | None) -> None:
    if handle is not None:
        try:
            _unlock(handle)
        except OSError as error:  # a flock the file system refused (the OFD lock alone held the folder): nothing to
            log.debug("run folder lock: unlock refused (%s); closing the file drops the locks", error)  # undo
        finally:
            handle.close()


def holder(run_dir: str | Path) -> int | None:
    """The PID of the live process that holds ``run_dir`` (0 when it cannot be read), or None when none does (no lock
    file, a lock file its process left behind, a file system that cannot lock, or a lock file or folder that cannot be
    looked at: permission denied). Never waits. A run of this version is found without taking its lock on Linux
    (``F_OFD_GETLK``); otherwise the ``flock`` is taken for an instant, which no longer makes a run starting then fail
    (module docstring)."""
    found = holder_info(run_dir)
    return None if found is None else found.pid


def holder_info(run_dir: str | Path) -> LockHolder | None:
    """:func:`holder`, with what the lock file tells about the holder (:class:`LockHolder`)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        if not path.is_file():  # (raises PermissionError for a folder that cannot be searched)
            return None
        with open(path, "rb") as handle:  # read access is enough to lock: another user's run, a read-only share
            if _ofd_lock_held(handle):  # a run of this version: told without taking anything
                return _holder_in(handle)
            # None holds the OFD lock (or it cannot be asked here): a run of an earlier version would hold only the
            # flock. A run starting while it is taken here retries (_lock), so it is not refused.
            if _try_lock(handle):
                _unlock(handle)
                return None
            return _holder_in(handle)
    except OSError:
        return None
