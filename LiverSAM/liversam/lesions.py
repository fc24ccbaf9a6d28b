"""Lesions: one connected-component id per tumour, and the per-lesion table (volume, diameter, extent, centre)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .atomic_write import write_text_atomically
from .errors import OutputError
from .geometry import ImageGeometry
from .segmentation import SegmentationResult
from .terminology import is_tumour_name


@dataclass
class Lesion:
    lesion_id: int
    segment: str
    volume_ml: float
    longest_axial_diameter_mm: float
    slice_first: int
    slice_last: int
    centre_lps: tuple[float, float, float]
    voxels: int


def label_lesions(mask_kji: np.ndarray) -> tuple[np.ndarray, int]:
    """3D connected components (26-connectivity): lesion ids 1..n, ordered by decreasing size."""
    labels, n = ndimage.label(np.asarray(mask_kji, bool), structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return labels.astype(np.int32), 0
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    return remap[labels], int(n)


def longest_axial_diameter_mm(mask_kji: np.ndarray, spacing_ijk: tuple[float, float, float]) -> float:
    """Largest in-plane distance (mm) between two voxel centres of the mask on any one axial slice."""
    best = 0.0
    si, sj = spacing_ijk[0], spacing_ijk[1]
    for k in np.nonzero(mask_kji.any(axis=(1, 2)))[0]:
        js, is_ = np.nonzero(mask_kji[k])
        points = np.c_[is_ * si, js * sj].astype(float)
        if len(points) >= 3:
            try:
                points = points[ConvexHull(points).vertices]
            except QhullError:  # collinear points: all of them are candidates
                pass
        if len(points) >= 2:
            d = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)).max()
            best = max(best, float(d))
    return best


def lesion_table_from_mask(mask_kji: np.ndarray, geometry: ImageGeometry, segment: str = "tumor") -> list[Lesion]:
    labels, n = label_lesions(mask_kji)
    lesions = []
    voxel_ml = geometry.voxel_volume_mm3 / 1000.0
    for lesion_id in range(1, n + 1):
        component = labels == lesion_id
        ks, js, is_ = np.nonzero(component)
        centre_ijk = np.array([is_.mean(), js.mean(), ks.mean()])
        lesions.append(Lesion(
            lesion_id=lesion_id,
            segment=segment,
            volume_ml=round(float(len(ks) * voxel_ml), 4),
            longest_axial_diameter_mm=round(longest_axial_diameter_mm(component, geometry.spacing_mm), 2),
            slice_first=int(ks.min()),
            slice_last=int(ks.max()),
            centre_lps=tuple(round(float(v), 2) for v in geometry.ijk_to_lps(centre_ijk)),
            voxels=int(len(ks)),
        ))
    return lesions


def lesion_table(result: SegmentationResult, segment_names: tuple[str, ...] | None = None) -> list[Lesion]:
    """The lesion table of every tumour segment (by name, :func:`is_tumour_name`, or every segment that is
    ``inside`` another)."""
    inside = result.provenance.get("inside") or {}
    names = segment_names or tuple(s.name for s in result.segments if is_tumour_name(s.name) or inside.get(s.name))
    table: list[Lesion] = []
    for seg in result.segments:
        if seg.name in names:
            table.extend(lesion_table_from_mask(seg.mask_kji, result.geometry, seg.name))
    return table


def write_lesion_table(lesions: list[Lesion], path: str | Path) -> Path:
    """Write the table as ``.csv`` or ``.json`` (atomically)."""
    path = Path(path)
    rows = [asdict(lesion) for lesion in lesions]
    if path.suffix.lower() == ".json":
        return write_text_atomically(path, json.dumps(rows, indent=2))
    if path.suffix.lower() != ".csv":
        raise OutputError(f"Lesion table '{path}': use a .csv or .json file name.")
    buffer = io.StringIO()
    fields = ["lesion_id", "segment", "volume_ml", "longest_axial_diameter_mm", "slice_first", "slice_last",
              "centre_lps", "voxels"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        row["centre_lps"] = " ".join(str(v) for v in row["centre_lps"])
        writer.writerow(row)
    return write_text_atomically(path, buffer.getvalue())
