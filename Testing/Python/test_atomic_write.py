"""Atomic writes: an error leaves the old file, permissions are a normal file's, killed writers' leftovers go."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from liversam.atomic_write import atomic_path, stale_partial_files, write_text_atomically


def test_error_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_new_file_gets_umask_permissions_and_an_existing_file_keeps_its_own(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    target = write_text_atomically(tmp_path / "a.json", "{}")
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    target.chmod(0o640)
    write_text_atomically(target, "[]")
    assert target.stat().st_mode & 0o777 == 0o640 and target.read_text() == "[]"


def test_leftover_of_a_dead_writer_is_removed_by_the_next_write_but_a_live_one_is_kept(tmp_path):
    target = tmp_path / "liver.seg.nrrd"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    leftover = tmp_path / f".liver.seg.nrrd.liversam-partial-{dead_pid}-x1y2.seg.nrrd"
    live = tmp_path / f".liver.seg.nrrd.liversam-partial-{os.getpid()}-a1b2.seg.nrrd"
    leftover.write_bytes(b"partial")
    live.write_bytes(b"being written")
    assert stale_partial_files(target) == [leftover]
    with atomic_path(target) as tmp:
        assert tmp.name.startswith(f".liver.seg.nrrd.liversam-partial-{os.getpid()}-")
        assert tmp.name.endswith(".seg.nrrd")
        tmp.write_bytes(b"new")
    assert not leftover.exists() and live.exists() and target.read_bytes() == b"new"


def test_the_file_then_its_folder_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    import stat

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("folder" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "out" / "a.json"
    write_text_atomically(target, "{}")
    assert target.read_text() == "{}"
    # the data before the rename (else a power loss leaves an empty file), the rename after it (else it is undone)
    assert synced == ["file", "folder"]


def test_on_windows_the_leftover_check_never_calls_os_kill_which_would_end_the_writer(tmp_path, monkeypatch):
    """On Windows ``os.kill(pid, 0)`` is TerminateProcess with exit code 0: the check asks OpenProcess instead, and a
    process it cannot ask about keeps its file."""
    import liversam.atomic_write as atomic_write

    def no_kill(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig}) called on Windows")

    monkeypatch.setattr(atomic_write.os, "kill", no_kill)
    monkeypatch.setattr(atomic_write, "_ON_WINDOWS", True)
    alive = {4242: True, 4343: False}
    monkeypatch.setattr(atomic_write, "_windows_process_alive", lambda pid: alive[pid])
    target = tmp_path / "liver.seg.nrrd"
    kept = tmp_path / ".liver.seg.nrrd.liversam-partial-4242-a.seg.nrrd"
    stale = tmp_path / ".liver.seg.nrrd.liversam-partial-4343-b.seg.nrrd"
    for path in (kept, stale):
        path.write_bytes(b"partial")
    assert stale_partial_files(target) == [stale]

    def cannot_ask(pid):
        raise OSError("access denied")

    monkeypatch.setattr(atomic_write, "_windows_process_alive", cannot_ask)
    assert stale_partial_files(target) == []
