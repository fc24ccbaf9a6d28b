"""Morphological clean-up of masks, in physical units (mm, mm^2, mm^3).

2D functions take a slice mask [j, i] and the in-plane spacing (sj, si) in mm; 3D functions take a
volume mask [k, j, i] and the spacing (sk, sj, si) in mm. Inputs are never modified, except by the functions
asked to work ``in_place`` (a whole-volume mask of a large CT is not copied).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class PostprocessSettings:
    """2D clean-up applied to every predicted slice mask."""

    fill_holes: bool = True
    min_island_mm2: float = 10.0  # remove 2D components smaller than this (0 = keep all)
    opening_radius_mm: float = 0.0
    closing_radius_mm: float = 0.0
    keep_largest: bool = False  # keep only the largest 2D component


@dataclass(frozen=True)
class Postprocess3DSettings:
    """3D clean-up applied to a whole segment after propagation."""

    fill_holes: bool = True
    min_island_mm3: float = 0.0
    keep_largest: bool = False


def _ellipse_footprint(radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    radii = [max(int(np.floor(radius_mm / s)), 0) for s in spacing]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    dist = sum((g * s / radius_mm) ** 2 for g, s in zip(grids, spacing, strict=True))
    return dist <= 1.0


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed background regions (per slice for 2D input, in 3D for 3D input)."""
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def remove_small_components(mask: np.ndarray, spacing: tuple[float, ...], min_size_physical: float) -> np.ndarray:
    """Drop connected components smaller than ``min_size_physical`` (mm^2 in 2D, mm^3 in 3D)."""
    mask = np.asarray(mask, dtype=bool)
    if min_size_physical <= 0 or not mask.any():
        return mask.copy()
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:] * float(np.prod(spacing))
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = sizes >= min_size_physical
    return keep[labels]


def fill_between_slices(mask_kji: np.ndarray, limits: Mapping[int, np.ndarray] | None = None,
                        max_gap: int = 1, within: np.ndarray | None = None, in_place: bool = False) -> np.ndarray:
    """``mask_kji`` with its gaps along k closed: a voxel the mask holds on slice k and again on slice k + g + 1
    (g <= ``max_gap``) is added on the g slices between (a slice or two where the structure's outline fell
    short of its neighbours). ``limits`` {k: region [j, i]}: on those slices voxels are added only inside the
    region (e.g. the user's boxes); ``within`` [k, j, i]: voxels are added only inside it (e.g. the container).
    The same array when nothing is added, else a new one (``in_place``, a bool array: written into
    ``mask_kji`` and returned, no second whole-volume mask); computed on the mask's bounding box."""
    mask = np.asarray(mask_kji, dtype=bool)
    if in_place and mask is not mask_kji:
        raise ValueError("fill_between_slices(in_place=True) needs a bool array to write into")
    box = bounding_box(mask)
    if box is None:
        return mask
    sub = mask[box]
    nk = sub.shape[0]
    added = np.zeros_like(sub)
    for gap in range(1, max_gap + 1):
        if nk < gap + 2:
            break
        ends = sub[: nk - gap - 1] & sub[gap + 1 :]  # held on k and on k + gap + 1
        for offset in range(1, gap + 1):
            added[offset : nk - gap - 1 + offset] |= ends
    added &= ~sub
    if within is not None:
        added &= np.asarray(within, dtype=bool)[box]
    k0 = box[0].start
    for k, region in (limits or {}).items():
        if 0 <= k - k0 < nk:
            added[k - k0] &= np.asarray(region, dtype=bool)[box[1:]]
    if not added.any():
        return mask
    out = mask if in_place else mask.copy()
    out[box] |= added
    return out


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def opening(mask: np.ndarray, radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    if radius_mm <= 0:
        return np.asarray(mask, dtype=bool).copy()
    return ndimage.binary_opening(mask, structure=_ellipse_footprint(radius_mm, spacing))


def closing(mask: np.ndarray, radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    if radius_mm <= 0:
        return np.asarray(mask, dtype=bool).copy()
    footprint = _ellipse_footprint(radius_mm, spacing)
    pad = [(r, r) for r in (np.array(footprint.shape) // 2)]
    padded = np.pad(np.asarray(mask, dtype=bool), pad)
    closed = ndimage.binary_closing(padded, structure=footprint)
    return closed[tuple(slice(p[0], p[0] + n) for p, n in zip(pad, mask.shape, strict=True))]


def clean_slice(mask_ji: np.ndarray, spacing_ji: tuple[float, float], settings: PostprocessSettings) -> np.ndarray:
    """Apply the 2D clean-up to one slice mask."""
    out = np.asarray(mask_ji, dtype=bool)
    out = opening(out, settings.opening_radius_mm, spacing_ji)
    out = closing(out, settings.closing_radius_mm, spacing_ji)
    if settings.fill_holes:
        out = fill_holes(out)
    out = remove_small_components(out, spacing_ji, settings.min_island_mm2)
    if settings.keep_largest:
        out = keep_largest_component(out)
    return out


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) holding every True voxel; None for an empty mask."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def clean_volume(mask_kji: np.ndarray, spacing_kji: tuple[float, float, float], settings: Postprocess3DSettings,
                 in_place: bool = False) -> np.ndarray:
    """Apply the 3D clean-up to one segment.

    Works on the mask's bounding box only (same result: components lie inside it, and a background region
    touching the box's faces reaches the volume's border through the empty outside), so a liver in a
    600 x 512 x 512 CT does not cost whole-volume label arrays (int32: 630 MB). ``in_place`` (a bool array):
    the result is written into ``mask_kji`` and returned, so no second whole-volume mask is made.
    """
    mask = np.asarray(mask_kji, dtype=bool)
    if in_place and mask is not mask_kji:
        raise ValueError("clean_volume(in_place=True) needs a bool array to write into")
    box = bounding_box(mask)
    if box is None:
        return mask if in_place else mask.copy()
    out = mask[box]
    if settings.keep_largest:
        out = keep_largest_component(out)
    out = remove_small_components(out, spacing_kji, settings.min_island_mm3)
    if settings.fill_holes:
        out = fill_holes(out)
    result = mask if in_place else np.zeros_like(mask)
    result[box] = out  # outside the box the mask is empty, in place or not
    return result
