"""All lesion boxes in one ``tumor`` segment give the same masks as one segment per lesion (lits117).

A user puts every lesion box in one segment; ``liversam evaluate`` once gave each lesion its own segment.
Before the fix, a lesion's track stopped on any slice carrying another lesion's box near it (lesion 25 of
lits117 stopped at slice 43, where lesion 45 has its box), so the two set-ups gave different results.
Four neighbouring lesions on slices 27..53; the reference liver is the container.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from conftest import dice
from liversam.evaluate import one_box_seeds
from liversam.pipeline import PipelineSettings, segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import _prompt_overlaps

# Lesions 25, 45, 41 and 50 of the tumour label's 26-connected components (scipy's labelling order).
LESION_COMPONENTS = (25, 45, 41, 50)


def _lesions(label: np.ndarray) -> list[np.ndarray]:
    components, _ = ndimage.label(label == 2, structure=np.ones((3, 3, 3), dtype=bool))
    return [components == n for n in LESION_COMPONENTS]


def test_another_lesions_box_does_not_stop_a_track() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:40, 20:40] = True
    near = SlicePrompts(boxes_ij=[(41.0, 25.0, 50.0, 35.0)])  # next to the mask: another lesion's box
    same = SlicePrompts(boxes_ij=[(18.0, 19.0, 41.0, 42.0)])  # around the mask: this object's box
    assert not _prompt_overlaps(near, mask)
    assert _prompt_overlaps(same, mask)
    assert _prompt_overlaps(SlicePrompts(points_pos_ij=[(30.0, 30.0)]), mask)


def test_one_tumour_segment_equals_one_segment_per_lesion(
    lits117_volume, lits117_openvino_predictor, lits117_label
) -> None:
    liver = lits117_label > 0
    lesions = _lesions(lits117_label)
    seeds = [one_box_seeds(lesion, per_lesion=False)[0] for lesion in lesions]
    one = SegmentPrompts("tumor", 2, inside="liver", propagate=True)
    for k, box in seeds:
        one.add(k, SlicePrompts(boxes_ij=[tuple(float(v) for v in box)]))
    separate = [
        SegmentPrompts(f"tumor-{n}", 2 + n, inside="liver", propagate=True,
                       slices={k: SlicePrompts(boxes_ij=[tuple(float(v) for v in box)])})
        for n, (k, box) in enumerate(seeds, start=1)
    ]  # fmt: skip
    settings = PipelineSettings(later_segment_wins=False)
    together = segment_volume(
        lits117_volume, [one], lits117_openvino_predictor, settings, containers={"liver": liver}
    )
    apart = segment_volume(
        lits117_volume, separate, lits117_openvino_predictor, settings, containers={"liver": liver}
    )
    mask_one = together.segment("tumor").mask_kji
    mask_apart = np.zeros_like(mask_one)
    for seg in apart.segments:
        mask_apart |= seg.mask_kji
    reference = np.zeros_like(mask_one)
    for lesion in lesions:
        reference |= lesion
    print(
        f"one segment: {mask_one.sum()} voxels, Dice {dice(mask_one, reference):.3f}; "
        f"per lesion: {mask_apart.sum()} voxels, Dice {dice(mask_apart, reference):.3f}"
    )
    np.testing.assert_array_equal(mask_one, mask_apart)
    assert dice(mask_one, reference) >= 0.6  # the four lesions are found, not just the same emptiness
