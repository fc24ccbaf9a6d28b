"""The review and lesion tables as the page shows them: readable flags, whole mm², flagged slices first."""

from __future__ import annotations

import re
from typing import Any

from .workflow import segment_word

# Where a reviewed slice's mask came from (``liversam.review.SliceReview.source``), as the review table says it.
SLICE_SOURCES = {"user": "your prompt", "propagated": "model", "interpolated": "interpolated"}
# The review's flags (``liversam.review``) in words; the review items above the table explain them at length.
FLAG_WORDS = {
    "beyond_end": "may go on",
    "end": "end slice",
    "past_end": "grows at end",
    "tip": "thin tip",
    "gap": "gap",
    "low_score": "low score",
    "uncertain": "unsure score",
    "ragged": "ragged outline",
    "zigzag": "area zigzag",
    "hu_shift": "HU differs",
    "area_jump": "area jump",
    "touches_box_edge": "at box edge",
}


def flag_text(flags: list[str] | None) -> str:
    """"ragged outline, end slice" for ["ragged", "end"]; a flag not listed keeps its name, without underscores."""
    return ", ".join(FLAG_WORDS.get(flag, flag.replace("_", " ")) for flag in flags or [])


def review_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a segment's review report: flagged slices with a mask first, then flagged slices without one
    (beyond its ends: they came first and hid the flagged slices of the mask), then every other slice."""
    def order(row: dict[str, Any]) -> tuple[int, int]:
        flagged, empty = bool(row.get("flags")), float(row.get("area_mm2") or 0.0) <= 0.0
        return (0 if flagged and not empty else 1 if flagged else 2), int(row["k"])

    return [
        {"k": r["k"], "area": round(float(r.get("area_mm2") or 0.0)),
         "score": "" if r.get("score") is None else round(float(r["score"]), 2),
         "source": SLICE_SOURCES.get(r.get("source") or "", ""),
         "flags": flag_text(r.get("flags"))}
        for r in sorted(report.get("slices", []), key=order)
    ]


def review_items(review: dict[str, dict[str, Any]], propagated: set[str]) -> list[dict[str, Any]]:
    """The review items (ranges of flagged slices with their reason, at most ten per scan) of every propagated
    segment, in the report's order; the server's reasons name the segment "tumor", the page says "tumour"."""
    return [
        {"segment": segment_word(name), "first": int(item["first_slice"]), "slices": item.get("slices", ""),
         "reason": re.sub(r"\btumor\b", "tumour", str(item.get("reason", "")))}
        for name in sorted(propagated)
        for item in review.get(name, {}).get("items", [])
    ]


def lesion_rows(lesions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lesion table: volume in mL and longest axial diameter in mm with one decimal (a lesion under 0.05 mL is
    "< 0.1", not 0), its slices ("127" for one slice, not "127-127")."""
    def one_decimal(value: Any) -> Any:
        return round(float(value), 1) if value is not None else ""

    def volume(value: Any) -> Any:
        ml = one_decimal(value)
        return "< 0.1" if ml == 0 and float(value) > 0 else ml

    def slices(first: Any, last: Any) -> str:
        return f"{first}" if first == last else f"{first}-{last}"

    return [
        {"id": lesion.get("lesion_id"), "ml": volume(lesion.get("volume_ml")),
         "diameter": one_decimal(lesion.get("longest_axial_diameter_mm")),
         "slices": slices(lesion.get("slice_first"), lesion.get("slice_last")),
         "centre_k": (int(lesion.get("slice_first", 0)) + int(lesion.get("slice_last", 0))) // 2}
        for lesion in lesions
    ]
