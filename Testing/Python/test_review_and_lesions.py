"""Review flags on constructed cases, and the lesion table against hand-computed values."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from conftest import cli_model
from liversam.errors import OutputError
from liversam.geometry import ImageGeometry
from liversam.lesions import label_lesions, lesion_table, lesion_table_from_mask, write_lesion_table
from liversam.propagation import SliceRecord
from liversam.review import ReviewSettings, build_review_report, review_segment
from liversam.segmentation import Segment, SegmentationResult

# The flags of earlier versions alone (no tips, shape or HU flags; the old score threshold).
OLDER_FLAGS = dict(flag_ends=False, ragged_ratio=None, zigzag_ratio=None, hu_shift=None, uncertain_score=0.9,
                   organ_flags_off=())
# Every flag on, for organs too (by default organs do without area_jump, tip, uncertain and hu_shift).
ALL_FLAGS = ReviewSettings(organ_flags_off=())


def _disc(shape, centre, radius):
    jj, ii = np.mgrid[: shape[0], : shape[1]]
    return (jj - centre[0]) ** 2 + (ii - centre[1]) ** 2 <= radius**2


def test_review_flags_on_a_constructed_case():
    shape = (20, 64, 64)
    mask = np.zeros(shape, dtype=bool)
    radii = {2: 8, 3: 9, 4: 10, 5: 11, 6: 12, 7: 13, 8: 22, 9: 13, 10: 12, 12: 11, 13: 10, 14: 11, 15: 12, 16: 13}
    for k, r in radii.items():
        mask[k] = _disc(shape[1:], (32, 32), r)
    scores = {k: 0.9 for k in radii}
    scores[5] = 0.3
    records = {k: SliceRecord(k, 0.0, 0.9, None, "propagated") for k in radii}
    records[9] = SliceRecord(9, 0.0, 0.9, (20, 20, 40, 40), "propagated", touches_box_edge=True)
    settings = ReviewSettings(flag_box_edge=True, tip_fraction=0.0, beyond_end_fraction=2.0, **OLDER_FLAGS)
    rows = {row.k: row for row in review_segment(mask, 1.0, scores, records, settings)}
    assert "area_jump" in rows[8].flags  # radius 22 between 13 and 13
    assert "area_jump" not in rows[7].flags and "area_jump" not in rows[9].flags
    assert rows[5].flags == ["low_score"]
    assert "touches_box_edge" in rows[9].flags
    assert rows[11].flags == ["gap"] and rows[11].area_mm2 == 0
    assert "past_end" in rows[16].flags  # grows over the last slices: radius 11 -> 12 -> 13
    assert "past_end" not in rows[2].flags  # tapers at the top end, as it should
    assert [k for k, row in rows.items() if not row.flags] == [2, 3, 4, 6, 7, 10, 12, 13, 14, 15]


def test_review_flags_tips_and_slices_beyond_an_end_as_ranges():
    geometry = ImageGeometry((64, 64, 30), (1.0, 1.0, 5.0), (0, 0, 0))
    mask = np.zeros(geometry.shape_kji, dtype=bool)
    # Tapers at the top (slices 5..8 small); stops at slice 20 while still large (the lower part is missing).
    radii = {5: 3, 6: 4, 7: 6, 8: 8, 9: 18, 10: 20, 11: 21, 12: 22, 13: 22, 14: 21, 15: 20, 16: 19, 17: 19,
             18: 18, 19: 18, 20: 17}
    for k, r in radii.items():
        mask[k] = _disc((64, 64), (32, 32), r)
    result = SegmentationResult(geometry, [Segment("liver", 1, mask, slice_scores={k: 0.9 for k in radii})])
    report = build_review_report(result, ReviewSettings(tip_fraction=0.25, beyond_end_fraction=0.05,
                                                         beyond_end_mm=15.0, **OLDER_FLAGS))
    (seg,) = report["segments"]
    flags = {row["k"]: row["flags"] for row in seg["slices"]}
    assert [k for k, f in flags.items() if "tip" in f] == [5, 6, 7, 8]  # below 25 % of the largest slice
    assert [k for k, f in flags.items() if "beyond_end" in f] == [21, 22, 23]  # 15 mm below at 5 mm slices
    assert all(row["area_mm2"] == 0 for row in seg["slices"] if "beyond_end" in row["flags"])
    ranges = [(item["first_slice"], item["last_slice"]) for item in seg["items"]]
    assert ranges == [(5, 9), (21, 23)]  # slice 9 doubles the area of slice 8: an area jump joins the tip
    assert seg["flagged_slices"] == [5, 6, 7, 8, 9, 21, 22, 23]
    assert seg["items"][1]["slices"] == "21-23"
    assert "stops at slice 20" in seg["items"][1]["reason"] and "check slices 21-23" in seg["items"][1]["reason"]
    assert "tapers" in seg["items"][0]["reason"]
    assert [item["segment"] for item in report["items"]] == ["liver", "liver"]


def test_review_keeps_at_most_max_items_per_scan():
    geometry = ImageGeometry((64, 64, 60), (1.0, 1.0, 1.0), (0, 0, 0))
    mask = np.zeros(geometry.shape_kji, dtype=bool)
    scores = {}
    for k in range(0, 60):
        mask[k] = _disc((64, 64), (32, 32), 20)
        scores[k] = 0.3 if k % 3 == 0 else 0.9  # a low score on every third slice: 20 separate ranges
    result = SegmentationResult(geometry, [Segment("liver", 1, mask, slice_scores=scores)])
    report = build_review_report(result, ReviewSettings(merge_gap=1, max_items=10, **OLDER_FLAGS))
    assert len(report["items"]) == 10  # 20 runs of one slice (two unflagged slices between them), capped
    assert len(report["segments"][0]["flagged_slices"]) == 10
    bridged = build_review_report(result, ReviewSettings(merge_gap=2, max_items=10, **OLDER_FLAGS))
    assert [(i["first_slice"], i["last_slice"]) for i in bridged["items"]] == [(0, 57)]
    assert "score 0.30" in bridged["items"][0]["reason"]

    geometry = ImageGeometry((16, 16, 5), (0.5, 0.5, 2.0), (0, 0, 0))
    mask = np.zeros(geometry.shape_kji, dtype=bool)
    mask[1:4, 4:8, 4:8] = True
    result = SegmentationResult(geometry, [Segment("liver", 1, mask, slice_scores={2: 0.95})])
    report = build_review_report(result, ReviewSettings(beyond_end_fraction=2.0, flag_ends=False))  # none beyond
    text = json.dumps(report)
    (seg,) = json.loads(text)["segments"]
    assert seg["name"] == "liver" and [s["k"] for s in seg["slices"]] == [1, 2, 3]
    assert seg["slices"][0]["area_mm2"] == 16 * 0.25 and seg["slices"][1]["score"] == 0.95
    assert seg["volume_ml"] == pytest.approx(48 * 0.5 * 0.5 * 2.0 / 1000)


def test_lesion_table_hand_computed(tmp_path):
    geometry = ImageGeometry((40, 30, 10), (0.5, 0.8, 2.0), (100.0, -50.0, 10.0))
    mask = np.zeros(geometry.shape_kji, dtype=bool)
    mask[2:5, 10:13, 5:15] = True  # 3 x 3 x 10 = 90 voxels; axial extent: 9 * 0.5 mm in i, 2 * 0.8 mm in j
    mask[7, 20, 30] = True  # a 1-voxel lesion
    labels, n = label_lesions(mask)
    assert n == 2 and (labels == 1).sum() == 90 and (labels == 2).sum() == 1
    big, small = lesion_table_from_mask(mask, geometry)
    assert big.lesion_id == 1 and big.voxels == 90
    assert big.volume_ml == pytest.approx(90 * 0.5 * 0.8 * 2.0 / 1000)
    assert big.longest_axial_diameter_mm == pytest.approx(np.hypot(9 * 0.5, 2 * 0.8), abs=0.01)
    assert (big.slice_first, big.slice_last) == (2, 4)
    np.testing.assert_allclose(big.centre_lps, geometry.ijk_to_lps([9.5, 11, 3]), atol=0.01)
    assert small.longest_axial_diameter_mm == 0.0 and small.slice_first == small.slice_last == 7

    result = SegmentationResult(geometry, [Segment("liver", 1, mask | True), Segment("tumor", 2, mask)])
    table = lesion_table(result)
    assert [lesion.segment for lesion in table] == ["tumor", "tumor"]
    write_lesion_table(table, tmp_path / "lesions.csv")
    rows = list(csv.DictReader((tmp_path / "lesions.csv").open()))
    assert rows[0]["lesion_id"] == "1" and float(rows[0]["volume_ml"]) == pytest.approx(big.volume_ml)
    write_lesion_table(table, tmp_path / "lesions.json")
    assert json.loads((tmp_path / "lesions.json").read_text())[1]["voxels"] == 1
    with pytest.raises(OutputError, match=".csv or .json"):
        write_lesion_table(table, tmp_path / "lesions.xlsx")


def _square_areas(areas_by_k: dict[int, int], shape=(20, 40, 40)) -> np.ndarray:
    """A mask whose slice k holds exactly ``areas_by_k[k]`` pixels (a filled run of rows)."""
    mask = np.zeros(shape, dtype=bool)
    for k, area in areas_by_k.items():
        mask[k].flat[:area] = True
    return mask


@pytest.mark.parametrize(
    ("middle", "flagged"),
    [(160, False),  # 160 / 100 = 1.6: not above max_area_ratio
     (161, True),  # 1.61 and 61 mm^2 more
     ],
)  # fmt: skip
def test_area_jump_threshold_on_the_ratio(middle, flagged):
    mask = _square_areas({4: 100, 5: middle, 6: 100})
    rows = {r.k: r for r in review_segment(mask, 1.0, settings=ALL_FLAGS)}
    assert ("area_jump" in rows[5].flags) is flagged
    assert "area_jump" not in rows[4].flags and "area_jump" not in rows[6].flags  # only the bigger slice


@pytest.mark.parametrize(("middle", "flagged"), [(100, False), (101, True)])
def test_area_jump_needs_more_than_min_jump_mm2(middle, flagged):
    # 50 -> 100 px at 1 mm^2: ratio 2 but only 50 mm^2 more (min_jump_mm2 50): not a jump; 51 mm^2 is.
    mask = _square_areas({4: 50, 5: middle, 6: 50})
    rows = {r.k: r for r in review_segment(mask, 1.0, settings=ALL_FLAGS)}
    assert ("area_jump" in rows[5].flags) is flagged
    # The same in mm^2 with 0.5 mm^2 pixels needs twice the pixels.
    rows = {r.k: r for r in review_segment(_square_areas({4: 100, 5: 2 * middle, 6: 100}), 0.5, settings=ALL_FLAGS)}
    # Organs do without area_jump by default; lesions keep it.
    assert "area_jump" not in review_segment(mask, 1.0)[1].flags
    assert ("area_jump" in {r.k: r for r in review_segment(mask, 1.0, lesion=True)}[5].flags) is flagged
    assert ("area_jump" in rows[5].flags) is flagged and rows[5].area_mm2 == middle


def test_organ_flags_off_names_known_flags_only():
    with pytest.raises(ValueError, match="unknown flag.*area-jump"):
        ReviewSettings(organ_flags_off=("area-jump",))
    assert ReviewSettings(organ_flags_off=()).organ_flags_off == ()


def test_low_score_threshold_and_sources():
    mask = _square_areas({3: 100, 4: 100, 5: 100})
    records = {3: SliceRecord(3, 100.0, 0.9, None, "user"), 4: SliceRecord(4, 100.0, 0.6, None, "propagated")}
    rows = review_segment(mask, 1.0, {3: 0.5999, 4: 0.6}, records, ReviewSettings(flag_ends=False, organ_flags_off=()))
    assert [(r.k, r.flags, r.source, r.score) for r in rows if r.area_mm2 > 0] == [
        (3, ["low_score"], "user", 0.5999),  # below min_score 0.6
        (4, ["uncertain"], "propagated", 0.6),  # not below 0.6, but below uncertain_score 0.8
        (5, [], "", None),
    ]
    # By default an organ gets no "uncertain" flag (it marked right slices more often than wrong ones).
    rows = review_segment(mask, 1.0, {3: 0.5999, 4: 0.6}, records, ReviewSettings(flag_ends=False))
    assert [r.flags for r in rows if r.area_mm2 > 0] == [["low_score"], [], []]
    rows = review_segment(mask, 1.0, {4: 0.85}, records, ReviewSettings(flag_ends=False, organ_flags_off=()))
    assert rows[4].flags == []  # 0.85: not below the organs' 0.8 ...
    rows = review_segment(mask, 1.0, {4: 0.85}, records, ReviewSettings(flag_ends=False), lesion=True)
    assert rows[4].flags == ["uncertain"]  # ... but below the lesions' 0.9
    # A structure that ends abruptly at full size probably goes on: the empty slices beyond its ends are flagged.
    assert {r.k for r in rows if r.area_mm2 == 0} == {r.k for r in rows if r.flags == ["beyond_end"]}
    assert {0, 1, 2, 6, 7, 8} <= {r.k for r in rows if r.flags == ["beyond_end"]}


def test_past_end_needs_growth_over_all_end_slices_and_enough_slices():
    # Growing over the last 3 slices (100 -> 110 -> 125 = 1.25 x): flagged; 124 (1.24 x) with ratio 1.25: not.
    base = {k: 100 for k in range(2, 8)}
    rows = {r.k: r for r in review_segment(_square_areas({**base, 8: 110, 9: 125}), 1.0)}
    assert "past_end" in rows[9].flags
    rows = {r.k: r for r in review_segment(_square_areas({**base, 8: 110, 9: 124}), 1.0,
                                           settings=ReviewSettings(end_growth_ratio=1.25))}  # fmt: skip
    assert "past_end" not in rows[9].flags
    # Not strictly growing slice by slice (110 -> 110 -> 125): not flagged.
    rows = {r.k: r for r in review_segment(_square_areas({**base, 7: 110, 8: 110, 9: 125}), 1.0)}
    assert "past_end" not in rows[9].flags
    # Growing at the first slices too (mirror image): flagged at the first slice.
    rows = {r.k: r for r in review_segment(_square_areas({2: 125, 3: 110, **{k: 100 for k in range(4, 10)}}), 1.0)}
    assert "past_end" in rows[2].flags and "past_end" not in rows[9].flags
    # Fewer than 2 x end_slices + 1 slices: no end rule at all.
    rows = {r.k: r for r in review_segment(_square_areas({2: 125, 3: 110, 4: 100, 5: 100, 6: 100, 7: 100}), 1.0)}
    assert "past_end" not in rows[2].flags
    assert review_segment(np.zeros((4, 5, 5), bool), 1.0) == []


def test_review_report_lists_tracks_stops_and_flagged_slices():
    from liversam.pipeline import PipelineSettings, segment_volume
    from liversam.prompts import SegmentPrompts, SlicePrompts
    from liversam.propagation import PropagationSettings
    from scripted_predictor import ScriptedPredictor, box_around, rect, synthetic_volume

    square = rect((40, 40), 10, 10, 16, 16)
    volume = synthetic_volume(np.full((12, 40, 40), 100.0), (0.5, 0.8, 2.0))
    predictor = ScriptedPredictor(volume, {k: (square, 0.5 if k == 6 else 0.9) for k in range(3, 9)})
    i0, j0, i1, j1 = box_around(square)
    seg = SegmentPrompts("liver", 1, slices={5: SlicePrompts(boxes_ij=[(i0 - 2, j0 - 2, i1 + 2, j1 + 2)])},
                         propagate=True)
    settings = PipelineSettings(propagation=PropagationSettings(intensity_refinement=False, min_score=0.4))
    result = segment_volume(volume, [seg], predictor, settings)
    (report,) = build_review_report(result)["segments"]
    assert report["tracks"] == [{"seed_slice": 5, "stopped": {"up": "structure ended", "down": "structure ended"},
                                 "first_slice": 3, "last_slice": 8}]  # fmt: skip
    by_k = {s["k"]: s for s in report["slices"]}
    assert [k for k, s in by_k.items() if s["area_mm2"] > 0] == [3, 4, 5, 6, 7, 8]
    assert by_k[5]["source"] == "user" and by_k[6]["source"] == "propagated"
    assert by_k[3]["area_mm2"] == pytest.approx(256 * 0.5 * 0.8)
    assert by_k[6]["flags"] == ["low_score"]
    # The square ends at full size on both sides: the slices beyond each end are flagged, and each end slice
    # (a tip), as ranges; slice 6 (low score) and the lower end 8-11 are one slice apart and join.
    assert report["flagged_slices"] == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    assert [(i["first_slice"], i["last_slice"], i["flags"]) for i in report["items"]] == [
        (0, 3, ["beyond_end", "end"]), (6, 11, ["beyond_end", "end", "low_score"])]
    assert "check slices 6-11" in report["items"][1]["reason"] and "score 0.50" in report["items"][1]["reason"]
    assert "stops at slice 8 " in report["items"][1]["reason"] and "stops at slice 3 " in report["items"][0]["reason"]
    assert result.provenance["inside"] == {"liver": None}
    assert report["volume_ml"] == pytest.approx(6 * 256 * 0.5 * 0.8 * 2.0 / 1000, abs=1e-3)


def test_lesions_are_numbered_by_size_and_joined_diagonally():
    mask = np.zeros((6, 12, 12), dtype=bool)
    mask[0, 0, 0] = True  # a small lesion first in array order
    mask[3, 2:5, 2:5] = True  # 9 voxels
    mask[4, 5, 5] = True  # touches the 9-voxel square only at a corner (26-connectivity): the same lesion
    mask[5, 9:12, 9:12] = True  # 9 voxels, later in array order: ties keep array order
    labels, n = label_lesions(mask)
    assert n == 3
    assert labels[3, 2, 2] == 1 and labels[4, 5, 5] == 1 and (labels == 1).sum() == 10
    assert labels[5, 9, 9] == 2 and (labels == 2).sum() == 9
    assert labels[0, 0, 0] == 3 and labels.dtype == np.int32
    empty, none = label_lesions(np.zeros((2, 3, 3), bool))
    assert none == 0 and not empty.any()


def test_longest_axial_diameter_of_lines_and_of_the_widest_slice():
    geometry = ImageGeometry((20, 20, 4), (0.5, 2.0, 3.0), (0.0, 0.0, 0.0))
    line = np.zeros(geometry.shape_kji, dtype=bool)
    line[1, 3, 2:12] = True  # a row of 10 voxels: collinear, 9 x 0.5 mm
    line[2, 3:6, 2] = True  # a column of 3 voxels on the next slice: 2 x 2.0 mm (shorter)
    (lesion,) = lesion_table_from_mask(line, geometry)
    assert lesion.longest_axial_diameter_mm == pytest.approx(4.5)
    tall = line.copy()
    tall[2, 3:7, 2] = True  # now 3 x 2.0 = 6 mm on slice 2: the widest slice wins
    (lesion,) = lesion_table_from_mask(tall, geometry)
    assert lesion.longest_axial_diameter_mm == pytest.approx(6.0)
    assert (lesion.slice_first, lesion.slice_last) == (1, 2)


def test_lesion_table_picks_tumour_segments_by_name(tmp_path):
    geometry = ImageGeometry((8, 8, 3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    mask = np.zeros(geometry.shape_kji, dtype=bool)
    mask[1, 2:4, 2:4] = True
    result = SegmentationResult(geometry, [Segment("Liver Tumour", 2, mask), Segment("liver", 1, mask),
                                           Segment("cyst", 3, mask)])  # fmt: skip
    assert [lesion.segment for lesion in lesion_table(result)] == ["Liver Tumour"]
    assert [lesion.segment for lesion in lesion_table(result, ("cyst", "liver"))] == ["liver", "cyst"]
    # every name a prompts file's tumour is kept inside the liver by, and any segment inside another
    named = SegmentationResult(geometry, [Segment("HCC", 2, mask), Segment("Metastasis 2", 3, mask),
                                          Segment("nodule", 4, mask), Segment("spleen", 5, mask)])
    named.provenance["inside"] = {"HCC": "liver", "Metastasis 2": None, "nodule": "liver", "spleen": None}
    assert [lesion.segment for lesion in lesion_table(named)] == ["HCC", "Metastasis 2", "nodule"]
    table = lesion_table(result)
    write_lesion_table(table, tmp_path / "LESIONS.JSON")
    assert json.loads((tmp_path / "LESIONS.JSON").read_text())[0]["centre_lps"] == [2.5, 2.5, 1.0]
    write_lesion_table(table, tmp_path / "lesions.CSV")
    (row,) = csv.DictReader((tmp_path / "lesions.CSV").open())
    assert row["centre_lps"] == "2.5 2.5 1.0" and row["voxels"] == "4" and row["segment"] == "Liver Tumour"
    assert row["volume_ml"] == "0.004" and row["longest_axial_diameter_mm"] == str(round(np.sqrt(2), 2))


def test_a_crf_refined_tumour_is_flagged_before_the_crf_and_reported_with_its_final_slices():
    """The review flags a segment the dense CRF refined on its mask before the CRF (the propagation's); its rows'
    areas and the ends its reasons name came from that mask too: lits117's tumour "stops at slice 48" while the lesion
    table (the final mask) said slices 50-107, and the review table gave slices 48 and 49 an area the mask shown no
    longer had. Now the areas and the ends are the final mask's, and the flags stay the propagation's."""
    geometry = ImageGeometry((40, 40, 30), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    before = np.zeros(geometry.shape_kji, dtype=bool)
    before[8:20, 10:30, 10:30] = True  # the propagation's tumour: slices 8-19, full size at its lower end
    final = before.copy()
    final[8:10] = False  # the CRF took slices 8 and 9 away
    final[20, 12:28, 12:28] = True  # and grew slice 20
    result = SegmentationResult(geometry, [Segment("tumor", 2, final)],
                                provenance={"before_crf": {"tumor": before}, "inside": {"tumor": "liver"}})
    (report,) = build_review_report(result)["segments"]
    by_k = {row["k"]: row for row in report["slices"]}
    assert by_k[8]["area_mm2"] == by_k[9]["area_mm2"] == 0.0 and by_k[10]["area_mm2"] == 400.0
    assert by_k[20]["area_mm2"] == 256.0 and by_k[20]["flags"] == ["beyond_end"]  # the propagation stopped at 19
    assert "beyond_end" in by_k[7]["flags"]  # flagged on the propagation's mask: its lower end slice 8
    (lesion,) = lesion_table(result)
    assert (lesion.slice_first, lesion.slice_last) == (10, 20)
    reasons = " ".join(item["reason"] for item in report["items"])
    assert "stops at slice 10 " in reasons and "stops at slice 20 " in reasons, reasons
    assert "stops at slice 8 " not in reasons and "stops at slice 19 " not in reasons, reasons
    present = [row["k"] for row in report["slices"] if row["area_mm2"] > 0]
    assert (present[0], present[-1]) == (lesion.slice_first, lesion.slice_last)

    # no CRF: the rows are those of the mask itself, as before
    plain = SegmentationResult(geometry, [Segment("tumor", 2, before)], provenance={"inside": {"tumor": "liver"}})
    (report,) = build_review_report(plain)["segments"]
    assert {row["k"]: row["area_mm2"] for row in report["slices"]}[8] == 400.0

    # a slice only the final mask has (no row of the propagation's mask) gets a row, unflagged
    final[26, 5:8, 5:8] = True
    (report,) = build_review_report(result)["segments"]
    by_k = {row["k"]: row for row in report["slices"]}
    assert by_k[26]["area_mm2"] == 9.0 and by_k[26]["flags"] == [] and 25 not in by_k


def test_a_crf_thinned_end_is_not_said_to_be_still_large():
    """The propagation stopped at slice 8 at full size (flagged: it probably continues); the CRF emptied slice 8 and
    left slice 9 at 1 % of the largest slice. The review said "tumor stops at slice 9 while its outline there is
    still 1 % of its largest slice: it probably continues", untrue of the mask shown (a thin end is no reason to
    think it continues); now it says where the propagation stopped and what the outline shown has there."""
    geometry = ImageGeometry((40, 40, 30), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    before = np.zeros(geometry.shape_kji, dtype=bool)
    before[8:20, 10:30, 10:30] = True  # 400 mm² a slice
    final = before.copy()
    final[8] = False
    final[9] = False
    final[9, 10:12, 10:12] = True  # 4 mm²: 1 % of 400
    result = SegmentationResult(geometry, [Segment("tumor", 2, final)],
                                provenance={"before_crf": {"tumor": before}, "inside": {"tumor": "liver"}})
    report = build_review_report(result)
    reasons = [item["reason"] for item in report["items"]]
    lower = next(r for r in reasons if "slice 8" in r or "slice 9" in r)
    assert "still 1 %" not in lower, lower
    assert lower.startswith("tumor probably continues past slice 8: its propagation stopped there while the outline "
                            "was still 100 % of its largest slice (the refined outline shown begins at slice 9, 1 % "
                            "of its largest slice)"), lower
    # an end the refinement left as large: said as before, of the mask shown
    upper = next(r for r in reasons if "slice 19" in r)
    assert upper.startswith("tumor stops at slice 19 while its outline there is still 100 % of its largest slice: it "
                            "probably continues"), upper

    # the same end thinned but not moved: "the refined outline shown is 1 % ... there"
    final[9] = before[9]
    final[8] = False
    final[8, 10:12, 10:12] = True
    before2 = before.copy()
    result = SegmentationResult(geometry, [Segment("tumor", 2, final)],
                                provenance={"before_crf": {"tumor": before2}, "inside": {"tumor": "liver"}})
    lower = next(r["reason"] for r in build_review_report(result)["items"] if "slice 8" in r["reason"])
    assert "probably continues past slice 8: its propagation stopped there while the outline was still 100 % of its " \
           "largest slice (the refined outline shown is 1 % of its largest slice there)" in lower, lower


def test_a_tip_flagged_before_the_crf_says_so_where_the_outline_shown_is_not_thin():
    """A tumour that tapered to below 5 % before the CRF, whose refined end slice is larger: "tapered ... before the
    refinement", not "tapers" (the mask shown does not)."""
    geometry = ImageGeometry((40, 40, 30), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    before = np.zeros(geometry.shape_kji, dtype=bool)
    before[0, 10:12, 10:12] = True  # 4 mm², 1 % (the scan's first slice: no beyond-end slice)
    before[1:20, 10:30, 10:30] = True
    final = before.copy()
    final[0, 10:20, 10:20] = True  # 100 mm², 25 %
    result = SegmentationResult(geometry, [Segment("tumor", 2, final)],
                                provenance={"before_crf": {"tumor": before}, "inside": {"tumor": "liver"}})
    reasons = " ".join(item["reason"] for item in build_review_report(result)["items"])
    assert "tumor tapered to below 5 % of its largest slice before the refinement" in reasons, reasons
    plain = SegmentationResult(geometry, [Segment("tumor", 2, before)], provenance={"inside": {"tumor": "liver"}})
    reasons = " ".join(item["reason"] for item in build_review_report(plain)["items"])
    assert "tumor tapers to below 5 % of its largest slice: check" in reasons, reasons


def test_lits117_tumour_review_sentences_hold_for_the_mask_written(tmp_path, lits117_ct_path, litemedsam_openvino_fp32):
    """Real CT through ``liversam segment`` (dense CRF on, as by default): the liver box and one tumour box of the
    README's example. The propagation took the tumour down to slice 48; the CRF emptied slice 48 and left slice 49
    at 1 % of the largest slice, and the review said "tumor stops at slice 49 while its outline there is still 1 %
    of its largest slice: it probably continues". Every "stops ... still N %" sentence now holds for the mask
    written: N at least the flag's 2 %, at an end of the tumour in the lesion table; the thinned end is said as
    where the propagation stopped and what the outline shown has there.

    On lits117's slices 28..89 (LPS positions kept, so the example's prompts as they are): both boxes, the tumour's
    lower end and the ten slices below it, in 62 slices instead of 128. The tumour and its review are those of the
    whole scan below slice 90 (measured: the same 29,125 tumour voxels and sentences on slices 0..89 and 28..89; the
    lower end's slices 48 / 49 are 20 / 21 here). The command runs in-process with the session's LiteMedSAM on
    OpenVINO fp32 (:func:`conftest.cli_model`: no load and compile of its own, slices other tests encoded come from
    the encoder memo); it asked for LiteMedSAM with the default ``--accelerate auto``, which on a CPU without native
    bf16 is that model."""
    import SimpleITK as sitk

    from liversam.cli import main
    from liversam.dense_crf import crf_available

    if not crf_available():
        pytest.skip("the dense CRF (pydensecrf2) is not installed: the CRF-thinned end cannot occur")
    ct = tmp_path / "lits117_28_89.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(lits117_ct_path))[:, :, 28:90], str(ct))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"coordinate_system": "LPS", "segments": [
        {"name": "liver", "label": 1, "propagate": True, "boxes": [[[2, 7, 33], [123, 127, 33]]]},
        {"name": "tumor", "label": 2, "inside": "liver", "propagate": True, "boxes": [[[56, 0, 83], [115, 25, 83]]]},
    ]}))
    report_path, lesions_path = tmp_path / "review.json", tmp_path / "lesions.json"
    loads: list[dict] = []
    with cli_model(litemedsam_openvino_fp32, loads):
        assert main(["segment", str(ct), "--prompts", str(prompts), "--output", str(tmp_path / "out.nii.gz"),
                     "--report", str(report_path), "--lesions", str(lesions_path), "--quiet"]) == 0
    assert loads == [{"model": "litemedsam", "device": "auto", "accelerate": "auto"}]
    report = json.loads(report_path.read_text())
    ends = {k for lesion in json.loads(lesions_path.read_text()) for k in (lesion["slice_first"], lesion["slice_last"])}
    tumour = [item["reason"] for item in report["items"] if item["segment"] == "tumor"]
    print("lits117 tumour review:", *tumour, sep="\n  ")
    said = [(int(k), int(n)) for reason in tumour for k, n in re.findall(r"stops at slice (\d+) while its outline "
                                                                            r"there is still (\d+) %", reason)]
    for k, share in said:
        assert share >= 100 * ReviewSettings().beyond_end_fraction, tumour
        assert k in ends, (k, ends)
    continues = [reason for reason in tumour if "probably continues" in reason]
    assert continues, f"no tumour end flagged as probably continuing: {tumour}"
    # the case this test is for: an end the CRF thinned below the flag's share (the old sentence said "still 1 %"),
    # said of the outline shown (where it now begins, or what it has on the slice the propagation stopped at)
    thinned = [m for reason in continues
               for m in re.finditer(r"the refined outline shown (?:begins at slice (\d+), |is )(\d+) %", reason)]
    assert thinned, f"no end thinned by the CRF in this run: {tumour}"
    for m in thinned:
        assert int(m[2]) < 100 * ReviewSettings().beyond_end_fraction and (m[1] is None or int(m[1]) in ends), (
            m[0], ends)


def test_an_item_over_the_whole_segment_names_the_end_its_beyond_end_slices_lie_past():
    """lits117's tumour in the page: one item over slices 38-127 (the model unsure on every slice), the slices beyond
    its first slice (49) flagged, its last slice the scan's last (127). The reason named the end nearest the item's
    edge: "tumour stops at slice 127 while its outline there is still 61 %: it probably continues" (past the scan's
    end). Now it names the end the flagged slices lie beyond."""
    geometry = ImageGeometry((40, 40, 30), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    mask = np.zeros(geometry.shape_kji, dtype=bool)
    mask[8:30, 10:30, 10:30] = True  # slices 8-29: the scan's last slice is 29
    scores = {k: 0.3 for k in range(8, 30)}  # low everywhere: one item from the slices beyond 8 to 29
    result = SegmentationResult(geometry, [Segment("tumor", 2, mask, slice_scores=scores)],
                                provenance={"inside": {"tumor": "liver"}})
    (item,) = build_review_report(result)["items"]
    assert (item["first_slice"], item["last_slice"]) == (3, 29)
    assert item["reason"].startswith("tumor stops at slice 8 while its outline there is still 100 % of its largest "
                                     "slice: it probably continues"), item["reason"]
    assert "slice 29" not in item["reason"].split(";")[0]
