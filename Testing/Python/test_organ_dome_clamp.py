"""Above its largest cross-section an organ's track keeps within its previous slice's patient-left edge
(``OrganTrackSettings.dome_fraction``; scripted predictor).

The liver's dome recedes to the patient's right while the heart sits to the left above the left lobe; a track
that runs on into the heart shows as a left edge creeping further left slice after slice. The scripted model
here fills its box towards the patient's left (the run-on): with the rule the box and the mask stop
``dome_left_allowance_mm`` beyond the previous slice's left edge; walking inferior, on slices no smaller than
``dome_fraction`` of the largest, for lesions, or on a scan whose axes are not the body's, nothing changes.
"""

from __future__ import annotations

import numpy as np
import pytest

from liversam.geometry import ImageGeometry
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import (
    DomeLimit,
    OrganTrackSettings,
    PropagationSettings,
    _superior_step_and_left_i,
    patient_left_axis,
    propagate_segment,
)
from liversam.volume import CTVolume
from scripted_predictor import ScriptedPredictor, box_around, rect

NK, NJ, NI = 8, 96, 128
SHAPE = (NJ, NI)
K0 = 2
SPACING = (0.8, 0.8, 2.5)
SEED = rect(SHAPE, 30, 30, 40, 30)  # 1200 px, columns 30..59; the patient's left is towards larger i
RIGHT_EDGE = 30  # the organ's patient-right edge: the scripted masks start here
# The propagated box: the previous mask's box grown by max(3 mm, 1.4 x 2.5 mm) = 3.5 mm = 4.375 px a side; the
# dome allowance 1.5 mm = 1.875 px.
MARGIN_PX = 4.375
WIDER_PX = 12.5  # the wider box (10 mm), kept where its mask passes (this uniform organ's always does)
ALLOWANCE_PX = 1.875
ROWS = 15  # the organ's height above the seed


def _flip_i(mask: np.ndarray, flip: bool) -> np.ndarray:
    return mask[:, ::-1] if flip else mask


AXIAL = np.eye(3)  # LPS-aligned: i towards the patient's left, k towards superior


def _run(direction=AXIAL, organ_track: OrganTrackSettings | None = None, container=None,
         receding: bool = False):  # fmt: skip
    """Seed on K0; above it the organ is ``ROWS`` rows high and the model fills its box from ``RIGHT_EDGE`` to the
    box's patient-left side (``receding``: the organ's left edge moves 3 px to the patient's right a slice and the
    model follows it). With ``direction[0, 0] < 0`` the patient's left is towards smaller i: the script mirrors."""
    flip = direction[0, 0] < 0

    def script(k: int, prompts: SlicePrompts):
        if k == K0:
            return _flip_i(SEED, flip), 0.95
        i0, _, i1, _ = prompts.boxes_ij[0]
        left = (NI - 1 - i0) if flip else i1  # the box's patient-left side, in unflipped columns
        if receding:
            left = min(left, 59 - 3 * abs(k - K0))
        mask = rect(SHAPE, 30, RIGHT_EDGE, ROWS, int(np.floor(min(left, NI - 1))) - RIGHT_EDGE + 1)
        return _flip_i(mask, flip), 0.9

    geometry = ImageGeometry((NI, NJ, NK), SPACING, (0.0, 0.0, 0.0), np.asarray(direction, dtype=float))
    volume = CTVolume(np.full((NK, NJ, NI), 100, dtype=np.int16), geometry, source="synthetic")
    predictor = ScriptedPredictor(volume, script)
    seg = SegmentPrompts("liver", 1, slices={K0: SlicePrompts(boxes_ij=[box_around(_flip_i(SEED, flip))])},
                         propagate=True)
    outcome = propagate_segment(seg, predictor, PropagationSettings(), container_kji=container,
                                organ_track=organ_track or OrganTrackSettings())
    return outcome


def _left_edges(outcome, flip: bool = False) -> list[int]:
    """The patient-left edge (unflipped column) of each slice above the seed."""
    edges = []
    for k in range(K0 + 1, NK):
        cols = np.flatnonzero(_flip_i(outcome.mask_kji[k], flip).any(axis=0))
        edges.append(int(cols.max()) if cols.size else -1)
    return edges


def _expected_edges(per_slice: float) -> list[int]:
    """Left edges when the first slice above the seed reaches the wider box's edge and each one after it creeps
    by ``per_slice`` (px): the first slice's previous mask is the seed, the track's largest, so the rule is off."""
    edge, edges = 59.0 + MARGIN_PX + WIDER_PX, []
    for _ in range(K0 + 1, NK):
        edges.append(int(np.floor(min(edge, NI - 1))))
        edge = edges[-1] + per_slice
    return edges


FLIPPED_I = np.diag([-1.0, 1.0, 1.0])


@pytest.mark.parametrize("direction", [AXIAL, FLIPPED_I], ids=["left is +i", "left is -i"])
def test_walking_superior_above_the_largest_slice_the_left_edge_keeps_within_the_allowance(direction) -> None:
    flip = direction[0, 0] < 0
    outcome = _run(direction)
    # slice K0+1: 46 x 15 = 690 px (0.58 of the seed's 1200) -> from K0+2 on the box and mask stop 1.875 px
    # beyond the previous left edge instead of the box margin (4.375 px) plus the wider box (12.5 px)
    assert _left_edges(outcome, flip) == _expected_edges(ALLOWANCE_PX)
    record = outcome.tracks[0].records[K0 + 2]
    limit = _left_edges(outcome, flip)[0] + ALLOWANCE_PX
    assert (record.box_ij[2] if not flip else NI - 1 - record.box_ij[0]) == pytest.approx(limit)
    off = _run(direction, organ_track=OrganTrackSettings(dome_fraction=None))
    assert _left_edges(off, flip)[1] > _left_edges(outcome, flip)[1] + 2  # without the rule it runs on further


def test_walking_inferior_the_rule_does_not_apply() -> None:
    # the k axis points inferior: the walk towards larger k goes down the body (and the one towards smaller k up)
    outcome = _run(np.diag([1.0, 1.0, -1.0]))
    plain = _run(np.diag([1.0, 1.0, -1.0]), organ_track=OrganTrackSettings(dome_fraction=None))
    assert np.array_equal(outcome.mask_kji[K0 + 1 :], plain.mask_kji[K0 + 1 :])
    assert _left_edges(outcome)[1] > _expected_edges(ALLOWANCE_PX)[1] + 2
    upward = [int(np.flatnonzero(outcome.mask_kji[k].any(axis=0)).max()) for k in (K0 - 1, K0 - 2)]
    assert upward == _expected_edges(ALLOWANCE_PX)[:2]  # slices K0-1, K0-2: superior, clamped


def test_a_lesion_track_is_never_clamped() -> None:
    container = np.ones((NK, NJ, NI), dtype=bool)
    clamped = _run(container=container)
    plain = _run(container=container, organ_track=OrganTrackSettings(dome_fraction=None))
    assert np.array_equal(clamped.mask_kji, plain.mask_kji)


def test_a_scan_whose_axes_are_not_the_bodys_is_left_alone() -> None:
    coronal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # k runs anterior-posterior
    outcome = _run(coronal)
    plain = _run(coronal, organ_track=OrganTrackSettings(dome_fraction=None))
    assert np.array_equal(outcome.mask_kji, plain.mask_kji)


def test_a_dome_that_recedes_is_unchanged() -> None:
    clamped = _run(receding=True)
    plain = _run(receding=True, organ_track=OrganTrackSettings(dome_fraction=None))
    assert np.array_equal(clamped.mask_kji, plain.mask_kji)
    assert _left_edges(clamped)[-1] < _left_edges(clamped)[0]


def test_the_rule_waits_until_the_slice_is_below_the_fraction_of_the_largest() -> None:
    # at a fraction of 0.5 the 690 px slice (0.58 of the seed) does not start it: the same masks as off
    half = _run(organ_track=OrganTrackSettings(dome_fraction=0.5))
    plain = _run(organ_track=OrganTrackSettings(dome_fraction=None))
    assert _left_edges(half)[:2] == _left_edges(plain)[:2]


@pytest.mark.parametrize(
    ("direction", "expected"),
    [
        (np.eye(3), (1, 1)),
        (np.diag([-1.0, -1.0, 1.0]), (1, -1)),  # RAS-stored axes: i towards the patient's right
        (np.diag([1.0, 1.0, -1.0]), (-1, 1)),  # slices stored from the head down
        (np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), (0, 1)),  # coronal: k is not S-I
        (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (0, 0)),  # sagittal
    ],
)
def test_superior_step_and_patient_left_from_the_direction_matrix(direction, expected) -> None:
    assert _superior_step_and_left_i(direction) == expected


def test_dome_limit_clamps_boxes_and_cuts_masks_on_the_patient_left_side_only() -> None:
    mask = np.ones((4, 10), dtype=bool)
    left_plus = DomeLimit(1, 5.5)
    assert left_plus.clamp_box((1.0, 0.0, 8.0, 3.0)) == (1.0, 0.0, 5.5, 3.0)
    assert left_plus.clamp_box((1.0, 0.0, 4.0, 3.0)) == (1.0, 0.0, 4.0, 3.0)
    assert np.flatnonzero(left_plus.cut(mask).any(axis=0)).tolist() == [0, 1, 2, 3, 4, 5]
    left_minus = DomeLimit(-1, 3.5)
    assert left_minus.clamp_box((1.0, 0.0, 8.0, 3.0)) == (3.5, 0.0, 8.0, 3.0)
    assert np.flatnonzero(left_minus.cut(mask).any(axis=0)).tolist() == [4, 5, 6, 7, 8, 9]
    assert mask.all()  # the input mask is never changed


@pytest.mark.parametrize(
    ("direction", "expected"),
    [
        (np.eye(3), (1, 1)),
        (np.diag([-1.0, -1.0, 1.0]), (1, -1)),
        (np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), (0, 1)),  # in-plane axes swapped
        (np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), (0, -1)),
        (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (1, 0)),  # sagittal: no left in-plane
    ],
)
def test_the_patient_s_left_is_found_along_i_or_along_j(direction, expected) -> None:
    assert patient_left_axis(direction) == expected


def test_a_row_limit_clamps_boxes_and_cuts_masks_along_j() -> None:
    mask = np.ones((10, 4), dtype=bool)
    left_plus = DomeLimit(1, 5.5, axis=0)
    assert left_plus.clamp_box((0.0, 1.0, 3.0, 8.0)) == (0.0, 1.0, 3.0, 5.5)
    assert np.flatnonzero(left_plus.cut(mask).any(axis=1)).tolist() == [0, 1, 2, 3, 4, 5]
    left_minus = DomeLimit(-1, 3.5, axis=0)
    assert left_minus.clamp_box((0.0, 1.0, 3.0, 8.0)) == (0.0, 3.5, 3.0, 8.0)
    assert np.flatnonzero(left_minus.cut(mask).any(axis=1)).tolist() == [4, 5, 6, 7, 8, 9]
    assert mask.all()


def test_a_scan_stored_with_i_and_j_swapped_gets_the_same_dome_rule() -> None:
    """The same scripted organ stored transposed (i along posterior, j along the patient's left): the track's masks
    are the transposed masks of the usual storage, and the rule acts (they differ from the rule off)."""
    swapped = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])

    def run(organ_track: OrganTrackSettings):
        def script(k: int, prompts: SlicePrompts):
            if k == K0:
                return SEED.T, 0.95
            _, _, _, j1 = prompts.boxes_ij[0]  # the box's patient-left side is its largest j
            mask = rect(SHAPE, 30, RIGHT_EDGE, ROWS, int(np.floor(min(j1, NI - 1))) - RIGHT_EDGE + 1)
            return mask.T, 0.9

        geometry = ImageGeometry((NJ, NI, NK), (SPACING[1], SPACING[0], SPACING[2]), (0.0, 0.0, 0.0), swapped)
        volume = CTVolume(np.full((NK, NI, NJ), 100, dtype=np.int16), geometry, source="synthetic")
        seg = SegmentPrompts("liver", 1, slices={K0: SlicePrompts(boxes_ij=[box_around(SEED.T)])}, propagate=True)
        return propagate_segment(seg, ScriptedPredictor(volume, script), PropagationSettings(),
                                 organ_track=organ_track)

    usual = _run()
    transposed = run(OrganTrackSettings())
    np.testing.assert_array_equal(transposed.mask_kji.transpose(0, 2, 1), usual.mask_kji)
    assert not np.array_equal(run(OrganTrackSettings(dome_fraction=None)).mask_kji, transposed.mask_kji)
