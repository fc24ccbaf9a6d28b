"""The organ's tip rule on thick slices ("tip stopped tapering"), with a scripted stand-in predictor.

Once an organ's mask is below ``OrganTrackSettings.tip_fraction`` of its seed slice's, the track is at the
organ's tip, and a real tip keeps shrinking: a mask that shrinks by less than ``1 - tip_min_shrink`` against the
slice ``tip_window_mm`` back has run on into a neighbour. A tip that shrinks slowly but steadily (8 % a slice,
as ircadb17's inferior tip averaged to 4.8 mm slices) is followed to its end; a mask that stays the same size
stops the track. On thin slices the rule is off.
"""

from __future__ import annotations

import numpy as np
import pytest

from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import OrganTrackSettings, PropagationSettings, propagate_segment
from scripted_predictor import ScriptedPredictor, box_around, rect, synthetic_volume

NK, NJ, NI = 16, 96, 96
SHAPE = (NJ, NI)
K0 = 4
SEED = rect(SHAPE, 20, 20, 40, 40)  # 1600 px
RULES = PropagationSettings(intensity_refinement=False)


def _run(tip_columns: list[int], thickness_mm: float = 5.0):
    """The seed on K0, then 1200 and 800 px, then masks of 10 rows x ``tip_columns`` (below 25 % of the seed)."""
    masks = [rect(SHAPE, 20, 20, 30, 40), rect(SHAPE, 20, 20, 20, 40)]
    masks += [rect(SHAPE, 20, 20, 10, cols) for cols in tip_columns]
    script = {K0: (SEED, 0.95), **{K0 + 1 + n: (m, 0.9) for n, m in enumerate(masks)}}
    volume = synthetic_volume(np.full((NK, NJ, NI), 100.0), spacing_mm=(0.8, 0.8, thickness_mm))
    seg = SegmentPrompts("liver", 1, slices={K0: SlicePrompts(boxes_ij=[box_around(SEED)])}, propagate=True)
    outcome = propagate_segment(seg, ScriptedPredictor(volume, script), RULES, organ_track=OrganTrackSettings())
    kept = [int(k) - K0 for k in np.flatnonzero(outcome.mask_kji.any(axis=(1, 2)))]
    return outcome.tracks[0].stop_reasons["up"], kept


def test_a_tip_that_shrinks_slowly_is_followed_to_its_end() -> None:
    # 380 -> 350 -> 320 -> 290 px: 0.92, 0.91, 0.91 of the slice before (the old limit 0.85 stopped at 350)
    reason, kept = _run([38, 35, 32, 29])
    assert reason == "structure ended"
    assert kept == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("cols", [37, 38, 39])
def test_a_tip_that_stops_shrinking_has_run_on_and_stops_the_track(cols: int) -> None:
    # 380 -> 370 / 380 / 390 px (0.97, 1.0, 1.03 of the slice before): a neighbour, not the organ's tip
    reason, kept = _run([38, cols, cols])
    assert reason == "tip stopped tapering"
    assert kept == [0, 1, 2, 3]


def test_the_tip_rule_is_off_on_thin_slices() -> None:
    reason, kept = _run([38, 38, 38], thickness_mm=2.5)
    assert reason == "structure ended"
    assert kept == [0, 1, 2, 3, 4, 5]
