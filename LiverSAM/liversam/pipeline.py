"""From prompts to a :class:`SegmentationResult`: the job ``liversam segment`` and the Slicer module run.

For every segment: each slice that carries prompts is segmented from them; with ``propagate`` the result
is carried slice by slice through the volume (see :mod:`liversam.propagation`). Then 3D clean-up, the
``inside`` clipping (tumour inside liver), and the overlap rule (a later segment wins; a segment listed before the
one it is inside counts as right after it). Segments named in
``PipelineSettings.crf`` are then refined by a dense CRF on the CT (:mod:`liversam.dense_crf`; off by
default): a pass after every segment is made (so each segment propagates exactly as without it), in
dependency order, a segment ``inside`` another refined within that one's refined mask. Last, a propagated
lesion (a segment ``inside`` another) takes every voxel it holds on slices on both sides at most two slices
apart (``PipelineSettings.fill_lesions_between_slices``), takes its partial-volume ring (the voxels one step
outside its outline that lean to its side: ``PipelineSettings.lesion_rim``, :mod:`liversam.lesion_rim`), and each
organ loses its dark partial-volume rim (``PipelineSettings.organ_rim``, :mod:`liversam.organ_rim`: not a segment
named as a tumour; a dark piece reaching deeper than the rim and the voxels of the segments inside the organ kept).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from . import __version__
from .dense_crf import CRFSettings, refine_with_crf
from .errors import Cancelled, PromptError
from .intensity_refinement import box_region
from .lesion_outline_band import OutlineBandSettings, remove_outline_bands
from .lesion_rim import LesionRimSettings, apply_rings, lesion_rings
from .organ_rim import OrganRimSettings, is_trimmed_organ, remove_partial_volume_rim
from .postprocess import (
    Postprocess3DSettings,
    PostprocessSettings,
    clean_slice,
    clean_volume,
    fill_between_slices,
)
from .predictor import POINT_REACH_MM, SlicePredictor, point_disk
from .prompts import SegmentPrompts
from .propagation import LesionExtent, OrganTrackSettings, PropagationSettings, for_lesions, propagate_segment
from .segmentation import Segment, SegmentationResult

log = logging.getLogger(__name__)

__all__ = ["Cancelled", "PipelineSettings", "segment_volume", "segment_prompted_slices"]

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)
CancelCallback = Callable[[], bool]


# The longest gap (in slices) a lesion's fill closes: one slice 0.7739, two 0.7760, three 0.7763 (tight, mean).
LESION_FILL_MAX_GAP = 2


@dataclass(frozen=True)
class PipelineSettings:
    slice_postprocess: PostprocessSettings = field(default_factory=PostprocessSettings)
    # Per-segment 3D clean-up by segment name; segments not listed get ``default_3d``.
    postprocess_3d: dict[str, Postprocess3DSettings] = field(
        default_factory=lambda: {"liver": Postprocess3DSettings(fill_holes=True, keep_largest=True)}
    )
    default_3d: Postprocess3DSettings = field(default_factory=lambda: Postprocess3DSettings(fill_holes=True))
    # Segments ``inside`` another (tumours) propagate with ``for_lesions(propagation)``.
    propagation: PropagationSettings = field(default_factory=PropagationSettings)
    # "liversam" or "naive" (the reference loop every evaluation reports beside it; no 3D clean-up).
    propagation_method: str = "liversam"
    # How an organ's track copes with thick slices, and the opt-in skipping of every other thin slice.
    organ_track: OrganTrackSettings = field(default_factory=OrganTrackSettings)
    # How far a lesion's track (a segment inside another) reaches from its box: 1.5 x its largest diameter, 0.5 x
    # when the intensity refinement found no contrast in its box (liversam.propagation.LesionExtent). None: no limit.
    lesion_extent: LesionExtent | None = field(default_factory=LesionExtent)
    later_segment_wins: bool = True
    # A propagated lesion's gaps of up to LESION_FILL_MAX_GAP slices along k are closed after the CRF (one-box
    # tumour Dice, mean of the four cases, tight / jittered / loose boxes: 0.772 / 0.767 / 0.721 -> 0.776 /
    # 0.772 / 0.725; no case lower with tight boxes; docs/RESULTS.md, session 9). Not the organ here, after the CRF:
    # there a one-slice fill changed the four livers by -0.0007 to +0.0000 (its own fill comes before its lesions
    # propagate, for their sake: ``fill_organ_gaps_below_mm``).
    fill_lesions_between_slices: bool = True
    # An organ (``organ_rim.is_trimmed_organ``) propagated on slices thinner than this (mm) has its one-slice gaps
    # along k closed right after its propagation, before the segments inside it (its lesions) propagate: a voxel the
    # organ holds on the slices on both sides is the organ's on the slice between (not on a slice with its own
    # prompts; the review report then reads the filled mask; a fix in the Slicer module or the web app re-propagates
    # at most a slice each way and fills nothing). On a noisy scan the model's liver mask may leave out a slice's
    # part that both neighbours hold, lesion included, and a lesion's track clipped to that slice lost its lesion
    # from there on (lits117 with noise SD 20 HU, tight boxes: tumour Dice 0.7265 -> 0.8149). Thick slices keep
    # their masks: on hcc2144 (5 mm) the fill cost its tumour 0.780 -> 0.760, and between slices 5 mm apart the
    # outline truly moves. docs/RESULTS.md, session 30. None: off.
    fill_organ_gaps_below_mm: float | None = 3.0
    # Dense-CRF refinement by segment name (off for segments not listed; see dense_crf.crf_for_segments).
    crf: dict[str, CRFSettings] = field(default_factory=dict)
    # Whether ``slice_postprocess.fill_holes`` fills the holes of an organ's slice masks too (a segment with no
    # container; lesions' are always filled when it is on; the organ's 3D result is filled either way). Off:
    # the model leaves the hilum and the large vessels out of the liver where the labels do too, and filling
    # each slice put them back. One-box liver Dice, mean of the four cases, tight / jittered / loose boxes:
    # 0.9534 / 0.9536 / 0.9536 filled, 0.9545 / 0.9545 / 0.9547 not (ircadb17 0.9692 -> 0.9721, no case lower);
    # tumour 0.7802 / 0.7688 / 0.7203 -> 0.7842 / 0.7700 / 0.7186 (docs/RESULTS.md, session 15).
    fill_organ_slice_holes: bool = False
    # An organ's (a segment with no container, not named as a tumour) dark partial-volume rim is trimmed from its
    # final mask, last; a dark piece reaching deeper than the rim and the segments inside it stay
    # (:mod:`liversam.organ_rim`). Part of the intensity refinement (off with it, and for the naive loop). One-box
    # liver Dice, four cases, tight: 0.9545 -> 0.9553, tumour unchanged (docs/RESULTS.md, session 16). None: off.
    organ_rim: OrganRimSettings | None = field(default_factory=OrganRimSettings)
    # A propagated lesion (a segment inside another) takes the voxels one step outside its outline that still lean
    # to its side of the parenchyma (:mod:`liversam.lesion_rim`), after the fill and before the organ's trim. Part
    # of the intensity refinement (off with it, and for the naive loop). One-box tumour Dice, four cases, tight /
    # jittered / loose boxes: 0.7849 / 0.7755 / 0.7247 -> 0.7987 / 0.7852 / 0.7286 (docs/RESULTS.md, session 19).
    # None: off.
    lesion_rim: LesionRimSettings | None = field(default_factory=LesionRimSettings)
    # Then each propagated lesion loses the thin bands it sends along its container's outline (the pieces of what an
    # opening with a 2 mm disc removes that reach within 3 mm of the outline, on pieces of the lesion that keep a
    # body; :mod:`liversam.lesion_outline_band`).
    # Part of the intensity refinement (off with it, and for the naive loop). One-box tumour Dice, four cases, tight
    # / jittered / loose boxes: 0.7987 / 0.7871 / 0.7422 -> 0.8017 / 0.7910 / 0.7519, every case gains with every
    # box style (docs/RESULTS.md, session 21). Not in the server's re-propagation of a fix (the slices a reader fixed
    # keep what the fix asked for). None: off.
    lesion_outline_band: OutlineBandSettings | None = field(default_factory=OutlineBandSettings)
    # A hyperdense lesion at the organ's edge (an HCC in the arterial phase) is tissue far brighter than the organ:
    # the organ's propagation sets it aside with the kidney and the vessels (intensity refinement), or the model's
    # organ mask leaves it out, and a lesion clipped to its organ would lose it. On: a lesion's track whose model mask
    # lies at least a quarter outside the organ on its seed slice, near it, and is brighter than the organ there may
    # leave the organ within its box, and the organ takes what the lesion holds there (a caller's container is
    # copied, never written into; the conditions: ``propagation._Propagator._hyperdense_past_container``;
    # docs/RESULTS.md, session 22). Off: a lesion stays within its organ's mask.
    hyperdense_lesions_past_organ: bool = True
    # The same for a hypodense lesion: the organ's model mask may leave out a dark lesion on its outline on every slice
    # the lesion spans (thick slices above all). On: a lesion whose box shows a hypodense contrast inside the organ and
    # whose model mask lies at least a quarter outside the organ on its seed slice, near it, is darker than the organ
    # and at least half lesion-like outside it (not fat or air) may leave the organ within its box on that slice and
    # within the previous slice's lesion off it, and the organ takes what the lesion holds there
    # (``propagation._Propagator._hypodense_past_container``). lits117 averaged to 3 mm slices, one-box Dice tight /
    # jittered / loose: tumour 0.7659 / 0.7528 / 0.7117 -> 0.7965 / 0.7840 / 0.7424, liver 0.9310 / 0.9308 / 0.9286 ->
    # 0.9388 / 0.9385 / 0.9361; the four cases themselves unchanged (docs/RESULTS.md, session 28). Off: only
    # hyperdense lesions leave the organ.
    hypodense_lesions_past_organ: bool = True
    # The organ's model mask leaves out a hypodense lesion along its outline where the lesion ends the organ's slice,
    # and the lesion's track, clipped to the organ, collapses there. On: a lesion's track that the organ would cut
    # short goes on within its previous slice's lesion, and the organ takes what the lesion holds there
    # (``propagation._Propagator._continue_past_container``). One-box Dice, four cases, tight / jittered / loose boxes:
    # tumour 0.8042 / 0.7949 / 0.7595 -> 0.8061 / 0.7970 / 0.7613, liver 0.9565 -> 0.9567 (ircadb17 tumour 0.8816 ->
    # 0.8892, liver 0.9724 -> 0.9733; docs/RESULTS.md, session 27). Not in the server's re-propagation of a fix. Off:
    # a lesion stays within its organ's mask (but for the hyperdense rule above).
    lesions_continue_past_organ: bool = True

    def slice_postprocess_for(self, lesion: bool) -> PostprocessSettings:
        """The 2D clean-up of one segment's slice masks: ``lesion`` for a segment inside a container."""
        if lesion or self.fill_organ_slice_holes or not self.slice_postprocess.fill_holes:
            return self.slice_postprocess
        return replace(self.slice_postprocess, fill_holes=False)


def _after_their_containers(segments: list[SegmentPrompts]) -> list[SegmentPrompts]:
    """The file's order, except that a segment listed before the segment it is inside comes right after that one
    (after any others waiting for it, in the file's order). Call after :func:`order_by_dependency` has refused loops."""
    by_name = {s.name: s for s in segments}
    placed: list[SegmentPrompts] = []
    waiting: dict[str, list[SegmentPrompts]] = {}

    def place(seg: SegmentPrompts) -> None:
        placed.append(seg)
        for later in waiting.pop(seg.name, []):
            place(later)

    for seg in segments:
        if seg.inside in by_name and by_name[seg.inside] not in placed:
            waiting.setdefault(seg.inside, []).append(seg)
        else:
            place(seg)
    return placed


def order_by_dependency(segments: list[SegmentPrompts]) -> list[SegmentPrompts]:
    """Segments ordered so that each one's ``inside`` container comes before it (file order otherwise)."""
    by_name = {s.name: s for s in segments}
    ordered: list[SegmentPrompts] = []
    visiting: set[str] = set()

    def visit(seg: SegmentPrompts) -> None:
        if seg in ordered:
            return
        if seg.name in visiting:
            raise PromptError(f"segments '{seg.name}' and '{seg.inside}' are each inside the other.")
        visiting.add(seg.name)
        if seg.inside in by_name:
            visit(by_name[seg.inside])
        ordered.append(seg)

    for seg in segments:
        visit(seg)
    return ordered


def segment_prompted_slices(
    seg: SegmentPrompts, predictor: SlicePredictor, settings: PipelineSettings
) -> tuple[np.ndarray, dict[int, float], dict]:
    """Segment only the slices that carry prompts. Returns (mask [k,j,i], scores per slice, predictions)."""
    geometry = predictor.volume.geometry
    spacing_ji = (geometry.spacing_mm[1], geometry.spacing_mm[0])
    mask = np.zeros(geometry.shape_kji, dtype=bool)
    scores: dict[int, float] = {}
    predictions = {}
    for k in sorted(seg.slices):
        prediction = predictor.predict(k, seg.slices[k])
        mask[k] = clean_slice(prediction.mask_ji, spacing_ji, settings.slice_postprocess_for(seg.inside is not None))
        scores[k] = prediction.score
        predictions[k] = prediction
    return mask, scores, predictions


def _refine_with_crf(volume, ordered: list[SegmentPrompts], result: SegmentationResult,
                     masks: dict[str, np.ndarray], crf: dict[str, CRFSettings], spacing_kji,
                     progress: ProgressCallback | None, cancel: CancelCallback | None) -> None:
    """The dense-CRF pass: the named segments refined in dependency order; a segment inside a refined one
    is clipped to the refined mask (refined itself or not)."""
    by_name = {s.name: s for s in result.segments}
    for seg in ordered:
        if cancel is not None and cancel():
            raise Cancelled()
        container = masks.get(seg.inside) if seg.inside else None
        mask = masks[seg.name]
        settings = crf.get(seg.name)
        # The thin-slice test here as well as in refine_with_crf: a skipped mask stays the same array, no copy.
        if settings is not None and mask.any() and settings.applies_to(spacing_kji[0]):
            if progress:
                progress(f"dense CRF '{seg.name}'", 0, 0)  # one call on the whole segment: no count to show
            if not seg.propagate and settings.dims != 2:  # prompted slices only: refine them, add no slice
                settings = replace(settings, dims=2)
            mask = refine_with_crf(volume.array_kji, mask, spacing_kji, settings, within_kji=container)
        elif container is not None:
            mask = mask & container
        masks[seg.name] = by_name[seg.name].mask_kji = mask


def _fill_lesions_between_slices(ordered: list[SegmentPrompts], result: SegmentationResult,
                                 masks: dict[str, np.ndarray]) -> None:
    """Each propagated segment ``inside`` another has its gaps along k of up to ``LESION_FILL_MAX_GAP`` slices
    closed, inside its container. A slice with the user's prompts for any lesion segment is filled only inside
    the user's boxes there and never near a negative point (a slice with points alone is not filled), so all
    lesion boxes in one segment give the masks of one segment per lesion; the one difference left: one segment
    also fills a voxel between two different lesions that hold it on slices either side."""
    shape_ji = result.geometry.shape_kji[1:]
    prompted = [seg.slices for seg in ordered if seg.inside]
    limits: dict[int, np.ndarray] = {}
    for slices in prompted:
        for k, prompts in slices.items():
            region = limits.setdefault(k, np.zeros(shape_ji, dtype=bool))
            for box in prompts.boxes_ij:
                region |= box_region(shape_ji, box)
    for slices in prompted:  # after every segment's boxes: a negative point wins over any box
        for k, prompts in slices.items():
            for point in prompts.points_neg_ij:
                limits[k] &= ~point_disk(shape_ji, point, result.geometry.spacing_mm[:2], POINT_REACH_MM)
    by_name = {s.name: s for s in result.segments}
    for seg in ordered:
        if not (seg.inside and seg.propagate):
            continue
        filled = fill_between_slices(masks[seg.name], limits, max_gap=LESION_FILL_MAX_GAP,
                                     within=masks.get(seg.inside))
        if filled is not masks[seg.name]:
            masks[seg.name] = by_name[seg.name].mask_kji = filled


def _fills_organ_gaps(settings: PipelineSettings, thickness_mm: float) -> bool:
    """Whether an organ's one-slice gaps are closed (``PipelineSettings.fill_organ_gaps_below_mm``): part of the
    intensity refinement's checks, never for the naive loop."""
    limit = settings.fill_organ_gaps_below_mm
    return (limit is not None and thickness_mm < limit and settings.propagation.intensity_refinement
            and settings.propagation_method != "naive")


def _organ_rim(settings: PipelineSettings) -> OrganRimSettings | None:
    """The organ rim's trim when it applies: part of the intensity refinement, never for the naive loop."""
    if settings.propagation.intensity_refinement and settings.propagation_method != "naive":
        return settings.organ_rim
    return None


def _lesion_rim(settings: PipelineSettings) -> LesionRimSettings | None:
    """The lesions' ring when it applies: part of the intensity refinement, never for the naive loop."""
    if settings.propagation.intensity_refinement and settings.propagation_method != "naive":
        return settings.lesion_rim
    return None


def _give_back_to_organ(organ_kji: np.ndarray, lesion_kji: np.ndarray, beyond: dict[int, np.ndarray]) -> None:
    """The organ takes the voxels outside it that a hyper- or hypodense lesion's track, or a track the organ cut short,
    took and the lesion still holds (``PipelineSettings.hyperdense_lesions_past_organ``,
    ``hypodense_lesions_past_organ``, ``lesions_continue_past_organ``),
    in place, so the lesion stays inside it. A caller's
    container (the liver of the Slicer scene or of a server session) is a copy: the lesion sent back may reach past
    the caller's liver, and the clients give it those voxels (``LiverSAMLib.ServerSegmentation.apply_propagation``,
    the web app's ``Workflow.apply_result``)."""
    for k, flat in beyond.items():
        j, i = np.divmod(flat, organ_kji.shape[2])
        organ_kji[k, j, i] |= lesion_kji[k, j, i]


def _propagated_lesions(ordered: list[SegmentPrompts], result: SegmentationResult,
                        masks: dict[str, np.ndarray]) -> list[SegmentPrompts]:
    """The lesions of this run: propagated segments inside a container this run holds, with a result."""
    by_name = {s.name for s in result.segments}
    return [seg for seg in ordered if seg.inside and seg.propagate and seg.inside in masks and seg.name in by_name]


def _remove_outline_bands(ordered: list[SegmentPrompts], result: SegmentationResult, masks: dict[str, np.ndarray],
                          spacing_ji: tuple[float, float], band: OutlineBandSettings) -> None:
    """Each propagated lesion of this run without the thin bands along its container's outline, in place."""
    by_name = {s.name: s for s in result.segments}
    for seg in _propagated_lesions(ordered, result, masks):
        remove_outline_bands(by_name[seg.name].mask_kji, masks[seg.inside], spacing_ji, band)


def _outline_band(settings: PipelineSettings) -> OutlineBandSettings | None:
    """The lesions' outline-band removal when it applies: part of the intensity refinement, never for the naive
    loop."""
    if settings.propagation.intensity_refinement and settings.propagation_method != "naive":
        return settings.lesion_outline_band
    return None


def _add_lesion_rims(volume, ordered: list[SegmentPrompts], result: SegmentationResult,
                     masks: dict[str, np.ndarray], rim: LesionRimSettings) -> None:
    """Each propagated lesion of this run (a segment inside a container) with its partial-volume ring, in place.
    Every ring is found before any is added, with all the lesions in the organ left out of its parenchyma and out of
    its reach: one ``tumor`` segment and one segment per lesion get the same rings (unless two lesions touch in 3D:
    in one segment they are one piece, judged together)."""
    by_name = {s.name: s for s in result.segments}
    spacing_ji = (volume.geometry.spacing_mm[1], volume.geometry.spacing_mm[0])
    lesions = _propagated_lesions(ordered, result, masks)
    found = []
    for seg in lesions:
        others = [masks[o.name] for o in lesions if o.inside == seg.inside and o.name != seg.name]
        found.append(lesion_rings(by_name[seg.name].mask_kji, volume.array_kji, masks[seg.inside], spacing_ji, rim,
                                  exclude=others))
    for seg, rings in zip(lesions, found, strict=True):
        apply_rings(by_name[seg.name].mask_kji, rings)


def _trim_organ_rims(volume, ordered: list[SegmentPrompts], result: SegmentationResult,
                     masks: dict[str, np.ndarray], rim: OrganRimSettings) -> None:
    """Each organ of this run (a segment with no container, not named as a tumour) without its dark rim; the voxels
    of the segments inside it stay in it (the lesions keep their container). In place (no second whole-volume mask
    on a large CT): every mask here is this run's own array. Where the CRF ran, the review's pre-CRF mask is another
    array and stays as it was; where it was skipped (thin slices) that entry is this same array, and the review
    reads the final mask, as it does with no CRF at all."""
    by_name = {s.name: s for s in result.segments}
    for seg in ordered:
        if not is_trimmed_organ(seg.name, seg.inside) or seg.name not in by_name:
            continue
        keep = [masks[inner.name] for inner in ordered if inner.inside == seg.name and inner.name in masks]
        segment = by_name[seg.name]
        remove_partial_volume_rim(segment.mask_kji, volume.array_kji, rim, keep=keep)
        segment.slice_scores = {k: v for k, v in segment.slice_scores.items() if segment.mask_kji[k].any()}


def segment_volume(
    volume,
    segment_prompts: list[SegmentPrompts],
    predictor: SlicePredictor,
    settings: PipelineSettings | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    containers: dict[str, np.ndarray] | None = None,
) -> SegmentationResult:
    """Run every segment's prompts (and propagation where asked) and return the masks on the CT grid.

    ``containers``: masks [k, j, i] made earlier (e.g. the liver already in the Slicer scene), by name, that a
    segment's ``inside`` may name instead of a segment of this run; they are not part of the result.
    """
    settings = settings or PipelineSettings()
    geometry = volume.geometry
    spacing_kji = (geometry.spacing_mm[2], geometry.spacing_mm[1], geometry.spacing_mm[0])
    result = SegmentationResult(
        geometry=geometry,
        provenance={"software": "LiverSAM", "version": __version__, "model": predictor.model.name},
    )
    if volume.metadata.get("dicom_series_uid"):  # lets a DICOM SEG reference exactly this series
        result.provenance["dicom_series_uid"] = volume.metadata["dicom_series_uid"]
    masks: dict[str, np.ndarray] = {name: np.asarray(m, dtype=bool) for name, m in (containers or {}).items()}
    reports: dict[str, object] = {}
    copied: set[str] = set()  # a caller's containers this run copied before giving a lesion's voxels to them
    ordered = order_by_dependency(segment_prompts)
    for index, seg in enumerate(ordered):
        if cancel is not None and cancel():
            raise Cancelled()
        if progress:
            # segments, not slices: the count goes in the stage's name (a propagated segment's slices follow)
            progress(f"segment '{seg.name}' ({index + 1} of {len(ordered)})", 0, 0)
        container = masks.get(seg.inside) if seg.inside else None
        if seg.propagate:
            outcome = propagate_segment(
                seg, predictor, for_lesions(settings.propagation) if seg.inside else settings.propagation,
                settings.slice_postprocess_for(seg.inside is not None),
                container_kji=container, progress=progress, cancel=cancel, method=settings.propagation_method,
                organ_track=settings.organ_track, lesion_extent=settings.lesion_extent,
                past_container=settings.hyperdense_lesions_past_organ,
                continue_past_container=settings.lesions_continue_past_organ,
                hypodense_past_container=settings.hypodense_lesions_past_organ,
            )
            mask, scores = outcome.mask_kji, outcome.scores
            reports[seg.name] = outcome
            # 3D clean-up only makes sense for a structure segmented through the volume (the naive reference
            # loop keeps its raw masks).
            # In place (memory: no second whole-volume mask); the outcome kept in the provenance for the
            # review then holds the cleaned mask, as nothing reads its raw one.
            if settings.propagation_method != "naive":
                mask = clean_volume(mask, spacing_kji,
                                    settings.postprocess_3d.get(seg.name, settings.default_3d), in_place=True)
                if is_trimmed_organ(seg.name, seg.inside) and _fills_organ_gaps(settings, spacing_kji[0]):
                    own = {k: np.zeros(mask.shape[1:], dtype=bool) for k in seg.slices}  # its prompts rule there
                    mask = fill_between_slices(mask, own, max_gap=1, in_place=True)
        else:
            mask, scores, _ = segment_prompted_slices(seg, predictor, settings)
        if container is not None:
            if seg.propagate and outcome.beyond_container:
                if not any(s.name == seg.inside for s in result.segments) and seg.inside not in copied:
                    container = masks[seg.inside] = container.copy()  # a caller's mask: never written into
                    copied.add(seg.inside)
                _give_back_to_organ(container, mask, outcome.beyond_container)
            mask &= container
        masks[seg.name] = mask
        result.segments.append(Segment(name=seg.name, label=seg.label, mask_kji=mask, color=seg.color,
                                       slice_scores=scores))
    if settings.crf:
        # The review reads the propagation's own masks (its flags describe the tracks; the CRF only smooths).
        # No copies: the CRF pass replaces each mask by a new array and never writes into the old one.
        result.provenance["before_crf"] = {name: mask for name, mask in masks.items() if name in settings.crf}
        _refine_with_crf(volume, ordered, result, masks, settings.crf, spacing_kji, progress, cancel)
    if settings.fill_lesions_between_slices and settings.propagation_method != "naive":
        _fill_lesions_between_slices(ordered, result, masks)
    lesion_rim = _lesion_rim(settings)
    if lesion_rim is not None:
        _add_lesion_rims(volume, ordered, result, masks, lesion_rim)
    band = _outline_band(settings)
    if band is not None:
        _remove_outline_bands(ordered, result, masks, (volume.geometry.spacing_mm[1], volume.geometry.spacing_mm[0]),
                              band)
    rim = _organ_rim(settings)
    if rim is not None:
        _trim_organ_rims(volume, ordered, result, masks, rim)
    # The prompts-file order for output, a segment listed before the one it is inside moved to just after it, then
    # "a later segment wins": a tumour listed before its liver would otherwise be erased by it (its voxels are the
    # liver's too). Segments that do not contain each other keep their order.
    order = {s.name: n for n, s in enumerate(_after_their_containers(segment_prompts))}
    result.segments.sort(key=lambda s: order[s.name])
    if settings.later_segment_wins:
        for n, seg in enumerate(result.segments):
            for later in result.segments[n + 1 :]:
                seg.mask_kji = seg.mask_kji & ~later.mask_kji
    final = {seg.name: seg.mask_kji for seg in result.segments}
    for name, outcome in reports.items():
        # Each outcome holds the final mask, not the one its propagation returned: the CRF, the fill, the rim's
        # trim and "a later segment wins" replace a mask by a new array, and the old one kept alive here would stay
        # in memory until the result is dropped (156 MB per organ on a 595-slice 512 x 512 CT, through the writing
        # of the output).
        outcome.mask_kji = final[name]
    result.provenance["propagation"] = reports
    result.provenance["inside"] = {seg.name: seg.inside for seg in segment_prompts}  # for the review report
    if progress:
        progress("done", len(ordered), len(ordered))
    return result
