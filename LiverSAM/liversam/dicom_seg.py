"""DICOM SEG output (highdicom) and input (pydicom) for LiverSAM segmentations.

Writing: one segment per :class:`Segment`, coded with SNOMED CT (liver SCT 10200004; tumour: category
Morphologically Altered Structure SCT 49755003, type Neoplasm SCT 108369006, anatomic region liver), the
algorithm identification (LiverSAM, its version, the model as a parameter) and references to every
instance of the source CT series. The masks must lie on the source series' own grid: frame ``k`` of the
SEG is slice ``k`` of the sorted series (``dicom_series.sort_series``). A geometry mismatch raises
:class:`OutputError` and writes nothing.

Reading: BINARY, FRACTIONAL (thresholded at 50 %) and LABELMAP segmentations, classic per-frame
functional groups. Frames are pasted onto a reference grid when one is given and the frames lie on it
(same orientation and pixel spacing, integer offsets), otherwise the SEG's own regular grid is built from
its frame positions and resampled (nearest neighbour) onto the reference.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .atomic_write import atomic_path, describe_write_error
from .axial_orientation import axial_reorientation
from .dicom_files import DamagedDicomFileError, dicom_kind, read_dicom_file, with_transfer_syntax
from .dicom_series import (
    DicomSeriesInfo,
    SortedSeries,
    list_dicom_series,
    list_dicom_series_files,
    select_dicom_series,
    sort_series,
)
from .errors import InputImageError, OutputError
from .geometry import ImageGeometry
from .segmentation import Segment, SegmentationResult, default_color
from .terminology import Code, Terminology, terminology_for, terminology_from_codes

logger = logging.getLogger(__name__)

SEGMENTATION_STORAGE_UID = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEGMENTATION_STORAGE_UID = "1.2.840.10008.5.1.4.1.1.66.7"
ALGORITHM_NAME = "LiverSAM"
GEOMETRY_TOLERANCE_MM = 1e-2


# --- writing ----------------------------------------------------------------------------------------


def _long_string(text: str, limit: int = 64) -> str:
    """A DICOM LO value: no backslash (the value separator: "a\\b" would become two values), no control
    characters, at most ``limit`` characters."""
    text = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in str(text)).replace("\\", "/")
    return text.strip()[:limit]


def _coded(code: Code):
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _segment_description(
    number: int, segment: Segment, terminology: Terminology, model_name: str, algorithm_type: str
):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    parameters = {"model": model_name} if model_name else None
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        parameters=parameters,
    )
    rgb = [min(255.0, max(0.0, 255.0 * float(c))) for c in segment.color]
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_long_string(segment.name),
        segmented_property_category=_coded(terminology.category),
        segmented_property_type=_coded(terminology.type),
        algorithm_type=algorithm_type,
        algorithm_identification=algorithm,
        tracking_id=_long_string(segment.name),
        tracking_uid=hd.UID(),
        anatomic_regions=[_coded(terminology.anatomic_region)] if terminology.anatomic_region else None,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )


def series_grid_match(result_geometry: ImageGeometry, series_geometry: ImageGeometry) -> str | None:
    """How a segmentation's grid lies on a series' grid: ``"same"``; ``"axial"`` when the series is stored in sagittal
    or coronal slices and the segmentation lies on its axial grid (``liversam.axial_orientation``: how ``liversam
    segment``, the Slicer module and the web app segment such a series); else None. Geometry only: no mask is
    touched."""
    if series_geometry.is_close(result_geometry, GEOMETRY_TOLERANCE_MM):
        return "same"
    reorientation = axial_reorientation(series_geometry)
    if reorientation is not None and reorientation.axial_geometry.is_close(result_geometry, GEOMETRY_TOLERANCE_MM):
        return "axial"
    return None


def on_series_grid(result: SegmentationResult, series_geometry: ImageGeometry) -> SegmentationResult | None:
    """``result`` on a series' grid (:func:`series_grid_match`): itself when it lies on it; on the axial grid of a
    series stored in sagittal or coronal slices, its masks put back on the series' voxels (no interpolation; each
    mask must have the axial grid's shape, else OutputError); else None."""
    match = series_grid_match(result.geometry, series_geometry)
    if match != "axial":
        return result if match == "same" else None
    reorientation = axial_reorientation(series_geometry)
    assert reorientation is not None  # series_grid_match found it
    for segment in result.segments:
        if segment.mask_kji.shape != reorientation.axial_geometry.shape_kji:
            raise OutputError(
                f"Segment '{segment.name}' has mask shape {segment.mask_kji.shape}, expected "
                f"{reorientation.axial_geometry.shape_kji} [k, j, i] (the axial grid of the {reorientation.input_plane} "
                "series)."
            )
    on_axial = SegmentationResult(geometry=reorientation.axial_geometry, segments=result.segments,
                                  provenance=result.provenance)
    return reorientation.result_to_input(on_axial)


def _reference_series_for(
    result: SegmentationResult, all_series: list[DicomSeriesInfo], where: Path, series_uid: str | None
) -> tuple[DicomSeriesInfo, SortedSeries]:
    """The series the segmentation lies on: the named one, else one whose grid matches, else the default."""
    try:
        uid = series_uid or result.provenance.get("dicom_series_uid") or None
        if uid and any(s.series_uid == uid for s in all_series):
            info = select_dicom_series(where, series_uid=uid, allow_non_ct=True, series=all_series)
            return info, sort_series(info, where)
        if series_uid:  # named explicitly but absent: the selection error lists the series found
            select_dicom_series(where, series_uid=series_uid, allow_non_ct=True, series=all_series)
        image_series = [s for s in all_series if s.is_image]
        if not image_series:
            raise OutputError(
                f"No DICOM image series in '{where}' to reference. The reference must be the DICOM series of the CT "
                "the segmentation was made on."
            )
        same, axial = [], []  # series on the segmentation's grid; series whose axial grid it is (sagittal, coronal)
        for info in image_series:
            try:
                sorted_series = sort_series(info, where)
            except InputImageError:
                continue
            match = series_grid_match(result.geometry, sorted_series.geometry) if sorted_series.regular else None
            if match is not None:
                (same if match == "same" else axial).append((info, sorted_series))
        candidates = same or axial  # a series stored on the segmentation's own grid comes first
        if candidates:
            if len(candidates) > 1:
                logger.warning(
                    "%d series in '%s' %s; referencing %s",
                    len(candidates),
                    where,
                    "share the segmentation's grid" if same else "have the segmentation's grid as their axial grid",
                    candidates[0][0].describe(),
                )
            return candidates[0]
        default = image_series[0]
        return default, sort_series(default, where)
    except InputImageError as exc:
        raise OutputError(f"Cannot use '{where}' as the DICOM SEG reference: {exc}") from exc


def _check_referenceable(sorted_series: SortedSeries, folder: Path) -> None:
    missing: dict[str, int] = {}
    for ds in sorted_series.headers:
        for keyword in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if not str(ds.get(keyword, "") or ""):
                missing[keyword] = missing.get(keyword, 0) + 1
    if missing:
        raise OutputError(
            f"The DICOM series in '{folder}' lacks the UIDs a DICOM SEG must reference ("
            + ", ".join(f"{keyword} empty in {count} file(s)" for keyword, count in missing.items())
            + "); it was probably anonymised with UIDs blanked. Export to .seg.nrrd or .nii.gz instead, or use "
            "the original series."
        )


def _clean_source(ds):
    """Drop attributes some scanners write empty but highdicom rejects (empty SpecificCharacterSet)."""
    if "SpecificCharacterSet" in ds and not str(ds.SpecificCharacterSet or "").strip():
        del ds.SpecificCharacterSet
    return ds


def check_dicom_seg_reference(
    geometry: ImageGeometry,
    reference_dicom: str | Path | Sequence[str | Path],
    path: str | Path,
    series_uid: str | None = None,
) -> None:
    """Raise :class:`OutputError`, as :func:`write_dicom_seg` would, when a segmentation on ``geometry`` cannot be
    written as a DICOM SEG referencing ``reference_dicom``: no such series, its grid is not ``geometry``, or its files
    lack the UIDs a SEG must reference (an anonymised copy). Headers only: a command checks it before the model runs,
    so that minutes of propagation are not thrown away at the end."""
    _reference_for(SegmentationResult(geometry=geometry, segments=[]), reference_dicom, Path(path), series_uid)


def _reference_for(
    result: SegmentationResult,
    reference_dicom: str | Path | Sequence[str | Path],
    path: Path,
    series_uid: str | None,
) -> tuple[DicomSeriesInfo, SortedSeries, Path, SegmentationResult]:
    """(the series ``result`` is written on, its sorted files, their folder, ``result`` on its grid); OutputError
    when there is none it can be written on."""
    if isinstance(reference_dicom, (str, Path)):
        folder = Path(reference_dicom)
        if folder.is_file():
            if not _is_dicom_file(folder):
                raise OutputError(
                    f"Writing DICOM SEG '{path}': the reference '{reference_dicom}' is not a DICOM file. "
                    "A DICOM SEG must reference the DICOM series of the CT that was segmented; a CT read from "
                    "NIfTI/NRRD has none. Give the CT's DICOM folder, or write .seg.nrrd (3D Slicer) or .nii.gz instead."
                )
            folder = folder.parent
        if not folder.is_dir():
            raise OutputError(
                f"Reference DICOM folder not found: '{reference_dicom}'. Give the folder of the CT series the "
                "segmentation was made on."
            )
        try:
            all_series = list_dicom_series(folder)
        except InputImageError as exc:
            raise OutputError(f"Cannot use '{folder}' as the DICOM SEG reference: {exc}") from exc
    else:
        files = [Path(f) for f in reference_dicom]
        if not files:
            raise OutputError(f"Writing DICOM SEG '{path}' needs the CT's DICOM files; none were given.")
        folder = Path(os.path.commonpath([str(f.parent) for f in files]))
        try:
            all_series = list_dicom_series_files(files)
        except InputImageError as exc:
            raise OutputError(f"Cannot use the given DICOM files as the DICOM SEG reference: {exc}") from exc
    info, sorted_series = _reference_series_for(result, all_series, folder, series_uid)
    if not sorted_series.regular:
        raise OutputError(
            f"The reference series in '{folder}' has {sorted_series.problem}; its slices do not form the regular grid "
            "the segmentation lies on. Export to .seg.nrrd instead."
        )
    on_grid = on_series_grid(result, sorted_series.geometry)
    if on_grid is None:
        raise OutputError(
            f"The segmentation's grid does not match the DICOM series {info.series_uid or info.describe()} in "
            f"'{folder}': {result.geometry.describe_difference(sorted_series.geometry)} (segmentation vs DICOM). "
            "Give the DICOM folder of the CT that was segmented, or resample the segmentation onto it "
            "(liversam export ... --reference-dicom DIR reads it onto that grid)."
        )
    _check_referenceable(sorted_series, folder)
    return info, sorted_series, folder, on_grid


def write_dicom_seg(
    result: SegmentationResult,
    reference_dicom: str | Path | Sequence[str | Path],
    path: str | Path,
    model_name: str = "",
    series_uid: str | None = None,
    algorithm_type: str = "SEMIAUTOMATIC",
    series_description: str = "LiverSAM segmentation",
    series_number: int = 1000,
) -> Path:
    """Write ``result`` as a DICOM SEG (BINARY) referencing the CT series in ``reference_dicom``.

    ``reference_dicom`` is the CT's DICOM folder (searched recursively) or the list of its files (as
    Slicer's DICOM database gives them).

    The series is ``series_uid``, else ``result.provenance["dicom_series_uid"]``, else the image series
    whose grid equals ``result.geometry``. Empty frames are omitted. Raises :class:`OutputError` (and
    writes nothing) when the geometry does not match, the series cannot be referenced or there are no
    segments. Returns ``path``.
    """
    import highdicom as hd

    path = Path(path)
    if not result.segments:
        raise OutputError(f"Nothing to write to '{path}': the segmentation has no segments.")
    info, sorted_series, folder, result = _reference_for(result, reference_dicom, path, series_uid)

    source_images = [_clean_source(_read_source(p)) for p in sorted_series.files]
    nk, nj, ni = result.geometry.shape_kji
    pixel_array = np.zeros((nk, nj, ni, len(result.segments)), dtype=bool)
    descriptions = []
    for index, segment in enumerate(result.segments):
        if segment.mask_kji.shape != (nk, nj, ni):
            raise OutputError(
                f"Segment '{segment.name}' has mask shape {segment.mask_kji.shape}, expected {(nk, nj, ni)} [k, j, i]."
            )
        pixel_array[..., index] = segment.mask_kji
        descriptions.append(
            _segment_description(
                index + 1, segment, terminology_for(segment.name), model_name, algorithm_type
            )
        )
    any_voxel = bool(pixel_array.any())
    content = _long_string(f"{ALGORITHM_NAME} {__version__}" + (f", model {model_name}" if model_name else ""))
    texts = [content, model_name, series_description] + [d.SegmentLabel for d in descriptions]
    # Text outside ASCII (a segment named "Läsion") needs a declared character set: UTF-8, which also holds
    # whatever the copied patient and study attributes were decoded from.
    character_set = None if all(str(t).isascii() for t in texts) else "ISO_IR 192"
    highdicom_logger = logging.getLogger("highdicom")
    previous_level = highdicom_logger.level
    highdicom_logger.setLevel(max(previous_level, logging.WARNING))  # its INFO lines list every copied module
    try:
        with warnings.catch_warnings():
            # Single-component patient names ("JANCT000") are common and harmless; highdicom warns about them.
            warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
            seg = hd.seg.Segmentation(
                source_images=source_images,
                pixel_array=pixel_array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=series_number,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=ALGORITHM_NAME,
                manufacturer_model_name=_long_string(model_name or ALGORITHM_NAME),
                software_versions=__version__,
                device_serial_number="0",
                content_label="LIVERSAM",
                content_description=content,
                series_description=_long_string(series_description),
                omit_empty_frames=any_voxel,
                **({"specific_character_set": character_set} if character_set else {}),
            )
    except (ValueError, TypeError, AttributeError) as exc:
        highdicom_logger.setLevel(previous_level)
        raise OutputError(
            f"Cannot build the DICOM SEG for '{path}' from the series in '{folder}': {exc}"
        ) from exc
    highdicom_logger.setLevel(previous_level)
    try:
        with atomic_path(path) as tmp:
            seg.save_as(tmp)
    except OSError as exc:
        raise OutputError(describe_write_error(path, exc)) from exc
    logger.info(
        "wrote DICOM SEG %s (%d segments) referencing series %s", path, len(descriptions), info.series_uid
    )
    return path


def _read_source(path: Path):
    """The header of one file of the reference series (read before, while listing the series): with or without the
    preamble and File Meta, as :func:`liversam.dicom_series.list_dicom_series` read it. OSError (the file deleted,
    replaced by a folder or made unreadable since) is left to the caller: the server names it as its client's input."""
    ds = read_dicom_file(path, stop_before_pixels=True)
    if ds is None:
        raise OutputError(f"The reference DICOM file '{path}' can no longer be read as DICOM (changed meanwhile?).")
    return ds


def _is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file ("DICM" at byte 128), or a DICOM file without the preamble that holds an object (a damaged
    one too: reading its folder's series says what is wrong with it)."""
    try:
        kind = dicom_kind(path)
        if kind == "part10":
            return True
        ds = read_dicom_file(path, stop_before_pixels=True) if kind else None
    except DamagedDicomFileError:
        return True
    except OSError:
        return False
    return ds is not None and ("SOPClassUID" in ds or "Modality" in ds)


# --- reading ----------------------------------------------------------------------------------------


def _item(sequence_owner, keyword: str):
    seq = sequence_owner.get(keyword) if sequence_owner is not None else None
    return seq[0] if seq else None


def _functional(ds, frame_index: int, group: str):
    """A functional group item for one frame: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame_index < len(per_frame):
        item = _item(per_frame[frame_index], group)
        if item is not None:
            return item
    return _item(_item(ds, "SharedFunctionalGroupsSequence"), group)


def _code_from(item) -> Code | None:
    if item is None:
        return None
    return Code(
        value=str(item.CodeValue),
        scheme=str(item.CodingSchemeDesignator),
        meaning=str(item.get("CodeMeaning", "")),
    )


def _lab_to_rgb(dicom_lab: Sequence[int]) -> tuple[float, float, float] | None:
    try:
        import highdicom as hd

        r, g, b = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in dicom_lab)).to_rgb(clip=True)
        return (r / 255.0, g / 255.0, b / 255.0)
    except (ValueError, TypeError, AttributeError):
        return None


def _native_grid(
    positions: np.ndarray, row_dir, col_dir, spacing_ji, size_ji, spacing_between: float | None
) -> tuple[ImageGeometry, np.ndarray]:
    """The regular grid spanned by the frame positions; returns it and each frame's k index."""
    normal = np.cross(row_dir, col_dir)
    distances = positions @ normal
    unique = np.unique(np.round(distances, 4))
    if spacing_between and spacing_between > 0:
        step = float(spacing_between)
    elif len(unique) > 1:
        step = float(np.min(np.diff(unique)))
    else:
        step = 1.0
    first = int(np.argmin(distances))
    origin = positions[first]
    k_float = (distances - distances[first]) / step
    if np.abs(k_float - np.rint(k_float)).max() > 0.05:
        raise InputImageError(
            "The DICOM SEG frames are not on a regular slice grid; give the reference CT (reference geometry) "
            "so they can be placed on its slices."
        )
    offsets = positions - origin
    if np.abs(offsets @ row_dir).max() > 1e-2 or np.abs(offsets @ col_dir).max() > 1e-2:
        raise InputImageError(
            "The DICOM SEG frames are shifted in-plane against each other (tiled or tilted); give the reference CT "
            "so they can be resampled onto it."
        )
    k_index = np.rint(k_float).astype(int)
    geometry = ImageGeometry(
        size_ijk=(size_ji[1], size_ji[0], int(k_index.max()) + 1),
        spacing_mm=(spacing_ji[1], spacing_ji[0], step),
        origin_lps=tuple(origin),
        direction_lps=np.column_stack([row_dir, col_dir, normal]),
    )
    return geometry, k_index


def _paste_onto(reference: ImageGeometry, positions, row_dir, col_dir, spacing_ji, size_ji):
    """Per-frame (k, j0, i0) offsets on ``reference`` when the frames lie exactly on its grid, else None."""
    direction = reference.direction_lps
    if not (
        np.allclose(direction[:, 0], row_dir, atol=1e-4) and np.allclose(direction[:, 1], col_dir, atol=1e-4)
    ):
        return None
    if not np.allclose((spacing_ji[1], spacing_ji[0]), reference.spacing_mm[:2], rtol=1e-4, atol=1e-4):
        return None
    ijk = reference.lps_to_ijk(positions)
    if np.abs(ijk - np.rint(ijk)).max() > 0.02:
        return None
    return np.rint(ijk).astype(int)


def read_dicom_seg(
    path: str | Path,
    reference: ImageGeometry | None = None,
    label_names: dict[int, str] | None = None,
) -> SegmentationResult:
    """Read a DICOM SEG into a :class:`SegmentationResult`.

    Masks are on ``reference`` when given (frames pasted on its slices, or resampled nearest-neighbour),
    else on the SEG's own regular grid. Segment names are the SegmentLabel; labels follow the LiverSAM
    convention (liver 1, tumour 2) from the segment codes, else ``label_names`` (label -> name), else the
    segment number. ``provenance`` holds the referenced series and instance UIDs and each segment's
    terminology. Raises :class:`InputImageError` when the file is not a readable DICOM SEG.
    """
    path = Path(path)
    try:
        ds = read_dicom_file(path)  # with or without the preamble and File Meta
    except OSError as exc:
        raise InputImageError(f"Cannot read DICOM SEG '{path}': {exc.strerror or exc}.") from exc
    if ds is None:
        raise InputImageError(f"Cannot read DICOM SEG '{path}': it is not a DICOM file.")
    with_transfer_syntax(ds)
    if str(ds.get("Modality", "")) != "SEG" and str(ds.get("SOPClassUID", "")) not in (
        SEGMENTATION_STORAGE_UID,
        LABELMAP_SEGMENTATION_STORAGE_UID,
    ):
        raise InputImageError(
            f"'{path}' is a DICOM {ds.get('Modality', '?')} object, not a segmentation (SEG). Give a DICOM SEG file."
        )
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    try:
        frames = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any codec failure
        raise InputImageError(f"Cannot decode the pixel data of DICOM SEG '{path}': {exc}") from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames = frames.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    if seg_type == "FRACTIONAL":
        threshold = float(ds.get("MaximumFractionalValue", 255)) / 2.0
        frames = frames > threshold

    positions = []
    orientation = None
    spacing_ji = None
    spacing_between = None
    frame_segments: list[int | None] = []
    for f in range(n_frames):
        plane = _functional(ds, f, "PlanePositionSequence")
        orient = _functional(ds, f, "PlaneOrientationSequence")
        measures = _functional(ds, f, "PixelMeasuresSequence")
        if plane is None or orient is None or measures is None:
            raise InputImageError(
                f"DICOM SEG '{path}' frame {f + 1} has no plane position/orientation/pixel spacing; LiverSAM reads "
                "SEGs of 3D volumes (not slide microscopy or tiled SEGs)."
            )
        positions.append([float(v) for v in plane.ImagePositionPatient])
        this_orientation = np.array([float(v) for v in orient.ImageOrientationPatient])
        if orientation is None:
            orientation = this_orientation
            spacing_ji = tuple(float(v) for v in measures.PixelSpacing)
            sbs = measures.get("SpacingBetweenSlices")
            spacing_between = float(sbs) if sbs not in (None, "") else None
        elif np.abs(this_orientation - orientation).max() > 1e-4:
            raise InputImageError(
                f"DICOM SEG '{path}' mixes frame orientations; LiverSAM reads single-volume SEGs."
            )
        ident = _functional(ds, f, "SegmentIdentificationSequence")
        frame_segments.append(int(ident.ReferencedSegmentNumber) if ident is not None else None)
    positions_arr = np.array(positions, dtype=float)
    row_dir = orientation[:3] / np.linalg.norm(orientation[:3])
    col_dir = orientation[3:] / np.linalg.norm(orientation[3:])
    size_ji = (int(ds.Rows), int(ds.Columns))

    # Segments (number -> description)
    descriptions = {int(item.SegmentNumber): item for item in ds.get("SegmentSequence", [])}
    if not descriptions:
        raise InputImageError(f"DICOM SEG '{path}' has no SegmentSequence; it describes no segment.")

    # Place every frame: either straight onto the reference, or onto the SEG's own grid.
    offsets = (
        _paste_onto(reference, positions_arr, row_dir, col_dir, spacing_ji, size_ji) if reference else None
    )
    if offsets is not None:
        grid = reference
    else:
        grid, k_index = _native_grid(positions_arr, row_dir, col_dir, spacing_ji, size_ji, spacing_between)
        offsets = np.stack([np.zeros_like(k_index), np.zeros_like(k_index), k_index], axis=1)
    nk, nj, ni = grid.shape_kji
    masks = {number: np.zeros((nk, nj, ni), dtype=bool) for number in descriptions}
    outside = 0
    for f in range(n_frames):
        i0, j0, k = (int(v) for v in offsets[f])
        if not 0 <= k < nk:
            outside += 1
            continue
        frame = frames[f]
        jj0, ii0 = max(j0, 0), max(i0, 0)
        jj1, ii1 = min(j0 + size_ji[0], nj), min(i0 + size_ji[1], ni)
        if jj1 <= jj0 or ii1 <= ii0:
            outside += 1
            continue
        crop = frame[jj0 - j0 : jj1 - j0, ii0 - i0 : ii1 - i0]
        if seg_type == "LABELMAP":
            for number in descriptions:
                masks[number][k, jj0:jj1, ii0:ii1] |= crop == number
        else:
            number = frame_segments[f]
            if number not in masks:
                raise InputImageError(
                    f"DICOM SEG '{path}' frame {f + 1} refers to an undefined segment {number}."
                )
            masks[number][k, jj0:jj1, ii0:ii1] |= crop.astype(bool)
    if outside:
        logger.warning("%s: %d frame(s) lie outside the reference grid and were dropped", path, outside)
    if reference is not None and grid is not reference:
        logger.info("%s: resampling the SEG grid onto the reference grid (nearest neighbour)", path)
        from .segmentation_io import resample_mask

        masks = {n: resample_mask(m, grid, reference) for n, m in masks.items()}
        grid = reference

    # Names, terminology, labels, colours
    names_by_label = {int(k): v for k, v in (label_names or {}).items()}
    label_by_name = {v.lower(): k for k, v in names_by_label.items()}
    segments: list[Segment] = []
    terminology_by_name: dict[str, Terminology] = {}
    used_labels: set[int] = set()
    planned = []
    for number in sorted(descriptions):
        item = descriptions[number]
        name = str(item.get("SegmentLabel", "") or f"Segment_{number}")
        category = _code_from(_item(item, "SegmentedPropertyCategoryCodeSequence"))
        type_ = _code_from(_item(item, "SegmentedPropertyTypeCodeSequence"))
        region = _code_from(_item(item, "AnatomicRegionSequence"))
        terminology = (
            terminology_from_codes(category, type_, region) if category and type_ else terminology_for(name)
        )
        terminology_by_name[name] = terminology
        if name.lower() in label_by_name:
            label = label_by_name[name.lower()]
        elif terminology.default_label:
            label = terminology.default_label
        else:
            label = number
        planned.append((number, name, terminology, label, item))
    for number, name, terminology, label, item in planned:
        if label in used_labels:
            label = max(used_labels | {p[3] for p in planned}) + 1
        used_labels.add(label)
        color = None
        if "RecommendedDisplayCIELabValue" in item:
            color = _lab_to_rgb(item.RecommendedDisplayCIELabValue)
        if color is None:
            color = terminology.color if terminology.default_label else default_color(name, number - 1)
        segments.append(Segment(name=name, label=int(label), mask_kji=masks[number], color=color))

    references = _referenced_instances(ds)
    provenance = {
        "source": str(path),
        "format": "dicom-seg",
        "dicom_seg_series_uid": str(ds.get("SeriesInstanceUID", "")),
        "dicom_series_uid": references[0],
        "referenced_sop_instance_uids": references[1],
        "dicom_frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "terminology": terminology_by_name,
        "content_creator": str(ds.get("ContentCreatorName", "") or ""),
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
    }
    return SegmentationResult(geometry=grid, segments=segments, provenance=provenance)


def _referenced_instances(ds) -> tuple[str, list[str]]:
    """(referenced SeriesInstanceUID, referenced SOPInstanceUIDs) of a SEG's ReferencedSeriesSequence."""
    series = ds.get("ReferencedSeriesSequence")
    if not series:
        return "", []
    item = series[0]
    return str(item.get("SeriesInstanceUID", "")), [
        str(ref.ReferencedSOPInstanceUID) for ref in item.get("ReferencedInstanceSequence", [])
    ]
