"""Simulated user clicks for the interactive ``clicks`` evaluation protocol (2D, one axial slice at a time).

The simulated user looks at the current prediction and the reference, takes the **largest error region**
(connected component, 8-connectivity, of the false negatives ``ref & ~pred`` or of the false positives
``pred & ~ref``, largest by pixel count; a tie goes to the false negatives) and clicks at its **centre**:
the pixel of the region farthest from the region's boundary (maximum of the Euclidean distance transform
of the region, the array border counting as boundary, distances in mm when a spacing is given). That pixel
is always inside the region, so a click on a false-negative region is positive (add) and on a
false-positive region negative (remove). Pixels clicked before are avoided when the region has others
(as RITM's ``not_clicked_map`` does), so a click the model ignored is not repeated verbatim.

The first click of a slice is the same rule applied to an empty prediction: one positive click at the
centre of the largest reference component. Coordinates are voxel indices on the slice, ``(i, j)`` =
(column, row) = SAM's ``(x, y)``; masks are ``[j, i]`` arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .metrics import DICE_THRESHOLDS, dice, first_index_reaching


@dataclass(frozen=True)
class Click:
    """One simulated click on a slice: ``(i, j)`` voxel indices (column, row); ``positive`` adds."""

    i: int
    j: int
    positive: bool


def _largest_component(mask_ji: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest 8-connected component of ``mask_ji`` and its pixel count (empty mask -> (mask, 0))."""
    if not mask_ji.any():
        return mask_ji, 0
    labels, count = ndimage.label(mask_ji, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(sizes)) + 1  # argmax returns the first of equal sizes: deterministic
    return labels == best, int(sizes[best - 1])


def region_centre_ij(
    region_ji: np.ndarray,
    spacing_ji_mm: Sequence[float] | None = None,
    avoid_ij: Sequence[tuple[int, int]] = (),
) -> tuple[int, int]:
    """The pixel of ``region_ji`` (non-empty ``[j, i]`` mask) farthest from the region's boundary.

    The array border counts as boundary. Pixels listed in ``avoid_ij`` are not chosen unless the region
    has no other pixel. Returns ``(i, j)``.
    """
    region_ji = np.asarray(region_ji, dtype=bool)
    if region_ji.ndim != 2 or not region_ji.any():
        raise ValueError("region_centre_ij needs a non-empty 2D [j, i] mask")
    sampling = (1.0, 1.0) if spacing_ji_mm is None else tuple(float(s) for s in spacing_ji_mm)
    padded = np.pad(region_ji, 1, constant_values=False)  # the array border is outside the region
    distance = ndimage.distance_transform_edt(padded, sampling=sampling)[1:-1, 1:-1]
    score = np.where(region_ji, distance, -1.0)
    for i, j in avoid_ij:
        if 0 <= j < region_ji.shape[0] and 0 <= i < region_ji.shape[1] and region_ji[j, i]:
            score[j, i] = 0.0  # still inside, but any unclicked region pixel (distance >= 1) wins
    j, i = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(i), int(j)


def next_click(
    pred_ji: np.ndarray,
    ref_ji: np.ndarray,
    spacing_ji_mm: Sequence[float] | None = None,
    previous_clicks: Sequence[Click] = (),
) -> Click | None:
    """The click a user would add next, or ``None`` when the prediction equals the reference.

    ``pred_ji`` and ``ref_ji`` are boolean ``[j, i]`` masks of one slice; ``spacing_ji_mm`` is the pixel
    size (row, column) in mm.
    """
    pred_ji = np.asarray(pred_ji, dtype=bool)
    ref_ji = np.asarray(ref_ji, dtype=bool)
    if pred_ji.shape != ref_ji.shape or pred_ji.ndim != 2:
        raise ValueError(
            f"next_click needs two 2D masks of one shape, got {pred_ji.shape} and {ref_ji.shape}"
        )
    false_neg, n_fn = _largest_component(ref_ji & ~pred_ji)
    false_pos, n_fp = _largest_component(pred_ji & ~ref_ji)
    if n_fn == 0 and n_fp == 0:
        return None
    positive = n_fn >= n_fp
    region = false_neg if positive else false_pos
    i, j = region_centre_ij(region, spacing_ji_mm, avoid_ij=[(c.i, c.j) for c in previous_clicks])
    return Click(i=i, j=j, positive=positive)


# A slice predictor for the simulation: (clicks so far, previous low-res logits or None) -> (mask, logits).
ClickPredictFn = Callable[[list[Click], object], tuple[np.ndarray, object]]


@dataclass
class SliceClickResult:
    """The outcome of a click session on one slice.

    ``dice_per_click[n]`` is the Dice after click ``n + 1``; ``intersection_per_click`` and
    ``predicted_pixels_per_click`` allow pooling Dice over slices; ``noc`` maps a Dice threshold to the
    number of clicks that first reached it (``max_clicks`` cap when never reached).
    """

    k: int
    reference_pixels: int
    clicks: list[Click] = field(default_factory=list)
    dice_per_click: list[float] = field(default_factory=list)
    intersection_per_click: list[int] = field(default_factory=list)
    predicted_pixels_per_click: list[int] = field(default_factory=list)
    noc: dict[float, int] = field(default_factory=dict)
    # Dice of the prediction from the initial prompt alone (e.g. a box) before any click; None without one.
    dice_initial: float | None = None

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "reference_pixels": self.reference_pixels,
            "dice_initial": self.dice_initial,
            "clicks": [{"i": c.i, "j": c.j, "positive": c.positive} for c in self.clicks],
            "dice_per_click": list(self.dice_per_click),
            "noc": {f"{t:.2f}": n for t, n in self.noc.items()},
        }


def simulate_clicks_on_slice(
    predict: ClickPredictFn,
    ref_ji: np.ndarray,
    max_clicks: int = 20,
    k: int = -1,
    spacing_ji_mm: Sequence[float] | None = None,
    thresholds: Sequence[float] = DICE_THRESHOLDS,
    initial_prompt: bool = False,
) -> SliceClickResult:
    """Run a simulated interactive session on one slice.

    Starts from one positive click at the centre of the reference, then after each prediction adds the
    :func:`next_click` until ``max_clicks`` clicks. ``predict(clicks, previous_logits)`` returns the
    predicted ``[j, i]`` mask and whatever the model wants fed back next time (low-res logits or ``None``).
    When the prediction becomes perfect the session stops and the curve is padded with the last values.

    With ``initial_prompt`` the session first calls ``predict([], None)`` (the caller's own initial prompt,
    e.g. a box) and the clicks correct that prediction; NoC is then 0 when the initial prediction already
    reaches a threshold.
    """
    ref_ji = np.asarray(ref_ji, dtype=bool)
    if not ref_ji.any():
        raise ValueError(f"slice {k}: the reference is empty, there is nothing to click on")
    if max_clicks < 1:
        raise ValueError("max_clicks must be at least 1")
    result = SliceClickResult(k=k, reference_pixels=int(ref_ji.sum()))
    pred_ji = np.zeros_like(ref_ji)
    logits = None
    if initial_prompt:
        pred_ji, logits = predict([], None)
        pred_ji = np.asarray(pred_ji, dtype=bool)
        result.dice_initial = dice(pred_ji, ref_ji)
    for _ in range(max_clicks):
        click = next_click(pred_ji, ref_ji, spacing_ji_mm, result.clicks)
        if click is None:  # perfect: no more clicks needed, the curve stays where it is
            break
        result.clicks.append(click)
        pred_ji, logits = predict(list(result.clicks), logits)
        pred_ji = np.asarray(pred_ji, dtype=bool)
        result.dice_per_click.append(dice(pred_ji, ref_ji))
        result.intersection_per_click.append(int((pred_ji & ref_ji).sum()))
        result.predicted_pixels_per_click.append(int(pred_ji.sum()))
    if not result.dice_per_click:  # the initial prompt alone was perfect
        result.dice_per_click.append(1.0)
        result.intersection_per_click.append(int(ref_ji.sum()))
        result.predicted_pixels_per_click.append(int(ref_ji.sum()))
    while len(result.dice_per_click) < max_clicks:
        result.dice_per_click.append(result.dice_per_click[-1])
        result.intersection_per_click.append(result.intersection_per_click[-1])
        result.predicted_pixels_per_click.append(result.predicted_pixels_per_click[-1])
    result.noc = {}
    for t in thresholds:
        if result.dice_initial is not None and result.dice_initial >= t:
            result.noc[float(t)] = 0
        else:
            result.noc[float(t)] = first_index_reaching(result.dice_per_click, t, cap=max_clicks)
    return result


def pooled_dice_per_click(results: Sequence[SliceClickResult]) -> list[float]:
    """Dice over all slices together after each click: ``2 sum|P&R| / sum(|P| + |R|)`` per click index."""
    if not results:
        return []
    n_clicks = len(results[0].dice_per_click)
    ref_total = sum(r.reference_pixels for r in results)
    curve = []
    for n in range(n_clicks):
        inter = sum(r.intersection_per_click[n] for r in results)
        pred = sum(r.predicted_pixels_per_click[n] for r in results)
        curve.append(2.0 * inter / (pred + ref_total) if pred + ref_total else 1.0)
    return curve


def mean_dice_per_click(results: Sequence[SliceClickResult]) -> list[float]:
    """The mean over slices of the per-slice Dice after each click."""
    if not results:
        return []
    return [float(v) for v in np.mean([r.dice_per_click for r in results], axis=0)]
