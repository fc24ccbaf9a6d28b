"""Morphology in physical units and the MB-bounded LRU embedding cache."""

from __future__ import annotations

import numpy as np
import torch

from liversam.embedding_cache import HANDED_OUT_KEPT, SliceEmbeddingCache
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
    one_mb = torch.zeros(512 * 1024, dtype=torch.float16)  # 1 MB, kept as it is
    cache = SliceEmbeddingCache(max_mb=3)
    for key in "abc":
        cache.put(key, one_mb.clone())
    assert cache.get("a") is not None  # a becomes most recently used
    cache.put("d", one_mb.clone())  # evicts b
    assert "b" not in cache and "a" in cache and "d" in cache
    assert cache.size_mb <= 3.0 and len(cache) == 3
    cache.put("huge", torch.zeros(2 * 1024 * 1024, dtype=torch.float16))  # 4 MB: larger than the cache
    assert "huge" not in cache
    assert cache.hits == 1 and cache.misses == 0


def test_embedding_cache_keeps_fp32_in_half_the_memory_and_gives_back_fp32():
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64, generator=generator) * 3  # a LiteMedSAM slice: 4 MiB in fp32
    cache = SliceEmbeddingCache(max_mb=5)
    given = cache.put("k", embedding)
    assert HANDED_OUT_KEPT == 3
    assert cache.size_mb == 2.0  # fp16: 2 MiB
    back = cache.get("k")
    assert back.dtype == torch.float32 and back.shape == embedding.shape
    assert back is given  # the first use (put's return) and later ones see the same tensor, the same object
    assert cache.get("k") is back  # (the decoder's memo of a slice's transposed embedding is by identity)
    relative = (back - embedding).norm() / embedding.norm()
    assert 0 < relative < 2**-11  # rounded to fp16, no further
    cache.put("k2", embedding)  # 4 MiB of fp16 in all: both fit in 5 MiB (as fp32 they would not)
    assert "k" in cache and "k2" in cache
    assert cache.get("k") is back  # still among the last slices handed out (a read-ahead stored k2 meanwhile)
    cache.get("k2")
    cache.put("k3", embedding)
    cache.put("k4", embedding)  # three other slices handed out since k: its fp32 copy is not kept
    assert list(cache._handed) == ["k2", "k3", "k4"]
    twice = cache.put("k", embedding * 2)  # written again: never the old tensor
    assert cache.get("k") is twice and not torch.equal(twice, back)
    cache.clear()
    assert cache.get("k") is None and not cache._handed
    exact = SliceEmbeddingCache(max_mb=5, store_fp32_as=torch.float32)
    assert torch.equal(exact.put("k", embedding), embedding) and exact.size_mb == 4.0
    assert exact.get("k") is embedding  # kept as it is


def test_ellipse_footprint_is_the_ellipse_in_millimetres():
    from liversam.postprocess import _ellipse_footprint

    footprint = _ellipse_footprint(2.0, (1.0, 0.5))  # 2 voxels along j (1 mm), 4 along i (0.5 mm)
    assert footprint.shape == (5, 9)
    jj, ii = np.mgrid[-2:3, -4:5]
    np.testing.assert_array_equal(footprint, (jj * 1.0) ** 2 + (ii * 0.5) ** 2 <= 2.0**2)
    assert _ellipse_footprint(0.4, (1.0, 1.0)).tolist() == [[True]]  # under one voxel: the voxel itself


def test_closing_fills_gaps_narrower_than_its_radius_in_mm_and_keeps_the_border():
    from liversam.postprocess import closing, opening

    band = np.zeros((12, 20), dtype=bool)
    band[0:5, :] = True  # touches the array's top, left and right borders
    gap_i = band.copy()
    gap_i[0:5, 8:11] = False  # a 3-voxel gap along i
    # 1 mm radius: with 0.25 mm voxels along i the footprint spans 4 voxels each way and closes the gap on
    # rows 1..3 (on the band's first and last rows the ellipse is a single voxel wide).
    expected = gap_i.copy()
    expected[1:4, 8:11] = True
    np.testing.assert_array_equal(closing(gap_i, 1.0, (1.0, 0.25)), expected)
    # With 1 mm voxels along i it spans one voxel each way: the 3-voxel gap stays.
    np.testing.assert_array_equal(closing(gap_i, 1.0, (1.0, 1.0)), gap_i)
    # The band along the border is not eaten away (the mask is padded before closing).
    np.testing.assert_array_equal(closing(band, 3.0, (1.0, 1.0)), band)
    # Opening removes what is thinner than its footprint: a 1-voxel line goes, the band stays.
    block = np.zeros((12, 20), dtype=bool)
    block[2:7, 2:18] = True
    lined = block.copy()
    lined[9, 2:18] = True
    rounded = block.copy()  # a 1 mm opening with 1 mm voxels is a cross: it takes the block's corners too
    rounded[[2, 2, 6, 6], [2, 17, 2, 17]] = False
    np.testing.assert_array_equal(opening(lined, 1.0, (1.0, 1.0)), rounded)
    assert closing(gap_i, 0.0, (1.0, 1.0)) is not gap_i and closing(gap_i.astype(np.uint8), 0.0, (1, 1)).dtype == bool


def test_clean_slice_applies_each_setting_with_the_slice_spacing():
    from liversam.postprocess import PostprocessSettings, clean_slice

    mask = np.zeros((20, 40), dtype=bool)
    mask[2:10, 2:30] = True
    mask[2:10, 14:17] = False  # a 3-voxel gap along i splits it in two (8 x 12 and 8 x 13 voxels)
    mask[15, 35] = True  # a 1-voxel speck
    spacing_ji = (1.0, 0.25)
    closed = clean_slice(mask, spacing_ji, PostprocessSettings(closing_radius_mm=1.0, min_island_mm2=0.0))
    expected = mask.copy()
    expected[3:9, 14:17] = True  # not on the first and last rows, where the ellipse is one voxel wide
    np.testing.assert_array_equal(closed, expected)
    largest = clean_slice(mask, spacing_ji, PostprocessSettings(keep_largest=True, min_island_mm2=0.0))
    expected = np.zeros_like(mask)
    expected[2:10, 17:30] = True
    np.testing.assert_array_equal(largest, expected)
    # Islands in mm^2: the speck is 0.25 mm^2; the halves are 8 x 12 x 0.25 = 24 and 26 mm^2.
    kept = clean_slice(mask, spacing_ji, PostprocessSettings(min_island_mm2=24.0))
    assert kept[2:10, 2:14].all() and not kept[15, 35]
    dropped = clean_slice(mask, spacing_ji, PostprocessSettings(min_island_mm2=24.01))
    assert not dropped[2:10, 2:14].any() and dropped[2:10, 17:30].all()
    opened = clean_slice(mask, (1.0, 1.0), PostprocessSettings(opening_radius_mm=1.0, min_island_mm2=0.0))
    assert not opened[15, 35] and opened[5, 5]
