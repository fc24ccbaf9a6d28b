"""Segmenting through the LiverSAM server: sessions per CT, slice requests, propagation and fix jobs, and
writing their answers into segments (MRML + the stdlib/numpy client; no Qt).

Every method that talks to the server is split in two: a part that reads MRML on the main thread (CT copy,
prompts, the liver mask a tumour is clipped to, the segment a fix starts from) and returns a function
``work(client)`` that only does HTTP, for the I/O thread (:mod:`LiverSAMLib.BackgroundCalls`). Answers are
written back on the main thread by :meth:`ServerSegmentation.apply_propagation` /
``SegmentationLogic.apply_slice_masks``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from . import MRMLBridge, ServerRequests
from .SegmentationLogic import LIVER, SegmentationLogic
from .ServerClient import LiverSAMClient

CONTAINER_MASK = "container"


def volume_key(volume_node) -> tuple:
    """The voxels' identity: node ID and image modification time (an edited CT is sent again)."""
    image = volume_node.GetImageData()
    return (volume_node.GetID(), image.GetMTime() if image is not None else 0)


class PropagationPlan:
    """One propagation (or fix of a few slices) to run on the server, read from MRML on the main thread.

    :meth:`start` (I/O thread) opens the CT's session if needed, uploads the masks and starts the job.
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

    @property
    def existing_name(self) -> str:
        return f"existing-{self.name}"

    def start(self, client: LiverSAMClient) -> str:
        """Start the job (I/O thread); returns its id."""
        self.session = self.session_of(client)
        inside = CONTAINER_MASK if self.container is not None else None
        if self.container is not None:
            client.upload_mask(self.session, CONTAINER_MASK, self.container)
        spec = ServerRequests.segment_spec_from_prompts(self.name, self.label, self.given, inside, self.color)
        settings = self.request_settings()
        if self.fix_slices:
            client.upload_mask(self.session, self.existing_name, self.existing)
            return ServerRequests.call_with_settings(
                client.start_repropagation, self.session, spec, self.fix_slices, self.existing_name, inside,
                settings=settings,
            )  # fmt: skip
        return ServerRequests.call_with_settings(client.start_propagation, self.session, [spec], settings=settings)

    def request_settings(self) -> dict:
        """The job settings as sent: "keep the liver's largest component" names this segment when it is the
        liver (the module's liver is the segment named "liver", in any case: ``SegmentationLogic.LIVER``); the
        tumour's ring (``lesion_rim``) only for a segment propagated inside a container."""
        settings = dict(self.settings)
        if self.container is None:
            settings.pop("lesion_rim", None)  # only a segment inside another takes a ring: an older server takes the job
        if "keep_largest" in settings:
            is_liver = self.name.lower() == LIVER
            settings["keep_largest"] = [self.name] if settings["keep_largest"] and is_liver else []
        return settings


class ServerSegmentation:
    """The server sessions of the scene's CTs and the propagation records of its segments."""

    def __init__(self, segmentation: SegmentationLogic) -> None:
        self.segmentation = segmentation
        self.sessions: dict = {}  # (volume key, window) -> session id
        self.records: dict = {}  # (segmentation node ID, segment ID) -> ServerRequests.PropagationRecord

    def forget(self) -> None:
        """Scene closed or another server: sessions and records no longer apply."""
        self.sessions.clear()
        self.records.clear()

    # --- sessions -------------------------------------------------------------------------------------
    def session_work(self, volume_node, window: tuple[float, float]) -> Callable[[LiverSAMClient], str]:
        """``client -> session id`` for the I/O thread; copies the CT now (main thread) when it must be sent."""
        key = (volume_key(volume_node), (float(window[0]), float(window[1])))
        ct = None if key in self.sessions else MRMLBridge.ct_volume_from_node(volume_node)

        def session(client: LiverSAMClient) -> str:
            if key in self.sessions:
                return self.sessions[key]
            g = ct.geometry
            info = client.open_volume(ct.array_kji, g.spacing_mm, g.origin_lps, np.asarray(g.direction_lps).ravel(),
                                      window_level=key[1][0], window_width=key[1][1])  # fmt: skip
            self.sessions[key] = info["session_id"]
            return info["session_id"]

        return session

    # --- the prompted slices ------------------------------------------------------------------------------
    def predict_slices_work(self, volume_node, requests: Sequence[ServerRequests.SliceRequest],
                            window: tuple[float, float], focus_k: int | None = None,
                            prefetch_radius: int = 0):  # fmt: skip
        """``client -> ({k: mask [j, i]}, {k: model score})`` for the I/O thread; then pre-encodes the
        slices around ``focus_k`` on the server."""
        session_of = self.session_work(volume_node, window)
        requests = list(requests)

        def work(client: LiverSAMClient):
            session = session_of(client)
            masks, scores = {}, {}
            for request in requests:
                masks[request.k], scores[request.k] = client.predict_slice(
                    session, request.k, request.boxes_ij, request.points_ij, request.negative_points_ij
                )
            if prefetch_radius > 0 and requests:
                client.prefetch(session, focus_k if focus_k is not None else requests[-1].k, int(prefetch_radius))
            return masks, scores

        return work

    # --- propagation and fixes ----------------------------------------------------------------------------------
    def plan_propagation(self, segmentation_node, volume_node, segment_id: str, clip_id: str | None, prompts,
                         settings: dict[str, Any], window: tuple[float, float]) -> PropagationPlan:  # fmt: skip
        """A full propagation of the segment, or -- when it was propagated before from the same voxels and
        settings and the prompts only gained or changed slices -- a fix of those slices (main thread).

        ``clip_id``: the segment (the liver) a tumour is clipped to; its mask is read from the segmentation
        node now and sent as the job's container.
        """
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        given = prompts.to_slice_prompts()
        key = volume_key(volume_node)
        record = self.records.get((segmentation_node.GetID(), segment_id))
        fix_slices = ServerRequests.plan_repropagation(record, given, key, settings)
        existing = MRMLBridge.segment_mask(segmentation_node, segment_id, volume_node) if fix_slices else None
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
            plan.given, plan.volume_key, plan.settings, plan.session, plan.name
        )
        return changed

    def _give_to_container(self, plan: PropagationPlan, mask: np.ndarray, k_range: tuple[int, int],
                           only: list[int] | None = None) -> None:
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
