"""DICOM SEG of a session's masks, written by ``liversam.dicom_seg.write_dicom_seg`` (the same writer as
``liversam export``): the masks lie on the session's grid, which must be the grid of the referenced series."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ..dicom_seg import write_dicom_seg
from ..errors import OutputError
from ..segmentation import Segment, SegmentationResult, default_color
from ..terminology import terminology_for
from .public import ServerStorageError, input_file_error
from .schemas import ExportSegment
from .sessions import Session

log = logging.getLogger(__name__)
SEG_NAME = "liversam-seg.dcm"  # the temporary file's name, and the download's


def session_reference(session: Session) -> tuple[list[str], str] | None:
    """(files, series UID) of the DICOM series a session was read from (open-path on a folder), else None."""
    metadata = getattr(session.volume, "metadata", None) or {}
    files = metadata.get("dicom_files")
    if not files or metadata.get("dicom_resampled"):
        return None  # a resampled series has no slices on the session's grid
    return [str(f) for f in files], str(metadata.get("dicom_series_uid") or "")


def session_segments(session: Session, segments: list[ExportSegment]) -> list[Segment]:
    """The named session masks as segments (empty ones left out); OutputError when none has a voxel."""
    out, seen = [], set()
    for n, spec in enumerate(segments):
        if spec.mask not in session.masks:
            raise OutputError(f"mask '{spec.mask}' is not in the session (masks: "
                              f"{', '.join(sorted(session.masks)) or 'none'}); upload it before the export")
        if spec.name in seen:
            raise OutputError(f"segment name '{spec.name}' is given twice; each segment needs its own name")
        seen.add(spec.name)
        mask = session.masks[spec.mask]
        if not mask.any():
            continue
        terminology = terminology_for(spec.name)
        label = spec.label or terminology.default_label or n + 1
        color = terminology.color if terminology.default_label else default_color(spec.name, n)
        out.append(Segment(spec.name, int(label), mask, color))
    if not out:
        raise OutputError("every segment to export is empty: segment the CT first (nothing was written)")
    return out


#: what to do when the DICOM series a session was read from cannot be read any more
OWN_SERIES_ADVICE = ("It was deleted, moved or made unreadable after the session was opened: put it back as it was, or "
                     "give reference_dicom (the CT's DICOM folder on the server); then export again. Nothing was written.")


def dicom_seg_bytes(session: Session, segments: list[Segment], reference: str | Path | list[str],
                    series_uid: str | None, model_name: str, series_description: str,
                    what: str = "the DICOM series this session was read from", advice: str = OWN_SERIES_ADVICE) -> bytes:
    """Write the SEG to a temporary file and return its bytes (OutputError: what does not fit, nothing kept).

    The temporary file is the server's business: a message names it as the download does (``liversam-seg.dcm``),
    and a temporary folder that cannot be written is a :class:`ServerStorageError` (503) naming no folder (the
    server's log has the full message). A referenced DICOM file that cannot be read (deleted, replaced or made
    unreadable since it was listed) is the client's input ``what`` (as the client named it): a 422 saying so, with
    ``advice`` (:func:`.public.input_file_error`)."""
    result = SegmentationResult(geometry=session.volume.geometry, segments=segments,
                                provenance={"software": "LiverSAM"})
    try:
        temporary = tempfile.TemporaryDirectory(prefix="liversam-seg-", ignore_cleanup_errors=True)
    except OSError as exc:
        raise _storage_error(tempfile.gettempdir(), exc) from exc
    with temporary as folder:
        path = Path(folder) / SEG_NAME
        try:
            write_dicom_seg(result, reference, path, model_name=model_name, series_uid=series_uid or None,
                            series_description=series_description)
        except OutputError as exc:
            if isinstance(exc.__cause__, OSError) and str(path) in str(exc):  # writing the SEG's own file failed
                raise _storage_error(folder, exc.__cause__) from exc
            if str(path) not in str(exc):
                raise
            raise OutputError(str(exc).replace(str(path), SEG_NAME)) from exc  # what does not fit, by the SEG's name
        except OSError as exc:
            if _is_in(exc, folder):  # the SEG's own file
                raise _storage_error(folder, exc) from exc
            raise input_file_error(exc, what, advice) from exc  # reading a referenced DICOM file
        try:
            return path.read_bytes()
        except OSError as exc:
            raise _storage_error(folder, exc) from exc


def _is_in(exc: OSError, folder: str) -> bool:
    """Whether ``exc`` is about a file in ``folder`` (or names no file: not one the client gave)."""
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return not names or any(n == folder or n.startswith(folder.rstrip("/\\") + os.sep) for n in names)


def _storage_error(folder: str, cause: OSError) -> ServerStorageError:
    log.error("DICOM SEG export: the temporary folder %s cannot be written: %s", folder, cause)
    return ServerStorageError(
        f"The server cannot write the DICOM SEG to its temporary folder ({cause.strerror or type(cause).__name__}). "
        "This is a problem of the server's machine, not of the request: its administrator can free disk space in "
        "its temporary folder or make it writable (the server's log names the folder and the error); then export "
        "again. Nothing was written."
    )
