"""Windowing works on a copy; model-input mapping and its inverse are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liversam.preprocess import SliceTransform, WindowSettings, window_slice
from liversam.volume import CTVolume


def test_window_maps_hu_and_leaves_source_untouched():
    hu = np.array([[-1000, -160, 40], [240, 1000, 0]], dtype=np.int16)
    before = hu.copy()
    out = window_slice(hu, WindowSettings(level=40, width=400))
    np.testing.assert_array_equal(hu, before)
    np.testing.assert_allclose(out, [[0, 0, 0.5], [1, 1, 0.4]], atol=1e-6)
    with pytest.raises(ValueError):
        WindowSettings(width=0)


def test_ct_volume_array_is_read_only(lits117_volume):
    with pytest.raises(ValueError):
        lits117_volume.array_kji[0, 0, 0] = 5


def test_clahe_changes_contrast_but_keeps_range():
    rng = np.random.default_rng(0)
    hu = rng.normal(60, 20, size=(64, 64)).astype(np.float32)
    plain = window_slice(hu, WindowSettings())
    equalised = window_slice(hu, WindowSettings(clahe=True))
    assert equalised.min() >= 0 and equalised.max() <= 1
    assert equalised.std() > plain.std()


@pytest.mark.parametrize("shape", [(128, 128), (100, 150), (512, 512)])
def test_coordinates_round_trip_and_mask_inverse(shape):
    transform = SliceTransform(slice_shape=shape, input_size=256)
    points = np.array([[0.0, 0.0], [shape[1] - 1.0, shape[0] - 1.0], [17.25, 33.5]])
    np.testing.assert_allclose(transform.model_to_voxel(transform.voxel_to_model(points)), points, atol=1e-9)
    # A rectangle pushed into the model frame and back lands on the same voxels.
    mask = np.zeros(shape, dtype=bool)
    mask[20:60, 30:90] = True
    low_res = transform.mask_to_low_res(mask, low_res_size=256)
    back = transform.logits_to_slice(low_res)[0, 0].numpy() > 0
    assert (back == mask).mean() > 0.995
    box = transform.box_to_model((30, 20, 89, 59))
    assert box[0] < box[2] and box[1] < box[3]


def test_model_input_normalisation():
    transform = SliceTransform(slice_shape=(100, 150), input_size=256)
    image = np.linspace(0.2, 0.7, 100 * 150, dtype=np.float32).reshape(100, 150)
    x = transform.image_to_input(image, "minmax")
    h, w = transform.resized_shape
    assert x.shape == (1, 3, 256, 256) and (h, w) == (171, 256)
    assert torch.isclose(x[..., :h, :w].min(), torch.tensor(0.0)) and torch.isclose(x.max(), torch.tensor(1.0))
    assert float(x[..., h:, :].abs().sum()) == 0.0  # padding is zero
    constant = np.full((100, 150), 0.5, dtype=np.float32)
    sam = transform.image_to_input(constant, "sam")
    expected = (127.5 - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    np.testing.assert_allclose(sam[0, :, 50, 50].numpy(), expected, atol=1e-4)


def test_volume_rejects_wrong_shapes(lits117_volume):
    with pytest.raises(ValueError):
        CTVolume(array_kji=np.zeros((4, 4), np.int16), geometry=lits117_volume.geometry)
