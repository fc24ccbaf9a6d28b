"""Checks on output paths before any work: the source is never overwritten and every output can be written.

:func:`check_outputs` refuses (with :class:`~liversam.errors.OutputError`) an output that

- is the same file as an input: the same path, a symlink to it, a hard link to it (same device and inode),
  or a path that resolves to it through symlinked folders;
- lies inside an input folder (a DICOM series folder) or is the same file as one of that folder's files;
- is an existing folder, or equals another output;
- cannot be created: its folder is a file, or a probe file cannot be created there (read-only, no permission);
- is an existing file this user may not write (write-protected, someone else's): the atomic write would replace
  it all the same (a rename needs only the folder's permission), so it is refused as a plain write would be. What
  the permission bits allow decides, as for any write: a user whose rights override them (root) replaces it;
- is an existing file (or link) of another user in a sticky folder (mode ``+t``, e.g. ``/tmp``) that is not this
  user's: the folder is writable, but the system lets only the file's (or the folder's) owner replace or delete an
  entry there, so the rename at the end would fail after all the work. Root (``CAP_FOWNER``) may replace it.

Commands call it first, so a refused run reads nothing heavy and writes nothing.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import OutputError
from .image_integrity import DICOM, sniff_image_format

# Inputs that are folders with more files than this are checked by path only (no per-file inode scan).
MAX_FOLDER_FILES_SCANNED = 20000


def _resolved(path: Path) -> Path:
    try:
        return path.expanduser().resolve(strict=False)
    except (OSError, RuntimeError):  # symlink loop
        return Path(os.path.abspath(path))


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file ``path`` points to (symlinks followed), None when it does not exist."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def _folder_identities(folder: Path) -> dict[tuple[int, int], Path]:
    found: dict[tuple[int, int], Path] = {}
    count = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            count += 1
            if count > MAX_FOLDER_FILES_SCANNED:
                return found
            ident = _identity(Path(root) / name)
            if ident is not None:
                found[ident] = Path(root) / name
    return found


def folder_write_problem(folder: str | Path) -> str | None:
    """Why files cannot be made in ``folder`` (created first where missing), or None when they can.

    A probe file is created (and removed) in the nearest folder that exists, so what decides is what the system
    allows (permission bits, ACLs, a read-only mount), not a reading of the mode bits. ``os.path`` tests, not
    ``Path``'s: those raise on a folder this user may not search (no 'x' permission)."""
    folder = Path(folder)
    existing = folder
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        return f"'{existing}' is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".liversam-write-test-", dir=existing)
    except OSError as exc:
        return f"cannot write into the folder '{existing}' ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(probe)
    return None


#: Linux capability number of CAP_FOWNER (linux/capability.h): act as the owner of any file, e.g. replace or delete
#: another user's file in a sticky folder.
CAP_FOWNER = 3


def _overrides_file_ownership() -> bool:
    """Whether this process may act as any file's owner: on Linux, CAP_FOWNER in its effective capabilities (root
    without it, as under ``setpriv --bounding-set=-fowner``, may not); elsewhere, whether it runs as root."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_FOWNER & 1)
    except (OSError, ValueError, IndexError):
        pass
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _user_name(uid: int) -> str:
    try:
        import pwd

        return f"user '{pwd.getpwuid(uid).pw_name}' (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def sticky_folder_problem(path: str | Path) -> str | None:
    """Why the existing entry ``path`` cannot be replaced (by a rename) or deleted although its folder is writable:
    the folder is sticky (``+t``, like ``/tmp``), and neither the entry nor the folder belongs to this user, who
    cannot override ownership. None when it can be (or ``path`` does not exist, or on Windows)."""
    if sys.platform == "win32" or not hasattr(os, "geteuid"):
        return None
    path = Path(path)
    try:
        entry, folder = os.lstat(path), os.stat(path.parent)  # the entry is what is replaced: a link's own owner
    except OSError:
        return None
    uid = os.geteuid()
    if not folder.st_mode & stat.S_ISVTX or uid in (entry.st_uid, folder.st_uid) or _overrides_file_ownership():
        return None
    return (
        f"exists and belongs to {_user_name(entry.st_uid)}, in the sticky folder '{path.parent}' (mode "
        f"{stat.filemode(folder.st_mode)}, like /tmp) that is not yours: there only a file's owner may replace or "
        "delete it, so the result could not be saved there"
    )


def _check_writable(option: str, path: Path) -> None:
    problem = folder_write_problem(path.parent)
    if problem is not None:
        what = "choose another output path" if "not a folder" in problem else "choose a folder you can write to"
        raise OutputError(f"{option} '{path}': {problem}; {what}.")
    if (problem := sticky_folder_problem(path)) is not None:
        raise OutputError(
            f"{option} '{path}' {problem}. Choose another output name, or have its owner delete it first."
        )
    if os.path.isfile(path) and not os.access(path, os.W_OK):
        try:
            st = os.stat(path)
        except OSError:
            st = None
        mode = f"mode {stat.filemode(st.st_mode)}" if st is not None else "no permission"
        ours = st is None or not hasattr(os, "geteuid") or st.st_uid == os.geteuid()
        fix = (f"Make it writable (chmod u+w '{path}'), delete it, or choose another output path." if ours else
               f"It belongs to {_user_name(st.st_uid)}: choose another output path, or have its owner delete it or "
               "make it writable.")  # fmt: skip
        raise OutputError(
            f"{option} '{path}' exists and is write-protected ({mode}); LiverSAM does not replace a file you "
            f"cannot write. {fix}"
        )


def check_outputs(outputs: Mapping[str, str | Path | None], inputs: Iterable[str | Path | None]) -> None:
    """Refuse outputs that would overwrite an input or cannot be written (see the module docstring).

    ``outputs`` maps the option name (e.g. ``--output``) to its path (None: not given); ``inputs`` are the
    files and folders the command reads.
    """
    input_paths = [Path(p) for p in inputs if p not in (None, "")]
    input_files = [(p, _resolved(p), _identity(p)) for p in input_paths if not os.path.isdir(p)]
    input_dirs = [(p, _resolved(p)) for p in input_paths if os.path.isdir(p)]
    seen: dict[Path, str] = {}
    dir_identities: dict[Path, dict[tuple[int, int], Path]] = {}
    for option, value in outputs.items():
        if value in (None, ""):
            continue
        path = Path(value)
        resolved = _resolved(path)
        if resolved in seen:
            raise OutputError(f"{option} '{path}' is the same file as {seen[resolved]}; give each output its own path.")
        seen[resolved] = f"{option} '{path}'"
        if os.path.isdir(path):  # not Path.is_dir: it raises in a folder this user may not search
            raise OutputError(f"{option} '{path}' is a folder; give a file name (e.g. '{path / 'result.seg.nrrd'}').")
        ident = _identity(path)
        for source, source_resolved, source_ident in input_files:
            if resolved == source_resolved or (ident is not None and ident == source_ident):
                raise OutputError(
                    f"{option} '{path}' is the input file '{source}' (same file"
                    + (" through a link" if Path(os.path.abspath(path)) != Path(os.path.abspath(source)) else "")
                    + "). LiverSAM never overwrites its input; choose another output path."
                )
        for folder, folder_resolved in input_dirs:
            if _is_within(resolved, folder_resolved):
                raise OutputError(
                    f"{option} '{path}' lies inside the input folder '{folder}'. LiverSAM never writes into a "
                    "DICOM input folder (a new file there would join the series); write the output elsewhere."
                )
            if ident is not None:
                identities = dir_identities.setdefault(folder_resolved, _folder_identities(folder_resolved))
                if ident in identities:
                    raise OutputError(
                        f"{option} '{path}' is a link to '{identities[ident]}' in the input folder '{folder}'. "
                        "LiverSAM never overwrites its input; choose another output path."
                    )
        _check_writable(option, path)


def model_input_path(model: str | None) -> Path | None:
    """The checkpoint file a ``--model`` value names (``PATH`` or ``NAME=PATH``), when it is a file."""
    if not model:
        return None
    text = str(model).split("=", 1)[1] if "=" in str(model) else str(model)
    path = Path(text).expanduser()
    return path if path.is_file() else None


def dicom_folder_of_file(path: str | Path | None) -> Path | None:
    """The folder of ``path`` when it is one DICOM file (a slice of a series, or a DICOMDIR), else None.

    A CT given as one DICOM file stands for its folder's series: no output may go into that folder.
    """
    if not path:
        return None
    path = Path(path)
    return path.parent if path.is_file() and sniff_image_format(path) == DICOM else None
