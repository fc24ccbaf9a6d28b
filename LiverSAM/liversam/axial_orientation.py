"""A CT stored in sagittal or coronal slices, seen as axial slices without interpolation.

The model was trained on axial slices, and boxes are drawn on axial slices. A CT whose slices are sagittal or
coronal (its k axis along L-R or A-P: reformatted series) but whose three voxel axes each lie within
``MAX_AXIS_ANGLE_DEG`` of a patient axis is turned into an axial grid by permuting (and flipping) its voxel array
and adjusting its origin, spacing and direction: every voxel keeps its value and its physical (LPS) position,
only the order in which the voxels are stored changes. The axial grid runs like a DICOM axial series: i towards
the patient's left (L), j towards posterior (P), k towards superior (S), each within the same angle of it.

:func:`axial_reorientation` says how (or None for a CT already axial, and for an oblique CT whose axes do not
each follow a patient axis: those keep their own slices); :func:`reorient_to_axial` applies it to a
:class:`CTVolume`. :class:`AxialReorientation` maps arrays on the axial grid back to the input's grid (every
output of ``liversam segment`` is written on the input's grid, so it overlays the input file) and voxel indices
(IJK) between the two grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .geometry import ImageGeometry
from .segmentation import Segment, SegmentationResult
from .volume import CTVolume

__all__ = ["MAX_AXIS_ANGLE_DEG", "AxialReorientation", "axial_reorientation", "reorient_to_axial"]

# How far (degrees) each voxel axis may lean from the patient axis it is taken for. cos(25 deg) = 0.906, about the
# 0.9 that ``ct_io.slice_plane_name`` asks of a slice normal to call the slices axial, coronal or sagittal.
MAX_AXIS_ANGLE_DEG = 25.0

PLANE_OF_NORMAL = ("sagittal", "coronal", "axial")  # slices whose normal (k axis) runs along L-R, A-P, S-I
PATIENT_AXIS = ("L-R", "A-P", "S-I")


@dataclass(frozen=True)
class AxialReorientation:
    """How an input grid becomes the axial grid: axial axis ``m`` (0 = i, 1 = j, 2 = k) is input axis
    ``axes[m]``, reversed when ``flips[m]``. The voxel at input IJK ``p`` is the voxel at axial IJK ``q`` with
    ``q[m] = p[axes[m]]``, or ``size[axes[m]] - 1 - p[axes[m]]`` when flipped; both lie at the same LPS point."""

    input_geometry: ImageGeometry
    axial_geometry: ImageGeometry
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @property
    def input_plane(self) -> str:
        """The input's slice plane: 'sagittal' or 'coronal'."""
        return PLANE_OF_NORMAL[self.axes.index(2)]

    def describe(self) -> str:
        """One line for the log: what was done, and that it is lossless."""
        ni, nj, nk = self.input_geometry.size_ijk
        ai, aj, ak = self.axial_geometry.size_ijk
        return (
            f"the CT is stored in {self.input_plane} slices ({ni} x {nj} x {nk}, its k axis along "
            f"{PATIENT_AXIS[self.axes.index(2)]}): segmented on its axial slices ({ai} x {aj} x {ak}), reoriented "
            "losslessly (voxels permuted, no interpolation); every output is written on the CT's own grid"
        )

    # --- arrays [k, j, i] ------------------------------------------------------------------------------
    def to_axial(self, array_kji: np.ndarray) -> np.ndarray:
        """An array on the input grid [k, j, i] as a C-contiguous array on the axial grid (a copy)."""
        array = np.asarray(array_kji)
        if tuple(array.shape) != self.input_geometry.shape_kji:
            raise ValueError(
                f"array shape {array.shape} is not the input grid's {self.input_geometry.shape_kji}"
            )
        # numpy axis n holds IJK axis 2 - n: axial numpy axis 2 - m is input numpy axis 2 - axes[m]
        out = np.transpose(array, [2 - self.axes[2 - n] for n in range(3)])
        flipped = tuple(2 - m for m in range(3) if self.flips[m])
        return np.ascontiguousarray(np.flip(out, axis=flipped) if flipped else out)

    def to_input(self, array_kji: np.ndarray) -> np.ndarray:
        """An array on the axial grid [k, j, i] as a C-contiguous array on the input grid (a copy)."""
        array = np.asarray(array_kji)
        if tuple(array.shape) != self.axial_geometry.shape_kji:
            raise ValueError(
                f"array shape {array.shape} is not the axial grid's {self.axial_geometry.shape_kji}"
            )
        flipped = tuple(2 - m for m in range(3) if self.flips[m])
        unflipped = np.flip(array, axis=flipped) if flipped else array
        # input numpy axis 2 - a is axial numpy axis 2 - m where axes[m] == a
        return np.ascontiguousarray(np.transpose(unflipped, [2 - self.axes.index(2 - n) for n in range(3)]))

    # --- voxel indices (..., 3) as (i, j, k), continuous --------------------------------------------------
    def input_ijk_to_axial_ijk(self, points_ijk: np.ndarray) -> np.ndarray:
        p = np.asarray(points_ijk, dtype=float)
        size = self.input_geometry.size_ijk
        columns = [
            (size[a] - 1) - p[..., a] if flip else p[..., a]
            for a, flip in zip(self.axes, self.flips, strict=True)
        ]
        return np.stack(columns, axis=-1)

    def axial_ijk_to_input_ijk(self, points_ijk: np.ndarray) -> np.ndarray:
        q = np.asarray(points_ijk, dtype=float)
        size = self.input_geometry.size_ijk
        out = np.empty_like(q)
        for m, (a, flip) in enumerate(zip(self.axes, self.flips, strict=True)):
            out[..., a] = (size[a] - 1) - q[..., m] if flip else q[..., m]
        return out

    # --- results --------------------------------------------------------------------------------------------
    def result_to_input(self, result: SegmentationResult) -> SegmentationResult:
        """A segmentation made on the axial grid, on the input's grid (what is written: it overlays the input
        file). Per-slice scores are left out (they number axial slices); the provenance records the
        reorientation."""
        if not result.geometry.is_close(self.axial_geometry, tolerance_mm=1e-3):
            raise ValueError(
                "the segmentation is not on the axial grid of this reorientation: "
                + result.geometry.describe_difference(self.axial_geometry)
            )
        segments = [
            Segment(name=seg.name, label=seg.label, mask_kji=self.to_input(seg.mask_kji), color=seg.color)
            for seg in result.segments
        ]
        provenance = {
            key: value for key, value in result.provenance.items() if key not in ("before_crf", "propagation")
        }
        provenance["segmented_on"] = f"axial slices (the {self.input_plane} CT reoriented losslessly)"
        return SegmentationResult(geometry=self.input_geometry, segments=segments, provenance=provenance)


def _dominant_axis(column: np.ndarray, min_cos: float) -> int | None:
    """The patient axis (0 = L-R, 1 = A-P, 2 = S-I) a voxel axis runs along within the angle, else None."""
    unit = np.abs(column) / max(float(np.linalg.norm(column)), 1e-12)
    axis = int(np.argmax(unit))
    return axis if unit[axis] >= min_cos else None


def axial_reorientation(
    geometry: ImageGeometry, max_angle_deg: float = MAX_AXIS_ANGLE_DEG
) -> AxialReorientation | None:
    """How to store ``geometry``'s voxels as axial slices, or None when its k axis already runs along S-I (axial
    slices, kept as they are) or when its axes do not each run along a different patient axis within
    ``max_angle_deg`` (an oblique CT: kept as it is)."""
    direction = np.asarray(geometry.direction_lps, dtype=float)
    min_cos = math.cos(math.radians(max_angle_deg))
    dominant = [_dominant_axis(direction[:, a], min_cos) for a in range(3)]
    if None in dominant or sorted(dominant) != [0, 1, 2]:
        return None
    if dominant[2] == 2:
        return None
    axes = tuple(dominant.index(m) for m in range(3))
    flips = tuple(bool(direction[m, axes[m]] < 0) for m in range(3))
    size = geometry.size_ijk
    # the axial grid's voxel (0, 0, 0) is the input voxel at the start of each kept axis and the end of each flipped one
    corner = np.zeros(3)
    for m in range(3):
        if flips[m]:
            corner[axes[m]] = size[axes[m]] - 1
    new_direction = np.stack([(-1.0 if flips[m] else 1.0) * direction[:, axes[m]] for m in range(3)], axis=1)
    axial = ImageGeometry(
        size_ijk=tuple(size[a] for a in axes),
        spacing_mm=tuple(geometry.spacing_mm[a] for a in axes),
        origin_lps=tuple(geometry.ijk_to_lps(corner)),
        direction_lps=new_direction,
    )
    return AxialReorientation(input_geometry=geometry, axial_geometry=axial, axes=axes, flips=flips)


def reorient_to_axial(volume: CTVolume) -> tuple[CTVolume, AxialReorientation | None]:
    """``volume`` on its axial grid with the reorientation, or ``volume`` itself and None when it is axial or
    oblique (see :func:`axial_reorientation`). The input's array is not changed; the axial array is a copy."""
    reorientation = axial_reorientation(volume.geometry)
    if reorientation is None:
        return volume, None
    metadata = dict(volume.metadata, reoriented_from=reorientation.input_plane)
    axial = CTVolume(
        array_kji=reorientation.to_axial(volume.array_kji),
        geometry=reorientation.axial_geometry,
        source=volume.source,
        metadata=metadata,
    )
    return axial, reorientation
