"""A propagated lesion's gaps of one or two slices are closed; the organ is not filled.

``fill_between_slices`` is compared with a voxel-by-voxel reference written here; the pipeline is run with a
scripted stand-in predictor (no model) whose lesion mask on one slice is smaller than on the slices above and
below, so the expected masks follow from the phantom's geometry.
"""

from __future__ import annotations

import numpy as np
import pytest

from liversam.pipeline import PipelineSettings, segment_volume
from liversam.postprocess import fill_between_slices
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import LesionExtent
from scripted_predictor import ScriptedPredictor, synthetic_volume


def _reference(mask: np.ndarray, limits=None, max_gap: int = 1) -> np.ndarray:
    """A voxel is added on slice k when the mask holds it on some slice a < k and some slice b > k with at most
    ``max_gap`` slices between a and b (and the limit of slice k, if any, allows it)."""
    out = mask.copy()
    nk, nj, ni = mask.shape
    for k in range(nk):
        for j in range(nj):
            for i in range(ni):
                if mask[k, j, i] or (limits and k in limits and not limits[k][j, i]):
                    continue
                below = [a for a in range(k) if mask[a, j, i]]
                above = [b for b in range(k + 1, nk) if mask[b, j, i]]
                if below and above and min(above) - max(below) - 1 <= max_gap:
                    out[k, j, i] = True
    return out


@pytest.mark.parametrize("max_gap", [1, 2, 3])
@pytest.mark.parametrize("seed", range(30))
def test_fill_between_slices_closes_exactly_the_gaps_up_to_max_gap_slices(seed, max_gap):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(3, 12, 3))
    mask = rng.random(shape) < rng.uniform(0.05, 0.8)
    mask[: int(rng.integers(0, 3))] = False  # empty first slices: the mask's box starts further in
    before = mask.copy()
    limits = {int(k): rng.random(shape[1:]) < 0.5 for k in rng.integers(0, shape[0], int(rng.integers(0, 3)))}
    filled = fill_between_slices(mask, limits, max_gap=max_gap)
    np.testing.assert_array_equal(filled, _reference(before, limits, max_gap))
    np.testing.assert_array_equal(mask, before)  # the input is never changed


@pytest.mark.parametrize("seed", range(10))
def test_in_place_writes_the_same_result_into_the_mask(seed):
    """The organ's fill (pipeline, before its lesions) writes into the organ's own array: no second whole-volume
    mask on a large CT."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(3, 12, 3))
    mask = rng.random(shape) < 0.4
    expected = fill_between_slices(mask.copy(), max_gap=1)
    out = fill_between_slices(mask, max_gap=1, in_place=True)
    assert out is mask
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(ValueError, match="bool array"):
        fill_between_slices(np.array([[[1]], [[0]], [[1]]], dtype=np.uint8), in_place=True)


def test_nothing_to_add_returns_the_same_array_and_empty_or_thin_masks_are_kept():
    mask = np.zeros((6, 8, 8), dtype=bool)
    assert fill_between_slices(mask) is mask
    mask[2:5, 2:6, 2:6] = True  # a solid block: every voxel between two held ones is held already
    assert fill_between_slices(mask) is mask
    two = np.ones((2, 4, 4), dtype=bool)
    assert fill_between_slices(two) is two


NK, NJ, NI = 9, 48, 48
LESION_SLICES = range(2, 7)
NARROW_K = 4  # the lesion's mask on this slice is smaller than on the slices above and below


def _disc(radius: float, cj: float = 24.0, ci: float = 24.0) -> np.ndarray:
    jj, ii = np.mgrid[:NJ, :NI]
    return (jj - cj) ** 2 + (ii - ci) ** 2 <= radius**2


LIVER = _disc(18.0)


def _lesion_mask(k: int) -> np.ndarray:
    if k not in LESION_SLICES:
        return np.zeros((NJ, NI), dtype=bool)
    # off-centre so that the lesion reaches past the liver's edge on the slices that hold it fully
    return _disc(5.0 if k == NARROW_K else 7.0, 24.0, 37.0)


def _run(fill: bool, liver_slices=range(0, NK), method: str = "liversam", seed_k: int = 3,
         seed_box=(30.0, 17.0, 44.0, 31.0), negative_points=()):
    hu = np.full((NK, NJ, NI), 100.0)  # no lesion contrast: the model's masks are kept as they are
    volume = synthetic_volume(hu, (1.0, 1.0, 2.5))
    liver_slices = set(liver_slices)

    def predict(k: int, prompts: SlicePrompts):
        (box,) = prompts.boxes_ij
        if box[2] - box[0] > 30:  # the liver's box
            if k not in liver_slices:
                return np.zeros((NJ, NI), dtype=bool), 0.95
            return (_disc(16.0) if k == NARROW_K else LIVER), 0.95
        return _lesion_mask(k), 0.9

    predictor = ScriptedPredictor(volume, predict)
    liver = SegmentPrompts("liver", 1, slices={k: SlicePrompts(boxes_ij=[(6.0, 6.0, 42.0, 42.0)])
                                               for k in liver_slices}, propagate=False)  # fmt: skip
    tumour = SegmentPrompts("tumor", 2, inside="liver", propagate=True,
                            slices={seed_k: SlicePrompts(boxes_ij=[seed_box], points_neg_ij=list(negative_points))})
    # the liver's mask as its container, not with the tumour taken out ("a later segment wins" is tested elsewhere);
    # the lesion runs out of the liver, and the thin slivers the liver's outline cuts from it would lose their
    # corners to the outline-band rule (test_lesion_outline_band.py): off, so the fill is tested alone; so is the
    # shorter reach of a track whose box shows no contrast (test_lesion_extent.py): this phantom has none, and its
    # lesion is 5 slices deep for a 14 mm disc on 2.5 mm slices
    settings = PipelineSettings(fill_lesions_between_slices=fill, propagation_method=method, later_segment_wins=False,
                                lesion_outline_band=None, lesion_extent=LesionExtent(max_diameters_without_contrast=None))
    result = segment_volume(volume, [liver, tumour], predictor, settings)
    return {s.name: s.mask_kji for s in result.segments}


def test_a_lesion_slice_narrower_than_both_neighbours_takes_their_common_voxels_inside_the_liver():
    without = _run(fill=False)
    with_fill = _run(fill=True)
    liver = with_fill["liver"]
    # the organ is not filled: its narrow slice stays as predicted
    np.testing.assert_array_equal(liver[NARROW_K], _disc(16.0))
    np.testing.assert_array_equal(liver, without["liver"])
    expected = np.zeros((NK, NJ, NI), dtype=bool)
    for k in LESION_SLICES:
        expected[k] = _lesion_mask(k) & liver[k]
    np.testing.assert_array_equal(without["tumor"], expected)
    expected[NARROW_K] = _disc(7.0, 24.0, 37.0) & liver[NARROW_K]  # both neighbours hold the wider disc
    np.testing.assert_array_equal(with_fill["tumor"], expected)
    assert with_fill["tumor"][NARROW_K].sum() > without["tumor"][NARROW_K].sum()
    assert not (with_fill["tumor"] & ~liver).any()


def test_on_the_slice_the_user_prompted_voxels_are_added_only_inside_the_user_s_box():
    # The lesion seeded by a box around its narrow slice's mask: the neighbours' wider disc is added only
    # inside that box.
    seed_box = (32.0, 19.0, 42.0, 29.0)  # i 32..42, j 19..29: the narrow disc's bounding box
    without = _run(fill=False, seed_k=NARROW_K, seed_box=seed_box)
    with_fill = _run(fill=True, seed_k=NARROW_K, seed_box=seed_box)
    liver = with_fill["liver"][NARROW_K]
    np.testing.assert_array_equal(without["tumor"][NARROW_K], _lesion_mask(NARROW_K) & liver)
    box = np.zeros((NJ, NI), dtype=bool)
    box[19:30, 32:43] = True
    expected = (_lesion_mask(NARROW_K) | (_disc(7.0, 24.0, 37.0) & box)) & liver
    np.testing.assert_array_equal(with_fill["tumor"][NARROW_K], expected)
    assert expected.sum() > without["tumor"][NARROW_K].sum()
    assert (with_fill["tumor"][NARROW_K + 1] & ~box).any(), "the neighbours' disc reaches beyond the box"


def test_on_the_user_s_slice_nothing_is_added_near_a_negative_point():
    negative = (35.0, 30.0)  # on the wider disc's rim, outside the narrow disc, inside the liver
    with_fill = _run(fill=True, seed_k=NARROW_K, negative_points=[negative])
    liver = with_fill["liver"][NARROW_K]
    jj, ii = np.mgrid[:NJ, :NI]
    near = (ii - negative[0]) ** 2 + (jj - negative[1]) ** 2 <= 3.0**2  # POINT_REACH_MM at 1 mm pixels
    expected = (_lesion_mask(NARROW_K) | (_disc(7.0, 24.0, 37.0) & ~near)) & liver
    np.testing.assert_array_equal(with_fill["tumor"][NARROW_K], expected)
    assert (_disc(7.0, 24.0, 37.0) & near & ~_lesion_mask(NARROW_K) & liver).any(), "the point must matter"


def test_the_naive_reference_loop_is_not_filled():
    naive = _run(fill=True, method="naive")
    assert naive["tumor"][NARROW_K].sum() == (_lesion_mask(NARROW_K) & naive["liver"][NARROW_K]).sum()
    assert naive["tumor"][NARROW_K - 1].sum() > naive["tumor"][NARROW_K].sum()
