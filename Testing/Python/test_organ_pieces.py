"""A piece of the organ the model drops is asked for with its own box (``OrganTrackSettings.piece_min_mm2``;
scripted predictor).

On a thick-slice liver a lobe or segment can lie apart from the rest on a slice; asked with the whole organ's box,
the model returns the main piece only on the next slice and the piece is lost from there on (hcc2144, 5 mm
slices). The piece is asked for again with its own box, one slice deep: a piece found that way is not followed
further (on hcc2144 it ran on as something else for six slices).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import OrganTrackSettings, PropagationSettings, propagate_segment
from scripted_predictor import ScriptedPredictor, box_around, rect, synthetic_volume

NK, NJ, NI = 7, 96, 128
SHAPE = (NJ, NI)
K0 = 3
MAIN = rect(SHAPE, 20, 10, 50, 50)  # 2500 px
PIECE = rect(SHAPE, 30, 80, 30, 30)  # 900 px, apart from the main piece
PIECE_BOX_FROM = 60.0  # a box around the piece alone (columns 80-109 + 7 mm a side) starts right of this column


def _run(hu: np.ndarray | None = None, organ_track: OrganTrackSettings | None = None, found=PIECE):
    """The seed slice holds both pieces; elsewhere the organ's box gives the main piece only, and the piece's own box
    gives ``found``."""

    def script(k: int, prompts: SlicePrompts):
        if k == K0:
            return MAIN | PIECE, 0.95
        return (found if prompts.boxes_ij[0][0] > PIECE_BOX_FROM else MAIN), 0.9

    volume = synthetic_volume(np.full((NK, NJ, NI), 100.0) if hu is None else hu, (1.0, 1.0, 5.0))
    predictor = ScriptedPredictor(volume, script)
    seg = SegmentPrompts("liver", 1, slices={K0: SlicePrompts(boxes_ij=[box_around(MAIN | PIECE)])}, propagate=True)
    outcome = propagate_segment(seg, predictor, PropagationSettings(), organ_track=organ_track or OrganTrackSettings())
    return outcome.mask_kji, predictor


def _piece_calls(predictor: ScriptedPredictor) -> list[int]:
    return [k for k, p in predictor.calls if p.boxes_ij[0][0] > PIECE_BOX_FROM]


def test_a_dropped_piece_is_asked_for_with_its_own_box_one_slice_deep() -> None:
    mask, predictor = _run()
    for k in (K0 - 1, K0 + 1):  # the slices next to the one that held both pieces get the piece back
        np.testing.assert_array_equal(mask[k], MAIN | PIECE)
    for k in (K0 - 2, K0 + 2):  # ... not the slices after them: a recovered piece is not followed further
        np.testing.assert_array_equal(mask[k], MAIN)
    assert sorted(_piece_calls(predictor)) == [K0 - 1, K0 + 1]


def test_off_the_piece_is_lost_after_the_seed() -> None:
    mask, predictor = _run(organ_track=dataclasses.replace(OrganTrackSettings(), piece_min_mm2=None))
    np.testing.assert_array_equal(mask[K0 - 1], MAIN)
    np.testing.assert_array_equal(mask[K0 + 1], MAIN)
    assert _piece_calls(predictor) == []


def test_a_piece_of_other_tissue_or_a_run_beyond_the_piece_is_not_taken() -> None:
    hu = np.full((NK, NJ, NI), 100.0)
    hu[:, PIECE] = 40.0  # the piece's place is 60 HU darker than the organ off the seed slice ...
    hu[K0, PIECE] = 100.0  # ... while on the seed slice it is the organ
    mask, _ = _run(hu)
    np.testing.assert_array_equal(mask[K0 + 1], MAIN)
    np.testing.assert_array_equal(mask[K0 - 1], MAIN)
    # the piece's box returns more than 1.5 x the piece (a run into a neighbour beside it): refused
    mask, _ = _run(found=PIECE | rect(SHAPE, 30, 110, 30, 16))  # 900 + 480 px
    np.testing.assert_array_equal(mask[K0 + 1], MAIN)
    # what it returns lies mostly off the piece: refused
    mask, _ = _run(found=rect(SHAPE, 70, 80, 20, 30))
    np.testing.assert_array_equal(mask[K0 + 1], MAIN)


def test_a_small_piece_is_left_alone() -> None:
    small = dataclasses.replace(OrganTrackSettings(), piece_min_mm2=1000.0)  # the piece is 900 mm^2
    mask, predictor = _run(organ_track=small)
    np.testing.assert_array_equal(mask[K0 + 1], MAIN)
    assert _piece_calls(predictor) == []


def test_a_piece_the_new_mask_covers_is_not_asked_for() -> None:
    def script(k: int, prompts: SlicePrompts):  # the whole organ's box gives both pieces everywhere
        return MAIN | PIECE, 0.95

    volume = synthetic_volume(np.full((NK, NJ, NI), 100.0), (1.0, 1.0, 5.0))
    predictor = ScriptedPredictor(volume, script)
    seg = SegmentPrompts("liver", 1, slices={K0: SlicePrompts(boxes_ij=[box_around(MAIN | PIECE)])}, propagate=True)
    outcome = propagate_segment(seg, predictor, PropagationSettings(), organ_track=OrganTrackSettings())
    assert all(np.array_equal(outcome.mask_kji[k], MAIN | PIECE) for k in range(NK))
    assert _piece_calls(predictor) == []
    # one call with the propagated box and one with the wider box per slice, nothing more
    assert len(predictor.calls) == 1 + 2 * (NK - 1)


def test_a_piece_never_carries_on_a_track_whose_organ_ended() -> None:
    def script(k: int, prompts: SlicePrompts):
        if k == K0:
            return MAIN | PIECE, 0.95
        return (PIECE if prompts.boxes_ij[0][0] > PIECE_BOX_FROM else np.zeros(SHAPE, dtype=bool)), 0.9

    volume = synthetic_volume(np.full((NK, NJ, NI), 100.0), (1.0, 1.0, 5.0))
    predictor = ScriptedPredictor(volume, script)
    seg = SegmentPrompts("liver", 1, slices={K0: SlicePrompts(boxes_ij=[box_around(MAIN | PIECE)])}, propagate=True)
    outcome = propagate_segment(seg, predictor, PropagationSettings(), organ_track=OrganTrackSettings())
    assert not outcome.mask_kji[[k for k in range(NK) if k != K0]].any()
    assert _piece_calls(predictor) == []


def test_a_fix_re_propagated_does_not_ask_for_pieces() -> None:
    from liversam.propagation import repropagate

    def script(k: int, prompts: SlicePrompts):  # the fixed slice holds both pieces, its neighbours the main one
        if k == K0:
            return MAIN | PIECE, 0.95
        return (PIECE if prompts.boxes_ij[0][0] > PIECE_BOX_FROM else MAIN), 0.9

    volume = synthetic_volume(np.full((NK, NJ, NI), 100.0), (1.0, 1.0, 5.0))
    predictor = ScriptedPredictor(volume, script)
    existing = np.zeros((NK, NJ, NI), dtype=bool)
    existing[:] = MAIN
    seg = SegmentPrompts("liver", 1, slices={K0: SlicePrompts(boxes_ij=[box_around(MAIN | PIECE)])}, propagate=True)
    repropagate(existing, seg, K0, seg.slices[K0], predictor, PropagationSettings())
    assert _piece_calls(predictor) == []
