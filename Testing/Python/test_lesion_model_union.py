"""A refined lesion also takes the model's own track when the model sees clearly more lesion than the intensity
does (``ModelTrackUnion``), and not when the model's mask is the liver around the lesion.

Synthetic: a liver of 110 HU filling the slices, a lesion disc on slices 6..14 whose core (a smaller disc, 50 HU)
is on the middle slices only; the rest of the lesion is 92 HU: clearly darker than the liver (its SD here is
about 3 HU) but brighter than the half-way threshold the prompted slice's core sets, so the intensity refinement
keeps only the core. The scripted model returns the lesion disc (it sees the outline).
"""

from __future__ import annotations

import numpy as np

from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import ModelTrackUnion, PropagationSettings, for_lesions, propagate_segment
from scripted_predictor import ScriptedPredictor, box_around, synthetic_volume

NK, NJ, NI = 21, 96, 96
K0 = 10
LESION_KS = range(6, 15)


def _disc(radius: float, cj: float = 48.0, ci: float = 48.0) -> np.ndarray:
    jj, ii = np.mgrid[0:NJ, 0:NI]
    return (jj - cj) ** 2 + (ii - ci) ** 2 <= radius**2


LESION = _disc(14)
CORE = _disc(11)


def _scene(model_mask_for):
    rng = np.random.default_rng(0)
    hu = 110.0 + rng.normal(0.0, 3.0, size=(NK, NJ, NI))
    for k in LESION_KS:
        hu[k][LESION] = 92.0 + rng.normal(0.0, 3.0, size=int(LESION.sum()))
        if abs(k - K0) <= 2:
            hu[k][CORE] = 50.0 + rng.normal(0.0, 3.0, size=int(CORE.sum()))
    volume = synthetic_volume(np.round(hu))
    liver = np.ones((NK, NJ, NI), dtype=bool)
    truth = np.zeros((NK, NJ, NI), dtype=bool)
    truth[list(LESION_KS)] = LESION
    predictor = ScriptedPredictor(volume, lambda k, prompts: (model_mask_for(k), 0.95))
    seg = SegmentPrompts("tumor", 2, slices={K0: SlicePrompts(boxes_ij=[box_around(LESION)])}, propagate=True,
                         inside="liver")
    return seg, predictor, liver, truth


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _run(model_mask_for, union):
    seg, predictor, liver, truth = _scene(model_mask_for)
    outcome = propagate_segment(seg, predictor, for_lesions(PropagationSettings()), container_kji=liver,
                                model_union=union)
    return outcome.mask_kji, truth


def test_the_model_track_joins_when_the_model_sees_more_lesion_than_the_intensity():
    def model(k):
        return LESION.copy() if k in LESION_KS else np.zeros((NJ, NI), dtype=bool)

    refined_only, truth = _run(model, None)
    united, _ = _run(model, ModelTrackUnion())
    # Refinement alone keeps the core of the middle slices: well below the lesion.
    assert _dice(refined_only, truth) < 0.6
    # United with the model's track: the whole lesion, and nothing outside it.
    assert _dice(united, truth) > 0.95
    assert not (united & ~truth).any()
    assert (united >= refined_only).all()  # a union: nothing the refinement found is lost


def test_the_model_track_stays_out_when_its_mask_is_the_liver_around_the_lesion():
    box = np.zeros((NJ, NI), dtype=bool)
    box[20:77, 20:77] = True  # the model's mask: the whole box, mostly 110 HU liver

    def model(k):
        return box.copy() if k in LESION_KS else np.zeros((NJ, NI), dtype=bool)

    refined_only, _ = _run(model, None)
    united, _ = _run(model, ModelTrackUnion())
    assert np.array_equal(united, refined_only)


def test_the_model_track_is_cut_where_it_outgrows_the_prompted_slice():
    big = _disc(20)

    def model(k):
        if k in LESION_KS:
            return LESION.copy()
        if k in (15, 16):  # past the lesion the model runs into a larger (lesion-dark) structure
            return big.copy()
        return np.zeros((NJ, NI), dtype=bool)

    united, truth = _run(model, ModelTrackUnion(max_growth=1.1))
    assert not united[15:].any()
    assert _dice(united, truth) > 0.95


def test_the_model_track_stays_out_when_what_it_adds_is_the_liver_beside_the_lesion():
    """A loose box around a lesion that is dark throughout: the refinement holds the whole lesion, the model's mask
    the lesion and a band of the liver beside it. The band is a third of the model's mask (under the whole-mask
    parenchyma limit, 0.4) but all of what the union would add: refused."""
    rng = np.random.default_rng(1)
    hu = 110.0 + rng.normal(0.0, 3.0, size=(NK, NJ, NI))
    band = np.zeros((NJ, NI), dtype=bool)
    band[64:72, 30:67] = True  # 296 px of liver just below the lesion (rows 34..62)
    for k in LESION_KS:
        hu[k][LESION] = 50.0 + rng.normal(0.0, 3.0, size=int(LESION.sum()))
    volume = synthetic_volume(np.round(hu))
    liver = np.ones((NK, NJ, NI), dtype=bool)

    def model(k, prompts):
        return (LESION | band) if k in LESION_KS else np.zeros((NJ, NI), dtype=bool), 0.95

    def run(union):
        predictor = ScriptedPredictor(volume, model)
        seg = SegmentPrompts("tumor", 2, slices={K0: SlicePrompts(boxes_ij=[box_around(LESION | band)])},
                             propagate=True, inside="liver")
        return propagate_segment(seg, predictor, for_lesions(PropagationSettings()), container_kji=liver,
                                 model_union=union).mask_kji

    model_mask = LESION | band
    assert band.sum() / model_mask.sum() < ModelTrackUnion().max_parenchyma_fraction  # the older condition passes
    refined_only = run(None)
    assert not (refined_only & band).any() and refined_only[K0].sum() >= 0.95 * LESION.sum()
    np.testing.assert_array_equal(run(ModelTrackUnion()), refined_only)
    # without the added-parenchyma condition the union took the band on every lesion slice
    unchecked = run(ModelTrackUnion(max_added_parenchyma_fraction=None))
    assert all((unchecked[k] & band).sum() == band.sum() for k in LESION_KS)
