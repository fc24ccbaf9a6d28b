"""The opt-in skipping of every other thin slice (``OrganTrackSettings.skip_max_thickness_mm``,
``liversam segment --skip-thin-slices``): an organ on thin slices is predicted on every other slice, the slice
between interpolated from its neighbours; every walk rule holds for the longer step, or the walk takes single
steps. Checked with a scripted model-free predictor, so each assertion is about the walk itself."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from liversam.pipeline import PipelineSettings, segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import OrganTrackSettings, PropagationSettings, interpolate_between
from scripted_predictor import ScriptedPredictor, box_around, synthetic_volume

SHAPE = (64, 64)


def disc(radius: float, centre=(32.0, 32.0)) -> np.ndarray:
    jj, ii = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return (jj - centre[0]) ** 2 + (ii - centre[1]) ** 2 <= radius**2


def test_the_slice_between_two_discs_is_the_disc_of_the_mean_radius() -> None:
    below, above = disc(8.0), disc(16.0)
    between = interpolate_between(below, above, (1.0, 1.0))
    radius = np.sqrt(between.sum() / np.pi)
    assert 11.5 <= radius <= 12.5  # the mean of 8 and 16
    assert (below & ~between).sum() == 0 and (between & ~above).sum() == 0


def test_the_slice_between_two_shifted_discs_lies_halfway_and_respects_spacing() -> None:
    below, above = disc(10.0, (32.0, 22.0)), disc(10.0, (32.0, 42.0))
    between = interpolate_between(below, above, (1.0, 1.0))
    _, ci = ndimage.center_of_mass(between)
    assert abs(ci - 32.0) < 0.6
    # with anisotropic pixels the signed distances are in mm: the same masks give the same halfway shape
    assert (interpolate_between(below, above, (0.5, 0.5)) == between).all()
    assert not interpolate_between(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), (1.0, 1.0)).any()


def _organ(thickness_mm: float, nk: int = 24, first: int = 3, last: int = 20):
    """An organ whose radius grows from 6 px at ``first`` to 18 px at the middle and back; empty elsewhere."""
    middle = (first + last) / 2.0
    masks = {}
    for k in range(first, last + 1):
        masks[k] = disc(18.0 - 12.0 * abs(k - middle) / (middle - first))
    volume = synthetic_volume(np.where(np.stack([masks.get(k, np.zeros(SHAPE, bool)) for k in range(nk)]), 60, -100),
                              (1.0, 1.0, thickness_mm))
    return volume, masks


def _run(volume, masks, skip_mm, extra_slices=None, seed_k=12, progress=None):
    predictor = ScriptedPredictor(volume, {k: (m, 0.9) for k, m in masks.items()})
    slices = {seed_k: SlicePrompts(boxes_ij=[box_around(masks[seed_k])])}
    slices.update(extra_slices or {})
    seg = SegmentPrompts("liver", 1, slices=slices, propagate=True)
    settings = PipelineSettings(propagation=PropagationSettings(intensity_refinement=False),
                                organ_track=OrganTrackSettings(skip_max_thickness_mm=skip_mm))
    result = segment_volume(volume, [seg], predictor, settings, progress=progress)
    return predictor, result


def test_thin_slices_are_predicted_every_other_one_and_the_organ_keeps_its_extent() -> None:
    volume, masks = _organ(1.0)
    every, full = _run(volume, masks, None)
    skipping, skipped = _run(volume, masks, 2.0)
    assert sorted(set(every.predicted_slices)) == list(range(2, 22))  # the organ, and the empty slice either side
    predicted = sorted(set(skipping.predicted_slices))
    assert len(predicted) <= 13  # 18 slices of organ + 2, every other one interpolated away from the ends
    mask, reference = skipped.segment("liver").mask_kji, full.segment("liver").mask_kji
    present = np.flatnonzero(mask.any(axis=(1, 2)))
    assert (present[0], present[-1]) == (3, 20)  # the ends are reached by single steps: nothing lost, nothing added
    dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
    assert dice > 0.98
    (track,) = skipped.provenance["propagation"]["liver"].tracks
    interpolated = sorted(k for k, r in track.records.items() if r.source == "interpolated")
    assert interpolated and not set(interpolated) & set(predicted)
    for k in interpolated:  # each interpolated slice lies between two predicted neighbours of the track
        assert {k - 1, k + 1} <= set(track.records) and track.records[k].box_ij is None
    computed = set(skipped.provenance["propagation"]["liver"].computed_slices)  # predicted or interpolated
    assert computed == set(predicted) | set(interpolated) and set(range(3, 21)) <= computed


def test_thick_slices_and_the_default_predict_every_slice() -> None:
    volume, masks = _organ(5.0)
    skipping, _ = _run(volume, masks, 2.0)
    assert sorted(set(skipping.predicted_slices)) == list(range(2, 22))
    volume, masks = _organ(1.0)
    default = ScriptedPredictor(volume, {k: (m, 0.9) for k, m in masks.items()})
    seg = SegmentPrompts("liver", 1, slices={12: SlicePrompts(boxes_ij=[box_around(masks[12])])}, propagate=True)
    segment_volume(volume, [seg], default, PipelineSettings(propagation=PropagationSettings(intensity_refinement=False)))
    assert sorted(set(default.predicted_slices)) == list(range(2, 22))


@pytest.mark.parametrize("user_k", [15, 16])
def test_a_user_prompted_slice_is_never_skipped_over(user_k: int) -> None:
    """The user's prompts rule their slice: the walk stops just before it, whether the skip would land on it
    or jump over it."""
    volume, masks = _organ(1.0)
    extra = {user_k: SlicePrompts(boxes_ij=[box_around(masks[user_k])])}
    skipping, result = _run(volume, masks, 2.0, extra)
    (seed_track, user_track) = result.provenance["propagation"]["liver"].tracks
    assert seed_track.stop_reasons["up"] == f"user prompts on slice {user_k}"
    assert max(seed_track.records) == user_k - 1
    assert user_track.records[user_k].source == "user"


def test_a_leak_on_the_longer_step_falls_back_to_single_steps() -> None:
    """A mask that would fail a rule two slices on (here: it grows by more than the growth limit over two
    slices but not over one) is predicted again one slice on, as without skipping."""
    _, masks = _organ(1.0, nk=24, first=3, last=20)
    volume = synthetic_volume(np.full((24, *SHAPE), 60), (1.0, 1.0, 1.0))  # no HU change: growth alone decides
    grown = dict(masks)
    for k in range(13, 21):
        grown[k] = disc(min(30.0, 17.4 * 1.18 ** (k - 12)))  # up to 1.39x the area of the slice before
    reports = []
    skipping, result = _run(volume, grown, 2.0, progress=lambda stage, done, total: reports.append((stage, done, total)))
    _, full = _run(volume, grown, None)
    mask, reference = result.segment("liver").mask_kji, full.segment("liver").mask_kji
    assert [k for k in range(24) if mask[k].any()] == [k for k in range(24) if reference[k].any()] == list(range(3, 21))
    (track,) = result.provenance["propagation"]["liver"].tracks
    # 12 -> 14 would grow 1.9x (over the 1.5x limit): 13 and 14 are predicted one at a time
    assert track.records[13].source == track.records[14].source == "propagated"
    assert {13, 14} <= set(skipping.predicted_slices)
    # progress counts distinct slices: the refused far slice, predicted again later, is not counted twice
    walked = [(done, total) for stage, done, total in reports if stage.startswith("propagating")]
    assert walked and all(done <= total for done, total in walked)
    assert walked[-1][0] == len(set(skipping.predicted_slices) | {k for k, r in track.records.items()
                                                                    if r.source == "interpolated"})


def test_a_slice_between_two_masks_that_barely_touch_is_predicted_not_interpolated() -> None:
    """A small organ moving 3.5 px a slice: neighbouring masks overlap enough for every walk rule two slices
    apart, but their interpolation would be (almost) empty; the slice between is then predicted, so no slice
    goes missing and the 3D clean-up (keep the largest piece) keeps the whole organ."""
    volume = synthetic_volume(np.full((14, *SHAPE), 60), (1.0, 1.0, 1.0))
    masks = {}
    for k in range(1, 13):
        masks[k] = np.zeros(SHAPE, bool)
        i0 = 4 + int(round(3.5 * (k - 1)))
        masks[k][28:35, i0 : i0 + 7] = True
    volume_masks = {k: m for k, m in masks.items()}
    settings = PropagationSettings(intensity_refinement=False, min_overlap=0.1, min_area_mm2=5.0)
    results = []
    for skip in (None, 2.0):
        predictor = ScriptedPredictor(volume, {k: (m, 0.9) for k, m in volume_masks.items()})
        seg = SegmentPrompts("liver", 1, slices={6: SlicePrompts(boxes_ij=[box_around(masks[6])])}, propagate=True)
        result = segment_volume(volume, [seg], predictor, PipelineSettings(
            propagation=settings, organ_track=OrganTrackSettings(skip_max_thickness_mm=skip)))
        results.append(result.segment("liver").mask_kji)
    every, skipping = results
    present = [k for k in range(14) if skipping[k].any()]
    assert present == [k for k in range(14) if every[k].any()] == list(range(1, 13))
    assert all(skipping[k].sum() >= 0.2 * 49 for k in present)


def test_the_command_line_takes_a_thickness_under_3_mm() -> None:
    from liversam.cli import main

    for bad in ("5", "0", "abc"):
        with pytest.raises(SystemExit) as exit_info:
            main(["segment", "ct.nrrd", "--prompts", "p.json", "--output", "o.nii.gz", "--skip-thin-slices", bad])
        assert exit_info.value.code == 2
