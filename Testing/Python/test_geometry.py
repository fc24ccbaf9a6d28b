"""IJK <-> LPS <-> RAS conversions, checked against SimpleITK on a volume with a non-identity direction."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_contains_ijk_edges_per_axis_and_tolerance():
    geometry = oblique_geometry()  # 40 x 30 x 20 voxels
    inside = geometry.contains_ijk([[-0.5, -0.5, -0.5], [39.5, 29.5, 19.5], [20, 15, 10]])
    assert inside.tolist() == [True, True, True]
    for axis, top in enumerate((39.5, 29.5, 19.5)):  # each axis on its own: one bad coordinate is enough
        low, high = np.full(3, 5.0), np.full(3, 5.0)
        low[axis], high[axis] = -0.5001, top + 0.0001
        assert geometry.contains_ijk([low, high]).tolist() == [False, False]
    assert geometry.contains_ijk([39.2, 0, 0]).shape == (1,)
    assert geometry.contains_ijk([[39.2, 0, 0], [-0.2, 0, 0]], tolerance=0.0).tolist() == [False, False]
    assert geometry.contains_ijk([[39.0, 29.0, 19.0], [0, 0, 0]], tolerance=0.0).tolist() == [True, True]


def test_is_close_tolerances():
    geometry = oblique_geometry()

    def moved(**kwargs) -> ImageGeometry:
        values = {"size_ijk": geometry.size_ijk, "spacing_mm": geometry.spacing_mm,
                  "origin_lps": geometry.origin_lps, "direction_lps": geometry.direction_lps, **kwargs}
        return ImageGeometry(**values)

    assert geometry.is_close(moved(origin_lps=(-12.0005, 30.5, 100.0)))
    assert not geometry.is_close(moved(origin_lps=(-12.002, 30.5, 100.0)))
    assert geometry.is_close(moved(origin_lps=(-12.002, 30.5, 100.0)), tolerance_mm=0.01)
    assert geometry.is_close(moved(spacing_mm=(0.7005, 0.9, 2.5)))
    assert not geometry.is_close(moved(spacing_mm=(0.702, 0.9, 2.5)))
    assert geometry.is_close(moved(spacing_mm=(0.702, 0.9, 2.5)), tolerance_mm=0.01)
    turned = geometry.direction_lps.copy()
    turned[0, 0] += 1e-4
    assert not geometry.is_close(moved(direction_lps=turned))
    assert not geometry.is_close(moved(direction_lps=turned), tolerance_mm=1.0), "direction has its own tolerance"
    turned[0, 0] = geometry.direction_lps[0, 0] + 1e-6
    assert geometry.is_close(moved(direction_lps=turned))


def test_describe_difference_names_each_difference():
    geometry = oblique_geometry()
    assert geometry.describe_difference(geometry) == "identical"
    other = ImageGeometry((40, 30, 21), (0.7, 0.9, 3.0), (-12.0, 30.5, 101.0), np.eye(3))
    assert geometry.describe_difference(other) == (
        "size (40, 30, 20) vs (40, 30, 21); spacing (0.7, 0.9, 2.5) vs (0.7, 0.9, 3.0) mm; "
        "origin (-12.0, 30.5, 100.0) vs (-12.0, 30.5, 101.0) (LPS mm); direction matrices differ"
    )
    near = ImageGeometry((40, 30, 20), (0.7005, 0.9, 2.5), (-12.0005, 30.5, 100.0), geometry.direction_lps)
    assert geometry.describe_difference(near) == "identical"
    assert geometry.describe_difference(
        ImageGeometry((40, 30, 20), (0.702, 0.9, 2.5), (-12.0, 30.5, 100.0), geometry.direction_lps)
    ) == "spacing (0.7, 0.9, 2.5) vs (0.702, 0.9, 2.5) mm"
    assert geometry.describe_difference(
        ImageGeometry((40, 30, 20), (0.7, 0.9, 2.5), (-12.0, 30.502, 100.0), geometry.direction_lps)
    ) == "origin (-12.0, 30.5, 100.0) vs (-12.0, 30.502, 100.0) (LPS mm)"


def test_constructor_normalises_types_and_shapes():
    geometry = ImageGeometry(np.array([4, 3, 2]), np.array([1, 2, 3]), [1, 2, 3], direction_lps=list(range(9)))
    assert geometry.size_ijk == (4, 3, 2) and all(type(v) is int for v in geometry.size_ijk)
    assert geometry.spacing_mm == (1.0, 2.0, 3.0) and all(type(v) is float for v in geometry.spacing_mm)
    assert geometry.origin_lps == (1.0, 2.0, 3.0) and all(type(v) is float for v in geometry.origin_lps)
    assert geometry.direction_lps.shape == (3, 3) and geometry.direction_lps.dtype == float
    assert geometry.direction_lps[1, 0] == 3.0  # row by row
    assert geometry.voxel_volume_mm3 == 6.0
    np.testing.assert_array_equal(ImageGeometry((1, 1, 1), (1, 1, 1), (0, 0, 0)).direction_lps, np.eye(3))


def test_conversions_of_integer_points_and_simpleitk_size_check():
    geometry = oblique_geometry()
    np.testing.assert_allclose(geometry.lps_to_ijk(geometry.ijk_to_lps(np.array([3, 4, 5]))), [3, 4, 5])
    assert lps_to_ras(np.array([1, 2, 3])).dtype == float and ras_to_lps([1, 2, 3]).tolist() == [-1.0, -2.0, 3.0]
    image = sitk.Image([40, 30, 19], sitk.sitkInt16)
    with pytest.raises(ValueError, match=r"image size \(40, 30, 19\) does not match geometry size \(40, 30, 20\)"):
        geometry.apply_to_sitk(image)
    read = ImageGeometry.from_sitk(sitk.Image([2, 2, 2], sitk.sitkInt16))
    assert read.direction_lps.shape == (3, 3) and read.size_ijk == (2, 2, 2)
