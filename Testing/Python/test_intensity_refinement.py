"""Intensity refinement on constructed slices: parenchyma estimate, lesion contrast, lesion and organ masks."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from conftest import dice
from liversam.intensity_refinement import (
    fit_lesion_contrast,
    parenchyma_statistics,
    prune_foreign_tissue,
    refine_slice_mask,
    smooth_slice,
)


def _disk(shape, centre, radius):
    jj, ii = np.mgrid[: shape[0], : shape[1]]
    return (jj - centre[0]) ** 2 + (ii - centre[1]) ** 2 <= radius**2


def test_parenchyma_is_the_mode_even_with_many_lesion_voxels() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(120, 15, 7000), rng.normal(60, 15, 3000)])  # 30 % lesion
    mode, sd = parenchyma_statistics(values)
    assert abs(mode - 120) <= 4, mode  # the mean would be 102
    assert 10 <= sd <= 20, sd


def test_lesion_contrast_polarity_and_threshold() -> None:
    rng = np.random.default_rng(1)
    hypo_box = np.concatenate([rng.normal(120, 8, 600), rng.normal(60, 8, 400)])
    contrast = fit_lesion_contrast(hypo_box, 120.0, 15.0)
    assert contrast is not None and contrast.polarity == -1
    assert abs(contrast.lesion_hu - 60) <= 6 and abs(contrast.threshold_hu - 90) <= 4
    # Fat at the liver's edge is far darker than the lesion: not lesion-like.
    assert contrast.lesion_like(np.array([[50.0, 130.0, -90.0]])).tolist() == [[True, False, False]]

    hyper_box = np.concatenate([rng.normal(120, 8, 600), rng.normal(190, 8, 400)])
    contrast = fit_lesion_contrast(hyper_box, 120.0, 15.0)
    assert contrast is not None and contrast.polarity == 1 and contrast.threshold_hu > 140

    # A box of plain parenchyma has no lesion contrast: the model's mask is then used as it is.
    assert fit_lesion_contrast(rng.normal(120, 8, 1000), 120.0, 15.0) is None


def test_refine_slice_mask_keeps_the_lesion_the_model_touches() -> None:
    shape = (96, 96)
    liver = _disk(shape, (48, 48), 44)
    lesion = _disk(shape, (40, 40), 12)
    other = _disk(shape, (70, 70), 6)  # another dark spot inside the box, which the model's mask misses
    hu = np.where(liver, 120.0, -80.0)
    hu[lesion] = 60.0
    hu[other] = 60.0
    smoothed = smooth_slice(hu)
    contrast = fit_lesion_contrast(smoothed[20:80, 20:80][liver[20:80, 20:80]], 120.0, 15.0)
    assert contrast is not None
    lesion_like = contrast.lesion_like(smoothed) & liver
    box = (20.0, 20.0, 79.0, 79.0)
    # The model segmented much of the liver in the box (the failure the refinement exists for) but not the
    # other spot.
    model = np.zeros(shape, dtype=bool)
    model[20:64, 20:64] = True
    refined = refine_slice_mask(model, lesion_like, box)
    assert dice(refined, lesion) >= 0.95
    assert not (refined & other).any()
    # The other spot is kept when it continues the previous slice's lesion.
    continued = refine_slice_mask(model, lesion_like, box, previous_ji=other)
    assert dice(continued, lesion | other) >= 0.95
    # Nothing lesion-like in the box: an empty mask (the track then ends).
    assert not refine_slice_mask(model, np.zeros(shape, dtype=bool), box).any()


def test_prune_foreign_tissue_cuts_the_kidney_and_keeps_vessels_and_lesions() -> None:
    shape = (100, 120)
    liver = _disk(shape, (50, 40), 32)
    vessel = _disk(shape, (50, 40), 4)
    lesion = _disk(shape, (38, 30), 7)
    kidney = _disk(shape, (50, 88), 18) & ~liver
    kidney_medulla = _disk(shape, (50, 88), 11)
    hu = np.full(shape, -90.0)
    hu[liver] = 118.0
    hu[vessel] = 190.0  # an enhanced vessel inside the liver
    hu[lesion] = 60.0  # a hypodense lesion, part of the liver
    hu[kidney] = 210.0  # enhanced cortex
    hu[kidney_medulla] = 115.0  # as grey as the liver
    model = liver | _disk(shape, (50, 88), 18)  # the model ran into the touching kidney
    previous = liver
    pruned = prune_foreign_tissue(model, smooth_slice(hu), (118.0, 15.0), previous)
    assert dice(pruned, liver) >= 0.98
    assert not (pruned & kidney_medulla).any()
    assert pruned[vessel].all() and pruned[lesion].all()
    assert not (pruned & ~model).any()


def test_prune_keeps_the_piece_that_continues_the_organ_not_the_largest() -> None:
    # The dome of a thick-slice liver: the model's mask holds the shrinking liver and, beside it, a larger
    # piece of heart with the liver's attenuation that barely touches the previous slice's liver.
    shape = (100, 120)
    liver_now = _disk(shape, (50, 30), 12)
    heart = _disk(shape, (50, 75), 20)
    previous_liver = _disk(shape, (50, 30), 18) | _disk(shape, (50, 58), 6)  # overlaps a little of the heart
    hu = np.full(shape, -90.0)
    hu[liver_now | heart] = 110.0
    model = liver_now | heart
    assert heart.sum() > liver_now.sum()
    pruned = prune_foreign_tissue(model, smooth_slice(hu), (110.0, 15.0), previous_liver)
    assert dice(pruned, liver_now) >= 0.98
    assert not (pruned & heart).any()
    # A piece that lies mostly on the previous slice's organ is kept as well (a lobe split from the rest).
    lobe = _disk(shape, (85, 30), 6)
    hu[lobe] = 110.0
    pruned = prune_foreign_tissue(model | lobe, smooth_slice(hu), (110.0, 15.0), previous_liver | lobe)
    assert pruned[lobe].mean() >= 0.9 and not (pruned & heart).any()
    # Nothing overlaps the previous slice's organ: the largest piece is the organ.
    pruned = prune_foreign_tissue(model, smooth_slice(hu), (110.0, 15.0), np.zeros(shape, dtype=bool))
    assert dice(pruned, heart) >= 0.98


def test_a_lesion_keeps_only_what_is_connected_to_its_prompted_slice() -> None:
    from liversam.propagation import connected_to_slice

    mask = np.zeros((6, 10, 10), dtype=bool)
    mask[1:4, 2:5, 2:5] = True  # the lesion through slices 1..3
    mask[4, 3:5, 3:5] = True  # continues diagonally onto slice 4 (26-connected)
    mask[3, 8:10, 8:10] = True  # a speck on slice 3 that does not touch it
    kept = connected_to_slice(mask, 2)
    expected = mask.copy()
    expected[3, 8:10, 8:10] = False
    assert np.array_equal(kept, expected)
    assert np.array_equal(connected_to_slice(mask, 0), mask)  # nothing on the slice: unchanged


def test_noise_estimate_picks_the_median_window() -> None:
    from liversam.intensity_refinement import estimate_noise_hu, median_size_for_noise

    rng = np.random.default_rng(2)
    shape = (80, 80)
    organ = _disk(shape, (40, 40), 35)
    ramp = np.linspace(0, 40, shape[1])[None, :]  # slow anatomy-like variation does not count as noise
    for sd, size in ((5.0, 3), (12.0, 3), (28.0, 5), (45.0, 7)):
        image = 100.0 + ramp + rng.normal(0, sd, shape)
        noise = estimate_noise_hu([image], [organ])
        assert abs(noise - sd) <= 0.1 * sd + 0.5, (sd, noise)
        assert median_size_for_noise(noise) == size
    assert estimate_noise_hu([np.zeros(shape)], [np.zeros(shape, dtype=bool)]) == 0.0


def test_smoothing_a_region_equals_smoothing_the_slice_there() -> None:
    rng = np.random.default_rng(4)
    image = rng.normal(100, 20, (60, 70)).astype(np.int16)
    region = np.zeros(image.shape, dtype=bool)
    region[0:12, 30:45] = True  # touches the image border
    region[20, 50] = True
    for size in (3, 5):
        full = smooth_slice(image, size)
        part = smooth_slice(image, size, within=region)
        np.testing.assert_array_equal(part[0:21, 30:51], full[0:21, 30:51])  # the region's bounding box
        assert np.isnan(part[30:, :]).all() and np.isnan(part[:, :30]).all()
    assert np.isnan(smooth_slice(image, 3, within=np.zeros(image.shape, dtype=bool))).all()
    assert image.dtype == np.int16  # the input is never modified


def test_thin_noisy_slices_smooth_across_their_neighbours() -> None:
    from liversam.intensity_refinement import THIN_SLICE_MM, median_window_for_noise

    assert median_window_for_noise(12.0, 1.0) == (1, 3)  # a 3 x 3 median is enough: in-plane as before
    assert median_window_for_noise(28.0, 1.0) == (3, 3)  # would be 5 x 5
    assert median_window_for_noise(33.0, 1.0) == (3, 3)  # would be 7 x 7: 27 samples are enough
    assert median_window_for_noise(35.0, 1.0) == (3, 5)
    assert median_window_for_noise(45.0, THIN_SLICE_MM) == (3, 5)  # would be 7 x 7
    assert median_window_for_noise(28.0, 5.0) == (1, 5)  # thick slices: neighbours are other anatomy
    assert median_window_for_noise(45.0, 3.0) == (1, 7)


def test_smoothing_across_slices_equals_a_3d_median_of_the_volume() -> None:
    from liversam.intensity_refinement import smooth_slice_in_volume

    rng = np.random.default_rng(5)
    volume = rng.normal(100, 25, (6, 40, 50)).astype(np.int16)
    before = volume.copy()
    region = np.zeros(volume.shape[1:], dtype=bool)
    region[0:10, 20:35] = True  # touches the border
    region[25, 44] = True
    outside = np.ones(region.shape, dtype=bool)
    outside[0:26, 20:45] = False  # the region's bounding box
    for window in ((3, 3), (3, 5)):
        for stack in (volume, volume[:1], volume[:2]):
            full = ndimage.median_filter(stack.astype(np.float32), size=(window[0], window[1], window[1]),
                                         mode="nearest")  # fmt: skip
            for k in sorted({0, min(2, len(stack) - 1), len(stack) - 1}):  # the ends repeat, as "nearest" does
                part = smooth_slice_in_volume(stack, k, window, within=region)
                np.testing.assert_array_equal(part[0:26, 20:45], full[k, 0:26, 20:45])
                assert np.isnan(part[outside]).all()
                np.testing.assert_array_equal(smooth_slice_in_volume(stack, k, window), full[k])  # within=None
    np.testing.assert_array_equal(smooth_slice_in_volume(volume, 3, (1, 5), region), smooth_slice(volume[3], 5, region))
    assert np.array_equal(volume, before)  # read, never modified


def test_a_thin_lobe_of_a_noisy_lesion_survives_smoothing_across_slices() -> None:
    """A hypodense lesion with a 2-voxel-wide lobe, the same on 5 thin slices, 28 HU of noise: thresholded
    half-way, the 3 x 3 x 3 median keeps the lobe that the 5 x 5 median (the same noise reduction) takes away."""
    from liversam.intensity_refinement import smooth_slice_in_volume

    rng = np.random.default_rng(6)
    shape = (60, 60)
    lesion = _disk(shape, (30, 22), 10)
    lesion[29:31, 30:52] = True  # the lobe: 2 voxels wide, 22 long
    volume = np.where(lesion, 60.0, 120.0)[None].repeat(5, axis=0) + rng.normal(0, 28, (5, *shape))
    lobe = np.zeros(shape, dtype=bool)
    lobe[29:31, 34:52] = True
    flat = smooth_slice(volume[2], 5) < 90.0
    across = smooth_slice_in_volume(volume, 2, (3, 3)) < 90.0
    assert (across & lobe).sum() >= 0.8 * lobe.sum()
    assert (flat & lobe).sum() <= 0.5 * lobe.sum()
    assert (across & ~lesion).sum() <= 0.01 * (~lesion).sum()  # and the noise is taken out as well
