"""Issue 18: review flags that need no model score - a ragged outline, an area that zigzags between slices,
the tips, a mean HU unlike the prompted slice's - on constructed masks, and the report's reasons for them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from liversam.geometry import ImageGeometry
from liversam.propagation import SliceRecord
from liversam.review import ReviewSettings, build_review_report, review_segment
from liversam.segmentation import Segment, SegmentationResult
from LiverSAMLib.ServerRequests import FLAG_TEXT, review_items

SHAPE = (16, 64, 64)


def _disc(centre, radius, shape=SHAPE[1:]):
    jj, ii = np.mgrid[: shape[0], : shape[1]]
    return (jj - centre[0]) ** 2 + (ii - centre[1]) ** 2 <= radius**2


def _organ(radii: dict[int, int]) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    for k, r in radii.items():
        mask[k] = _disc((32, 32), r)
    return mask


def _rows_by_k(rows):
    return {r.k: r for r in rows}


# A smooth organ on slices 2..13 (radius 12 at the ends, 20 in the middle), prompted on slice 7.
SMOOTH = {k: 20 - abs(k - 7) for k in range(2, 14)}
USER = {7: SliceRecord(7, 0.0, 0.95, None, "user")}
SHAPE_ONLY = dict(flag_ends=False, zigzag_ratio=None, hu_shift=None, uncertain_score=0.0, tip_fraction=0.0,
                  beyond_end_fraction=2.0)


def test_a_smooth_organ_raises_no_shape_flag():
    # Its area peaks sharply on slice 7 (11 % above both neighbours): one peak is no zigzag.
    rows = review_segment(_organ(SMOOTH), 1.0, records=USER, settings=ReviewSettings(flag_ends=False,
                                                                                      beyond_end_fraction=2.0))
    assert [(r.k, r.flags) for r in rows if r.flags] == []
    assert all(r.solidity is not None and r.solidity > 0.9 for r in rows)


def test_ragged_flags_a_broken_up_outline_against_the_prompted_slice():
    mask = _organ(SMOOTH)
    # Slice 10 breaks up into four separate blobs with about the disc's area (a run into the heart or bowel
    # leaves pieces once the foreign tissue is cut away): its convex hull is far larger than its area.
    mask[10] = False
    for centre in ((12, 12), (12, 52), (52, 12), (52, 52)):
        mask[10] |= _disc(centre, 8)
    rows = _rows_by_k(review_segment(mask, 1.0, records=USER, settings=ReviewSettings(**SHAPE_ONLY)))
    assert [k for k, r in rows.items() if "ragged" in r.flags] == [10]
    assert rows[10].solidity < 0.75 * rows[7].solidity
    # The threshold is relative to the prompted slice: a stricter ratio keeps it, none removes the flag.
    off = _rows_by_k(review_segment(mask, 1.0, records=USER, settings=ReviewSettings(**{**SHAPE_ONLY,
                                                                                         "ragged_ratio": None})))
    assert all("ragged" not in r.flags for r in off.values()) and off[10].solidity is None
    report = build_review_report(SegmentationResult(ImageGeometry((64, 64, 16), (1.0, 1.0, 2.0), (0, 0, 0)),
                                                    [Segment("liver", 1, mask)]), ReviewSettings(**SHAPE_ONLY))
    (item,) = report["items"]
    assert (item["first_slice"], item["last_slice"], item["flags"]) == (10, 10, ["ragged"])
    assert "ragged or in pieces on slice 10" in item["reason"] and "% of its convex outline" in item["reason"]


@pytest.mark.parametrize(
    ("areas", "flagged"),
    [({6: 440, 7: 360}, [5, 6, 7, 8]),  # up 60 mm^2 (15 %) against its neighbours' mean, then down as much
     ({6: 430, 7: 370}, []),  # up and down 45 mm^2: above 6 % but not above zigzag_min_mm2 (50)
     ({6: 500}, []),  # one slice above its neighbours, then level: a peak, no zigzag
     ({6: 440, 9: 360}, []),  # up, and down three slices later: further apart than ZIGZAG_WINDOW
     ],
)  # fmt: skip
def test_zigzag_flags_an_area_going_up_and_down(areas, flagged):
    mask = np.zeros((16, 40, 40), dtype=bool)
    for k, area in {**{k: 400 for k in range(2, 13)}, **areas}.items():
        mask[k].flat[:area] = True
    settings = ReviewSettings(flag_ends=False, ragged_ratio=None, hu_shift=None, beyond_end_fraction=2.0)
    rows = _rows_by_k(review_segment(mask, 1.0, settings=settings))
    assert [k for k, r in rows.items() if "zigzag" in r.flags] == flagged


def test_zigzag_ignores_a_steady_taper_and_scales_with_the_pixel_area():
    mask = np.zeros((16, 40, 40), dtype=bool)
    for k, area in zip(range(2, 12), (900, 820, 700, 600, 420, 300, 200, 150, 100, 60), strict=True):
        mask[k].flat[:area] = True  # shrinks fast but steadily: no slice beyond both neighbours
    settings = ReviewSettings(flag_ends=False, ragged_ratio=None, hu_shift=None, beyond_end_fraction=2.0)
    assert all("zigzag" not in r.flags for r in review_segment(mask, 1.0, settings=settings))
    bumpy = np.zeros((16, 40, 40), dtype=bool)
    for k, area in {4: 400, 5: 440, 6: 400, 7: 440, 8: 400}.items():
        bumpy[k].flat[:area] = True
    # 40 px = 40 mm^2 (below zigzag_min_mm2) at 1 mm^2 pixels, 80 mm^2 at 2 mm^2 pixels.
    assert all("zigzag" not in r.flags for r in review_segment(bumpy, 1.0, settings=settings))
    rows = _rows_by_k(review_segment(bumpy, 2.0, settings=settings))
    assert [k for k, r in rows.items() if "zigzag" in r.flags] == [4, 5, 6, 7, 8]


def test_hu_shift_needs_the_ct_and_names_the_tissue_darker():
    mask = _organ(SMOOTH)
    ct = np.full(SHAPE, 100.0, dtype=np.float32)
    ct[11][mask[11]] = 30.0  # the mask on slice 11 lies on fat-like tissue: 70 HU below the prompted slice
    ct[9][mask[9]] = 70.0  # 30 HU below: within hu_shift (45)
    settings = ReviewSettings(flag_ends=False, ragged_ratio=None, zigzag_ratio=None, beyond_end_fraction=2.0,
                              organ_flags_off=())
    rows = _rows_by_k(review_segment(mask, 1.0, records=USER, settings=settings, ct_kji=ct))
    assert [k for k, r in rows.items() if "hu_shift" in r.flags] == [11]
    assert rows[11].mean_hu == pytest.approx(30.0) and rows[7].mean_hu == pytest.approx(100.0)
    without = review_segment(mask, 1.0, records=USER, settings=settings)
    assert all("hu_shift" not in r.flags and r.mean_hu is None for r in without)
    # the check off (as for the liver by default): each slice's mean HU is still reported, nothing flagged (the
    # command line's report had "mean_hu": null on every slice)
    unchecked = _rows_by_k(review_segment(mask, 1.0, records=USER, settings=replace(settings, hu_shift=None), ct_kji=ct))
    assert unchecked[11].mean_hu == pytest.approx(30.0) and all("hu_shift" not in r.flags for r in unchecked.values())
    geometry = ImageGeometry((64, 64, 16), (1.0, 1.0, 2.0), (0, 0, 0))
    report = build_review_report(SegmentationResult(geometry, [Segment("liver", 1, mask)]), settings, ct_kji=ct)
    (item,) = report["items"]
    assert "liver is darker on slice 11 than on the prompted slice (mean 30 HU against 100 HU)" in item["reason"]


def test_an_item_over_both_ends_of_a_short_organ_names_both():
    """An organ two slices long: its two ends' flags merge into one item, whose reason named one end only ("liver
    begins at slice 5"), nearest the item's edge, while the slices to check hold both."""
    settings = ReviewSettings(ragged_ratio=None, zigzag_ratio=None, hu_shift=None, beyond_end_fraction=2.0)
    geometry = ImageGeometry((64, 64, 16), (1.0, 1.0, 2.0), (0, 0, 0))
    short = _organ({k: 15 for k in range(5, 7)})
    (item,) = build_review_report(SegmentationResult(geometry, [Segment("liver", 1, short)]), settings)["items"]
    assert (item["first_slice"], item["last_slice"]) == (4, 7)
    assert item["reason"].startswith("liver begins at slice 5 and ends at slice 6: at its tips"), item["reason"]


def test_ends_flag_each_tip_and_the_slice_beyond_unless_the_scan_ends_there():
    settings = ReviewSettings(ragged_ratio=None, zigzag_ratio=None, hu_shift=None, beyond_end_fraction=2.0)
    rows = _rows_by_k(review_segment(_organ(SMOOTH), 1.0, settings=settings))
    assert {k: r.flags for k, r in rows.items() if r.flags} == {1: ["end"], 2: ["end"], 13: ["end"], 14: ["end"]}
    assert rows[1].area_mm2 == 0 and rows[14].area_mm2 == 0
    # Reaching the first slice of the scan: no tip there (the scan cuts the organ), the other end still flagged.
    cut = _organ({k: 20 - abs(k - 3) for k in range(0, 10)})
    rows = _rows_by_k(review_segment(cut, 1.0, settings=settings))
    assert {k for k, r in rows.items() if r.flags} == {9, 10}
    geometry = ImageGeometry((64, 64, 16), (1.0, 1.0, 2.0), (0, 0, 0))
    report = build_review_report(SegmentationResult(geometry, [Segment("liver", 1, _organ(SMOOTH))]), settings)
    assert [(i["first_slice"], i["last_slice"]) for i in report["items"]] == [(1, 2), (13, 14)]
    assert report["items"][0]["reason"].startswith("liver begins at slice 2: at a tip")
    assert report["items"][1]["reason"].startswith("liver ends at slice 13: at a tip")
    # The Slicer module's list reads the ranges and jumps to their first slice.
    assert [(i.first_slice, i.slices) for i in review_items(report)] == [(1, "1-2"), (13, "13-14")]


def test_lesions_keep_the_earlier_flags_and_the_pipeline_tells_which_segments_are_lesions():
    liver = _organ(SMOOTH)
    tumour = np.zeros(SHAPE, dtype=bool)
    for k in range(5, 10):
        tumour[k] = _disc((20, 20), 6)
    tumour[7] = _disc((20, 20), 4) | _disc((44, 44), 4)  # two lesions in one segment: a low solidity on slice 7
    scores = {k: 0.85 for k in range(5, 10)}
    geometry = ImageGeometry((64, 64, 16), (1.0, 1.0, 2.0), (0, 0, 0))
    result = SegmentationResult(geometry, [Segment("liver", 1, liver), Segment("tumor", 2, tumour, slice_scores=scores)],
                                provenance={"inside": {"liver": None, "tumor": "liver"}})
    report = build_review_report(result, ReviewSettings(beyond_end_fraction=2.0))
    tumour_flags = {f for row in report["segments"][1]["slices"] for f in row["flags"]}
    assert tumour_flags == {"uncertain"}  # score 0.85 < 0.9 for lesions; no ragged, zigzag or end flags
    as_organ = build_review_report(result, ReviewSettings(beyond_end_fraction=2.0), lesions=set())
    organ_flags = {f for row in as_organ["segments"][1]["slices"] for f in row["flags"]}
    assert "uncertain" not in organ_flags and {"ragged", "end"} <= organ_flags


def test_every_flag_the_core_raises_has_words_in_the_slicer_module():
    mask = _organ(SMOOTH)
    mask[10] = _disc((12, 12), 8) | _disc((52, 52), 8)
    ct = np.full(SHAPE, 100.0, dtype=np.float32)
    ct[4][mask[4]] = 20.0
    rows = review_segment(mask, 1.0, {k: 0.5 for k in range(2, 14)}, USER, ReviewSettings(organ_flags_off=()),
                          ct_kji=ct)
    raised = {f for r in rows for f in r.flags}
    assert {"end", "ragged", "zigzag", "hu_shift", "low_score"} <= raised
    assert raised <= set(FLAG_TEXT)


def test_each_finding_names_the_slices_it_was_found_on_not_the_items_whole_range():
    """The README demo's tumour item said "tapers ... (slices 40-106)" and "area changes suddenly (slices 40-106)"
    where the taper was on slice 40 and the jump on 42-43: a radiologist had 67 slices to scan for two findings."""
    from liversam import review

    rows = [review.SliceReview(k=k, area_mm2=100.0, score=0.9, source="propagated") for k in range(40, 107)]
    by_k = {r.k: r for r in rows}
    by_k[40].flags.append("tip")
    for k in (42, 43):
        by_k[k].flags.append("area_jump")
    for k in (60, 61, 62, 90, 106):
        by_k[k].flags.append("low_score")
    (item,) = review.review_items("tumor", rows, ReviewSettings(merge_gap=30))
    assert item["slices"] == "40-106"
    assert "tapers to below" in item["reason"] and "has not run on into a neighbour (slice 40)" in item["reason"]
    assert "changes suddenly between neighbouring slices (slices 42-43)" in item["reason"]
    assert "the model is unsure of tumor on slices 60-62, 90 and 106 (score 0.90)" in item["reason"]
    for k in (64, 66, 68, 70):
        by_k[k].flags.append("low_score")
    (item,) = review.review_items("tumor", rows, ReviewSettings(merge_gap=30))
    assert "unsure of tumor on slices 60-106, 9 of them" in item["reason"]
