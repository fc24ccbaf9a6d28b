"""One box on one slice around a real liver tumour (lits117), propagated through the lesion.

The reference liver is the container, so the test measures the tumour's propagation alone. The refinement
by intensity (``liversam.intensity_refinement``) must clearly beat the model's box-only masks; both runs
share the slice embeddings, so about 20 slices are encoded once.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage

from conftest import dice
from liversam.evaluate import one_box_seeds
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import PropagationSettings, for_lesions, propagate_segment


def test_one_box_tumour_propagation_with_intensity_refinement(lits117_openvino_predictor, lits117_label):
    liver = lits117_label > 0
    components, _ = ndimage.label(lits117_label == 2, structure=np.ones((3, 3, 3), dtype=bool))
    lesion = components == components[37, 63, 15]  # a 2,488-voxel lesion on slices 27..45
    span = np.flatnonzero(lesion.any(axis=(1, 2)))
    [(k, box)] = one_box_seeds(lesion, per_lesion=False)
    seg = SegmentPrompts(
        "tumor-1", 2, slices={k: SlicePrompts(boxes_ij=[box])}, inside="liver", propagate=True
    )

    refined = propagate_segment(
        seg, lits117_openvino_predictor, for_lesions(PropagationSettings()), container_kji=liver
    )
    plain_settings = replace(for_lesions(PropagationSettings()), intensity_refinement=False)
    plain = propagate_segment(seg, lits117_openvino_predictor, plain_settings, container_kji=liver)
    d_refined, d_plain = dice(refined.mask_kji, lesion), dice(plain.mask_kji, lesion)
    print(
        f"lesion slices {span[0]}..{span[-1]}, seed {k}: Dice refined {d_refined:.3f}, box only {d_plain:.3f}; "
        f"stops {refined.tracks[0].stop_reasons}; computed {len(refined.computed_slices)}"
    )
    assert d_refined >= 0.79  # measured 0.816 (box only 0.643)
    assert d_refined >= d_plain + 0.1
    # It stops near the lesion's ends instead of running through the liver.
    got = np.flatnonzero(refined.mask_kji.any(axis=(1, 2)))
    assert abs(int(got[0]) - int(span[0])) <= 3 and abs(int(got[-1]) - int(span[-1])) <= 3
    assert len(set(refined.computed_slices)) <= len(span) + 4
    assert not (refined.mask_kji & ~liver).any()


def test_a_loose_box_around_a_small_tumour_still_refines_it(lits117_openvino_predictor, lits117_label):
    """A box 7 mm looser than a 317-voxel lesion (slices 7..18): too little of the box is lesion-like to show the
    lesion's contrast, so it is read inside the model's mask on the seed slice (session 6). Measured: Dice 0.852
    over 11 computed slices; before, the raw model masks of the loose box ran through the liver: 0.334 over 20."""
    from liversam.evaluate import EvaluationSettings, styled_box

    liver = lits117_label > 0
    components, _ = ndimage.label(lits117_label == 2, structure=np.ones((3, 3, 3), dtype=bool))
    lesion = components == components[10, 57, 78]
    span = np.flatnonzero(lesion.any(axis=(1, 2)))
    [(k, box)] = one_box_seeds(lesion, per_lesion=False)
    spacing = lits117_openvino_predictor.volume.geometry.spacing_mm
    loose = styled_box(box, "loose", lesion.shape[1:], (spacing[0], spacing[1]),
                       EvaluationSettings(protocols=("one-box",)), np.random.default_rng(0))  # fmt: skip
    assert (loose[2] - loose[0]) * (loose[3] - loose[1]) >= 4 * (box[2] - box[0]) * (box[3] - box[1])
    seg = SegmentPrompts(
        "tumor", 2, slices={k: SlicePrompts(boxes_ij=[loose])}, inside="liver", propagate=True
    )
    outcome = propagate_segment(
        seg, lits117_openvino_predictor, for_lesions(PropagationSettings()), container_kji=liver
    )
    d = dice(outcome.mask_kji, lesion)
    print(
        f"loose box {loose} (tight {box}) on slice {k}: Dice {d:.3f}, computed {len(set(outcome.computed_slices))}"
    )
    assert d >= 0.75
    assert len(set(outcome.computed_slices)) <= len(span) + 4
