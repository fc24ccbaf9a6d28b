"""Checks on a CT + label pair that need only file headers, run before the model is loaded.

``evaluate`` and ``train`` read labelled cases; a truncated file or a label on another grid than its CT
should be refused at once, not after minutes of model loading and encoding.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputImageError
from .geometry import ImageGeometry
from .image_integrity import check_image_file


def header_geometry(path: Path) -> ImageGeometry | None:
    """The grid in an image file's header (no voxels read); None when the image is not 3D."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputImageError(f"Cannot read the image file '{path}' (not a supported image, or damaged).") from exc
    if reader.GetDimension() != 3:
        return None
    return ImageGeometry(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def check_label_pair(case_id: str, ct_path: str | Path, label_path: str | Path) -> None:
    """Both files complete, and the label on the CT's grid (DICOM folders are checked when read)."""
    geometries = {}
    for kind, path in (("CT", Path(ct_path)), ("label", Path(label_path))):
        if path.is_dir():
            continue
        check_image_file(path)
        geometries[kind] = header_geometry(path)
    ct, label = geometries.get("CT"), geometries.get("label")
    if ct is not None and label is not None and not label.is_close(ct, tolerance_mm=1e-2):
        raise InputImageError(
            f"Case '{case_id}': label '{label_path}' is not on the grid of CT '{ct_path}': "
            f"{label.describe_difference(ct)}. Resample the label onto the CT first."
        )
