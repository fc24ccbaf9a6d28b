"""The pipeline's ``inside`` rule (a tumour is clipped to its liver) and "a later segment wins", exactly.

A scripted stand-in predictor (no model) returns the liver disc for a liver box and the *whole* box for a
tumour box, like a model that leaks: the tumour box crosses the liver's edge, so without the ``inside``
clipping the tumour would reach outside the liver. Expected masks are computed here from the phantom's
geometry, not by the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from liversam.pipeline import PipelineSettings, segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import PropagationSettings
from scripted_predictor import ScriptedPredictor, synthetic_volume

NK, NJ, NI = 12, 64, 64
LIVER_SLICES = range(2, 10)
TUMOUR_BOX = (44.0, 26.0, 58.0, 38.0)  # i 44..58, j 26..38: the liver disc ends at i = 52 on these rows


def _disc() -> np.ndarray:
    jj, ii = np.mgrid[:NJ, :NI]
    return (jj - 32) ** 2 + (ii - 32) ** 2 <= 20**2


def _box_region(box) -> np.ndarray:
    i0, j0, i1, j1 = (int(v) for v in box)
    region = np.zeros((NJ, NI), dtype=bool)
    region[j0 : j1 + 1, i0 : i1 + 1] = True
    return region


@pytest.fixture
def phantom():
    liver = np.zeros((NK, NJ, NI), dtype=bool)
    liver[list(LIVER_SLICES)] = _disc()
    hu = np.where(liver, 100, -100)
    hu[:, 26:39, 44:53] = np.where(liver[:, 26:39, 44:53], 30, -100)  # a darker lesion at the liver's edge
    return synthetic_volume(hu, (1.0, 1.0, 2.5)), liver


def _script(liver: np.ndarray):
    def predict(k: int, prompts: SlicePrompts):
        (box,) = prompts.boxes_ij
        if box[2] - box[0] > 30:  # a liver-sized box: the liver on this slice
            return liver[k], 0.95
        return _box_region(box), 0.9  # a tumour box: all of it, inside the liver or not

    return predict


def _prompts(tumour_slices, propagate: bool):
    liver_box = SlicePrompts(boxes_ij=[(10.0, 10.0, 54.0, 54.0)])
    liver = SegmentPrompts("liver", 1, slices={k: liver_box for k in LIVER_SLICES}, propagate=False)
    tumour = SegmentPrompts("tumor", 2, inside="liver", propagate=propagate,
                            slices={k: SlicePrompts(boxes_ij=[TUMOUR_BOX]) for k in tumour_slices})  # fmt: skip
    return [liver, tumour]


def test_tumour_on_prompted_slices_is_clipped_to_the_liver_and_wins_the_overlap(phantom):
    volume, liver = phantom
    predictor = ScriptedPredictor(volume, _script(liver))
    # the clipping and the overlap rule alone: without the organ's rim trim, which would take the liver's dark
    # lesion-like edge on the slices without a tumour box (test_organ_rim.py)
    result = segment_volume(volume, _prompts([4, 5, 6], propagate=False), predictor, PipelineSettings(organ_rim=None))
    expected_tumour = np.zeros_like(liver)
    expected_tumour[[4, 5, 6]] = _box_region(TUMOUR_BOX) & _disc()
    assert (expected_tumour[5] != _box_region(TUMOUR_BOX)).any(), "the box must cross the liver's edge"
    np.testing.assert_array_equal(result.segment("tumor").mask_kji, expected_tumour)
    np.testing.assert_array_equal(result.segment("liver").mask_kji, liver & ~expected_tumour)


def test_a_tumour_listed_before_its_liver_still_wins_the_overlap(phantom):
    """"A later segment wins" counts a segment after the one it is inside: listed first, the tumour was erased by
    the liver, which holds all of its voxels. The output keeps the file's order otherwise (containers first)."""
    volume, liver = phantom
    predictor = ScriptedPredictor(volume, _script(liver))
    result = segment_volume(volume, _prompts([4, 5, 6], propagate=False)[::-1], predictor,
                            PipelineSettings(organ_rim=None))
    expected_tumour = np.zeros_like(liver)
    expected_tumour[[4, 5, 6]] = _box_region(TUMOUR_BOX) & _disc()
    assert [s.name for s in result.segments] == ["liver", "tumor"]
    np.testing.assert_array_equal(result.segment("tumor").mask_kji, expected_tumour)
    np.testing.assert_array_equal(result.segment("liver").mask_kji, liver & ~expected_tumour)


def test_only_the_contained_segment_moves_in_the_overlap_rule(phantom):
    """[tumor (inside liver), spleen, liver]: the tumour counts as right after the liver, and the liver, after the
    spleen in the file, still wins their overlap."""
    volume, liver = phantom
    predictor = ScriptedPredictor(volume, _script(liver))
    spleen_box = (14.0, 20.0, 30.0, 44.0)  # inside the liver disc's box, away from the tumour's box
    spleen = SegmentPrompts("spleen", 3, slices={5: SlicePrompts(boxes_ij=[spleen_box])})
    liver_seg, tumour = _prompts([4, 5, 6], propagate=False)
    result = segment_volume(volume, [tumour, spleen, liver_seg], predictor, PipelineSettings(organ_rim=None))
    assert [s.name for s in result.segments] == ["spleen", "liver", "tumor"]
    expected_tumour = np.zeros_like(liver)
    expected_tumour[[4, 5, 6]] = _box_region(TUMOUR_BOX) & _disc()
    expected_spleen = np.zeros_like(liver)
    expected_spleen[5] = _box_region(spleen_box) & ~liver[5]  # the liver, later in the file, wins
    assert (_box_region(spleen_box) & liver[5]).any() and (_box_region(spleen_box) & ~liver[5]).any()
    np.testing.assert_array_equal(result.segment("spleen").mask_kji, expected_spleen)
    np.testing.assert_array_equal(result.segment("tumor").mask_kji, expected_tumour)
    np.testing.assert_array_equal(result.segment("liver").mask_kji, liver & ~expected_tumour)


def test_without_the_overlap_rule_the_liver_keeps_the_tumour_voxels(phantom):
    volume, liver = phantom
    predictor = ScriptedPredictor(volume, _script(liver))
    settings = PipelineSettings(later_segment_wins=False, organ_rim=None)
    result = segment_volume(volume, _prompts([5], propagate=False), predictor, settings)
    np.testing.assert_array_equal(result.segment("liver").mask_kji, liver)
    assert (result.segment("tumor").mask_kji[5] == (_box_region(TUMOUR_BOX) & _disc())).all()


def test_propagated_tumour_stays_inside_the_liver_on_every_slice(phantom):
    volume, liver = phantom
    predictor = ScriptedPredictor(volume, _script(liver))
    # Two slices each way from the seed; intensity refinement off so the predictor's leak is all there is.
    settings = PipelineSettings(propagation=PropagationSettings(intensity_refinement=False, max_slices=2,
                                                                max_growth_ratio=None))  # fmt: skip
    result = segment_volume(volume, _prompts([3], propagate=True), predictor, settings)
    tumour = result.segment("tumor").mask_kji
    assert [int(k) for k in np.flatnonzero(tumour.any(axis=(1, 2)))] == [2, 3, 4, 5]
    # The liver (the container) ends at slice 2: the tumour track stops there without predicting slice 1.
    assert result.provenance["propagation"]["tumor"].tracks[0].stop_reasons == {
        "up": "max slices", "down": "outside container"}
    calls = [(k, p) for k, p in predictor.calls if p.boxes_ij[0][2] - p.boxes_ij[0][0] <= 30]
    assert sorted(k for k, _ in calls) == [2, 3, 4, 5]
    raw = [_script(liver)(k, p)[0] for k, p in calls]
    assert all((m & ~_disc()).any() for m in raw), "the stand-in's tumour masks leak out of the liver"
    assert not (tumour & ~liver).any()
    # Each propagated slice: the box around the previous slice's (clipped) mask, grown by 2 mm (the lesion
    # margin, half the organ's 4 mm), clipped to the liver; the seed slice: the user's box clipped.
    np.testing.assert_array_equal(tumour[3], _box_region(TUMOUR_BOX) & _disc())
    clipped_box = (44.0 - 2, 26.0 - 2, 52.0 + 2, 38.0 + 2)
    np.testing.assert_array_equal(tumour[4], _box_region(clipped_box) & _disc())
    np.testing.assert_array_equal(result.segment("liver").mask_kji, liver & ~tumour)
