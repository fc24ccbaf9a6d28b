"""The review table's rows as the page shows them: flags in words (they were code names: beyond_end, low_score),
whole mm², flagged slices with a mask before the empty ones beyond the ends; the lesion table's one decimal."""

from __future__ import annotations

from liversam_web.review_table import FLAG_WORDS, flag_text, lesion_rows, review_items, review_rows

REVIEW_FLAGS = ("gap", "tip", "low_score", "uncertain", "touches_box_edge", "area_jump", "ragged", "zigzag",
                "hu_shift", "past_end", "end", "beyond_end")  # every flag liversam.review raises


def test_every_review_flag_has_words() -> None:
    assert set(REVIEW_FLAGS) <= set(FLAG_WORDS)
    for flag in REVIEW_FLAGS:
        assert "_" not in FLAG_WORDS[flag]
    assert flag_text(["beyond_end", "low_score"]) == "may go on, low score"
    assert flag_text(["new_flag"]) == "new flag"  # a flag from a newer server: its name without underscores
    assert flag_text(None) == ""


def test_rows_flagged_with_a_mask_first_then_empty_flagged_then_the_rest() -> None:
    report = {"slices": [
        {"k": 38, "area_mm2": 0.0, "score": None, "source": "", "flags": ["beyond_end"]},
        {"k": 50, "area_mm2": 120.26, "score": 0.912, "source": "user", "flags": []},
        {"k": 51, "area_mm2": 12839.3, "score": 0.5, "source": "propagated", "flags": ["low_score", "ragged"]},
        {"k": 52, "area_mm2": 13151.2, "score": 0.94, "source": "interpolated", "flags": []},
    ]}
    rows = review_rows(report)
    assert [r["k"] for r in rows] == [51, 38, 50, 52]
    assert rows[0] == {"k": 51, "area": 12839, "score": 0.5, "source": "model", "flags": "low score, ragged outline"}
    assert rows[1]["flags"] == "may go on" and rows[1]["area"] == 0 and rows[1]["score"] == ""
    assert [r["source"] for r in rows[2:]] == ["your prompt", "interpolated"]


def test_lesion_rows_one_decimal() -> None:
    rows = lesion_rows([{"lesion_id": 1, "volume_ml": 36.177, "longest_axial_diameter_mm": 58.56,
                         "slice_first": 50, "slice_last": 107}])
    assert rows == [{"id": 1, "ml": 36.2, "diameter": 58.6,
                     "slices": "50-107", "centre_k": 78}]


def test_a_lesion_of_a_few_voxels_is_not_0_ml_and_one_slice_is_one_number() -> None:
    """lits117's second lesion in the page: 4 voxels on slice 127 read "0 mL", slices "127-127"."""
    (row,) = lesion_rows([{"lesion_id": 2, "volume_ml": 0.004, "longest_axial_diameter_mm": 4.0,
                           "slice_first": 127, "slice_last": 127}])
    assert (row["ml"], row["slices"], row["centre_k"]) == ("< 0.1", "127", 127)


def test_review_items_say_tumour_as_the_page_does() -> None:
    """The server's reasons name the segment "tumor" ("tumor stops at slice 48"); the page says "tumour" everywhere."""
    review = {"tumor": {"items": [{"first_slice": 38, "slices": "38-120",
                                   "reason": "tumor stops at slice 48 while ...; tumor's area changes suddenly"}]},
              "liver": {"items": [{"first_slice": 127, "slices": "127", "reason": "liver's outline is ragged"}]}}
    items = review_items(review, {"liver", "tumor"})
    assert items == [
        {"segment": "liver", "first": 127, "slices": "127", "reason": "liver's outline is ragged"},
        {"segment": "tumour", "first": 38, "slices": "38-120",
         "reason": "tumour stops at slice 48 while ...; tumour's area changes suddenly"},
    ]
