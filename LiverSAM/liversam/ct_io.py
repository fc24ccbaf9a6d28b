"""Reading CT volumes from NRRD, NIfTI, MHA files or a DICOM series folder into a :class:`CTVolume`.

Geometry (spacing, origin, direction) is kept as stored, in LPS. HU values are kept as stored; for DICOM,
RescaleSlope / RescaleIntercept are applied by the reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputImageError
from .geometry import ImageGeometry
from .volume import CTVolume

IMAGE_FILE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")


def has_image_suffix(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_FILE_SUFFIXES)


def read_ct(
    path: str | Path,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    series_number: int | None = None,
    resample_irregular: bool = False,
) -> CTVolume:
    """Read a CT volume from a file or a DICOM folder.

    Raises :class:`InputImageError` naming the path and what is wrong: missing path, unsupported format,
    not 3D, more than one component per voxel (RGB), unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"CT not found: '{path}'. Give an existing .nrrd/.nii/.nii.gz/.mha file or a DICOM folder.")
    if path.is_dir():
        from .dicom_series import read_dicom_series  # local import: DICOM needs pydicom

        return read_dicom_series(
            path,
            series_uid=series_uid,
            series_number=series_number,
            allow_non_ct=allow_non_ct,
            resample_irregular=resample_irregular,
        )
    if not has_image_suffix(path):
        raise InputImageError(
            f"Unsupported CT file type: '{path}'. Supported: {', '.join(IMAGE_FILE_SUFFIXES)} or a DICOM series folder."
        )
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputImageError(f"Cannot read CT file '{path}': {str(exc).strip().splitlines()[-1]}") from exc
    return ct_from_sitk(image, source=str(path))


def ct_from_sitk(image: sitk.Image, source: str = "") -> CTVolume:
    """Wrap a SimpleITK image as a CTVolume, checking it is a single-component 3D image."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"'{source}' has {image.GetNumberOfComponentsPerPixel()} components per voxel (e.g. RGB). "
            "LiverSAM needs a single-channel CT in Hounsfield units."
        )
    if image.GetDimension() != 3:
        raise InputImageError(
            f"'{source}' is a {image.GetDimension()}D image; LiverSAM needs a 3D CT volume (at least one axial slice)."
        )
    if min(image.GetSize()) < 1 or image.GetSize()[0] < 8 or image.GetSize()[1] < 8:
        raise InputImageError(f"'{source}' has size {image.GetSize()}: too small to be a CT volume.")
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind not in "iuf":
        raise InputImageError(f"'{source}' has voxel type {array.dtype}; expected integer or float HU values.")
    return CTVolume(array_kji=array, geometry=ImageGeometry.from_sitk(image), source=source)


def volume_to_sitk(array_kji: np.ndarray, geometry: ImageGeometry) -> sitk.Image:
    """A SimpleITK image holding ``array_kji`` with ``geometry``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    geometry.apply_to_sitk(image)
    return image
