"""Between the module's prompts and settings and the LiverSAM server's requests and answers (no Qt, no MRML).

- prompts read from markups (:class:`LiverSAMLib.MRMLBridge.MarkupsPrompts`, voxel indices) -> the
  server's per-slice requests and segment specs (``ServerClient.segment_spec``, IJK);
- the parameter node's propagation and clean-up packs -> the server's job settings;
- a finished job's answer -> a core :class:`liversam.segmentation.SegmentationResult` on the CT grid, its
  review report -> the rows of the review table;
- :class:`PropagationRecord` / :func:`plan_repropagation`: what the last propagation of a segment was
  computed from, so that prompts changed on a few slices re-propagate only those (a server
  re-propagation job) instead of the whole volume.

Only the numpy-only parts of the core are imported (``liversam.prompts``, ``liversam.segmentation``), so
this runs inside Slicer's Python.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ServerClient import box_ijk, segment_spec
from .SliceNumbers import SliceNumbering

#: Parameter-node member (``LiverSAMLib.Parameters.PropagationParameters``) -> field of
#: ``liversam.propagation.PropagationSettings`` (the names the server's settings use).
PROPAGATION_PARAMETERS: dict[str, str] = {
    "minScore": "min_score",
    "boxMarginMm": "box_margin_mm",
    "useMaskPrompt": "use_mask_prompt",
    "minAreaMm2": "min_area_mm2",
    "collapseRatio": "collapse_ratio",
    "minOverlap": "min_overlap",
    "maxSlices": "max_slices",
    "maxGrowthRatio": "max_growth_ratio",
    "growthAllowanceMm2": "growth_allowance_mm2",
    "maxMeanHuShift": "max_mean_hu_shift",
    "intensityRefinement": "intensity_refinement",
}
#: Parameter-node member -> the server's job setting that is no field of ``PropagationSettings``, sent only when it
#: differs from the server's default, so a server without it still takes the job: every other thin organ slice
#: interpolated (sent when on), a tumour's partial-volume ring (``liversam.lesion_rim``; sent when off).
PIPELINE_PARAMETERS: dict[str, str] = {"skipThinSlicesMm": "skip_thin_slices_mm", "lesionRim": "lesion_rim"}
#: ``liversam.propagation.PropagationSettings()`` as the server receives it (that module imports torch, so
#: Slicer's Python cannot ask it; a test checks these equal the core's defaults).
PROPAGATION_DEFAULTS: dict[str, Any] = {
    "min_score": 0.45,
    "box_margin_mm": 3.0,
    "use_mask_prompt": False,
    "min_area_mm2": 15.0,
    "collapse_ratio": 0.2,
    "min_overlap": 0.2,
    "max_slices": None,
    "max_growth_ratio": 1.5,
    "growth_allowance_mm2": 40.0,
    "max_mean_hu_shift": 80.0,
    "intensity_refinement": True,
}
#: Parameter-node member (``LiverSAMLib.Parameters.PostprocessParameters``) -> the server's job setting
#: (``liversam.server.schemas.JobSettings``); ``clipTumorToLiver`` is the tumour segment's container instead.
POSTPROCESS_PARAMETERS: dict[str, str] = {
    "fillHoles": "fill_holes",
    "minIslandVolumeMm3": "min_island_mm3",
    "keepLargestComponent": "keep_largest",
    "closingRadiusMm": "closing_radius_mm",
    "denseCrf": "crf",
}
#: The server's clean-up defaults (``liversam segment``'s; a test checks them against ``JobSettings``): the
#: liver keeps its largest 3D component; ``crf`` None lets the server refine every segment it can.
POSTPROCESS_DEFAULTS: dict[str, Any] = {
    "fill_holes": True,
    "min_island_mm3": 0.0,
    "keep_largest": ["liver"],
    "closing_radius_mm": 0.0,
    "crf": None,
}
#: Every job setting's default (what a server that does not know a setting computes with anyway).
JOB_DEFAULTS: dict[str, Any] = {**PROPAGATION_DEFAULTS, **POSTPROCESS_DEFAULTS}
#: Parameter-node member (``ReviewParameters``) -> field of ``liversam.review.ReviewSettings``.
REVIEW_PARAMETERS: dict[str, str] = {"maxAreaRatio": "max_area_ratio", "minScore": "min_score"}


# --- prompts -> requests ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceRequest:
    """One slice's prompts as ``LiverSAMClient.predict_slice`` takes them (voxel indices)."""

    k: int
    boxes_ij: tuple[tuple[float, float, float, float], ...]
    points_ij: tuple[tuple[float, float], ...]
    negative_points_ij: tuple[tuple[float, float], ...]


def slice_requests(markups_prompts) -> list[SliceRequest]:
    """A request per prompted slice that defines an object (negative points alone do not)."""
    requests = []
    for k, prompts in markups_prompts.to_slice_prompts().items():
        if prompts.is_empty():
            continue
        requests.append(
            SliceRequest(
                int(k),
                tuple(tuple(float(v) for v in box) for box in prompts.boxes_ij),
                tuple((float(i), float(j)) for i, j in prompts.points_pos_ij),
                tuple((float(i), float(j)) for i, j in prompts.points_neg_ij),
            )
        )
    return requests


def segment_spec_from_prompts(
    name: str,
    label: int,
    given: Mapping[int, Any],
    inside: str | None = None,
    color: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A propagation request's segment (``ServerClient.segment_spec``) from ``{k: SlicePrompts}``."""
    boxes, points, negatives = [], [], []
    for k, prompts in sorted(given.items()):
        boxes += [box_ijk(*box, k) for box in prompts.boxes_ij]
        points += [[float(i), float(j), float(k)] for i, j in prompts.points_pos_ij]
        negatives += [[float(i), float(j), float(k)] for i, j in prompts.points_neg_ij]
    return segment_spec(name, label, boxes, points, negatives, inside=inside, propagate=True, color=color)


def propagation_settings(pack) -> dict[str, Any]:
    """The server's propagation settings (core field names) from the parameter node's ``propagation`` pack.

    ``maxSlices`` 0 means no limit (None); the leak guards' 0 means off (None); ``skipThinSlicesMm`` is sent
    as ``skip_thin_slices_mm`` only when above 0, ``lesionRim`` as ``lesion_rim`` only when off.
    """
    values = {core: getattr(pack, member) for member, core in PROPAGATION_PARAMETERS.items()}
    values["max_slices"] = int(values["max_slices"]) or None
    values["use_mask_prompt"] = bool(values["use_mask_prompt"])
    values["intensity_refinement"] = bool(values["intensity_refinement"])
    for name in ("min_score", "box_margin_mm", "min_area_mm2", "collapse_ratio", "min_overlap",
                 "growth_allowance_mm2"):  # fmt: skip
        values[name] = float(values[name])
    for name in ("max_growth_ratio", "max_mean_hu_shift"):
        values[name] = float(values[name]) or None
    skip_mm = float(pack.skipThinSlicesMm)
    if skip_mm > 0:
        values["skip_thin_slices_mm"] = skip_mm
    if not pack.lesionRim:
        values["lesion_rim"] = False
    return values


def postprocess_settings(pack) -> dict[str, Any]:
    """The server's clean-up settings from the parameter node's ``postprocess`` pack (``denseCrf`` off: no
    segment is refined, ``[]``; on: the server's default, None)."""
    return {
        "fill_holes": bool(pack.fillHoles),
        "min_island_mm3": float(pack.minIslandVolumeMm3),
        "keep_largest": ["liver"] if pack.keepLargestComponent else [],
        "closing_radius_mm": float(pack.closingRadiusMm),
        "crf": None if pack.denseCrf else [],
    }


def job_settings(propagation_pack, postprocess_pack) -> dict[str, Any]:
    """Everything a propagation job is computed with: propagation rules and clean-up (core field names)."""
    return {**propagation_settings(propagation_pack), **postprocess_settings(postprocess_pack)}


def call_with_settings(method: Callable[..., Any], *args: Any, settings: Mapping[str, Any]) -> Any:
    """Call a client job method with the propagation settings it accepts.

    The client takes ``max_slices`` and ``intensity_refinement`` as keywords, and a whole ``settings``
    mapping when the server supports every propagation rule; whatever the method does not accept is not
    sent (the server then uses the core defaults for it).
    """
    parameters = inspect.signature(method).parameters
    if "settings" in parameters:
        return method(*args, settings=dict(settings))
    keywords = {name: settings[name] for name in ("max_slices", "intensity_refinement") if name in parameters}
    return method(*args, **keywords)


def unsupported_settings(method: Callable[..., Any], settings: Mapping[str, Any]) -> list[str]:
    """Settings that differ from the core defaults but that ``method`` cannot send (shown to the user)."""
    parameters = inspect.signature(method).parameters
    if "settings" in parameters:
        return []
    return [
        name for name, value in settings.items() if name not in parameters and value != JOB_DEFAULTS.get(name)
    ]


# --- answers -> results ------------------------------------------------------------------------------------------
def result_from_job(answer: Mapping[str, Any], geometry) -> Any:
    """A ``SegmentationResult`` on the CT grid from ``LiverSAMClient.job_result`` (masks included)."""
    from liversam.segmentation import Segment, SegmentationResult

    segments = []
    for number, segment in enumerate(answer["segments"], start=1):
        mask = np.asarray(segment["mask"], dtype=bool)
        if mask.shape != geometry.shape_kji:
            raise ValueError(
                f"the server's mask of '{segment['name']}' has shape {mask.shape}, the CT {geometry.shape_kji}"
            )
        color = tuple(segment.get("color") or (0.5, 0.5, 0.5))
        segments.append(Segment(segment["name"], int(segment.get("label") or number), mask, color))
    return SegmentationResult(geometry=geometry, segments=segments, provenance={"review": answer.get("review")})


#: How the review report's flags read in the table.
FLAG_TEXT: dict[str, str] = {
    "area_jump": "sudden area change",
    "low_score": "low model score",
    "touches_box_edge": "mask reaches its box edge",
    "past_end": "may run past the structure's end",
    "gap": "empty slice inside the segment",
    "tip": "thin tip of the structure",
    "beyond_end": "may continue past this end",
    "uncertain": "model unsure",
    "end": "first or last slice: check the tip",
    "ragged": "ragged or broken-up outline",
    "zigzag": "area goes up and down between slices",
    "hu_shift": "mean HU unlike the prompted slice",
}


@dataclass(frozen=True)
class ReviewItem:
    """One line of the review list: a range of consecutive flagged slices of a segment and why."""

    first_slice: int
    last_slice: int
    segment: str
    reason: str

    @property
    def slices(self) -> str:
        if self.first_slice == self.last_slice:
            return str(self.first_slice)
        return f"{self.first_slice}-{self.last_slice}"


def review_items(report: Mapping[str, Any] | None) -> list[ReviewItem]:
    """The review report's items (ranges of flagged slices with reasons in words), in the report's order.

    A report without ``items`` (from an older server) gives one item per flagged slice.
    """
    report = report or {}
    if "items" in report:
        return [ReviewItem(int(item["first_slice"]), int(item["last_slice"]), str(item["segment"]), str(item["reason"]))
                for item in report["items"]]  # fmt: skip
    return [ReviewItem(row.k, row.k, row.segment, row.reason) for row in review_rows(report)]


@dataclass(frozen=True)
class ReviewRow:
    """One flagged slice of the review table (from the core's review report)."""

    k: int
    segment: str
    flags: tuple[str, ...]
    area_mm2: float
    score: float | None

    @property
    def reason(self) -> str:
        words = []
        for flag in self.flags:
            text = FLAG_TEXT.get(flag, flag)
            if flag == "low_score" and self.score is not None:
                text += f" {self.score:.2f}"
            words.append(text)
        return ", ".join(words)


def review_rows(report: Mapping[str, Any] | None) -> list[ReviewRow]:
    """Flagged slices of every segment of a review report (``liversam.review.build_review_report``)."""
    rows = [
        ReviewRow(int(entry["k"]), segment["name"], tuple(entry["flags"]), float(entry["area_mm2"]), entry.get("score"))
        for segment in (report or {}).get("segments", [])
        for entry in segment.get("slices", [])
        if entry.get("flags")
    ]
    return sorted(rows, key=lambda row: (row.k, row.segment))


def track_summary(report: Mapping[str, Any] | None, numbering: SliceNumbering | None = None) -> list[str]:
    """One line per propagation track: the seed slice, the slices it covered and why it stopped each way. The slices
    are shown by ``numbering`` (the volume's own index; default: the working k the report holds)."""
    numbering = numbering or SliceNumbering()
    lines = []
    for segment in (report or {}).get("segments", []):
        for track in segment.get("tracks", []):
            stops = "; ".join(f"{direction}: {numbering.renumber(str(why))}" for direction, why in track["stopped"].items())
            low, high = numbering.span(int(track["first_slice"]), int(track["last_slice"]))
            lines.append(
                f"{segment['name']}: from slice {numbering.number(int(track['seed_slice']))}, slices {low}-{high} "
                f"({stops})"
            )
    return lines


# --- fix and re-propagate ----------------------------------------------------------------------------------------
@dataclass
class PropagationRecord:
    """What one segment's last propagation (or fix) was computed from.

    ``given``: the prompts as placed, ``{k: SlicePrompts}``; ``volume_key``: the voxels (node ID, image
    modification time); ``settings``: the propagation settings sent; ``session``: the server session whose
    mask named ``mask_name`` holds the segment as that job left it; ``filled``: the slices the job's segment held
    voxels on (:func:`propagation_still_there`).
    """

    given: dict
    volume_key: Hashable
    settings: dict
    session: str = ""
    mask_name: str = ""
    scores: dict[int, float] = field(default_factory=dict)
    filled: tuple[int, ...] = ()


def plan_repropagation(
    record: PropagationRecord | None, given: Mapping, volume_key: Hashable, settings: Mapping
) -> list[int] | None:
    """The slices to fix by local re-propagation, or None when a full propagation is needed.

    A fix is possible when the segment was propagated before from the same voxels with the same settings,
    and the prompts only gained or changed slices (a removed slice changes the seeds: propagate again).
    Returns the changed slices in order; an empty list means nothing changed.
    """
    if record is None or record.volume_key != volume_key or dict(record.settings) != dict(settings):
        return None
    if any(k not in given for k in record.given):
        return None
    return sorted(int(k) for k, prompts in given.items() if record.given.get(k) != prompts)


def propagation_still_there(record: PropagationRecord, existing_kji: np.ndarray, given: Mapping = ()) -> bool:
    """Whether the segment (``existing_kji``, bool [k, j, i]) still holds what the recorded propagation wrote, so that
    a fix can build on it: False when it has no voxel left on any slice the propagation filled besides the prompted
    ones, then (``record.given``) or now (``given``) -- the propagation was undone, or its result erased; the prompted
    slices hold what live updates wrote there. A fix on such a segment re-propagated the changed slices and at most one
    slice each way (``liversam.propagation.REPROPAGATION_MAX_REACH``) and left the rest of the structure empty: it must
    be a propagation again.

    A propagation that filled its prompted slices only (a lesion on one slice) is told by those slices: False when the
    segment holds nothing on any of them (undone with live updates off, or erased). True when the record names no slice
    at all (the propagation found nothing: a fix builds on the same empty segment).

    Main thread, on a segment of hundreds of slices: each slice is looked at in turn and the first one with a voxel
    ends the search (no copy of the slices, as indexing with a list of them made)."""
    depth = existing_kji.shape[0]
    prompted = {int(k) for k in record.given} | {int(k) for k in given}
    filled = [int(k) for k in record.filled if 0 <= int(k) < depth]
    beyond = [k for k in filled if k not in prompted]
    if not filled:
        return True
    return any(existing_kji[k].any() for k in (beyond or filled))


def record_of(given: Mapping, volume_key: Hashable, settings: Mapping, session: str, mask_name: str,
              filled: Sequence[int] = ()) -> PropagationRecord:  # fmt: skip
    """The record of a propagation (or fix) computed from ``given``; ``filled``: the slices its segment holds voxels on."""
    return PropagationRecord(copy.deepcopy(dict(given)), volume_key, dict(settings), session, mask_name,
                             filled=tuple(int(k) for k in filled))  # fmt: skip
