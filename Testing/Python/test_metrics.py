"""Metrics against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from liversam import metrics


def test_dice_and_iou_hand_computed() -> None:
    pred = np.array([1, 1, 0, 0], dtype=bool)
    ref = np.array([0, 1, 1, 0], dtype=bool)
    # |P & R| = 1, |P| + |R| = 4, |P | R| = 3
    assert metrics.dice(pred, ref) == pytest.approx(0.5)
    assert metrics.iou(pred, ref) == pytest.approx(1 / 3)


def test_dice_iou_empty_masks() -> None:
    empty = np.zeros((3, 4, 5), dtype=bool)
    full = np.zeros((3, 4, 5), dtype=bool)
    full[1, 2, 3] = True
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.iou(empty, empty) == 1.0
    assert metrics.dice(empty, full) == 0.0
    assert metrics.iou(full, empty) == 0.0


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_surface_of_cube_excludes_interior_and_counts_array_border() -> None:
    cube = np.zeros((5, 5, 5), dtype=bool)
    cube[1:4, 1:4, 1:4] = True
    surface = metrics.surface_mask(cube)
    assert surface.sum() == 26 and not surface[2, 2, 2]
    # A mask filling the array: the array border counts as outside, so the same 26 voxels are surface.
    assert metrics.surface_mask(np.ones((3, 3, 3), dtype=bool)).sum() == 26


def test_hd95_and_assd_with_anisotropic_spacing() -> None:
    pred = np.zeros((5, 5, 5), dtype=bool)
    ref = np.zeros((5, 5, 5), dtype=bool)
    pred[0, 0, 0] = True
    ref[2, 0, 0] = True
    # Array order (k, j, i): two slices apart at 3 mm per slice = 6 mm.
    assert metrics.hd95(pred, ref, spacing_mm=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert metrics.assd(pred, ref, spacing_mm=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    # The same offset along i (columns) with 0.5 mm columns: 1 mm.
    ref2 = np.zeros_like(ref)
    ref2[0, 0, 2] = True
    assert metrics.hd95(pred, ref2, spacing_mm=(3.0, 1.0, 0.5)) == pytest.approx(1.0)
    # Diagonal: sqrt(6^2 + 1^2).
    ref3 = np.zeros_like(ref)
    ref3[2, 0, 2] = True
    assert metrics.hd95(pred, ref3, spacing_mm=(3.0, 1.0, 0.5)) == pytest.approx(math.sqrt(37.0))


def test_hd95_percentile_and_pooled_assd() -> None:
    pred = np.zeros((1, 1, 6), dtype=bool)
    ref = np.zeros((1, 1, 6), dtype=bool)
    pred[0, 0, 0] = True
    ref[0, 0, 0] = True
    ref[0, 0, 4] = True
    spacing = (1.0, 1.0, 0.5)
    # pred -> ref distances: [0]; ref -> pred: [0, 2 mm].
    # Directed 95th percentiles: 0 and 0 + 0.95 * 2 = 1.9 (linear interpolation); HD95 = max = 1.9.
    assert metrics.hd95(pred, ref, spacing) == pytest.approx(1.9)
    # ASSD pools both directions: (0 + 0 + 2) / 3.
    assert metrics.assd(pred, ref, spacing) == pytest.approx(2.0 / 3.0)


def test_distances_of_identical_and_empty_masks() -> None:
    mask = np.zeros((4, 6, 6), dtype=bool)
    mask[1:3, 1:5, 2:4] = True
    assert metrics.hd95(mask, mask, (2.0, 0.7, 0.7)) == 0.0
    assert metrics.assd(mask, mask, (2.0, 0.7, 0.7)) == 0.0
    empty = np.zeros_like(mask)
    assert metrics.hd95(empty, empty) == 0.0
    assert metrics.assd(empty, empty) == 0.0
    assert math.isinf(metrics.hd95(empty, mask))
    assert math.isinf(metrics.assd(mask, empty))


def test_distance_on_cropped_box_matches_a_2d_hand_value() -> None:
    # Two filled squares far from the array origin: the bounding-box crop must not change distances.
    pred = np.zeros((40, 40), dtype=bool)
    ref = np.zeros((40, 40), dtype=bool)
    pred[20:23, 20:23] = True
    ref[20:23, 23:26] = True  # shifted by 3 columns
    # Every pred surface pixel is 3 columns (0.5 mm each = 1.5 mm) or less from the ref surface: the left
    # column of pred is 3 from ref's left column; the right column of pred is 1 from ref's left column.
    d_pred_ref, d_ref_pred = metrics.directed_surface_distances(pred, ref, spacing_mm=(1.0, 0.5))
    assert sorted(np.round(d_pred_ref, 6)) == sorted([1.5, 1.5, 1.5, 1.0, 1.0, 0.5, 0.5, 0.5])
    assert d_ref_pred.max() == pytest.approx(1.5)


def test_lesion_detection_recall_precision() -> None:
    ref = np.zeros((3, 12, 12), dtype=bool)
    pred = np.zeros_like(ref)
    ref[1, 1:3, 1:3] = True  # lesion A
    ref[1, 6:8, 1:3] = True  # lesion B
    ref[1, 6:8, 5:7] = True  # lesion C
    ref[0, 0, 0] = True  # diagonal neighbour of A: same lesion with 26-connectivity
    pred[1, 2, 2] = True  # P1 touches A by one voxel
    pred[1, 10:12, 10:12] = True  # P2 overlaps nothing
    pred[1, 7, 1:7] = True  # P3 overlaps B (2 voxels) and C (2 voxels)
    detection = metrics.lesion_detection(pred, ref)
    assert (detection.reference_lesions, detection.predicted_lesions) == (3, 3)
    assert detection.recall == pytest.approx(1.0)
    assert detection.precision == pytest.approx(2 / 3)
    strict = metrics.lesion_detection(pred, ref, min_overlap_voxels=2)
    assert strict.recall == pytest.approx(2 / 3)
    assert strict.precision == pytest.approx(1 / 3)
    nothing = metrics.lesion_detection(np.zeros_like(ref), np.zeros_like(ref))
    assert math.isnan(nothing.recall) and math.isnan(nothing.precision)


def test_structure_metrics_volumes_and_keys() -> None:
    ref = np.zeros((4, 4, 4), dtype=bool)
    ref[1:3, 1:3, 1:3] = True  # 8 voxels of 2 x 1 x 1 mm = 16 mm^3
    out = metrics.structure_metrics(ref, ref, spacing_mm=(2.0, 1.0, 1.0), lesions=True)
    assert out["dice"] == 1.0 and out["hd95_mm"] == 0.0
    assert out["reference_volume_ml"] == pytest.approx(0.016)
    assert out["lesion_recall"] == 1.0 and out["reference_lesions"] == 1


def test_array_spacing_conversion() -> None:
    assert metrics.array_spacing_mm((0.7, 0.8, 2.5)) == (2.5, 0.8, 0.7)
    assert metrics.array_spacing_mm((0.7, 0.8, 2.5), ndim=2) == (0.8, 0.7)


def test_summarize_skips_undefined_values() -> None:
    summary = metrics.summarize([1.0, 2.0, math.inf, math.nan, None, 4.0])
    assert summary["n"] == 3 and summary["n_undefined"] == 3
    assert summary["mean"] == pytest.approx(7 / 3)
    assert summary["median"] == pytest.approx(2.0)
    assert metrics.summarize([])["mean"] is None


def test_noc_and_json_safe() -> None:
    curve = [0.5, 0.8, 0.86, 0.91, 0.95]
    assert metrics.first_index_reaching(curve, 0.85) == 3
    assert metrics.first_index_reaching(curve, 0.90) == 4
    assert metrics.first_index_reaching(curve, 0.99, cap=20) == 20
    assert metrics.json_safe({"a": math.inf, "b": [np.float32(0.5), math.nan], 3: np.int64(2)}) == {
        "a": None,
        "b": [0.5, None],
        "3": 2,
    }


def test_structure_metrics_every_key_with_anisotropic_spacing() -> None:
    from liversam.metrics import structure_metrics

    ref = np.zeros((3, 10, 10), dtype=bool)
    ref[1, 2:6, 2:6] = True  # 16 voxels
    pred = np.zeros_like(ref)
    pred[1, 2:6, 4:8] = True  # 16 voxels, 8 shared; shifted 2 voxels along the last axis (0.5 mm each)
    pred[2, 8, 8] = True  # a second, false lesion
    spacing = (2.0, 1.0, 0.5)  # (k, j, i) mm
    m = structure_metrics(pred, ref, spacing, lesions=True)
    assert set(m) == {"dice", "iou", "hd95_mm", "assd_mm", "reference_voxels", "predicted_voxels",
                      "reference_volume_ml", "predicted_volume_ml", "lesion_recall", "lesion_precision",
                      "reference_lesions", "predicted_lesions", "detected_reference_lesions",
                      "true_positive_predictions"}  # fmt: skip
    assert m["dice"] == pytest.approx(2 * 8 / 33) and m["iou"] == pytest.approx(8 / 25)
    assert (m["reference_voxels"], m["predicted_voxels"]) == (16, 17)
    assert m["reference_volume_ml"] == pytest.approx(16 * 1.0 / 1000)
    assert m["predicted_volume_ml"] == pytest.approx(17 * 1.0 / 1000)
    assert (m["reference_lesions"], m["predicted_lesions"]) == (1, 2)
    assert (m["detected_reference_lesions"], m["true_positive_predictions"]) == (1, 1)
    assert m["lesion_recall"] == 1.0 and m["lesion_precision"] == 0.5
    # Distances in mm with this spacing: the shift of 2 voxels along i is 1 mm; the speck is far away.
    iso = structure_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["assd_mm"] < iso["assd_mm"] and m["hd95_mm"] < iso["hd95_mm"]
    assert "lesion_recall" not in iso


def test_summarize_every_statistic() -> None:
    from liversam.metrics import summarize

    s = summarize([1.0, 2.0, 6.0, None, float("inf"), float("nan")])
    assert s == {"n": 3, "n_undefined": 3, "mean": 3.0, "median": 2.0, "std": pytest.approx(np.std([1, 2, 6])),
                 "min": 1.0, "max": 6.0}  # fmt: skip
    assert summarize([]) == {"n": 0, "n_undefined": 0, "mean": None, "median": None, "std": None, "min": None,
                             "max": None}  # fmt: skip
