"""Reading CT volumes from NRRD, NIfTI, MHA files or a DICOM series folder into a :class:`CTVolume`.

Geometry (spacing, origin, direction) is kept as stored, in LPS. HU values are kept as stored; for DICOM,
RescaleSlope / RescaleIntercept are applied by the reader.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .axial_orientation import axial_reorientation
from .errors import InputImageError
from .geometry import ImageGeometry
from .image_integrity import DICOM, check_image_file, sniff_image_format
from .volume import CTVolume

if TYPE_CHECKING:
    from .dicom_series import DicomSeriesInfo

logger = logging.getLogger(__name__)

IMAGE_FILE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")

# A label mask given as the CT. A CT of the abdomen has air (about -1000 HU) around and inside the body, which is
# why the web app refuses a volume whose lowest value is above -300 HU (MIN_AIR_HU in web/liversam_web/mrml_scene.py).
# The command line is stricter about what it refuses, so that crops and synthetic volumes without air still pass:
# only a volume of few small non-negative whole numbers (labels 0..255) is taken for a label mask. A CT, even one
# cropped to the liver, has fat or noise below 0 HU, so a negative value is enough to clear it.
LABEL_MASK_MIN_VALUE = 0
LABEL_MASK_MAX_VALUE = 255
LABEL_MASK_MAX_DISTINCT = 128  # room for multi-organ label maps (TotalSegmentator has 117 classes)


def has_image_suffix(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_FILE_SUFFIXES)


def read_ct(
    path: str | Path,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    series_number: int | None = None,
    resample_irregular: bool = False,
    replace_nonfinite: float | None = None,
    dicom_series: tuple[Path, DicomSeriesInfo] | None = None,
) -> CTVolume:
    """Read a CT volume from an image file, a DICOM folder, or one DICOM file or DICOMDIR (its folder's series).

    ``dicom_series``: the (folder, series) :func:`liversam.dicom_series.find_series` chose for ``path`` and the same
    options, when the caller has looked already (the headers are then not read again).

    A 4D file holding one volume is read as that 3D volume.

    Raises :class:`InputImageError` naming the path and what is wrong: missing path, unsupported format,
    empty, truncated or corrupt file (data shorter than its header declares), not 3D, more than one component
    per voxel (RGB), zero / negative / non-finite spacing, a non-invertible direction matrix, unreadable
    file, NaN or infinite voxels (unless ``replace_nonfinite`` gives the value to put in their place; the
    replacement is logged with its count).
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"CT not found: '{path}'. Give an existing .nrrd/.nii/.nii.gz/.mha file or a DICOM folder.")
    is_dicom_file = path.is_file() and not has_image_suffix(path) and sniff_image_format(path) == DICOM
    if path.is_dir() or is_dicom_file:
        from .dicom_series import read_dicom_series  # local import: DICOM needs pydicom

        if is_dicom_file:  # one file of the series, or a DICOMDIR: the series is read from the file's folder
            logger.info("'%s' is a DICOM file: reading its series from the folder '%s'", path, path.parent)
        volume = read_dicom_series(
            path,
            series_uid=series_uid,
            series_number=series_number,
            allow_non_ct=allow_non_ct,
            resample_irregular=resample_irregular,
            chosen=dicom_series,
        )
        return _finite_volume(volume, replace_nonfinite)
    if not has_image_suffix(path):
        raise InputImageError(_unsupported_file_message(path))
    check_image_file(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputImageError(f"Cannot read CT file '{path}': {_itk_message(exc)}") from exc
    return _finite_volume(ct_from_sitk(image, source=str(path)), replace_nonfinite)


def slice_plane_name(normal_lps) -> str:
    """'axial', 'coronal' or 'sagittal': the patient plane of slices with this normal (LPS); else 'oblique'."""
    normal = np.abs(np.asarray(normal_lps, dtype=float))
    normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
    axis = int(np.argmax(normal))
    return ("sagittal", "coronal", "axial")[axis] if normal[axis] >= 0.9 else "oblique"


def _unsupported_file_message(path: Path) -> str:
    """Why ``path`` (no image suffix) is refused: what it holds when that can be told, and what to do."""
    found = sniff_image_format(path)
    supported = f"Supported: {', '.join(IMAGE_FILE_SUFFIXES)} files or a DICOM series folder."
    if found is None:
        return f"Unsupported CT file type: '{path}'. {supported}"
    return (
        f"'{path}' holds {found[0]} but its name does not say so; rename it to end with {found[1]} so that it is "
        f"read as one. {supported}"
    )


def label_mask_values(array_kji: np.ndarray) -> np.ndarray | None:
    """The distinct values of ``array_kji`` if it looks like a label mask rather than a CT, else None."""
    if array_kji.size == 0:
        return None
    low, high = array_kji.min(), array_kji.max()
    if not (LABEL_MASK_MIN_VALUE <= low and high <= LABEL_MASK_MAX_VALUE):
        return None  # air, fat or bone: a real CT returns here, before any costlier test
    offset = int(np.floor(low))
    counts = np.zeros(int(high) - offset + 1, dtype=np.int64)
    for slice_ji in array_kji:  # a slice at a time: no full-volume copy of a large mask
        if slice_ji.dtype.kind == "f" and not np.array_equal(slice_ji, np.round(slice_ji)):
            return None  # fractional values: an image, not labels
        counts += np.bincount((slice_ji.astype(np.int64) - offset).ravel(), minlength=counts.size)
    values = np.flatnonzero(counts) + offset
    return values if values.size <= LABEL_MASK_MAX_DISTINCT else None


ALLOW_NON_CT_HINT = "if this really is a CT, pass --allow-non-ct"


def check_not_label_mask(volume: CTVolume, override_hint: str = ALLOW_NON_CT_HINT) -> None:
    """Refuse a volume that looks like a label mask (see :func:`label_mask_values`) with what to give instead.

    ``override_hint`` ends the message: how this caller lets such a volume through (or why the files may be
    swapped, where nothing should let it through).
    """
    values = label_mask_values(volume.array_kji)
    if values is None:
        return
    where = f"'{volume.source}'" if volume.source else "The CT"
    shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if values.size > 8 else "")
    raise InputImageError(
        f"{where} looks like a label mask, not a CT: it holds only {values.size} whole-number value(s) ({shown}) "
        "and no air, while a CT has air near -1000 HU. Give the CT image itself (e.g. ct.nii.gz, not "
        f"label.nii.gz); {override_hint}."
    )


def check_hounsfield_units(volume: CTVolume, override_hint: str = ALLOW_NON_CT_HINT) -> None:
    """Refuse a volume without a single negative value: not a CT in Hounsfield units.

    A CT in HU has air near -1000 HU and fat near -100 HU; even one cropped to the liver has fat or noise below
    0 HU. A volume whose lowest value is 0 or more holds something else: stored values without
    RescaleSlope/RescaleIntercept (air at 0, liver near 1080), an 8-bit image windowed for display, an MR. The
    model would be shown a saturated picture and give a wrong segmentation without any sign of it.
    """
    array = volume.array_kji
    if array.size == 0 or array.min() < 0:
        return
    where = f"'{volume.source}'" if volume.source else "The CT"
    raise InputImageError(
        f"{where} does not hold Hounsfield units: its values range {array.min():g}..{array.max():g}, none below 0, "
        "while a CT in HU has air near -1000 and fat near -100. It may hold stored values without "
        "RescaleSlope/RescaleIntercept applied, or an 8-bit image windowed for display; LiverSAM would segment a "
        f"saturated picture. Convert the CT to HU (e.g. load it in 3D Slicer and save it as .nrrd); {override_hint}."
    )


# Voxel spacing of a clinical CT, in mm: well inside these bounds (in-plane 0.2-1.5, slices 0.5-10).
PLAUSIBLE_SPACING_MM = (0.1, 20.0)


def implausible_spacing_warning(volume: CTVolume) -> str | None:
    """A warning when the voxel spacing is far outside a CT's, else None (wrong units in the header?)."""
    spacing = tuple(float(v) for v in volume.geometry.spacing_mm)
    low, high = PLAUSIBLE_SPACING_MM
    if all(low <= v <= high for v in spacing):
        return None
    where = f"'{volume.source}'" if volume.source else "The CT"
    return (
        f"{where} has voxel spacing {tuple(round(v, 6) for v in spacing)} mm, outside the {low:g}..{high:g} mm of a "
        "CT: its header may give the wrong units (NIfTI xyzt_units in micrometres or metres?) or a made-up spacing. "
        "The clean-up works in mm (--min-island-mm2, --opening-mm, --closing-mm, lesion sizes), so segments may "
        "come out empty or wrong: fix the spacing (e.g. in 3D Slicer's Volumes module) and save the CT again."
    )


def _itk_message(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _finite_volume(volume: CTVolume, replace_nonfinite: float | None) -> CTVolume:
    """Refuse NaN / infinite voxels, or replace them by ``replace_nonfinite`` (logged with their count)."""
    array = volume.array_kji
    if array.dtype.kind != "f":
        return volume
    bad = ~np.isfinite(array)
    count = int(np.count_nonzero(bad))
    if count == 0:
        return volume
    where = f"'{volume.source}'" if volume.source else "The CT"
    if replace_nonfinite is None:
        raise InputImageError(
            f"{where} holds {count:,} non-finite voxel(s) (NaN or infinite) out of {array.size:,}. A CT in "
            "Hounsfield units has none: the file may be damaged or the result of a failed conversion. To "
            "segment it anyway, replace them with a value (liversam: --replace-nonfinite -1000; Python: "
            "replace_nonfinite=-1000)."
        )
    if not np.isfinite(replace_nonfinite):
        raise InputImageError(f"--replace-nonfinite must be a finite number, got {replace_nonfinite}.")
    fixed = np.where(bad, np.asarray(replace_nonfinite, dtype=array.dtype), array)
    logger.warning("%s: replaced %d non-finite voxel(s) by %g as asked", where, count, replace_nonfinite)
    metadata = dict(volume.metadata, nonfinite_replaced=count, nonfinite_value=float(replace_nonfinite))
    return CTVolume(array_kji=fixed, geometry=volume.geometry, source=volume.source, metadata=metadata)


def _single_volume(image: sitk.Image, source: str) -> sitk.Image:
    """A 4D image holding one 3D volume (size 1 on its fourth axis) as that 3D volume; several are refused."""
    if image.GetDimension() != 4:
        return image
    size = image.GetSize()
    if size[3] != 1:
        raise InputImageError(
            f"'{source}' is a 4D image holding {size[3]} 3D volumes of {size[:3]} voxels (phases or time points); "
            "LiverSAM segments one 3D CT: save the volume to segment as a file of its own (e.g. in 3D Slicer's "
            "Sequences module) and give that file."
        )
    logger.info("'%s' is a 4D image with one volume: reading it as the 3D CT %s", source, size[:3])
    return sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])


def ct_from_sitk(image: sitk.Image, source: str = "") -> CTVolume:
    """Wrap a SimpleITK image as a CTVolume, checking it is a single-component 3D image."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"'{source}' has {image.GetNumberOfComponentsPerPixel()} components per voxel (e.g. RGB). "
            "LiverSAM needs a single-channel CT in Hounsfield units."
        )
    image = _single_volume(image, source)
    if image.GetDimension() != 3:
        raise InputImageError(
            f"'{source}' is a {image.GetDimension()}D image; LiverSAM needs a 3D CT volume (at least one axial slice)."
        )
    if min(image.GetSize()) < 1:
        raise InputImageError(f"'{source}' has size {image.GetSize()}: too small to be a CT volume.")
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputImageError(
            f"'{source}' has voxel spacing {tuple(spacing)} mm; every spacing must be a positive finite number. "
            "The header is damaged; fix the spacing (e.g. in 3D Slicer's Volumes module) and save it again."
        )
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    if not (np.all(np.isfinite(direction)) and np.all(np.isfinite(origin))) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputImageError(
            f"'{source}' has a non-invertible or non-finite direction matrix {direction.ravel().round(4).tolist()} "
            f"(or origin {origin.tolist()}): its voxels cannot be placed in patient space. The header is damaged."
        )
    geometry = ImageGeometry.from_sitk(image)
    # slices of 8 x 8 voxels at least, counted on the slices it is segmented on: a CT stored in sagittal or coronal
    # slices is segmented on its axial ones (liversam.axial_orientation), so a sagittal file of 5 axial slices is a
    # CT and a single coronal image is not
    reorientation = axial_reorientation(geometry)
    in_plane = image.GetSize()[:2] if reorientation is None else reorientation.axial_geometry.size_ijk[:2]
    if min(in_plane) < 8:
        axial = "" if reorientation is None else (
            f" (stored in {reorientation.input_plane} slices, its axial slices would be {in_plane[0]} x {in_plane[1]} "
            "voxels)")
        raise InputImageError(f"'{source}' has size {image.GetSize()}{axial}: too small to be a CT volume.")
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind not in "iuf":
        raise InputImageError(f"'{source}' has voxel type {array.dtype}; expected integer or float HU values.")
    return CTVolume(array_kji=array, geometry=geometry, source=source)


def volume_to_sitk(array_kji: np.ndarray, geometry: ImageGeometry) -> sitk.Image:
    """A SimpleITK image holding ``array_kji`` with ``geometry``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    geometry.apply_to_sitk(image)
    return image
