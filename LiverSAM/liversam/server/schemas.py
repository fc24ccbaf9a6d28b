"""Request and answer models of the API (they make the OpenAPI schema). Coordinates are IJK unless a
request says otherwise; every number must be finite (NaN / infinity are refused with 422)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..propagation import PropagationSettings

Finite = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9 _.\-]+$")]
BoxIJ = Annotated[list[Finite], Field(min_length=4, max_length=4, description="(i0, j0, i1, j1) voxel indices")]
PointIJ = Annotated[list[Finite], Field(min_length=2, max_length=2, description="(i, j) voxel indices")]
Point3 = Annotated[list[Finite], Field(min_length=3, max_length=3)]
Box3 = Annotated[list[Point3], Field(min_length=2, max_length=2, description="two opposite corners on one slice")]
MAX_PROMPTS = 256


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Health(BaseModel):
    status: str
    service: str
    version: str


class Limits(BaseModel):
    max_sessions: int
    max_voxels: int
    idle_timeout_s: float
    cache_mb_per_session: float
    max_json_bytes: int
    max_volume_bytes: int
    open_path: str = Field(description="'any' (loopback, no roots), 'roots' (inside data_roots) or 'disabled'")
    session_memory_mb: float = Field(description="what the sessions may hold together (--session-memory-gb)")


class ModelInfo(BaseModel):
    name: str
    loaded: bool
    device: str | None = None
    encoder_backend: str | None = None
    decoder_backend: str | None = None
    precision: str | None = None
    accelerate: str
    error: str | None = None


class ModelChoice(BaseModel):
    """A model this server's machine can load (``liversam serve --model NAME``)."""

    name: str = Field(description="what --model takes")
    description: str
    kind: str = Field(description="'built-in' or 'registered' (trained with LiverSAMTrain / liversam train)")
    available: bool = Field(description="its weights are on the server's machine (else --model NAME fails)")


class ModelList(BaseModel):
    """The models of the server's machine: the built-in ones and those registered in its model registry
    ($LIVERSAM_HOME/models/registry.json, or ~/.liversam). One server runs one model: another one is chosen by
    starting the server with --model NAME."""

    current: str = Field(description="the model this server runs (its --model)")
    models: list[ModelChoice]


class MemoryHeld(BaseModel):
    """What the open sessions hold together, MB (MiB)."""

    budget_mb: float = Field(description="what they may hold together (--session-memory-gb)")
    held_mb: float = Field(description="ct_mb + embeddings_mb + masks_mb")
    ct_mb: float = Field(description="the CT arrays")
    embeddings_mb: float = Field(description="the embedding caches")
    masks_mb: float = Field(description="the session masks and the job results the server keeps")


class Info(BaseModel):
    version: str
    model: ModelInfo
    sessions: int
    jobs_queued: int
    jobs_running: int
    worker: str
    rss_mb: float | None = Field(default=None, description="the server's resident memory now (Linux)")
    memory: MemoryHeld
    limits: Limits


class SessionInfo(BaseModel):
    session_id: str
    shape_kji: list[int]
    spacing_mm: list[float]
    origin_lps: list[float]
    direction_lps: list[float]
    dtype: str
    window_level: float
    window_width: float
    masks: list[str]
    cached_slices: int
    source: str
    reoriented_from: str | None = Field(
        default=None,
        description="'sagittal' or 'coronal' when the CT (opened by path) is stored in such slices: the session holds "
        "its axial slices (voxels reordered, none resampled), and every k, IJK and mask here is on that axial grid",
    )
    resampled: bool = Field(
        default=False,
        description="True when an irregular DICOM series (missing slices, gantry tilt) was opened with "
        "resample_irregular: its slices were interpolated onto a regular grid, so no DICOM SEG can reference the series",
    )


class OpenPath(Strict):
    path: str = Field(min_length=1, max_length=4096, description="CT file or DICOM folder on the server")
    series_uid: str | None = Field(default=None, max_length=128)
    series_number: int | None = None
    window_level: Finite = 40.0
    window_width: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 400.0
    allow_non_ct: bool = Field(
        default=False,
        description="open a DICOM series of another modality, or a volume that looks like a label mask "
        "(few small whole numbers, no air) or holds no Hounsfield units (no value below 0), as the CT",
    )
    resample_irregular: bool = Field(
        default=False,
        description="a DICOM series whose slices do not form a regular grid (missing slices, uneven spacing, gantry "
        "tilt) is refused unless this is true; then its slices are interpolated onto a regular orthogonal grid (the "
        "session says resampled: true, and a DICOM SEG export of it is refused: export .seg.nrrd instead)",
    )


class PredictRequest(Strict):
    k: int = Field(description="axial slice index")
    boxes: list[BoxIJ] = Field(default_factory=list, max_length=MAX_PROMPTS)
    points: list[PointIJ] = Field(default_factory=list, max_length=MAX_PROMPTS)
    negative_points: list[PointIJ] = Field(default_factory=list, max_length=MAX_PROMPTS)


class PrefetchRequest(Strict):
    k: int
    radius: int = Field(default=3, ge=0, le=32)


class Planned(BaseModel):
    planned: list[int]


class SegmentSpec(Strict):
    """One segment in PROMPTS.json form (see liversam.prompts); no markups files over the network."""

    name: Name
    label: int | None = Field(default=None, ge=1, le=65535)
    color: list[Annotated[float, Field(ge=0, le=255, allow_inf_nan=False)]] | None = Field(
        default=None, min_length=3, max_length=3)
    inside: Name | None = Field(default=None, description="a segment of this request or a session mask. Not given: a "
                                "liver tumour's segment (tumor, lesion, HCC, ...) stays inside the request's one liver "
                                "segment; null: on its own")
    propagate: bool = True
    boxes: list[Box3] = Field(default_factory=list, max_length=MAX_PROMPTS)
    points: list[Point3] = Field(default_factory=list, max_length=MAX_PROMPTS)
    negative_points: list[Point3] = Field(default_factory=list, max_length=MAX_PROMPTS)


_CORE = PropagationSettings()  # defaults come from the core, never restated here


def _number(low: float, high: float | None = None):
    return Annotated[float, Field(ge=low, le=high, allow_inf_nan=False)]


class JobSettings(Strict):
    """``liversam.propagation.PropagationSettings`` (the core's defaults), the clean-up (2D per slice, 3D per
    segment; ``liversam.postprocess``) and the segments to refine with a dense CRF. The defaults are those of
    ``liversam segment``."""

    intensity_refinement: bool = _CORE.intensity_refinement
    max_slices: int | None = Field(default=_CORE.max_slices, ge=0, le=100000, description="cap per track and direction")
    box_margin_mm: _number(0, 100) = _CORE.box_margin_mm
    use_mask_prompt: bool = _CORE.use_mask_prompt
    min_area_mm2: _number(0) = _CORE.min_area_mm2
    collapse_ratio: _number(0, 1) = _CORE.collapse_ratio
    min_score: _number(0, 1) = _CORE.min_score
    min_overlap: _number(0, 1) = _CORE.min_overlap
    max_growth_ratio: _number(1) | None = _CORE.max_growth_ratio
    growth_allowance_mm2: _number(0) = _CORE.growth_allowance_mm2
    max_mean_hu_shift: _number(0) | None = _CORE.max_mean_hu_shift
    skip_thin_slices_mm: Annotated[float, Field(gt=0, lt=3, allow_inf_nan=False)] | None = Field(
        default=None, description="organs on slices at most this thick are predicted on every other slice and "
        "interpolated between, as `liversam segment --skip-thin-slices` (faster, slightly less accurate; null: off)")
    lesion_rim: bool = Field(
        default=True, description="a propagated tumour (a segment with a container) takes its partial-volume ring: "
        "the voxels one step outside its outline that still lean to its side of the parenchyma, as `liversam "
        "segment` (off: `--no-lesion-rim`); only with intensity_refinement")
    min_island_mm2: _number(0) = 10.0  # liversam segment's --min-island-mm2 default
    fill_holes: bool = Field(default=True, description="fill holes in every lesion's slice masks (segments inside a container) and in "
                             "each 3D result; an organ's slice masks keep the holes the model leaves (hilum, large vessels)")
    closing_radius_mm: _number(0, 50) = Field(default=0.0, description="2D closing of every slice mask (0: none)")
    min_island_mm3: _number(0) = Field(default=0.0, description="remove 3D components smaller than this (0: none)")
    keep_largest: list[Name] | None = Field(
        default=None, max_length=16,
        description="segments whose 3D result keeps only its largest component; null (the default): the liver")
    crf: list[Name] | None = Field(default=None, max_length=16,
                                   description="segments refined by a dense CRF on the CT, as `liversam segment "
                                   "--crf` (propagate jobs); null (the default): every segment where pydensecrf2 "
                                   "is installed on the server, [] none")


class PropagateRequest(Strict):
    coordinate_system: Literal["IJK", "LPS", "RAS"] = "IJK"
    segments: list[SegmentSpec] = Field(min_length=1, max_length=16)
    settings: JobSettings = Field(default_factory=JobSettings)


class RepropagateRequest(Strict):
    coordinate_system: Literal["IJK", "LPS", "RAS"] = "IJK"
    segment: SegmentSpec = Field(description="the segment's prompts as they are now, fixed slices included")
    fix_slices: list[int] = Field(min_length=1, max_length=64)
    existing: Name | None = Field(default=None, description="session mask with the segment now (default: its name)")
    container: Name | None = Field(default=None, description="session mask that clips it (the liver)")
    settings: JobSettings = Field(default_factory=JobSettings)


class ExportSegment(Strict):
    name: Name = Field(description="the segment's name in the file (liver, tumor: coded with SNOMED CT)")
    mask: Name = Field(description="the session mask (uploaded with PUT .../masks/{name}) that holds it")
    label: int | None = Field(default=None, ge=1, le=65535)


class DicomSegRequest(Strict):
    """Write session masks as a DICOM SEG referencing the CT's DICOM series (``liversam.dicom_seg``)."""

    segments: list[ExportSegment] = Field(min_length=1, max_length=16)
    reference_dicom: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="the CT's DICOM folder on the server (default: the folder a session opened by path was read from)")
    series_uid: str | None = Field(default=None, max_length=128, description="the CT's SeriesInstanceUID in that "
                                   "folder (default: the session's, else the series whose grid matches)")
    series_description: str = Field(default="LiverSAM segmentation", min_length=1, max_length=64)


class JobStatus(BaseModel):
    job_id: str
    session_id: str
    kind: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    stage: str
    done: int
    total: int
    progress_events: int
    error: str | None = None
    #: set when keeping a finished job's masks put the sessions over the memory budget (the masks were kept)
    warning: str | None = None
    created: float
    started: float | None = None
    finished: float | None = None


class SegmentSummary(BaseModel):
    name: str
    label: int
    color: list[float]
    voxels: int
    volume_ml: float
    computed_slices: list[int]


class JobResult(BaseModel):
    job_id: str
    segments: list[SegmentSummary]
    review: dict[str, Any]
    lesions: list[dict[str, Any]]
    labelmap_dtype: str
