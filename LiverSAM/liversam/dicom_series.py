"""DICOM CT input: find the series in a folder, pick the CT one, read it into a :class:`CTVolume`.

A folder (searched recursively) may hold several series, and non-image objects (DICOM SEG, RTSTRUCT, SR).
:func:`list_dicom_series` groups the files by SeriesInstanceUID; :func:`select_dicom_series` picks the one
to read: the series the user names (by SeriesInstanceUID or SeriesNumber), otherwise the CT series with the
most slices. A tie is refused with the list of choices, so the user never gets a series silently. Files without
the preamble and "DICM" prefix, with or without File Meta, are read too (:mod:`liversam.dicom_files`).

A damaged DICOM file (cut short: :class:`~liversam.dicom_files.DamagedDicomFileError`) whose header still names its
SeriesInstanceUID is recorded under that series (``DicomSeriesInfo.damaged``): that series is refused, naming the
file, and the others are read (with a warning naming it). One whose SeriesInstanceUID cannot be read (cut before it)
may be a slice of any series: the folder is refused.

:func:`read_dicom_series` sorts the slices along the slice normal (``cross(row, column)`` of
ImageOrientationPatient), checks that they form a regular grid and applies RescaleSlope/RescaleIntercept
(per slice). Geometry: ``direction_lps`` columns are the DICOM row direction (i), the column direction (j)
and the slice normal (k); ``spacing_mm`` is (PixelSpacing[1], PixelSpacing[0], slice step); the origin is
the ImagePositionPatient of the first sorted slice. So the ImagePositionPatient of file ``k`` equals
``geometry.ijk_to_lps((0, 0, k))``, and ``metadata["dicom_files"][k]`` is the file of slice ``k``.

Irregular slice spacing (missing slices) and gantry tilt (slices shifted in-plane) cannot be represented
by an orthogonal regular grid: they raise :class:`InputImageError` unless ``resample_irregular=True``, in
which case the slices are linearly interpolated onto a regular orthogonal grid (``metadata
["dicom_resampled"]`` is then True and the grid no longer matches the files one to one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dicom_files import (
    DamagedDicomFileError,
    one_line,
    read_dicom_file,
    transfer_syntax_of,
    with_transfer_syntax,
)
from .errors import InputImageError
from .geometry import ImageGeometry
from .volume import CTVolume

logger = logging.getLogger(__name__)

# Modalities whose objects never hold the CT image itself.
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "FID", "PLAN", "AU", "ECG"}
)
# Slice positions may deviate from a regular grid by this much (mm), or by this fraction of the spacing.
POSITION_TOLERANCE_MM = 0.01
POSITION_TOLERANCE_FRACTION = 0.01
ORIENTATION_TOLERANCE = 1e-4
# At most this many images of another orientation than the rest (scouts not tagged LOCALIZER) are set aside.
MAX_SET_ASIDE_IMAGES = 3

SERIES_OPTION_HINT = "choose one by SeriesInstanceUID (liversam: --series-uid UID; Python: series_uid=...)"
NON_CT_OPTION_HINT = "liversam: --allow-non-ct; Python: allow_non_ct=True"
RESAMPLE_OPTION_HINT = (
    "liversam: --resample-irregular; server open-path: \"resample_irregular\": true; Python: resample_irregular=True"
)


@dataclass(frozen=True)
class DamagedFile:
    """A damaged DICOM file (cut short) of a series, and the error that names it and says what to do."""

    path: Path
    message: str


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One series found in a folder.

    ``series_uid`` is "" when the files carry no SeriesInstanceUID (some anonymisers blank it); such files
    are grouped by folder, frame of reference, series number and description instead. ``files`` excludes
    localizer (scout) images. ``is_image`` is False for SEG, RTSTRUCT, SR and other non-image objects.
    ``damaged``: its files that are damaged (cut short; not in ``files``): the series cannot be read.
    """

    series_uid: str
    series_number: int | None
    modality: str
    description: str
    study_uid: str
    frame_of_reference_uid: str
    files: tuple[Path, ...]
    rows: int | None = None
    columns: int | None = None
    is_image: bool = True
    # Headers read while scanning (pixel data not loaded), in the order of ``files``.
    headers: tuple = field(default=(), repr=False, compare=False)
    damaged: tuple[DamagedFile, ...] = ()

    @property
    def num_files(self) -> int:
        return len(self.files)

    @property
    def ranked_files(self) -> int:
        """Its files counted for choosing the largest series: the damaged ones too. A damaged file is most likely
        a slice of its series (an image series' files are nearly all slices): the series lost no size by it, so the
        automatic choice does not turn to a smaller series because of it, and a tie it makes is refused as any tie."""
        return len(self.files) + len(self.damaged)

    def damaged_message(self) -> str:
        """The error naming its first damaged file (and how many more there are), "" when it has none."""
        if not self.damaged:
            return ""
        more = len(self.damaged) - 1
        return self.damaged[0].message + (f" ({more} other file(s) of the series are damaged too.)" if more else "")

    def check_whole(self) -> None:
        """Raise :class:`~liversam.dicom_files.DamagedDicomFileError` naming its first damaged file, if it has one."""
        if self.damaged:
            raise DamagedDicomFileError(self.damaged_message())

    def describe(self) -> str:
        """One line for listings: number, modality, description, size, UID."""
        number = "?" if self.series_number is None else str(self.series_number)
        size = f"{self.columns}x{self.rows}" if self.rows and self.columns else "no image"
        uid = self.series_uid or "(no SeriesInstanceUID)"
        damaged = f" + {len(self.damaged)} DAMAGED file(s)" if self.damaged else ""
        return (
            f"SeriesNumber {number} | {self.modality or '?'} | '{self.description}' | "
            f"{self.num_files} file(s){damaged}, {size} | SeriesInstanceUID {uid}"
        )


def _format_choices(series: Iterable[DicomSeriesInfo]) -> str:
    return "\n".join("  - " + s.describe() for s in series)


# --- scanning ---------------------------------------------------------------------------------------


def _iter_candidate_files(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            yield Path(root) / name


def _read_header(path: Path):
    """The dataset without pixel data, or None when ``path`` is not a DICOM file (with or without the preamble and
    File Meta: :mod:`liversam.dicom_files`). Raises :class:`InputImageError` when it may not be read (permission
    denied) or is a damaged DICOM file (cut short: :class:`~liversam.dicom_files.DamagedDicomFileError`): it may be
    one of the series' files."""
    try:
        return _read_header_or_damaged(path)
    except DamagedDicomFileError as exc:  # it was left out of its series without a word (an end slice: no gap)
        raise _refusing_the_folder(exc) from None


def _refusing_the_folder(exc: DamagedDicomFileError) -> DamagedDicomFileError:
    return DamagedDicomFileError(
        f"{exc} A DICOM folder is not read with a damaged file in it: it may be one of the series' slices, and "
        "the series would be read a slice short without it (at either end, with no gap to show for it).",
        dataset=exc.dataset,
    )


def _scan_header(path: Path) -> tuple[object | None, DamagedFile | None]:
    """(header, None) as :func:`_read_header`; (the header read before the damage, the damaged file) for a damaged
    file whose header still names its SeriesInstanceUID: its series is known, the others may be read. A damaged file
    that does not name it (cut before it) raises as in :func:`_read_header`: it may be a slice of any series."""
    try:
        return _read_header_or_damaged(path), None
    except DamagedDicomFileError as exc:
        series_uid = str(exc.dataset.get("SeriesInstanceUID", "") or "") if exc.dataset is not None else ""
        if not series_uid:  # cut before its SeriesInstanceUID (or it has none): a slice of any series
            raise _refusing_the_folder(exc) from None
        message = (
            f"{exc} Its header names series {series_uid}, which is not read with a damaged file: the file is most "
            "likely one of its slices, and the series would be read a slice short without it (at either end, with "
            "no gap to show for it). The other series beside it can be read."
        )
        return exc.dataset, DamagedFile(path, message)


def _read_header_or_damaged(path: Path):
    """:func:`_read_header`, but a damaged file raises :class:`~liversam.dicom_files.DamagedDicomFileError` as
    :func:`~liversam.dicom_files.read_dicom_file` does (the caller tells what it means for the folder)."""
    try:
        return read_dicom_file(path, stop_before_pixels=True)
    except PermissionError as exc:  # taken for "not DICOM", it was left out of its series without a word
        raise InputImageError(
            f"'{path}' cannot be read (permission denied): every file of a DICOM folder must be readable by this "
            "user, or the series it belongs to would be read with a slice missing. Make the files readable "
            "(chmod -R a+rX on the folder, as their owner) or copy the series to a folder of yours."
        ) from exc
    except OSError:
        return None


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _is_localizer(ds) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type


def list_dicom_series(folder: str | Path) -> list[DicomSeriesInfo]:
    """All DICOM series under ``folder`` (recursive), image series first, then CT, then most files.

    Files that are not DICOM are ignored. Raises :class:`InputImageError` if ``folder`` does not exist.
    """
    folder = Path(folder)
    if folder.is_file():
        what = (
            "a DICOM file"
            if _read_header(folder) is not None
            else "not a DICOM file (a NIfTI or NRRD CT has no DICOM series)"
        )
        raise InputImageError(
            f"'{folder}' is a file, not a folder, and {what}. Give the folder that holds the CT's DICOM series."
        )
    if not folder.is_dir():
        raise InputImageError(f"DICOM folder not found: '{folder}'. Give a folder that holds a DICOM series.")
    return list_dicom_series_files(_iter_candidate_files(folder))


def list_dicom_series_files(paths: Iterable[str | Path]) -> list[DicomSeriesInfo]:
    """Group the given files into series (as :func:`list_dicom_series` does for a folder).

    Files that are not DICOM are ignored; missing files raise :class:`InputImageError`. A damaged file is recorded
    under its series (``damaged``) when its header names the series, else raises
    :class:`~liversam.dicom_files.DamagedDicomFileError`.
    """
    groups: dict[tuple, list[tuple[Path, object]]] = {}
    damaged: dict[tuple, list[tuple[DamagedFile, object]]] = {}
    for path in (Path(p) for p in paths):
        if not path.is_file():
            raise InputImageError(f"DICOM file not found: '{path}'.")
        ds, damage = _scan_header(path)
        if damage is not None:  # it names its series (its header was read up to the damage, past the UID)
            damaged.setdefault((str(ds.SeriesInstanceUID),), []).append((damage, ds))
            continue
        if ds is None or "SOPClassUID" not in ds and "Modality" not in ds:
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if series_uid:
            key: tuple = (series_uid,)
        else:  # anonymised files: group by what is left
            key = (
                "",
                str(path.parent),
                str(ds.get("FrameOfReferenceUID", "") or ""),
                str(ds.get("SeriesNumber", "") or ""),
                str(ds.get("SeriesDescription", "") or ""),
                str(ds.get("Modality", "") or ""),
            )
        groups.setdefault(key, []).append((path, ds))

    infos = []
    for key in [*groups, *(key for key in damaged if key not in groups)]:
        members, broken = groups.get(key, []), damaged.get(key, [])
        # its whole files tell the series (a damaged file's values are whole up to the damage: the last resort)
        first = members[0][1] if members else broken[0][1]
        modality = str(first.get("Modality", "") or "").upper()
        images = [(p, d) for p, d in members if "Rows" in d and not _is_localizer(d)]
        is_image = modality not in NON_IMAGE_MODALITIES and (bool(images) or bool(broken))
        kept = images if is_image else members
        if is_image and len(images) < len(members):
            logger.debug(
                "series %s: ignoring %d localizer/non-image file(s)", key[0], len(members) - len(images)
            )
        ref = kept[0][1] if kept else {}
        infos.append(
            DicomSeriesInfo(
                series_uid=key[0],
                series_number=_int_or_none(first.get("SeriesNumber")),
                modality=modality,
                description=str(first.get("SeriesDescription", "") or ""),
                study_uid=str(first.get("StudyInstanceUID", "") or ""),
                frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "") or ""),
                files=tuple(p for p, _ in kept),
                rows=_int_or_none(ref.get("Rows")),
                columns=_int_or_none(ref.get("Columns")),
                is_image=is_image,
                headers=tuple(d for _, d in kept),
                damaged=tuple(damage for damage, _ in broken),
            )
        )
    infos.sort(key=lambda s: (not s.is_image, s.modality != "CT", -s.ranked_files, s.series_number or 0))
    return infos


def _no_dicom_message(folder: Path) -> str:
    """No DICOM files in ``folder``: name the image files it holds (a NIfTI/NRRD CT's folder given as the CT)."""
    from .ct_io import has_image_suffix

    images = (
        sorted(p.name for p in folder.iterdir() if p.is_file() and has_image_suffix(p))
        if folder.is_dir()
        else []
    )
    if images:
        shown = ", ".join(images[:4]) + (", ..." if len(images) > 4 else "")
        return (
            f"No DICOM files found in '{folder}'; it holds image file(s) {shown}. Give the CT file itself "
            f"(e.g. '{folder / images[0]}'), not its folder."
        )
    return f"No DICOM files found in '{folder}'. Give the folder that holds the CT series' .dcm files."


def select_dicom_series(
    folder: str | Path,
    series_uid: str | None = None,
    series_number: int | None = None,
    allow_non_ct: bool = False,
    series: Sequence[DicomSeriesInfo] | None = None,
) -> DicomSeriesInfo:
    """Pick the series to read from ``folder`` (see the module docstring for the rules).

    ``series`` may pass an already computed :func:`list_dicom_series` result. Raises
    :class:`InputImageError` listing the choices when nothing or more than one series fits.
    """
    folder = Path(folder)
    all_series = list(series) if series is not None else list_dicom_series(folder)
    if not all_series:
        raise InputImageError(_no_dicom_message(folder))
    image_series = [s for s in all_series if s.is_image]

    if series_uid:
        matches = [s for s in all_series if s.series_uid == series_uid]
        if not matches:
            raise InputImageError(
                f"No series with SeriesInstanceUID {series_uid} in '{folder}'. Series found:\n"
                + _format_choices(all_series)
            )
        chosen = matches[0]
    elif series_number is not None:
        matches = [s for s in image_series if s.series_number == int(series_number)]
        if not matches:
            raise InputImageError(
                f"No image series with SeriesNumber {series_number} in '{folder}'. Series found:\n"
                + _format_choices(all_series)
            )
        if len(matches) > 1:
            raise InputImageError(
                f"{len(matches)} series in '{folder}' have SeriesNumber {series_number}; {SERIES_OPTION_HINT}:\n"
                + _format_choices(matches)
            )
        chosen = matches[0]
    else:
        ct_series = [s for s in image_series if s.modality == "CT"]
        candidates = ct_series or (image_series if allow_non_ct else [])
        if not candidates:
            if image_series:
                raise InputImageError(
                    f"No CT series in '{folder}' (found: {', '.join(sorted({s.modality or '?' for s in image_series}))}). "
                    f"LiverSAM is made for CT; to use another modality anyway pass {NON_CT_OPTION_HINT}. Series found:\n"
                    + _format_choices(all_series)
                )
            raise InputImageError(
                f"'{folder}' holds DICOM files but no image series (only "
                f"{', '.join(sorted({s.modality or '?' for s in all_series}))}). Give the folder of the CT images."
            )
        # A damaged file counts toward its series' size (DicomSeriesInfo.ranked_files): the series it most likely
        # belongs to (as a slice) is still the one chosen, and refused naming the file, rather than a smaller series
        # read instead without a word; a tie it makes with a whole series is refused with the choices, as any tie.
        most = max(s.ranked_files for s in candidates)
        top = [s for s in candidates if s.ranked_files == most]
        if len(top) > 1:
            raise InputImageError(
                f"'{folder}' holds {len(top)} CT series with {most} images each; {SERIES_OPTION_HINT}:\n"
                + _format_choices(top)
            )
        chosen = top[0]
        if len(candidates) > 1:
            logger.warning(
                "'%s' holds %d image series; using the one with the most slices:\n  %s\nOthers (%s):\n%s",
                folder,
                len(candidates),
                chosen.describe(),
                SERIES_OPTION_HINT,
                _format_choices(s for s in candidates if s is not chosen),
            )

    chosen.check_whole()
    if not chosen.is_image:
        raise InputImageError(
            f"Series {chosen.series_uid} in '{folder}' is a {chosen.modality} object, not an image series. "
            f"Give a CT series; series found:\n" + _format_choices(all_series)
        )
    if chosen.modality != "CT" and not allow_non_ct:
        raise InputImageError(
            f"Series {chosen.series_uid or chosen.describe()} in '{folder}' has modality {chosen.modality or '?'}, "
            f"not CT. LiverSAM expects Hounsfield units; to use it anyway pass {NON_CT_OPTION_HINT}."
        )
    left_out = [damage.path for s in all_series if s is not chosen for damage in s.damaged]
    if left_out:
        logger.warning(
            "'%s': reading series %s; %d damaged DICOM file(s) of other series left out (cut short; replace them with "
            "complete copies to read their series): %s",
            folder,
            chosen.series_uid or chosen.describe(),
            len(left_out),
            ", ".join(f"'{path}'" for path in left_out),
        )
    return chosen


# --- geometry ---------------------------------------------------------------------------------------


@dataclass
class SortedSeries:
    """The headers of one series sorted along the slice normal, and the grid they define.

    ``geometry`` is the regular grid of the files when ``regular`` is True. Otherwise (irregular spacing or
    gantry tilt) it is the regular orthogonal grid a resample would produce and ``problem`` says why.
    """

    info: DicomSeriesInfo
    files: list[Path]
    headers: list
    positions_lps: np.ndarray  # (n, 3) ImagePositionPatient, sorted
    geometry: ImageGeometry
    regular: bool
    problem: str = ""


def _require(ds, keyword: str, path: Path):
    value = ds.get(keyword)
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        raise InputImageError(
            f"DICOM file '{path}' has no {keyword}; LiverSAM needs it to place the slice in 3D. "
            "Re-export the series from the scanner or PACS with full image-plane attributes."
        )
    return value


def _orientation_groups(orientations: np.ndarray) -> list[list[int]]:
    """Indices of the images sharing one ImageOrientationPatient, largest group first."""
    groups: list[list[int]] = []
    for index, row in enumerate(orientations):
        group = next(
            (g for g in groups if np.abs(orientations[g[0]] - row).max() <= ORIENTATION_TOLERANCE), None
        )
        if group is None:
            groups.append([index])
        else:
            group.append(index)
    return sorted(groups, key=len, reverse=True)


def _plane_of(orientation: np.ndarray) -> str:
    from .ct_io import slice_plane_name

    return slice_plane_name(np.cross(orientation[:3], orientation[3:]))


def _orientation_of(orientation: np.ndarray, main: np.ndarray) -> str:
    """The plane of ``orientation``, or its ImageOrientationPatient when that plane is the main images' plane."""
    plane = _plane_of(orientation)
    return (
        plane if plane != _plane_of(main) else f"ImageOrientationPatient {np.round(orientation, 4).tolist()}"
    )


def _images_of_one_orientation(orientations: np.ndarray, files: Sequence[Path], where: str) -> list[int]:
    """The indices of the series' images to read: all of them when they share one orientation.

    A few images in another orientation among many (a scout or localizer not tagged LOCALIZER in ImageType)
    are set aside with a warning naming them; a real mix of orientations is refused.
    """
    groups = _orientation_groups(orientations)
    if len(groups) == 1:
        return groups[0]
    main, others = groups[0], sorted(i for group in groups[1:] for i in group)
    if len(others) <= MAX_SET_ASIDE_IMAGES and len(main) >= 3 * len(others):
        logger.warning(
            "%s: set aside %d image(s) whose orientation differs from the other %d (%s) images, e.g. a scout or "
            "localizer: %s",
            where, len(others), len(main), _plane_of(orientations[main[0]]),
            ", ".join(f"'{files[i].name}' ({_orientation_of(orientations[i], orientations[main[0]])})" for i in others),
        )  # fmt: skip
        return sorted(main)
    found = "; ".join(
        f"{len(group)} {_plane_of(orientations[group[0]])} image(s) (e.g. '{files[group[0]].name}', "
        f"ImageOrientationPatient {np.round(orientations[group[0]], 4).tolist()})"
        for group in groups
    )
    raise InputImageError(
        f"The images of {where} are not all in one orientation: {found}. One series mixes axial and reformatted "
        "(or localizer) images, which do not form one volume. Export the axial images as a series of their own, or "
        "load the series in 3D Slicer (its DICOM module makes one volume per orientation), save the axial volume as "
        ".nrrd and give that file."
    )


def sort_series(info: DicomSeriesInfo, folder: str | Path = "") -> SortedSeries:
    """Sort a series' slices along the normal and work out its grid (no pixel data is read).

    Raises :class:`InputImageError` for multi-frame files, missing plane attributes, mixed orientation or
    image size, and several images at one position. Irregular spacing and tilt are reported in
    ``problem`` (``regular=False``), not raised, so the caller decides.
    """
    info.check_whole()  # a series is never read, nor its grid used, with a damaged file (a slice short)
    where = f"series {info.series_uid or info.describe()} in '{folder}'"
    headers = list(info.headers) or [_read_header(p) for p in info.files]
    files = list(info.files)
    for path, ds in zip(files, headers, strict=True):
        if _int_or_none(ds.get("NumberOfFrames")) not in (None, 1):
            raise InputImageError(
                f"'{path}' is a multi-frame (enhanced) DICOM image with {ds.NumberOfFrames} frames; LiverSAM reads "
                "classic one-slice-per-file CT series. Convert it (e.g. load it in 3D Slicer and save as NRRD)."
            )
    orientations = np.array(
        [
            [float(v) for v in _require(ds, "ImageOrientationPatient", p)]
            for p, ds in zip(files, headers, strict=True)
        ]
    )
    kept = _images_of_one_orientation(orientations, files, where)
    files, headers, orientations = [files[i] for i in kept], [headers[i] for i in kept], orientations[kept]
    pixel_spacings = np.array(
        [[float(v) for v in _require(ds, "PixelSpacing", p)] for p, ds in zip(files, headers, strict=True)]
    )
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
    if len(sizes) > 1 or np.abs(pixel_spacings - pixel_spacings[0]).max() > 1e-4:
        raise InputImageError(
            f"The images of {where} differ in size or PixelSpacing ({sorted(sizes)}); they do not form one volume. "
            f"Pick another series ({SERIES_OPTION_HINT})."
        )
    positions = np.array(
        [
            [float(v) for v in _require(ds, "ImagePositionPatient", p)]
            for p, ds in zip(files, headers, strict=True)
        ]
    )

    row_dir = orientations[0, :3] / np.linalg.norm(orientations[0, :3])
    col_dir = orientations[0, 3:] / np.linalg.norm(orientations[0, 3:])
    normal = np.cross(row_dir, col_dir)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    files = [files[i] for i in order]
    headers = [headers[i] for i in order]
    positions = positions[order]
    distances = distances[order]

    spacing_i, spacing_j = float(pixel_spacings[0, 1]), float(pixel_spacings[0, 0])
    rows, cols = sizes.pop()
    n = len(files)
    steps = np.diff(distances)
    if n > 1 and steps.min() < POSITION_TOLERANCE_MM:
        k = int(np.argmin(steps))
        raise InputImageError(
            f"{where}: '{files[k].name}' and '{files[k + 1].name}' lie at the same slice position "
            f"({distances[k]:.3f} mm along the normal). The series holds several acquisitions, phases or echoes; "
            "split them (e.g. in 3D Slicer's DICOM module) or pick one series."
        )

    problem = ""
    if n > 1:
        regular_step = (distances[-1] - distances[0]) / (n - 1)
        median_step = float(np.median(steps))
        tolerance = max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE_FRACTION * regular_step)
        grid_error = np.abs(distances - (distances[0] + regular_step * np.arange(n)))
        offsets = positions - positions[0]
        inplane_mm = np.abs(np.stack([offsets @ row_dir, offsets @ col_dir], axis=1)).max()
        if inplane_mm > max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE_FRACTION * min(spacing_i, spacing_j)):
            tilt_tag = headers[0].get("GantryDetectorTilt")
            problem = (
                f"the slices are shifted in-plane along the series by up to {inplane_mm:.2f} mm"
                + (f" (GantryDetectorTilt {float(tilt_tag):g} degrees)" if tilt_tag not in (None, "") else "")
                + ": a gantry-tilted or sheared acquisition"
            )
        elif grid_error.max() > tolerance:
            k = int(np.argmax(np.abs(steps - median_step)))
            problem = (
                f"irregular slice spacing: the gap between '{files[k].name}' and '{files[k + 1].name}' is "
                f"{steps[k]:.3f} mm while most slices are {median_step:.3f} mm apart "
                f"(gaps range {steps.min():.3f}..{steps.max():.3f} mm; missing slices?)"
            )
        spacing_k = median_step if problem else float(regular_step)
    else:
        spacing_k = float(headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness") or 1.0)
    nk = int(np.floor((distances[-1] - distances[0]) / spacing_k + 1e-3)) + 1 if problem else n
    geometry = ImageGeometry(
        size_ijk=(cols, rows, nk),
        spacing_mm=(spacing_i, spacing_j, spacing_k),
        origin_lps=tuple(positions[0]),
        direction_lps=np.column_stack([row_dir, col_dir, normal]),
    )
    return SortedSeries(
        info=info,
        files=files,
        headers=headers,
        positions_lps=positions,
        geometry=geometry,
        regular=not problem,
        problem=problem,
    )


# --- pixel data -------------------------------------------------------------------------------------


def _rescale(ds) -> tuple[float, float]:
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    return (
        1.0 if slope in (None, "") else float(slope),
        0.0 if intercept in (None, "") else float(intercept),
    )


_PYDICOM_SILENCE = {"lock": threading.Lock(), "depth": 0, "level": logging.NOTSET}


@contextlib.contextmanager
def _pydicom_logs_silenced() -> Iterator[None]:
    """pydicom logs a decoder's failure with its traceback (level ERROR); LiverSAM reports it in one message.

    Thread-safe (the server reads CTs in worker threads): the first to enter saves the level, the last to
    leave restores it.
    """
    pydicom_logger, state = logging.getLogger("pydicom"), _PYDICOM_SILENCE
    with state["lock"]:
        if state["depth"] == 0:
            state["level"] = pydicom_logger.level
            pydicom_logger.setLevel(logging.CRITICAL)
        state["depth"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["depth"] -= 1
            if state["depth"] == 0:
                pydicom_logger.setLevel(state["level"])


def _undecodable_message(path: Path, pydicom_error: BaseException, sitk_error: BaseException) -> str:
    """Which file, its transfer syntax, what each decoder said, and what to do."""
    from pydicom.uid import UID

    try:
        syntax = transfer_syntax_of(read_dicom_file(path))  # with its pixel data: encapsulated or not
        if syntax is None:
            name, compressed = "not named: the file has no File Meta", True
        else:
            name, compressed = f"{UID(syntax).name} ({syntax})", UID(syntax).is_compressed
    except Exception:  # noqa: BLE001 - the header was read before; this only names the syntax
        syntax, name, compressed = "", "unknown", True
    if syntax is None:
        fix = (
            "The file has no File Meta group (no DICOM file header), so nothing names the codec of its compressed "
            "(encapsulated) pixel data; DICOM allows compressed pixel data only in files that have one. Export the "
            "series again as standard DICOM files (with the file header), or uncompressed."
        )
    elif compressed:
        fix = (
            "The file is compressed: install the decoder for it (pip install pylibjpeg pylibjpeg-libjpeg "
            "pylibjpeg-openjpeg pyjpegls covers JPEG, JPEG 2000 and JPEG-LS) or decompress the series (e.g. "
            "gdcmconv --raw IN OUT, or dcmdjpeg). If a decoder for it is installed, the file is damaged: get a "
            "complete copy."
        )
    else:
        fix = "Its pixel data is damaged or incomplete: get a complete copy of the series."
    return (
        f"Cannot decode the pixel data of '{path}' (transfer syntax {name}). pydicom: {one_line(pydicom_error)}. "
        f"GDCM: {one_line(sitk_error)}. {fix}"
    )


def _read_slice_hu(path: Path, expected_shape: tuple[int, int]) -> np.ndarray:
    """One slice in HU (rescale applied), float64, shape (rows, columns). A file without File Meta is decoded in the
    Transfer Syntax its encoding implies (:func:`liversam.dicom_files.with_transfer_syntax`)."""
    from pydicom.errors import InvalidDicomError

    try:
        with _pydicom_logs_silenced():
            ds = read_dicom_file(path)
            if ds is None:
                raise InvalidDicomError("pydicom cannot parse it")
            stored = with_transfer_syntax(ds).pixel_array
        slope, intercept = _rescale(ds)
        hu = stored.astype(np.float64) * slope + intercept
    except DamagedDicomFileError:  # cut short (in its pixel data): no decoder reads what is not there
        raise
    except Exception as pydicom_error:  # noqa: BLE001 - fall back to GDCM for codecs pydicom lacks
        try:
            import SimpleITK as sitk

            # GDCM applies the rescale itself; named, since ITK picks no reader for a file without the "DICM" prefix
            image = sitk.ReadImage(str(path), imageIO="GDCMImageIO")
            hu = sitk.GetArrayFromImage(image).astype(np.float64).reshape(image.GetHeight(), image.GetWidth())
        except Exception as sitk_error:  # noqa: BLE001
            raise InputImageError(_undecodable_message(path, pydicom_error, sitk_error)) from pydicom_error
    if hu.shape != expected_shape:
        raise InputImageError(
            f"'{path}' holds an image of shape {hu.shape}, expected {expected_shape} (Rows x Columns) like the rest "
            "of its series. The file is damaged or not a single-frame grayscale CT slice."
        )
    return hu


def _hu_dtype(headers: Sequence) -> type:
    integral = all(float(v).is_integer() for ds in headers for v in _rescale(ds))
    return np.int32 if integral else np.float32


def _resample_slices(slices_hu: np.ndarray, sorted_series: SortedSeries, fill_value: float) -> np.ndarray:
    """Linearly interpolate irregular or tilted slices onto ``sorted_series.geometry`` (orthogonal grid)."""
    from scipy import ndimage

    geometry = sorted_series.geometry
    direction = geometry.direction_lps
    row_dir, col_dir, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    spacing_i, spacing_j, spacing_k = geometry.spacing_mm
    positions = sorted_series.positions_lps
    distances = positions @ normal
    origin = np.asarray(geometry.origin_lps)
    out = np.empty(geometry.shape_kji, dtype=np.float32)
    for k in range(geometry.size_ijk[2]):
        d = distances[0] + k * spacing_k
        b = int(np.clip(np.searchsorted(distances, d, side="right"), 1, len(distances) - 1))
        a = b - 1
        w = float(np.clip((d - distances[a]) / (distances[b] - distances[a]), 0.0, 1.0))
        slice_origin = origin + k * spacing_k * normal
        blended = np.zeros(geometry.shape_kji[1:], dtype=np.float64)
        for index, weight in ((a, 1.0 - w), (b, w)):
            if weight == 0.0:
                continue
            offset = slice_origin - positions[index]
            shift_ji = (-(offset @ col_dir) / spacing_j, -(offset @ row_dir) / spacing_i)
            moved = ndimage.shift(slices_hu[index], shift_ji, order=1, mode="constant", cval=fill_value)
            blended += weight * moved
        out[k] = blended
    return out


def find_series(
    path: str | Path,
    series_uid: str | None = None,
    series_number: int | None = None,
    allow_non_ct: bool = False,
) -> tuple[Path, DicomSeriesInfo]:
    """(folder, series) that :func:`read_dicom_series` reads for ``path``: a folder, or one file of the series (its
    folder is searched, for the file's own series unless ``series_uid`` names another). Headers only."""
    folder = Path(path)
    if folder.is_file():
        ds = _read_header(folder)
        if ds is None:
            raise InputImageError(
                f"'{folder}' is not a DICOM file. Give a DICOM series folder or one of its files."
            )
        series_uid = series_uid or str(ds.get("SeriesInstanceUID", "") or "") or None
        folder = folder.parent
    if not folder.exists():
        raise InputImageError(f"DICOM folder not found: '{folder}'.")
    info = select_dicom_series(folder, series_uid=series_uid, series_number=series_number, allow_non_ct=allow_non_ct)
    return folder, info


def read_size(info: DicomSeriesInfo) -> tuple[int, int, int]:
    """(voxels, bytes of the CT array, bytes :func:`read_dicom_series` holds beside it while reading) for a regular series,
    from its headers: the slices are read as int32 (float32 when a rescale is not integral) and then become int16
    (float32); each slice is decoded through float64 (its pixels, their HU and the rescale's temporary)."""
    plane = int(info.rows or 0) * int(info.columns or 0)
    voxels = len(info.files) * plane
    integral = _hu_dtype(info.headers) is np.int32 if info.headers else True
    return voxels, voxels * (2 if integral else 4), voxels * 4 + plane * 3 * 8


def resampled_read_size(sorted_series: SortedSeries) -> tuple[int, int, int]:
    """(voxels, bytes of the CT array, bytes held beside it while reading) for an irregular series read with
    ``resample_irregular=True``: the regular grid it is resampled onto (float32), and beside it the series' own slices
    (int32 / float32) and a slice's interpolation temporaries (float64: the blend, a shifted slice, its source)."""
    grid = int(np.prod(sorted_series.geometry.shape_kji))
    plane = int(np.prod(sorted_series.geometry.shape_kji[1:]))
    return grid, grid * 4, len(sorted_series.files) * plane * 4 + plane * 3 * 8


def read_dicom_series(
    folder: str | Path,
    series_uid: str | None = None,
    series_number: int | None = None,
    allow_non_ct: bool = False,
    resample_irregular: bool = False,
    chosen: tuple[Path, DicomSeriesInfo] | None = None,
) -> CTVolume:
    """Read one DICOM series from ``folder`` into a :class:`CTVolume` in Hounsfield units.

    ``folder`` may also be one file of the series (its series is then read from its folder). The series
    is chosen by :func:`select_dicom_series`. The array is [k, j, i]: int16 when the rescaled values are
    integers within int16 range, else float32. ``metadata`` holds "dicom_series_uid", "dicom_study_uid",
    "dicom_files" (paths sorted by slice position: file k is slice k), "dicom_sop_instance_uids",
    "dicom_frame_of_reference_uid", "dicom_series_number", "dicom_series_description", "modality",
    "dicom_resampled".

    ``chosen`` is what :func:`find_series` returned for the same arguments (then the headers are not read again).

    Raises :class:`InputImageError` naming the folder, the problem and the fix.
    """
    folder, info = chosen or find_series(folder, series_uid, series_number, allow_non_ct)
    sorted_series = sort_series(info, folder)
    if not sorted_series.regular and not resample_irregular:
        raise InputImageError(
            f"Series {info.series_uid or info.describe()} in '{folder}': {sorted_series.problem}. LiverSAM needs a "
            f"regular, orthogonal slice grid. Re-export the complete series, or let LiverSAM resample it onto a "
            f"regular grid ({RESAMPLE_OPTION_HINT}); a resampled volume no longer matches the DICOM files one to "
            "one, so DICOM SEG output is then not possible (use .seg.nrrd)."
        )

    geometry = sorted_series.geometry
    rows, cols = geometry.shape_kji[1], geometry.shape_kji[2]
    n = len(sorted_series.files)
    work_dtype = _hu_dtype(sorted_series.headers)
    slices = np.empty((n, rows, cols), dtype=work_dtype)
    for k, path in enumerate(sorted_series.files):
        hu = _read_slice_hu(path, (rows, cols))
        slices[k] = np.rint(hu) if work_dtype is np.int32 else hu

    if not sorted_series.regular:
        logger.warning(
            "Series %s: %s. Resampling onto a regular grid of %d slices %.3f mm apart (as asked).",
            info.series_uid,
            sorted_series.problem,
            geometry.size_ijk[2],
            geometry.spacing_mm[2],
        )
        array = _resample_slices(slices, sorted_series, fill_value=float(slices.min()))
    elif (
        work_dtype is np.int32
        and slices.min() >= np.iinfo(np.int16).min
        and slices.max() <= np.iinfo(np.int16).max
    ):
        array = slices.astype(np.int16)
    else:
        array = slices.astype(np.float32)

    first = sorted_series.headers[0]
    metadata = {
        "dicom_series_uid": info.series_uid,
        "dicom_study_uid": info.study_uid,
        "dicom_files": [str(p) for p in sorted_series.files],
        "dicom_sop_instance_uids": [str(ds.get("SOPInstanceUID", "") or "") for ds in sorted_series.headers],
        "dicom_frame_of_reference_uid": info.frame_of_reference_uid,
        "dicom_series_number": info.series_number,
        "dicom_series_description": info.description,
        "dicom_patient_id": str(first.get("PatientID", "") or ""),
        "modality": info.modality,
        "dicom_resampled": not sorted_series.regular,
    }
    return CTVolume(array_kji=array, geometry=geometry, source=str(folder), metadata=metadata)
