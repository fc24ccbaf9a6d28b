"""Intensity-aware refinement of propagated masks: lesions inside an organ, and organs against neighbours.

**Organs** (:func:`prune_foreign_tissue`). Propagating the liver slice by slice, SAM's box grows over a
neighbour that touches the liver in the plane (the right kidney, the heart, bowel); the model follows it
because the box holds it. On each propagated slice, tissue far brighter (enhanced kidney cortex, bone,
contrast) or far darker (fat, air) than the organ's parenchyma on the prompted slice is set aside; of what is
left, the piece that continues the previous slice's organ most (the largest piece when none touches it) and
every piece that lies at least half on the previous slice's organ are kept, holes filled inside the model's
mask (the organ's own vessels and lesions come back that way).

**Lesions** (:func:`refine_slice_mask`).
A liver tumour differs from the liver around it mainly by its attenuation (most are hypodense in the
portal-venous phase, some hyperdense). SAM's box prompt alone cannot tell a lobulated lesion from the liver
that fills much of its box; the CT can. This module:

1. estimates the organ's parenchyma attenuation (the mode of the smoothed HU histogram of the container
   around the seed, outside the box: robust to the lesions it contains) and its spread;
2. from the user's box on the seed slice, decides whether the lesion is hypo- or hyperdense and how far
   from the parenchyma it lies, and sets the threshold half-way between the two
   (:func:`fit_lesion_contrast`; ``None`` when the box holds no lesion-like contrast, so SAM's mask is
   kept as it is);
3. on every slice, keeps the lesion-like parts of the box that the model's mask covers or that continue the
   previous slice's lesion (:func:`refine_slice_mask`); a propagated slice whose result the model's mask barely
   holds ends the track (:func:`model_holds_lesion`).

The CT is read, never modified: smoothing (a median whose window grows with the scan's noise, across the
neighbouring slices too when they are thin) works on a float copy of the part of a slice it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

HU_BIN = 2.0  # histogram bin (HU) for the parenchyma mode
HU_MODE_SMOOTHING = 5.0  # Gaussian smoothing of that histogram (HU)
# Residual noise wanted after the median (HU). lits117 (noise 12.6 HU): a 3 x 3 median, one-box tumour Dice
# 0.79 (5 x 5: 0.77); lits117 + 25 HU of added noise (28 HU): 5 x 5, 0.72 (3 x 3: 0.67, 7 x 7: 0.68); since
# session 18 thin slices take 3 x 3 x 3 for such noise instead (``THIN_SLICE_MM``).
MEDIAN_TARGET_NOISE_HU = 8.0
# A lesion-like voxel lies within max(2 SD of the parenchyma, 40 HU) beyond the lesion's median HU. lits117
# one-box tumour Dice 0.779 -> 0.791 (noisy copy 0.733 -> 0.739); 3 SD: 0.788.
LESION_BAND_SD = 2.0
LESION_BAND_MIN_HU = 40.0
# Slices this thin or thinner smooth across their neighbours when the noise needs more than a 3 x 3 median
# (:func:`median_window_for_noise`). The four development cases (9 to 16 HU of noise) all take 3 x 3 and do not
# change. Measured on copies with noise added (docs/RESULTS.md, session 18), one-box tumour Dice, tight / jittered /
# loose boxes: lits117 (1 mm nominal) + 20 HU (24 HU in all, 5 x 5 -> 3 x 3 x 3) 0.717 / 0.622 / 0.721 -> 0.783 /
# 0.611 / 0.728; ircadb17 (1.6 mm) + 20 HU (27 HU) 0.867 / 0.868 / 0.874 -> 0.870 / 0.870 / 0.876; lits117 + 30 HU
# (32.5 HU, 7 x 7 -> 3 x 3 x 3) liver 0.938 -> 0.948, tumour 0.748 / 0.720 / 0.671 -> 0.808 / 0.693 / 0.755 (3 x 5
# x 5, wider than this noise needs: 0.770 / 0.652 / 0.702). Nothing was measured between 1.6 and 5 mm: the limit
# keeps the window within 6 mm along the body.
THIN_SLICE_MM = 2.0


@dataclass(frozen=True)
class LesionContrastSettings:
    min_contrast_hu: float = 15.0  # lesion class must differ from the parenchyma by at least this much
    min_lesion_fraction: float = 0.1  # of the box (inside the organ) that must be lesion-like at the seed
    outlier_sd: float = 2.0  # a voxel is a lesion candidate when this many SDs away from the parenchyma
    min_touch_fraction: float = 0.3  # a lesion-like piece is kept when the model's mask covers this much of it
    min_continuation: float = 0.3  # ... or when this much of it lies on the previous slice's lesion
    # A propagated slice's lesion must be held this much by the model's own mask, else the track stops there
    # (:func:`model_holds_lesion`). None: no such rule.
    min_model_support: float | None = 0.1


@dataclass(frozen=True)
class OrganIntensitySettings:
    """Which tissue is foreign to an organ: brighter than mode + max(bright_sd x SD, min_bright_hu) or darker
    than mode - max(dark_sd x SD, min_dark_hu); a piece continues the previous slice's organ when at least
    ``min_continuation`` of it lies on it."""

    bright_sd: float = 3.0
    min_bright_hu: float = 40.0
    dark_sd: float = 8.0
    min_dark_hu: float = 100.0
    min_continuation: float = 0.5


@dataclass(frozen=True)
class LesionContrast:
    """How a lesion differs from its organ: ``polarity`` -1 (hypodense) or +1 (hyperdense)."""

    polarity: int
    parenchyma_hu: float
    parenchyma_sd: float
    lesion_hu: float
    threshold_hu: float

    def lesion_like(self, smoothed_ji: np.ndarray) -> np.ndarray:
        """Voxels on the lesion's side of the threshold, but not far past the lesion's own attenuation (fat,
        fluid or air at the organ's edge for a hypodense lesion; bone or contrast for a hyperdense one)."""
        far = max(LESION_BAND_SD * self.parenchyma_sd, LESION_BAND_MIN_HU)
        if self.polarity < 0:
            return (smoothed_ji < self.threshold_hu) & (smoothed_ji > self.lesion_hu - far)
        return (smoothed_ji > self.threshold_hu) & (smoothed_ji < self.lesion_hu + far)


def smooth_slice(slice_ji: np.ndarray, size: int = 3, within: np.ndarray | None = None) -> np.ndarray:
    """A ``size`` x ``size`` median of one axial slice (float copy): takes the voxel noise out of the HU
    comparison. With ``within`` (a [j, i] mask) only its bounding box is computed (a 5 x 5 median of a whole
    512 x 512 slice costs about 80 ms here); elsewhere the result is NaN, which no HU comparison accepts."""
    return smooth_slice_in_volume(np.asarray(slice_ji)[None], 0, (1, size), within)


def smooth_slice_in_volume(
    array_kji: np.ndarray, k: int, window: tuple[int, int] = (1, 3), within: np.ndarray | None = None
) -> np.ndarray:
    """Slice ``k`` of ``array_kji`` smoothed by a median of ``window`` = (slices, in-plane size), as a float copy:
    (1, n) in the plane (:func:`smooth_slice`), (3, n) with the slices on either side too (repeated at the volume's
    ends). With ``within`` only its bounding box is computed (NaN elsewhere); the array is read, never modified."""
    depth, size = window
    out = np.full(array_kji.shape[1:], np.nan, dtype=np.float32)
    if within is None:
        within = np.ones(array_kji.shape[1:], dtype=bool)
    js, is_ = np.nonzero(within)
    if js.size == 0:
        return out
    jmin, jmax, imin, imax = int(js.min()), int(js.max()), int(is_.min()), int(is_.max())
    pad, reach = size // 2, depth // 2  # the median near the box's edge needs the real neighbours outside it
    j0, i0 = max(jmin - pad, 0), max(imin - pad, 0)
    ks = np.clip(np.arange(k - reach, k + reach + 1), 0, array_kji.shape[0] - 1)
    block = array_kji[ks, j0 : jmax + pad + 1, i0 : imax + pad + 1].astype(np.float32)
    smoothed = ndimage.median_filter(block, size=(depth, size, size), mode="nearest")[reach]
    out[jmin : jmax + 1, imin : imax + 1] = smoothed[jmin - j0 : jmax - j0 + 1, imin - i0 : imax - i0 + 1]
    return out


def estimate_noise_hu(slices_ji: list[np.ndarray], masks_ji: list[np.ndarray]) -> float:
    """The CT's voxel noise (HU, robust SD) inside the masks, from differences of in-plane neighbours."""
    diffs = []
    for image, mask in zip(slices_ji, masks_ji, strict=True):
        image = np.asarray(image, dtype=np.float32)
        both = mask[:, 1:] & mask[:, :-1]
        diffs.append((image[:, 1:] - image[:, :-1])[both])
    values = np.concatenate(diffs) if diffs else np.zeros(0)
    if values.size < 20:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))) / np.sqrt(2.0))


def median_size_for_noise(noise_hu: float, target_hu: float = MEDIAN_TARGET_NOISE_HU) -> int:
    """The smallest in-plane median window (3, 5 or 7) that brings ``noise_hu`` down to about ``target_hu`` (the
    median of n samples keeps about sqrt(pi / 2n) of the SD): :func:`median_window_for_noise` on thick slices."""
    return median_window_for_noise(noise_hu, float("inf"), target_hu)[1]


def median_window_for_noise(
    noise_hu: float, thickness_mm: float, target_hu: float = MEDIAN_TARGET_NOISE_HU
) -> tuple[int, int]:
    """The median window (slices, in-plane size) for a scan's noise: the one with the fewest samples that brings
    ``noise_hu`` down to about ``target_hu`` (as :func:`median_size_for_noise`): in-plane 3 x 3, 5 x 5 or 7 x 7; on
    thin slices (<= ``THIN_SLICE_MM``) 3 x 3, then 3 x 3 x 3, 3 x 5 x 5, 3 x 7 x 7 (the two neighbouring slices
    instead of a wider window in the plane, where it would round off a lobulated lesion's outline or a thin lobe)."""
    if thickness_mm <= THIN_SLICE_MM:
        windows = ((1, 3), (3, 3), (3, 5), (3, 7))
    else:
        windows = ((1, 3), (1, 5), (1, 7))
    for depth, size in windows:
        if noise_hu * np.sqrt(np.pi / (2.0 * depth * size * size)) <= target_hu:
            return depth, size
    return windows[-1]


def parenchyma_statistics(values: np.ndarray) -> tuple[float, float]:
    """(mode, SD) of an organ's HU values: the mode of the smoothed histogram is the parenchyma even when
    lesions make up a good part of the organ; the SD is the MAD-based spread around the mode."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no organ voxels to estimate the parenchyma from")
    lo, hi = np.percentile(values, [1, 99])
    edges = np.arange(lo, hi + 2 * HU_BIN, HU_BIN)
    hist, edges = np.histogram(values, bins=edges)
    hist = ndimage.gaussian_filter1d(hist.astype(np.float64), HU_MODE_SMOOTHING / HU_BIN)
    mode = float(edges[int(np.argmax(hist))] + HU_BIN / 2)
    near = values[np.abs(values - mode) < 50.0]
    mad = float(np.median(np.abs(near - mode))) if near.size else 0.0
    return mode, max(1.4826 * mad, 1.0)


def fit_lesion_contrast(
    box_values: np.ndarray,
    parenchyma_hu: float,
    parenchyma_sd: float,
    settings: LesionContrastSettings | None = None,
    polarity: int | None = None,
) -> LesionContrast | None:
    """The lesion's contrast from the (smoothed) organ voxels inside the user's box on the seed slice, or
    ``None`` when the box shows no clear hypo- or hyperdense part (then the model's mask is used as is).
    ``polarity`` (-1 or +1): look on that side only (else the side with more outlying voxels)."""
    s = settings or LesionContrastSettings()
    values = np.asarray(box_values, dtype=np.float64).ravel()
    if values.size == 0:
        return None
    cut = s.outlier_sd * parenchyma_sd
    hypo = values[values < parenchyma_hu - cut]
    hyper = values[values > parenchyma_hu + cut]
    if polarity is None:
        polarity = -1 if hypo.size >= hyper.size else 1
    side = hypo if polarity < 0 else hyper
    if side.size < s.min_lesion_fraction * values.size:
        return None
    lesion_hu = float(np.median(side))
    if abs(lesion_hu - parenchyma_hu) < s.min_contrast_hu:
        return None
    return LesionContrast(
        polarity=polarity,
        parenchyma_hu=parenchyma_hu,
        parenchyma_sd=parenchyma_sd,
        lesion_hu=lesion_hu,
        threshold_hu=(parenchyma_hu + lesion_hu) / 2.0,
    )


def box_region(shape_ji: tuple[int, int], box_ij) -> np.ndarray:
    """A boolean [j, i] mask of an inclusive (i0, j0, i1, j1) box."""
    region = np.zeros(shape_ji, dtype=bool)
    i0, j0, i1, j1 = box_ij
    region[int(max(np.floor(j0), 0)) : int(np.ceil(j1)) + 1, int(max(np.floor(i0), 0)) : int(np.ceil(i1)) + 1] = True
    return region


def refine_slice_mask(
    model_mask_ji: np.ndarray,
    lesion_like_ji: np.ndarray,
    box_ij,
    previous_ji: np.ndarray | None = None,
    settings: LesionContrastSettings | None = None,
) -> np.ndarray:
    """The lesion on one slice: the lesion-like pieces inside the prompt box that the model's mask covers
    (at least ``min_touch_fraction`` of each piece) or that continue the previous slice's lesion (at least
    ``min_continuation`` of the piece lies on it), holes filled."""
    s = settings or LesionContrastSettings()
    candidates = lesion_like_ji & box_region(model_mask_ji.shape, box_ij)
    labels, n = ndimage.label(candidates)
    if n == 0:
        return np.zeros_like(model_mask_ji, dtype=bool)
    flat = labels.ravel()
    sizes = np.maximum(np.bincount(flat, minlength=n + 1), 1)
    covered = np.bincount(flat, weights=model_mask_ji.ravel().astype(np.float64), minlength=n + 1)
    keep = covered >= s.min_touch_fraction * sizes
    if previous_ji is not None:
        continued = np.bincount(flat, weights=previous_ji.ravel().astype(np.float64), minlength=n + 1)
        keep |= continued >= s.min_continuation * sizes
    keep[0] = False
    return ndimage.binary_fill_holes(keep[labels])


def model_holds_lesion(
    refined_ji: np.ndarray, model_mask_ji: np.ndarray, settings: LesionContrastSettings | None = None
) -> bool:
    """Whether the model's mask on a propagated slice still holds at least ``min_model_support`` of the refined
    lesion there (an empty refined mask is held). The continuation rule of :func:`refine_slice_mask` keeps
    lesion-like pieces that lie on the previous slice's lesion whatever the model says; past a faint lesion's end
    such pieces are the parenchyma's own darker noise, and slice after slice they carry the track on through the
    organ where the model sees nothing.

    Measured (docs/RESULTS.md, session 24): ircadb17 at half its lesions' contrast, loose boxes, ran 28 slices past
    the lesion's end on pieces the model held 0-7 % of; one-box tumour Dice there 0.696 -> 0.756 (naive loop
    0.767). The four cases as stored, tight / jittered / loose means 0.8045 / 0.7917 / 0.7442 -> 0.8083 / 0.7956 /
    0.7483 (hcc2144 0.765 -> 0.780; no case falls). 0.2 costs lits117 at half contrast 0.680 -> 0.671."""
    s = settings or LesionContrastSettings()
    if s.min_model_support is None:
        return True
    area = int(refined_ji.sum())
    return area == 0 or int((refined_ji & model_mask_ji).sum()) >= s.min_model_support * area


def prune_foreign_tissue(
    model_mask_ji: np.ndarray,
    smoothed_ji: np.ndarray,
    parenchyma: tuple[float, float],
    previous_ji: np.ndarray,
    settings: OrganIntensitySettings | None = None,
) -> np.ndarray:
    """An organ's mask on one propagated slice without the neighbouring tissue it ran into.

    ``parenchyma`` = (mode, SD) of the organ's smoothed HU on the prompted slice
    (:func:`parenchyma_statistics`). Always a subset of ``model_mask_ji``.

    The organ is the piece that overlaps the previous slice's organ most, not the largest piece: at the
    dome of a thick-slice liver the model's mask takes in the heart beside the shrinking liver, and from
    the second slice on the heart is the larger piece (hcc2144, 5 mm slices: 3645 voxels of heart, a third
    of it on the previous slice's mask, beside 2369 of liver that lie on it entirely). One-box liver Dice
    hcc2144 0.917 -> 0.929; lits117, ircadb17, hcc0697 unchanged (the largest piece was also the most
    continued on every slice there).
    """
    s = settings or OrganIntensitySettings()
    mode, sd = parenchyma
    hi = mode + max(s.bright_sd * sd, s.min_bright_hu)
    lo = mode - max(s.dark_sd * sd, s.min_dark_hu)
    core = model_mask_ji & (smoothed_ji < hi) & (smoothed_ji > lo)
    labels, n = ndimage.label(core)
    if n == 0:
        return np.zeros_like(model_mask_ji, dtype=bool)
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n + 1)
    continued = np.bincount(flat, weights=previous_ji.ravel().astype(np.float64), minlength=n + 1)
    keep = continued >= s.min_continuation * np.maximum(sizes, 1)
    sizes[0] = 0
    continued[0] = 0
    anchor = continued if continued.max() > 0 else sizes
    keep[int(np.argmax(anchor))] = True
    keep[0] = False
    return ndimage.binary_fill_holes(keep[labels]) & model_mask_ji
