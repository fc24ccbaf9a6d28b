"""Morphology in physical units and the MB-bounded LRU embedding cache."""

from __future__ import annotations

import numpy as np
import torch

from liversam.embedding_cache import SliceEmbeddingCache
from liversam.postprocess import (
    Postprocess3DSettings,
    PostprocessSettings,
    clean_slice,
    clean_volume,
    closing,
    keep_largest_component,
    opening,
    remove_small_components,
)


def test_clean_slice_fills_holes_and_removes_islands_in_mm2():
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:25, 5:25] = True
    mask[10:14, 10:14] = False  # hole
    mask[30:33, 30:33] = True  # island of 9 px
    before = mask.copy()
    # 0.5 mm pixels: the island is 9 * 0.25 = 2.25 mm^2
    out = clean_slice(mask, (0.5, 0.5), PostprocessSettings(fill_holes=True, min_island_mm2=3.0))
    np.testing.assert_array_equal(mask, before)
    assert out[12, 12] and not out[31, 31]
    kept = clean_slice(mask, (1.0, 1.0), PostprocessSettings(fill_holes=False, min_island_mm2=3.0))
    assert kept[31, 31] and not kept[12, 12]


def test_largest_component_and_small_components_3d():
    mask = np.zeros((10, 20, 20), dtype=bool)
    mask[2:8, 2:10, 2:10] = True  # 384 voxels
    mask[2:4, 15:17, 15:17] = True  # 8 voxels
    np.testing.assert_array_equal(keep_largest_component(mask), mask & (np.arange(20)[None, None, :] < 12))
    # 2 mm slices: the small part is 8 * 2 = 16 mm^3
    assert remove_small_components(mask, (2.0, 1.0, 1.0), 17.0).sum() == 384
    assert remove_small_components(mask, (2.0, 1.0, 1.0), 16.0).sum() == 392
    out = clean_volume(mask, (2.0, 1.0, 1.0), Postprocess3DSettings(keep_largest=True))
    assert out.sum() == 384


def test_opening_and_closing_radius_in_mm():
    mask = np.zeros((30, 30), dtype=bool)
    mask[5:25, 5:25] = True
    mask[5:25, 14] = False  # a 1-px gap
    mask[0, 0] = True  # speck
    assert closing(mask, 1.0, (1.0, 1.0))[10, 14]
    assert not opening(mask, 1.0, (1.0, 1.0))[0, 0]
    # Radius below the pixel size on the wider axis: anisotropic footprint still closes along i only.
    assert closing(mask, 1.0, (2.0, 1.0))[10, 14]


def test_embedding_cache_is_lru_and_bounded():
    one_mb = torch.zeros(256 * 1024, dtype=torch.float32)  # 1 MB
    cache = SliceEmbeddingCache(max_mb=3)
    for key in "abc":
        cache.put(key, one_mb.clone())
    assert cache.get("a") is not None  # a becomes most recently used
    cache.put("d", one_mb.clone())  # evicts b
    assert "b" not in cache and "a" in cache and "d" in cache
    assert cache.size_mb <= 3.0 and len(cache) == 3
    cache.put("huge", torch.zeros(1024 * 1024, dtype=torch.float32))  # 4 MB: larger than the cache
    assert "huge" not in cache
    assert cache.hits == 1 and cache.misses == 0
