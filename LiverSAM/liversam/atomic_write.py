"""Atomic file output: write to a temporary file beside the target, then rename over it.

A crash or an error part-way leaves either the old file or nothing, never a truncated output. The
temporary file is named ``.<target name>.liversam-partial-<pid>-<random><suffixes>`` (hidden, and saying
what it is). An error removes it; only a process killed outright (``kill -9``, power loss) can leave one
behind, and the next write of the same target deletes such leftovers whose process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

PARTIAL_MARKER = ".liversam-partial-"
_ON_WINDOWS = os.name == "nt"


def _temporary_sibling(target: Path) -> Path:
    # Keep the full suffix chain (.seg.nrrd, .nii.gz) so writers that pick a format by name still work.
    suffix = "".join(target.suffixes) or ".tmp"
    prefix = f".{target.name}{PARTIAL_MARKER}{os.getpid()}-"
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(name)


def _windows_process_alive(pid: int) -> bool:
    """Windows: whether ``pid`` is a running process, asked with ``OpenProcess`` / ``GetExitCodeProcess``; True when
    that cannot be told (access denied, an API failure): the file is then left alone."""
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    process_query_limited_information, still_active, error_invalid_parameter = 0x1000, 259, 87
    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        return ctypes.get_last_error() != error_invalid_parameter  # no such process: ERROR_INVALID_PARAMETER
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def _process_alive(pid: int) -> bool:
    if _ON_WINDOWS:
        # never os.kill(pid, 0) there: on Windows it is TerminateProcess with exit code 0, not a probe
        try:
            return _windows_process_alive(pid)
        except (OSError, AttributeError, ValueError, OverflowError):
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or an odd number): leave its file alone
    return True


def stale_partial_files(target: str | Path) -> list[Path]:
    """Temporary files of earlier writes of ``target`` whose writing process no longer exists."""
    target = Path(target)
    stale = []
    for path in target.parent.glob(f".{glob.escape(target.name)}{PARTIAL_MARKER}*"):
        pid_text = path.name[len(target.name) + 1 + len(PARTIAL_MARKER) :].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            stale.append(path)
    return stale


def remove_stale_partial_files(target: str | Path) -> int:
    """Delete what :func:`stale_partial_files` finds; returns how many were removed."""
    removed = 0
    for path in stale_partial_files(target):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed


def _default_mode(target: Path) -> int:
    """The existing target's permissions, else what a plain ``open(..., "w")`` would give (0o666 & ~umask)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0o022)
        os.umask(mask)
        return 0o666 & ~mask


def _flush_to_disk(path: Path) -> None:
    """fsync a file or folder: the finished temporary file before the rename (a power loss after it cannot leave
    the file empty), its folder after it (a power loss cannot undo the rename). A folder cannot be opened this way
    on Windows: then nothing happens."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to ``target``.

    On any exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partial_files(target)
    tmp = _temporary_sibling(target)
    try:
        yield tmp
        _flush_to_disk(tmp)
        with contextlib.suppress(OSError):
            os.chmod(tmp, _default_mode(target))  # mkstemp makes 0o600 files
        os.replace(tmp, target)
        _flush_to_disk(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def describe_write_error(target: str | Path, exc: OSError) -> str:
    """A message for an OS error while writing ``target``: the file, the cause, and what to do about it."""
    import errno

    target = Path(target)
    cause = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = f"free some disk space in '{target.parent}' or write the output to another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"choose a folder you can write to (not '{target.parent}')"
    elif exc.errno == errno.ENAMETOOLONG:
        hint = "choose a shorter file name"
    else:
        hint = "check the disk and the folder, or choose another output path"
    return f"Cannot write '{target}': {cause}; {hint}. Nothing was written at '{target}'."


def write_atomically(target: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result to ``target`` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_text_atomically(target: str | Path, text: str) -> Path:
    return write_atomically(target, lambda p: p.write_text(text, encoding="utf-8"))
