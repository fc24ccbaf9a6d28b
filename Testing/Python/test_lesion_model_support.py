"""A lesion's refined track stops where the model's mask no longer holds what the refinement keeps
(``LesionContrastSettings.min_model_support``; scripted predictor).

The refinement keeps lesion-like pieces that continue the previous slice's lesion even where the model's mask misses
them. Past a faint lesion's end those pieces are the parenchyma's own darker tissue, and without this rule they carry
the track on through the organ, slice after slice, where the model sees nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

import liversam.propagation as propagation
from liversam.intensity_refinement import LesionContrastSettings, model_holds_lesion
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import PropagationSettings, for_lesions, propagate_segment
from scripted_predictor import ScriptedPredictor, box_around, synthetic_volume

NK, NJ, NI = 21, 96, 96
K0 = 6  # the prompted slice
LESION_END = 10  # the lesion lies on slices 3..10
LIVER_HU, DARK_HU = 110.0, 70.0


def _disc(radius: float) -> np.ndarray:
    jj, ii = np.mgrid[0:NJ, 0:NI]
    return (jj - 48.0) ** 2 + (ii - 48.0) ** 2 <= radius**2


def _scene():
    """A liver with a dark lesion on slices 3..10 and, under it on slices 11..20, tissue as dark that the model does
    not take (on slice 11 it holds 8 % of it, elsewhere nothing)."""
    rng = np.random.default_rng(3)
    lesion = np.zeros((NK, NJ, NI), dtype=bool)
    lesion[3 : LESION_END + 1] = _disc(10)
    dark = lesion.copy()
    dark[LESION_END + 1 :] = _disc(10)
    hu = LIVER_HU + rng.normal(0.0, 3.0, size=lesion.shape)
    hu[dark] = DARK_HU + rng.normal(0.0, 3.0, size=int(dark.sum()))
    volume = synthetic_volume(np.round(hu), (0.8, 0.8, 2.0))
    sliver = np.zeros((NJ, NI), dtype=bool)
    sliver[46:51, 40:45] = True  # 25 px (16 mm^2, kept by the clean-up) of the 317 px dark disc

    def model(k: int, prompts: SlicePrompts):
        if lesion[k].any():
            return lesion[k].copy(), 0.95
        return (sliver.copy() if k == LESION_END + 1 else np.zeros((NJ, NI), dtype=bool)), 0.95

    seg = SegmentPrompts("tumor", 2, slices={K0: SlicePrompts(boxes_ij=[box_around(lesion[K0])])}, propagate=True,
                         inside="liver")
    return lesion, seg, ScriptedPredictor(volume, model)


def _propagate():
    lesion, seg, predictor = _scene()
    liver = np.ones(lesion.shape, dtype=bool)
    outcome = propagate_segment(seg, predictor, for_lesions(PropagationSettings()), container_kji=liver,
                                lesion_extent=None)
    return lesion, outcome


def _slices(mask: np.ndarray) -> list[int]:
    return [int(k) for k in np.flatnonzero(mask.any(axis=(1, 2)))]


def test_the_track_stops_where_the_model_no_longer_holds_the_lesion():
    lesion, outcome = _propagate()
    assert _slices(outcome.mask_kji) == list(range(3, LESION_END + 1))
    assert outcome.tracks[0].stop_reasons["up"] == "the model's mask no longer holds the lesion"
    assert outcome.tracks[0].stop_reasons["down"] == "structure ended"  # the ordinary end, below the lesion
    inter = (outcome.mask_kji & lesion).sum()
    assert 2 * inter / (outcome.mask_kji.sum() + lesion.sum()) > 0.95


def test_without_the_rule_the_dark_tissue_carries_the_track_to_the_volume_end(monkeypatch: pytest.MonkeyPatch):
    """The counterfactual: the same scene with the rule taken out runs through every dark slice."""
    monkeypatch.setattr(propagation, "model_holds_lesion", lambda refined, model_mask: True)
    _, outcome = _propagate()
    assert _slices(outcome.mask_kji) == list(range(3, NK))
    assert outcome.tracks[0].stop_reasons["up"] == "volume end"


def test_model_holds_lesion_threshold():
    refined = np.zeros((10, 10), dtype=bool)
    refined[:, :5] = True  # 50 px
    model = np.zeros_like(refined)
    assert model_holds_lesion(np.zeros_like(refined), model)  # nothing to hold
    model[0, :4] = True  # holds 4 / 50 = 8 %
    assert not model_holds_lesion(refined, model)
    model[1, :1] = True  # 5 / 50 = 10 %: the default limit
    assert model_holds_lesion(refined, model)
    assert not model_holds_lesion(refined, model, LesionContrastSettings(min_model_support=0.2))
    model[:] = False
    assert model_holds_lesion(refined, model, LesionContrastSettings(min_model_support=None))
