"""RAS <-> IJK <-> LPS conversions of the web app, and the box / point checks behind its messages."""

from __future__ import annotations

import numpy as np
import pytest

from liversam_web.volume_geometry import (
    PromptOutsideVolume,
    box_on_slice,
    ijk_to_ras,
    point_on_volume,
    ras_to_ijk,
    server_geometry,
    slice_centre_ras,
)

# A typical NIfTI CT as Slicer loads it: i runs to patient left (-R), j to posterior (-A), k up; 0.7/0.7/2.5 mm
IJK_TO_RAS = np.array([
    [-0.7, 0.0, 0.0, 180.0],
    [0.0, -0.7, 0.0, 200.0],
    [0.0, 0.0, 2.5, -300.0],
    [0.0, 0.0, 0.0, 1.0],
])
SHAPE = (40, 64, 80)  # k, j, i


def test_server_geometry_is_lps():
    geometry = server_geometry(IJK_TO_RAS)
    assert geometry.spacing == pytest.approx((0.7, 0.7, 2.5))
    assert geometry.origin_lps == pytest.approx((-180.0, -200.0, -300.0))  # RAS (180, 200, -300) in LPS
    direction = np.array(geometry.direction_lps).reshape(3, 3)
    assert direction == pytest.approx(np.eye(3))  # i -> L, j -> P, k -> S: identity in LPS
    # the server's own voxel -> LPS map agrees with RAS -> LPS of the web app's voxel -> RAS map
    ijk = np.array([10.0, 20.0, 5.0])
    lps = np.array(geometry.origin_lps) + direction @ (ijk * np.array(geometry.spacing))
    assert lps == pytest.approx(np.diag([-1, -1, 1]) @ ijk_to_ras(IJK_TO_RAS, ijk))


def test_ras_ijk_round_trip_and_oblique_matrix():
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = IJK_TO_RAS.copy()
    matrix[:3, :3] = rotation @ IJK_TO_RAS[:3, :3]
    ijk = np.array([3.5, 60.0, 12.0])
    assert ras_to_ijk(matrix, ijk_to_ras(matrix, ijk)) == pytest.approx(ijk)
    geometry = server_geometry(matrix)
    assert geometry.spacing == pytest.approx((0.7, 0.7, 2.5))
    direction = np.array(geometry.direction_lps).reshape(3, 3)
    assert direction.T @ direction == pytest.approx(np.eye(3))


def test_box_on_slice_clips_to_the_volume_and_sorts_corners():
    a = ijk_to_ras(IJK_TO_RAS, (70.0, 50.0, 12.0))
    b = ijk_to_ras(IJK_TO_RAS, (-10.0, 5.0, 12.2))  # partly left of the image
    k, box = box_on_slice(IJK_TO_RAS, a, b, SHAPE)
    assert k == 12
    assert box == pytest.approx((0.0, 5.0, 70.0, 50.0))


@pytest.mark.parametrize("corners, message", [
    (((-30.0, 5.0, 12.0), (-5.0, 30.0, 12.0)), "outside the image"),
    (((5.0, 5.0, 45.0), (30.0, 30.0, 45.0)), "outside the volume"),
    (((5.0, 5.0, 3.0), (30.0, 30.0, 9.0)), "not on one axial slice"),
    (((5.0, 5.0, 3.0), (6.0, 30.0, 3.0)), "too small"),
])
def test_box_outside_or_degenerate_is_refused(corners, message):
    a, b = (ijk_to_ras(IJK_TO_RAS, c) for c in corners)
    with pytest.raises(PromptOutsideVolume, match=message):
        box_on_slice(IJK_TO_RAS, a, b, SHAPE)


def test_point_on_volume():
    k, (i, j) = point_on_volume(IJK_TO_RAS, ijk_to_ras(IJK_TO_RAS, (10.2, 20.7, 3.1)), SHAPE)
    assert (k, i, j) == (3, pytest.approx(10.2), pytest.approx(20.7))
    with pytest.raises(PromptOutsideVolume):
        point_on_volume(IJK_TO_RAS, ijk_to_ras(IJK_TO_RAS, (100.0, 20.0, 3.0)), SHAPE)


def test_slice_centre():
    centre = slice_centre_ras(IJK_TO_RAS, 7, SHAPE)
    assert ras_to_ijk(IJK_TO_RAS, centre) == pytest.approx((39.5, 31.5, 7.0))
