"""Segmenting through the LiverSAM server: sessions per CT, slice requests, propagation and fix jobs, and
writing their answers into segments (MRML + the stdlib/numpy client; no Qt).

Every method that talks to the server is split in two: a part that reads MRML on the main thread (CT copy,
prompts, the liver mask a tumour is clipped to, the segment a fix starts from) and returns a function
``work(client)`` that only does HTTP, for the I/O thread (:mod:`LiverSAMLib.BackgroundCalls`). Answers are
written back on the main thread by :meth:`ServerSegmentation.apply_propagation` /
``SegmentationLogic.apply_slice_masks``.

A server may lose a CT's session (it evicts the least recently used idle one at ``--max-sessions``, closes those idle
past ``--idle-timeout``, and loses all when it restarts): a request that it answers so is repeated once on a session
opened again with the same CT (:class:`CTSession`), on the I/O thread, and a propagation job the server lost is
started again once (:meth:`PropagationPlan.poll`).

A session the I/O thread opens for a table cleared meanwhile (scene closed, another server, module cleaned up) or for a
CT whose copy was dropped meanwhile (volume removed, voxels edited) is not kept, and it is closed on the server as soon
as the request that opened it is done with it (:meth:`CTSession.close_unkept`): a propagation job's, once the job has
ended or is cancelled. :meth:`ServerSegmentation.release` is the module's cleanup (reload, exit): the running job
cancelled and every session closed, within a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np

from liversam.volume import CTVolume

from . import MRMLBridge, ServerRequests
from .SegmentationLogic import LIVER, SegmentationLogic
from .ServerClient import (
    JobLost,
    LiverSAMClient,
    LiverSAMClientError,
    ServerRequestError,
    job_lost,
    session_lost,
)

CONTAINER_MASK = "container"
JOB_LOST_AGAIN = (
    "The LiverSAM server lost this propagation twice (it was restarted, or it closed the CT: see liversam serve "
    "--idle-timeout and --max-sessions). The segmentation was not changed: press Propagate to run it again."
)
T = TypeVar("T")
logger = logging.getLogger(__name__)


def volume_key(volume_node) -> tuple:
    """The voxels' identity: node ID and image modification time (an edited CT is sent again)."""
    image = volume_node.GetImageData()
    return (volume_node.GetID(), image.GetMTime() if image is not None else 0)


class ServerSessions:
    """The server session of each CT in each window, and the copy of each CT sent, shared by Slicer's main thread and
    the I/O thread under one lock.

    The main thread copies a CT (MRML is read there only) the first time a request needs it and keeps the copy here,
    so that the I/O thread can send it again when the server has lost its session, without touching MRML; a newer
    copy of the same volume node (its voxels were changed) replaces the older one. :meth:`drop_volumes` forgets the
    copies and sessions of volume nodes removed from the scene; :meth:`clear` (scene closed, another server) forgets
    everything. A session the I/O thread opens meanwhile for a CT whose copy is no longer held, or for a table cleared
    meanwhile, is not kept. Session keys are ``(volume key, window)`` (:func:`volume_key`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[Hashable, str] = {}
        self._cts: dict[tuple, CTVolume] = {}
        self._generation = 0

    @property
    def generation(self) -> int:
        """Counts :meth:`clear` calls: a session opened for an older generation is not kept."""
        with self._lock:
            return self._generation

    def ct_of(self, volume_node) -> CTVolume:
        """The copy of the volume's voxels sent to the server (main thread): made now when there is none yet. The copies
        of volume nodes no longer in the node's scene are dropped first."""
        key = volume_key(volume_node)
        scene = volume_node.GetScene()
        if scene is not None:
            self.drop_volumes(lambda node_id: scene.GetNodeByID(node_id) is None)
        with self._lock:
            ct = self._cts.get(key)
        if ct is not None:
            return ct
        ct = MRMLBridge.ct_volume_from_node(volume_node)
        with self._lock:
            for older in [k for k in self._cts if k[0] == key[0]]:
                del self._cts[older]  # the node's earlier voxels: no request is planned with them any more
            self._cts[key] = ct
        return ct

    def get(self, key: Hashable) -> str | None:
        with self._lock:
            return self._ids.get(key)

    def keep(self, key: tuple, session: str, generation: int) -> bool:
        """Remember ``session`` for ``key`` unless the table was cleared since ``generation`` or the CT's copy was
        dropped meanwhile (its node removed, its voxels changed); True when kept."""
        with self._lock:
            if generation != self._generation or key[0] not in self._cts:
                return False
            self._ids[key] = session
            return True

    def discard(self, key: Hashable, session: str) -> None:
        """Forget ``key``'s session if it is still ``session`` (the server lost it; another call may have opened a
        new one already)."""
        with self._lock:
            if self._ids.get(key) == session:
                del self._ids[key]

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids.values())

    def drop_volumes(self, dropped: Callable[[str], bool]) -> list[str]:
        """Forget the CT copies and sessions of the volume node IDs for which ``dropped(node_id)`` is true (main
        thread: nodes removed from the scene); returns the session ids forgotten."""
        with self._lock:
            node_ids = {key[0] for key in self._cts} | {key[0][0] for key in self._ids}
            gone = {node_id for node_id in node_ids if dropped(node_id)}
            for key in [k for k in self._cts if k[0] in gone]:
                del self._cts[key]
            keys = [k for k in self._ids if k[0][0] in gone]
            return [self._ids.pop(k) for k in keys]

    def clear(self) -> list[str]:
        """Forget every session and CT copy; returns the session ids forgotten."""
        with self._lock:
            ids = list(self._ids.values())
            self._ids.clear()
            self._cts.clear()
            self._generation += 1
            return ids


class CTSession:
    """``client -> session id`` of one CT in one window, for the I/O thread (made on the main thread).

    The CT is sent when the server has no session for it yet; :meth:`call` runs a request on the session and, when
    the server answers that it lost the session, sends the CT again and repeats the request once.

    A session it opens that the table does not keep (:meth:`ServerSessions.keep`) is listed in ``unkept`` and closed
    on the server by :meth:`close_unkept`: by :meth:`call` once its request is done, by a propagation plan once its
    job has ended.
    """

    def __init__(self, sessions: ServerSessions, key: Hashable, ct: CTVolume, window: tuple[float, float]):
        self.sessions, self.key, self.ct, self.window = sessions, key, ct, window
        self.generation = sessions.generation
        self.unkept: list[str] = []

    def __call__(self, client: LiverSAMClient) -> str:
        session = self.sessions.get(self.key)
        return session if session is not None else self._open(client)

    def _open(self, client: LiverSAMClient) -> str:
        g = self.ct.geometry
        info = client.open_volume(self.ct.array_kji, g.spacing_mm, g.origin_lps, np.asarray(g.direction_lps).ravel(),
                                  window_level=self.window[0], window_width=self.window[1])  # fmt: skip
        session = str(info["session_id"])
        if not self.sessions.keep(self.key, session, self.generation):
            self.unkept.append(session)
            logger.info("LiverSAM: session %s was opened for a CT no longer in use (scene closed, volume removed or "
                        "edited): it is closed once its request is done", session)  # fmt: skip
        return session

    def close_unkept(self, client: LiverSAMClient) -> None:
        """Close the sessions this object opened that the table did not keep (I/O thread); best effort: a session the
        server has lost already, or a server that does not answer, is only logged."""
        while True:
            try:  # the I/O thread (a job's end) and the cleanup thread (cancel) may both get here: pop, not check
                session = self.unkept.pop()
            except IndexError:
                return
            try:
                client.close_session(session)
            except ServerRequestError as error:
                if not session_lost(error):
                    logger.warning("LiverSAM: could not close session %s: %s", session, error)
            except LiverSAMClientError as error:
                logger.warning("LiverSAM: could not close session %s: %s", session, error)

    def cleared(self) -> bool:
        """True when the table was cleared since this request was planned (scene closed, another server, module cleaned
        up): its answer will be dropped, so a session lost meanwhile is not worth sending the CT again."""
        return self.generation != self.sessions.generation

    def reopen(self, client: LiverSAMClient, lost: str) -> str:
        """A session for the CT after the server lost ``lost``: the one another request opened meanwhile, or a new one."""
        self.sessions.discard(self.key, lost)
        logger.info("LiverSAM: the server lost session %s (evicted, closed, or the server restarted): the CT is "
                    "sent again", lost)  # fmt: skip
        return self(client)

    def call(self, client: LiverSAMClient, request: Callable[[str], T], close_unkept: bool = True) -> T:
        """``request(session)``; repeated once on a session opened again when the server has lost the first (unless the
        table was cleared meanwhile). A session lost again is forgotten too (the next request opens the CT again); other
        CTs' sessions stay. ``close_unkept``: close a session opened here that the table did not keep once the request
        is done (False: the caller does, e.g. after the job started on it has ended)."""
        try:
            session = self(client)
            try:
                return request(session)
            except ServerRequestError as error:
                if not session_lost(error) or self.cleared():
                    raise
            session = self.reopen(client, session)
            try:
                return request(session)
            except ServerRequestError as error:
                if session_lost(error):
                    self.sessions.discard(self.key, session)
                raise
        finally:
            if close_unkept:
                self.close_unkept(client)


def call_in_session(client: LiverSAMClient, session_of: Callable[[LiverSAMClient], str],
                    request: Callable[[str], T], close_unkept: bool = True) -> T:  # fmt: skip
    """``request(session)`` on ``session_of``'s session; a :class:`CTSession` repeats it once on a session opened
    again when the server has lost the first (``close_unkept``: see :meth:`CTSession.call`)."""
    if isinstance(session_of, CTSession):
        return session_of.call(client, request, close_unkept=close_unkept)
    return request(session_of(client))


class PropagationPlan:
    """One propagation (or fix of a few slices) to run on the server, read from MRML on the main thread.

    :meth:`start` (I/O thread) opens the CT's session if needed, uploads the masks and starts the job; :meth:`poll`
    (I/O thread) follows it. ``job_id``, ``session`` and ``restarted`` are written on the I/O thread only and read on
    the main thread after a call's outcome is delivered; ``cancelled`` is set on the main thread (before the I/O
    thread runs :meth:`cancel`, which sets it too for a script that calls it directly).
    """

    def __init__(self, owner: ServerSegmentation, segmentation_node, volume_node, segment_id: str, name: str,
                 label: int, color: Sequence[float], given: dict, key: Hashable, settings: dict,
                 fix_slices: list[int] | None, existing: np.ndarray | None, container: np.ndarray | None,
                 session_of: Callable[[LiverSAMClient], str], container_id: str | None = None) -> None:  # fmt: skip
        self.owner, self.segmentation_node, self.volume_node = owner, segmentation_node, volume_node
        self.segment_id, self.name, self.label, self.color = segment_id, name, label, tuple(color)
        self.given, self.volume_key, self.settings = given, key, settings
        self.fix_slices, self.existing, self.container = fix_slices, existing, container
        self.container_id = container_id  # the segment ``container`` was read from (a tumour's liver)
        self.session_of = session_of
        self.session = ""
        self.job_id = ""
        self.restarted = False
        self.cancelled = False
        self._cancel_sent = ""  # the job id a cancel was sent for

    @property
    def existing_name(self) -> str:
        return f"existing-{self.name}"

    def start(self, client: LiverSAMClient) -> str:
        """Start the job (I/O thread); returns its id ("" when it was cancelled before it started). A session the
        server lost is opened again, once. A job cancelled while it was being started (Cancel, scene closed, module
        cleaned up: the CT was on its way) is cancelled on the server at once, and the session opened for it closed
        when the module did not keep it."""
        if self.cancelled:
            return self.job_id
        try:
            self.job_id = call_in_session(client, self.session_of, lambda session: self._start_on(client, session),
                                          close_unkept=False)  # fmt: skip
        except BaseException:
            self.release(client)
            raise
        if self.cancelled:
            self.cancel(client)
        return self.job_id

    def _start_on(self, client: LiverSAMClient, session: str) -> str:
        self.session = session
        inside = CONTAINER_MASK if self.container is not None else None
        if self.container is not None:
            client.upload_mask(session, CONTAINER_MASK, self.container)
        spec = ServerRequests.segment_spec_from_prompts(self.name, self.label, self.given, inside, self.color)
        settings = self.request_settings()
        if self.fix_slices:
            client.upload_mask(session, self.existing_name, self.existing)
            return ServerRequests.call_with_settings(
                client.start_repropagation, session, spec, self.fix_slices, self.existing_name, inside,
                settings=settings,
            )  # fmt: skip
        return ServerRequests.call_with_settings(client.start_propagation, session, [spec], settings=settings)

    def poll(self, client: LiverSAMClient) -> dict:
        """The job's status (I/O thread), with its result under ``"result"`` once it is done (unless cancelled).

        A server that lost the job (it restarted, or closed the job's CT) has nothing of it: the job is started again
        from this plan, once -- the same prompts, masks and settings, so the same result the lost job would have
        given -- and its first status comes back with ``"restarted": True``. Losing it again raises
        :class:`JobLost`, which says to press Propagate.
        """
        try:
            return self._status(client)
        except ServerRequestError as error:
            if not job_lost(error) or self.cancelled:
                raise
            if self.restarted:
                raise JobLost(JOB_LOST_AGAIN) from None
        logger.info("LiverSAM: the server lost propagation job %s: it is started again", self.job_id)
        self.restarted = True
        self.start(client)
        return {**self._status(client), "restarted": True}

    def _status(self, client: LiverSAMClient) -> dict:
        status = client.job_status(self.job_id)
        if status.get("state") == "done" and not self.cancelled:
            status["result"] = client.job_result(self.job_id)
        if status.get("state") in ("done", "failed", "cancelled"):
            self.release(client)
        return status

    def cancel(self, client: LiverSAMClient) -> None:
        """Ask the server to stop the job (I/O thread, or the module's cleanup); a job it no longer knows has stopped
        already. A session opened for the job that the module did not keep is closed."""
        self.cancelled = True
        job = self.job_id
        with contextlib.suppress(ServerRequestError):
            if job and job != self._cancel_sent:
                self._cancel_sent = job
                client.cancel_job(job)
        self.release(client)

    def release(self, client: LiverSAMClient) -> None:
        """Close the sessions opened for this job that the module did not keep (the job has ended or is cancelled)."""
        if isinstance(self.session_of, CTSession):
            self.session_of.close_unkept(client)

    def request_settings(self) -> dict:
        """The job settings as sent: "keep the liver's largest component" names this segment when it is the
        liver (the module's liver is the segment named "liver", in any case: ``SegmentationLogic.LIVER``); the
        tumour's ring (``lesion_rim``) only for a segment propagated inside a container."""
        settings = dict(self.settings)
        if self.container is None:
            # only a segment inside another takes a ring: an older server takes the job
            settings.pop("lesion_rim", None)
        if "keep_largest" in settings:
            is_liver = self.name.lower() == LIVER
            settings["keep_largest"] = [self.name] if settings["keep_largest"] and is_liver else []
        return settings


class ServerSegmentation:
    """The server sessions of the scene's CTs and the propagation records of its segments."""

    def __init__(self, segmentation: SegmentationLogic) -> None:
        self.segmentation = segmentation
        self.sessions = ServerSessions()  # (volume key, window) -> session id, and the CT copies sent
        self.records: dict = {}  # (segmentation node ID, segment ID) -> ServerRequests.PropagationRecord

    def forget(self) -> list[str]:
        """Scene closed or another server: sessions and records no longer apply. Returns the sessions forgotten."""
        self.records.clear()
        return self.sessions.clear()

    # --- sessions -------------------------------------------------------------------------------------
    def volume_removed(self, node_id: str) -> list[str]:
        """The volume node ``node_id`` was removed from the scene (main thread): its CT copies and sessions are
        forgotten; returns the sessions to close on the server."""
        return self.sessions.drop_volumes(lambda other: other == node_id)

    def session_work(self, volume_node, window: tuple[float, float]) -> CTSession:
        """``client -> session id`` for the I/O thread (see :class:`CTSession`); copies the CT now (main thread) the
        first time it is needed."""
        window = (float(window[0]), float(window[1]))
        key = (volume_key(volume_node), window)
        return CTSession(self.sessions, key, self.sessions.ct_of(volume_node), window)

    @staticmethod
    def close_sessions(client: LiverSAMClient, sessions: Sequence[str]) -> None:
        """Close the sessions (I/O thread); one the server has lost already is skipped."""
        for session in sessions:
            try:
                client.close_session(session)
            except ServerRequestError as error:
                if not session_lost(error):
                    raise

    @staticmethod
    def release(
        client: LiverSAMClient, plan: PropagationPlan | None, sessions: Sequence[str], timeout_s: float
    ) -> int:
        """The module's cleanup (reload, exit; on a thread of its own): cancel ``plan``'s job, then close ``sessions``,
        every request bounded by what is left of ``timeout_s`` (a server that does not answer must not hold Slicer's
        exit up). Best effort: a failure is logged and the next request is tried. Returns how many requests failed."""
        deadline = time.monotonic() + float(timeout_s)

        def bounded() -> LiverSAMClient:
            left = deadline - time.monotonic()
            if left <= 0.05:
                raise TimeoutError(
                    f"no answer from the LiverSAM server at {client.base_url} within {timeout_s:.1f} s"
                )
            return client.bounded(left)

        steps: list[tuple[str, Callable[[LiverSAMClient], Any]]] = []
        if plan is not None:
            plan.cancelled = True
            steps.append((f"cancel job {plan.job_id or '(not started yet)'}", plan.cancel))
        for session in sessions:
            steps.append((f"close session {session}", lambda c, session=session: c.close_session(session)))
        failed = 0
        for what, step in steps:
            try:
                step(bounded())
            except ServerRequestError as error:
                if not (session_lost(error) or job_lost(error)):
                    failed += 1
                    logger.warning("LiverSAM: %s: %s", what, error)
            except (LiverSAMClientError, OSError) as error:  # TimeoutError is an OSError
                failed += 1
                logger.warning("LiverSAM: %s: %s", what, error)
        return failed

    # --- the prompted slices ------------------------------------------------------------------------------
    def predict_slices_work(self, volume_node, requests: Sequence[ServerRequests.SliceRequest],
                            window: tuple[float, float], focus_k: int | None = None,
                            prefetch_radius: int = 0):  # fmt: skip
        """``client -> ({k: mask [j, i]}, {k: model score})`` for the I/O thread; then pre-encodes the
        slices around ``focus_k`` on the server."""
        session_of = self.session_work(volume_node, window)
        requests = list(requests)

        def predict(client: LiverSAMClient, session: str):
            masks, scores = {}, {}
            for request in requests:
                masks[request.k], scores[request.k] = client.predict_slice(
                    session, request.k, request.boxes_ij, request.points_ij, request.negative_points_ij
                )
            if prefetch_radius > 0 and requests:
                client.prefetch(
                    session, focus_k if focus_k is not None else requests[-1].k, int(prefetch_radius)
                )
            return masks, scores

        def work(client: LiverSAMClient):
            return session_of.call(client, lambda session: predict(client, session))

        return work

    # --- propagation and fixes ----------------------------------------------------------------------------------
    def plan_propagation(self, segmentation_node, volume_node, segment_id: str, clip_id: str | None, prompts,
                         settings: dict[str, Any], window: tuple[float, float]) -> PropagationPlan:  # fmt: skip
        """A full propagation of the segment, or -- when it was propagated before from the same voxels and
        settings, the prompts only gained or changed slices and the segment still holds that propagation (not undone:
        :func:`ServerRequests.propagation_still_there`) -- a fix of those slices (main thread).

        ``clip_id``: the segment (the liver) a tumour is clipped to; its mask is read from the segmentation
        node now and sent as the job's container.
        """
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        given = prompts.to_slice_prompts()
        key = volume_key(volume_node)
        record = self.records.get((segmentation_node.GetID(), segment_id))
        fix_slices = ServerRequests.plan_repropagation(record, given, key, settings)
        existing = MRMLBridge.segment_mask(segmentation_node, segment_id, volume_node) if fix_slices else None
        if existing is not None and not ServerRequests.propagation_still_there(record, existing, given):
            # undone (Undo) or erased since: a fix would recompute a few slices of an otherwise empty structure
            logger.info("LiverSAM: segment %s no longer holds its last propagation: propagated again", segment_id)
            fix_slices, existing = None, None
        container = MRMLBridge.segment_mask(segmentation_node, clip_id, volume_node) if clip_id else None
        return PropagationPlan(self, segmentation_node, volume_node, segment_id, segment.GetName(), 2 if clip_id else 1,
                               segment.GetColor(), given, key, dict(settings), fix_slices or None, existing, container,
                               self.session_work(volume_node, window), clip_id if container is not None else None)  # fmt: skip

    def apply_propagation(self, plan: PropagationPlan, answer: dict) -> list[int]:
        """Write a finished job's segment (one undo step) and remember it for fixes (main thread).

        A full propagation replaces the segment; a fix writes only the slices whose mask changed, so every
        other slice -- manual edits included -- stays exactly as it is. Returns the slices written.

        A tumour clipped to the liver comes back inside the liver mask it was sent, except where a lesion the liver
        segment left out was allowed past it (the server's ``hyperdense_lesions_past_organ`` /
        ``hypodense_lesions_past_organ``): the liver segment takes those voxels, in the same undo step, as
        ``liversam segment`` gives them to its liver.
        """
        geometry = MRMLBridge.geometry_from_volume_node(plan.volume_node)
        mask = ServerRequests.result_from_job(answer, geometry).segment(plan.name).mask_kji
        protect = [] if plan.container is None else [plan.container_id or self._liver_id(plan)]
        current = MRMLBridge.segment_mask(plan.segmentation_node, plan.segment_id, plan.volume_node)
        changed = [int(k) for k in np.flatnonzero((mask != current).any(axis=(1, 2)))]
        if plan.fix_slices:
            if changed:
                self.segmentation.write_mask(plan.segmentation_node, plan.segment_id, plan.volume_node, mask,
                                             k_range=(changed[0], changed[-1]), protect_segment_ids=protect)  # fmt: skip
                self._give_to_container(plan, mask, (changed[0], changed[-1]), changed)
        else:
            self.segmentation.write_mask(plan.segmentation_node, plan.segment_id, plan.volume_node, mask,
                                         protect_segment_ids=protect)  # fmt: skip
            self._give_to_container(plan, mask, (0, mask.shape[0] - 1))
        self.records[(plan.segmentation_node.GetID(), plan.segment_id)] = ServerRequests.record_of(
            plan.given, plan.volume_key, plan.settings, plan.session, plan.name,
            filled=np.flatnonzero(mask.any(axis=(1, 2))),
        )  # fmt: skip
        return changed

    def _give_to_container(
        self, plan: PropagationPlan, mask: np.ndarray, k_range: tuple[int, int], only: list[int] | None = None
    ) -> None:
        """Add the voxels of the job's mask outside the container it was sent (slices ``k_range``; of those, the slices
        ``only`` when given) that the segment now holds (a write keeps to the Segment Editor's editable area) to the
        container's segment, without a new undo state (the segment's write saved it). The segment keeps them whatever
        the overwrite mode, also when the container is not named liver (renamed while the job ran)."""
        node, volume = plan.segmentation_node, plan.volume_node
        if plan.container is None or not plan.container_id:
            return
        if node.GetSegmentation().GetSegment(plan.container_id) is None:
            return  # the liver was deleted while the job ran: nothing to give the voxels to
        k0, k1 = k_range
        beyond = mask[k0 : k1 + 1] & ~plan.container[k0 : k1 + 1]
        if only is not None:
            kept = set(only)
            beyond[[n for n in range(k1 - k0 + 1) if k0 + n not in kept]] = False
        if not beyond.any():
            return
        beyond &= MRMLBridge.segment_mask(node, plan.segment_id, volume)[k0 : k1 + 1]
        if not beyond.any():
            return
        ks = np.flatnonzero(beyond.any(axis=(1, 2)))
        lo, hi = k0 + int(ks[0]), k0 + int(ks[-1])
        container = MRMLBridge.segment_mask(node, plan.container_id, volume)
        container[lo : hi + 1] |= beyond[ks[0] : ks[-1] + 1]
        self.segmentation.write_mask(node, plan.container_id, volume, container, k_range=(lo, hi),
                                     protect_segment_ids=[plan.segment_id], save_undo=False)  # fmt: skip

    def forget_propagation(self, segmentation_node, segment_id: str) -> None:
        self.records.pop((segmentation_node.GetID(), segment_id), None)

    @staticmethod
    def _liver_id(plan: PropagationPlan) -> str:
        return plan.segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(LIVER)
