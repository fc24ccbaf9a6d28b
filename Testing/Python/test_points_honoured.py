"""A point is the user's word on one spot: + joins it to the mask, - takes it out, whatever the model says; on a
slice with a box it edits only its neighbourhood (``POINT_REACH_MM``; benchmarks/click_edits.py measured why).

LiteMedSAM was trained on boxes. On lits117 slice 33 a - point on a thin leak at the liver's edge made the
accelerated model drop three quarters of the liver (9644 -> 2210 voxels) and keep the clicked voxel; the plain
model kept the voxel too. ``SlicePredictor.predict`` therefore takes the model's answer only within
``POINT_REACH_MM`` of the points (the box's mask elsewhere), erases a - point's disk (radius
``POINT_RADIUS_MM``) when the mask keeps the point and joins a + point's disk when it leaves it out.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import dice
from liversam.predictor import (
    POINT_RADIUS_MM,
    SlicePredictor,
    honour_points,
    local_changes,
    point_disk,
)
from liversam.prompts import SlicePrompts

LITS_BOX_33 = (0.0, 4.79, 126.24, 126.49)  # the box the browser test drags on slice 33
LEAK_POINT = (28.73, 32.51)  # a - point on the thin leak above the liver there (outside the label)


def test_disk_radius_is_in_millimetres():
    disk = point_disk((40, 40), (20.0, 20.0), (0.5, 2.0), radius_mm=3.0)
    js, is_ = np.nonzero(disk)
    assert (is_.min(), is_.max()) == (14, 26)  # 6 voxels of 0.5 mm each way
    assert (js.min(), js.max()) == (19, 21)  # 1 voxel of 2 mm each way
    assert point_disk((40, 40), (20.0, 20.0), (5.0, 5.0), radius_mm=3.0).sum() == 1  # at least its own voxel


def test_points_the_model_agrees_with_change_nothing():
    mask = np.zeros((30, 30), bool)
    mask[5:20, 5:20] = True
    same = honour_points(mask, [(10, 10)], [(25, 25)], (1.0, 1.0))
    assert np.array_equal(same, mask)


def test_a_plus_point_left_out_joins_and_a_minus_point_kept_leaves():
    mask = np.zeros((30, 30), bool)
    mask[5:20, 5:20] = True
    out = honour_points(mask, [(25.0, 25.0)], [(6.0, 6.0)], (1.0, 1.0), radius_mm=2.0)
    assert out[25, 25] and out[25, 27] and not out[25, 28]
    assert not out[6, 6] and not out[6, 8] and out[6, 9]
    assert not np.array_equal(out, mask)
    assert out[12, 12]  # far from both points: as the model said


def test_minus_point_wins_where_the_disks_overlap():
    mask = np.zeros((20, 20), bool)
    out = honour_points(mask, [(10.0, 10.0)], [(11.0, 10.0)], (1.0, 1.0), radius_mm=2.0)
    assert not out[10, 11] and not out[10, 10]


def test_points_outside_the_slice_are_ignored():
    mask = np.ones((10, 10), bool)
    assert np.array_equal(honour_points(mask, [(-5.0, 3.0)], [(40.0, 3.0)], (1.0, 1.0)), mask)


class _DropsEverythingOnMinus:
    """The real model, except that any - point makes it answer with almost nothing (a collapse)."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def decode(self, embedding, points_xy=None, point_labels=None, box_xyxy=None, mask_logits=None,
               multimask=False):
        low_res, iou = self._model.decode(embedding, points_xy, point_labels, box_xyxy, mask_logits, multimask)
        if point_labels is not None and (np.asarray(point_labels) == 0).any():
            low_res = low_res.clone()
            low_res[..., 8:, :] = -20.0  # only a strip survives
        return low_res, iou


def test_minus_point_on_a_leak_removes_it_and_keeps_the_liver(lits117_predictor, lits117_label):
    k = 33
    liver = lits117_label[k] > 0
    box_only = lits117_predictor.predict(k, SlicePrompts([LITS_BOX_33]))
    i, j = round(LEAK_POINT[0]), round(LEAK_POINT[1])
    assert box_only.mask_ji[j, i] and not liver[j, i]  # the leak is there
    corrected = lits117_predictor.predict(k, SlicePrompts([LITS_BOX_33], [], [LEAK_POINT]))
    assert not corrected.mask_ji[j, i]
    print(f"lits117 slice {k}: box Dice {dice(box_only.mask_ji, liver):.3f}, with the - point "
          f"{dice(corrected.mask_ji, liver):.3f}")
    assert dice(corrected.mask_ji, liver) >= 0.80


def test_a_collapse_caused_by_minus_points_erases_only_their_disks(litemedsam, lits117_volume):
    k = 33
    predictor = SlicePredictor(_DropsEverythingOnMinus(litemedsam), lits117_volume, readahead=False)
    box_only = predictor.predict(k, SlicePrompts([LITS_BOX_33]))
    corrected = predictor.predict(k, SlicePrompts([LITS_BOX_33], [], [LEAK_POINT]))
    disk = point_disk(box_only.mask_ji.shape, LEAK_POINT, lits117_volume.geometry.spacing_mm[:2], POINT_RADIUS_MM)
    assert np.array_equal(corrected.mask_ji, box_only.mask_ji & ~disk)


@pytest.mark.parametrize("with_minus", [False, True])
def test_points_without_a_box_are_honoured_too(lits117_predictor, lits117_label, with_minus):
    """A + point alone (the model's own choice of region) still contains its own voxel."""
    k = 33
    js, is_ = np.nonzero(lits117_label[k] > 0)
    point = (float(np.median(is_)), float(np.median(js)))
    prompts = SlicePrompts([], [point], [(point[0] + 30, point[1])] if with_minus else [])
    mask = lits117_predictor.predict(k, prompts).mask_ji
    assert mask[round(point[1]), round(point[0])]


def test_local_changes_keep_the_models_answer_only_near_the_points():
    reference = np.zeros((40, 40), bool)
    reference[5:35, 5:35] = True
    changed = np.zeros_like(reference)  # the model dropped everything
    changed[20:25, 20:25] = True
    out = local_changes(reference, changed, [(10.0, 10.0)], (1.0, 1.0), reach_mm=3.0)
    near = point_disk(reference.shape, (10.0, 10.0), (1.0, 1.0), 3.0)
    assert np.array_equal(out[near], changed[near]) and np.array_equal(out[~near], reference[~near])
    assert out[30, 30] and not out[10, 10]


def test_a_plus_point_on_the_rim_does_not_undo_the_rest_of_the_box_mask(lits117_predictor, lits117_label):
    # The rim voxel the box's mask misses most, clicked +: the model alone dropped a third of the liver there
    # with the OpenVINO encoder (9616 -> 6908 voxels); now the mask only gains around the click.
    k = 33
    liver = lits117_label[k] > 0
    box_only = lits117_predictor.predict(k, SlicePrompts([LITS_BOX_33])).mask_ji
    missed = liver & ~box_only
    js, is_ = np.nonzero(missed)
    point = (float(is_[len(is_) // 2]), float(js[len(js) // 2]))
    clicked = lits117_predictor.predict(k, SlicePrompts([LITS_BOX_33], [point], [])).mask_ji
    assert clicked[round(point[1]), round(point[0])]
    far = ~point_disk(liver.shape, point, lits117_predictor.volume.geometry.spacing_mm[:2], 3.0)
    assert np.array_equal(clicked[far], box_only[far])
    assert dice(clicked, liver) >= dice(box_only, liver) - 0.002
