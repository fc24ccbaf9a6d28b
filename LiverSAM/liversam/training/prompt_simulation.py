"""Training prompts simulated from the labels, in the model's low-resolution mask frame.

All arrays here are ``[y, x]`` masks of side ``L`` (the decoder's low-resolution mask frame, 256 px for
every SAM variant); prompts are returned in *model-input* pixels (side ``S``), which is what the prompt
encoder takes: ``xy_input = (xy_lowres + 0.5) * S / L - 0.5`` (pixel centres aligned).

- Boxes: the target's tight box, each edge moved at random by up to ``box_jitter_fraction`` of the box
  side (and at most ``box_jitter_max_px`` input pixels), kept inside the image.
- Label points: positives drawn inside the target, negatives inside the box but outside the target.
- Error points: after a first prediction, one point at the most interior pixel of the largest error
  region (missed -> positive, leaked -> negative), as an annotator would click.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .config import PromptSimulationConfig


@dataclass
class TargetPrompt:
    """Prompts for one target, in model-input pixels. ``labels``: 1 positive, 0 negative."""

    box_xyxy: np.ndarray  # (4,)
    points_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))

    def with_point(self, xy: np.ndarray, positive: bool) -> TargetPrompt:
        return TargetPrompt(
            box_xyxy=self.box_xyxy,
            points_xy=np.concatenate([self.points_xy, np.asarray(xy, dtype=np.float32).reshape(1, 2)]),
            labels=np.concatenate([self.labels, np.array([1 if positive else 0], dtype=np.int64)]),
        )


def lowres_to_input(xy: np.ndarray, low_res: int, input_size: int) -> np.ndarray:
    return ((np.asarray(xy, dtype=np.float64) + 0.5) * (input_size / low_res) - 0.5).astype(np.float32)


def tight_box(mask_yx: np.ndarray) -> np.ndarray:
    """Inclusive (x0, y0, x1, y1) of a non-empty mask, in its own pixels."""
    rows = np.flatnonzero(mask_yx.any(axis=1))
    cols = np.flatnonzero(mask_yx.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


def jittered_box(
    mask_yx: np.ndarray, rng: np.random.Generator, config: PromptSimulationConfig, input_size: int
) -> np.ndarray:
    """The target's box with random edge jitter, in model-input pixels."""
    low_res = mask_yx.shape[0]
    box = tight_box(mask_yx)
    box_in = np.concatenate(
        [lowres_to_input(box[:2], low_res, input_size), lowres_to_input(box[2:], low_res, input_size)]
    )
    width, height = box_in[2] - box_in[0] + 1, box_in[3] - box_in[1] + 1
    limits = np.minimum(
        np.array([width, height, width, height]) * config.box_jitter_fraction, config.box_jitter_max_px
    )
    box_in = box_in + rng.uniform(-1.0, 1.0, size=4) * limits
    box_in = np.clip(box_in, 0, input_size - 1)
    x0, x1 = sorted((box_in[0], box_in[2]))
    y0, y1 = sorted((box_in[1], box_in[3]))
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def exact_box(mask_yx: np.ndarray, input_size: int) -> np.ndarray:
    """The tight box without jitter, in model-input pixels (used for validation)."""
    low_res = mask_yx.shape[0]
    box = tight_box(mask_yx)
    return np.concatenate(
        [lowres_to_input(box[:2], low_res, input_size), lowres_to_input(box[2:], low_res, input_size)]
    ).astype(np.float32)


def _sample_pixels(mask_yx: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.nonzero(mask_yx)
    if count <= 0 or ys.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    chosen = rng.choice(ys.size, size=min(count, ys.size), replace=False)
    return np.stack([xs[chosen], ys[chosen]], axis=1).astype(np.float64)


def simulate_prompt(
    target_yx: np.ndarray, rng: np.random.Generator, config: PromptSimulationConfig, input_size: int
) -> TargetPrompt:
    """A jittered box, and with probability ``point_prob`` positive/negative points from the label."""
    low_res = target_yx.shape[0]
    prompt = TargetPrompt(box_xyxy=jittered_box(target_yx, rng, config, input_size))
    if rng.random() < config.point_prob:
        n_pos = int(rng.integers(1, config.max_positive_points + 1))
        n_neg = int(rng.integers(0, config.max_negative_points + 1))
        x0, y0, x1, y1 = tight_box(target_yx).astype(int)
        in_box = np.zeros_like(target_yx, dtype=bool)
        in_box[y0 : y1 + 1, x0 : x1 + 1] = True
        for xy in _sample_pixels(target_yx, n_pos, rng):
            prompt = prompt.with_point(lowres_to_input(xy, low_res, input_size), True)
        for xy in _sample_pixels(in_box & ~target_yx, n_neg, rng):
            prompt = prompt.with_point(lowres_to_input(xy, low_res, input_size), False)
    return prompt


def error_point(prediction_yx: np.ndarray, target_yx: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The corrective click: the most interior pixel (x, y) of the largest error region and whether it is
    positive (missed target) or negative (leak). None when the prediction is exact."""
    missed = target_yx & ~prediction_yx
    leaked = prediction_yx & ~target_yx
    best: tuple[int, np.ndarray, bool] | None = None
    for region, positive in ((missed, True), (leaked, False)):
        if not region.any():
            continue
        labels, count = ndimage.label(region)
        sizes = ndimage.sum_labels(region, labels, index=np.arange(1, count + 1))
        largest = labels == (int(np.argmax(sizes)) + 1)
        size = int(sizes.max())
        if best is None or size > best[0]:
            distance = ndimage.distance_transform_edt(np.pad(largest, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
            best = (size, np.array([x, y], dtype=np.float64), positive)
    if best is None:
        return None
    return best[1], best[2]


def lesion_components(tumor_yx: np.ndarray, min_pixels: int = 1) -> list[np.ndarray]:
    """One mask per lesion on a slice: the 8-connected components of the tumour mask with at least
    ``min_pixels`` pixels."""
    labels, count = ndimage.label(tumor_yx, structure=np.ones((3, 3), dtype=bool))
    components = []
    for n in range(1, count + 1):
        component = labels == n
        if int(component.sum()) >= min_pixels:
            components.append(component)
    return components


# --- propagation-like prompts ---------------------------------------------------------------------------


def propagation_box(
    neighbour_yx: np.ndarray,
    margin_xy: tuple[float, float],
    rng: np.random.Generator,
    config: PromptSimulationConfig,
    input_size: int,
) -> np.ndarray:
    """The box ``liversam.propagation`` would give this slice when the neighbouring slice's mask is
    ``neighbour_yx``: its tight box grown by ``margin_xy`` (low-resolution pixels, x and y), each edge then
    moved by up to ``propagation_jitter_fraction`` of the box side (and ``box_jitter_max_px``), in
    model-input pixels, kept inside the image."""
    low_res = neighbour_yx.shape[0]
    x0, y0, x1, y1 = tight_box(neighbour_yx)
    mx, my = margin_xy
    grown = np.array([x0 - mx, y0 - my, x1 + mx, y1 + my], dtype=np.float64)
    box_in = np.concatenate(
        [lowres_to_input(grown[:2], low_res, input_size), lowres_to_input(grown[2:], low_res, input_size)]
    ).astype(np.float64)
    width, height = box_in[2] - box_in[0] + 1, box_in[3] - box_in[1] + 1
    limits = np.minimum(
        np.array([width, height, width, height]) * config.propagation_jitter_fraction, config.box_jitter_max_px
    )
    box_in = np.clip(box_in + rng.uniform(-1.0, 1.0, size=4) * limits, 0, input_size - 1)
    x0, x1 = sorted((box_in[0], box_in[2]))
    y0, y1 = sorted((box_in[1], box_in[3]))
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def overlapping(mask_yx: np.ndarray, reference_yx: np.ndarray, grow: int = 1) -> np.ndarray:
    """The union of the 8-connected components of ``mask_yx`` that touch ``reference_yx`` grown by
    ``grow`` pixels: a lesion's cross-section on a neighbouring slice (or, the other way round, what a
    lesion track tracks on this slice when it merges or splits)."""
    if not mask_yx.any() or not reference_yx.any():
        return np.zeros_like(mask_yx, dtype=bool)
    grown = ndimage.binary_dilation(reference_yx, iterations=grow) if grow > 0 else reference_yx
    labels, _ = ndimage.label(mask_yx, structure=np.ones((3, 3), dtype=bool))
    touched = np.unique(labels[grown & mask_yx])
    return np.isin(labels, touched[touched > 0])
