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
- ``gap``: an empty slice between segmented slices;
- ``end``: the segment's first and last slice, and the slice beyond each, unless the scan ends there: at a
  tip the outline is most often wrong (cut short, run on, or the organ goes on one more slice);
- ``ragged``: the mask fills less of its convex hull (its *solidity*) than ``ragged_ratio`` x that of the
  prompted slices: a track that runs into the heart, bowel or kidney picks up a ragged, broken-up outline
  after the intensity refinement has cut the foreign tissue away (solidity stored per slice);
- ``zigzag``: the area goes up and down from slice to slice (a slice larger than both neighbours by more than
  ``zigzag_ratio`` of their mean and a slice smaller than both by as much at most ``ZIGZAG_WINDOW`` slices
  apart): an organ's area changes smoothly along the body, so some of these slices take in part of a
  neighbour or miss a part; those slices and their neighbours are flagged;
- ``hu_shift``: the mask's mean HU is more than ``hu_shift`` HU away from the prompted slices' (needs the CT;
  mean HU stored per slice).

The flags ``ragged``, ``zigzag``, ``hu_shift`` and ``end`` use no threshold of the propagation and no model
score; they are for organs (segments with no container). A segment inside another (a tumour in the liver,
often several lesions in one segment) keeps the earlier flags, with ``lesion_uncertain_score``.

Consecutive flagged slices (gaps up to ``merge_gap`` slices bridged) form one review item ("slices 10-21")
with a reason a radiologist reads; a scan gets at most ``max_items`` items (the largest ranges first, liver
before tumours). The thresholds were chosen on the four labelled cases (docs/RESULTS.md, "Review").

Report format (JSON; fields only added over earlier versions): per segment ``name``, ``volume_ml``,
``slices`` (``k``, ``area_mm2``, ``score``, ``source``, ``flags``, ``solidity``, ``mean_hu``; slices between the segment's first and
last, plus flagged ``beyond_end`` / ``end`` slices with area 0; for a segment the dense CRF refined, the flags,
solidity and mean HU are those of its mask before the CRF, the areas those of the final mask; a reason says what
the propagation did where the final mask differs from it: "probably continues past slice 48: its propagation stopped
there ... (the refined outline shown begins at slice 49, 1 % ...)"), ``flagged_slices`` (the slices of the review items),
``tracks``, and ``items`` (``first_slice``, ``last_slice``, ``slices`` as text, ``flags``, ``reason``); at the
top level ``items``, every segment's items in review order (each with its ``segment``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from .segmentation import SegmentationResult

MIN_SHAPE_PIXELS = 20  # masks smaller than this are not judged by their shape
ZIGZAG_WINDOW = 2  # slices between an up and a down of the area that make a zigzag
MAX_REASONS = 3  # an item's reason names at most this many findings, the most telling first
ORGAN_FLAGS_THAT_CAN_BE_OFF = frozenset({"area_jump", "tip", "uncertain", "hu_shift"})  # ReviewSettings.organ_flags_off


@dataclass(frozen=True)
class ReviewSettings:
    """Thresholds of the flags. Defaults chosen on the four labelled cases (one-box, tight boxes, liver;
    docs/RESULTS.md, "Review flags as a detector"). On the masks of session 6 (dense CRF, liver pruning by
    continuation): pooled liver recall 0.84, precision 0.50 with ``organ_flags_off`` (0.94 / 0.43 with every
    flag). What follows was measured in session 3, on the masks of that time (recall 0.90, precision 0.67;
    the flags before: 0.73 / 0.43). The shape of the mask does the work: ``ragged`` (solidity below 0.75 x the prompted
    slice's) finds a run into the heart, ``zigzag`` (6 %) a stretch where the mask takes in a neighbour on
    every other slice, ``end`` the tips; with them the model score adds nothing on the liver
    (``uncertain_score`` 0.8 or off: the same figures; 0.9 flagged most of lits117's lower half, pooled
    precision 0.49). Neighbouring thresholds: ragged 0.7 / 0.8 recall 0.85 / 0.92, precision 0.66 / 0.64;
    zigzag 5 % / 8 % recall 0.90 / 0.81, precision 0.66 / 0.68. ``hu_shift`` at 45 HU changed no flagged slice
    on the four cases (at 30 HU it cost precision) and stays as a guard against a run into fat or bowel.
    ``tip`` flags (below 20-50 % of the largest slice) raised recall but cut precision to 0.26-0.35, so the
    tip threshold stays low (5 %)."""

    max_area_ratio: float = 1.6
    min_jump_mm2: float = 50.0
    min_score: float = 0.6
    uncertain_score: float = 0.8
    end_slices: int = 3
    end_growth_ratio: float = 1.2
    tip_fraction: float = 0.05
    beyond_end_fraction: float = 0.02
    beyond_end_mm: float = 10.0
    flag_box_edge: bool = False
    merge_gap: int = 1
    max_items: int = 10
    # Signals that do not depend on the model's score (see the module docstring).
    flag_ends: bool = True
    ragged_ratio: float | None = 0.75
    zigzag_ratio: float | None = 0.06
    zigzag_min_mm2: float = 50.0
    hu_shift: float | None = 45.0
    # Segments inside another (tumours in the liver): the model scores lesions lower, and a lesion's review
    # keeps the score threshold of earlier versions.
    lesion_uncertain_score: float = 0.9
    lesion_shape_flags: bool = False
    # Flags not raised for organs (segments with no container; lesions keep them). Chosen on the four labelled
    # cases (docs/RESULTS.md, "Review flags as a detector", session 6): each of these marked right slices
    # more often than wrong ones on the liver (own precision area_jump 0.23, tip 0.38, hu_shift 0.38,
    # uncertain 0.40); without them pooled liver recall 0.94 -> 0.84, precision 0.43 -> 0.50.
    organ_flags_off: tuple[str, ...] = ("area_jump", "tip", "uncertain", "hu_shift")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.organ_flags_off) - ORGAN_FLAGS_THAT_CAN_BE_OFF)
        if unknown:
            raise ValueError(f"ReviewSettings.organ_flags_off: unknown flag(s) {unknown}; "
                             f"choose from {sorted(ORGAN_FLAGS_THAT_CAN_BE_OFF)}")


@dataclass
class SliceReview:
    k: int
    area_mm2: float
    score: float | None
    source: str  # "user", "propagated", "interpolated" (--skip-thin-slices) or "" (unknown)
    flags: list[str] = field(default_factory=list)
    solidity: float | None = None  # area / convex-hull area (with ``ragged_ratio``)
    mean_hu: float | None = None  # the mask's mean HU (when the CT is given)


def _solidity(mask_ji: np.ndarray) -> float:
    """The mask's area over the area of its convex hull (1: convex; a ragged or broken-up outline is low).

    The hull is that of the pixels' corners; each row's first and last pixel decide it, so it costs a few
    milliseconds on a 512 x 512 slice."""
    rows = np.flatnonzero(mask_ji.any(axis=1))
    count = int(mask_ji.sum())
    if count < MIN_SHAPE_PIXELS:
        return 1.0
    band = mask_ji[rows]
    left = band.argmax(axis=1)
    right = band.shape[1] - 1 - band[:, ::-1].argmax(axis=1)
    j = rows.astype(float)
    points = np.concatenate([
        np.stack([j - 0.5, left - 0.5], 1), np.stack([j + 0.5, left - 0.5], 1),
        np.stack([j - 0.5, right + 0.5], 1), np.stack([j + 0.5, right + 0.5], 1),
    ])
    try:
        hull_area = float(ConvexHull(points).volume)  # in 2D, ``volume`` is the area
    except QhullError:  # all points on a line cannot happen with pixel corners; kept for safety
        return 1.0
    return min(1.0, count / hull_area) if hull_area > 0 else 1.0


def _reference_slices(present: np.ndarray, areas: np.ndarray, records: dict[int, object]) -> list[int]:
    """The slices a segment's other slices are compared with: the user's (prompted) slices, else the largest."""
    users = [int(k) for k in present if getattr(records.get(int(k)), "source", "") == "user"]
    return users or [int(np.argmax(areas))]


def review_segment(
    mask_kji: np.ndarray,
    pixel_area_mm2: float,
    scores: dict[int, float] | None = None,
    records: dict[int, object] | None = None,
    settings: ReviewSettings | None = None,
    slice_thickness_mm: float = 1.0,
    ct_kji: np.ndarray | None = None,
    lesion: bool = False,
) -> list[SliceReview]:
    """Review one segment. ``records`` maps k to propagation records (``source``, ``touches_box_edge``);
    ``ct_kji`` (the CT in HU, the mask's grid) enables the ``hu_shift`` flag."""
    settings = settings or ReviewSettings()
    if lesion:
        settings = replace(settings, uncertain_score=settings.lesion_uncertain_score)
        if not settings.lesion_shape_flags:
            settings = replace(settings, ragged_ratio=None, zigzag_ratio=None, hu_shift=None, flag_ends=False)
    else:
        off = set(settings.organ_flags_off)
        settings = replace(
            settings,
            max_area_ratio=math.inf if "area_jump" in off else settings.max_area_ratio,
            tip_fraction=0.0 if "tip" in off else settings.tip_fraction,
            uncertain_score=0.0 if "uncertain" in off else settings.uncertain_score,
            hu_shift=None if "hu_shift" in off else settings.hu_shift,
        )
    scores = scores or {}
    records = records or {}
    mask_kji = np.asarray(mask_kji, bool)
    nk = mask_kji.shape[0]
    areas = mask_kji.sum(axis=(1, 2)) * pixel_area_mm2
    present = np.nonzero(areas > 0)[0]
    if present.size == 0:
        return []
    first, last = int(present[0]), int(present[-1])
    largest = float(areas.max())
    references = _reference_slices(present, areas, records)
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
    # Ragged or broken-up outline: the mask fills much less of its convex hull than on the reference slices.
    if settings.ragged_ratio is not None:
        solidity = {k: _solidity(mask_kji[k]) for k in range(first, last + 1) if areas[k] > 0}
        reference = float(np.median([solidity[k] for k in references if k in solidity]))
        for k, value in solidity.items():
            rows[k].solidity = round(value, 3)
            if value < settings.ragged_ratio * reference:
                rows[k].flags.append("ragged")
    # Area going up and down from slice to slice (a liver's area changes smoothly along the body): a slice
    # larger (smaller) than both neighbours by more than zigzag_ratio of their mean, with a slice smaller
    # (larger) than both its neighbours at most ZIGZAG_WINDOW slices away - an organ's single peak is no
    # zigzag. Each such slice and both its neighbours are flagged: one of them probably includes a
    # neighbour's tissue or misses a part.
    if settings.zigzag_ratio is not None:
        bumps: dict[int, int] = {}  # k -> +1 (above both neighbours) or -1 (below both)
        for k in range(first + 1, last):
            before, here, after = areas[k - 1], areas[k], areas[k + 1]
            if min(before, here, after) <= 0:
                continue
            mean = (before + after) / 2.0
            if abs(here - mean) <= max(settings.zigzag_ratio * mean, settings.zigzag_min_mm2):
                continue
            if here > max(before, after):
                bumps[k] = 1
            elif here < min(before, after):
                bumps[k] = -1
        for k, sign in bumps.items():
            if any(bumps.get(k + d) == -sign for d in range(-ZIGZAG_WINDOW, ZIGZAG_WINDOW + 1)):
                for n in (k - 1, k, k + 1):
                    if "zigzag" not in rows[n].flags:
                        rows[n].flags.append("zigzag")
    # Mean HU away from the reference slices': the mask has taken in another tissue.
    # (Each slice's mean HU is reported whenever the CT is given; the flag only where the check is on.)
    if ct_kji is not None:
        means = {k: float(ct_kji[k][mask_kji[k]].mean()) for k in range(first, last + 1) if areas[k] > 0}
        for k, value in means.items():
            rows[k].mean_hu = round(value, 1)
        if settings.hu_shift is not None:
            reference_hu = float(np.median([means[k] for k in references if k in means]))
            for k, value in means.items():
                if abs(value - reference_hu) > settings.hu_shift:
                    rows[k].flags.append("hu_shift")
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
        at_edge = not (0 <= end + outward < nk)
        if settings.flag_ends and not at_edge:
            # The structure's first / last slice inside the scan: its tip, where outlines go most often wrong
            # (cut short or run on), and the slice beyond it, where the structure may still go on.
            rows[end].flags.append("end")
            rows[end + outward] = SliceReview(k=end + outward, area_mm2=0.0, score=None, source="", flags=["end"])
        if areas[end] >= settings.beyond_end_fraction * largest:
            for step in range(1, beyond + 1):
                k = end + outward * step
                if 0 <= k < nk:
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


def _slices_with(rows: list[SliceReview], *flags: str) -> str:
    """The slices of ``rows`` carrying any of ``flags``, runs joined: "slice 40", "slices 42-43", "slices 40, 42-43
    and 50"; more than four runs as their span and count ("slices 40-106, 31 of them")."""
    ks = sorted(r.k for r in rows if any(f in r.flags for f in flags))
    if not ks:
        return "these slices"
    runs = _ranges(ks, 0)
    if len(runs) > 4:
        return f"slices {ks[0]}-{ks[-1]}, {len(ks)} of them"
    texts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    joined = texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]
    return f"slice {joined}" if len(ks) == 1 else f"slices {joined}"


def _beyond_end_reason(name: str, tip: SliceReview | None, largest: float, near: tuple[int, int], where: str,
                       settings: ReviewSettings, flagged_areas: np.ndarray | None) -> str:
    """Why the segment probably continues past its end next to the slices ``near`` (first, last) flagged beyond it
    (``tip``: that end of the mask shown; ``where``: the item's slices to check). ``flagged_areas``: the slice areas of the mask the flags were raised on when it is not the mask
    shown (the propagation's, before the dense CRF): the flag says where the propagation stopped, and the outline
    shown may end elsewhere or be thinner there (lits117's tumour "stops at slice 49 while its outline there is still
    1 % of its largest slice: it probably continues": the propagation had stopped at slice 48, larger, and the CRF
    had emptied that slice and thinned slice 49)."""
    share = f"{100 * tip.area_mm2 / largest:.0f} % of its largest slice" if tip and largest else "large"
    said = (f"{name} stops{f' at slice {tip.k}' if tip else ''} while its outline there is still {share}: it probably "
            f"continues; check {where}")
    if flagged_areas is None or not flagged_areas.any():
        return said
    if tip is not None and tip.area_mm2 >= settings.beyond_end_fraction * largest:
        return said  # the outline shown stops as large as the flag asks: the sentence holds for it
    present = np.nonzero(flagged_areas)[0]
    lower, upper = int(present[0]), int(present[-1])
    stopped = min((lower, upper), key=lambda k: min(abs(k - near[0]), abs(k - near[1])))
    was = f"{100 * flagged_areas[stopped] / flagged_areas.max():.0f} %"
    if tip is None:
        shown = "the refined outline shown has no slice left"
    elif tip.k == stopped:
        shown = f"the refined outline shown is {share} there"
    else:
        shown = f"the refined outline shown {'begins' if stopped == lower else 'ends'} at slice {tip.k}, {share}"
    return (f"{name} probably continues past slice {stopped}: its propagation stopped there while the outline was "
            f"still {was} of its largest slice ({shown}); check {where}")


def _reason(name: str, flags: set[str], rows: list[SliceReview], first: int, last: int, largest: float,
            settings: ReviewSettings, all_rows: list[SliceReview], flagged_areas: np.ndarray | None = None) -> str:
    """The review item's reason in a radiologist's words: each finding names the slices it was found on (the item's
    whole range, merged from nearby findings, is where to look for an end). ``flagged_areas``: the slice areas of
    the mask the flags were raised on, when that is not the mask of the rows (see :func:`review_items`)."""
    where = _slices_text(first, last)
    parts = []
    present = [r for r in all_rows if r.area_mm2 > 0]
    # The segment's end (first or last slice with a mask) nearest this item.
    tip = min((present[0], present[-1]), key=lambda r: min(abs(r.k - first), abs(r.k - last))) if present else None
    if "beyond_end" in flags:
        # Each run of slices flagged beyond an end names the end it lies beyond: an item that spans the whole
        # segment (lits117's tumour, slices 38-127) named the end nearest the item's edge, the scan's last slice
        # (127, "still 61 %"), for the slices 38-47 beyond its first.
        for near in _ranges([r.k for r in rows if "beyond_end" in r.flags], 0)[:2]:
            end = min((present[0], present[-1]), key=lambda r: min(abs(r.k - near[0]), abs(r.k - near[1]))) \
                if present else None
            parts.append(_beyond_end_reason(name, end, largest, near, where, settings, flagged_areas))
    if "end" in flags and "beyond_end" not in flags:
        # the ends the item's end-flagged slices lie at (an item over a short segment holds both: it named one)
        flagged_ends = sorted({min((present[0], present[-1]), key=lambda e: abs(e.k - r.k)).k
                               for r in rows if "end" in r.flags} if present else set())
        if len(flagged_ends) == 2:
            parts.append(f"{name} begins at slice {flagged_ends[0]} and ends at slice {flagged_ends[1]}: at its tips "
                         "the outline is most often wrong; check that it neither stops short nor runs on into a "
                         f"neighbour ({where})")
        else:
            end = flagged_ends[0] if flagged_ends else (tip.k if tip else None)
            which = "begins" if present and end == present[0].k else "ends"
            at = f" at slice {end}" if end is not None else ""
            parts.append(f"{name} {which}{at}: at a tip the outline is most often wrong; check that it neither stops "
                         f"short nor runs on into a neighbour ({where})")
    reference = [r for r in present if r.source == "user"] or ([max(present, key=lambda r: r.area_mm2)] if present else [])
    if "ragged" in flags:
        low = min((r.solidity for r in rows if r.solidity is not None), default=None)
        ref = np.median([r.solidity for r in reference if r.solidity is not None]) if reference else None
        fill = (f" (it fills {100 * low:.0f} % of its convex outline, {100 * ref:.0f} % on the prompted slice)"
                if low is not None and ref is not None and not math.isnan(ref) else "")
        parts.append(f"{name}'s outline is ragged or in pieces on {_slices_with(rows, 'ragged')}{fill}: it may have "
                     "run into a neighbouring "
                     "organ (heart, bowel, kidney) or left parts out")
    if "zigzag" in flags:
        parts.append(f"{name}'s area goes up and down from slice to slice on {_slices_with(rows, 'zigzag')}, where an "
                     "organ's area changes "
                     "smoothly: some of these slices probably take in part of a neighbour or miss a part")
    if "hu_shift" in flags:
        values = [r.mean_hu for r in rows if r.mean_hu is not None]
        refs = [r.mean_hu for r in reference if r.mean_hu is not None]
        if values and refs:
            ref_hu = float(np.median(refs))
            far = max(values, key=lambda v: abs(v - ref_hu))
            tone = "darker" if far < ref_hu else "brighter"
            parts.append(f"{name} is {tone} on {_slices_with(rows, 'hu_shift')} than on the prompted slice (mean "
                         f"{far:.0f} HU against "
                         f"{ref_hu:.0f} HU): it may include another tissue (fat, bowel, kidney, vessels)")
        else:
            parts.append(f"{name}'s mean HU on {_slices_with(rows, 'hu_shift')} differs from the prompted slice's: it "
                         "may include another tissue")
    if "past_end" in flags:
        parts.append(f"{name} grows again towards its end: it may have run into a neighbouring organ; check {where}")
    if "tip" in flags and "beyond_end" not in flags and "end" not in flags:
        tips = [r for r in rows if "tip" in r.flags]
        # flagged on the propagation's mask: said so where the outline shown is not that thin
        before = flagged_areas is not None and any(r.area_mm2 >= settings.tip_fraction * largest for r in tips)
        parts.append(f"{name} {'tapered' if before else 'tapers'} to below {100 * settings.tip_fraction:.0f} % of "
                     f"its largest slice{' before the refinement' if before else ''}: check that it ends where it "
                     f"should and has not run on into a neighbour ({_slices_with(rows, 'tip')})")
    if "area_jump" in flags:
        parts.append(f"{name}'s area changes suddenly between neighbouring slices ({_slices_with(rows, 'area_jump')}): "
                     "a leak or a missed part")
    if "low_score" in flags or "uncertain" in flags:
        low = min((r.score for r in rows if r.score is not None), default=None)
        parts.append(f"the model is unsure of {name} on {_slices_with(rows, 'low_score', 'uncertain')}"
                     + (f" (score {low:.2f})" if low is not None else ""))
    if "gap" in flags:
        parts.append(f"{name} is missing on {_slices_with(rows, 'gap')} between segmented slices")
    if "touches_box_edge" in flags:
        parts.append(f"{name} reaches the edge of its box on {_slices_with(rows, 'touches_box_edge')}: part of it may "
                     "be cut off")
    return "; ".join(parts[:MAX_REASONS])


def review_items(name: str, rows: list[SliceReview], settings: ReviewSettings | None = None,
                 flagged_areas_mm2: np.ndarray | None = None) -> list[dict]:
    """Consecutive flagged slices of one segment as review items (first/last slice, flags, reason).
    ``flagged_areas_mm2``: per slice k, the areas of the mask the rows' flags were raised on when the rows' areas are
    another mask's (a segment the dense CRF refined: flagged before the CRF, the areas those of the final mask); the
    reasons then say what the propagation did where the mask shown differs."""
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
            "reason": _reason(name, flags, span, first, last, largest, settings, rows, flagged_areas_mm2),
        })
    return items


def _final_areas(rows: list[SliceReview], final_kji: np.ndarray, pixel_area_mm2: float, scores: dict[int, float],
                 records: dict[int, object]) -> list[SliceReview]:
    """The rows of a segment flagged on its mask before the dense CRF, with the areas of its final mask (the one
    written, shown and in the lesion table), and a row without flags for a slice only the final mask has. The flags
    describe the propagation; the areas, and the segment's ends the reasons name, what the reader gets (a tumour
    "stops at slice 48" while the lesion table said "slices 50-107": the CRF had taken slices 48 and 49 away)."""
    areas = np.asarray(final_kji, bool).sum(axis=(1, 2)) * pixel_area_mm2
    by_k = {r.k: r for r in rows}
    for k in (int(k) for k in np.nonzero(areas)[0]):
        if k not in by_k:
            by_k[k] = SliceReview(k=k, area_mm2=0.0, score=round(float(scores[k]), 4) if k in scores else None,
                                  source=getattr(records.get(k), "source", ""))
    for row in by_k.values():
        row.area_mm2 = round(float(areas[row.k]), 2)
    return [by_k[k] for k in sorted(by_k)]


def build_review_report(result: SegmentationResult, settings: ReviewSettings | None = None,
                        ct_kji: np.ndarray | None = None, lesions: set[str] | None = None) -> dict:
    """The JSON-ready report of every segment: slices with area, score, source and flags, stop reasons, and
    at most ``max_items`` review items (ranges of flagged slices with their reasons) for the whole scan.
    ``ct_kji``: the CT (HU) the segments were drawn on, for the ``hu_shift`` flag (None: that flag is off).
    ``lesions``: names of the segments inside another (tumours); None: those the pipeline recorded in
    ``result.provenance["inside"]``. A segment refined by the dense CRF is flagged on its mask before the CRF
    (``result.provenance["before_crf"]``): the flags describe what the propagation did; its slices' areas (and the
    ends its reasons name) are those of the final mask."""
    settings = settings or ReviewSettings()
    geometry = result.geometry
    pixel_area = geometry.spacing_mm[0] * geometry.spacing_mm[1]
    outcomes = result.provenance.get("propagation", {}) or {}
    if lesions is None:  # segment name -> its container's name (or None), recorded by the pipeline
        lesions = {name for name, inside in (result.provenance.get("inside") or {}).items() if inside}
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
        lesion = seg.name in lesions
        flagged_on = (result.provenance.get("before_crf") or {}).get(seg.name, seg.mask_kji)
        rows = review_segment(flagged_on, pixel_area, seg.slice_scores, records, settings, geometry.spacing_mm[2],
                              ct_kji, lesion)
        flagged_areas = None
        if flagged_on is not seg.mask_kji:
            rows = _final_areas(rows, seg.mask_kji, pixel_area, seg.slice_scores, records)
            flagged_areas = np.asarray(flagged_on, bool).sum(axis=(1, 2)) * pixel_area
        for item in review_items(seg.name, rows, settings, flagged_areas):
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
