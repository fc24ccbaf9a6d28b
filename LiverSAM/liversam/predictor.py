"""Slice-by-slice SAM prediction on a CT volume with cached image embeddings.

Each slice is windowed (on a copy) and encoded at most once while its embedding stays in the cache; any
number of prompt changes on that slice then cost only the prompt encoder + mask decoder.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .embedding_cache import SliceEmbeddingCache
from .models.loaded_model import LoadedModel
from .point_edits import POINT_RADIUS_MM, POINT_REACH_MM, honour_points, local_changes, point_disk  # noqa: F401
from .preprocess import SliceTransform, WindowSettings, display_view, window_slice
from .prompts import SlicePrompts
from .volume import CTVolume

# Points are the user's word on one spot. LiteMedSAM was trained on boxes: on a slice with a box, its answer to
# points made the mask worse (benchmarks/click_edits.py, four cases, 32 liver and 23 lesion slices, a box 5 mm
# loose, then corrective clicks at the centre of the largest error: liver Dice 0.945 -> 0.74-0.75 after one
# click, 0.62-0.63 after five; lesion 0.808 -> 0.53), e.g. a - point on a thin leak dropped most of the liver (lits117
# slice 33: 9644 -> 2210 voxels). So on a slice with a box a point edits only its neighbourhood: within
# POINT_REACH_MM the model's answer, and its own disk of POINT_RADIUS_MM joins (+) or leaves (-) the mask
# whatever the model says; farther away the box's mask stays. Five clicks: liver 0.951, lesion 0.873
# (reach and radius 2 mm: 0.949 / 0.846; 5 mm: 0.953 / 0.862; 7 mm: 0.952 / 0.821; 3 mm radius with a 10 mm
# reach: 0.950 / 0.794; 15 mm: 0.945 / 0.768; the disks alone with the model's changes everywhere: 0.906 / 0.714).
# (POINT_RADIUS_MM, POINT_REACH_MM and the edits themselves: liversam.point_edits, imported above)

log = logging.getLogger(__name__)
_volume_ids = itertools.count()


@dataclass
class SlicePrediction:
    """The mask on slice k ([j, i], bool), the model's own quality score (predicted IoU, 0..1) and logits."""

    k: int
    mask_ji: np.ndarray
    score: float
    low_res_logits: torch.Tensor  # (1, 1, L, L): reusable as the next slice's dense prompt

    @property
    def area_voxels(self) -> int:
        return int(self.mask_ji.sum())


class SlicePredictor:
    """Predict masks on axial slices of one CT volume.

    ``cache`` may be shared between predictors (e.g. the liver and tumour passes of one run share it:
    a slice is never encoded twice in one run).
    """

    def __init__(
        self,
        model: LoadedModel,
        volume: CTVolume,
        window: WindowSettings | None = None,
        cache_mb: float = 1024.0,
        cache: SliceEmbeddingCache | None = None,
        readahead: bool | None = None,
    ) -> None:
        self.model = model
        self.volume = volume
        self.window = window or WindowSettings()
        self.cache = cache if cache is not None else SliceEmbeddingCache(cache_mb)  # an empty cache is falsy
        # the model sees every axial slice in the radiological display, however the scan stores it
        self.transform = SliceTransform(slice_shape=volume.array_kji.shape[1:], input_size=model.input_size,
                                        view=display_view(volume.geometry.direction_lps))
        self._volume_id = next(_volume_ids)
        self._encode_lock = threading.Lock()
        self.encoded_slices: list[int] = []  # every slice actually run through the encoder (for stats/tests)
        self.encode_seconds = 0.0
        # Read-ahead: when predict() walks slice by slice (propagation), the next slice is encoded in the
        # background while this one is decoded and refined. ``None``: only when the model runs on a GPU. On a
        # CPU the background encoder and the foreground's decoder and refinement share the same cores (the
        # encoder already uses all its threads): on an idle 2-core CPU a 100-slice one-box liver took 55 s
        # with read-ahead and 37 s without (docs/PERFORMANCE.md, session 6).
        if readahead is None:
            device = getattr(model, "device", None)
            readahead = getattr(device, "type", "cpu") != "cpu"
        self.readahead = bool(readahead)
        self.readahead_slices: list[int] = []
        self._last_predicted: int | None = None
        self._ahead: Future | None = None
        self._ahead_pool: ThreadPoolExecutor | None = None

    def _key(self, k: int) -> tuple:
        return (self._volume_id, int(k), self.window.key(), self.model.source)

    def model_input(self, k: int) -> torch.Tensor:
        """The preprocessed input (1, 3, S, S) for slice k. The CT array itself is never modified."""
        windowed = window_slice(self.volume.array_kji[k], self.window)
        return self.transform.image_to_input(windowed, self.model.spec.normalization)

    def is_cached(self, k: int) -> bool:
        return self._key(k) in self.cache

    def embedding(self, k: int) -> torch.Tensor:
        """The image embedding of slice k, from the cache or computed now."""
        if not 0 <= k < self.volume.num_slices:
            raise IndexError(f"slice k={k} outside 0..{self.volume.num_slices - 1}")
        key = self._key(k)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        with self._encode_lock:  # one encoder call at a time; re-check after waiting
            cached = self.cache.get(key)
            if cached is not None:
                return cached
            start = time.perf_counter()
            emb = self.model.encode(self.model_input(k))
            self.encode_seconds += time.perf_counter() - start
            self.encoded_slices.append(int(k))
            return self.cache.put(key, emb)  # as the cache keeps it, so every use of slice k sees the same

    def hint_next(self, k: int) -> bool:
        """Start encoding slice ``k`` in the background (one slice at a time); True when it was started.

        Nothing happens when ``k`` is outside the volume, already cached, or an earlier read-ahead is still
        running. A later ``embedding(k)`` waits for that encode instead of starting its own.
        """
        if not 0 <= k < self.volume.num_slices or self.is_cached(k):
            return False
        if self._ahead is not None and not self._ahead.done():
            return False
        if self._ahead_pool is None:
            self._ahead_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="LiverSAM-readahead")
        self.readahead_slices.append(int(k))
        self._ahead = self._ahead_pool.submit(self._encode_quietly, int(k))
        return True

    def _encode_quietly(self, k: int) -> None:
        try:
            self.embedding(k)
        except Exception as exc:  # the foreground call for this slice will raise it where it matters
            log.debug("read-ahead encoding of slice %d failed: %s", k, exc)

    def close(self) -> None:
        """Wait for a running read-ahead encode and stop its worker thread."""
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True)
            self._ahead_pool = None

    def predict(
        self, k: int, prompts: SlicePrompts, mask_logits: torch.Tensor | None = None
    ) -> SlicePrediction:
        """Segment slice k from its prompts.

        Each box is one prompt (with the points that fall inside it); several boxes give the union of their
        masks. Points without a box form one prompt together. ``mask_logits`` (1, 1, L, L) is an optional
        dense prompt (e.g. the previous slice's result during propagation). The score is the prompts'
        predicted IoUs averaged with their mask areas as weights (each part counts by its size).
        """
        if prompts.is_empty():
            raise ValueError(f"slice k={k}: prompts need at least one box or positive point")
        embedding = self.embedding(k)
        previous, self._last_predicted = self._last_predicted, int(k)
        if self.readahead and previous is not None and abs(k - previous) in (1, 2):
            self.hint_next(k + (k - previous))  # walking slice by slice (or every other one): the next is known
        tr = self.transform
        groups: list[tuple[tuple | None, list, list]] = []
        pos = list(prompts.points_pos_ij)
        neg = list(prompts.points_neg_ij)
        if prompts.boxes_ij:
            for box in prompts.boxes_ij:
                i0, j0, i1, j1 = box
                inside = [p for p in pos if i0 - 0.5 <= p[0] <= i1 + 0.5 and j0 - 0.5 <= p[1] <= j1 + 0.5]
                groups.append((box, inside, neg))
            assigned = {p for g in groups for p in g[1]}
            loose = [p for p in pos if p not in assigned]
            if loose:
                groups.append((None, loose, neg))
        else:
            groups.append((None, pos, neg))

        union: torch.Tensor | None = None
        low_res_union: torch.Tensor | None = None
        scores = []
        for box, group_pos, group_neg in groups:
            points = group_pos + group_neg
            coords = tr.voxel_to_model(np.asarray(points)) if points else None
            labels = np.array([1] * len(group_pos) + [0] * len(group_neg)) if points else None
            box_xyxy = tr.box_to_model(box) if box is not None else None
            multimask = (
                self.model.spec.multimask_for_single_point
                and box is None
                and len(points) == 1
                and mask_logits is None
            )
            low_res, iou = self.model.decode(embedding, coords, labels, box_xyxy, mask_logits, multimask)
            best = int(torch.argmax(iou)) if multimask else 0
            low_res, score = low_res[best : best + 1], float(iou[best])
            slice_logits = tr.logits_to_slice(low_res)[0, 0]
            scores.append((score, float((slice_logits > 0).sum()) + 1e-3))
            union = slice_logits if union is None else torch.maximum(union, slice_logits)
            low_res_union = low_res if low_res_union is None else torch.maximum(low_res_union, low_res)
        assert union is not None and low_res_union is not None
        mask = (union > 0).numpy()
        total = sum(weight for _, weight in scores)
        score = sum(value * weight for value, weight in scores) / total
        spacing_xy = self.volume.geometry.spacing_mm[:2]
        if (pos or neg) and prompts.boxes_ij and mask_logits is None:
            boxes_only = self.predict(k, SlicePrompts(prompts.boxes_ij)).mask_ji
            mask = local_changes(boxes_only, mask, pos + neg, spacing_xy)
        mask = honour_points(mask, pos, neg, spacing_xy, POINT_RADIUS_MM)
        return SlicePrediction(k=int(k), mask_ji=mask, score=score, low_res_logits=low_res_union)

    def precompute(self, ks, progress=None, cancel=None) -> None:
        """Encode slices ahead of time (e.g. the neighbours of the one the user works on)."""
        ks = list(ks)
        for n, k in enumerate(ks):
            if cancel is not None and cancel():
                return
            self.embedding(k)
            if progress is not None:
                progress(n + 1, len(ks))
