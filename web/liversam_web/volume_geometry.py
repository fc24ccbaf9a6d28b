"""Coordinate conversions between the web app's MRML volume (RAS) and the LiverSAM server (IJK, LPS).

Conventions: arrays are indexed ``[k, j, i]``; ``ijk_to_ras`` is the volume node's 4x4 IJKToRAS matrix;
the server wants spacing ``(i, j, k)`` mm, the LPS position of voxel (0, 0, 0) and a 3x3 direction matrix
whose columns are the i, j, k axes in LPS (row-major when flattened). RAS -> LPS flips the first two axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ServerGeometry:
    spacing: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    direction_lps: tuple[float, ...]  # 9 values, row-major; columns are the i, j, k axes


def server_geometry(ijk_to_ras: np.ndarray) -> ServerGeometry:
    """The server's geometry (spacing, LPS origin and direction) of a volume with this IJKToRAS matrix."""
    matrix = np.asarray(ijk_to_ras, dtype=float)
    axes_ras = matrix[:3, :3]
    spacing = np.linalg.norm(axes_ras, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"the volume has a zero voxel spacing {spacing.tolist()}")
    direction_lps = RAS_TO_LPS @ (axes_ras / spacing)
    origin_lps = RAS_TO_LPS @ matrix[:3, 3]
    return ServerGeometry(
        spacing=tuple(float(s) for s in spacing),
        origin_lps=tuple(float(v) for v in origin_lps),
        direction_lps=tuple(float(v) for v in direction_lps.ravel()),
    )


def ras_to_ijk(ijk_to_ras: np.ndarray, ras: Sequence[float]) -> np.ndarray:
    """Continuous voxel index (i, j, k) of a RAS point (voxel centres at integers)."""
    point = np.append(np.asarray(ras, dtype=float), 1.0)
    return (np.linalg.inv(np.asarray(ijk_to_ras, dtype=float)) @ point)[:3]


def ijk_to_ras(ijk_to_ras_matrix: np.ndarray, ijk: Sequence[float]) -> np.ndarray:
    """RAS position of a (continuous) voxel index (i, j, k)."""
    point = np.append(np.asarray(ijk, dtype=float), 1.0)
    return (np.asarray(ijk_to_ras_matrix, dtype=float) @ point)[:3]


class PromptOutsideVolume(ValueError):
    """A box or point the user drew does not touch the volume."""


def box_on_slice(
    ijk_to_ras_matrix: np.ndarray, ras_a: Sequence[float], ras_b: Sequence[float], shape_kji: Sequence[int]
) -> tuple[int, tuple[float, float, float, float]]:
    """A box dragged between two RAS corners in a k-plane -> (slice k, (i0, j0, i1, j1)) clipped to the volume.

    Raises PromptOutsideVolume (with a message for the user) when the box misses the volume, lies on no
    single slice k (the view is not axial to the volume) or has no area.
    """
    nk, nj, ni = (int(s) for s in shape_kji)
    a = ras_to_ijk(ijk_to_ras_matrix, ras_a)
    b = ras_to_ijk(ijk_to_ras_matrix, ras_b)
    if abs(a[2] - b[2]) > 0.5:
        raise PromptOutsideVolume(
            "the box is not on one axial slice of the volume (draw boxes in the axial view, the red one)"
        )
    k = int(round((a[2] + b[2]) / 2))
    if not 0 <= k < nk:
        raise PromptOutsideVolume(f"the box is on slice {k}, outside the volume (slices 0 to {nk - 1})")
    i0, i1 = sorted((a[0], b[0]))
    j0, j1 = sorted((a[1], b[1]))
    # voxel centres are integers: the volume covers [-0.5, n - 0.5] on each axis
    if i1 < -0.5 or i0 > ni - 0.5 or j1 < -0.5 or j0 > nj - 0.5:
        raise PromptOutsideVolume("the box lies outside the image: draw it on the CT")
    i0, i1 = max(i0, 0.0), min(i1, ni - 1.0)
    j0, j1 = max(j0, 0.0), min(j1, nj - 1.0)
    if i1 - i0 < 2 or j1 - j0 < 2:
        raise PromptOutsideVolume("the box is too small (under 2 voxels wide or high): drag a larger box")
    return k, (float(i0), float(j0), float(i1), float(j1))


def point_on_volume(
    ijk_to_ras_matrix: np.ndarray, ras: Sequence[float], shape_kji: Sequence[int]
) -> tuple[int, tuple[float, float]]:
    """A clicked RAS point -> (slice k, (i, j)); PromptOutsideVolume when it is not on the CT."""
    nk, nj, ni = (int(s) for s in shape_kji)
    i, j, k = ras_to_ijk(ijk_to_ras_matrix, ras)
    kk = int(round(k))
    if not (0 <= kk < nk and -0.5 <= i <= ni - 0.5 and -0.5 <= j <= nj - 0.5):
        raise PromptOutsideVolume("the point lies outside the image: click on the CT")
    return kk, (float(np.clip(i, 0, ni - 1)), float(np.clip(j, 0, nj - 1)))


def slice_plane(ijk_to_ras_matrix: np.ndarray) -> str:
    """The anatomical plane of the volume's slices (k = const): "axial", "coronal" or "sagittal", after the axis
    (S, A or R) closest to the k axis. LiverSAM prompts and propagates on the k slices, which must be axial."""
    k_axis = np.abs(np.asarray(ijk_to_ras_matrix, dtype=float)[:3, 2])
    return ("sagittal", "coronal", "axial")[int(np.argmax(k_axis))]


def slice_centre_ras(ijk_to_ras_matrix: np.ndarray, k: int, shape_kji: Sequence[int]) -> np.ndarray:
    """RAS centre of slice k (where the views jump to for a review row)."""
    _, nj, ni = (int(s) for s in shape_kji)
    return ijk_to_ras(ijk_to_ras_matrix, ((ni - 1) / 2.0, (nj - 1) / 2.0, float(k)))
