"""A loose box around a small lesion: the lesion's contrast is read inside the model's mask when the box is
mostly liver (scripted predictor, synthetic CT; no model).

The lesion (a disc of radius 4 px, 49 px, 50 HU) sits in liver of 110 HU (noise SD 10 HU); the user's box is
14 px looser than the lesion on every side, so under 10 % of it is lesion-like and the box alone shows no
contrast. The model answers with a disc of radius 10 around the lesion (it took in the liver around it, as
LiteMedSAM does with a loose box).
"""

from __future__ import annotations

import numpy as np

from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import PropagationSettings, for_lesions, propagate_segment
from scripted_predictor import ScriptedPredictor, synthetic_volume

NK, NJ, NI = 5, 80, 80
K0 = 2
CENTRE = (40, 40)


def _disc(radius: float) -> np.ndarray:
    jj, ii = np.mgrid[:NJ, :NI]
    return (jj - CENTRE[0]) ** 2 + (ii - CENTRE[1]) ** 2 <= radius**2


def _run(lesion_hu: float):
    rng = np.random.default_rng(0)
    hu = np.full((NK, NJ, NI), -100.0)
    liver = np.zeros((NK, NJ, NI), dtype=bool)
    liver[:, 5:75, 5:75] = True
    hu[liver] = 110.0 + rng.normal(0.0, 10.0, int(liver.sum()))
    lesion = _disc(4)
    hu[K0][lesion] = lesion_hu
    model_mask = _disc(10)
    predictor = ScriptedPredictor(synthetic_volume(hu), {K0: (model_mask, 0.9)})
    loose_box = (CENTRE[1] - 4 - 14, CENTRE[0] - 4 - 14, CENTRE[1] + 4 + 14, CENTRE[0] + 4 + 14)
    seg = SegmentPrompts("tumor", 2, slices={K0: SlicePrompts(boxes_ij=[loose_box])}, propagate=True)
    outcome = propagate_segment(seg, predictor, for_lesions(PropagationSettings()), container_kji=liver)
    return outcome, lesion, model_mask, predictor


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_a_loose_box_finds_the_lesion_contrast_inside_the_model_mask() -> None:
    outcome, lesion, model_mask, _ = _run(lesion_hu=50.0)
    box_area = (2 * 18 + 1) ** 2
    assert lesion.sum() < 0.1 * box_area  # the box alone shows no contrast
    seed = outcome.mask_kji[K0]
    assert _dice(seed, lesion) >= 0.9, (int(seed.sum()), int(lesion.sum()))
    assert seed.sum() < 0.5 * model_mask.sum()  # the liver the model took in is gone


def test_an_isodense_lesion_keeps_the_model_mask() -> None:
    # No contrast in the box nor in the model's mask: the model's mask is kept as it is.
    outcome, _, model_mask, _ = _run(lesion_hu=110.0)
    assert np.array_equal(outcome.mask_kji[K0], model_mask)


def _contrast(box, margin_mm, monkeypatch):
    """The lesion contrast fitted on the seed of a lesion of 50 HU (radius 6 px) in a 50 x 50 px liver of 110 HU whose
    texture is coarse (noise SD 30 HU) 12-24 px from the lesion's centre and fine (SD 6 HU) farther out."""
    import liversam.propagation as propagation

    monkeypatch.setattr(propagation, "PARENCHYMA_LESION_MARGIN_MM", margin_mm)
    rng = np.random.default_rng(3)
    jj, ii = np.mgrid[:NJ, :NI]
    radius = np.hypot(jj - CENTRE[0], ii - CENTRE[1])
    band = (radius >= 12) & (radius <= 24)
    hu = np.full((NK, NJ, NI), -100.0)
    liver = np.zeros((NK, NJ, NI), dtype=bool)
    liver[:, 15:65, 15:65] = True
    for k in range(NK):
        noise = np.where(band, 30.0, 6.0) * rng.normal(0.0, 1.0, (NJ, NI))
        hu[k][liver[k]] = (110.0 + noise)[liver[k]]
    hu[K0][_disc(6)] = 50.0
    predictor = ScriptedPredictor(synthetic_volume(hu), {K0: (_disc(6), 0.9)})
    propagator = propagation._Propagator(predictor, for_lesions(PropagationSettings()),
                                         propagation.default_slice_postprocess(True), {}, liver, None, None, "tumor")
    return propagator._fit_contrast_of_seed(K0, SlicePrompts(boxes_ij=[box]))


def test_the_parenchyma_s_estimate_does_not_move_with_the_box_s_size(monkeypatch) -> None:
    tight = (CENTRE[1] - 6, CENTRE[0] - 6, CENTRE[1] + 6, CENTRE[0] + 6)
    loose = (CENTRE[1] - 22, CENTRE[0] - 22, CENTRE[1] + 22, CENTRE[0] + 22)  # takes in the coarse band
    now = [_contrast(box, 5.0, monkeypatch) for box in (tight, loose)]
    before = [_contrast(box, None, monkeypatch) for box in (tight, loose)]  # the whole box left out
    assert all(c is not None and c.polarity == -1 for c in now + before)
    # before, the loose box left the coarse band out of the parenchyma: a narrower spread, another threshold
    assert before[1].parenchyma_sd < 0.8 * before[0].parenchyma_sd
    # now only the box near the model's mask is left out: the loose box's parenchyma is the tight box's, nearly
    # (what differs: the ring just outside the tight box, within 5 mm of the mask, which only the loose box leaves out)
    assert abs(now[1].parenchyma_sd - now[0].parenchyma_sd) < 0.15 * now[0].parenchyma_sd
    assert abs(now[1].parenchyma_sd - now[0].parenchyma_sd) < 0.5 * abs(before[1].parenchyma_sd - before[0].parenchyma_sd)
    assert abs(now[1].parenchyma_hu - now[0].parenchyma_hu) <= 2.0
