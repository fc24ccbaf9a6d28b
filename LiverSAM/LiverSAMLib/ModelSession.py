"""The model and its per-slice embedding cache for one CT, owned by the inference worker thread.

No Qt and no MRML: the session receives plain data (a :class:`liversam.volume.CTVolume` copy of the input
volume, :class:`liversam.prompts.SlicePrompts` in voxel indices) and returns core results. All methods are
meant to run on :class:`LiverSAMLib.InferenceWorker.InferenceWorker`'s thread; the main thread writes the
results into the scene.

A prompt change on a slice that was already encoded re-runs only the prompt encoder and mask decoder:
the :class:`liversam.predictor.SlicePredictor` keeps the slice embeddings in an LRU cache bounded in MB.
While the user works on a slice, :class:`liversam.acceleration.BackgroundPrefetcher` encodes its
neighbours in the background (paused while a propagation runs).

The module-level functions glue the Slicer side to the core: parameter-node values -> core settings
(:func:`core_postprocess_settings`, :func:`propagation_settings_from_parameters`,
:func:`review_settings_from_parameters`), propagation (:func:`propagate_segment`), fix-and-re-propagate
(:func:`plan_repropagation`, :func:`repropagate_segment`), the review table (:func:`review_rows`) and the
model list (:func:`model_choices`). The algorithms themselves live in the core only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

# load_model(name_or_path, device) -> LoadedModel; injectable for tests.
ModelLoader = Callable[[str, str], object]
# progress(done, total, message) as InferenceWorker's JobContext.progress takes it.
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SessionSettings:
    """What decides whether the model or the predictor must be rebuilt."""

    model: str = "litemedsam"
    device: str = "auto"
    window_level_hu: float = 40.0
    window_width_hu: float = 400.0
    cache_mb: float = 1024.0


class ModelSession:
    """Keeps one loaded model and one predictor (embedding cache) for the current CT volume."""

    def __init__(self, loader: ModelLoader | None = None) -> None:
        self._loader = loader
        self._model = None
        self._model_key: tuple[str, str] | None = None
        self._predictor = None
        self._predictor_key: tuple | None = None
        self._prefetcher = None
        self._prefetch_lock = threading.Lock()

    # --- model and predictor -------------------------------------------------------------------------
    def model(self, settings: SessionSettings):
        """The loaded model for ``settings.model`` on ``settings.device`` (loaded on first use only)."""
        key = (settings.model, settings.device)
        if self._model is None or self._model_key != key:
            loader = self._loader
            if loader is None:
                from liversam.models import load_model as loader
            logger.info("LiverSAM: loading model %s on %s", settings.model, settings.device)
            self._close_prefetcher()
            self._model = loader(settings.model, settings.device)
            self._model_key = key
            self._predictor = None  # embeddings belong to the previous model
        return self._model

    def predictor(self, volume, volume_key: Hashable, settings: SessionSettings):
        """The :class:`SlicePredictor` for this volume; rebuilt when the volume, model or window changes.

        ``volume_key`` identifies the voxel content (e.g. node ID + image modification time), so a
        re-created :class:`CTVolume` copy of unchanged voxels keeps the cached embeddings.
        """
        from liversam.predictor import SlicePredictor
        from liversam.preprocess import WindowSettings

        model = self.model(settings)
        key = (
            volume_key,
            settings.window_level_hu,
            settings.window_width_hu,
            settings.cache_mb,
            self._model_key,
        )
        if self._predictor is None or self._predictor_key != key:
            self._close_prefetcher()
            window = WindowSettings(level=settings.window_level_hu, width=settings.window_width_hu)
            self._predictor = SlicePredictor(model, volume, window=window, cache_mb=settings.cache_mb)
            self._predictor_key = key
        return self._predictor

    @property
    def current_predictor(self):
        return self._predictor

    def release(self) -> None:
        """Drop the model and the embeddings, stop background encoding (the next call loads again)."""
        self._close_prefetcher()
        self._model = None
        self._model_key = None
        self._predictor = None
        self._predictor_key = None

    # --- background pre-encoding of neighbouring slices --------------------------------------------------
    def prefetch_around(self, k: int, radius: int) -> None:
        """Encode slice ``k``'s neighbours (``radius`` slices each way, nearest first) in the background.

        Uses :class:`liversam.acceleration.BackgroundPrefetcher` on the current predictor: moving to a
        neighbouring slice, or propagating from ``k``, then finds its embedding cached. ``radius`` 0 stops
        it. The prefetcher shares the predictor's cache and encoder lock, so an interactive request waits
        for at most one background encode. Call after :meth:`predictor` (on the worker thread).
        """
        predictor = self._predictor
        if predictor is None or radius <= 0:
            self._close_prefetcher()
            return
        with self._prefetch_lock:
            prefetcher = self._prefetcher
            if prefetcher is None or prefetcher.predictor is not predictor:
                if prefetcher is not None:
                    prefetcher.close(timeout=0)
                from liversam.acceleration import BackgroundPrefetcher

                prefetcher = BackgroundPrefetcher(predictor, radius=int(radius))
                self._prefetcher = prefetcher
            prefetcher.radius = int(radius)
        prefetcher.focus(int(k))

    @property
    def prefetcher(self):
        """The running :class:`BackgroundPrefetcher` (None when background encoding is off)."""
        return self._prefetcher

    @contextlib.contextmanager
    def prefetch_paused(self) -> Iterator[None]:
        """Pause background encoding (a propagation needs the encoder for its own slices)."""
        prefetcher = self._prefetcher
        if prefetcher is not None:
            prefetcher.cancel()
            prefetcher.pause()
        try:
            yield
        finally:
            if prefetcher is not None:
                prefetcher.resume()

    def _close_prefetcher(self) -> None:
        with self._prefetch_lock:
            prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is not None:
            prefetcher.close(timeout=0)  # the encode in progress (if any) finishes on its daemon thread

    # --- work --------------------------------------------------------------------------------------------
    def predict_slice(
        self, volume, volume_key: Hashable, settings: SessionSettings, k: int, slice_prompts, mask_logits=None
    ):
        """One slice's mask (``SlicePrediction``: ``mask_ji`` bool [j, i], ``score``) for the prompts on slice k."""
        predictor = self.predictor(volume, volume_key, settings)
        return predictor.predict(int(k), slice_prompts, mask_logits=mask_logits)

    def segment(
        self,
        volume,
        volume_key: Hashable,
        settings: SessionSettings,
        segment_prompts: Sequence,
        postprocess=None,
        progress: Callable[[str, int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        containers: Mapping | None = None,
    ):
        """Run the core pipeline (per-slice prompts + propagation + post-processing) on the volume.

        ``postprocess`` is a ``liversam.pipeline.PipelineSettings`` (its ``propagation`` field holds the
        stopping rules); ``progress(stage, done, total)``; ``cancel()`` returns True to stop (the pipeline
        then raises ``liversam.errors.Cancelled``). Returns a ``liversam.segmentation.SegmentationResult``
        on the CT grid whose ``provenance["propagation"]`` holds each segment's propagation outcome.
        ``containers``: masks already in the scene (name -> [k, j, i]) that a segment's ``inside`` names.
        """
        from liversam.pipeline import segment_volume

        predictor = self.predictor(volume, volume_key, settings)
        with self.prefetch_paused():
            return segment_volume(
                volume,
                list(segment_prompts),
                predictor,
                settings=postprocess,
                progress=progress,
                cancel=cancel,
                containers=dict(containers) if containers else None,
            )


# --- parameter node -> core settings ---------------------------------------------------------------------------
#: Parameter-node member (``LiverSAMLib.Parameters.PropagationParameters``) -> field of
#: ``liversam.propagation.PropagationSettings``.
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
#: Parameter-node member (``LiverSAMLib.Parameters.ReviewParameters``) -> field of
#: ``liversam.review.ReviewSettings``.
REVIEW_PARAMETERS: dict[str, str] = {"maxAreaRatio": "max_area_ratio", "minScore": "min_score"}


def propagation_settings_from_parameters(pack):
    """The core's ``PropagationSettings`` from the parameter node's ``propagation`` pack.

    ``pack`` is anything with the members of :data:`PROPAGATION_PARAMETERS` (the parameter pack in Slicer).
    ``maxSlices`` 0 means no limit (``max_slices=None``).
    """
    from liversam.propagation import PropagationSettings

    values = {core: getattr(pack, member) for member, core in PROPAGATION_PARAMETERS.items()}
    values["max_slices"] = int(values["max_slices"]) or None
    values["use_mask_prompt"] = bool(values["use_mask_prompt"])
    values["intensity_refinement"] = bool(values["intensity_refinement"])
    for name in ("min_score", "box_margin_mm", "min_area_mm2", "collapse_ratio", "min_overlap",
                 "growth_allowance_mm2"):  # fmt: skip
        values[name] = float(values[name])
    for name in ("max_growth_ratio", "max_mean_hu_shift"):  # 0 = off
        values[name] = float(values[name]) or None
    return PropagationSettings(**values)


def review_settings_from_parameters(pack):
    """The core's ``ReviewSettings`` from the parameter node's ``review`` pack (other fields: core defaults)."""
    from liversam.review import ReviewSettings

    return ReviewSettings(
        **{core: float(getattr(pack, member)) for member, core in REVIEW_PARAMETERS.items()}
    )


def core_postprocess_settings(
    fill_holes: bool = True,
    min_island_mm3: float = 0.0,
    keep_largest: bool = True,
    closing_mm: float = 0.0,
    propagation=None,
):
    """The core's ``PipelineSettings`` from the module's post-processing (and propagation) settings.

    Per slice: fill holes, closing (mm). In 3D after propagation: fill holes, remove islands smaller than
    ``min_island_mm3``; the liver also keeps only its largest component when ``keep_largest``.
    ``propagation`` is a ``liversam.propagation.PropagationSettings`` (core defaults when None).
    """
    from liversam.pipeline import PipelineSettings
    from liversam.postprocess import Postprocess3DSettings, PostprocessSettings
    from liversam.propagation import PropagationSettings

    default_3d = Postprocess3DSettings(
        fill_holes=fill_holes, min_island_mm3=float(min_island_mm3), keep_largest=False
    )
    return PipelineSettings(
        slice_postprocess=PostprocessSettings(fill_holes=fill_holes, closing_radius_mm=float(closing_mm)),
        postprocess_3d={
            "liver": Postprocess3DSettings(
                fill_holes=fill_holes, min_island_mm3=float(min_island_mm3), keep_largest=bool(keep_largest)
            )
        },
        default_3d=default_3d,
        propagation=propagation if propagation is not None else PropagationSettings(),
    )


# --- propagation and fix-and-re-propagate ----------------------------------------------------------------------
@dataclass
class PropagationRecord:
    """What one segment's last propagation (and the fixes after it) was computed from.

    Kept by the module between runs so that a prompt changed on one slice re-propagates only the part it
    affects (:func:`repropagate_segment`) instead of the whole volume.

    ``given`` - the prompts as the user placed them, slice k -> ``SlicePrompts`` (to detect what changed);
    ``segment_prompts`` - the core ``SegmentPrompts`` actually used (a fix slice with negative points only
    gets a box around the existing mask); ``volume_key`` / ``settings`` - the voxels and the
    ``PipelineSettings`` it was computed with (a change of either needs a full propagation);
    ``scores`` / ``tracks`` - per-slice model scores and propagation tracks, for the review report.
    """

    given: dict
    segment_prompts: object
    volume_key: Hashable
    settings: object
    scores: dict[int, float] = field(default_factory=dict)
    tracks: list = field(default_factory=list)


def record_from_result(
    result, segment_prompts, given: Mapping, volume_key: Hashable, settings
) -> PropagationRecord:
    """The record of a full propagation of ``segment_prompts`` whose result is ``result``."""
    segment = result.segment(segment_prompts.name)
    outcome = (result.provenance.get("propagation") or {}).get(segment_prompts.name)
    return PropagationRecord(
        given=copy.deepcopy(dict(given)),
        segment_prompts=copy.deepcopy(segment_prompts),
        volume_key=volume_key,
        settings=settings,
        scores=dict(segment.slice_scores),
        tracks=list(outcome.tracks) if outcome is not None else [],
    )


def propagate_segment(session, settings, volume, volume_key, segment_prompts, postprocess=None, clip_mask_kji=None,
                      progress=None, cancel=None):  # fmt: skip
    """Propagate one segment from its prompted slices; clipped to ``clip_mask_kji`` (the liver) when given.

    The liver already lives in the Slicer segmentation, so instead of asking the pipeline to segment it
    again, the existing liver mask is handed to the pipeline as the segment's container. ``progress(done,
    total, message)``; ``cancel()`` True stops with ``liversam.errors.Cancelled`` (nothing is returned).
    """
    container = "container" if clip_mask_kji is not None else None
    prompts = dataclasses.replace(segment_prompts, inside=container, propagate=True)

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, f"{segment_prompts.name}: {stage} ({done}/{total})")

    # With a container the pipeline treats the segment as a lesion (liversam.propagation.for_lesions,
    # intensity refinement against the liver's parenchyma) and clips it to the container.
    containers = {container: np.asarray(clip_mask_kji, dtype=bool)} if container else None
    return session.segment(
        volume, volume_key, settings, [prompts], postprocess, progress=report, cancel=cancel, containers=containers
    )


def plan_repropagation(
    record: PropagationRecord | None, given: Mapping, volume_key: Hashable, settings
) -> list[int] | None:
    """The slices to fix by local re-propagation, or None when a full propagation is needed.

    ``given`` is the current prompts (slice k -> ``SlicePrompts``). A fix is possible when the segment was
    propagated before from the same voxels with the same settings, and the prompts only gained or changed
    slices (a removed slice changes the seeds: propagate again). Returns the changed slices in order;
    an empty list means nothing changed.
    """
    if record is None or record.volume_key != volume_key or record.settings != settings:
        return None
    if any(k not in given for k in record.given):
        return None
    return sorted(int(k) for k, prompts in given.items() if record.given.get(k) != prompts)


@dataclass
class RepropagationResult:
    """What :func:`repropagate_segment` computed.

    ``result`` - the whole segment (``SegmentationResult`` with one segment, review-ready provenance);
    ``changed_slices`` - slices whose mask differs from the existing one (only these need writing);
    ``computed_slices`` - slices the model predicted; ``record`` - the updated propagation record.
    """

    result: object
    changed_slices: list[int]
    computed_slices: list[int]
    record: PropagationRecord

    @property
    def k_range(self) -> tuple[int, int] | None:
        """(first, last) changed slice, inclusive; None when nothing changed."""
        return (self.changed_slices[0], self.changed_slices[-1]) if self.changed_slices else None


def _fix_prompts(prompts, existing_ji: np.ndarray, margin_px: int = 3):
    """Prompts usable on a fix slice: negative points alone get a box around the existing mask there."""
    from liversam.prompts import SlicePrompts

    if not prompts.is_empty() or not existing_ji.any():
        return prompts
    js, is_ = np.nonzero(existing_ji)
    nj, ni = existing_ji.shape
    box = (
        float(max(is_.min() - margin_px, 0)),
        float(max(js.min() - margin_px, 0)),
        float(min(is_.max() + margin_px, ni - 1)),
        float(min(js.max() + margin_px, nj - 1)),
    )
    return SlicePrompts(boxes_ij=[box], points_pos_ij=[], points_neg_ij=list(prompts.points_neg_ij))


def repropagate_segment(
    session,
    settings: SessionSettings,
    volume,
    volume_key: Hashable,
    record: PropagationRecord,
    given: Mapping,
    fix_slices: Sequence[int],
    existing_kji: np.ndarray,
    segment_name: str,
    label: int = 1,
    color=(0.5, 0.5, 0.5),
    container_kji: np.ndarray | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RepropagationResult:
    """Fix slices ``fix_slices`` with their new prompts and re-propagate only what each fix affects.

    Worker thread, no MRML. For each fixed slice k, ``liversam.propagation.repropagate`` recomputes the
    slices strictly between the nearest other user-prompted slices below and above k, and only the part of
    ``existing_kji`` (the segment as it is now in Slicer, manual edits included) connected to the new
    prompts; every other slice stays exactly as it is. ``record.settings`` (a ``PipelineSettings``) gives the
    propagation rules and the per-slice clean-up; ``container_kji`` (the liver, for a tumour) clips the
    recomputed slices. Cancel raises ``liversam.errors.Cancelled``.
    """
    from liversam.errors import Cancelled
    from liversam.propagation import PropagationOutcome, for_lesions, repropagate
    from liversam.segmentation import Segment, SegmentationResult

    predictor = session.predictor(volume, volume_key, settings)
    pipeline_settings = record.settings
    # A segment with a container is a lesion: the same rules as its first propagation (pipeline.segment_volume).
    propagation = pipeline_settings.propagation
    if container_kji is not None:
        propagation = for_lesions(propagation)
    existing = np.asarray(existing_kji, dtype=bool)
    mask = existing.copy()
    segment_prompts = copy.deepcopy(record.segment_prompts)
    scores = dict(record.scores)
    tracks = list(record.tracks)
    computed: list[int] = []
    with session.prefetch_paused():
        for n, k in enumerate(fix_slices):
            if cancel is not None and cancel():
                raise Cancelled()
            if progress is not None:
                progress(n, len(fix_slices), f"{segment_name}: re-propagating from slice {k}")
            prompts = _fix_prompts(given[k], mask[k])
            if prompts.is_empty():
                continue  # negative points on an empty slice: nothing to fix there
            outcome = repropagate(
                mask, segment_prompts, int(k), prompts, predictor,
                propagation, pipeline_settings.slice_postprocess, container_kji, cancel,
            )  # fmt: skip
            mask = outcome.mask_kji
            computed.extend(outcome.computed_slices)
            scores.update(outcome.scores)
            tracks.extend(outcome.tracks)
    if progress is not None:
        progress(len(fix_slices), len(fix_slices), f"{segment_name}: re-propagation done")
    changed = [int(k) for k in np.flatnonzero((mask != existing).any(axis=(1, 2)))]
    scores = {k: s for k, s in scores.items() if mask[k].any()}
    new_record = PropagationRecord(
        given=copy.deepcopy(dict(given)),
        segment_prompts=segment_prompts,
        volume_key=volume_key,
        settings=pipeline_settings,
        scores=scores,
        tracks=tracks,
    )
    outcome = PropagationOutcome(mask, scores, tracks, sorted(segment_prompts.slices), computed)
    result = SegmentationResult(
        geometry=volume.geometry,
        segments=[Segment(segment_name, int(label), mask, tuple(color), slice_scores=scores)],
        provenance={
            "software": "LiverSAM",
            "propagation": {segment_name: outcome},
            "fixed_slices": list(fix_slices),
        },
    )
    return RepropagationResult(result, changed, computed, new_record)


# --- review table ---------------------------------------------------------------------------------------------------
#: How the review report's flags read in the table.
FLAG_TEXT: dict[str, str] = {
    "area_jump": "sudden area change",
    "low_score": "low model score",
    "touches_box_edge": "mask reaches its box edge",
    "past_end": "may run past the structure's end",
    "gap": "empty slice inside the segment",
}


@dataclass(frozen=True)
class ReviewRow:
    """One flagged slice of the review table (from ``liversam.review.build_review_report``)."""

    k: int
    segment: str
    flags: tuple[str, ...]
    area_mm2: float
    score: float | None
    source: str

    @property
    def reason(self) -> str:
        """The flags in words, e.g. ``"sudden area change, low model score 0.41"``."""
        words = []
        for flag in self.flags:
            text = FLAG_TEXT.get(flag, flag)
            if flag == "low_score" and self.score is not None:
                text += f" {self.score:.2f}"
            words.append(text)
        return ", ".join(words)


def review_rows(result, settings=None) -> list[ReviewRow]:
    """Flagged slices of every segment of ``result``, sorted by slice then segment.

    The flags come from the core's review report (``liversam.review.build_review_report``; ``settings`` a
    ``ReviewSettings``): area jumps, low model score, mask at its box edge, past the structure's end, gaps.
    """
    from liversam.review import build_review_report

    report = build_review_report(result, settings)
    rows = [
        ReviewRow(
            k=int(entry["k"]),
            segment=segment["name"],
            flags=tuple(entry["flags"]),
            area_mm2=float(entry["area_mm2"]),
            score=entry["score"],
            source=entry["source"],
        )
        for segment in report["segments"]
        for entry in segment["slices"]
        if entry["flags"]
    ]
    return sorted(rows, key=lambda row: (row.k, row.segment))


def track_summary(result) -> list[str]:
    """One line per propagation track: the seed slice, the slices it covered and why it stopped each way."""
    from liversam.review import build_review_report

    lines = []
    for segment in build_review_report(result)["segments"]:
        for track in segment["tracks"]:
            stops = "; ".join(f"{direction}: {why}" for direction, why in track["stopped"].items())
            lines.append(
                f"{segment['name']}: from slice {track['seed_slice']}, slices {track['first_slice']}-"
                f"{track['last_slice']} ({stops})"
            )
    return lines


# --- model list -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model selector: ``name`` is what ``load_model`` takes."""

    name: str
    label: str
    tooltip: str
    available: bool


def model_choices(extra: Sequence[str] = ()) -> list[ModelChoice]:
    """Models to offer: ``liversam.models.available_models()`` (built-in and LiverSAMTrain-registered).

    Models whose weights are missing are listed with "(checkpoint needed)". ``extra`` names or checkpoint
    paths (e.g. the parameter node's current model) are appended when not already listed. Before the
    dependencies are installed (no torch yet), or when the user's registry is unreadable, the bundled
    default is offered so the module still opens.
    """
    from pathlib import Path

    choices: list[ModelChoice] = []
    try:
        from liversam.models import available_models

        for info in available_models():
            label = info.name if info.available else f"{info.name} (checkpoint needed)"
            choices.append(ModelChoice(info.name, label, info.description, bool(info.available)))
    except ImportError as error:
        logger.info("LiverSAM: model list not available yet (%s); offering the default model.", error)
    except Exception as error:  # an unreadable registry must not stop the module from opening
        from liversam.errors import LiverSAMError

        if not isinstance(error, LiverSAMError):
            raise
        logger.warning("LiverSAM: %s", error)
    if not choices:
        choices.append(ModelChoice("litemedsam", "litemedsam", "LiteMedSAM (bundled)", True))
    names = {choice.name for choice in choices}
    for name in extra:
        if name and name not in names:
            choices.append(ModelChoice(name, Path(name).name, f"checkpoint {name}", Path(name).is_file()))
            names.add(name)
    return choices
