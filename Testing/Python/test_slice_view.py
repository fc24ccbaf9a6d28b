"""The model sees every axial slice in the radiological display, however the scan stores it.

The oracle for each stored orientation is SimpleITK: ``PermuteAxes`` and ``Flip`` re-store an image without moving it
in space (they rewrite the direction matrix), so the viewed slice of every re-stored copy must be the original's
slice, and a prediction on a re-stored copy must be the original's prediction, re-stored the same way.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from liversam.geometry import ImageGeometry
from liversam.preprocess import SliceTransform, SliceView, display_view
from liversam.prompts import SlicePrompts
from liversam.volume import CTVolume

# the eight ways to store an axial slice: (swap i and j, flip i, flip j) applied by SimpleITK
STORED = list(itertools.product([False, True], repeat=3))


def _restored(image: sitk.Image, swap: bool, flip_i: bool, flip_j: bool) -> sitk.Image:
    out = sitk.PermuteAxes(image, [1, 0, 2]) if swap else image
    return sitk.Flip(out, [flip_i, flip_j, False])


def _image(array_kji: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((-100.0, 50.0, 300.0))
    return image  # direction: identity (DICOM's axial storage)


def _volume(image: sitk.Image) -> CTVolume:
    geometry = ImageGeometry(image.GetSize(), image.GetSpacing(), image.GetOrigin(),
                             np.asarray(image.GetDirection()).reshape(3, 3))
    return CTVolume(array_kji=sitk.GetArrayFromImage(image), geometry=geometry)


@pytest.mark.parametrize(("swap", "flip_i", "flip_j"), STORED)
def test_every_stored_orientation_is_viewed_as_the_dicom_slice(swap: bool, flip_i: bool, flip_j: bool) -> None:
    rng = np.random.default_rng(1)
    original = rng.integers(-100, 200, size=(3, 7, 11)).astype(np.int16)  # [k, j, i], not square
    restored = _restored(_image(original), swap, flip_i, flip_j)
    volume = _volume(restored)
    view = display_view(volume.geometry.direction_lps)
    assert view.is_identity == (not (swap or flip_i or flip_j))
    for k in range(3):
        np.testing.assert_array_equal(view.to_view(volume.array_kji[k]), original[k])
        np.testing.assert_array_equal(view.from_view(original[k]), volume.array_kji[k])


def test_a_scan_stored_in_sagittal_slices_is_left_as_stored() -> None:
    sagittal = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # k runs left-right
    assert display_view(sagittal).is_identity


@pytest.mark.parametrize("view", [SliceView(*flags) for flags in STORED])
def test_coordinates_boxes_and_masks_round_trip_through_every_view(view: SliceView) -> None:
    shape = (100, 150)
    transform = SliceTransform(slice_shape=shape, input_size=256, view=view)
    points = np.array([[0.0, 0.0], [149.0, 99.0], [17.25, 33.5]])
    np.testing.assert_allclose(transform.model_to_voxel(transform.voxel_to_model(points)), points, atol=1e-9)
    mask = np.zeros(shape, dtype=bool)
    mask[20:60, 30:90] = True
    back = transform.logits_to_slice(transform.mask_to_low_res(mask, low_res_size=256))[0, 0].numpy() > 0
    assert back.shape == shape and (back == mask).mean() > 0.995
    x0, y0, x1, y1 = transform.box_to_model((30, 20, 89, 59))
    assert x0 < x1 and y0 < y1
    corners = transform.model_to_voxel(np.array([[x0, y0], [x1, y1]]))
    np.testing.assert_allclose(np.sort(corners[:, 0]), [30, 89], atol=1e-9)
    np.testing.assert_allclose(np.sort(corners[:, 1]), [20, 59], atol=1e-9)


@pytest.mark.parametrize("view", [SliceView(*flags) for flags in STORED])
def test_a_voxel_s_coordinates_follow_it_into_the_view_on_a_non_square_slice(view: SliceView) -> None:
    shape = (7, 11)  # (nj, ni): a transposing view makes it 11 x 7
    for i, j in [(0, 0), (10, 6), (3, 5), (9, 1)]:
        image = np.zeros(shape)
        image[j, i] = 1.0
        y, x = np.argwhere(view.to_view(image))[0]
        np.testing.assert_array_equal(view.points_to_view(np.array([i, j]), shape), [x, y])
        np.testing.assert_array_equal(view.points_from_view(np.array([x, y]), shape), [i, j])


@pytest.mark.parametrize(("swap", "flip_i", "flip_j"), [(False, True, False), (False, False, True), (True, True, False)])
def test_a_re_stored_scan_gets_the_original_s_masks(litemedsam, lits117_volume, lits117_label, swap, flip_i,
                                                    flip_j) -> None:
    from conftest import box_of
    from liversam.predictor import SlicePredictor

    k = 64
    ks = slice(k - 1, k + 2)
    original = _image(np.ascontiguousarray(lits117_volume.array_kji[ks]))
    label = _image(np.ascontiguousarray(lits117_label[ks].astype(np.uint8)))
    box = box_of(lits117_label[k] > 0)
    reference = SlicePredictor(litemedsam, _volume(original)).predict(1, SlicePrompts(boxes_ij=[box]))
    restored = _restored(original, swap, flip_i, flip_j)
    stored_label = sitk.GetArrayFromImage(_restored(label, swap, flip_i, flip_j))[1] > 0
    prediction = SlicePredictor(litemedsam, _volume(restored)).predict(1, SlicePrompts(boxes_ij=[box_of(stored_label)]))
    view = display_view(np.asarray(restored.GetDirection()).reshape(3, 3))
    np.testing.assert_array_equal(view.to_view(prediction.mask_ji), reference.mask_ji)
    assert prediction.score == pytest.approx(reference.score, abs=1e-6)
    assert reference.mask_ji.sum() > 0.8 * (lits117_label[k] > 0).sum()  # a real liver mask, not an empty one
