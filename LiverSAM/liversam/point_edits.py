"""A click's edit of a slice mask: the voxels within a few millimetres of a point joined (+) or erased (-).

Numpy only (no torch): the predictor uses it after the model's answer on a slice with a box, and the web app on a
propagated slice, where a click edits the mask it shows. Why the radius and reach are 3 mm: ``liversam.predictor``.
"""

from __future__ import annotations

import numpy as np

POINT_RADIUS_MM = 3.0
POINT_REACH_MM = 3.0


def point_disk(shape_ji: tuple[int, int], point_ij: tuple[float, float], spacing_xy_mm, radius_mm: float) -> np.ndarray:
    """The voxels of a slice within ``radius_mm`` of a point (i, j) (always its own voxel when it is inside)."""
    nj, ni = shape_ji
    jj, ii = np.ogrid[:nj, :ni]
    di = (ii - point_ij[0]) * float(spacing_xy_mm[0])
    dj = (jj - point_ij[1]) * float(spacing_xy_mm[1])
    disk = di**2 + dj**2 <= radius_mm**2
    i, j = int(round(point_ij[0])), int(round(point_ij[1]))
    if 0 <= i < ni and 0 <= j < nj:
        disk[j, i] = True
    return disk


def local_changes(reference_ji: np.ndarray, changed_ji: np.ndarray, points_ij, spacing_xy_mm,
                  reach_mm: float | None = None) -> np.ndarray:
    """``reference_ji`` with the change to ``changed_ji`` taken only within ``reach_mm`` (``POINT_REACH_MM``)
    of a point: a click edits its neighbourhood; the model's changes farther away are dropped."""
    reach = POINT_REACH_MM if reach_mm is None else reach_mm
    near = np.zeros_like(reference_ji)
    for point in points_ij:
        near |= point_disk(reference_ji.shape, point, spacing_xy_mm, reach)
    out = reference_ji.copy()
    out[near] = changed_ji[near]
    return out


def honour_points(
    mask_ji: np.ndarray, positive_ij, negative_ij, spacing_xy_mm, radius_mm: float = POINT_RADIUS_MM
) -> np.ndarray:
    """The mask with a + point the model left out joined by its disk, and a - point the model kept erased with
    its disk (a - point wins). A point the model already agrees with changes nothing."""
    out = mask_ji.copy()
    nj, ni = out.shape

    def voxel(point) -> tuple[int, int] | None:
        i, j = int(round(point[0])), int(round(point[1]))
        return (j, i) if 0 <= i < ni and 0 <= j < nj else None

    for point in positive_ij:
        where = voxel(point)
        if where is not None and not mask_ji[where]:
            out |= point_disk(out.shape, point, spacing_xy_mm, radius_mm)
    for point in negative_ij:
        where = voxel(point)
        if where is not None and out[where]:
            out &= ~point_disk(out.shape, point, spacing_xy_mm, radius_mm)
    return out
