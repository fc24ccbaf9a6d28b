"""The review report: per segment and slice, the area, the model's score and flags for suspicious slices,
and a short list of slice ranges to check, each with its reason in words.

Flags (per slice; what is known without a label):
- ``tip``: the mask is below ``tip_fraction`` of the segment's largest slice: the structure tapers here, and
  where an organ tapers the track most often runs on into a neighbour (kidney, bowel) or stops early;
- ``beyond_end``: a slice *outside* the segment: the segment stops while its last mask is still at least
  ``beyond_end_fraction`` of its largest slice, so it probably goes on (``beyond_end_mm`` beyond it);
- ``area_jump``: the area changes suddenly from the neighbouring slice (ratio above ``max_area_ratio`` and more
  than ``min_jump_mm2``) - leakage into a neighbour, or a missed part;
- ``low_score``: the model's own predicted IoU is below ``min_score``; ``uncertain``: below
  ``uncertain_score`` but not below ``min_score``;
- ``touches_box_edge``: the mask runs into an edge of the box it was prompted with (it may be cut off;
  off by default: on the four labelled cases it marked correct slices far more often than wrong ones);
- ``past_end``: the area grows towards the end of the structure over the last slices, where an organ or lesion
  tapers off - the mask has probably run past the structure's end into something else;
- ``gap``: an empty slice between segmented slices.

Consecutive flagged slices (gaps up to ``merge_gap`` slices bridged) form one review item ("slices 10-21")
with a reason a radiologist reads; a scan gets at most ``max_items`` items (the largest ranges first, liver
before tumours). The thresholds were chosen on the four labelled cases (docs/RESULTS.md, "Review").

Report format (JSON; fields only added over earlier versions): per segment ``name``, ``volume_ml``,
``slices`` (``k``, ``area_mm2``, ``score``, ``source``, ``flags``; slices between the segment's first and
last, plus flagged ``beyond_end`` slices with area 0), ``flagged_slices`` (the slices of the review items),
``tracks``, and ``items`` (``first_slice``, ``last_slice``, ``slices`` as text, ``flags``, ``reason``); at the
top level ``items``, every segment's items in review order (each with its ``segment``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .segmentation import SegmentationResult


@dataclass(frozen=True)
class ReviewSettings:
    """Thresholds of the flags. Defaults chosen on the four labelled cases (one-box, tight boxes, liver): the
    highest pooled recall with precision >= 0.4 (docs/RESULTS.md, "Review flags as a detector"): recall 0.73,
    precision 0.43. A model score below 0.9 (``uncertain_score``; the flag ``uncertain``) is what finds most
    wrong liver slices (LiteMedSAM scores good slices 0.9-0.97); with ``low_score`` (below ``min_score``, 0.6,
    the Slicer module's review parameter) alone the recall falls to 0.19. ``tip`` flags (below 20-50 % of the largest slice)
    raised recall to 0.92-0.98 but precision to 0.26-0.35, so the tip threshold is low (5 %)."""

    max_area_ratio: float = 1.6
    min_jump_mm2: float = 50.0
    min_score: float = 0.6
    uncertain_score: float = 0.9
    end_slices: int = 3
    end_growth_ratio: float = 1.2
    tip_fraction: float = 0.05
    beyond_end_fraction: float = 0.02
    beyond_end_mm: float = 10.0
    flag_box_edge: bool = False
    merge_gap: int = 1
    max_items: int = 10


@dataclass
class SliceReview:
    k: int
    area_mm2: float
    score: float | None
    source: str  # "user", "propagated" or "" (unknown)
    flags: list[str] = field(default_factory=list)


def review_segment(
    mask_kji: np.ndarray,
    pixel_area_mm2: float,
    scores: dict[int, float] | None = None,
    records: dict[int, object] | None = None,
    settings: ReviewSettings | None = None,
    slice_thickness_mm: float = 1.0,
) -> list[SliceReview]:
    """Review one segment. ``records`` maps k to propagation records (``source``, ``touches_box_edge``)."""
    settings = settings or ReviewSettings()
    scores = scores or {}
    records = records or {}
    mask_kji = np.asarray(mask_kji, bool)
    areas = mask_kji.sum(axis=(1, 2)) * pixel_area_mm2
    present = np.nonzero(areas > 0)[0]
    if present.size == 0:
        return []
    first, last = int(present[0]), int(present[-1])
    largest = float(areas.max())
    rows: dict[int, SliceReview] = {}
    for k in range(first, last + 1):
        record = records.get(k)
        rows[k] = SliceReview(
            k=k,
            area_mm2=round(float(areas[k]), 2),
            score=round(float(scores[k]), 4) if k in scores else None,
            source=getattr(record, "source", ""),
        )
        row = rows[k]
        if areas[k] == 0:
            row.flags.append("gap")
        elif areas[k] < settings.tip_fraction * largest:
            row.flags.append("tip")
        if row.score is not None and row.score < settings.min_score:
            row.flags.append("low_score")
        elif row.score is not None and row.score < settings.uncertain_score:
            row.flags.append("uncertain")
        if settings.flag_box_edge and getattr(record, "touches_box_edge", False):
            row.flags.append("touches_box_edge")
        for neighbour in (k - 1, k + 1):
            if first <= neighbour <= last and areas[neighbour] > 0 and areas[k] > 0:
                big, small = max(areas[k], areas[neighbour]), min(areas[k], areas[neighbour])
                if big / small > settings.max_area_ratio and big - small > settings.min_jump_mm2 and areas[k] == big:
                    row.flags.append("area_jump")
                    break
    n = settings.end_slices
    if last - first + 1 >= 2 * n + 1:
        for end, inward in ((first, 1), (last, -1)):
            ks = [end + inward * step for step in range(n)]  # end slice, then inwards
            seq = [areas[k] for k in ks]
            # growing towards the end: each slice larger than the one inwards of it
            if all(seq[i] > seq[i + 1] for i in range(n - 1)) and seq[0] > settings.end_growth_ratio * seq[-1]:
                rows[end].flags.append("past_end")
    beyond = max(1, math.ceil(settings.beyond_end_mm / max(slice_thickness_mm, 1e-6)))
    for end, outward in ((first, -1), (last, 1)):
        if areas[end] >= settings.beyond_end_fraction * largest:
            for step in range(1, beyond + 1):
                k = end + outward * step
                if 0 <= k < mask_kji.shape[0]:
                    rows[k] = SliceReview(k=k, area_mm2=0.0, score=None, source="", flags=["beyond_end"])
    return [rows[k] for k in sorted(rows)]


def _ranges(ks: list[int], merge_gap: int) -> list[tuple[int, int]]:
    """Sorted slice indices -> (first, last) runs, runs at most ``merge_gap`` slices apart joined."""
    out: list[tuple[int, int]] = []
    for k in sorted(ks):
        if out and k - out[-1][1] <= merge_gap + 1:
            out[-1] = (out[-1][0], k)
        else:
            out.append((k, k))
    return out


def _slices_text(first: int, last: int) -> str:
    return f"slice {first}" if first == last else f"slices {first}-{last}"


def _reason(name: str, flags: set[str], rows: list[SliceReview], first: int, last: int, largest: float,
            settings: ReviewSettings, all_rows: list[SliceReview]) -> str:
    """The review item's reason in a radiologist's words."""
    where = _slices_text(first, last)
    parts = []
    present = [r for r in all_rows if r.area_mm2 > 0]
    if "beyond_end" in flags:
        end = min(present, key=lambda r: min(abs(r.k - first), abs(r.k - last))) if present else None
        share = f" ({100 * end.area_mm2 / largest:.0f} % of its largest slice)" if end and largest else ""
        stop = f" at slice {end.k}" if end else ""
        parts.append(f"{name} stops{stop} while its outline there is still large{share}: it probably continues; "
                     f"check {where}")
    if "past_end" in flags:
        parts.append(f"{name} grows again towards its end: it may have run into a neighbouring organ; check {where}")
    if "tip" in flags and "beyond_end" not in flags:
        parts.append(f"{name} tapers to below {100 * settings.tip_fraction:.0f} % of its largest slice: check that "
                     f"it ends where it should and has not run on into a neighbour ({where})")
    if "area_jump" in flags:
        parts.append(f"{name}'s area changes suddenly between neighbouring slices ({where}): a leak or a missed part")
    if "low_score" in flags or "uncertain" in flags:
        low = min((r.score for r in rows if r.score is not None), default=None)
        parts.append(f"the model is unsure of {name} on {where}" + (f" (score {low:.2f})" if low is not None else ""))
    if "gap" in flags:
        parts.append(f"{name} is missing on {where} between segmented slices")
    if "touches_box_edge" in flags:
        parts.append(f"{name} reaches the edge of its box on {where}: part of it may be cut off")
    return "; ".join(parts)


def review_items(name: str, rows: list[SliceReview], settings: ReviewSettings | None = None) -> list[dict]:
    """Consecutive flagged slices of one segment as review items (first/last slice, flags, reason)."""
    settings = settings or ReviewSettings()
    by_k = {r.k: r for r in rows}
    largest = max((r.area_mm2 for r in rows), default=0.0)
    items = []
    for first, last in _ranges([r.k for r in rows if r.flags], settings.merge_gap):
        span = [by_k[k] for k in range(first, last + 1) if k in by_k]
        flags = {f for r in span for f in r.flags}
        items.append({
            "first_slice": first,
            "last_slice": last,
            "slices": _slices_text(first, last).split(" ", 1)[1],
            "flags": sorted(flags),
            "reason": _reason(name, flags, span, first, last, largest, settings, rows),
        })
    return items


def build_review_report(result: SegmentationResult, settings: ReviewSettings | None = None) -> dict:
    """The JSON-ready report of every segment: slices with area, score, source and flags, stop reasons, and
    at most ``max_items`` review items (ranges of flagged slices with their reasons) for the whole scan."""
    settings = settings or ReviewSettings()
    geometry = result.geometry
    pixel_area = geometry.spacing_mm[0] * geometry.spacing_mm[1]
    outcomes = result.provenance.get("propagation", {}) or {}
    report: dict = {"segments": []}
    candidates = []
    for order, seg in enumerate(result.segments):
        outcome = outcomes.get(seg.name)
        records: dict[int, object] = {}
        stops = []
        if outcome is not None:
            for track in outcome.tracks:
                records.update(track.records)
                stops.append({"seed_slice": track.seed_k, "stopped": track.stop_reasons,
                              "first_slice": min(track.records), "last_slice": max(track.records)})
        rows = review_segment(seg.mask_kji, pixel_area, seg.slice_scores, records, settings, geometry.spacing_mm[2])
        for item in review_items(seg.name, rows, settings):
            candidates.append((order, item))
        report["segments"].append({
            "name": seg.name,
            "volume_ml": round(float(seg.mask_kji.sum()) * geometry.voxel_volume_mm3 / 1000.0, 3),
            "slices": [asdict(r) for r in rows],
            "flagged_slices": [],
            "tracks": stops,
            "items": [],
        })
    # At most max_items per scan: organs (earlier segments) first, then the longest ranges.
    kept = sorted(candidates, key=lambda c: (c[0], -(c[1]["last_slice"] - c[1]["first_slice"])))[: settings.max_items]
    kept.sort(key=lambda c: (c[0], c[1]["first_slice"]))
    report["items"] = []
    for order, item in kept:
        entry = report["segments"][order]
        entry["items"].append(item)
        entry["flagged_slices"].extend(range(item["first_slice"], item["last_slice"] + 1))
        report["items"].append({"segment": entry["name"], **item})
    return report
