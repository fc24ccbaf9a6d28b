"""An organ's slice masks keep the holes the model leaves (the hilum, large vessels); a lesion's are filled.

A scripted stand-in predictor (no model) returns, for a liver-sized box, a disc with a hole through it (open
at the organ's top and bottom, so no 3D cavity: the 3D clean-up's fill leaves it), and for a lesion box a
ring. Expected masks are computed here from the phantom's geometry, not by the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from liversam.pipeline import PipelineSettings, segment_volume
from liversam.postprocess import PostprocessSettings
from liversam.prompts import SegmentPrompts, SlicePrompts
from scripted_predictor import ScriptedPredictor, synthetic_volume

NK, NJ, NI = 12, 64, 64
LIVER_SLICES = range(2, 10)
LESION_BOX = (34.0, 34.0, 46.0, 46.0)


def _disc(cj: float, ci: float, radius: float) -> np.ndarray:
    jj, ii = np.mgrid[:NJ, :NI]
    return (jj - cj) ** 2 + (ii - ci) ** 2 <= radius**2


LIVER_HOLE = _disc(24, 24, 4)  # the hilum: a hole through every liver slice
LIVER_SLICE = _disc(32, 32, 20) & ~LIVER_HOLE
LESION_HOLE = _disc(40, 40, 2)
LESION_RING = _disc(40, 40, 5) & ~LESION_HOLE


@pytest.fixture
def phantom():
    hu = np.full((NK, NJ, NI), -100.0)
    hu[list(LIVER_SLICES)] = np.where(LIVER_SLICE, 100.0, -100.0)
    hu[list(LIVER_SLICES)] = np.where(LESION_RING, 40.0, hu[list(LIVER_SLICES)])
    return synthetic_volume(hu, (1.0, 1.0, 2.5))


def _predict(k: int, prompts: SlicePrompts):
    (box,) = prompts.boxes_ij
    if k not in LIVER_SLICES:
        return np.zeros((NJ, NI), bool), 0.95
    if box[2] - box[0] > 25:  # a liver-sized box
        return LIVER_SLICE, 0.95
    return LESION_RING, 0.9


def _segments(propagate: bool) -> list[SegmentPrompts]:
    liver = SegmentPrompts("liver", 1, (0.9, 0.5, 0.4), propagate=propagate)
    liver.slices[5] = SlicePrompts(boxes_ij=[(12.0, 12.0, 52.0, 52.0)])
    tumour = SegmentPrompts("tumor", 2, (0.3, 0.6, 0.9), inside="liver", propagate=propagate)
    tumour.slices[5] = SlicePrompts(boxes_ij=[LESION_BOX])
    return [liver, tumour]


@pytest.mark.parametrize("propagate", [True, False])
def test_the_organ_keeps_its_holes_the_lesion_is_filled(phantom, propagate: bool) -> None:
    result = segment_volume(phantom, _segments(propagate), ScriptedPredictor(phantom, _predict), PipelineSettings())
    liver, tumour = (s.mask_kji for s in result.segments)
    slices = list(LIVER_SLICES) if propagate else [5]
    for k in slices:
        assert not liver[k][LIVER_HOLE].any(), f"slice {k}: the liver's hole was filled"
        assert tumour[k][LESION_HOLE].all(), f"slice {k}: the lesion's hole was left"
        assert not (liver[k] & ~LIVER_SLICE).any() and liver[k].sum() > 0.8 * LIVER_SLICE.sum()


def test_the_organ_s_holes_are_filled_when_asked_and_nothing_when_filling_is_off(phantom) -> None:
    filled = PipelineSettings(fill_organ_slice_holes=True)
    liver = segment_volume(phantom, _segments(False), ScriptedPredictor(phantom, _predict), filled).segments[0]
    assert liver.mask_kji[5][LIVER_HOLE].all()
    off = PipelineSettings(slice_postprocess=PostprocessSettings(fill_holes=False))
    assert off.slice_postprocess_for(lesion=True).fill_holes is False
    assert off.slice_postprocess_for(lesion=False).fill_holes is False
    tumour = segment_volume(phantom, _segments(False), ScriptedPredictor(phantom, _predict), off).segments[1]
    assert not tumour.mask_kji[5][LESION_HOLE].any()
