"""clean_volume works on the mask's bounding box (memory on large CTs) with exactly the whole-volume result."""

from __future__ import annotations

import numpy as np
import pytest

from liversam.postprocess import (
    Postprocess3DSettings,
    bounding_box,
    clean_volume,
    fill_holes,
    keep_largest_component,
    remove_small_components,
)

SETTINGS = [
    Postprocess3DSettings(fill_holes=True, keep_largest=True),
    Postprocess3DSettings(fill_holes=True, keep_largest=False, min_island_mm3=3.0),
    Postprocess3DSettings(),
]


def _whole_volume(mask, settings):
    out = keep_largest_component(mask) if settings.keep_largest else mask.copy()
    out = remove_small_components(out, (1.0, 1.0, 1.0), settings.min_island_mm3)
    return fill_holes(out) if settings.fill_holes else out


@pytest.mark.parametrize("seed", range(60))
def test_cropped_clean_up_equals_the_whole_volume_one(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(8, 16, 3))
    mask = rng.random(shape) < rng.uniform(0.05, 0.7)
    if seed % 3 == 0:  # one object with holes away from the border
        mask[:] = False
        mask[2:7, 1:7, 2:8] = rng.random((5, 6, 6)) < 0.85
    for settings in SETTINGS:
        expected = _whole_volume(mask, settings)
        np.testing.assert_array_equal(clean_volume(mask, (1.0, 1.0, 1.0), settings), expected)
        own = mask.copy()  # in place: the same result written into the caller's array, no second volume
        assert clean_volume(own, (1.0, 1.0, 1.0), settings, in_place=True) is own
        np.testing.assert_array_equal(own, expected)
    with pytest.raises(ValueError, match="bool array"):
        clean_volume(mask.astype(np.uint8), (1.0, 1.0, 1.0), SETTINGS[0], in_place=True)


def test_bounding_box():
    mask = np.zeros((5, 6, 7), dtype=bool)
    assert bounding_box(mask) is None
    mask[1, 2, 3] = mask[3, 4, 2] = True
    assert bounding_box(mask) == (slice(1, 4), slice(2, 5), slice(2, 4))
