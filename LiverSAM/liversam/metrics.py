"""Segmentation metrics: Dice, IoU, HD95, ASSD (in mm) and lesion-wise detection recall / precision.

All functions take boolean masks of the same shape (2D ``[j, i]`` slices or 3D ``[k, j, i]`` volumes) and,
where distances are involved, ``spacing_mm``: the voxel size **per array axis, in array order**. For a
``[k, j, i]`` array that is ``(sk, sj, si)``, i.e. ``ImageGeometry.spacing_mm`` (which is ``(si, sj, sk)``)
reversed; :func:`array_spacing_mm` does that conversion.

Conventions (chosen to match the LiTS challenge and MedPy; documented because papers differ):

- Dice and IoU of two empty masks are 1.0 (nothing to find, nothing found); of one empty and one
  non-empty mask 0.0.
- Surfaces are the mask voxels with at least one face-neighbour (6-connectivity in 3D, 4 in 2D) outside
  the mask; voxels on the array border count as surface. Distances are Euclidean between voxel centres,
  in mm.
- HD95 is the larger of the two directed 95th percentiles (pred -> ref surface distances and ref -> pred),
  as MedPy's ``hd95`` and MONAI's ``compute_hausdorff_distance(percentile=95)`` compute it; percentiles
  interpolate linearly (``numpy.percentile``).
- ASSD is the LiTS "average symmetric surface distance": the mean over the pooled set of both directed
  distance sets, ``(sum d(S_pred -> S_ref) + sum d(S_ref -> S_pred)) / (|S_pred| + |S_ref|)``.
- Distances of two empty masks are 0.0; of one empty and one non-empty mask ``inf`` (undefined): the
  aggregate functions skip non-finite values and count them, and JSON output writes them as ``null``.
- Lesions are 3D connected components with full (26-) connectivity (8 in 2D). A reference lesion is
  *detected* when at least one predicted component overlaps it by at least ``min_overlap_voxels`` voxels
  (default: any overlap, one voxel) -- the rule is symmetric, a predicted component is a true positive
  when it overlaps some reference lesion. Recall = detected reference lesions / reference lesions;
  precision = true-positive predicted components / predicted components. Both are ``nan`` when their
  denominator is zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

# The thresholds reported for interactive protocols (NoC@85, NoC@90).
DICE_THRESHOLDS = (0.85, 0.90)


def array_spacing_mm(spacing_ijk_mm: Sequence[float], ndim: int = 3) -> tuple[float, ...]:
    """Convert a geometry's ``(si, sj, sk)`` spacing to array-axis order ``(sk, sj, si)`` (or ``(sj, si)``
    for a 2D ``[j, i]`` slice when ``ndim == 2``)."""
    spacing = tuple(float(s) for s in spacing_ijk_mm)
    if len(spacing) != 3:
        raise ValueError(f"expected a 3-element (si, sj, sk) spacing in mm, got {spacing_ijk_mm!r}")
    reversed_spacing = spacing[::-1]
    return reversed_spacing if ndim == 3 else reversed_spacing[1:]


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred, ref


def _check_spacing(spacing_mm: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing_mm is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != ndim:
        raise ValueError(f"spacing_mm has {len(spacing)} values but the masks have {ndim} axes (array order)")
    if any(not s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be positive, got {spacing}")
    return spacing


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient ``2|P & R| / (|P| + |R|)``; 1.0 when both masks are empty."""
    pred, ref = _check_pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard) ``|P & R| / |P | R|``; 1.0 when both masks are empty."""
    pred, ref = _check_pair(pred, ref)
    union = int(np.logical_or(pred, ref).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, ref).sum()) / union


def surface_mask(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of ``mask``: in the mask with a face-neighbour outside it (array border = outside)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _union_bounding_box(pred: np.ndarray, ref: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of ``pred | ref`` grown by one voxel (clipped to the array)."""
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other_axes))
        lo = max(int(present[0]) - 1, 0)
        hi = min(int(present[-1]) + 2, union.shape[axis])
        box.append(slice(lo, hi))
    return tuple(box)


def directed_surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to the surface of ``ref``, and from ``ref`` to
    ``pred``. Both masks must be non-empty.

    The distance transforms run on the bounding box of ``pred | ref`` (plus one voxel), which gives the same
    distances as on the full array because every surface voxel lies inside that box.
    """
    pred, ref = _check_pair(pred, ref)
    spacing = _check_spacing(spacing_mm, pred.ndim)
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    box = _union_bounding_box(pred, ref)
    pred_surface = surface_mask(pred[box])
    ref_surface = surface_mask(ref[box])
    # distance_transform_edt measures the distance to the nearest zero: make the surfaces the zeros.
    dist_to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return dist_to_ref[pred_surface], dist_to_pred[ref_surface]


def _surface_distances_unless_empty(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float] | None
) -> float | tuple[np.ndarray, np.ndarray]:
    """The two directed surface-distance arrays, or the distance itself when a mask is empty
    (0.0 when both are, ``inf`` when exactly one is)."""
    pred, ref = _check_pair(pred, ref)
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return math.inf
    return directed_surface_distances(pred, ref, spacing_mm)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (max of the two directed 95th percentiles).

    0.0 when both masks are empty, ``inf`` when exactly one is.
    """
    distances = _surface_distances_unless_empty(pred, ref, spacing_mm)
    if isinstance(distances, float):
        return distances
    d_pred_ref, d_ref_pred = distances
    return float(max(np.percentile(d_pred_ref, 95), np.percentile(d_ref_pred, 95)))


def assd(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float] | None = None) -> float:
    """Average symmetric surface distance in mm (LiTS definition: mean of the pooled directed distances).

    0.0 when both masks are empty, ``inf`` when exactly one is.
    """
    distances = _surface_distances_unless_empty(pred, ref, spacing_mm)
    if isinstance(distances, float):
        return distances
    d_pred_ref, d_ref_pred = distances
    return float((d_pred_ref.sum() + d_ref_pred.sum()) / (d_pred_ref.size + d_ref_pred.size))


def connected_components(mask: np.ndarray, full_connectivity: bool = True) -> tuple[np.ndarray, int]:
    """Label connected components of ``mask`` (26-/8-connectivity by default, 6-/4- otherwise).

    Returns ``(labels, count)`` where ``labels`` is an int32 array, 0 outside the mask, 1..count inside.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if full_connectivity else 1)
    labels, count = ndimage.label(mask, structure=structure)
    return labels.astype(np.int32, copy=False), int(count)


@dataclass
class LesionDetection:
    """Lesion-wise detection counts and rates (see the module docstring for the matching rule)."""

    reference_lesions: int
    predicted_lesions: int
    detected_reference_lesions: int
    true_positive_predictions: int
    recall: float
    precision: float

    def to_dict(self) -> dict:
        return asdict(self)


def lesion_detection(
    pred: np.ndarray, ref: np.ndarray, min_overlap_voxels: int = 1, full_connectivity: bool = True
) -> LesionDetection:
    """Lesion-wise recall and precision between predicted and reference lesion masks.

    A reference lesion (connected component of ``ref``) is detected when a predicted component overlaps it
    by at least ``min_overlap_voxels`` voxels; a predicted component is a true positive when it overlaps a
    reference lesion by that much. Rates are ``nan`` when there is nothing to count.
    """
    pred, ref = _check_pair(pred, ref)
    if min_overlap_voxels < 1:
        raise ValueError("min_overlap_voxels must be at least 1")
    ref_labels, n_ref = connected_components(ref, full_connectivity)
    pred_labels, n_pred = connected_components(pred, full_connectivity)
    overlap = (ref_labels > 0) & (pred_labels > 0)
    if overlap.any():
        # Count voxels per (reference lesion, predicted component) pair in one pass.
        pair_codes = ref_labels[overlap].astype(np.int64) * (n_pred + 1) + pred_labels[overlap]
        codes, counts = np.unique(pair_codes, return_counts=True)
        matched = codes[counts >= min_overlap_voxels]
        detected_refs = np.unique(matched // (n_pred + 1)).size
        true_pos_preds = np.unique(matched % (n_pred + 1)).size
    else:
        detected_refs = true_pos_preds = 0
    return LesionDetection(
        reference_lesions=n_ref,
        predicted_lesions=n_pred,
        detected_reference_lesions=int(detected_refs),
        true_positive_predictions=int(true_pos_preds),
        recall=detected_refs / n_ref if n_ref else math.nan,
        precision=true_pos_preds / n_pred if n_pred else math.nan,
    )


def structure_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float] | None = None, lesions: bool = False
) -> dict[str, float | int]:
    """All overlap and distance metrics for one structure, as a flat dict.

    Keys: ``dice``, ``iou``, ``hd95_mm``, ``assd_mm``, ``reference_voxels``, ``predicted_voxels``,
    ``reference_volume_ml``, ``predicted_volume_ml`` and, with ``lesions=True``, ``lesion_recall``,
    ``lesion_precision``, ``reference_lesions``, ``predicted_lesions``, ``detected_reference_lesions``,
    ``true_positive_predictions``.
    """
    pred, ref = _check_pair(pred, ref)
    spacing = _check_spacing(spacing_mm, pred.ndim)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    result: dict[str, float | int] = {
        "dice": dice(pred, ref),
        "iou": iou(pred, ref),
        "hd95_mm": hd95(pred, ref, spacing),
        "assd_mm": assd(pred, ref, spacing),
        "reference_voxels": int(ref.sum()),
        "predicted_voxels": int(pred.sum()),
        "reference_volume_ml": int(ref.sum()) * voxel_ml,
        "predicted_volume_ml": int(pred.sum()) * voxel_ml,
    }
    if lesions:
        detection = lesion_detection(pred, ref)
        result.update(
            lesion_recall=detection.recall,
            lesion_precision=detection.precision,
            reference_lesions=detection.reference_lesions,
            predicted_lesions=detection.predicted_lesions,
            detected_reference_lesions=detection.detected_reference_lesions,
            true_positive_predictions=detection.true_positive_predictions,
        )
    return result


def summarize(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Mean, median, standard deviation, min and max of the finite values, and how many were not finite.

    Non-finite values (``inf`` distances to an empty mask, ``nan`` undefined rates, ``None``) are left out
    of the statistics and counted in ``n_undefined``; statistics of an empty set are ``None``.
    """
    all_values = list(values)
    finite = np.array(
        [float(v) for v in all_values if v is not None and math.isfinite(float(v))], dtype=float
    )
    summary: dict[str, float | int | None] = {
        "n": int(finite.size),
        "n_undefined": len(all_values) - int(finite.size),
    }
    if finite.size:
        summary.update(
            mean=float(finite.mean()),
            median=float(np.median(finite)),
            std=float(finite.std()),
            min=float(finite.min()),
            max=float(finite.max()),
        )
    else:
        summary.update(mean=None, median=None, std=None, min=None, max=None)
    return summary


def first_index_reaching(curve: Sequence[float], threshold: float, cap: int = 20) -> int:
    """Number of clicks (1-based) after which ``curve`` (Dice after click 1, 2, ...) first reaches
    ``threshold``; ``cap`` when it never does within the curve (the NoC@threshold convention)."""
    for index, value in enumerate(curve[:cap], start=1):
        if value >= threshold:
            return index
    return cap


def json_safe(value):
    """Recursively replace non-finite floats by ``None`` and numpy scalars by Python numbers, for JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value
