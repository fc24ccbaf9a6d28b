"""A small CT phantom made in memory (no data file needed): the module's self-test and the slicer-core tests
segment it through the server."""

from __future__ import annotations

import numpy as np


def liver_phantom(nk: int = 14, n: int = 128):
    """A liver-like ellipsoid (110 HU) in fat (-80 HU) in air, ``n`` x ``n`` x ``nk`` voxels of 1 x 1 x 2.5 mm,
    with 8 HU of seeded noise. Returns (CTVolume, liver mask [k, j, i])."""
    from liversam.geometry import ImageGeometry
    from liversam.volume import CTVolume

    kk, jj, ii = np.mgrid[:nk, :n, :n]

    def ellipsoid(centre, radii):
        return sum(((axis - c) / r) ** 2 for axis, c, r in zip((kk, jj, ii), centre, radii, strict=True)) <= 1

    liver = ellipsoid(((nk - 1) / 2, 64, 60), (nk / 2 - 0.6, 34, 42))
    hu = np.full(liver.shape, -1000.0)
    hu[ellipsoid(((nk - 1) / 2, 64, 64), (60, 60, 62))] = -80.0
    hu[liver] = 110.0
    hu += np.random.default_rng(7).normal(0, 8, hu.shape)
    geometry = ImageGeometry((n, n, nk), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0))
    return CTVolume(hu.astype(np.int16), geometry, source="phantom"), liver
