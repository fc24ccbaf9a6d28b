"""An organ's track also asks for the box widened by ``OrganTrackSettings.wider_box_mm`` (scripted predictor).

Where the organ grows beyond the previous slice's box (a track seeded on a small slice walking towards larger
ones, a lobe that appears between thick slices), the model's mask stays inside the box and the box would never
grow. The wider box's mask is kept only when it keeps the normal mask, grows it by at most
``wider_max_growth`` x, and what it adds looks like the organ's parenchyma on the prompted slice.
"""

from __future__ import annotations

import numpy as np
import pytest

from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import OrganTrackSettings, PropagationSettings, propagate_segment
from scripted_predictor import ScriptedPredictor, box_around, rect, synthetic_volume

NK, NJ, NI = 8, 96, 128
SHAPE = (NJ, NI)
K0 = 3
SEED = rect(SHAPE, 30, 30, 20, 20)  # 400 px
NORMAL = rect(SHAPE, 30, 30, 20, 22)  # what the model gives inside the propagated box: 440 px
# The propagated box: the seed mask's box (19 px) grown by max(3 mm, 1.4 x 2.5 mm) = 3.5 mm = 4.375 px a
# side, 27.75 px; widened by 10 mm = 12.5 px a side, 52.75 px.
WIDE_FROM = 40.0


def _run(wide_mask: np.ndarray, hu: np.ndarray | None = None, organ_track: OrganTrackSettings | None = None,
         container: np.ndarray | None = None, normal: np.ndarray = NORMAL):  # fmt: skip
    """Seed on K0; slice K0 + 1 gives ``normal`` in the propagated box and ``wide_mask`` in a wider one."""

    def script(k: int, prompts: SlicePrompts):
        if k == K0:
            return SEED, 0.95
        if k != K0 + 1:
            return np.zeros(SHAPE, dtype=bool), 0.95
        i0, _, i1, _ = prompts.boxes_ij[0]
        return (wide_mask if i1 - i0 > WIDE_FROM else normal), 0.9

    volume = synthetic_volume(np.full((NK, NJ, NI), 100.0) if hu is None else hu)
    predictor = ScriptedPredictor(volume, script)
    seg = SegmentPrompts("liver", 1, slices={K0: SlicePrompts(boxes_ij=[box_around(SEED)])}, propagate=True)
    outcome = propagate_segment(seg, predictor, PropagationSettings(), container_kji=container,
                                organ_track=organ_track or OrganTrackSettings())
    return outcome, predictor


def _wide_calls(predictor: ScriptedPredictor) -> int:
    return sum(1 for k, p in predictor.calls if p.boxes_ij[0][2] - p.boxes_ij[0][0] > WIDE_FROM)


def test_the_wider_box_mask_is_kept_when_the_organ_grows_beyond_the_box() -> None:
    grown = NORMAL | rect(SHAPE, 30, 52, 20, 10)  # 640 px: the organ goes on beyond the propagated box
    outcome, predictor = _run(grown)
    assert np.array_equal(outcome.mask_kji[K0 + 1], grown)
    record = outcome.tracks[0].records[K0 + 1]
    assert record.box_ij[2] - record.box_ij[0] == pytest.approx(27.75 + 25.0)
    assert _wide_calls(predictor) >= 1
    assert outcome.computed_slices.count(K0 + 1) == 1  # the same slice: progress counts it once


@pytest.mark.parametrize(
    ("wide", "why"),
    [
        (rect(SHAPE, 30, 40, 20, 30), "keeps under 90 % of the normal mask"),  # loses columns 30-39
    ],
)
def test_the_wider_box_mask_is_refused_when_it_does_not_continue_the_normal_one(wide, why) -> None:
    outcome, _ = _run(wide)
    assert np.array_equal(outcome.mask_kji[K0 + 1], NORMAL), why


def test_the_wider_box_mask_is_refused_when_what_it_adds_is_not_the_organ() -> None:
    hu = np.full((NK, NJ, NI), 100.0)
    hu[:, :, 52:] = 125.0  # brighter than the organ (but not enough for the intensity pruning to cut it)
    grown = NORMAL | rect(SHAPE, 30, 52, 20, 10)
    outcome, _ = _run(grown, hu=hu)
    assert np.array_equal(outcome.mask_kji[K0 + 1], NORMAL)
    assert np.array_equal(_run(grown)[0].mask_kji[K0 + 1], grown)  # the same mask on the organ's HU is kept


def test_off_and_for_lesions_the_box_is_never_widened() -> None:
    grown = NORMAL | rect(SHAPE, 30, 52, 20, 10)
    outcome, predictor = _run(grown, organ_track=OrganTrackSettings(wider_box_mm=None))
    assert np.array_equal(outcome.mask_kji[K0 + 1], NORMAL) and _wide_calls(predictor) == 0
    container = np.ones((NK, NJ, NI), dtype=bool)  # a segment inside another: a lesion track
    outcome, predictor = _run(grown, container=container)
    assert _wide_calls(predictor) == 0


def _run_pair(normal: np.ndarray, wide: np.ndarray):
    return _run(wide, normal=normal)[0]


def test_a_wider_mask_more_than_1_5_times_the_normal_one_is_refused() -> None:
    normal = rect(SHAPE, 30, 30, 20, 15)  # 300 px
    outcome = _run_pair(normal, normal | rect(SHAPE, 30, 45, 20, 8))  # 460 px: 1.53 x (the leak guard allows 662)
    assert np.array_equal(outcome.mask_kji[K0 + 1], normal)
    kept = normal | rect(SHAPE, 30, 45, 20, 7)  # 440 px: 1.47 x
    assert np.array_equal(_run_pair(normal, kept).mask_kji[K0 + 1], kept)


def test_a_wider_mask_the_leak_guard_would_stop_is_not_taken() -> None:
    # 560 px (1.4 x the seed's 400) passes the leak guard alone (1.5 x + 40 mm^2 = 662 px); the wider mask's
    # 800 px (1.43 x the normal mask) would stop the track there ("leak: area grew"): the normal mask is kept.
    normal = rect(SHAPE, 30, 30, 20, 28)
    outcome = _run_pair(normal, normal | rect(SHAPE, 30, 58, 20, 12))
    assert np.array_equal(outcome.mask_kji[K0 + 1], normal)
    assert outcome.tracks[0].stop_reasons["up"] == "structure ended"
