"""A hypodense lesion that the liver's model mask cuts off goes on within its own footprint
(``PipelineSettings.lesions_continue_past_organ``; scripted predictor).

On ircadb17 the model's liver mask cut straight across a hypodense lesion on the liver's outline for four slices; the
lesion's track, clipped to the liver, collapsed there and both segments lost it. With the rule a lesion's track that
clipping would end goes on within the previous slice's lesion, and the liver takes what the lesion keeps. Where the
tissue beyond the liver is not lesion-like (fat), nothing is taken.
"""

from __future__ import annotations

import numpy as np

from liversam.pipeline import PipelineSettings, segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import _Propagator
from scripted_predictor import ScriptedPredictor, box_around, synthetic_volume

NK, NJ, NI = 9, 96, 96
LIVER_HU, LESION_HU, FAT_HU = 100.0, 50.0, -80.0
LIVER_SEED_K, LESION_K = 3, 4
CUT_FROM_K, CUT_I = 5, 52  # from this slice up, the model's liver stops short of column CUT_I


def _disc(cj: float, ci: float, radius: float) -> np.ndarray:
    jj, ii = np.mgrid[0:NJ, 0:NI]
    return (jj - cj) ** 2 + (ii - ci) ** 2 <= radius**2


def _scene(beyond_cut_hu: float):
    """A liver disc on every slice with a lesion disc just inside its outline on slices 2-7. From slice CUT_FROM_K on,
    the model's liver mask ends at column CUT_I, across the lesion. ``beyond_cut_hu``: what lies past the cut there
    (the lesion and liver, as on ircadb17, or fat: the liver really ends there)."""
    liver = np.zeros((NK, NJ, NI), dtype=bool)
    liver[:] = _disc(48, 40, 26)
    lesion = np.zeros_like(liver)
    lesion[2:8] = _disc(48, 57, 7)
    cut = np.zeros_like(liver)
    cut[CUT_FROM_K:, :, CUT_I:] = True
    rng = np.random.default_rng(0)
    hu = rng.normal(FAT_HU, 5.0, size=liver.shape)
    hu[liver] = LIVER_HU + rng.normal(0.0, 4.0, size=int(liver.sum()))
    hu[lesion] = LESION_HU + rng.normal(0.0, 4.0, size=int(lesion.sum()))
    if beyond_cut_hu != LESION_HU:
        hu[cut & liver] = beyond_cut_hu + rng.normal(0.0, 4.0, size=int((cut & liver).sum()))
    volume = synthetic_volume(np.round(hu), (0.8, 0.8, 2.5))

    def model(k: int, prompts: SlicePrompts):
        box = prompts.boxes_ij[0]
        if (box[2] - box[0]) > 30:  # the liver's box (the lesion's is 15 pixels wide)
            return liver[k] & ~cut[k], 0.95
        return lesion[k].copy(), 0.95

    segments = [
        SegmentPrompts("liver", 1, slices={LIVER_SEED_K: SlicePrompts(boxes_ij=[box_around(liver[LIVER_SEED_K])])},
                       propagate=True),
        SegmentPrompts("tumor", 2, slices={LESION_K: SlicePrompts(boxes_ij=[box_around(lesion[LESION_K])])},
                       propagate=True, inside="liver"),
    ]
    return volume, segments, model, liver, lesion, cut


def _segment(beyond_cut_hu: float, on: bool):
    volume, segments, model, liver, lesion, cut = _scene(beyond_cut_hu)
    settings = PipelineSettings(lesions_continue_past_organ=on, organ_rim=None, crf=())
    result = segment_volume(volume, segments, ScriptedPredictor(volume, model), settings)
    return {s.name: s.mask_kji for s in result.segments}, liver, lesion, cut


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_a_lesion_the_livers_mask_cuts_across_goes_on_and_the_liver_takes_it_back():
    on, liver, lesion, cut = _segment(LESION_HU, on=True)
    off, *_ = _segment(LESION_HU, on=False)
    past = slice(CUT_FROM_K, None)
    # off: clipped to the cut liver, the lesion's track ends at the cut; neither segment holds the lesion past it
    assert not off["tumor"][past].any()
    assert not (off["liver"][past] & lesion[past] & cut[past]).any()
    # on: the lesion is whole, past the cut too (the liver labelmap, liver and tumour, holds it)
    assert _dice(on["tumor"], lesion) > 0.9
    assert _dice(on["tumor"][past], lesion[past]) > 0.9
    assert ((on["liver"] | on["tumor"])[past] & lesion[past]).sum() > 0.9 * lesion[past].sum()
    # the lesion keeps to its own footprint: nothing else past the cut joins either segment
    assert not ((on["liver"] | on["tumor"]) & cut & ~lesion & ~off["liver"]).any()
    # below the cut the lesion is as good as without the rule (the later 3D steps see the whole lesion)
    below = slice(None, CUT_FROM_K)
    assert _dice(on["tumor"][below], lesion[below]) >= _dice(off["tumor"][below], lesion[below]) - 0.01


def test_fat_past_the_livers_end_is_not_taken(monkeypatch):
    """Where the liver really ends (fat past the cut), the lesion's footprint there is not lesion-like: the track ends
    at the cut as without the rule (which was asked)."""
    asked = []
    original = _Propagator._continue_past_container

    def spy(self, k, *args):
        asked.append(k)
        return original(self, k, *args)

    monkeypatch.setattr(_Propagator, "_continue_past_container", spy)
    on, liver, lesion, cut = _segment(FAT_HU, on=True)
    assert CUT_FROM_K in asked
    off, *_ = _segment(FAT_HU, on=False)
    for name in ("liver", "tumor"):
        np.testing.assert_array_equal(on[name], off[name])
    assert not (on["tumor"] & cut).any()
