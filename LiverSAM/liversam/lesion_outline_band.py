"""Removing the thin bands a lesion's mask sends along its organ's outline.

The organ's outline is dark with partial volume (the liver against fat), so a lesion's intensity threshold takes in
a band a few voxels thick along the outline wherever the model's mask reaches it: a lesion on the surface sends a
band along the outline on either side of it (hcc0697, most of all with a loose box), and a large lesion near the
surface a strip between itself and the outline (lits117). A lesion is a body, not a band: on each slice, the thin
parts of a lesion's mask (what a morphological opening with a disc of ``radius_mm`` removes, taken as connected
pieces) that reach within ``zone_mm`` of the organ's outline are removed, from every connected piece of the lesion
that keeps a body. A piece with no body at all is removed whole when it reaches the zone and covers at least three
discs (a compact piece that large would hold the disc: it is a band on its own); a smaller one (a small lesion) is
left whole. The image's edge is not an outline (an organ cut by a cropped field of view).

One-box tumour Dice, four cases, tight / jittered / loose boxes (docs/RESULTS.md, session 21): 0.7987 / 0.7871 /
0.7422 -> 0.8017 / 0.7910 / 0.7519; every case gains with every box style (hcc0697's loose box 0.540 -> 0.565,
lits117's 0.765 -> 0.775), the liver's mean does not move. Bodiless bands (session 26, fp32 encoder): 0.8039 /
0.7947 / 0.7595 -> 0.8042 / 0.7949 / 0.7595; 662 voxels removed over the twelve runs, all on lits117, none of them
in the label.

Pure NumPy / SciPy on arrays indexed [k, j, i].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["OutlineBandSettings", "remove_outline_bands"]


@dataclass(frozen=True)
class OutlineBandSettings:
    """A band is a connected piece of what an opening with a disc of ``radius_mm`` removes that reaches within
    ``zone_mm`` of the organ's outline (both turned into whole voxels of the slice's smaller pixel spacing, rounded
    to the nearest, halves to even, at least one). 2.5 mm cost hcc0697's small surface lesion with tight boxes;
    1.5 mm and a 4 mm zone gave the same means."""

    radius_mm: float = 2.0
    zone_mm: float = 3.0
    # A piece with no body at all is removed too when it reaches the outline and covers at least this many discs: a
    # compact piece that large would hold the disc, so it is a band on its own (the slice past a surface lesion's
    # end where only the outline's dark rim is left); a smaller one may be a small lesion and is kept. None: kept.
    bodiless_band_min_discs: float | None = 3.0


def _disc(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius + 0.5


def remove_outline_bands(lesion_kji: np.ndarray, organ_kji: np.ndarray, spacing_ji: tuple[float, float],
                         settings: OutlineBandSettings) -> int:
    """Remove, in place, the bands of ``lesion_kji`` along the outline of ``organ_kji`` (the lesion's container;
    the lesion counts as part of it). Returns the number of voxels removed."""
    pixel = min(spacing_ji)
    radius = max(1, int(round(settings.radius_mm / pixel)))
    zone_steps = max(1, int(round(settings.zone_mm / pixel)))
    disc = _disc(radius)
    removed = 0
    for k in np.flatnonzero(lesion_kji.any(axis=(1, 2))):
        lesion = lesion_kji[k]
        organ = organ_kji[k] | lesion
        near_outline = organ & ~ndimage.binary_erosion(organ, iterations=zone_steps, border_value=1)
        body = ndimage.binary_opening(lesion, structure=disc)
        thin, _ = ndimage.label(lesion & ~body)
        reaching = np.unique(thin[near_outline])
        band = np.isin(thin, reaching[reaching > 0])
        if not band.any():
            continue
        pieces, _ = ndimage.label(lesion)
        with_body = np.unique(pieces[body])
        eligible = np.isin(pieces, with_body[with_body > 0])  # pieces whose thin parts may go
        if settings.bodiless_band_min_discs is not None:
            sizes = np.bincount(pieces.ravel())
            large = np.flatnonzero(sizes >= settings.bodiless_band_min_discs * disc.sum())
            eligible |= np.isin(pieces, large[large > 0])  # a bodiless one is thin throughout: it goes whole
        band &= eligible
        lesion[band] = False
        removed += int(band.sum())
    return removed
