"""IJK <-> LPS <-> RAS conversions, checked against SimpleITK on a volume with a non-identity direction."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from liversam.geometry import ImageGeometry, lps_to_ras, ras_to_lps


def oblique_geometry() -> ImageGeometry:
    angle = np.deg2rad(30)
    # Rotation about the z axis plus a flip of the j axis: a non-identity, non-diagonal direction.
    direction = np.array([[np.cos(angle), np.sin(angle), 0], [np.sin(angle), -np.cos(angle), 0], [0, 0, 1.0]])
    return ImageGeometry(size_ijk=(40, 30, 20), spacing_mm=(0.7, 0.9, 2.5), origin_lps=(-12.0, 30.5, 100.0),
                         direction_lps=direction)


def test_ijk_to_lps_matches_simpleitk():
    geometry = oblique_geometry()
    image = sitk.Image(list(geometry.size_ijk), sitk.sitkInt16)
    geometry.apply_to_sitk(image)
    for ijk in [(0, 0, 0), (3.5, 7.25, 11), (39, 29, 19)]:
        expected = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk])
        np.testing.assert_allclose(geometry.ijk_to_lps(np.array(ijk)), expected, atol=1e-9)
    assert ImageGeometry.from_sitk(image).is_close(geometry)


def test_round_trips_and_frames_agree():
    geometry = oblique_geometry()
    ijk = np.array([[5.0, 6.0, 7.0], [0.0, 29.0, 19.0]])
    lps = geometry.ijk_to_lps(ijk)
    ras = geometry.ijk_to_ras(ijk)
    np.testing.assert_allclose(ras, lps * [-1, -1, 1])
    np.testing.assert_allclose(geometry.lps_to_ijk(lps), ijk, atol=1e-9)
    np.testing.assert_allclose(geometry.ras_to_ijk(ras), ijk, atol=1e-9)
    np.testing.assert_allclose(ras_to_lps(lps_to_ras(lps)), lps)
    homogeneous = np.c_[ijk, np.ones(2)]
    np.testing.assert_allclose((geometry.ijk_to_ras_matrix @ homogeneous.T).T[:, :3], ras, atol=1e-9)


def test_contains_and_differences():
    geometry = oblique_geometry()
    assert geometry.contains_ijk([[0, 0, 0], [39.4, 29.4, 19.4]]).all()
    assert not geometry.contains_ijk([[40.0, 0, 0]]).any()
    assert not geometry.contains_ijk([[0, -0.6, 0]]).any()
    other = ImageGeometry(size_ijk=(40, 30, 21), spacing_mm=(0.7, 0.9, 2.5), origin_lps=(-12.0, 30.5, 100.0),
                          direction_lps=geometry.direction_lps)
    assert not geometry.is_close(other)
    assert "size" in geometry.describe_difference(other)
    assert geometry.shape_kji == (20, 30, 40)
