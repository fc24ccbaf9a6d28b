"""Fix-and-re-propagate planning (``LiverSAMLib.ModelSession``) on records made from real propagation runs.

The records come from :func:`record_from_result` on a pipeline result (a scripted stand-in predictor on a
synthetic volume, no model), and the settings compared are equal but separately built objects, as in the
module, where each run builds its ``PipelineSettings`` afresh from the widgets.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest

from liversam.pipeline import segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import PropagationSettings
from LiverSAMLib.ModelSession import (
    SessionSettings,
    core_postprocess_settings,
    plan_repropagation,
    record_from_result,
    repropagate_segment,
)
from scripted_predictor import ScriptedPredictor, box_around, rect, synthetic_volume

NK, NJ, NI = 16, 64, 64
SQUARE = rect((NJ, NI), 20, 20, 16, 16)
SMALL = rect((NJ, NI), 24, 24, 8, 8)


def _settings(**kwargs):
    """A fresh ``PipelineSettings`` as the module builds one for each run (intensity refinement off here)."""
    return core_postprocess_settings(propagation=PropagationSettings(intensity_refinement=False), **kwargs)


@pytest.fixture
def first_run():
    volume = synthetic_volume(np.full((NK, NJ, NI), 100.0), (1.0, 1.0, 2.5))
    predictor = ScriptedPredictor(volume, {k: (SQUARE, 0.9) for k in range(2, 14)})
    given = {4: SlicePrompts(boxes_ij=[box_around(SQUARE)]), 10: SlicePrompts(boxes_ij=[box_around(SQUARE)])}
    seg = SegmentPrompts("liver", 1, slices=copy.deepcopy(given), propagate=True)
    result = segment_volume(volume, [seg], predictor, _settings())
    record = record_from_result(result, seg, given, ("node1", 7), _settings())
    return volume, predictor, given, seg, result, record


def test_record_holds_what_the_run_computed(first_run):
    _, _, given, seg, result, record = first_run
    segment = result.segment("liver")
    assert [int(k) for k in np.flatnonzero(segment.mask_kji.any(axis=(1, 2)))] == list(range(2, 14))
    assert record.scores == segment.slice_scores and sorted(record.scores) == list(range(2, 14))
    assert [t.seed_k for t in record.tracks] == [4, 10]
    assert record.given == given and record.given is not given
    assert record.segment_prompts == seg and record.segment_prompts is not seg
    assert record.volume_key == ("node1", 7) and record.settings == _settings()


def test_equal_settings_built_again_allow_a_local_fix(first_run):
    *_, given, _, _, record = first_run
    assert plan_repropagation(record, dict(given), ("node1", 7), _settings()) == []
    fixed = {**given, 7: SlicePrompts(points_neg_ij=[(30.0, 30.0)])}
    assert plan_repropagation(record, fixed, ("node1", 7), _settings()) == [7]
    moved = {**fixed, 10: SlicePrompts(boxes_ij=[(20.0, 20.0, 30.0, 35.0)])}
    assert plan_repropagation(record, moved, ("node1", 7), _settings()) == [7, 10]


@pytest.mark.parametrize(
    "changed",
    [
        {"closing_mm": 2.0},
        {"keep_largest": False},
        {"min_island_mm3": 50.0},
        {"propagation": PropagationSettings(intensity_refinement=False, min_score=0.6)},
        {"propagation": PropagationSettings()},  # intensity refinement back on
    ],
)
def test_any_changed_setting_needs_a_full_propagation(first_run, changed):
    *_, given, _, _, record = first_run
    settings = core_postprocess_settings(**{"propagation": PropagationSettings(intensity_refinement=False),
                                            **changed})  # fmt: skip
    fixed = {**given, 7: SlicePrompts(points_neg_ij=[(30.0, 30.0)])}
    assert plan_repropagation(record, fixed, ("node1", 7), settings) is None


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


class _Session:
    """What ``repropagate_segment`` needs of a ``ModelSession``: a predictor and a prefetch pause."""

    def __init__(self, predictor) -> None:
        self._predictor = predictor
        self.paused = 0

    def predictor(self, volume, volume_key, settings):
        return self._predictor

    @contextlib.contextmanager
    def prefetch_paused(self):
        self.paused += 1
        yield


def test_a_planned_fix_changes_only_its_stretch_and_gives_a_record_that_plans_again(first_run):
    volume, predictor, given, _, result, record = first_run
    existing = result.segment("liver").mask_kji.copy()
    # On slice 7 the user fixes the mask with a smaller box; the model now returns the small square
    # on slices 5..9 (between the user's slices 4 and 10) if asked.
    fixed = {**given, 7: SlicePrompts(boxes_ij=[box_around(SMALL)])}
    plan = plan_repropagation(record, fixed, ("node1", 7), _settings())
    assert plan == [7]
    predictor.script = {k: (SMALL if 5 <= k <= 9 else SQUARE, 0.8) for k in range(2, 14)}
    predictor.calls.clear()
    session = _Session(predictor)
    outcome = repropagate_segment(session, SessionSettings(), volume, ("node1", 7), record, fixed, plan, existing,
                                  "liver")  # fmt: skip
    assert session.paused == 1
    assert outcome.changed_slices == [5, 6, 7, 8, 9] and outcome.k_range == (5, 9)
    assert sorted(set(outcome.computed_slices)) == [5, 6, 7, 8, 9]
    mask = outcome.result.segment("liver").mask_kji
    np.testing.assert_array_equal(mask[5:10], np.broadcast_to(SMALL, (5, NJ, NI)))
    untouched = [k for k in range(NK) if not 5 <= k <= 9]
    np.testing.assert_array_equal(mask[untouched], existing[untouched])
    assert outcome.record.given == fixed and outcome.record.given is not fixed
    assert outcome.record.scores[7] == pytest.approx(0.8) and outcome.record.scores[4] == pytest.approx(0.9)
    assert plan_repropagation(outcome.record, dict(fixed), ("node1", 7), _settings()) == []


def test_a_fix_inside_a_container_uses_the_lesion_rules_and_stays_inside(first_run):
    # Re-propagating a tumour (a segment with a container) uses the lesion rules of its first propagation:
    # a mean-HU change of 50 HU stops it (lesions: 40 HU), where the organ rules (80 HU) would go on.
    _, _, given, _, result, record = first_run
    hu = np.full((NK, NJ, NI), 100.0)
    hu[8:] = 150.0
    volume = synthetic_volume(hu, (1.0, 1.0, 2.5))
    predictor = ScriptedPredictor(volume, {k: (SQUARE, 0.9) for k in range(2, 14)})
    container = np.zeros((NK, NJ, NI), dtype=bool)
    container[:, 18:34, 18:34] = True  # the square minus its last 2 rows and columns
    existing = result.segment("liver").mask_kji & container
    fixed = {**given, 6: SlicePrompts(boxes_ij=[box_around(SQUARE)])}
    outcome = repropagate_segment(_Session(predictor), SessionSettings(), volume, ("node1", 7), record, fixed, [6],
                                  existing, "tumor", container_kji=container)  # fmt: skip
    track = outcome.record.tracks[-1]
    assert track.seed_k == 6 and track.stop_reasons["up"] == "leak: mean HU moved +50 from the seed's"
    assert sorted(set(predictor.predicted_slices)) == [5, 6, 7, 8]
    mask = outcome.result.segment("tumor").mask_kji
    assert not (mask & ~container).any()
    np.testing.assert_array_equal(mask[5:8], np.broadcast_to(SQUARE & container[0], (3, NJ, NI)))
