"""An organ's dark partial-volume rim is trimmed from its final mask; its parenchyma and its lesions stay.

The phantom: a liver disc of parenchyma (100 HU, noise SD 8) whose outermost voxel is partial-volume rim (20 HU)
on most of its outline and a sharp edge (110 HU) near a hypodense lesion (30 HU) that lies on the liver's edge and
reaches deep into it; fat outside (-100 HU). The model's stand-in returns the disc with its rim. Expected masks come
from the phantom's geometry, not from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from liversam.organ_rim import OrganRimSettings, remove_partial_volume_rim, trim_partial_volume_rim
from liversam.pipeline import PipelineSettings, segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from scripted_predictor import ScriptedPredictor, synthetic_volume

NK, NJ, NI = 10, 64, 64
ORGAN_SLICES = range(2, 8)


def _disc(cj: float, ci: float, radius: float) -> np.ndarray:
    jj, ii = np.mgrid[:NJ, :NI]
    return (jj - cj) ** 2 + (ii - ci) ** 2 <= radius**2


OUTLINE = _disc(32, 32, 22)  # the model's mask: parenchyma and its rim
INTERIOR = _disc(32, 32, 19)  # parenchyma two voxels or more inside the rim
PARENCHYMA = _disc(32, 32, 21)  # inside the rim (a voxel wide: within the default two voxels)
LESION = _disc(32, 52, 5) & OUTLINE  # on the liver's edge, through the rim, 8 voxels deep
NEAR_LESION = _disc(32, 52, 10)
RIM = OUTLINE & ~PARENCHYMA & ~NEAR_LESION  # the dark partial-volume rim, apart from the lesion
SHARP = OUTLINE & ~PARENCHYMA & NEAR_LESION & ~LESION  # a sharp edge beside the lesion
LESION_BOX = (46.0, 26.0, 55.0, 38.0)


def _ct(rim_hu: float = 20.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = np.full((NK, NJ, NI), -100.0)
    for k in ORGAN_SLICES:
        hu[k][PARENCHYMA] = 100.0 + rng.normal(0.0, 8.0, PARENCHYMA.sum())
        hu[k][RIM] = rim_hu
        hu[k][SHARP] = 110.0
        hu[k][LESION] = 30.0
    return hu


def _organ() -> np.ndarray:
    organ = np.zeros((NK, NJ, NI), bool)
    organ[list(ORGAN_SLICES)] = OUTLINE
    return organ


def _assert_parenchyma_kept(mask: np.ndarray, k: int) -> None:
    """All parenchyma kept but a few voxels at the digital disc's corners beside the rim (there most of a voxel's
    3 x 3 neighbours are rim or fat, so its median is dark)."""
    assert mask[INTERIOR].all(), f"slice {k}: parenchyma inside the organ trimmed"
    lost = (PARENCHYMA & ~mask).sum()
    assert lost <= 0.02 * PARENCHYMA.sum(), f"slice {k}: {lost} parenchyma voxels trimmed"


def test_the_dark_rim_goes_the_parenchyma_the_sharp_edge_and_the_deep_lesion_stay() -> None:
    ct, organ = _ct(), _organ()
    ct_before, organ_before = ct.copy(), organ.copy()
    out = trim_partial_volume_rim(organ, ct, OrganRimSettings())
    np.testing.assert_array_equal(ct, ct_before)  # inputs only read
    np.testing.assert_array_equal(organ, organ_before)
    for k in ORGAN_SLICES:
        _assert_parenchyma_kept(out[k], k)
        # as dark as the rim, but a dark piece reaching deeper than the rim is a lesion: kept without being told
        assert out[k][LESION].all(), f"slice {k}: the lesion on the organ's surface was trimmed"
        assert out[k][SHARP].all(), f"slice {k}: a sharp edge was trimmed"
        rim_left = (out[k] & RIM).sum()
        assert rim_left <= 0.05 * RIM.sum(), f"slice {k}: {rim_left} voxels of the dark rim left"
    assert not out[[0, 1, 8, 9]].any()


def test_keep_protects_a_dark_rim_and_a_sharp_edge_is_never_cut() -> None:
    keep = np.zeros((NK, NJ, NI), bool)
    keep[5] = RIM  # e.g. a lesion segment that is only a voxel or two deep
    out = trim_partial_volume_rim(_organ(), _ct(), keep_kji=keep)
    assert out[5][RIM].all() and not (out[4] & RIM).any()
    sharp = trim_partial_volume_rim(_organ(), _ct(rim_hu=110.0))  # no partial volume: an organ on fat, sharp
    for k in ORGAN_SLICES:  # even the digital disc's single-voxel spurs, whose 3 x 3 median is the fat around
        np.testing.assert_array_equal(sharp[k], OUTLINE)


def test_nothing_to_trim_gives_the_same_mask_back() -> None:
    empty = np.zeros((NK, NJ, NI), bool)
    assert not trim_partial_volume_rim(empty, _ct()).any()
    tiny = np.zeros((NK, NJ, NI), bool)
    tiny[5, 30:34, 30:34] = True  # no parenchyma off the rim to measure
    np.testing.assert_array_equal(trim_partial_volume_rim(tiny, _ct()), tiny)
    organ = _organ()
    np.testing.assert_array_equal(trim_partial_volume_rim(organ, _ct(), OrganRimSettings(rim_voxels=0)), organ)


def test_the_in_place_trim_removes_what_the_copying_trim_removes_and_reads_its_keep_masks_only() -> None:
    keep_a = np.zeros((NK, NJ, NI), bool)
    keep_a[5] = RIM
    keep_b = np.zeros((NK, NJ, NI), bool)
    keep_b[3] = RIM
    expected = trim_partial_volume_rim(_organ(), _ct(), keep_kji=keep_a | keep_b)
    organ, ct = _organ(), _ct()
    keeps_before = keep_a.copy(), keep_b.copy()
    removed = remove_partial_volume_rim(organ, ct, keep=[keep_a, keep_b])
    np.testing.assert_array_equal(organ, expected)
    assert removed == (_organ() & ~expected).sum() > 0
    np.testing.assert_array_equal(ct, _ct())
    for keep, before in zip((keep_a, keep_b), keeps_before, strict=True):
        np.testing.assert_array_equal(keep, before)


def _predict(k: int, prompts: SlicePrompts):
    (box,) = prompts.boxes_ij
    if k not in ORGAN_SLICES:
        return np.zeros((NJ, NI), bool), 0.95
    if box[2] - box[0] > 30:  # the liver's box
        return OUTLINE, 0.95
    return LESION, 0.9


def _segments() -> list[SegmentPrompts]:
    liver = SegmentPrompts("liver", 1, (0.9, 0.5, 0.4), propagate=True)
    liver.slices[5] = SlicePrompts(boxes_ij=[(9.0, 9.0, 55.0, 55.0)])
    tumour = SegmentPrompts("tumor", 2, (0.3, 0.6, 0.9), inside="liver", propagate=True)
    tumour.slices[5] = SlicePrompts(boxes_ij=[LESION_BOX])
    return [liver, tumour]


@pytest.mark.parametrize("trim", [True, False])
def test_the_pipeline_trims_the_organ_and_its_lesion_keeps_its_container(trim: bool) -> None:
    volume = synthetic_volume(_ct(), (1.0, 1.0, 2.5))
    settings = PipelineSettings(later_segment_wins=False) if trim else PipelineSettings(
        later_segment_wins=False, organ_rim=None)
    liver, tumour = (s.mask_kji for s in segment_volume(volume, _segments(), ScriptedPredictor(volume, _predict),
                                                          settings).segments)
    for k in ORGAN_SLICES:
        _assert_parenchyma_kept(liver[k] | tumour[k], k)
        assert tumour[k].any() and not (tumour[k] & ~liver[k]).any(), f"slice {k}: the lesion left its container"
        rim_kept = (liver[k] & RIM & ~tumour[k]).sum()
        if trim:
            assert rim_kept <= 0.05 * RIM.sum(), f"slice {k}: the organ's dark rim was not trimmed"
        elif k == 5:  # the prompted slice (the propagated ones' intensity pruning may take some of a rim this dark)
            assert rim_kept == (RIM & ~tumour[k]).sum()


def test_the_propagation_outcomes_hold_the_final_masks_not_stale_copies() -> None:
    # "a later segment wins" (the default) gives the liver a new array; the outcome kept in the provenance for the
    # review must not keep the old one alive (a whole-volume mask per organ on a large CT)
    volume = synthetic_volume(_ct(), (1.0, 1.0, 2.5))
    result = segment_volume(volume, _segments(), ScriptedPredictor(volume, _predict), PipelineSettings())
    liver = result.segments[0]
    assert (liver.mask_kji & result.segments[1].mask_kji).sum() == 0  # the tumour was taken out of the liver
    for segment in result.segments:
        assert result.provenance["propagation"][segment.name].mask_kji is segment.mask_kji


def test_a_fix_re_propagated_by_the_server_trims_only_the_voxels_it_adds() -> None:
    from types import SimpleNamespace

    from liversam.server.jobs import Job, repropagation_work

    volume = synthetic_volume(_ct(), (1.0, 1.0, 2.5))
    predictor = ScriptedPredictor(volume, _predict)
    session = SimpleNamespace(volume=volume, predictor=lambda model: predictor, closed=False)
    existing = np.zeros((NK, NJ, NI), bool)
    existing[list(ORGAN_SLICES)] = INTERIOR  # the organ as an earlier run left it (too small on every slice)
    existing[6] = OUTLINE  # ... but with its dark rim on slice 6, which the fix reaches and predicts the same
    liver = _segments()[0]
    liver.slices = {2: SlicePrompts(boxes_ij=[(9.0, 9.0, 55.0, 55.0)])}
    fix = SlicePrompts(boxes_ij=[(9.0, 9.0, 55.0, 55.0)])
    liver.slices[5] = fix
    for trim in (True, False):
        settings = PipelineSettings() if trim else PipelineSettings(organ_rim=None)
        job = Job("j", session, "owner", "repropagate")
        out = repropagation_work(job, liver, [5], existing, None, settings)(predictor.model).result.segments[0].mask_kji
        assert out[5][INTERIOR].all() and out[5][PARENCHYMA].sum() >= 0.97 * PARENCHYMA.sum()
        rim_kept = (out[5] & RIM).sum()
        if trim:
            assert rim_kept <= 0.05 * RIM.sum(), f"{rim_kept} voxels of the dark rim the fix added were kept"
        else:
            assert rim_kept == RIM.sum()
        changed = [k for k in range(NK) if not np.array_equal(out[k], existing[k])]
        assert set(changed) <= {4, 5, 6}, changed  # the fix and its reach; the rest as it was
        np.testing.assert_array_equal(out[6] & RIM, RIM)  # voxels the user had before the fix are never trimmed


def test_a_lesion_keeps_its_edge_when_the_liver_was_segmented_in_an_earlier_job() -> None:
    """The Slicer module's order: the liver in one job (no tumour to keep), each tumour in a later job with the
    scene's liver as its container: the lesion reaches deeper than the rim, so the liver's trim leaves it."""
    volume = synthetic_volume(_ct(), (1.0, 1.0, 2.5))
    runs = {}
    for trim in (True, False):
        settings = PipelineSettings() if trim else PipelineSettings(organ_rim=None)
        liver = segment_volume(volume, _segments()[:1], ScriptedPredictor(volume, _predict),
                               settings).segments[0].mask_kji
        tumour = segment_volume(volume, _segments()[1:], ScriptedPredictor(volume, _predict), settings,
                                containers={"liver": liver}).segments[0].mask_kji
        runs[trim] = liver, tumour
    (liver, tumour), (untrimmed, tumour_untrimmed) = runs[True], runs[False]
    for k in ORGAN_SLICES:
        assert (liver[k] & RIM).sum() <= 0.05 * RIM.sum() and (untrimmed[k] & RIM).any()
        np.testing.assert_array_equal(liver[k] & LESION, untrimmed[k] & LESION)  # the trim left the lesion alone
        assert (tumour[k] & LESION & ~PARENCHYMA).any()
    np.testing.assert_array_equal(tumour, tumour_untrimmed)  # so the tumour's container did not lose it either


def test_only_organs_are_trimmed_not_a_tumour_segmented_without_its_liver() -> None:
    from liversam.organ_rim import is_trimmed_organ

    assert is_trimmed_organ("liver", None) and is_trimmed_organ("Spleen", None)
    assert not is_trimmed_organ("liver", "abdomen")
    for name in ("tumor", "Tumour", "tumor-2", "lesion 3", "liver tumor", "HCC", "metastasis_1"):
        assert not is_trimmed_organ(name, None), name
    volume = synthetic_volume(_ct(), (1.0, 1.0, 2.5))
    alone = SegmentPrompts("tumor", 2, (0.3, 0.6, 0.9), propagate=True)
    alone.slices[5] = SlicePrompts(boxes_ij=[(9.0, 9.0, 55.0, 55.0)])  # the stand-in returns the dark-rimmed disc
    mask = segment_volume(volume, [alone], ScriptedPredictor(volume, _predict), PipelineSettings()).segments[0].mask_kji
    assert mask[5][RIM].all(), "a tumour segment with no container lost its dark outline"
    liver = SegmentPrompts("liver", 1, (0.9, 0.5, 0.4), propagate=True, slices=dict(alone.slices))
    mask = segment_volume(volume, [liver], ScriptedPredictor(volume, _predict), PipelineSettings()).segments[0].mask_kji
    assert not (mask[5] & RIM).sum() > 0.05 * RIM.sum()  # the same mask named as an organ is trimmed


def test_the_pipeline_keeps_a_shallow_lesion_of_the_run_and_drops_the_scores_of_emptied_slices() -> None:
    volume = synthetic_volume(_ct(), (1.0, 1.0, 2.5))
    shallow = OUTLINE & ~_disc(32, 32, 20) & _disc(32, 10, 6)  # a lesion within the rim: only the run protects it
    tip = RIM & _disc(10, 32, 6)  # slice 7: the model's organ is a sliver of dark rim, all of it trimmed

    def predict(k: int, prompts: SlicePrompts):
        (box,) = prompts.boxes_ij
        if box[2] - box[0] > 30:
            return (tip if k == 7 else OUTLINE), 0.95
        return shallow, 0.9

    liver = SegmentPrompts("liver", 1, (0.9, 0.5, 0.4), propagate=False,
                           slices={k: SlicePrompts(boxes_ij=[(9.0, 9.0, 55.0, 55.0)]) for k in ORGAN_SLICES})
    tumour = SegmentPrompts("tumor", 2, (0.3, 0.6, 0.9), inside="liver", propagate=False,
                            slices={5: SlicePrompts(boxes_ij=[(4.0, 24.0, 16.0, 40.0)])})
    settings = PipelineSettings(later_segment_wins=False)
    out = segment_volume(volume, [liver, tumour], ScriptedPredictor(volume, predict), settings)
    liver_out, tumour_out = out.segment("liver"), out.segment("tumor")
    assert tumour_out.mask_kji[5].any()
    assert not (tumour_out.mask_kji & ~liver_out.mask_kji).any()  # the lesion kept its voxels in the liver
    assert (liver_out.mask_kji[5] & shallow & RIM).any()
    assert not (liver_out.mask_kji[4] & shallow & RIM).any()  # where no lesion was, the same dark voxels went
    assert not liver_out.mask_kji[7].any() and 7 not in liver_out.slice_scores
    assert 6 in liver_out.slice_scores
