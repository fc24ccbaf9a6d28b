"""DICOM SEG of a session's masks, written by ``liversam.dicom_seg.write_dicom_seg`` (the same writer as
``liversam export``): the masks lie on the session's grid, which must be the grid of the referenced series."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..dicom_seg import write_dicom_seg
from ..errors import OutputError
from ..segmentation import Segment, SegmentationResult, default_color
from ..terminology import terminology_for
from .schemas import ExportSegment
from .sessions import Session


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


def dicom_seg_bytes(session: Session, segments: list[Segment], reference: str | Path | list[str],
                    series_uid: str | None, model_name: str, series_description: str) -> bytes:
    """Write the SEG to a temporary file and return its bytes (OutputError: what does not fit, nothing kept)."""
    result = SegmentationResult(geometry=session.volume.geometry, segments=segments,
                                provenance={"software": "LiverSAM"})
    with tempfile.TemporaryDirectory(prefix="liversam-seg-") as folder:
        path = Path(folder) / "liversam-seg.dcm"
        write_dicom_seg(result, reference, path, model_name=model_name, series_uid=series_uid or None,
                        series_description=series_description)
        return path.read_bytes()
