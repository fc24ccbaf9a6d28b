"""The model and its per-slice embedding cache for one CT, owned by the inference worker thread.

No Qt and no MRML: the session receives plain data (a :class:`liversam.volume.CTVolume` copy of the input
volume, :class:`liversam.prompts.SlicePrompts` in voxel indices) and returns core results. All methods are
meant to run on :class:`LiverSAMLib.InferenceWorker.InferenceWorker`'s thread; the main thread writes the
results into the scene.

A prompt change on a slice that was already encoded re-runs only the prompt encoder and mask decoder:
the :class:`liversam.predictor.SlicePredictor` keeps the slice embeddings in an LRU cache bounded in MB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# load_model(name_or_path, device) -> LoadedModel; injectable for tests.
ModelLoader = Callable[[str, str], object]


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

    # --- model and predictor -------------------------------------------------------------------------
    def model(self, settings: SessionSettings):
        """The loaded model for ``settings.model`` on ``settings.device`` (loaded on first use only)."""
        key = (settings.model, settings.device)
        if self._model is None or self._model_key != key:
            loader = self._loader
            if loader is None:
                from liversam.models import load_model as loader
            logger.info("LiverSAM: loading model %s on %s", settings.model, settings.device)
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
            window = WindowSettings(level=settings.window_level_hu, width=settings.window_width_hu)
            self._predictor = SlicePredictor(model, volume, window=window, cache_mb=settings.cache_mb)
            self._predictor_key = key
        return self._predictor

    @property
    def current_predictor(self):
        return self._predictor

    def release(self) -> None:
        """Drop the model and the embeddings (frees memory; the next call loads again)."""
        self._model = None
        self._model_key = None
        self._predictor = None
        self._predictor_key = None

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
    ):
        """Run the core pipeline (per-slice prompts + propagation + post-processing) on the volume.

        ``postprocess`` is a ``liversam.pipeline.PipelineSettings``; ``progress(stage, done, total)``;
        ``cancel()`` returns True to stop (the pipeline then raises ``liversam.pipeline.Cancelled``). Returns a ``liversam.segmentation.SegmentationResult`` on the CT grid.
        """
        from liversam.pipeline import segment_volume

        predictor = self.predictor(volume, volume_key, settings)
        return segment_volume(
            volume, list(segment_prompts), predictor, settings=postprocess, progress=progress, cancel=cancel
        )


# --- glue to the core pipeline modules (post-processing, propagation, review, lesions) ----------------------
def core_postprocess_settings(
    fill_holes: bool = True,
    min_island_mm3: float = 0.0,
    keep_largest: bool = True,
    closing_mm: float = 0.0,
):
    """The core's ``PipelineSettings`` from the module's post-processing settings.

    Per slice: fill holes, closing (mm). In 3D after propagation: fill holes, remove islands smaller than
    ``min_island_mm3``; the liver also keeps only its largest component when ``keep_largest``.
    """
    from liversam.pipeline import PipelineSettings
    from liversam.postprocess import Postprocess3DSettings, PostprocessSettings

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
    )


def propagate_segment(session, settings, volume, volume_key, segment_prompts, postprocess=None, clip_mask_kji=None,
                      progress=None, cancel=None):  # fmt: skip
    """Propagate one segment from its prompted slices; clipped to ``clip_mask_kji`` (the liver) when given.

    The liver already lives in the Slicer segmentation, so instead of asking the pipeline to segment it
    again (``inside="liver"``), the result is clipped to the existing liver mask here.
    """
    import dataclasses

    import numpy as np
    from liversam.pipeline import Cancelled as PipelineCancelled

    from .InferenceWorker import Cancelled

    prompts = dataclasses.replace(segment_prompts, inside=None, propagate=True)

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, f"{segment_prompts.name}: {stage} ({done}/{total})")

    try:
        result = session.segment(
            volume, volume_key, settings, [prompts], postprocess, progress=report, cancel=cancel
        )
    except PipelineCancelled as cancelled:
        raise Cancelled() from cancelled
    if clip_mask_kji is not None:
        for segment in result.segments:
            segment.mask_kji = np.asarray(segment.mask_kji, dtype=bool) & np.asarray(
                clip_mask_kji, dtype=bool
            )
    return result


def review_rows(result, min_score: float = 0.5, max_area_ratio: float = 2.5) -> list[tuple[int, str, str]]:
    """Slices to check after propagation: ``(k, segment name, reason)`` rows, sorted by slice.

    Uses ``liversam.review`` (the core's review report) when it provides ``review_result``; otherwise flags
    low model scores and sudden area changes between neighbouring slices.
    """
    try:
        from liversam.review import review_result
    except ImportError:
        review_result = None
    if review_result is not None:
        rows = []
        for flag in review_result(result):
            get = flag.get if isinstance(flag, dict) else lambda key, f=flag: getattr(f, key, "")
            rows.append(
                (int(get("k")), str(get("segment") or get("name")), str(get("reason") or get("message")))
            )
        return sorted(rows)
    rows = []
    for segment in result.segments:
        for k, score in sorted(segment.slice_scores.items()):
            if score < min_score:
                rows.append((int(k), segment.name, f"low model score {score:.2f}"))
        areas = segment.mask_kji.reshape(segment.mask_kji.shape[0], -1).sum(axis=1)
        present = [int(k) for k in range(len(areas)) if areas[k] > 0]
        for k0, k1 in zip(present, present[1:], strict=False):
            small, large = sorted((int(areas[k0]), int(areas[k1])))
            if k1 == k0 + 1 and small > 0 and large / small > max_area_ratio:
                rows.append((k1, segment.name, f"area changes x{large / small:.1f} from slice {k0}"))
    return sorted(rows)


def lesion_rows(tumor_mask_kji, geometry) -> list[dict]:
    """One row per connected lesion: index, volume (mL), longest axial diameter (mm), centre voxel (i, j, k)."""
    import numpy as np
    from scipy import ndimage
    from skimage.measure import regionprops

    labels, count = ndimage.label(np.asarray(tumor_mask_kji, dtype=bool))
    rows = []
    voxel_ml = geometry.voxel_volume_mm3 / 1000.0
    in_plane_mm = float(np.sqrt(geometry.spacing_mm[0] * geometry.spacing_mm[1]))
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[region] == index
        diameter_px = 0.0
        for slice_ji in component:
            if slice_ji.any():
                props = regionprops(slice_ji.astype(np.uint8))
                diameter_px = max(diameter_px, float(props[0].feret_diameter_max))
        center_kji = np.rint(np.argwhere(component).mean(axis=0) + [s.start for s in region]).astype(int)
        rows.append({
            "index": index,
            "volume_ml": float(component.sum() * voxel_ml),
            "diameter_mm": diameter_px * in_plane_mm,
            "center_ijk": (int(center_kji[2]), int(center_kji[1]), int(center_kji[0])),
        })  # fmt: skip
    rows.sort(key=lambda row: -row["volume_ml"])
    for number, row in enumerate(rows, start=1):
        row["index"] = number
    return rows[:count]
