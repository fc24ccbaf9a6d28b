"""Each of propagation's stop rules, triggered by a scripted stand-in predictor (no model, milliseconds).

The volume is synthetic (0.8 x 0.8 x 2.5 mm voxels, so one pixel is 0.64 mm^2 and a rule written in mm^2
differs from the same rule in pixels). The seed is a 20 x 20 pixel square (400 px) on slice 10 from a box;
the scripted predictor returns, for slice 11 (the first step "up"), a mask chosen to sit just past a rule's
threshold, and every rule is also checked just inside its threshold, where the track must go on. Slices with
no script give an empty mask, so a track that goes on stops there with "structure ended".

Intensity refinement is off here (it would reshape the scripted masks); the rules are those of
``PropagationSettings``' defaults otherwise. Stop reasons are the strings ``Track.stop_reasons`` records.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest

from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import PropagationSettings, propagate_segment, repropagate
from scripted_predictor import ScriptedPredictor, box_around, rect, synthetic_volume

NK, NJ, NI = 20, 96, 128
SHAPE = (NJ, NI)
PIXEL_MM2 = 0.8 * 0.8
K0 = 10
SEED = rect(SHAPE, 30, 30, 20, 20)  # rows 30..49, columns 30..49: 400 px
RULES = PropagationSettings(intensity_refinement=False)


def _hu(value: float = 100.0) -> np.ndarray:
    return np.full((NK, NJ, NI), value)


def _run(script, settings: PropagationSettings = RULES, hu: np.ndarray | None = None, extra=None,
         container=None, seed_score: float = 0.95):  # fmt: skip
    """Propagate the seed box on slice K0 with ``script`` giving the other slices; (outcome, predictor)."""
    volume = synthetic_volume(_hu() if hu is None else hu)
    table = {**script, K0: (SEED, seed_score)}
    predictor = ScriptedPredictor(volume, table)
    slices = {K0: SlicePrompts(boxes_ij=[box_around(SEED)]), **(extra or {})}
    seg = SegmentPrompts("liver", 1, slices=slices, propagate=True)
    return propagate_segment(seg, predictor, settings, container_kji=container), predictor


def _slices(outcome) -> list[int]:
    return [int(k) for k in np.flatnonzero(outcome.mask_kji.any(axis=(1, 2)))]


def test_a_track_goes_on_while_the_masks_follow_and_records_each_slice():
    script = {k: (SEED, 0.9) for k in range(K0 - 3, K0 + 4)}
    outcome, predictor = _run(script)
    track = outcome.tracks[0]
    assert track.stop_reasons == {"up": "structure ended", "down": "structure ended"}
    assert _slices(outcome) == list(range(K0 - 3, K0 + 4))
    # The first empty slice each way was predicted (that is how the end is found), nothing beyond it.
    assert sorted(predictor.predicted_slices) == list(range(K0 - 4, K0 + 5))
    assert predictor.predicted_slices[0] == K0 and outcome.computed_slices == predictor.predicted_slices
    seed, next_up = track.records[K0], track.records[K0 + 1]
    assert (seed.source, next_up.source) == ("user", "propagated")
    assert seed.area_mm2 == pytest.approx(400 * PIXEL_MM2) and next_up.area_mm2 == pytest.approx(400 * PIXEL_MM2)
    assert seed.box_ij == box_around(SEED)
    # The next slice's prompt: the previous mask's box grown by the organ's margin, max(box_margin_mm 3 mm,
    # 1.4 x the 2.5 mm slice thickness) = 3.5 mm = 4.375 px at 0.8 mm.
    _, prompts = predictor.calls[1]
    grown = (30 - 4.375, 30 - 4.375, 49 + 4.375, 49 + 4.375)
    assert prompts.boxes_ij == [pytest.approx(grown)] and next_up.box_ij == pytest.approx(grown)
    assert not next_up.touches_box_edge
    assert outcome.scores[K0] == pytest.approx(0.95) and outcome.scores[K0 + 1] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("rows", "cols", "reason"),
    [
        (4, 5, "structure ended"),  # 20 px = 12.8 mm^2 < min_area_mm2 15
        (5, 5, None),  # 25 px = 16 mm^2: still a structure
    ],
)
def test_structure_ended_below_the_minimum_area(rows, cols, reason):
    mask = rect(SHAPE, 35, 35, rows, cols)
    settings = replace(RULES, collapse_ratio=0.0)  # the collapse rule would fire first on 400 -> 25 px
    outcome, _ = _run({K0 + 1: (mask, 0.9)}, settings)
    assert outcome.tracks[0].stop_reasons["up"] == (reason or "structure ended")
    assert (K0 + 1 in _slices(outcome)) is (reason is None)
    if reason is None:  # the track went on from the small mask; the slice after it came back empty
        assert outcome.tracks[0].records[K0 + 1].area_mm2 == pytest.approx(rows * cols * PIXEL_MM2)


def test_a_seed_smaller_than_the_minimum_area_is_not_propagated():
    tiny = rect(SHAPE, 30, 30, 4, 5)  # 12.8 mm^2
    volume = synthetic_volume(_hu())
    predictor = ScriptedPredictor(volume, {K0: (tiny, 0.9), K0 + 1: (SEED, 0.9), K0 - 1: (SEED, 0.9)})
    seg = SegmentPrompts("liver", 1, slices={K0: SlicePrompts(boxes_ij=[box_around(tiny)])}, propagate=True)
    outcome = propagate_segment(seg, predictor, RULES)
    assert outcome.tracks[0].stop_reasons == {"up": "structure ended", "down": "structure ended"}
    assert predictor.predicted_slices == [K0]


@pytest.mark.parametrize(("rows", "reason"), [(3, "mask collapsed"), (4, None)])
def test_mask_collapsed(rows, reason):
    # 400 px before; collapse_ratio 0.2 -> below 80 px the mask has collapsed.
    mask = rect(SHAPE, 30, 30, rows, 20)  # 60 px (38 mm^2, above the minimum area) or 80 px
    outcome, _ = _run({K0 + 1: (mask, 0.9)})
    assert outcome.tracks[0].stop_reasons["up"] == (reason or "structure ended")
    assert (K0 + 1 in _slices(outcome)) is (reason is None)


def test_collapse_is_measured_against_the_previous_slice_not_the_seed():
    # 400 -> 100 -> 25 px: each step keeps 25 % of the previous slice (above 20 %), so no collapse,
    # although the last mask is only 6 % of the seed's.
    script = {K0 + 1: (rect(SHAPE, 30, 30, 10, 10), 0.9), K0 + 2: (rect(SHAPE, 30, 30, 5, 5), 0.9)}
    outcome, _ = _run(script)
    assert outcome.tracks[0].stop_reasons["up"] == "structure ended"
    assert _slices(outcome) == [K0, K0 + 1, K0 + 2]


@pytest.mark.parametrize(("extra_px", "reason"), [(263, "leak: area grew 1.7x"), (262, None)])
def test_leak_guard_on_sudden_growth(extra_px, reason):
    # Growth limit: area > 1.5 x 256 mm^2 + 40 mm^2 = 424 mm^2 = 662.5 px. 400 + 263 = 663 px is a leak.
    grown = SEED.copy()
    grown[50:, 30:50][np.unravel_index(np.arange(extra_px), (46, 20))] = True  # the square runs on downwards
    assert int(grown.sum()) == 400 + extra_px
    outcome, _ = _run({K0 + 1: (grown, 0.9)})
    assert outcome.tracks[0].stop_reasons["up"] == (reason or "structure ended")
    assert (K0 + 1 in _slices(outcome)) is (reason is None)
    # Without the guard the same mask is accepted.
    unguarded, _ = _run({K0 + 1: (grown, 0.9)}, replace(RULES, max_growth_ratio=None))
    assert K0 + 1 in _slices(unguarded)


@pytest.mark.parametrize(
    ("hu_next", "reason"),
    [(181, "leak: mean HU moved +81 from the seed's"), (19, "leak: mean HU moved -81 from the seed's"),
     (180, None), (20, None)],
)  # fmt: skip
def test_leak_guard_on_mean_hu_moving_from_the_seed(hu_next, reason):
    hu = _hu(100.0)
    hu[K0 + 1] = hu_next  # the next slice's tissue is 81 (or 80) HU away from the seed's 100 HU
    outcome, _ = _run({K0 + 1: (SEED, 0.9)}, hu=hu)
    assert outcome.tracks[0].stop_reasons["up"] == (reason or "structure ended")
    assert (K0 + 1 in _slices(outcome)) is (reason is None)


def test_mean_hu_is_compared_with_the_seed_slice_and_only_inside_the_masks():
    hu = _hu(-500.0)  # far from everything outside the masks: must not count
    hu[K0][SEED] = 100.0
    hu[K0 + 1][SEED] = 170.0  # +70 from the seed: allowed
    hu[K0 + 2][SEED] = 240.0  # +70 from the previous slice but +140 from the seed: a leak
    outcome, _ = _run({K0 + 1: (SEED, 0.9), K0 + 2: (SEED, 0.9)}, hu=hu)
    assert outcome.tracks[0].stop_reasons["up"] == "leak: mean HU moved +140 from the seed's"
    assert _slices(outcome) == [K0, K0 + 1]


def test_lesion_settings_halve_the_mean_hu_tolerance():
    from liversam.propagation import for_lesions

    hu = _hu(100.0)
    hu[K0 + 1] = 141  # +41: within the organ's 80 HU, beyond a lesion's 40 HU
    organ, _ = _run({K0 + 1: (SEED, 0.9)}, hu=hu)
    lesion, _ = _run({K0 + 1: (SEED, 0.9)}, for_lesions(RULES), hu=hu)
    assert K0 + 1 in _slices(organ)
    assert lesion.tracks[0].stop_reasons["up"] == "leak: mean HU moved +41 from the seed's"


@pytest.mark.parametrize(("score", "reason"), [(0.44, "low score 0.44"), (0.45, None)])
def test_low_model_score(score, reason):
    outcome, _ = _run({K0 + 1: (SEED, score)})
    assert outcome.tracks[0].stop_reasons["up"] == (reason or "structure ended")
    assert (K0 + 1 in _slices(outcome)) is (reason is None)
    if reason is None:
        assert outcome.scores[K0 + 1] == pytest.approx(score)


@pytest.mark.parametrize(("cols", "reason"), [(51, "jumped away from previous slice"), (50, None)])
def test_jump_away_from_the_previous_slice(cols, reason):
    # The seed square grown by 3 px (cross-shaped dilation) reaches column 52 on rows 30..49. A 10-row band
    # starting at column 43 has 10 x 10 px inside that reach: 100/500 px is 20 % (min_overlap): kept;
    # 100/510 px is less: the track jumped to another structure.
    band = rect(SHAPE, 35, 43, 10, cols)
    settings = replace(RULES, max_growth_ratio=None)
    outcome, _ = _run({K0 + 1: (band, 0.9)}, settings)
    assert outcome.tracks[0].stop_reasons["up"] == (reason or "structure ended")
    assert (K0 + 1 in _slices(outcome)) is (reason is None)


def test_a_mask_elsewhere_on_the_slice_is_a_jump():
    elsewhere = rect(SHAPE, 30, 90, 20, 20)  # same size, 40 px to the right
    outcome, _ = _run({K0 + 1: (elsewhere, 0.9), K0 - 1: (SEED, 0.9)})
    assert outcome.tracks[0].stop_reasons == {"up": "jumped away from previous slice", "down": "structure ended"}
    assert _slices(outcome) == [K0 - 1, K0]


def test_user_prompts_on_the_same_object_stop_the_track():
    # The user boxed the same object on slice 13: the track from slice 10 stops before it, and the track
    # from slice 13 stops before slice 10; slices 11 and 12 come from both and no slice is predicted twice
    # by one track.
    script = {k: (SEED, 0.9) for k in range(K0 - 2, K0 + 6)}
    extra = {K0 + 3: SlicePrompts(boxes_ij=[(28.0, 28.0, 51.0, 51.0)])}
    outcome, predictor = _run(script, extra=extra)
    low, high = outcome.tracks
    assert low.seed_k == K0 and low.stop_reasons["up"] == f"user prompts on slice {K0 + 3}"
    assert high.seed_k == K0 + 3 and high.stop_reasons["down"] == f"user prompts on slice {K0}"
    assert sorted(low.records) == [K0 - 2, K0 - 1, K0, K0 + 1, K0 + 2]
    assert sorted(high.records) == [K0 + 1, K0 + 2, K0 + 3, K0 + 4, K0 + 5]
    assert high.records[K0 + 3].source == "user"
    assert predictor.predicted_slices.count(K0 + 3) == 1, "the user's slice is segmented from the user's box only"


@pytest.mark.parametrize(
    ("prompts", "stops"),
    [(SlicePrompts(points_pos_ij=[(51.0, 40.0)]), True),  # 2 px right of the mask: within the 2 px margin
     (SlicePrompts(boxes_ij=[(51.0, 35.0, 60.0, 45.0)]), False),  # a box beside the mask: another object
     (SlicePrompts(boxes_ij=[(33.0, 33.0, 52.0, 52.0)]), True),  # the object's own box, shifted: IoU 0.57 >= 0.25
     (SlicePrompts(boxes_ij=[(42.0, 42.0, 60.0, 60.0)]), False),  # IoU 0.09 < 0.25: another object
     (SlicePrompts(points_pos_ij=[(52.0, 40.0)]), False),  # 3 px away: another object
     (SlicePrompts(boxes_ij=[(52.0, 35.0, 60.0, 45.0)]), False)],
)  # fmt: skip
def test_user_prompts_next_to_the_object_also_stop_it(prompts, stops):
    script = {k: (SEED, 0.9) for k in range(K0, K0 + 6)}
    script[K0 + 3] = (SEED | rect(SHAPE, 35, 51, 11, 10), 0.9)  # what the user's own prompts give
    outcome, _ = _run(script, extra={K0 + 3: prompts})
    up = outcome.tracks[0].stop_reasons["up"]
    assert up == (f"user prompts on slice {K0 + 3}" if stops else "structure ended")


def test_user_prompts_on_another_object_do_not_stop_the_track():
    script = {k: (SEED, 0.9) for k in range(K0, K0 + 5)}
    far = SlicePrompts(boxes_ij=[(90.0, 10.0, 120.0, 30.0)], points_pos_ij=[(100.0, 80.0)])
    outcome, _ = _run(script, extra={K0 + 2: far})
    track = outcome.tracks[0]
    assert track.stop_reasons["up"] == "structure ended"
    assert sorted(k for k in track.records if k > K0) == [K0 + 1, K0 + 2, K0 + 3, K0 + 4]


@pytest.mark.parametrize("cap", [0, 2])
def test_max_slices_caps_each_direction(cap):
    script = {k: (SEED, 0.9) for k in range(NK)}
    outcome, predictor = _run(script, replace(RULES, max_slices=cap))
    assert outcome.tracks[0].stop_reasons == {"up": "max slices", "down": "max slices"}
    assert _slices(outcome) == list(range(K0 - cap, K0 + cap + 1))
    assert len(predictor.calls) == 1 + 2 * cap


def test_volume_end_and_outside_container():
    script = {k: (SEED, 0.9) for k in range(NK)}
    container = np.zeros((NK, NJ, NI), dtype=bool)
    container[6:NK] = True  # the container (the liver) starts at slice 6 and reaches the volume's top
    outcome, predictor = _run(script, container=container)
    assert outcome.tracks[0].stop_reasons == {"up": "volume end", "down": "outside container"}
    assert _slices(outcome) == list(range(6, NK))
    assert 5 not in predictor.predicted_slices, "a slice outside the container is not predicted"


def test_masks_are_clipped_to_the_container_on_every_slice():
    big = rect(SHAPE, 20, 20, 40, 40)
    script = {k: (big, 0.9) for k in range(NK)}
    container = np.zeros((NK, NJ, NI), dtype=bool)
    container[:, 30:50, 30:50] = True  # the seed square exactly
    container[12, 45:50, 30:50] = False  # slice 12's container is smaller: 300 px
    outcome, _ = _run(script, replace(RULES, max_slices=3), container=container)
    expected = np.zeros_like(container)
    expected[K0 - 3 : K0 + 4] = container[K0 - 3 : K0 + 4]
    np.testing.assert_array_equal(outcome.mask_kji, expected)


def test_repropagation_stops_at_the_neighbouring_user_slices():
    script = {k: (SEED, 0.9) for k in range(NK)}
    volume = synthetic_volume(_hu())
    predictor = ScriptedPredictor(volume, script)
    box = SlicePrompts(boxes_ij=[box_around(SEED)])
    seg = SegmentPrompts("liver", 1, slices={K0 - 2: box, K0 + 1: box}, propagate=True)
    existing = np.zeros((NK, NJ, NI), dtype=bool)
    existing[2:18] = SEED
    outcome = repropagate(existing, seg, K0, SlicePrompts(boxes_ij=[box_around(SEED)]), predictor, RULES)
    assert outcome.tracks[0].stop_reasons == {"up": "reached limit", "down": "reached limit"}
    assert sorted(predictor.predicted_slices) == [K0 - 1, K0]  # the user's slice K0 + 1 is never redone
    np.testing.assert_array_equal(outcome.mask_kji, existing)


def test_a_fix_reaches_one_slice_each_way_and_never_empties_a_slice():
    # The model gives a shifted square everywhere (the old result disagrees with it on every slice): the fix
    # on K0 replaces K0 - 1 .. K0 + 1 only. Where the new track stops at once (nothing past K0), the old
    # slices stay (before: replaced by nothing up to the next user slice).
    shifted = rect(SHAPE, 40, 40, 20, 20)
    predictor = ScriptedPredictor(synthetic_volume(_hu()), {k: (shifted, 0.9) for k in range(NK)})
    box = SlicePrompts(boxes_ij=[box_around(SEED)])
    seg = SegmentPrompts("liver", 1, slices={2: box, 17: box}, propagate=True)
    existing = np.zeros((NK, NJ, NI), dtype=bool)
    existing[2:18] = SEED
    outcome = repropagate(existing, seg, K0, SlicePrompts(boxes_ij=[box_around(shifted)]), predictor, RULES)
    changed = [k for k in range(NK) if not np.array_equal(outcome.mask_kji[k], existing[k])]
    assert changed == [K0 - 1, K0, K0 + 1]

    only_fix = ScriptedPredictor(synthetic_volume(_hu()), {K0: (shifted, 0.9)})  # empty elsewhere: it stops
    outcome = repropagate(existing, copy.deepcopy(seg), K0, SlicePrompts(boxes_ij=[box_around(shifted)]),
                          only_fix, RULES)
    changed = [k for k in range(NK) if not np.array_equal(outcome.mask_kji[k], existing[k])]
    assert changed == [K0]


def test_a_fix_replaces_slices_only_until_the_new_track_agrees_with_the_old_result():
    # The existing result is right everywhere but on slices 9..11 (shifted squares); the model now gives the
    # right square on every slice. A fix on slice 10 replaces 9..11 and keeps every slice from the first one
    # (each way) where the new track agrees with the old result: 12 and 8 onwards stay exactly as they were,
    # even where the new track differs a little from them (slice 13 and 6: a 1-pixel change, Dice > 0.9).
    near = rect(SHAPE, 30, 31, 20, 20)  # the same square one pixel to the right: Dice 0.95
    script = {k: (SEED, 0.9) for k in range(NK)}
    script[13] = (near, 0.9)
    script[6] = (near, 0.9)
    predictor = ScriptedPredictor(synthetic_volume(_hu()), script)
    box = SlicePrompts(boxes_ij=[box_around(SEED)])
    seg = SegmentPrompts("liver", 1, slices={2: box, 17: box}, propagate=True)
    existing = np.zeros((NK, NJ, NI), dtype=bool)
    existing[2:18] = SEED
    wrong = rect(SHAPE, 40, 40, 20, 20)  # Dice 0.25 with SEED, but overlapping it (one object in 3D)
    existing[9:12] = wrong
    outcome = repropagate(existing, seg, K0, box, predictor, RULES)
    expected = existing.copy()
    expected[9:12] = SEED
    np.testing.assert_array_equal(outcome.mask_kji, expected)
    assert sorted(outcome.scores) == [9, 10, 11]


def test_a_fix_on_a_small_cross_section_regrows_towards_the_larger_ones():
    # The organ is a 36 x 36 square on every slice; the model returns what of it lies in the prompt box. A fix
    # on slice 10 with a 20 x 20 box starts a track whose masks fill their boxes: moved out where the mask
    # reaches the edge (REPROPAGATION_REGROW_STEPS), the track gets the whole organ back within a slice, agrees
    # with the old result there, and the old result is kept beyond.
    organ = rect(SHAPE, 30, 40, 36, 36)

    def model(k, prompts):
        return organ & box_region(SHAPE, prompts.boxes_ij[0]), 0.9

    from liversam.intensity_refinement import box_region

    predictor = ScriptedPredictor(synthetic_volume(_hu()), model)
    seg = SegmentPrompts("liver", 1, slices={2: SlicePrompts(boxes_ij=[box_around(organ)])}, propagate=True)
    existing = np.zeros((NK, NJ, NI), dtype=bool)
    existing[2:18] = organ
    small = rect(SHAPE, 38, 48, 20, 20)
    existing[10] = rect(SHAPE, 30, 40, 36, 10)  # a wrong slice: a strip of the organ
    outcome = repropagate(existing, seg, K0, SlicePrompts(boxes_ij=[box_around(small)]), predictor,
                          replace(RULES, max_growth_ratio=None))
    changed = [k for k in range(NK) if not np.array_equal(outcome.mask_kji[k], existing[k])]
    # Without the regrow the track's masks on 9 and 11 stay within a margin of the fix's box (24 x 24
    # instead of 36 x 36) and replace the old, right ones.
    assert changed == [10]
    np.testing.assert_array_equal(outcome.mask_kji[10], small)
