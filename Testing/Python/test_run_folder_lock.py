"""One ``liversam train`` per run folder (:mod:`liversam.run_folder_lock`).

The training process outlives Slicer by design, and nothing told a run folder in use: after a Slicer restart,
LiverSAMTrain's Resume started a second ``liversam train`` in the same folder (both writing its checkpoints), and
Start could replace the exported data under a run still building its caches (review R4). The run now holds a kernel
lock on ``RUN_DIR/train.lock`` while it runs; a lock file its process left behind (killed) blocks nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from liversam.run_folder_lock import LOCK_NAME, RunFolderBusy, acquire, holder, release
from slicer_harness import REPO_ROOT

HOLD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from liversam.run_folder_lock import acquire
lock = acquire(sys.argv[1])
print('held', flush=True)
time.sleep(120)
"""


def hold_in_another_process(run: Path) -> subprocess.Popen:
    """A process that holds ``run`` as a running ``liversam train`` does; returns once it holds it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run), str(REPO_ROOT / "LiverSAM")],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9 semantics")
def test_a_live_run_holds_its_folder_and_a_killed_one_leaves_nothing_that_blocks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert holder(run) is None  # never used
    process = hold_in_another_process(run)
    try:
        assert holder(run) == process.pid
        with pytest.raises(RunFolderBusy) as busy:
            acquire(run)
        print(busy.value)
        assert f"PID {process.pid}" in str(busy.value) and "another --out folder" in str(busy.value)
    finally:
        process.kill()  # killed: no chance to remove its lock file
        process.wait(30)
    assert (run / LOCK_NAME).is_file()  # left behind
    deadline = time.monotonic() + 10
    while holder(run) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder(run) is None  # a stale lock file: nobody holds it
    lock = acquire(run)  # and it blocks nothing
    try:
        assert holder(run) is not None  # (this process holds it now)
    finally:
        release(lock)
    assert holder(run) is None


def test_liversam_train_refuses_a_run_folder_another_run_holds(tmp_path):
    """The trainer refuses before it writes anything (config.json, train.log, split, caches)."""
    from liversam.training import Trainer, TrainingConfig, TrainingRunError

    run = tmp_path / "run"
    run.mkdir()
    process = hold_in_another_process(run)
    try:
        with pytest.raises(TrainingRunError, match=f"in use by another liversam train process \\(PID {process.pid}\\)"):
            Trainer(TrainingConfig(data=str(tmp_path / "data"), out=str(run)), progress=False).run()
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    finally:
        process.kill()
        process.wait(30)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_a_lock_file_this_user_cannot_write_still_tells_a_live_run(tmp_path):
    """holder() opened the lock file for writing: another user's run (its lock file read-only to us) read as "not
    held", so LiverSAMTrain would have replaced its exported data. Reading is enough to test the lock."""
    import os

    from test_write_permissions import without_permission_override

    run = tmp_path / "run"
    run.mkdir()
    process = hold_in_another_process(run)
    try:
        (run / LOCK_NAME).chmod(0o444)
        ask = ("import sys; sys.path.insert(0, sys.argv[2]); from liversam.run_folder_lock import holder; "
               "print(holder(sys.argv[1]))")
        answer = subprocess.run(without_permission_override([sys.executable, "-c", ask, str(run),
                                                             str(REPO_ROOT / "LiverSAM")]),
                                capture_output=True, text=True, timeout=60, env=dict(os.environ))
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() == str(process.pid), answer.stdout
    finally:
        process.kill()
        process.wait(30)


def test_a_file_system_that_cannot_lock_leaves_no_lock_file(tmp_path, monkeypatch, caplog):
    """Where locks are not supported (some network shares) the run goes on unguarded; the lock file it created stayed,
    and LiverSAMTrain reads a lock file as "this run guards its folder" (so it stopped guarding the exported data of
    a run of a version without the lock there). The file is now removed (second review R6)."""
    import liversam.run_folder_lock as run_folder_lock

    def cannot_lock(handle):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(run_folder_lock, "_try_lock", cannot_lock)
    monkeypatch.setattr(run_folder_lock, "_take_ofd_lock", lambda handle: None, raising=False)  # nor OFD locks
    run = tmp_path / "run"
    run.mkdir()
    assert acquire(run) is None
    assert not (run / LOCK_NAME).exists()
    assert "cannot lock run folder" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OFD locks are Linux's")
def test_a_run_held_by_its_ofd_lock_alone_is_released_without_an_error(tmp_path, monkeypatch):
    """On a file system that takes OFD locks but refuses flock (ENOLCK), the run holds its folder by the OFD lock
    alone; release() still undid the flock and raised OSError in the trainer's ``finally``: a run that trained to the
    end ended with an internal error (review of session 39)."""
    import fcntl

    real_flock = fcntl.flock

    def no_flock(fd, operation):
        raise OSError(37, "No locks available")

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(fcntl, "flock", no_flock)  # run_folder_lock imports fcntl where it locks
    handle = acquire(run)
    assert handle is not None and holder(run) is not None  # held by its OFD lock, seen without the flock
    release(handle)  # no OSError
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert holder(run) is None and handle.closed


# --- holder() asks without taking the lock (session 39) -------------------------------------------------------------

FLOCK_ONLY = """
import fcntl, sys, time
handle = open(sys.argv[1], 'a+b')
fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
handle.seek(1); handle.truncate(); handle.write(b'%d\\n' % __import__('os').getpid()); handle.flush()
print('held', flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_flock_only(run: Path, seconds: float) -> subprocess.Popen:
    """A process that takes only the flock for ``seconds``: a run of an earlier version (for good), or an earlier
    version's holder() looking (for an instant, here stretched to ``seconds`` to be caught)."""
    process = subprocess.Popen([sys.executable, "-c", FLOCK_ONLY, str(run / LOCK_NAME), str(seconds)],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline().strip() == "held"
    return process


needs_ofd_locks = pytest.mark.skipif(not hasattr(__import__("fcntl") if sys.platform != "win32" else object(),
                                                 "F_OFD_GETLK"), reason="OFD locks are Linux's")  # fmt: skip


@needs_ofd_locks
def test_holder_tells_a_run_without_taking_its_lock(tmp_path, monkeypatch):
    """holder() took the lock for an instant to see whether it was free; a run of this version is now found with
    F_OFD_GETLK, without taking anything (the flock is never tried while it runs)."""
    import liversam.run_folder_lock as run_folder_lock

    def no_locking(handle):
        raise AssertionError("holder() took the lock")

    run = tmp_path / "run"
    run.mkdir()
    process = hold_in_another_process(run)
    try:
        monkeypatch.setattr(run_folder_lock, "_try_lock", no_locking)
        assert holder(run) == process.pid
    finally:
        process.kill()
        process.wait(30)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows is unchanged: no retry there")
def test_a_run_starting_while_the_flock_is_taken_for_an_instant_is_not_refused(tmp_path):
    """holder() (of any version) takes the flock for an instant when no run of this version holds the folder; a run
    starting in that instant was refused as if the folder were in use. It retries for FLOCK_RETRY_SECONDS."""
    from liversam.run_folder_lock import FLOCK_RETRY_SECONDS

    run = tmp_path / "run"
    run.mkdir()
    looking = hold_flock_only(run, FLOCK_RETRY_SECONDS / 5)
    try:
        lock = acquire(run)
        assert lock is not None
        assert holder(run) == __import__("os").getpid()
        release(lock)
    finally:
        looking.kill()
        looking.wait(30)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows is unchanged")
def test_a_run_of_an_earlier_version_holding_only_the_flock_is_still_seen_and_kept_out(tmp_path):
    """Runs of earlier versions hold only the flock, which F_OFD_GETLK cannot see: holder() still finds them (it takes
    the flock for an instant when no OFD lock is held), and a run of this version is refused after its retries."""
    from liversam.run_folder_lock import FLOCK_RETRY_SECONDS

    run = tmp_path / "run"
    run.mkdir()
    earlier = hold_flock_only(run, 120)
    try:
        assert holder(run) == earlier.pid
        started = time.monotonic()
        with pytest.raises(RunFolderBusy, match=f"PID {earlier.pid}"):
            acquire(run)
        assert FLOCK_RETRY_SECONDS <= time.monotonic() - started < FLOCK_RETRY_SECONDS + 5
    finally:
        earlier.kill()
        earlier.wait(30)


LOOK_REPEATEDLY = """
import sys, time
sys.path.insert(0, sys.argv[2])
from liversam.run_folder_lock import holder
print('looking', flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    holder(sys.argv[1])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="Windows is unchanged: the instant remains there")
def test_runs_start_while_another_process_keeps_asking_holder(tmp_path):
    """LiverSAMTrain asks holder() while a run may be starting: with holder() taking the lock, some of these starts
    were refused as busy (67-85 of about 70 000 starts in 1.5 s here)."""
    run = tmp_path / "run"
    run.mkdir()
    release(acquire(run))  # the lock file exists: holder() looks at it
    asker = subprocess.Popen([sys.executable, "-c", LOOK_REPEATEDLY, str(run), str(REPO_ROOT / "LiverSAM"), "30"],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert asker.stdout.readline().strip() == "looking"
    refused = starts = 0
    end = time.monotonic() + 1.5
    try:
        while time.monotonic() < end:
            starts += 1
            try:
                release(acquire(run))
            except RunFolderBusy:
                refused += 1
    finally:
        asker.kill()
        asker.wait(30)
    assert refused == 0, f"{refused} of {starts} starts refused while another process asked holder()"


# --- who holds it (session 40) ---------------------------------------------------------------------------------------
def test_the_lock_file_tells_readers_of_earlier_versions_the_pid_and_this_version_where_the_holder_runs(tmp_path):
    """LiverSAMTrain stops a run only once it knows the PID in train.lock is that run here: the run writes its host
    identity (and LiverSAMTrain's token) after its PID, which readers of earlier versions still read alone."""
    import io
    import os

    from liversam.run_folder_lock import (
        PID_FIELD_BYTES,
        RUN_TOKEN_ENV,
        LockHolder,
        _holder_in,
        holder_info,
        host_identity,
    )

    run = tmp_path / "run"
    run.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run), str(REPO_ROOT / "LiverSAM")],
                               stdout=subprocess.PIPE, text=True, env=dict(os.environ, **{RUN_TOKEN_ENV: "t0ken"}))  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "held"
        with open(run / LOCK_NAME, "rb") as handle:  # as holder() read it before session 40
            handle.seek(1)
            assert int(handle.read(32).decode("ascii", "replace").strip() or 0) == process.pid
        assert PID_FIELD_BYTES == 32
        found = holder_info(run)
        assert found == LockHolder(process.pid, token="t0ken", **host_identity()) and found.here() is True
        assert holder(run) == process.pid
    finally:
        process.kill()
        process.wait(30)
    earlier = _holder_in(io.BytesIO(b"\x001234\n"))  # an earlier version's lock file: the PID alone
    assert earlier == LockHolder(1234) and not earlier.identified and earlier.here() is None
    mine = host_identity()
    if "boot_id" in mine:  # Linux: the boot and the PID namespace decide (a container has its own namespace)
        assert LockHolder(1, **{**mine, "pid_ns": "pid:[1]"}).here() is False
        assert LockHolder(1, **{**mine, "host": "renamed"}).here() is True
    assert LockHolder(1, host="elsewhere").here() is (mine["host"] == "elsewhere")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_a_run_folder_that_cannot_be_searched_is_held_by_nobody_known_instead_of_an_error(tmp_path):
    """Path.is_file raises PermissionError (EACCES) on Python 3.12; holder() raised it to LiverSAMTrain's setup."""
    from test_write_permissions import without_permission_override

    locked = tmp_path / "locked"
    (locked / "run").mkdir(parents=True)
    release(acquire(locked / "run"))
    locked.chmod(0)
    ask = ("import sys; sys.path.insert(0, sys.argv[2]); from liversam import run_folder_lock as lock; "
           "print(lock.holder(sys.argv[1]), getattr(lock, 'holder_info', lock.holder)(sys.argv[1]))")
    try:
        answer = subprocess.run(without_permission_override([sys.executable, "-c", ask, str(locked / "run"),
                                                             str(REPO_ROOT / "LiverSAM")]),
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        locked.chmod(0o755)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "None None"


def test_a_lock_written_under_linux_is_not_taken_for_here_by_a_system_without_a_boot_id(monkeypatch):
    """A lock written in WSL (Linux, the Windows host name) seen from Windows: the host names match, but a PID there is
    not a PID here. One side with a Linux boot id and the other without means two kernels."""
    import liversam.run_folder_lock as run_folder_lock
    from liversam.run_folder_lock import LockHolder

    monkeypatch.setattr(run_folder_lock, "host_identity", lambda: {"host": "desk"})
    assert LockHolder(1234, host="desk", boot_id="b", pid_ns="pid:[1]").here() is False
    assert LockHolder(1234, host="desk").here() is True
    monkeypatch.setattr(run_folder_lock, "host_identity", lambda: {"host": "desk", "boot_id": "b", "pid_ns": "pid:[1]"})
    assert LockHolder(1234, host="desk").here() is False
    assert LockHolder(1234, host="other", boot_id="b", pid_ns="pid:[1]").here() is True


MAC_SESSION = "3F2A61C4-8E1B-4D55-9A0E-7C1D2B3E4F50"


@pytest.fixture
def macos(monkeypatch):
    """macOS on this machine: ``sys.platform`` and libc's ``sysctlbyname`` as ``run_folder_lock`` asks it (through
    ctypes) for ``kern.bootsessionuuid``; ``answer`` (bytes, or None: the call fails) is what it gives. Yields the
    stand-in: ``asked`` lists the names asked."""
    import ctypes
    import ctypes.util

    import liversam.run_folder_lock as run_folder_lock

    libc = types.SimpleNamespace(answer=MAC_SESSION.encode(), asked=[])

    def sysctlbyname(name, buffer, size, new_value, new_size) -> int:
        libc.asked.append(name)
        if libc.answer is None or new_value is not None or new_size:
            return -1
        if size._obj.value < len(libc.answer) + 1:  # (ENOMEM: the buffer is too small)
            return -1
        ctypes.memmove(buffer, libc.answer + b"\0", len(libc.answer) + 1)
        size._obj.value = len(libc.answer) + 1
        return 0

    libc.sysctlbyname = sysctlbyname
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "/usr/lib/libc.dylib" if name == "c" else None)
    monkeypatch.setattr(ctypes, "CDLL", lambda path, use_errno=False: libc if path == "/usr/lib/libc.dylib" else None)
    host_identity = run_folder_lock.host_identity  # (a test may stand in for it: the cache is cleared all the same)
    host_identity.cache_clear()
    yield libc
    host_identity.cache_clear()  # this machine's identity again for the next test


def test_macos_host_identity_is_its_host_name_and_boot_session(macos):
    """A Mac had its host name alone, which can change with the network while a run goes on. Its boot session
    (``kern.bootsessionuuid``, by ``sysctlbyname``: no process started) is now part of it; the host name alone when
    that cannot be read."""
    import socket

    from liversam.run_folder_lock import host_identity

    assert host_identity() == {"host": socket.gethostname(), "boot_session": MAC_SESSION}
    assert macos.asked == [b"kern.bootsessionuuid"]
    for answer in (None, b"not a uuid", b""):
        macos.answer = answer
        host_identity.cache_clear()
        assert host_identity() == {"host": socket.gethostname()}


def test_a_mac_run_is_here_after_its_host_name_changed_and_lock_files_of_both_versions_are_read(macos, monkeypatch):
    """A run started on a Mac before its host name changed (another network) was taken for another machine's: Stop
    refused. Its boot session decides now. A lock file of the earlier version (host name alone) is still compared by
    host name, and one of this version still gives earlier readers the host name they compare; a lock written under
    Linux is never here on a Mac, and a Mac's never on a system that cannot tell its boot (Windows)."""
    import io
    import json

    import liversam.run_folder_lock as run_folder_lock
    from liversam.run_folder_lock import PID_FIELD_BYTES, LockHolder, _holder_in, _lock_content

    monkeypatch.setattr(run_folder_lock.socket, "gethostname", lambda: "mac.local")
    run_folder_lock.host_identity.cache_clear()
    written = b"\0" + _lock_content()  # (the byte before the PID field: the one locked on Windows)
    identity = json.loads(written[1 + PID_FIELD_BYTES:].decode())
    assert (identity["host"], identity["boot_session"]) == ("mac.local", MAC_SESSION)
    assert int(written[1:1 + PID_FIELD_BYTES]) == os.getpid()  # the PID field, as every version reads it
    found = _holder_in(io.BytesIO(written))
    assert found.here() is True
    monkeypatch.setattr(run_folder_lock, "host_identity", lambda: {"host": "dhcp-10-1-2-3.example.org",
                                                                    "boot_session": MAC_SESSION})  # fmt: skip
    assert found.here() is True  # the host name changed with the network: the same boot of the same Mac
    monkeypatch.setattr(run_folder_lock, "host_identity", lambda: {"host": "mac.local",
                                                                    "boot_session": "another boot"})  # fmt: skip
    assert found.here() is False  # restarted since (or another Mac of that name): its PID is not that run's
    # a lock file of the earlier version written on a Mac (the host name alone), read here: by host name, as before
    assert LockHolder(1, host="mac.local").here() is True and LockHolder(1, host="other.local").here() is False
    # this version's lock file read by the earlier version, which reads host, boot_id, pid_ns and token only: it
    # compares the host name, as it did its own lock files
    earlier = {key: identity.get(key, "") for key in ("host", "boot_id", "pid_ns", "token")}
    assert earlier == {"host": "mac.local", "boot_id": "", "pid_ns": "", "token": ""}
    # a lock written under Linux (a container, a VM, another machine sharing the folder) is never here on a Mac
    assert LockHolder(1, host="mac.local", boot_id="b", pid_ns="pid:[1]").here() is False
    # a Mac's lock file seen from Linux or Windows (the same host name): never here
    monkeypatch.setattr(run_folder_lock, "host_identity", lambda: {"host": "mac.local", "boot_id": "b",
                                                                    "pid_ns": "pid:[1]"})  # fmt: skip
    assert found.here() is False
    monkeypatch.setattr(run_folder_lock, "host_identity", lambda: {"host": "mac.local"})
    assert found.here() is False and LockHolder(1, host="mac.local").here() is True  # (Windows: its host name)


def test_a_run_on_a_mac_is_found_here_through_its_lock_file(macos, tmp_path):
    """The lock file a run writes on a Mac (the platform and sysctlbyname stood in for) names its boot session, and
    its holder is here."""
    from liversam.run_folder_lock import holder_info

    handle = acquire(tmp_path)
    try:
        found = holder_info(tmp_path)
        assert found.pid == os.getpid() and found.boot_session == MAC_SESSION and found.boot_id == ""
        assert found.here() is True
    finally:
        release(handle)


def test_opening_the_lock_file_never_erases_what_its_holder_wrote(tmp_path, monkeypatch):
    """Two runs starting at once in a new folder: the second one's open (before it finds the folder held) must not
    truncate the first one's PID away. It looked for the file, and opened it with 'w+b' when it saw none: a look
    made before the first run created it is played here by a look that sees no file."""
    from liversam.run_folder_lock import _open

    (tmp_path / LOCK_NAME).unlink(missing_ok=True)
    handle = acquire(tmp_path)
    try:
        written = (tmp_path / LOCK_NAME).read_bytes()
        monkeypatch.setattr(Path, "is_file", lambda self: False)  # the second run's look, made before the file was
        _open(tmp_path).close()
        monkeypatch.undo()
        assert (tmp_path / LOCK_NAME).read_bytes() == written and str(os.getpid()).encode() in written
    finally:
        release(handle)
