"""The review report: per segment and slice, the area, the model's score and flags for suspicious slices.

Flags:
- ``area_jump``: the area changes suddenly from the neighbouring slice (ratio above ``max_area_ratio`` and more
  than ``min_jump_mm2``) - leakage into a neighbour, or a missed part;
- ``low_score``: the model's own predicted IoU is below ``min_score``;
- ``touches_box_edge``: the mask runs into an edge of the box it was prompted with (it may be cut off);
- ``past_end``: the area grows towards the end of the structure over the last slices, where an organ or lesion
  tapers off - the mask has probably run past the structure's end into something else;
- ``gap``: an empty slice between segmented slices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .segmentation import SegmentationResult


@dataclass(frozen=True)
class ReviewSettings:
    max_area_ratio: float = 1.6
    min_jump_mm2: float = 50.0
    min_score: float = 0.6
    end_slices: int = 3
    end_growth_ratio: float = 1.2


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
) -> list[SliceReview]:
    """Review one segment. ``records`` maps k to propagation records (``source``, ``touches_box_edge``)."""
    settings = settings or ReviewSettings()
    scores = scores or {}
    records = records or {}
    areas = np.asarray(mask_kji, bool).sum(axis=(1, 2)) * pixel_area_mm2
    present = np.nonzero(areas > 0)[0]
    if present.size == 0:
        return []
    first, last = int(present[0]), int(present[-1])
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
        if row.score is not None and row.score < settings.min_score:
            row.flags.append("low_score")
        if getattr(record, "touches_box_edge", False):
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
    return [rows[k] for k in sorted(rows)]


def build_review_report(result: SegmentationResult, settings: ReviewSettings | None = None) -> dict:
    """The JSON-ready report of every segment: slices with area, score, source and flags, plus stop reasons."""
    geometry = result.geometry
    pixel_area = geometry.spacing_mm[0] * geometry.spacing_mm[1]
    outcomes = result.provenance.get("propagation", {}) or {}
    report: dict = {"segments": []}
    for seg in result.segments:
        outcome = outcomes.get(seg.name)
        records: dict[int, object] = {}
        stops = []
        if outcome is not None:
            for track in outcome.tracks:
                records.update(track.records)
                stops.append({"seed_slice": track.seed_k, "stopped": track.stop_reasons,
                              "first_slice": min(track.records), "last_slice": max(track.records)})
        rows = review_segment(seg.mask_kji, pixel_area, seg.slice_scores, records, settings)
        report["segments"].append({
            "name": seg.name,
            "volume_ml": round(float(seg.mask_kji.sum()) * geometry.voxel_volume_mm3 / 1000.0, 3),
            "slices": [asdict(r) for r in rows],
            "flagged_slices": [r.k for r in rows if r.flags],
            "tracks": stops,
        })
    return report
