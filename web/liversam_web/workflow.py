"""The web app's segmentation workflow: prompts, masks, undo and the calls to the LiverSAM server.

Plain Python + numpy (no MRML, no trame), so it is testable on its own. Blocking: the app runs these
methods in a worker thread. Coordinates are voxel indices: arrays ``[k, j, i]``, boxes ``(i0, j0, i1, j1)``
on slice ``k``, points ``(i, j)`` on slice ``k``.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .server_client import LiverSAMClient, ServerRequestError, box_ijk, segment_spec

SEGMENTS = ("liver", "tumor")  # the segments' names in the exports and on the server (as `liversam segment`)
UNDO_DEPTH = 20
LIVER_CONTAINER = "liver_current"  # the session mask that holds the liver as the user sees it
# "Faster on thin slices": the liver on slices up to this thick is predicted on every other slice (the value
# measured in docs/PERFORMANCE.md: 100-slice liver 36.6 -> 18.8 s, one-box Dice lits117 0.952 -> 0.951).
FAST_THIN_SLICE_MM = 2.0


@dataclass
class SlicePrompts:
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    points: list[tuple[float, float]] = field(default_factory=list)
    negative_points: list[tuple[float, float]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.boxes or self.points or self.negative_points)


@dataclass
class _Snapshot:
    label: str
    prompts: dict[str, dict[int, SlicePrompts]]
    packed: dict[str, bytes]
    propagated: set[str]
    ring: dict[str, bool]
    review: dict[str, Any]
    lesions: list[dict[str, Any]]


def segment_word(segment: str) -> str:
    """A segment as the page's text names it: British spelling, as the README and docs ("tumour"); the segment's
    name in files and on the server stays "tumor"."""
    return {"tumor": "tumour"}.get(segment, segment)


def session_lost(exc: Exception) -> bool:
    """The server answered that it has no such session (evicted as idle or least recently used, closed, or the server
    was restarted): a 404 on a session's path."""
    return (isinstance(exc, ServerRequestError) and exc.status == 404
            and str(getattr(exc, "path", "")).startswith("/sessions/"))


class Workflow:
    """One CT opened on the server (``session_id``) and what the user did on it.

    ``reopen``: opens the same CT on the server again and returns the new session id; called when the server has
    lost the session, so that the user's prompts and masks (kept here) go on working.
    """

    def __init__(self, client: LiverSAMClient, session_id: str, shape_kji: tuple[int, int, int],
                 reopen: Callable[[], str] | None = None) -> None:
        self.client = client
        self.session_id = session_id
        self.reopen = reopen
        self._reopen_lock = threading.Lock()
        self.shape_kji = tuple(int(s) for s in shape_kji)
        self.masks: dict[str, np.ndarray] = {name: np.zeros(self.shape_kji, dtype=bool) for name in SEGMENTS}
        self.prompts: dict[str, dict[int, SlicePrompts]] = {name: {} for name in SEGMENTS}
        self.propagated: set[str] = set()
        # whether each propagated segment's result has the tumour's ring (its fixes keep that outline)
        self.ring: dict[str, bool] = {}
        self._job_ring: dict[str, bool] = {}
        # the liver a tumour job was sent as its container (packed bits), for the last job started
        self._sent_liver: dict[str, bytes] = {}
        self.review: dict[str, Any] = {}
        self.lesions: list[dict[str, Any]] = []
        self._undo: list[_Snapshot] = []
        # voxels of the model's last tumour slice mask left out because they lie outside the liver (predict_slice)
        self.dropped_outside_liver = 0

    # --- the server session ----------------------------------------------------------------------------
    def with_session(self, call: Callable[[], Any]) -> Any:
        """``call()`` (which reads ``self.session_id``); when the server has lost the session, the CT is opened
        again (``reopen``) and ``call`` repeated once on the new session."""
        session = self.session_id
        try:
            return call()
        except ServerRequestError as exc:
            if self.reopen is None or not session_lost(exc):
                raise
        with self._reopen_lock:
            if self.session_id == session:  # not reopened meanwhile by another call
                self.session_id = self.reopen()
        return call()

    # --- undo ------------------------------------------------------------------------------------------
    def push_undo(self, label: str) -> _Snapshot:
        """Remember the state before a change named ``label``; returns that undo step (see :meth:`withdraw`)."""
        packed = {name: np.packbits(mask).tobytes() for name, mask in self.masks.items()}
        snapshot = _Snapshot(label, copy.deepcopy(self.prompts), packed, set(self.propagated), dict(self.ring),
                             copy.deepcopy(self.review), copy.deepcopy(self.lesions))
        self._undo.append(snapshot)
        del self._undo[:-UNDO_DEPTH]
        return snapshot

    def withdraw(self, change: _Snapshot | None, segment: str, k: int, prompt: tuple | None) -> None:
        """Take back one prompt whose slice the server could not segment: undo its step when it is still the last
        one; otherwise (the user went on meanwhile) only remove that prompt, and keep the later changes."""
        if change is not None and self._undo and self._undo[-1] is change:
            self.undo()
            return
        self._undo = [step for step in self._undo if step is not change]
        if prompt is None:
            return
        kind, value = prompt
        prompts = self.prompts[segment].get(int(k))
        if prompts is None:
            return
        values = {"box": prompts.boxes, "point+": prompts.points, "point-": prompts.negative_points}[kind]
        if value in values:
            values.remove(value)
        if prompts.empty():
            self.prompts[segment].pop(int(k), None)

    def change_marker(self) -> object | None:
        """An object that is the same as long as nothing changed (the last undo step; None before the first)."""
        return self._undo[-1] if self._undo else None

    def can_undo(self) -> bool:
        return bool(self._undo)

    def undo_label(self) -> str:
        return self._undo[-1].label if self._undo else ""

    def undo(self) -> str:
        """Restore the state before the last change (prompts, masks, what was propagated, its review and
        lesion table); returns what was undone ("" when nothing)."""
        if not self._undo:
            return ""
        snapshot = self._undo.pop()
        self.prompts = snapshot.prompts
        self.propagated, self.ring = snapshot.propagated, snapshot.ring
        self.review, self.lesions = snapshot.review, snapshot.lesions
        count = int(np.prod(self.shape_kji))
        for name, data in snapshot.packed.items():
            bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count)
            self.masks[name] = bits.astype(bool).reshape(self.shape_kji)
        return snapshot.label

    # --- prompts ---------------------------------------------------------------------------------------
    def slice_prompts(self, segment: str, k: int) -> SlicePrompts:
        return self.prompts[segment].setdefault(int(k), SlicePrompts())

    def add_box(self, segment: str, k: int, box: tuple[float, float, float, float]) -> None:
        """A liver has one box per slice (a new one replaces it); every tumour box is one more lesion."""
        prompts = self.slice_prompts(segment, k)
        if segment == "liver":
            prompts.boxes = [box]
        else:
            prompts.boxes.append(box)

    def add_point(self, segment: str, k: int, point: tuple[float, float], positive: bool) -> None:
        prompts = self.slice_prompts(segment, k)
        (prompts.points if positive else prompts.negative_points).append(point)

    def edit_slice(self, segment: str, k: int, point: tuple[float, float], positive: bool,
                   spacing_ij_mm: tuple[float, float]) -> np.ndarray:
        """A click on a slice whose mask came from a propagation (no prompt of its own): the mask it shows, with the
        point's 3 mm disk joined (+, where the mask misses it) or erased (-, where the mask has it), as a click
        edits a boxed slice (``liversam.point_edits``). The model is not asked: its answer to a point alone replaced
        the whole slice (a liver slice of 2,211 voxels became 31). Returns the slice mask [j, i]."""
        from liversam.point_edits import POINT_RADIUS_MM, honour_points

        k = int(k)
        before = self.masks[segment][k]
        mask = honour_points(before, [point] if positive else [], [] if positive else [point], spacing_ij_mm,
                             POINT_RADIUS_MM)  # fmt: skip
        if segment == "tumor" and self.masks["liver"].any():
            mask &= self.masks["liver"][k]
        self.masks[segment][k] = mask
        return mask

    def clear_slice(self, segment: str, k: int) -> None:
        self.prompts[segment].pop(int(k), None)
        self.masks[segment][int(k)] = False

    # --- one slice (live update) ---------------------------------------------------------------------------
    def predict_slice(self, segment: str, k: int) -> np.ndarray:
        """Segment slice k of ``segment`` from its prompts there, store and return the slice mask [j, i].

        A liver slice is one prediction from its box and points. Each tumour box is predicted on its own
        (with the points inside it) and the lesions are united, then kept inside the liver when there is one
        (``dropped_outside_liver`` counts what that left out).
        """
        prompts = self.prompts[segment].get(int(k), SlicePrompts())
        nj, ni = self.shape_kji[1:]
        mask = np.zeros((nj, ni), dtype=bool)
        if segment == "tumor" and prompts.boxes:
            for box in prompts.boxes:
                inside = [p for p in prompts.points if _in_box(p, box)]
                outside = [p for p in prompts.negative_points if _in_box(p, box)]
                lesion, _ = self.with_session(
                    lambda box=box, inside=inside, outside=outside: self.client.predict_slice(
                        self.session_id, k, [box], inside, outside))
                mask |= lesion
        elif not prompts.empty():
            mask, _ = self.with_session(lambda: self.client.predict_slice(
                self.session_id, k, prompts.boxes, prompts.points, prompts.negative_points
            ))
        self.dropped_outside_liver = 0
        if segment == "tumor" and self.masks["liver"].any():
            inside = mask & self.masks["liver"][int(k)]
            self.dropped_outside_liver = int(mask.sum()) - int(inside.sum())
            mask = inside
        self.masks[segment][int(k)] = mask
        return mask

    # --- propagation jobs --------------------------------------------------------------------------------------
    def segment_spec(self, segment: str) -> dict[str, Any]:
        boxes, points, negatives = [], [], []
        for k, prompts in sorted(self.prompts[segment].items()):
            boxes += [box_ijk(*box, k) for box in prompts.boxes]
            points += [[p[0], p[1], float(k)] for p in prompts.points]
            negatives += [[p[0], p[1], float(k)] for p in prompts.negative_points]
        return segment_spec(segment, label=SEGMENTS.index(segment) + 1, boxes_ijk=boxes, points_ijk=points,
                            negative_points_ijk=negatives)

    def has_prompts(self, segment: str) -> bool:
        return any(not p.empty() for p in self.prompts[segment].values())

    def _container_name(self, segment: str) -> str | None:
        """The session mask a ``segment`` job stays inside: tumours in the liver the user sees (None: nothing)."""
        return LIVER_CONTAINER if segment == "tumor" and self.masks["liver"].any() else None

    def _container(self, segment: str) -> str | None:
        """:meth:`_container_name`, with the liver uploaded to the session under that name."""
        name = self._container_name(segment)
        if name is not None:
            self.client.upload_mask(self.session_id, name, self.masks["liver"])
        return name

    def start_propagation(self, segment: str, faster_thin_slices: bool = False, tumour_ring: bool = True) -> str:
        """Start propagating ``segment`` from all its prompts -> job id.

        ``faster_thin_slices``: the liver on slices at most ``FAST_THIN_SLICE_MM`` thick is predicted on every
        other slice and interpolated between (the server's ``skip_thin_slices_mm``; lesions are never skipped).
        ``tumour_ring`` off: a tumour's outline stays where its threshold puts it, without its partial-volume ring
        (the server's ``lesion_rim``; sent only for a tumour inside the liver, the only segment it changes). Only
        settings that differ from the server's defaults are sent, so an older server takes the job.
        """
        if not self.has_prompts(segment):
            raise ValueError(f"The {segment_word(segment)} has no box or point yet: draw a box on it in the axial view "
                             "first")
        spec = self.segment_spec(segment)
        container = self._container_name(segment)
        if container:
            spec["inside"] = container
        settings = _ring_setting(tumour_ring) if container else {}
        if faster_thin_slices:
            settings["skip_thin_slices_mm"] = FAST_THIN_SLICE_MM

        def start() -> str:
            self._container(segment)  # the liver uploaded (again, to a session opened again)
            if settings:
                return self.client.start_propagation(self.session_id, [spec], settings=settings)
            return self.client.start_propagation(self.session_id, [spec])

        job = self.with_session(start)
        self._job_ring[job] = bool(tumour_ring)
        self._remember_container(job, container)
        return job

    def _remember_container(self, job: str, container: str | None) -> None:
        """Keep the liver a tumour job was sent (what its result may reach past), for the last job only."""
        self._sent_liver = {job: np.packbits(self.masks["liver"]).tobytes()} if container else {}

    def start_repropagation(self, segment: str, k: int) -> str:
        """Re-propagate ``segment`` from the corrected slice k (its mask as it is now goes to the server), with the
        tumour's ring as its propagation had it, so that a fix keeps the outline of the slices around it."""
        if segment not in self.propagated:
            raise ValueError(f"Propagate the {segment_word(segment)} first: re-propagation corrects a propagated "
                             "result")
        if self.prompts[segment].get(int(k), SlicePrompts()).empty():
            raise ValueError(f"Slice {k} has no {segment_word(segment)} prompt: fix it with a box or points first")
        existing = f"{segment}_current"

        def start() -> tuple[str, str | None]:
            self.client.upload_mask(self.session_id, existing, self.masks[segment])
            container = self._container(segment)
            ring = _ring_setting(self.ring.get(segment, True)) if container else {}
            job = self.client.start_repropagation(
                self.session_id, self.segment_spec(segment), [int(k)], existing=existing,
                container=container, **({"settings": ring} if ring else {}),
            )
            return job, container

        job, container = self.with_session(start)
        self._remember_container(job, container)
        return job

    def job_status(self, job: str) -> dict[str, Any]:
        return self.client.job_status(job)

    def cancel(self, job: str) -> dict[str, Any]:
        return self.client.cancel_job(job)

    def apply_result(self, job: str, segment: str) -> dict[str, Any]:
        """Fetch a finished job and take its ``segment`` mask, review and lesion table (undoable)."""
        result = self.client.job_result(job, masks=False)
        mask = self.client.job_mask(job, segment)
        if mask.shape != self.shape_kji:
            raise ValueError(f"the server returned a {mask.shape} mask for a {self.shape_kji} CT")
        self.push_undo(f"propagate {segment_word(segment)}")
        self.masks[segment] = mask
        sent = self._sent_liver.pop(job, None)
        if segment == "tumor" and sent is not None:
            # The server keeps a tumour inside the liver it was sent, except where a lesion the liver's mask left out
            # was allowed past it (its hyper-/hypodense past-organ rules): the liver takes those voxels, as
            # `liversam segment` gives them to its liver. Only voxels outside the liver sent: a liver drawn or
            # cleared while the job ran takes nothing else.
            sent_liver = np.unpackbits(np.frombuffer(sent, dtype=np.uint8), count=mask.size).reshape(mask.shape)
            self.masks["liver"] |= mask & ~sent_liver.astype(bool)
        if segment == "tumor" and self.masks["liver"].any():
            self.masks["tumor"] &= self.masks["liver"]  # inside the liver as it is now
        self.propagated.add(segment)
        if job in self._job_ring:  # a propagation (a fix keeps the ring its propagation had)
            self.ring[segment] = self._job_ring.pop(job)
        for report in result.get("review", {}).get("segments", []):
            self.review[report["name"]] = report
        if segment == "tumor" or result.get("lesions"):
            self.lesions = list(result.get("lesions", []))
        return result

    def labelmap(self) -> np.ndarray:
        """liver = 1, tumour = 2 (a tumour voxel is also liver), as ``uint8`` [k, j, i]."""
        labels = np.zeros(self.shape_kji, dtype=np.uint8)
        labels[self.masks["liver"]] = 1
        labels[self.masks["tumor"]] = 2
        return labels

    def close(self, on_error: Callable[[Exception], None] | None = None) -> None:
        try:
            self.client.close_session(self.session_id)
        except Exception as exc:  # noqa: BLE001 - closing is best effort; the server evicts idle sessions
            if on_error is not None:
                on_error(exc)


def _in_box(point: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _ring_setting(tumour_ring: bool) -> dict[str, Any]:
    """The server's ``lesion_rim`` setting, sent only when off (on is its default)."""
    return {} if tumour_ring else {"lesion_rim": False}
