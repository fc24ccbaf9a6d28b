"""What the page's upload fields send, made ready to open: a .zip of a DICOM series unpacked, one lone DICOM slice
told apart from a CT.

A browser sends only the files the reader chose, never their folder: one ``.dcm`` file chosen from a series
arrived alone, and the page said "a single 2D image, not a CT volume". A series is uploaded as all its files (the
file field takes several), as its folder (the folder field), or as a .zip of the folder (unpacked here).
"""

from __future__ import annotations

import errno
import shutil
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

import pydicom

from .mrml_scene import MAX_FOLDER_FILES, NOT_IMAGE_MODALITIES, InputError

MAX_ZIP_BYTES = 8 * 1024**3  # what a .zip may unpack to (a 1,000-slice 512 x 512 CT series is about 0.5 GiB)
# free space left on the unpacking folder's disk after a .zip is unpacked (the app's exports, other readers' uploads)
UNPACK_FREE_MARGIN = 512 * 1024**2
_COPY_CHUNK = 1024**2
HOW_TO_UPLOAD_A_SERIES = ("select all its files at once in the first upload field, choose its folder in "
                          "'Upload a DICOM folder', or upload a .zip of the folder")


def upload_subject(count: int, field: str, folder: str = "") -> str:
    """How a message names an upload: "The uploaded folder 'cd'" (the folder field), "The 3 files chosen"."""
    if field == "folder" and folder:
        return f"The uploaded folder '{folder}'"
    return "The file chosen" if count == 1 else f"The {count:,} files chosen"


def too_many_files_message(subject: str, count: int, nothing: str = "Nothing was uploaded.") -> str:
    """More files uploaded than a folder typed as the path may hold (``MAX_FOLDER_FILES``)."""
    return (f"{subject}: {count:,} files, more than the {MAX_FOLDER_FILES:,} an upload may hold. {nothing} "
            f"Upload the folder of one DICOM series (or a .zip of it), or type the folder's path if it is on the app's "
            "machine.")


def write_uploads(files: list[dict], into: str | Path, relative_paths: list[str] | None = None,
                  subject: str = "The files uploaded") -> list[str]:
    """The page's uploaded ``files`` (trame's file dicts: name, content) written under ``into``, each at its path in
    the folder the reader chose (``relative_paths``, the browser's webkitRelativePath: "cd/DICOM/S2/IM0001") or, with
    none, by its name. A CD-ROM export holds files of one name (IM0001) in each series' folder: written by name, each
    overwrote the one before and two series became one broken one. A path that would leave ``into`` (a ".." or a
    drive letter in it) is written by its name; a name already written gets " (2)".

    InputError (``subject`` names the upload), before anything is written, for more than ``MAX_FOLDER_FILES`` files
    (as a folder typed) or more bytes than the free space of ``into``'s disk less ``UNPACK_FREE_MARGIN`` (as a .zip
    unpacked: a large upload filled the disk); and when writing fails (a full disk): ``into`` is removed then."""
    from trame.app.file_upload import ClientFile

    into = Path(into)
    if len(files) > MAX_FOLDER_FILES:
        shutil.rmtree(into, ignore_errors=True)
        raise InputError(too_many_files_message(subject, len(files), "Nothing was written."))
    try:
        total = sum(_content_size(file) for file in files)
        _check_free_space(into, total, f"{subject}: {_size(total)} to write", "Nothing was written.")
    except InputError:
        shutil.rmtree(into, ignore_errors=True)
        raise
    written: list[str] = []
    try:
        for index, file in enumerate(files):
            client = ClientFile(file)  # (one at a time: a file sent in chunks is joined into one copy here)
            given = relative_paths[index] if relative_paths and index < len(relative_paths) else ""
            parts = safe_parts(str(given or ""))
            if parts is None:  # no path, or one that would leave ``into``: the file's name alone
                parts = safe_parts(str(client.name or "").replace("\\", "/").rsplit("/", 1)[-1]) or ("upload",)
            target = inside(into, parts)
            copy = 1
            while target.exists():
                copy += 1
                stem, dot, suffixes = parts[-1].partition(".")
                target = target.with_name(f"{stem} ({copy}){dot}{suffixes}")  # "ct (2).nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.content or b"")
            written.append(target.as_posix())
    except InputError:  # a path leading out through a link: nothing is kept
        shutil.rmtree(into, ignore_errors=True)
        raise
    except (OSError, ValueError) as exc:  # a full disk (space taken meanwhile), a file and a folder of one name: nothing is kept
        shutil.rmtree(into, ignore_errors=True)
        what = exc.strerror or str(exc)
        if getattr(exc, "filename", None):
            what += f": {Path(exc.filename).name}"
        raise InputError(f"{subject} could not be written on the app's machine ({what}); nothing of it was kept. "
                         f"{_write_advice(exc)}") from None
    return written


def _write_advice(exc: Exception) -> str:
    """What to do after an upload's files could not be written, by the error's errno (it said "free some space" to a
    name too long, or a file and a folder of one name)."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ("Free some space there (or start the app with TMPDIR on a larger disk), or upload a smaller "
                "series.")
    if code == errno.ENAMETOOLONG:
        return "A file or folder name in it is too long for the app's disk: shorten it and upload it again."
    if code in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        return ("It holds a file and a folder of one name: rename one of them (or upload the series' folder alone) "
                "and upload it again.")
    return "Upload it again; if it fails again, report this error with the app's log."


def safe_parts(path: str) -> tuple[str, ...] | None:
    """The parts of an uploaded relative ``path`` ("cd/S1/IM0001", a zip member's name; a backslash is taken for
    '/'), or None for one that could leave the folder it is written in: empty, absolute as a POSIX or a Windows path
    ("/x", "//x", "\\\\x", "C:x"), with an empty, '.' or '..' part ("a//b", "./a", "../a"), or holding ':' (a drive,
    an NTFS stream) or NUL anywhere. PurePosixPath("//x") keeps "//" as one part, so checking its parts for "/" let
    "//x" (and "\\\\x") through: into.joinpath("//", "x") is "//x", a file anywhere on the app's machine."""
    text = str(path)
    if not text or "\0" in text or ":" in text:
        return None
    posix = text.replace("\\", "/")
    if PurePosixPath(posix).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        return None
    parts = tuple(posix.split("/"))
    if any(part in ("", ".", "..") for part in parts):
        return None
    return parts


def inside(into: Path, parts: tuple[str, ...]) -> Path:
    """``into`` joined with ``parts`` (from ``safe_parts``), checked to resolve inside ``into`` (a symbolic link in
    the way would lead out): InputError otherwise, before anything is written there."""
    target = into.joinpath(*parts)
    root = into.resolve()
    if not target.resolve().is_relative_to(root) or target.resolve() == root:
        raise InputError(f"The upload holds a file whose path leads outside its folder ('{'/'.join(parts)}'); it was "
                         "not written. Upload the series' folder (or a .zip of it) again.")
    return target


def _content_size(file: dict) -> int:
    """The bytes of an uploaded file (trame's dict: its content whole or in chunks), without joining its chunks."""
    content = file.get("content") or b""
    return sum(len(chunk) for chunk in content) if isinstance(content, list) else len(content)


def is_zip(path: str | Path) -> bool:
    """A file named .zip, or one whose content is a zip archive."""
    return str(path).lower().endswith(".zip") or zipfile.is_zipfile(path)


def unpack_zip(archive: str | Path, into: str | Path, name: str) -> list[str]:
    """The files of the zip ``archive`` (the upload called ``name``) unpacked under ``into``, sorted; hidden files and
    macOS' ``__MACOSX`` folder left out. InputError when it is no readable zip, holds no file, a path that leaves
    its folder, more than ``MAX_FOLDER_FILES`` files or more than ``MAX_ZIP_BYTES``, when the sizes its members
    declare do not fit in the free space of ``into``'s disk (checked before anything is written), or when a member
    holds more than it declares (nothing past the declared size is written); nothing of it is left then."""
    into = Path(into)
    try:
        with zipfile.ZipFile(archive) as zipped:
            # (a member ending in '\\' is a folder entry a Windows zipper wrote; a name given twice is unpacked once,
            # its last copy, as unzip does: it was listed twice)
            members = list({m.filename.replace("\\", "/"): m for m in zipped.infolist()
                            if not m.is_dir() and not m.filename.endswith("\\") and _kept(m.filename)}.values())
            if not members:
                raise InputError(f"The uploaded archive '{name}' holds no file: zip the folder of a DICOM series (or "
                                 "a CT file) and upload that.")
            if len(members) > MAX_FOLDER_FILES:
                raise InputError(f"The uploaded archive '{name}' holds {len(members)} files, more than "
                                 f"{MAX_FOLDER_FILES}: zip the folder of one DICOM series.")
            total = sum(m.file_size for m in members)
            if total > MAX_ZIP_BYTES:
                raise InputError(f"The uploaded archive '{name}' unpacks to {total / 1024**3:.1f} GiB, more than "
                                 f"{MAX_ZIP_BYTES / 1024**3:.0f} GiB: zip the folder of one DICOM series.")
            _check_free_space(into, total, f"The uploaded archive '{name}' unpacks to {_size(total)}",
                              "Nothing was unpacked.")
            targets = []
            for member in members:  # every path checked before any file is written
                parts = safe_parts(member.filename)
                if parts is None:
                    raise InputError(f"The uploaded archive '{name}' holds a file outside its folder "
                                     f"({member.filename!r}); it was not unpacked. Zip the series' folder again.")
                targets.append((member, inside(into, parts)))
            written = []
            for member, target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(member) as source, target.open("wb") as sink:
                    _copy_declared(source, sink, member, name)
                written.append(str(target))
    except InputError:
        shutil.rmtree(into, ignore_errors=True)  # a file larger than its header says: what was unpacked goes
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        shutil.rmtree(into, ignore_errors=True)
        raise InputError(f"The uploaded archive '{name}' could not be unpacked ({exc}): it is damaged or not a zip "
                         "archive. Zip the folder of the DICOM series again.") from None
    except (RuntimeError, NotImplementedError) as exc:  # encrypted, or a compression zipfile does not know
        shutil.rmtree(into, ignore_errors=True)
        raise InputError(f"The uploaded archive '{name}' could not be unpacked ({exc}). Zip the folder again without "
                         "a password, with ordinary (deflate) compression.") from None
    except OSError as exc:  # a file and a folder of one name in it, a full disk: nothing of it is kept
        shutil.rmtree(into, ignore_errors=True)
        what = exc.strerror or str(exc)
        if getattr(exc, "filename", None):
            what += f": {Path(exc.filename).name}"
        raise InputError(f"The uploaded archive '{name}' could not be unpacked on the app's machine ({what}). Zip the "
                         "series' folder again (one file per name), or upload its files or its folder instead.") from None
    return sorted(written)


def _check_free_space(into: Path, total: int, what: str, nothing: str) -> None:
    """InputError, before anything is written, when the disk of ``into`` (or of its nearest existing parent) has
    less free space than the ``total`` bytes to write plus ``UNPACK_FREE_MARGIN``: writing them would fill the disk
    and fail half-way. ``what``: "The uploaded archive 'x.zip' unpacks to 3 MiB"; ``nothing``: "Nothing was
    unpacked."."""
    where = into
    while not where.exists() and where.parent != where:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # the disk's free space unknown: a full disk is still caught while unpacking (the OSError below)
    needed = total + UNPACK_FREE_MARGIN
    if free < needed:
        raise InputError(
            f"{what}, but the app's machine has only {_size(free)} free in '{where}' (it needs "
            f"{_size(needed)}: the files and {_size(UNPACK_FREE_MARGIN)} kept free). {nothing} Free some space there "
            "(or start the app with TMPDIR on a larger disk), or upload a smaller series.")


def _size(n_bytes: int) -> str:
    if n_bytes < 1024**2:
        return f"{n_bytes / 1024:.0f} KiB"
    return f"{n_bytes / 1024**3:.1f} GiB" if n_bytes >= 1024**3 else f"{n_bytes / 1024**2:.0f} MiB"


def _copy_declared(source: IO[bytes], sink: IO[bytes], member: zipfile.ZipInfo, name: str) -> None:
    """Copy ``member``'s unpacked bytes, never more than the size its header declares (what the free space and
    ``MAX_ZIP_BYTES`` were checked against): InputError when it holds more (a forged header, a zip bomb)."""
    left = member.file_size
    while True:
        chunk = source.read(min(_COPY_CHUNK, left + 1))  # one byte past the declared size tells a lying header
        if not chunk:
            return
        if len(chunk) > left:
            raise InputError(f"The uploaded archive '{name}' holds a file larger than its header declares "
                             f"('{member.filename}': more than {member.file_size} bytes); it was not unpacked. "
                             "The archive is damaged or forged: zip the series' folder again.")
        sink.write(chunk)
        left -= len(chunk)


def _kept(filename: str) -> bool:
    parts = PurePosixPath(filename.replace("\\", "/")).parts
    return bool(parts) and parts[0] != "__MACOSX" and not any(part.startswith(".") and part not in (".", "..")
                                                             for part in parts)


def lone_dicom_slice(path: str | Path) -> bool:
    """True for a DICOM file that holds one image of a series (one frame of an image modality): alone, no CT volume.
    A multi-frame file (an enhanced CT: the whole volume in one file) and a file that is no DICOM image are not."""
    from liversam.dicom_files import DamagedDicomFileError, read_dicom_file

    path = Path(path)
    try:  # with or without the "DICM" preamble, as the core reads it
        header = read_dicom_file(path, stop_before_pixels=True) if path.is_file() else None
    except (OSError, DamagedDicomFileError):  # opening it says what is wrong with a damaged file
        return False
    if header is None:
        return False
    modality = str(header.get("Modality", "") or "").upper()
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return modality not in NOT_IMAGE_MODALITIES and frames <= 1


def lone_slice_message(name: str, folder: str = "") -> str:
    """What to do when the upload was one slice of a DICOM series; ``folder``: the folder it came in, when the reader
    chose a folder (the folder field) that holds that one slice only."""
    if folder:
        return (f"The uploaded folder '{folder}' holds one file, '{name}', one slice of a DICOM series. Choose the "
                f"folder that holds all the series' files, or upload the whole series another way: "
                f"{HOW_TO_UPLOAD_A_SERIES}.")
    return (f"The uploaded file '{name}' is one slice of a DICOM series (a browser sends only the files chosen, not "
            f"their folder). Upload the whole series: {HOW_TO_UPLOAD_A_SERIES}.")


# CT image files LiverSAM opens one at a time (several chosen together are no DICOM series)
CT_FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
HOW_TO_OPEN_A_CT = (f"upload a DICOM series ({HOW_TO_UPLOAD_A_SERIES.replace(' or upload', ' or')}), or one CT "
                    "file (.nii.gz, .nrrd, .mha) alone")


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM object, as trame-slicer's series reader tells one (what it reads): a data set with a SOP Class UID,
    with or without the "DICM" preamble (the files of a CD-ROM export often have neither preamble nor extension).
    A DICOMDIR (the CD's index) is not one: it holds no object of a series. A DICOM file cut short before its SOP
    Class UID is one too (the core tells it: ``liversam.dicom_files``): the series' listing names it as damaged,
    where it was left out as "not DICOM" and its series opened a slice short."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - force=True on a file that is no DICOM raises many kinds
        header = None
    return header is not None and header.get("SOPClassUID") is not None or _damaged_dicom_file(path)


def _damaged_dicom_file(path: str | Path) -> bool:
    from liversam.dicom_files import DamagedDicomFileError, read_dicom_file

    try:
        read_dicom_file(path, stop_before_pixels=True)
    except DamagedDicomFileError:
        return True
    except OSError:
        return False
    return False


def split_dicom_files(paths: list[str]) -> tuple[list[str], list[str]]:
    """``paths`` -> (the DICOM files, the others), each in the order given."""
    dicom, others = [], []
    for path in paths:
        (dicom if is_dicom_file(path) else others).append(path)
    return dicom, others


def named(paths: list[str], at_most: int = 5) -> str:
    """'a.png', 'b.txt' and 3 more: the files' names, the first ``at_most`` of them."""
    names = [f"'{Path(p).name}'" for p in paths[:at_most]]
    more = f" and {len(paths) - at_most} more" if len(paths) > at_most else ""
    return ", ".join(names) + more


def single_image_header(paths: list[str]) -> str | None:
    """A MetaImage or detached NRRD header chosen with its data file(s) (ct.mhd and ct.raw): the header, which reads
    them; None otherwise."""
    headers = [p for p in paths if p.lower().endswith((".mhd", ".nhdr"))]
    if len(headers) != 1:
        return None
    return headers[0] if not any(p.lower().endswith(CT_FILE_SUFFIXES) for p in paths if p != headers[0]) else None


def no_dicom_message(what: str, paths: list[str]) -> str:
    """Several files (``what``: "The 3 files chosen", "The uploaded folder 'x'", ...) of which none is a DICOM file:
    what they are and what to do. CT image files chosen together are told to be opened one at a time."""
    from liversam.image_integrity import sniff_image_format

    if all(p.lower().endswith(CT_FILE_SUFFIXES) or sniff_image_format(p) is not None for p in paths):
        return (f"{what} ({named(paths)}) are CT image files, not the files of one DICOM series: LiverSAM opens one "
                "CT at a time. Upload one of them alone.")
    return f"{what} ({named(paths)}) are not DICOM files. To open a CT, {HOW_TO_OPEN_A_CT}."


def left_out_note(others: list[str]) -> str:
    """The files of an upload that are not DICOM, left out of the series opened: named on the status line, but for
    a CD-ROM's DICOMDIR (its index of the series: no image) and hidden files (.DS_Store)."""
    others = [p for p in others if Path(p).name.upper() != "DICOMDIR" and not Path(p).name.startswith(".")]
    if not others:
        return ""
    count = "1 file that is" if len(others) == 1 else f"{len(others)} files that are"
    return f"{count} not DICOM ({named(others)}) left out. "
