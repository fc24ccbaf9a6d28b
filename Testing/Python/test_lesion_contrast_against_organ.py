"""A lesion boxed beside a large lesion: its contrast is fitted against the organ's parenchyma, not the other
lesion's tissue (scripted predictor, synthetic CT; no model).

The liver (115 HU, noise SD 15 HU) spans 16 slices. On the 8 slices around the seed a large lesion (60 HU) fills
most of it, so the parenchyma read around the seed (``PARENCHYMA_SLICES`` either side) is that lesion's tissue. A
small lesion (40 HU, a disc of radius 5 px) lies in the strip of plain liver beside it, in a box 7 px looser than
the lesion on every side; the model's mask for the box is a disc of radius 9 (it took in the liver around the
lesion, as LiteMedSAM does with a loose box). Against the large lesion's 60 HU the box's plain liver looks like a
hyperdense lesion; against the organ's 115 HU the small lesion is hypodense. lits117 had this on its last slice
(docs/RESULTS.md, session 29).
"""

from __future__ import annotations

import numpy as np
import pytest

import liversam.propagation as propagation
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import PropagationSettings, for_lesions, propagate_segment
from scripted_predictor import ScriptedPredictor, synthetic_volume

NK, NJ, NI = 16, 80, 80
K0 = 13
CENTRE = (40, 64)  # j, i: in the strip of plain liver (i 56..74) beside the large lesion


def _disc(radius: float) -> np.ndarray:
    jj, ii = np.mgrid[:NJ, :NI]
    return (jj - CENTRE[0]) ** 2 + (ii - CENTRE[1]) ** 2 <= radius**2


def _case(large_lesion: bool = True, lesion_hu: float = 40.0, loose: int = 7):
    rng = np.random.default_rng(0)
    hu = np.full((NK, NJ, NI), -100.0)
    liver = np.zeros((NK, NJ, NI), dtype=bool)
    liver[:, 5:75, 5:75] = True
    hu[liver] = 115.0 + rng.normal(0.0, 15.0, int(liver.sum()))
    large = np.zeros_like(liver)
    large[8:, 5:75, 5:56] = True
    if large_lesion:
        hu[large] = 60.0 + rng.normal(0.0, 15.0, int(large.sum()))
    hu[K0 - 1 : K0 + 2, _disc(5)] = lesion_hu  # on the slices either side too (a 3D median smooths across them)
    box = (CENTRE[1] - 5 - loose, CENTRE[0] - 5 - loose, CENTRE[1] + 5 + loose, CENTRE[0] + 5 + loose)
    predictor = ScriptedPredictor(synthetic_volume(hu), {K0: (_disc(9) & liver[K0], 0.9)})
    return predictor, liver, box


def _seed_contrast(predictor, liver, box):
    propagator = propagation._Propagator(predictor, for_lesions(PropagationSettings()),
                                         propagation.default_slice_postprocess(True), {}, liver, None, None, "tumor")
    return propagator._fit_contrast_of_seed(K0, SlicePrompts(boxes_ij=[box]))


def _seed_mask(predictor, liver, box) -> np.ndarray:
    seg = SegmentPrompts("tumor", 2, slices={K0: SlicePrompts(boxes_ij=[box])}, propagate=True)
    return propagate_segment(seg, predictor, for_lesions(PropagationSettings()), container_kji=liver).mask_kji[K0]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_a_box_beside_a_large_lesion_is_fitted_against_the_organ() -> None:
    predictor, liver, box = _case()
    contrast = _seed_contrast(predictor, liver, box)
    assert contrast is not None and contrast.polarity == -1
    # the lesion class is darker than 40 HU's disc alone: the box's edge takes in some of the large lesion too
    assert abs(contrast.parenchyma_hu - 115.0) <= 5.0 and contrast.lesion_hu <= 75.0
    seed = _seed_mask(predictor, liver, box)
    assert _dice(seed, _disc(5)) >= 0.8, (int(seed.sum()), int(_disc(5).sum()))


def test_without_the_check_the_plain_liver_is_taken_for_a_hyperdense_lesion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(propagation, "ORGAN_PARENCHYMA_CHECK", False)
    predictor, liver, box = _case()
    contrast = _seed_contrast(predictor, liver, box)
    assert contrast is not None and contrast.polarity == 1 and abs(contrast.parenchyma_hu - 60.0) <= 10.0
    seed = _seed_mask(predictor, liver, box)
    assert seed.sum() >= 3 * _disc(5).sum() and _dice(seed, _disc(5)) < 0.5  # the liver around the lesion


def test_a_contrast_on_the_organ_s_side_is_not_fitted_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same lesion in plain liver everywhere (no large lesion): the parenchyma around the seed is the organ's,
    and the organ-wide parenchyma is never read."""
    predictor, liver, box = _case(large_lesion=False)
    read = []
    monkeypatch.setattr(propagation._Propagator, "_organ_parenchyma", lambda self: read.append(1) or (115.0, 8.0))
    contrast = _seed_contrast(predictor, liver, box)
    assert contrast is not None and contrast.polarity == -1 and read == []


@pytest.mark.parametrize("loose", [3, 7])
def test_a_bright_lesion_beside_a_large_dark_one_is_fitted_against_the_organ(loose: int) -> None:
    """A hyperdense lesion (170 HU) in the strip of plain liver, box 3 px loose: around the seed the parenchyma is the
    large lesion's 60 HU, so the box's plain liver and the lesion both fit as "hyperdense" (lesion class 120 HU, just
    brighter than the organ's 115: the wrong-side check passes it) with a threshold of 90 HU, under the organ's own
    mode. The parenchyma around lies 55 HU on the far side of the organ's mode (``ORGAN_PARENCHYMA_FAR_HU``): the box is
    fitted against the organ, and the seed is the bright lesion alone (lits117's half-contrast copy, session 30). With a
    box 7 px loose, whose edge holds more of the large lesion's dark tissue than of the bright lesion, the re-fit keeps
    the lesion's side: fitted on either side it would be "hypodense", and the bright lesion would be lost."""
    predictor, liver, box = _case(lesion_hu=170.0, loose=loose)
    contrast = _seed_contrast(predictor, liver, box)
    assert contrast is not None and contrast.polarity == 1 and abs(contrast.parenchyma_hu - 115.0) <= 5.0
    assert contrast.threshold_hu > 130.0
    seed = _seed_mask(predictor, liver, box)
    assert _dice(seed, _disc(5)) >= 0.9, (int(seed.sum()), int(_disc(5).sum()))


def test_without_the_far_side_rule_the_bright_lesion_s_box_takes_the_liver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(propagation, "ORGAN_PARENCHYMA_FAR_HU", float("inf"))
    predictor, liver, box = _case(lesion_hu=170.0, loose=3)
    contrast = _seed_contrast(predictor, liver, box)
    assert contrast is not None and contrast.polarity == 1 and contrast.lesion_hu > 115.0  # the wrong-side check passes
    assert contrast.threshold_hu < 115.0  # the plain organ is "lesion-like"
    seed = _seed_mask(predictor, liver, box)
    assert seed.sum() >= 3 * _disc(5).sum() and _dice(seed, _disc(5)) < 0.5
