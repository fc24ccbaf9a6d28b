"""Jobs: a propagation or re-propagation of one session, queued on the inference thread.

Progress (stage, done, total) comes from the core's callbacks; cancel is the core's ``cancel`` callback. A
job that is cancelled (or whose session closes) writes nothing: its masks reach the session only when it
has finished. Prompts are converted exactly as ``liversam segment`` converts a PROMPTS.json
(:func:`liversam.prompts.parse_prompts`), before the job is queued, so a bad prompt is a 422 at once.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..dense_crf import crf_for_segments
from ..errors import Cancelled, LiverSAMError, ModelError, PromptError
from ..geometry import ImageGeometry
from ..lesion_rim import LesionRimSettings, add_lesion_rim
from ..lesions import lesion_table
from ..organ_rim import is_trimmed_organ, trim_partial_volume_rim
from ..pipeline import PipelineSettings, segment_volume
from ..postprocess import Postprocess3DSettings, PostprocessSettings
from ..prompts import SegmentPrompts, SlicePrompts, parse_prompts
from ..propagation import (
    OrganTrackSettings,
    PropagationOutcome,
    PropagationSettings,
    for_lesions,
    repropagate,
)
from ..review import build_review_report
from ..segmentation import Segment, SegmentationResult
from ..terminology import is_tumour_name
from .public import public_text
from .schemas import JobSettings, PredictRequest, SegmentSpec
from .sessions import Session

log = logging.getLogger(__name__)
FINAL = ("done", "failed", "cancelled")


class JobNotFound(LookupError):
    pass


class SessionClosed(LookupError):
    """The session of a job being started was closed meanwhile (answered as an unknown session, 404)."""


# --- prompts, the way `liversam segment` reads them --------------------------------------------------------
def segment_prompts(specs: list[SegmentSpec], system: str, geometry: ImageGeometry,
                    masks: dict[str, np.ndarray], source: str = "request") -> list[SegmentPrompts]:
    """Request segments -> core prompts. ``inside`` may also name a session mask (a container)."""
    names = {spec.name for spec in specs}

    def entry(spec: SegmentSpec) -> dict:
        data = spec.model_dump(exclude={"inside"}, exclude_none=True)
        if spec.inside is not None or "inside" in spec.model_fields_set:
            # the request's own word, so a tumour's default (inside the request's liver) stays off: a segment of the
            # request as it is; a session mask (checked below) or null as null
            data["inside"] = spec.inside if spec.inside in names else None
        return data

    data = {"coordinate_system": system, "segments": [entry(spec) for spec in specs]}
    segments = parse_prompts(data, geometry, source=source)
    for seg, spec in zip(segments, specs, strict=True):
        if spec.inside is None:
            continue
        if spec.inside == seg.name:
            raise PromptError(f"{source}: segment '{seg.name}' cannot be inside itself.")
        if spec.inside not in names and spec.inside not in masks:
            raise PromptError(
                f"{source}: segment '{seg.name}' is to be inside '{spec.inside}', which is neither a segment of "
                f"this request nor a session mask (masks: {', '.join(sorted(masks)) or 'none'}); upload it first."
            )
        seg.inside = spec.inside
    return segments


def slice_prompts(request: PredictRequest, geometry: ImageGeometry) -> SlicePrompts:
    """A predict request (IJK on slice k) -> the core's prompts for that slice."""
    nk = geometry.size_ijk[2]
    if not 0 <= request.k < nk:
        raise PromptError(f"predict: slice k={request.k} is outside the volume (k 0..{nk - 1}).")
    k = float(request.k)
    spec = {"name": f"slice k={request.k}",
            "boxes": [[[b[0], b[1], k], [b[2], b[3], k]] for b in request.boxes],
            "points": [[p[0], p[1], k] for p in request.points],
            "negative_points": [[p[0], p[1], k] for p in request.negative_points]}
    try:
        seg = parse_prompts({"coordinate_system": "IJK", "segments": [spec]}, geometry, source="predict",
                            other_systems=False)[0]  # fmt: skip
    except PromptError as exc:
        raise PromptError(_in_request_terms(str(exc))) from None
    return seg.slices[request.k]


def _in_request_terms(message: str) -> str:
    """A PROMPTS.json message in a predict request's own terms: ``boxes[0]``, not ``segments[0].boxes[0] (segment
    'slice k=1' box 0)``; no advice on coordinate systems (the request is in IJK, always)."""
    message = re.sub(r"segments\[0\]\.(boxes|points|negative_points)\[(\d+)\] \(segment '[^']*' [a-z ]+ \d+\)",
                     r"\1[\2]", message)  # fmt: skip
    message = message.replace("segments[0]: segment 'slice k=", "the prompts of slice k=").replace(
        "' has no box or positive point (nor markups)", " have no box or positive point")
    return message.replace(" Check the coordinate system and the values;", " Check the values;").replace(
        " Check the coordinate system and the values.", " Check the values (i, j: voxel indices on slice k)."
    )


CLEANUP_FIELDS = {"min_island_mm2", "fill_holes", "closing_radius_mm", "min_island_mm3", "keep_largest"}
#: Job settings that are pipeline settings, not propagation rules (``liversam.propagation.PropagationSettings``).
PIPELINE_FIELDS = {"crf", "skip_thin_slices_mm", "lesion_rim"}


def pipeline_settings(settings: JobSettings, segments: Sequence[SegmentPrompts] = ()) -> PipelineSettings:
    """The same settings ``liversam segment`` uses, with the request's options (``crf`` names ``segments``)."""
    keep_largest = PipelineSettings().postprocess_3d.keys() if settings.keep_largest is None else settings.keep_largest
    default_3d = Postprocess3DSettings(fill_holes=settings.fill_holes, min_island_mm3=settings.min_island_mm3)
    return PipelineSettings(
        slice_postprocess=PostprocessSettings(fill_holes=settings.fill_holes, min_island_mm2=settings.min_island_mm2,
                                              closing_radius_mm=settings.closing_radius_mm),
        postprocess_3d={name: replace(default_3d, keep_largest=True) for name in keep_largest},
        default_3d=default_3d,
        propagation=PropagationSettings(**settings.model_dump(exclude=CLEANUP_FIELDS | PIPELINE_FIELDS)),
        organ_track=OrganTrackSettings(skip_max_thickness_mm=settings.skip_thin_slices_mm),
        crf=crf_for_segments("auto" if settings.crf is None else settings.crf, segments, what="settings.crf"),
        lesion_rim=LesionRimSettings() if settings.lesion_rim else None,
    )


# --- jobs ---------------------------------------------------------------------------------------------------
@dataclass
class JobOutput:
    result: SegmentationResult
    review: dict
    lesions: list[dict]
    computed: dict[str, list[int]]


@dataclass
class Job:
    id: str
    session: Session
    owner: str
    kind: str
    state: str = "queued"
    stage: str = "queued"
    done: int = 0
    total: int = 0
    progress_events: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    output: JobOutput | None = None
    released: bool = False  # done, but its result was dropped to bound memory (see JobStore.keep_results)
    warning: str | None = None  # done, but keeping its masks put the sessions over the memory budget (and by how much)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    # called at every cancel check of the core (before each slice's prediction, on the inference thread): lets the
    # other users' waiting clicks run there (InferenceWorker.run_waiting_interactive)
    between_slices: Callable[[], object] | None = None

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stage, self.done, self.total = stage, int(done), int(total)
        self.progress_events += 1

    def cancelled(self) -> bool:
        if self.between_slices is not None and not self.cancel_event.is_set():
            self.between_slices()
        return self.cancel_event.is_set() or self.session.closed

    def status(self) -> dict:
        return {"job_id": self.id, "session_id": self.session.id, "kind": self.kind, "state": self.state,
                "stage": self.stage, "done": self.done, "total": self.total,
                "progress_events": self.progress_events, "error": self.error, "warning": self.warning,
                "created": self.created,
                "started": self.started, "finished": self.finished}


def _output(result: SegmentationResult, computed: dict[str, list[int]], lesion_names: set[str],
            ct_kji: np.ndarray | None = None) -> JobOutput:
    names = tuple(s.name for s in result.segments if s.name in lesion_names or is_tumour_name(s.name))
    lesions = [asdict(lesion) for lesion in lesion_table(result, names)] if names else []
    return JobOutput(result, build_review_report(result, ct_kji=ct_kji, lesions=lesion_names), lesions, computed)


def propagation_work(job: Job, segments: list[SegmentPrompts], settings: PipelineSettings,
                     containers: dict[str, np.ndarray]) -> Callable:
    """``segment_volume`` on the session's CT (what ``liversam segment`` runs)."""
    session = job.session

    def work(model) -> JobOutput:
        result = segment_volume(session.volume, segments, session.predictor(model), settings,
                                progress=job.progress, cancel=job.cancelled, containers=containers)
        outcomes = result.provenance.get("propagation") or {}
        prompted = {s.name: sorted(s.slices) for s in segments}
        computed = {name: sorted(set(outcomes[name].computed_slices)) if name in outcomes else prompted[name]
                    for name in prompted}
        return _output(result, computed, {s.name for s in segments if s.inside}, session.volume.array_kji)

    return work


def repropagation_work(job: Job, seg: SegmentPrompts, fix_slices: list[int], existing: np.ndarray,
                       container: np.ndarray | None, settings: PipelineSettings) -> Callable:
    """``liversam.propagation.repropagate`` for each fixed slice, in order."""
    session = job.session
    propagation = for_lesions(settings.propagation) if container is not None else settings.propagation

    def work(model) -> JobOutput:
        predictor = session.predictor(model)
        mask = existing.copy()
        scores: dict[int, float] = {}
        tracks, computed = [], []
        replaced = None  # the fresh tracks' voxels the fixes wrote (what a lesion's ring grows from)
        for n, k in enumerate(fix_slices):
            job.progress(f"re-propagating '{seg.name}' from slice {k}", n, len(fix_slices))
            outcome = repropagate(mask, seg, k, seg.slices[k], predictor, propagation,
                                  settings.slice_postprocess_for(container is not None), container, job.cancelled,
                                  past_container=settings.hyperdense_lesions_past_organ,
                                  hypodense_past_container=settings.hypodense_lesions_past_organ)
            mask, tracks, computed = outcome.mask_kji, tracks + outcome.tracks, computed + outcome.computed_slices
            if outcome.replaced_kji is not None:
                replaced = outcome.replaced_kji if replaced is None else replaced | outcome.replaced_kji
            scores.update(outcome.scores)
        if (container is None and is_trimmed_organ(seg.name, None) and settings.organ_rim is not None
                and propagation.intensity_refinement):
            # as segment_volume trims an organ's dark rim: here only from the voxels the fixes added
            mask &= trim_partial_volume_rim(mask, session.volume.array_kji, settings.organ_rim) | existing
        if (container is not None and settings.lesion_rim is not None and propagation.intensity_refinement
                and replaced is not None):
            # as segment_volume adds a lesion's ring: here around the fresh tracks the fixes wrote in place of the
            # old lesion (and its ring), so a ring the lesion keeps elsewhere is never ringed again
            replaced &= mask
            geometry = session.volume.geometry
            add_lesion_rim(mask, session.volume.array_kji, container, (geometry.spacing_mm[1], geometry.spacing_mm[0]),
                           settings.lesion_rim, grow_from=replaced)
        job.progress("done", len(fix_slices), len(fix_slices))
        scores = {k: s for k, s in scores.items() if mask[k].any()}
        outcome = PropagationOutcome(mask, scores, tracks, sorted(seg.slices), computed)
        result = SegmentationResult(
            geometry=session.volume.geometry,
            segments=[Segment(seg.name, seg.label, mask, seg.color, slice_scores=scores)],
            provenance={"software": "LiverSAM", "propagation": {seg.name: outcome}, "fixed_slices": fix_slices},
        )
        return _output(result, {seg.name: sorted(set(computed))}, {seg.name} if container is not None else set(),
                       session.volume.array_kji)

    return work


def _store_masks(session: Session, masks: dict[str, np.ndarray], drop_older_results: Callable[[], None]) -> None:
    session.masks.update(masks)


#: Finished jobs of one session whose results (full-volume masks) are kept; an older one's result is dropped.
KEEP_RESULTS_PER_SESSION = 4


class JobStore:
    """Jobs by id; at most ``max_jobs`` finished ones are kept (oldest forgotten first), and the results of at most
    ``keep_results`` finished jobs per session: every result holds a full-volume mask per segment, and a radiologist
    fixing slice after slice runs a re-propagation per fix (each a new full mask), so over a day the results of
    superseded jobs would otherwise hold gigabytes until the session closes. What a job wrote stays in the
    session's masks."""

    def __init__(self, worker, max_jobs: int, keep_results: int = KEEP_RESULTS_PER_SESSION,
                 public: Callable[[str], str] = lambda text: public_text(text) or text) -> None:
        self.worker = worker
        #: what a job's error becomes for the client (the server's paths hidden unless the server may give them:
        #: :func:`liversam.server.app.client_text`)
        self.public = public
        self.max_jobs = max_jobs
        self.keep_results = keep_results
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        #: ``keep_masks(session, masks, drop_older_results)`` stores a finished job's masks in its session, within the
        #: server's memory budget when there is one (:meth:`SessionStore.keep_job_masks`); a message if it went over
        self.keep_masks: Callable[[Session, dict[str, np.ndarray], Callable[[], None]], str | None] = _store_masks

    def start(self, session: Session, owner: str, kind: str, make_work: Callable[[Job], Callable]) -> Job:
        """Queue a job; ``make_work(job)`` gives its ``work(model) -> JobOutput`` (reporting to ``job``)."""
        from .worker import JOB

        job = Job(secrets.token_urlsafe(12), session, owner, kind,
                  between_slices=getattr(self.worker, "run_waiting_interactive", None))
        work = make_work(job)
        with self._lock:
            if session.closed:  # closed by another request since this one found it (forget_session ran already)
                raise SessionClosed(f"session '{session.id}' was closed while this job was being started; open the "
                                    "CT again")
            self._jobs[job.id] = job
            session.active_jobs += 1
            self._forget_old()
        queued = self.worker.submit(lambda model: self._run(job, work, model), JOB)
        queued.add_done_callback(lambda done: self._never_ran(job, done))
        return job

    def _never_ran(self, job: Job, done: Future) -> None:
        """End a job whose work never started: the model could not be loaded (it stayed 'queued' for good, and its
        session, counted busy, was never closed when idle), or the worker stopped."""
        if job.finished is not None:  # it ran (_run ends every job it starts)
            return
        exc = None if done.cancelled() else done.exception()
        if exc is None or job.cancel_event.is_set() or job.session.closed:
            job.state, job.error = "cancelled", "cancelled; nothing was written"
        elif isinstance(exc, ModelError):  # the worker logged its full message
            job.state, job.error = "failed", f"the server's model cannot be used: {self.public(str(exc))}"
        else:
            log.error("job %s did not start: %s", job.id, exc)
            job.state, job.error = "failed", self.public(f"internal error: {type(exc).__name__}: {exc}")
        job.finished = time.time()
        with self._lock:
            job.session.active_jobs -= 1
            job.session.last_used = time.monotonic()

    def _run(self, job: Job, work: Callable, model) -> None:
        try:
            if job.cancelled():
                raise Cancelled()
            job.state, job.started = "running", time.time()
            job.progress("started", 0, 0)
            output = work(model)
            if job.cancelled():  # cancelled after the last check inside the core: still write nothing
                raise Cancelled()
            masks = {seg.name: seg.mask_kji for seg in output.result.segments}
            job.warning = self.keep_masks(job.session, masks, lambda: self._release_superseded_results(job.session, masks))
            if job.warning:
                log.warning("job %s of session %s: %s", job.id, job.session.id, job.warning)
            job.output, job.state = output, "done"
            self._release_old_results(job.session)
        except Cancelled:
            job.state, job.error = "cancelled", "cancelled; nothing was written"
        except LiverSAMError as exc:
            full = str(exc)
            job.state, job.error = "failed", self.public(full)
            if job.error != full:  # the client's is shortened: the full message goes to the log (once: the job ends)
                log.info("job %s of session %s failed: %s", job.id, job.session.id, full)
        except Exception as exc:  # a bug: say so, keep the server alive (the log has the full message)
            log.exception("job %s failed", job.id)
            job.state, job.error = "failed", self.public(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            job.finished = time.time()
            with self._lock:
                job.session.active_jobs -= 1
                job.session.last_used = time.monotonic()  # a job running is use: the idle timeout starts now

    def get(self, job_id: str, owner: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise JobNotFound(f"unknown job '{job_id}': it does not exist, was forgotten (only the last "
                              f"{self.max_jobs} jobs are kept) or its session was closed, or belongs to another token")
        job.session.last_used = time.monotonic()  # polling a job or fetching its result uses its session
        return job

    def _release_old_results(self, session: Session) -> None:
        """Drop the results of the session's finished jobs but the newest ``keep_results``."""
        with self._lock:
            done = [j for j in self._jobs.values() if j.session is session and j.output is not None]
        for job in done[: max(0, len(done) - self.keep_results)]:
            job.output, job.released = None, True

    def _release_superseded_results(self, session: Session, replacing: dict[str, np.ndarray]) -> None:
        """Drop the results of the session's finished jobs that hold a mask the session no longer holds, or is about
        to replace with ``replacing``: only those free memory. A result whose masks are all the session's current ones
        frees nothing (the session holds the same arrays) and stays fetchable (it may not have been fetched yet).
        Under the session store's lock (the session's masks do not change meanwhile)."""
        current = {id(mask) for name, mask in session.masks.items() if name not in replacing}
        with self._lock:
            done = [j for j in self._jobs.values() if j.session is session and j.output is not None]
        for job in done:
            if any(id(seg.mask_kji) not in current for seg in job.output.result.segments):
                job.output, job.released = None, True

    def result_masks(self, session: Session) -> list[np.ndarray]:
        """The full-volume masks of the session's job results the store keeps (counted in the memory budget)."""
        with self._lock:
            outputs = [j.output for j in self._jobs.values() if j.session is session and j.output is not None]
        return [seg.mask_kji for output in outputs for seg in output.result.segments]

    def cancel(self, job: Job) -> None:
        job.cancel_event.set()
        if job.state == "queued":
            job.stage = "cancelling"

    def forget_session(self, session: Session) -> None:
        """Cancel and forget every job of a closed session."""
        with self._lock:
            for job_id in [j.id for j in self._jobs.values() if j.session is session]:
                job = self._jobs.pop(job_id)
                job.cancel_event.set()
                job.output = None

    def counts(self) -> tuple[int, int]:
        with self._lock:
            states = [j.state for j in self._jobs.values()]
        return states.count("queued"), states.count("running")

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in FINAL]
        for job in finished[: max(0, len(finished) - self.max_jobs)]:
            del self._jobs[job.id]
