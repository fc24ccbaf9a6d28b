"""A hypodense lesion that the liver's model mask leaves out on the slice the user boxed it is not lost
(``PipelineSettings.hypodense_lesions_past_organ``; scripted predictor).

On lits117 averaged to 3 mm slices the model's liver mask cut a hypodense lesion on the liver's outline out on every
slice it spans; the tumour, clipped to the liver, lost the whole lesion the user had boxed. With the rule, a lesion
whose model mask lies a quarter or more outside the liver, is darker than the liver, and whose box shows that contrast
inside the liver too may leave the liver within its box on the prompted slice and within the previous slice's lesion
on the slices after, and the liver takes what the lesion holds there. A box whose model mask
spills into fat beside the liver, or whose part inside the liver shows no contrast (an isodense lesion whose mask
runs into dark tissue next door), stays within the liver.
"""

from __future__ import annotations

import numpy as np
import pytest

from liversam.pipeline import PipelineSettings, segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from scripted_predictor import ScriptedPredictor, box_around, synthetic_volume

NK, NJ, NI = 9, 96, 96
LIVER_HU, LESION_HU, FAT_HU, BOWEL_HU, VESSEL_HU = 100.0, 50.0, -80.0, 45.0, 180.0
LIVER_SEED_K, LESION_K = 2, 5
CUT_I = 58  # the model's liver mask stops short of this column where the lesion lies


def _disc(cj: float, ci: float, radius: float) -> np.ndarray:
    jj, ii = np.mgrid[0:NJ, 0:NI]
    return (jj - cj) ** 2 + (ii - ci) ** 2 <= radius**2


def _columns_from(i0: int) -> np.ndarray:
    return np.broadcast_to(np.arange(NI)[None, :] >= i0, (NJ, NI))


def _scene(lesion_hu: float = LESION_HU, spill_hu: float | None = None, bowel_off_seed: bool = False,
           vessel: bool = False):
    """A liver disc with a lesion disc (``lesion_hu``) on its outline on slices 3-7; the liver (the label) holds the
    lesion. The model's liver mask leaves out the lesion's columns from CUT_I on, on every slice. Its mask for the
    lesion's box is the lesion; with ``spill_hu``, also a patch of that tissue beside the liver, in the box's columns
    (fat, or bowel as dark as a lesion); with ``bowel_off_seed``, on the slices above the prompted one, also a loop of
    bowel as dark as the lesion that touches it outside the liver; with ``vessel``, the mask for the lesion's box also
    takes a bright vessel inside the liver away from the box, larger than the lesion (the mask is then hyperdense)."""
    lesion = np.zeros((NK, NJ, NI), dtype=bool)
    lesion[3:8] = _disc(48, 62, 8)
    liver = np.zeros_like(lesion)
    liver[:] = _disc(48, 40, 26)
    liver |= lesion
    cut = lesion & _columns_from(CUT_I)[None]
    spill = np.zeros_like(lesion)
    if spill_hu is not None:
        spill[3:8] = _disc(48, 78, 9) & ~_disc(48, 40, 26) & ~_disc(48, 62, 8)
    if bowel_off_seed:
        spill_hu = BOWEL_HU
        spill[LESION_K + 1 : 8] = _disc(48, 74, 6) & ~_disc(48, 40, 26) & ~_disc(48, 62, 8)
    bright = np.zeros_like(lesion)
    if vessel:
        bright[:] = _disc(48, 28, 9)
    rng = np.random.default_rng(0)
    hu = rng.normal(FAT_HU, 5.0, size=lesion.shape)
    hu[liver] = LIVER_HU + rng.normal(0.0, 4.0, size=int(liver.sum()))
    hu[lesion] = lesion_hu + rng.normal(0.0, 4.0, size=int(lesion.sum()))
    if spill_hu is not None:
        hu[spill] = spill_hu + rng.normal(0.0, 4.0, size=int(spill.sum()))
    hu[bright] = VESSEL_HU + rng.normal(0.0, 4.0, size=int(bright.sum()))
    volume = synthetic_volume(np.round(hu), (0.8, 0.8, 2.5))
    raw = lesion[LESION_K] | spill[LESION_K]

    def model(k: int, prompts: SlicePrompts):
        box = prompts.boxes_ij[0]
        if (box[2] - box[0]) > 45:  # the liver's box (a lesion's box is at most 37 pixels wide)
            return liver[k] & ~cut[k], 0.95
        return lesion[k] | spill[k] | bright[k], 0.95

    segments = [
        SegmentPrompts("liver", 1, slices={LIVER_SEED_K: SlicePrompts(boxes_ij=[box_around(liver[LIVER_SEED_K])])},
                       propagate=True),
        SegmentPrompts("tumor", 2, slices={LESION_K: SlicePrompts(boxes_ij=[box_around(raw)])}, propagate=True,
                       inside="liver"),
    ]
    return volume, segments, model, liver, lesion, spill


def _segment(on: bool, hyperdense: bool = True, **scene):
    volume, segments, model, liver, lesion, spill = _scene(**scene)
    settings = PipelineSettings(hypodense_lesions_past_organ=on, hyperdense_lesions_past_organ=hyperdense,
                                organ_rim=None, crf=())
    result = segment_volume(volume, segments, ScriptedPredictor(volume, model), settings)
    return {s.name: s.mask_kji for s in result.segments}, liver, lesion, spill


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_a_hypodense_lesion_the_livers_mask_leaves_out_is_kept_and_the_liver_takes_it_back():
    on, liver, lesion, _ = _segment(True)
    off, *_ = _segment(False)
    # off: clipped to the model's liver, the tumour keeps the lesion's few columns inside it at most
    assert _dice(off["tumor"], lesion) < 0.5
    assert _dice(on["tumor"], lesion) > 0.9
    assert _dice(on["liver"] | on["tumor"], liver) > 0.95


@pytest.mark.parametrize(("lesion_hu", "spill_hu"), [(LESION_HU, FAT_HU), (LIVER_HU, BOWEL_HU)],
                         ids=["mask spills into fat", "isodense lesion, mask spills into bowel"])
def test_a_mask_spilling_past_the_liver_into_other_tissue_stays_in_the_liver(lesion_hu, spill_hu):
    """The mask lies well outside the liver in both scenes; fat is not lesion-like, and an isodense lesion's box shows
    no contrast inside the liver: the rule leaves both as they were (identical masks on and off)."""
    volume, segments, model, liver, lesion, spill = _scene(lesion_hu, spill_hu)
    raw = lesion[LESION_K] | spill[LESION_K]
    cut = lesion[LESION_K] & _columns_from(CUT_I)
    assert (raw & ~(liver[LESION_K] & ~cut)).sum() >= 0.25 * raw.sum()  # the scene reaches the rule's first condition
    on, *_ = _segment(True, lesion_hu=lesion_hu, spill_hu=spill_hu)
    off, *_ = _segment(False, lesion_hu=lesion_hu, spill_hu=spill_hu)
    for name in ("liver", "tumor"):
        np.testing.assert_array_equal(on[name], off[name])
    assert not ((on["liver"] | on["tumor"]) & spill).any()


def test_a_mask_that_is_not_itself_hypodense_stays_in_the_liver():
    """Every other condition holds (the box fits hypodense inside the liver; the mask lies a quarter or more outside
    it, near it, and its part outside is the lesion, lesion-like), but the model's mask for the box is mostly a bright
    vessel inside the liver: fitted on its own it is hyperdense, and the rule leaves the tumour in the liver (the
    hyperdense rule is off here, so that only this rule could move it)."""
    volume, segments, model, liver, lesion, _ = _scene(vessel=True)
    raw = model(LESION_K, segments[1].slices[LESION_K])[0]
    inside = model(LESION_K, segments[0].slices[LIVER_SEED_K])[0]
    assert (raw & ~inside).sum() >= 0.25 * raw.sum() and (raw & ~inside & ~lesion[LESION_K]).sum() == 0
    assert (raw & ~lesion[LESION_K]).sum() > lesion[LESION_K].sum()  # more vessel than lesion in the mask
    on, *_ = _segment(True, hyperdense=False, vessel=True)
    off, *_ = _segment(False, hyperdense=False, vessel=True)
    for name in ("liver", "tumor"):
        np.testing.assert_array_equal(on[name], off[name])
    assert _dice(on["tumor"], lesion) < 0.5  # clipped to the model's liver, as without the rule


def test_off_its_prompted_slice_the_lesion_keeps_outside_the_liver_only_to_its_previous_slice():
    """Off its prompted slice, a hypodense lesion's track may keep outside the liver only what lies within the
    previous slice's lesion, not its whole box: a loop of bowel as dark as the lesion that touches it
    above the prompted slice stays out of both segments. On a noisy copy of lits117 (+20 HU) a small lesion's track,
    allowed its whole box, walked 100 slices along tissue beside the liver (liver Dice 0.9524 -> 0.9168)."""
    on, liver, lesion, bowel = _segment(True, bowel_off_seed=True)
    assert bowel[LESION_K + 1 :].any() and not bowel[LESION_K].any()
    assert not ((on["liver"] | on["tumor"]) & bowel).any()
    assert _dice(on["tumor"], lesion) > 0.9


def test_a_fix_of_a_hypodense_lesion_keeps_what_the_liver_left_out():
    """The server's re-propagation of a fix (``repropagate``) leaves the liver for such a lesion as well."""
    from liversam.propagation import REPROPAGATION_MAX_REACH, PropagationSettings, for_lesions, repropagate

    volume, segments, model, liver, lesion, _ = _scene()
    model_liver = np.stack([model(k, segments[0].slices[LIVER_SEED_K])[0] for k in range(NK)])
    tumour = segments[1]
    outcomes = {}
    for on in (True, False):
        seg = SegmentPrompts(tumour.name, tumour.label, slices=dict(tumour.slices), propagate=True, inside="liver")
        outcomes[on] = repropagate(np.zeros_like(liver), seg, LESION_K, seg.slices[LESION_K],
                                   ScriptedPredictor(volume, model), for_lesions(PropagationSettings()),
                                   container_kji=model_liver, hypodense_past_container=on)
    near = slice(LESION_K - REPROPAGATION_MAX_REACH, LESION_K + REPROPAGATION_MAX_REACH + 1)  # what a fix reaches
    assert _dice(outcomes[True].mask_kji[near], lesion[near]) > 0.9
    assert _dice(outcomes[False].mask_kji[near], lesion[near]) < 0.5
