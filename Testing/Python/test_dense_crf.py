"""The dense-CRF refinement (liversam.dense_crf) on synthetic two-intensity CTs, its pipeline and CLI hooks.

The phantoms have a known truth (a bright ellipsoid in darker tissue, with noise); the masks given to the
CRF are the truth damaged in a known way (a shifted and bloated copy, speckle). The assertions are that the
CRF moves the mask towards the truth, never touches the CT, stays in its box and the ``within`` mask, and
that asking for it without its package or for an unknown segment fails with an actionable message.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from liversam.dense_crf import (
    LESION_CRF,
    ORGAN_CRF,
    CRFSettings,
    CRFUnavailableError,
    crf_for_segments,
    refine_with_crf,
)
from liversam.errors import LiverSAMError
from liversam.pipeline import PipelineSettings, segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from scripted_predictor import ScriptedPredictor, synthetic_volume

pytest.importorskip("pydensecrf.densecrf", reason="the dense CRF needs pydensecrf2 (extra 'crf'; setup.sh installs it)")

SPACING_KJI = (2.5, 0.8, 0.8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _phantom(seed: int = 0, shape=(16, 80, 80), noise_hu: float = 15.0):
    """(CT in HU, truth): an ellipsoid of 120 HU (liver-like) in 20 HU tissue, Gaussian noise."""
    nk, nj, ni = shape
    kk, jj, ii = np.ogrid[:nk, :nj, :ni]
    truth = (((kk - nk / 2) * SPACING_KJI[0] / 14.0) ** 2 + ((jj - nj / 2) * SPACING_KJI[1] / 22.0) ** 2
             + ((ii - ni / 2) * SPACING_KJI[2] / 18.0) ** 2) <= 1.0
    rng = np.random.default_rng(seed)
    ct = np.where(truth, 120.0, 20.0) + rng.normal(0.0, noise_hu, truth.shape)
    return ct.astype(np.int16), truth


def _damaged(truth: np.ndarray, seed: int = 1) -> np.ndarray:
    """The truth shifted 3 voxels in i, bloated by 2 voxels in-plane, with 2 % speckle flipped."""
    noisy = np.roll(truth, 3, axis=2)
    noisy = ndimage.binary_dilation(noisy, structure=np.ones((1, 5, 5), dtype=bool))
    rng = np.random.default_rng(seed)
    flip = rng.random(truth.shape) < 0.02
    return noisy ^ (flip & ndimage.binary_dilation(truth, iterations=4))


@pytest.mark.parametrize("dims", [3, 2])
def test_a_damaged_mask_on_a_two_intensity_ct_gets_closer_to_the_truth(dims):
    ct, truth = _phantom()
    noisy = _damaged(truth)
    before = _dice(noisy, truth)
    refined = refine_with_crf(ct, noisy, SPACING_KJI, CRFSettings(dims=dims))
    after = _dice(refined, truth)
    assert before < 0.88, f"the damage must be real (Dice {before:.3f})"
    assert after > 0.97, f"dims={dims}: Dice {before:.3f} -> {after:.3f}"


def test_the_lesion_settings_recover_a_small_dark_lesion():
    """A 6 mm lesion (40 HU) in 120 HU liver, the mask bloated by 2 voxels in-plane: the CRF trims it."""
    nk, nj, ni = 8, 48, 48
    kk, jj, ii = np.ogrid[:nk, :nj, :ni]
    truth = ((kk - 4) * 2.5 / 6.0) ** 2 + ((jj - 24) * 0.8 / 6.0) ** 2 + ((ii - 24) * 0.8 / 6.0) ** 2 <= 1.0
    ct = (np.where(truth, 40.0, 120.0) + np.random.default_rng(3).normal(0, 10, truth.shape)).astype(np.int16)
    noisy = ndimage.binary_dilation(truth, structure=np.ones((1, 5, 5), dtype=bool))
    refined = refine_with_crf(ct, noisy, SPACING_KJI, LESION_CRF)
    assert _dice(refined, truth) > _dice(noisy, truth) + 0.1


def test_the_ct_and_the_mask_are_never_modified():
    ct, truth = _phantom()
    noisy = _damaged(truth)
    ct_before, noisy_before = ct.copy(), noisy.copy()
    ct.flags.writeable = False  # an in-place write would raise
    noisy.flags.writeable = False
    refine_with_crf(ct, noisy, SPACING_KJI, CRFSettings(dims=3))
    refine_with_crf(ct, noisy, SPACING_KJI, CRFSettings(dims=2))
    np.testing.assert_array_equal(ct, ct_before)
    np.testing.assert_array_equal(noisy, noisy_before)


def test_the_result_stays_in_the_margin_box_the_mask_slices_in_2d_and_within():
    ct, truth = _phantom()
    noisy = np.zeros_like(truth)
    noisy[6:10] = ndimage.binary_erosion(truth[6:10], structure=np.ones((1, 9, 9), dtype=bool))  # too small
    within = np.zeros_like(truth)
    within[:, :, :40] = True  # the left half only
    # a narrow appearance kernel: with the organ's 20 mm one, the bright voxels the mask leaves out (more than it
    # holds) would vote the whole mask out; this test is about where the result may lie
    settings = CRFSettings(dims=3, margin_mm=4.0, bilateral_mm=5.0)
    refined = refine_with_crf(ct, noisy, SPACING_KJI, settings, within_kji=within)
    assert not refined[:, :, 40:].any(), "outside `within`"
    ks = np.flatnonzero(refined.any(axis=(1, 2)))
    assert ks.min() >= 6 - 2 and ks.max() <= 9 + 2, f"4 mm margin = 2 slices of 2.5 mm, got slices {ks}"
    refined_2d = refine_with_crf(ct, noisy, SPACING_KJI, replace(settings, dims=2))
    assert set(np.flatnonzero(refined_2d.any(axis=(1, 2)))) <= set(range(6, 10)), "2D adds no slice"
    assert refined_2d.sum() > noisy.sum(), "the under-segmented mask grows to the bright region"


def test_empty_mask_gives_an_empty_result_and_bad_arguments_are_refused():
    ct, truth = _phantom(shape=(4, 20, 20))
    assert not refine_with_crf(ct, np.zeros_like(truth), SPACING_KJI).any()
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        refine_with_crf(ct, truth, SPACING_KJI, CRFSettings(dims=4))
    with pytest.raises(ValueError, match="does not match CT shape"):
        refine_with_crf(ct, truth[:, :10], SPACING_KJI)


def test_segments_get_organ_or_lesion_settings_and_unknown_names_are_refused():
    liver = SegmentPrompts("liver", 1)
    tumour = SegmentPrompts("tumor", 2, inside="liver")
    assert crf_for_segments("", [liver, tumour]) == {}
    assert crf_for_segments("all", [liver, tumour]) == {"liver": ORGAN_CRF, "tumor": LESION_CRF}
    assert crf_for_segments("tumor", [liver, tumour]) == {"tumor": LESION_CRF}
    with pytest.raises(LiverSAMError, match=r"no segment named 'vessels'.*'liver', 'tumor'"):
        crf_for_segments("liver,vessels", [liver, tumour])


def test_a_missing_package_is_an_actionable_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # import fails as if not installed
    ct, truth = _phantom(shape=(4, 20, 20))
    with pytest.raises(CRFUnavailableError, match=r"pip install 'liversam\[crf\]'"):
        refine_with_crf(ct, truth, SPACING_KJI)
    with pytest.raises(CRFUnavailableError, match="pydensecrf2"):
        crf_for_segments("liver", [SegmentPrompts("liver", 1)])


def test_the_pipeline_refines_only_the_segments_asked_for():
    ct, truth = _phantom()
    volume = synthetic_volume(ct, (SPACING_KJI[2], SPACING_KJI[1], SPACING_KJI[0]))
    noisy = _damaged(truth)
    predictor = ScriptedPredictor(volume, {k: (noisy[k], 0.9) for k in range(truth.shape[0])})
    box = SlicePrompts(boxes_ij=[(5.0, 5.0, 75.0, 75.0)])
    prompts = [SegmentPrompts("liver", 1, slices={k: box for k in range(truth.shape[0]) if truth[k].any()})]
    plain = segment_volume(volume, prompts, predictor, PipelineSettings()).segment("liver").mask_kji
    refined = segment_volume(volume, prompts, predictor,
                             PipelineSettings(crf={"liver": CRFSettings(dims=3)})).segment("liver").mask_kji
    assert _dice(refined, truth) > _dice(plain, truth) + 0.05
    assert not refined[~truth.any(axis=(1, 2))].any(), "prompted slices only: the CRF adds no slice"


def test_segment_cli_refuses_an_unknown_crf_segment_before_loading_the_model(tmp_path, capsys):
    import json

    import SimpleITK as sitk

    from liversam.cli import main

    array = np.full((3, 40, 48), -1000, dtype=np.int16)
    array[:, 10:30, 12:36] = 60
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(ct))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"coordinate_system": "IJK", "segments": [
        {"name": "liver", "boxes": [[[12, 10, 1], [35, 29, 1]]]}]}))  # fmt: skip
    out = tmp_path / "o.seg.nrrd"
    args = ["segment", str(ct), "--prompts", str(prompts), "--output", str(out), "--check-only"]
    assert main([*args, "--crf", "tumour"]) == 2
    assert "--crf: no segment named 'tumour'; the prompts have 'liver'" in capsys.readouterr().err
    assert main([*args, "--crf", "liver"]) == 0
    assert not out.exists()


def test_evaluate_refuses_an_unknown_crf_structure():
    from liversam.evaluate import EvaluationSettings

    with pytest.raises(LiverSAMError, match=r"--crf: unknown structure\(s\) \['vessels'\]"):
        EvaluationSettings(protocols=("one-box",), crf=("liver", "vessels"))


def test_a_field_larger_than_max_voxels_runs_in_slabs_with_the_same_result():
    from liversam.dense_crf import _slabs

    # 5 mm kernel on 2.5 mm slices: 2 slices of context each side; 8 slices of 80 x 80 per field: 4 kept
    settings = CRFSettings(bilateral_mm=5.0, max_voxels=8 * 80 * 80)
    slabs = list(_slabs((16, 80, 80), SPACING_KJI[0], settings))
    kept = [k for _, _, keep_lo, keep_hi in slabs for k in range(keep_lo, keep_hi)]
    assert kept == list(range(16)), "every slice kept exactly once"
    assert len(slabs) == 4 and all(hi - lo <= 8 for lo, hi, _, _ in slabs)
    assert all(keep_lo - lo == min(keep_lo, 2) and hi - keep_hi == min(16 - keep_hi, 2)
               for lo, hi, keep_lo, keep_hi in slabs), "2 slices of context on each side where there are any"
    ct, truth = _phantom()
    noisy = _damaged(truth)
    whole = refine_with_crf(ct, noisy, SPACING_KJI, replace(settings, max_voxels=10**9))
    slabbed = refine_with_crf(ct, noisy, SPACING_KJI, settings)
    assert _dice(slabbed, whole) > 0.99 and _dice(slabbed, truth) > 0.97


def test_the_crf_pass_runs_after_propagation_and_clips_a_tumour_to_the_refined_liver():
    """The tumour is made exactly as without the CRF (its container is the unrefined liver), then clipped to
    the refined liver; the liver alone is refined."""
    ct, truth = _phantom()
    volume = synthetic_volume(ct, (SPACING_KJI[2], SPACING_KJI[1], SPACING_KJI[0]))
    noisy = _damaged(truth)
    ks = [k for k in range(truth.shape[0]) if truth[k].any()]
    tumour_region = np.zeros(truth.shape[1:], dtype=bool)
    tumour_region[30:50, 52:70] = True  # crosses the damaged liver's edge (it is shifted +3 in i)

    def script(k, prompts):
        (box,) = prompts.boxes_ij
        return (noisy[k], 0.9) if box[2] - box[0] > 40 else (tumour_region, 0.9)

    liver_box, tumour_box = SlicePrompts(boxes_ij=[(5.0, 5.0, 75.0, 75.0)]), SlicePrompts(boxes_ij=[(52, 30, 69, 49)])
    prompts = [SegmentPrompts("liver", 1, slices={k: liver_box for k in ks}),
               SegmentPrompts("tumor", 2, inside="liver", slices={k: tumour_box for k in ks})]
    settings = PipelineSettings(later_segment_wins=False)
    plain = segment_volume(volume, prompts, ScriptedPredictor(volume, script), settings)
    refined = segment_volume(volume, prompts, ScriptedPredictor(volume, script),
                             replace(settings, crf={"liver": CRFSettings()}))
    liver = refined.segment("liver").mask_kji
    assert _dice(liver, truth) > _dice(plain.segment("liver").mask_kji, truth) + 0.05
    np.testing.assert_array_equal(refined.segment("tumor").mask_kji, plain.segment("tumor").mask_kji & liver)
    assert (plain.segment("tumor").mask_kji & ~liver).any(), "the clipping to the refined liver is exercised"


def test_a_crf_that_would_take_most_of_a_thin_segment_away_leaves_it_as_it_was():
    """A liver three slices thick (a propagation capped at one slice each way): every voxel lies within the
    3D edge distance of the slab's ends, and the CRF must not erase it."""
    pytest.importorskip("pydensecrf.densecrf")
    ct = np.full((20, 48, 48), -100, dtype=np.int16)
    ct[:, 10:38, 10:38] = 100
    mask = np.zeros(ct.shape, dtype=bool)
    mask[9:12, 10:38, 10:38] = True
    from liversam.dense_crf import ORGAN_CRF, refine_with_crf

    out = refine_with_crf(ct, mask, (1.0, 1.0, 1.0), replace(ORGAN_CRF, min_slice_mm=0.0))
    assert out.sum() >= 0.5 * mask.sum()
    assert not (out & ~np.isin(np.arange(20), [8, 9, 10, 11, 12])[:, None, None]).any()


def test_a_slab_s_unary_is_computed_from_the_slab_and_equals_the_whole_box_s():
    """The unary of each slab comes from that slab and enough slices to reach the clipped probability, so a long
    box never needs its whole distance maps at once; the values are those of the whole box exactly."""
    from liversam.dense_crf import _slab_inside_probability, inside_probability, saturation_mm

    _, truth = _phantom(shape=(40, 60, 60))
    mask = _damaged(truth)
    mask[18:22] = True  # slices with no edge at all: saturated inside
    spacing = (1.0, 0.8, 0.8)
    assert 4.0 < saturation_mm(spacing, ORGAN_CRF) < 5.0  # 2 mm x ln(9) + half a voxel
    whole = inside_probability(mask, spacing, ORGAN_CRF)
    for lo, hi in ((0, 10), (5, 17), (17, 23), (19, 21), (30, 40), (0, 40)):
        part = _slab_inside_probability(mask, lo, hi, spacing, ORGAN_CRF)
        assert part.dtype == np.float32 and np.array_equal(part, whole[lo:hi]), (lo, hi)
    slab = np.zeros((40, 20, 20), dtype=bool)
    slab[5:35] = True  # whole slices: slices 15..19 and their reach hold no edge
    whole = inside_probability(slab, spacing, ORGAN_CRF)
    assert np.array_equal(_slab_inside_probability(slab, 15, 20, spacing, ORGAN_CRF), whole[15:20])
    assert np.allclose(whole[15:20], ORGAN_CRF.confidence)


def test_the_organ_crf_refines_thick_slices_and_leaves_thin_slices_as_they_are():
    """The organ's CRF pays on thick slices only (docs/RESULTS.md, session 7): on a thin-slice scan the pipeline
    keeps the propagated liver as it is and never builds the CRF's field (no 'dense CRF' stage)."""
    from liversam.dense_crf import ORGAN_CRF

    ct, truth = _phantom()
    noisy = _damaged(truth)
    assert ORGAN_CRF.min_slice_mm == 3.0 and LESION_CRF.min_slice_mm == 0.0
    thick = refine_with_crf(ct, noisy, (5.0, 0.8, 0.8), ORGAN_CRF)
    assert _dice(thick, truth) > _dice(noisy, truth) + 0.05
    thin = refine_with_crf(ct, noisy, (1.0, 0.8, 0.8), ORGAN_CRF)
    assert np.array_equal(thin, noisy) and thin is not noisy

    stages = []
    for thickness in (1.0, 5.0):
        volume = synthetic_volume(ct, (0.8, 0.8, thickness))
        predictor = ScriptedPredictor(volume, {k: (noisy[k], 0.9) for k in range(truth.shape[0])})
        box = SlicePrompts(boxes_ij=[(5.0, 5.0, 75.0, 75.0)])
        prompts = [SegmentPrompts("liver", 1, slices={k: box for k in range(truth.shape[0]) if truth[k].any()})]
        # the CRF alone: without the organ's rim trim, which comes after it (test_organ_rim.py)
        settings = PipelineSettings(crf=crf_for_segments("liver", prompts), organ_rim=None)
        result = segment_volume(volume, prompts, predictor, settings, progress=lambda stage, *_: stages.append(stage))
        refined = result.segment("liver").mask_kji
        if thickness == 1.0:
            assert "dense CRF 'liver'" not in stages
            assert np.array_equal(refined, result.provenance["before_crf"]["liver"])
        else:
            assert "dense CRF 'liver'" in stages
            assert _dice(refined, truth) > _dice(result.provenance["before_crf"]["liver"], truth) + 0.05
