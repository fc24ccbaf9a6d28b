"""Fix-and-re-propagate: the Slicer client's planning (``LiverSAMLib.ServerRequests``) and the core's
``repropagate`` that the server runs for a planned fix.

Planning compares what the last propagation was computed from (prompts, voxels, settings) with what the user
has now; the settings compared are equal but separately built dicts, as in the module, where each run builds
them afresh from the widgets. The re-propagation runs on a scripted stand-in predictor (no model).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from liversam.pipeline import PipelineSettings, segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import REPROPAGATION_MAX_REACH, PropagationSettings, for_lesions, repropagate
from LiverSAMLib.ServerRequests import plan_repropagation, record_of
from scripted_predictor import ScriptedPredictor, box_around, rect, synthetic_volume

NK, NJ, NI = 16, 64, 64
SQUARE = rect((NJ, NI), 20, 20, 16, 16)
SMALL = rect((NJ, NI), 24, 24, 8, 8)


def _settings(**changes) -> dict:
    """The propagation settings as the module sends them, built afresh for each run (refinement off here)."""
    return {"min_score": 0.5, "box_margin_mm": 4.0, "intensity_refinement": False, "max_slices": None, **changes}


def _core_settings() -> PipelineSettings:
    return PipelineSettings(propagation=PropagationSettings(intensity_refinement=False))


@pytest.fixture
def first_run():
    volume = synthetic_volume(np.full((NK, NJ, NI), 100.0), (1.0, 1.0, 2.5))
    predictor = ScriptedPredictor(volume, {k: (SQUARE, 0.9) for k in range(2, 14)})
    given = {4: SlicePrompts(boxes_ij=[box_around(SQUARE)]), 10: SlicePrompts(boxes_ij=[box_around(SQUARE)])}
    seg = SegmentPrompts("liver", 1, slices=copy.deepcopy(given), propagate=True)
    result = segment_volume(volume, [seg], predictor, _core_settings())
    record = record_of(given, ("node1", 7), _settings(), "session-1", "liver")
    return volume, predictor, given, seg, result, record


def test_record_holds_a_copy_of_what_the_run_was_computed_from(first_run):
    *_, given, _, result, record = first_run
    assert [int(k) for k in np.flatnonzero(result.segment("liver").mask_kji.any(axis=(1, 2)))] == list(range(2, 14))
    assert record.given == given and record.given is not given and record.given[4] is not given[4]
    assert record.volume_key == ("node1", 7) and record.settings == _settings()
    assert (record.session, record.mask_name) == ("session-1", "liver")


def test_equal_settings_built_again_allow_a_local_fix(first_run):
    *_, given, _, _, record = first_run
    assert plan_repropagation(record, dict(given), ("node1", 7), _settings()) == []
    fixed = {**given, 7: SlicePrompts(points_neg_ij=[(30.0, 30.0)])}
    assert plan_repropagation(record, fixed, ("node1", 7), _settings()) == [7]
    moved = {**fixed, 10: SlicePrompts(boxes_ij=[(20.0, 20.0, 30.0, 35.0)])}
    assert plan_repropagation(record, moved, ("node1", 7), _settings()) == [7, 10]


@pytest.mark.parametrize(
    "changed",
    [{"min_score": 0.6}, {"box_margin_mm": 2.0}, {"intensity_refinement": True}, {"max_slices": 20},
     {"closing_mm": 2.0}],
)
def test_any_changed_setting_needs_a_full_propagation(first_run, changed):
    *_, given, _, _, record = first_run
    fixed = {**given, 7: SlicePrompts(points_neg_ij=[(30.0, 30.0)])}
    assert plan_repropagation(record, fixed, ("node1", 7), _settings(**changed)) is None


def test_other_voxels_a_removed_seed_or_no_record_need_a_full_propagation(first_run):
    *_, given, _, _, record = first_run
    fixed = {**given, 7: SlicePrompts(points_neg_ij=[(30.0, 30.0)])}
    assert plan_repropagation(record, fixed, ("node1", 8), _settings()) is None
    assert plan_repropagation(record, fixed, ("node2", 7), _settings()) is None
    assert plan_repropagation(record, {10: given[10], 7: fixed[7]}, ("node1", 7), _settings()) is None
    assert plan_repropagation(None, fixed, ("node1", 7), _settings()) is None


def test_prompts_edited_in_place_after_the_run_are_seen_as_changed(first_run):
    # The module keeps editing its prompt objects: the record must hold a copy, not the same objects.
    *_, given, _, _, record = first_run
    given[10].boxes_ij[0] = (22.0, 22.0, 33.0, 33.0)
    assert plan_repropagation(record, given, ("node1", 7), _settings()) == [10]


def test_a_planned_fix_changes_only_its_stretch(first_run):
    volume, predictor, given, seg, result, record = first_run
    existing = result.segment("liver").mask_kji.copy()
    # On slice 7 the user fixes the mask with a smaller box; the model now returns the small square
    # on slices 5..9 (between the user's slices 4 and 10) if asked. The fix reaches one slice each way
    # (REPROPAGATION_MAX_REACH): 6..8 are predicted and replaced, 5 and 9 stay.
    fixed = {**given, 7: SlicePrompts(boxes_ij=[box_around(SMALL)])}
    assert plan_repropagation(record, fixed, ("node1", 7), _settings()) == [7]
    predictor.script = {k: (SMALL if 5 <= k <= 9 else SQUARE, 0.8) for k in range(2, 14)}
    predictor.calls.clear()
    outcome = repropagate(existing, copy.deepcopy(seg), 7, fixed[7], predictor,
                          PropagationSettings(intensity_refinement=False))  # fmt: skip
    assert REPROPAGATION_MAX_REACH == 1
    assert sorted(set(predictor.predicted_slices)) == [6, 7, 8]
    np.testing.assert_array_equal(outcome.mask_kji[6:9], np.broadcast_to(SMALL, (3, NJ, NI)))
    untouched = [k for k in range(NK) if not 6 <= k <= 8]
    np.testing.assert_array_equal(outcome.mask_kji[untouched], existing[untouched])
    assert outcome.scores[7] == pytest.approx(0.8)


def test_a_fix_inside_a_container_with_the_lesion_rules_stops_on_a_lesion_leak_and_stays_inside(first_run):
    # The server re-propagates a segment with a container (a tumour) with ``for_lesions``: a mean-HU change of
    # 50 HU stops it (lesions: 40 HU), where the organ rules (80 HU) would go on.
    _, _, given, seg, result, _ = first_run
    hu = np.full((NK, NJ, NI), 100.0)
    hu[7:] = 150.0  # from the fix's upper neighbour on (a fix reaches one slice each way)
    volume = synthetic_volume(hu, (1.0, 1.0, 2.5))
    container = np.zeros((NK, NJ, NI), dtype=bool)
    container[:, 18:34, 18:34] = True  # the square minus its last 2 rows and columns
    existing = result.segment("liver").mask_kji & container
    fix = SlicePrompts(boxes_ij=[box_around(SQUARE)])
    organ_rules = PropagationSettings(intensity_refinement=False)

    def fix_with(rules: PropagationSettings):
        predictor = ScriptedPredictor(volume, {k: (SQUARE, 0.9) for k in range(2, 14)})
        outcome = repropagate(existing, copy.deepcopy(seg), 6, fix, predictor, rules, container_kji=container)
        assert not (outcome.mask_kji & ~container).any()
        np.testing.assert_array_equal(outcome.mask_kji[5:8], np.broadcast_to(SQUARE & container[0], (3, NJ, NI)))
        return outcome, sorted(set(predictor.predicted_slices))

    lesion, lesion_slices = fix_with(for_lesions(organ_rules))
    assert lesion.tracks[-1].stop_reasons["up"] == "leak: mean HU moved +50 from the seed's"
    assert lesion_slices == [5, 6, 7]
    organ, organ_slices = fix_with(organ_rules)
    assert organ_slices == [5, 6, 7]
    assert organ.tracks[-1].stop_reasons["up"] == "reached limit"  # the organ rules allow +50 HU
