"""Evaluation of LiverSAM against reference labels, with prompts simulated from those labels.

Protocols (every prompt is derived from the reference label; nothing is drawn by a person):

``oracle-box``
    A box on **every** slice where the structure is present: the tight bounding box (inclusive voxel
    corners, plus ``box_margin`` voxels) of the liver on that slice; for tumours one box per 2D connected
    component (8-connectivity) of the tumour label on that slice, i.e. per lesion and slice. No
    propagation. This is the upper bound of box prompting.
``one-box``
    One box per structure on its largest slice, then slice-to-slice propagation by the pipeline: for the
    liver the box of the liver on the slice where its area is largest; for tumours one box per 3D
    connected component (26-connectivity) of the tumour label, on that lesion's largest slice, each lesion
    propagated on its own and the results united.
``clicks``
    2D interactive, slice by slice, as SAM papers evaluate (RITM protocol): on each evaluated slice start
    from one positive click at the centre of the structure, then add the click a user would add (at the
    centre of the largest error region, see :mod:`liversam.click_simulation`) up to ``max_clicks``. The
    previous prediction's low-resolution logits are fed back as the mask prompt (``click_mask_input``).
    Reported: Dice after each click (pooled over the evaluated slices, and the mean of per-slice Dice) and
    NoC@85 / NoC@90 (clicks needed to reach Dice 0.85 / 0.90 on a slice, capped at ``max_clicks``;
    mean over slices). Slices: all slices holding the structure, or a seeded random sample of
    ``max_slices``.

Structures: by default ``liver`` = label 1 OR label 2 (the LiTS convention: the liver includes its
tumours) and ``tumor`` = label 2; both are configurable (:class:`StructureSpec`).

Data (:func:`discover_cases`): a manifest file (``.json``: a list of ``{"id", "ct", "label"}`` objects,
or ``{"cases": [...]}``; ``.csv`` with columns ``id,ct,label``; relative paths are relative to the
manifest's folder) or a folder that is one case (``ct.<ext>`` + ``label.<ext>``), holds case folders
each with ``ct.<ext>`` + ``label.<ext>``, holds ``<id>_ct.<ext>`` + ``<id>_label.<ext>`` pairs, or holds
LiTS-named ``volume-<n>.<ext>`` + ``segmentation-<n>.<ext>`` pairs. ``<ext>`` is any CT file type LiverSAM
reads (.nii.gz, .nii, .nrrd, .mha, .mhd).

Metrics are those of :mod:`liversam.metrics` (Dice, IoU, HD95 and ASSD in mm, lesion-wise recall and
precision with "any overlap" matching), computed in 3D on the evaluated slice range for the box
protocols.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import __version__
from .click_simulation import (
    Click,
    mean_dice_per_click,
    pooled_dice_per_click,
    simulate_clicks_on_slice,
)
from .errors import InputImageError, LiverSAMError
from .geometry import ImageGeometry
from .metrics import (
    DICE_THRESHOLDS,
    array_spacing_mm,
    first_index_reaching,
    json_safe,
    structure_metrics,
    summarize,
)
from .volume import CTVolume

log = logging.getLogger(__name__)

PROTOCOLS = ("oracle-box", "one-box", "clicks")
BOX_STYLES = ("tight", "loose", "jitter")
CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

METRIC_DEFINITIONS = {
    "dice": "2|P&R|/(|P|+|R|); 1 when both are empty (a case where both are empty is left out of the means)",
    "iou": "|P&R| / |P or R|; 1 when both are empty (a case where both are empty is left out of the means)",
    "hd95_mm": "max of the two directed 95th percentiles of surface distances (MedPy hd95), mm; "
    "null when exactly one mask is empty",
    "assd_mm": "mean of the pooled directed surface distances (LiTS ASSD), mm; null when exactly one is empty",
    "lesion_recall": "reference lesions (3D 26-connected components) overlapped by >= 1 voxel of a "
    "predicted component / reference lesions",
    "lesion_precision": "predicted components overlapping a reference lesion by >= 1 voxel / predicted components",
    "noc": "clicks needed to reach the Dice threshold on a slice, capped at max_clicks, averaged over slices",
}


class EvaluationDataError(InputImageError):
    """An evaluation data set (manifest, folder, label file) cannot be used."""


# --- configuration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StructureSpec:
    """A structure to evaluate: its name, the reference label values that make it up, and whether it is
    scored lesion by lesion (boxes per lesion, lesion-wise recall/precision)."""

    name: str
    labels: tuple[int, ...]
    lesions: bool = False
    # The structure the prediction must stay inside (the pipeline clips it), e.g. tumours inside the liver.
    inside: str | None = None


DEFAULT_STRUCTURES = (
    StructureSpec("liver", (1, 2)),
    StructureSpec("tumor", (2,), lesions=True, inside="liver"),
)


def default_structures(
    liver_labels: Sequence[int] = (1, 2), tumor_labels: Sequence[int] = (2,)
) -> list[StructureSpec]:
    """Liver and tumour specs with the given reference label values (empty ``tumor_labels``: no tumour)."""
    specs = [StructureSpec("liver", tuple(int(v) for v in liver_labels))]
    if tumor_labels:
        specs.append(
            StructureSpec("tumor", tuple(int(v) for v in tumor_labels), lesions=True, inside="liver")
        )
    return specs


@dataclass
class EvaluationSettings:
    """Everything that defines an evaluation run besides the data and the model."""

    protocols: tuple[str, ...] = ("oracle-box",)
    structures: tuple[StructureSpec, ...] = DEFAULT_STRUCTURES
    # Restrict to axial slices k0 <= k < k1 (None: all). Applied by cropping CT and label.
    slice_range: tuple[int, int] | None = None
    box_margin: int = 0  # voxels added on each side of a reference bounding box
    max_clicks: int = 20
    max_slices: int | None = None  # clicks protocol: seeded sample of slices per structure
    seed: int = 0
    click_mask_input: bool = True
    # clicks protocol: "point" starts from one positive click (the SAM-paper protocol); "box" starts from
    # the oracle box(es) of the slice and the clicks correct that prediction (LiverSAM's box-then-refine use).
    click_start: str = "point"
    # one-box: propagation with intensity refinement (liversam.intensity_refinement), as `liversam segment`.
    intensity_refinement: bool = True
    # one-box: a propagated lesion takes its partial-volume ring (liversam.lesion_rim), as `liversam segment`
    # (off: `--no-lesion-rim`; part of the intensity refinement either way).
    lesion_rim: bool = True
    # Structures (e.g. ("liver", "tumor")) refined by a dense CRF (liversam.dense_crf) in LiverSAM's runs, as
    # `liversam segment --crf`; the naive reference loop is never refined.
    crf: tuple[str, ...] = ()
    thresholds: tuple[float, ...] = DICE_THRESHOLDS
    # one-box: "one" puts every lesion box of a structure in one segment (what a user writes, the default);
    # "per-lesion" gives each lesion a segment of its own.
    lesion_segments: str = "one"
    # one-box: the propagation methods run side by side ("liversam", and "naive", the reference loop).
    propagation_methods: tuple[str, ...] = ("liversam", "naive")
    # one-box: how the simulated user draws the box: "tight" (the label's bounding box + ``box_margin``),
    # "loose" (+ ``loose_mm`` on every side), "jitter" (every side moved outwards by a seeded uniform draw
    # from ``jitter_mm``, a negative value cutting into the structure).
    box_styles: tuple[str, ...] = ("tight",)
    loose_mm: float = 7.0
    jitter_mm: tuple[float, float] = (-2.0, 7.0)
    # one-box: the slice of an organ's (a non-lesion structure's) box: None, its largest slice (default); a
    # fraction f in 0..1, the slice f of the way from its first to its last slice (a user who boxes the organ
    # on the slice in view; lesions keep their largest slices).
    organ_seed_at: float | None = None

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise LiverSAMError(
                f"Unknown evaluation protocol(s) {unknown or '(none)'}; choose from {', '.join(PROTOCOLS)}."
            )
        if self.max_clicks < 1 or self.max_clicks > 100:
            raise LiverSAMError(f"max_clicks must be in 1..100, got {self.max_clicks}.")
        if self.click_start not in ("point", "box"):
            raise LiverSAMError(f"click_start must be 'point' or 'box', got '{self.click_start}'.")
        if self.organ_seed_at is not None and not 0.0 <= self.organ_seed_at <= 1.0:
            raise LiverSAMError(f"organ_seed_at must be in 0..1 (a fraction of the organ's extent), got {self.organ_seed_at}.")
        if self.box_margin < 0:
            raise LiverSAMError(f"box_margin must be >= 0 voxels, got {self.box_margin}.")
        unknown_crf = [n for n in self.crf if n not in {s.name for s in self.structures}]
        if unknown_crf:
            raise LiverSAMError(
                f"--crf: unknown structure(s) {unknown_crf}; choose from "
                f"{', '.join(s.name for s in self.structures)}."
            )
        if self.lesion_segments not in ("one", "per-lesion"):
            raise LiverSAMError(f"lesion_segments must be 'one' or 'per-lesion', got '{self.lesion_segments}'.")
        from .propagation import PROPAGATION_METHODS

        bad = [m for m in self.propagation_methods if m not in PROPAGATION_METHODS]
        if bad or not self.propagation_methods:
            raise LiverSAMError(f"Unknown propagation method(s) {bad or '(none)'}; choose from "
                                f"{', '.join(PROPAGATION_METHODS)}.")
        bad = [b for b in self.box_styles if b not in BOX_STYLES]
        if bad or not self.box_styles:
            raise LiverSAMError(f"Unknown box style(s) {bad or '(none)'}; choose from {', '.join(BOX_STYLES)}.")


# --- data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationCase:
    """One case: a CT file (or DICOM folder) and its reference label file."""

    case_id: str
    ct_path: Path
    label_path: Path


def _strip_suffix(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for suffix in CT_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def _find_named(folder: Path, stem: str) -> Path | None:
    for suffix in CT_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _case_from_folder(folder: Path) -> EvaluationCase | None:
    ct = _find_named(folder, "ct")
    label = _find_named(folder, "label")
    if ct is not None and label is not None:
        return EvaluationCase(folder.name, ct, label)
    return None


def _read_manifest(path: Path) -> list[EvaluationCase]:
    base = path.parent
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data.get("cases") if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise EvaluationDataError(
                    f"Manifest '{path}': expected a list of {{id, ct, label}} objects or {{\"cases\": [...]}}."
                )
        else:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
    except (OSError, json.JSONDecodeError, csv.Error) as exc:
        raise EvaluationDataError(
            f"Cannot read manifest '{path}': {exc}. Fix the file or pass a data folder."
        ) from exc
    cases = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("ct") or not row.get("label"):
            raise EvaluationDataError(
                f"Manifest '{path}', entry {index + 1}: needs 'ct' and 'label' (and optionally 'id'), got {row!r}."
            )
        ct = Path(row["ct"]) if Path(row["ct"]).is_absolute() else base / row["ct"]
        label = Path(row["label"]) if Path(row["label"]).is_absolute() else base / row["label"]
        for kind, p in (("CT", ct), ("label", label)):
            if not p.exists():
                raise EvaluationDataError(
                    f"Manifest '{path}', entry {index + 1}: {kind} '{p}' does not exist."
                )
        cases.append(EvaluationCase(str(row.get("id") or f"case{index + 1:03d}"), ct, label))
    return cases


def discover_cases(data: str | Path) -> list[EvaluationCase]:
    """The evaluation cases in a manifest file or a data folder (layouts in the module docstring)."""
    data = Path(data)
    if not data.exists():
        raise EvaluationDataError(
            f"Evaluation data '{data}' does not exist. Give a case folder or a manifest file."
        )
    if data.is_file():
        if data.suffix.lower() not in (".json", ".csv"):
            raise EvaluationDataError(
                f"'{data}' is not a manifest: expected a .json or .csv file, or a data folder."
            )
        cases = _read_manifest(data)
    else:
        single = _case_from_folder(data)
        if single is not None:
            cases = [single]
        else:
            cases = [
                c for sub in sorted(p for p in data.iterdir() if p.is_dir()) if (c := _case_from_folder(sub))
            ]
            if not cases:
                cases = _paired_files(data)
    if not cases:
        raise EvaluationDataError(
            f"No cases found in '{data}'. Accepted: a folder with ct.nii.gz + label.nii.gz, a folder of such case "
            "folders, <id>_ct.<ext> + <id>_label.<ext> pairs, volume-<n> + segmentation-<n> pairs (LiTS), or a "
            ".json/.csv manifest with id, ct, label."
        )
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise EvaluationDataError(
            f"Duplicate case ids in '{data}': {sorted({i for i in ids if ids.count(i) > 1})}."
        )
    return cases


def _paired_files(folder: Path) -> list[EvaluationCase]:
    cts: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        split = _strip_suffix(path.name)
        if split is None or not path.is_file():
            continue
        stem = split[0]
        if match := re.fullmatch(r"(.+)_ct", stem, flags=re.IGNORECASE):
            cts[match.group(1)] = path
        elif match := re.fullmatch(r"(.+)_label", stem, flags=re.IGNORECASE):
            labels[match.group(1)] = path
        elif match := re.fullmatch(r"volume-(\w+)", stem, flags=re.IGNORECASE):
            cts[match.group(1)] = path
        elif match := re.fullmatch(r"segmentation-(\w+)", stem, flags=re.IGNORECASE):
            labels[match.group(1)] = path
    missing = sorted(set(cts) ^ set(labels))
    if missing:
        log.warning("%s: ignoring unpaired files for case ids %s", folder, ", ".join(missing))
    return [
        EvaluationCase(case_id, cts[case_id], labels[case_id]) for case_id in sorted(set(cts) & set(labels))
    ]


def read_label(path: Path, geometry: ImageGeometry, ct_path: Path | str = "") -> np.ndarray:
    """Read an integer label volume ``[k, j, i]`` and check it lies on the CT's grid."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise EvaluationDataError(
            f"Cannot read label file '{path}': {str(exc).strip().splitlines()[-1]}"
        ) from exc
    label_geometry = ImageGeometry.from_sitk(image)
    if not label_geometry.is_close(geometry, tolerance_mm=1e-2):
        raise EvaluationDataError(
            f"Label '{path}' is not on the grid of CT '{ct_path}': {label_geometry.describe_difference(geometry)}. "
            "Resample the label onto the CT first."
        )
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise EvaluationDataError(
                f"Label '{path}' holds non-integer values; expected integer label values."
            )
        array = array.astype(np.int32)
    if array.dtype.kind not in "iu":
        raise EvaluationDataError(
            f"Label '{path}' has voxel type {array.dtype}; expected integer label values."
        )
    _check_looks_like_labels(array, path, ct_path)
    return array


# More distinct values than any label map holds: a CT given as the label (its HU values are whole numbers too).
LABEL_MAX_DISTINCT_VALUES = 1024


def _check_looks_like_labels(array: np.ndarray, path: Path, ct_path: Path | str) -> None:
    """Refuse a label with negative values or more than LABEL_MAX_DISTINCT_VALUES values: a CT, not labels.

    A CT given as the label would otherwise be scored: its voxels of 1 and 2 HU taken for liver and tumour.
    """
    if array.size == 0:
        return
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high < LABEL_MAX_DISTINCT_VALUES:
        return  # every label map with values 0..1023: no need to count them
    distinct = 0 if low < 0 else np.unique(array).size
    if low >= 0 and distinct <= LABEL_MAX_DISTINCT_VALUES:
        return
    what = f"negative values (down to {low})" if low < 0 else f"{distinct:,} distinct values"
    raise EvaluationDataError(
        f"Label '{path}' holds {what}: it looks like a CT image, not a label map (label values are few "
        f"non-negative whole numbers, e.g. 0 background, 1 liver, 2 tumour). Are the CT '{ct_path}' and the "
        "label swapped?"
    )


def crop_slices(
    volume: CTVolume, label_kji: np.ndarray, slice_range: tuple[int, int] | None
) -> tuple[CTVolume, np.ndarray, tuple[int, int]]:
    """The CT and label restricted to axial slices ``k0 <= k < k1`` (geometry origin moved accordingly).

    Returns the cropped volume, the cropped label and the actual ``(k0, k1)`` used.
    """
    nk = volume.num_slices
    if slice_range is None:
        return volume, label_kji, (0, nk)
    k0, k1 = slice_range
    k0 = max(0, int(k0))
    k1 = min(nk, int(k1))
    if k1 <= k0:
        raise LiverSAMError(
            f"Slice range {slice_range[0]}:{slice_range[1]} selects no slice of '{volume.source}' ({nk} slices)."
        )
    if (k0, k1) == (0, nk):
        return volume, label_kji, (0, nk)
    g = volume.geometry
    geometry = ImageGeometry(
        size_ijk=(g.size_ijk[0], g.size_ijk[1], k1 - k0),
        spacing_mm=g.spacing_mm,
        origin_lps=tuple(g.ijk_to_lps(np.array([0.0, 0.0, float(k0)]))),
        direction_lps=g.direction_lps,
    )
    cropped = CTVolume(
        array_kji=np.array(volume.array_kji[k0:k1]),
        geometry=geometry,
        source=f"{volume.source}[k={k0}:{k1}]",
        metadata=dict(volume.metadata),
    )
    return cropped, np.array(label_kji[k0:k1]), (k0, k1)


def parse_slice_range(text: str | None) -> tuple[int, int] | None:
    """Parse ``"K0:K1"`` (either side may be empty) into a half-open slice range."""
    if not text:
        return None
    match = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if not match:
        raise LiverSAMError(f"--slices '{text}' is not of the form K0:K1 (e.g. 60:64 for slices 60..63).")
    k0 = int(match.group(1)) if match.group(1) else 0
    k1 = int(match.group(2)) if match.group(2) else 10**9
    return k0, k1


# --- prompts simulated from the reference ---------------------------------------------------------------


Box = tuple[int, int, int, int]  # (i0, j0, i1, j1) inclusive voxel indices on one slice


def bounding_box_ij(mask_ji: np.ndarray, margin: int = 0) -> Box:
    """The inclusive bounding box ``(i0, j0, i1, j1)`` of a non-empty ``[j, i]`` mask, grown by ``margin``
    voxels and clipped to the slice."""
    rows = np.flatnonzero(mask_ji.any(axis=1))
    cols = np.flatnonzero(mask_ji.any(axis=0))
    if rows.size == 0:
        raise ValueError("bounding box of an empty mask")
    nj, ni = mask_ji.shape
    return (
        max(int(cols[0]) - margin, 0),
        max(int(rows[0]) - margin, 0),
        min(int(cols[-1]) + margin, ni - 1),
        min(int(rows[-1]) + margin, nj - 1),
    )


def oracle_boxes(ref_kji: np.ndarray, per_lesion: bool, margin: int = 0) -> dict[int, list[Box]]:
    """Boxes on every slice holding the structure: one per slice, or one per 2D component (8-connected)
    per slice when ``per_lesion``."""
    boxes: dict[int, list[Box]] = {}
    eight = np.ones((3, 3), dtype=bool)
    for k in np.flatnonzero(ref_kji.any(axis=(1, 2))):
        slice_ji = ref_kji[k]
        if per_lesion:
            labels, _ = ndimage.label(slice_ji, structure=eight)
            # find_objects gives each component's bounding box as (row slice, column slice).
            boxes[int(k)] = [
                _grow_box(rows, cols, margin, slice_ji.shape) for rows, cols in ndimage.find_objects(labels)
            ]
        else:
            boxes[int(k)] = [bounding_box_ij(slice_ji, margin)]
    return boxes


def _grow_box(rows: slice, cols: slice, margin: int, shape: tuple[int, int]) -> Box:
    """An inclusive ``(i0, j0, i1, j1)`` box from half-open row/column slices, grown by ``margin``."""
    nj, ni = shape
    return (
        max(cols.start - margin, 0),
        max(rows.start - margin, 0),
        min(cols.stop - 1 + margin, ni - 1),
        min(rows.stop - 1 + margin, nj - 1),
    )


def one_box_seeds(ref_kji: np.ndarray, per_lesion: bool, margin: int = 0,
                  seed_at: float | None = None) -> list[tuple[int, Box]]:
    """``(k, box)`` seeds: the structure's box on its largest slice, or, when ``per_lesion``, one such seed
    per 3D connected component (26-connectivity), each on that component's largest slice. ``seed_at`` (not
    per lesion): the slice that fraction of the way from the structure's first slice to its last (rounded down)
    instead."""
    if not ref_kji.any():
        return []
    if seed_at is not None and not per_lesion:
        ks = np.flatnonzero(ref_kji.any(axis=(1, 2)))
        k = int(ks[0] + int(seed_at * (ks[-1] - ks[0])))  # rounded down: 0.65 of 25..48 is slice 39
        k = int(ks[np.argmin(np.abs(ks - k))])  # a slice the structure is on (it may have gaps)
        return [(k, bounding_box_ij(ref_kji[k], margin))]
    if per_lesion:
        labels, count = ndimage.label(ref_kji, structure=np.ones((3, 3, 3), dtype=bool))
        components = [(labels == n) for n in range(1, count + 1)]
    else:
        components = [ref_kji]
    seeds = []
    for component in components:
        areas = component.sum(axis=(1, 2))
        k = int(np.argmax(areas))
        seeds.append((k, bounding_box_ij(component[k], margin)))
    return seeds


def run_key(protocol: str, style: str = "tight", method: str = "liversam") -> str:
    """The results key of one run: ``one-box`` (tight boxes, LiverSAM), ``one-box:naive``,
    ``one-box:loose``, ``one-box:jitter:naive``, ..."""
    return protocol + ("" if style == "tight" else f":{style}") + ("" if method == "liversam" else f":{method}")


def run_keys(settings: EvaluationSettings) -> list[str]:
    """Every results key a run with ``settings`` produces, in report order."""
    keys = []
    for protocol in settings.protocols:
        if protocol == "one-box":
            keys += [run_key(protocol, style, method) for style in settings.box_styles
                     for method in settings.propagation_methods]
        else:
            keys.append(protocol)
    return keys


def styled_box(box: Box, style: str, shape_ji: tuple[int, int], spacing_ij: tuple[float, float],
               settings: EvaluationSettings, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A simulated user's box from the tight box ``box`` (see ``EvaluationSettings.box_styles``): clipped
    to the slice and at least one voxel wide in each direction (a box must have an area)."""
    i0, j0, i1, j1 = (float(v) for v in box)
    if style == "loose":
        di, dj = settings.loose_mm / spacing_ij[0], settings.loose_mm / spacing_ij[1]
        i0, j0, i1, j1 = i0 - di, j0 - dj, i1 + di, j1 + dj
    elif style == "jitter":
        lo, hi = settings.jitter_mm
        d = rng.uniform(lo, hi, size=4)
        i0, j0 = i0 - d[0] / spacing_ij[0], j0 - d[1] / spacing_ij[1]
        i1, j1 = i1 + d[2] / spacing_ij[0], j1 + d[3] / spacing_ij[1]
        if i1 < i0:
            i0 = i1 = (i0 + i1) / 2.0
        if j1 < j0:
            j0 = j1 = (j0 + j1) / 2.0
    nj, ni = shape_ji
    i0, i1 = float(np.clip(round(i0), 0, ni - 1)), float(np.clip(round(i1), 0, ni - 1))
    j0, j1 = float(np.clip(round(j0), 0, nj - 1)), float(np.clip(round(j1), 0, nj - 1))
    if i1 - i0 < 1.0:
        i0, i1 = (i0, i0 + 1.0) if i0 + 1.0 <= ni - 1 else (i0 - 1.0, i0)
    if j1 - j0 < 1.0:
        j0, j1 = (j0, j0 + 1.0) if j0 + 1.0 <= nj - 1 else (j0 - 1.0, j0)
    return (i0, j0, i1, j1)


def one_box_prompts_json(refs: dict[str, np.ndarray], settings: EvaluationSettings, style: str = "tight",
                         spacing_ij: tuple[float, float] = (1.0, 1.0), seed: int = 0) -> dict:
    """The PROMPTS.json (IJK) a user writes for the one-box protocol: one box on the liver's largest slice
    (or on the slice ``settings.organ_seed_at`` of the way through it),
    one box per lesion on its largest slice, all lesion boxes in one ``tumor`` segment (or one segment per
    lesion with ``lesion_segments="per-lesion"``); every segment propagated, tumours inside the liver."""
    rng = np.random.default_rng(seed)
    segments: list[dict] = []
    label = 1
    for spec in settings.structures:
        ref = refs[spec.name]
        if not ref.any():
            continue
        inside = spec.inside if spec.inside in refs and refs[spec.inside].any() else None
        boxes = []
        for k, box in one_box_seeds(ref, spec.lesions, settings.box_margin, settings.organ_seed_at):
            i0, j0, i1, j1 = styled_box(box, style, ref.shape[1:], spacing_ij, settings, rng)
            boxes.append([[i0, j0, float(k)], [i1, j1, float(k)]])
        groups = [[b] for b in boxes] if spec.lesions and settings.lesion_segments == "per-lesion" else [boxes]
        for n, group in enumerate(groups, start=1):
            entry: dict = {"name": spec.name if len(groups) == 1 else f"{spec.name}-{n}", "label": label,
                           "boxes": group, "propagate": True}
            if inside:
                entry["inside"] = inside
            segments.append(entry)
            label += 1
    return {"coordinate_system": "IJK", "segments": segments}


# --- running the model ------------------------------------------------------------------------------------


def structure_reference(label_kji: np.ndarray, spec: StructureSpec) -> np.ndarray:
    """The boolean reference mask of a structure (label value in ``spec.labels``)."""
    return np.isin(label_kji, np.asarray(spec.labels))


def _segment_masks_by_structure(
    result, specs: Sequence[StructureSpec], shape: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Unite the result's segments per structure: a segment belongs to structure ``s`` when it is named
    ``s`` or ``s-<n>`` (one segment per lesion)."""
    masks = {spec.name: np.zeros(shape, dtype=bool) for spec in specs}
    for segment in result.segments:
        base = re.sub(r"-\d+$", "", segment.name)
        if base in masks:
            masks[base] |= np.asarray(segment.mask_kji, dtype=bool)
    return masks


def _oracle_box_prompts(refs: dict[str, np.ndarray], settings: EvaluationSettings) -> list:
    """``SegmentPrompts`` for the oracle-box protocol (liver first so that tumours can be clipped to it)."""
    from .prompts import SegmentPrompts, SlicePrompts

    prompts = []
    for index, spec in enumerate(settings.structures, start=1):
        ref = refs[spec.name]
        if not ref.any():
            continue
        inside = spec.inside if spec.inside in refs else None
        slices = {
            k: SlicePrompts(boxes_ij=list(boxes), points_pos_ij=[], points_neg_ij=[])
            for k, boxes in oracle_boxes(ref, spec.lesions, settings.box_margin).items()
        }
        prompts.append(SegmentPrompts(name=spec.name, label=index, slices=slices, inside=inside, propagate=False))
    return prompts


def _style_seed(settings: EvaluationSettings, case_id: str, style: str) -> int:
    """A seed for the simulated user's boxes: the same for every method of a run (fair comparison)."""
    return int(np.random.SeedSequence([settings.seed, *(ord(c) for c in f"{case_id}/{style}")]).generate_state(1)[0])


def _run_box_protocol(protocol, volume, refs, predictor, settings, spacing, style: str = "tight",
                      method: str = "liversam", case_id: str = "", review_out: dict | None = None) -> dict[str, dict]:
    """One box-protocol run. one-box goes through the path of ``liversam segment`` with a prompts file:
    the prompts JSON is parsed by :func:`liversam.prompts.parse_prompts` and segmented by
    :func:`liversam.pipeline.segment_volume`."""
    from .dense_crf import crf_for_segments
    from .lesion_rim import LesionRimSettings
    from .pipeline import PipelineSettings, segment_volume
    from .prompts import parse_prompts
    from .propagation import PropagationSettings

    shape = volume.geometry.shape_kji
    if protocol == "oracle-box":
        prompts = _oracle_box_prompts(refs, settings)
        seeds_json = None
    else:
        spacing_ij = (volume.geometry.spacing_mm[0], volume.geometry.spacing_mm[1])
        seeds_json = one_box_prompts_json(refs, settings, style, spacing_ij, _style_seed(settings, case_id, style))
        prompts = parse_prompts(seeds_json, volume.geometry, source="simulated one-box prompts") \
            if seeds_json["segments"] else []
    result = None
    if prompts:
        # Keep each structure whole: the reference liver includes its tumours (labels 1 and 2), so the
        # tumours must not be carved out of the predicted liver as a labelmap export would do.
        propagation = PropagationSettings(intensity_refinement=settings.intensity_refinement)
        crf_names = [p.name for p in prompts if re.sub(r"-\d+$", "", p.name) in settings.crf]
        crf = crf_for_segments(crf_names, prompts) if method != "naive" else {}
        pipeline = PipelineSettings(later_segment_wins=False, propagation=propagation, propagation_method=method,
                                    crf=crf, lesion_rim=LesionRimSettings() if settings.lesion_rim else None)
        result = segment_volume(volume, prompts, predictor, pipeline)
        preds = _segment_masks_by_structure(result, settings.structures, shape)
    else:
        preds = {spec.name: np.zeros(shape, dtype=bool) for spec in settings.structures}
    out = {}
    for spec in settings.structures:
        metrics = structure_metrics(preds[spec.name], refs[spec.name], spacing, lesions=spec.lesions)
        if protocol == "oracle-box":
            metrics["prompted_slices"] = int(refs[spec.name].any(axis=(1, 2)).sum())
        else:
            metrics["seeds"] = len(one_box_seeds(refs[spec.name], spec.lesions, settings.box_margin))
        out[spec.name] = metrics
    if result is not None and protocol == "one-box":
        from .review import build_review_report

        report = build_review_report(result, ct_kji=volume.array_kji)
        for spec in settings.structures:
            out[spec.name]["review"] = review_detection(report, spec.name, preds[spec.name], refs[spec.name])
    if review_out is not None and result is not None:
        review_out["result"] = result
        review_out["preds"] = preds
    return out


WRONG_SLICE_DICE = 0.85  # a slice is wrong when its Dice is below this, or it is present on one side only


def wrong_slices(pred_kji: np.ndarray, ref_kji: np.ndarray, threshold: float = WRONG_SLICE_DICE) -> list[int]:
    """Slices where the prediction is wrong: slice Dice < ``threshold``, or the structure present in only
    one of prediction and reference."""
    inter = (pred_kji & ref_kji).sum(axis=(1, 2))
    p, r = pred_kji.sum(axis=(1, 2)), ref_kji.sum(axis=(1, 2))
    either = (p + r) > 0
    dice = np.where(either, 2.0 * inter / np.maximum(p + r, 1), 1.0)
    return [int(k) for k in np.flatnonzero(either & (dice < threshold))]


def review_detection(report: dict, structure: str, pred_kji: np.ndarray, ref_kji: np.ndarray) -> dict:
    """The review report measured as a detector of wrong slices (:func:`wrong_slices`) of one structure:
    recall = wrong slices flagged / wrong slices, precision = flagged slices that are wrong / flagged
    slices. The flagged slices are the union of the ``flagged_slices`` of the structure's segments
    (``tumor`` and ``tumor-<n>`` both count for ``tumor``)."""
    flagged: set[int] = set()
    items = 0
    for seg in report["segments"]:
        if re.sub(r"-\d+$", "", seg["name"]) == structure:
            flagged.update(int(k) for k in seg["flagged_slices"])
            items += len(seg.get("items", []))
    wrong = set(wrong_slices(np.asarray(pred_kji, bool), np.asarray(ref_kji, bool)))
    hit = len(flagged & wrong)
    return {
        "wrong_slices": len(wrong),
        "flagged_slices": len(flagged),
        "flagged_wrong": hit,
        "recall": hit / len(wrong) if wrong else math.nan,
        "precision": hit / len(flagged) if flagged else math.nan,
        "items": items,
        "scan_items": len(report.get("items", [])),
    }


def _click_predict_fn(predictor, k: int, use_mask_input: bool, boxes: Sequence[Box] = ()) -> Callable:
    from .prompts import SlicePrompts

    def predict(clicks: list[Click], previous_logits):
        prompts = SlicePrompts(
            boxes_ij=list(boxes),
            points_pos_ij=[(c.i, c.j) for c in clicks if c.positive],
            points_neg_ij=[(c.i, c.j) for c in clicks if not c.positive],
        )
        prediction = predictor.predict(k, prompts, mask_logits=previous_logits if use_mask_input else None)
        return prediction.mask_ji, prediction.low_res_logits

    return predict


def _run_clicks_protocol(volume, refs, predictor, settings, spacing, progress: bool) -> dict[str, dict]:
    from .progress import progress_bar as tqdm  # bar on a terminal, lines in a log, nothing with --quiet

    spacing_ji = spacing[1:]
    out = {}
    for spec in settings.structures:
        ref = refs[spec.name]
        ks = [int(k) for k in np.flatnonzero(ref.any(axis=(1, 2)))]
        if settings.max_slices is not None and len(ks) > settings.max_slices:
            rng = np.random.default_rng(settings.seed)
            ks = sorted(int(k) for k in rng.choice(ks, size=settings.max_slices, replace=False))
        start_with_box = settings.click_start == "box"
        boxes = oracle_boxes(ref, spec.lesions, settings.box_margin) if start_with_box else {}
        sessions = []
        for k in tqdm(ks, desc=f"clicks {spec.name}", unit="slice", leave=False, disable=not progress):
            sessions.append(
                simulate_clicks_on_slice(
                    _click_predict_fn(predictor, k, settings.click_mask_input, boxes.get(k, ())),
                    ref[k],
                    max_clicks=settings.max_clicks,
                    k=k,
                    spacing_ji_mm=spacing_ji,
                    thresholds=settings.thresholds,
                    initial_prompt=start_with_box,
                )
            )
        pooled = pooled_dice_per_click(sessions)
        mean_curve = mean_dice_per_click(sessions)
        entry: dict = {
            "evaluated_slices": ks,
            "n_slices": len(ks),
            "reference_slices": int(ref.any(axis=(1, 2)).sum()),
            "dice_per_click_pooled": pooled,
            "dice_per_click_mean": mean_curve,
            "per_slice": [s.to_dict() for s in sessions],
        }
        if start_with_box:
            entry["dice_initial_mean"] = (
                float(np.mean([s.dice_initial for s in sessions])) if sessions else math.nan
            )
            entry["click_start"] = "box"
        for t in settings.thresholds:
            tag = f"{round(t * 100):d}"
            entry[f"noc{tag}_mean"] = (
                float(np.mean([s.noc[float(t)] for s in sessions])) if sessions else math.nan
            )
            entry[f"noc{tag}_pooled"] = (
                first_index_reaching(pooled, t, settings.max_clicks) if sessions else math.nan
            )
            entry[f"reached{tag}_fraction"] = (
                float(np.mean([max(s.dice_per_click) >= t for s in sessions])) if sessions else math.nan
            )
        for n in sorted({1, 3, 5, settings.max_clicks}):
            if n <= settings.max_clicks:
                entry[f"dice_at_{n}_clicks"] = pooled[n - 1] if pooled else math.nan
        out[spec.name] = entry
    return out


# --- driver -------------------------------------------------------------------------------------------------


def evaluate_case(
    case: EvaluationCase, settings: EvaluationSettings, predictor_factory: Callable, progress: bool = False
) -> dict:
    """Evaluate one case with every protocol in ``settings``; returns a JSON-ready dict.

    ``predictor_factory(volume)`` returns a :class:`~liversam.predictor.SlicePredictor` for the (cropped)
    volume; all protocols share it, so slice embeddings are encoded once per case.
    """
    from .axial_orientation import reorient_to_axial
    from .ct_io import check_not_label_mask, read_ct

    started = time.perf_counter()
    volume = read_ct(case.ct_path)
    check_not_label_mask(volume, f"case '{case.case_id}': are its CT and label swapped?")
    label = read_label(case.label_path, volume.geometry, case.ct_path)
    # a CT stored in sagittal or coronal slices is prompted and segmented on its axial slices, as liversam segment
    # does (voxels reordered, none resampled; the label the same way, so every figure is the same as on the file's
    # grid); slice ranges and per-slice figures then number its axial slices
    volume, reorientation = reorient_to_axial(volume)
    if reorientation is not None:
        label = reorientation.to_axial(label)
        log.info("case '%s': the CT is stored in %s slices; evaluated on its axial slices (voxels and label reordered "
                 "the same way, none resampled)", case.case_id, reorientation.input_plane)
    try:
        volume, label, (k0, k1) = crop_slices(volume, label, settings.slice_range)
    except LiverSAMError as exc:
        if reorientation is None:
            raise
        raise LiverSAMError(f"{exc} (the axial slices of a CT stored in {reorientation.input_plane} slices: --slices "
                            "numbers those)") from exc
    spacing = array_spacing_mm(volume.geometry.spacing_mm)
    refs = {spec.name: structure_reference(label, spec) for spec in settings.structures}
    predictor = predictor_factory(volume)
    protocols: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for protocol in settings.protocols:
        t0 = time.perf_counter()
        if protocol == "clicks":
            protocols[protocol] = _run_clicks_protocol(volume, refs, predictor, settings, spacing, progress)
        elif protocol == "oracle-box":
            protocols[protocol] = _run_box_protocol(protocol, volume, refs, predictor, settings, spacing)
        else:
            for style in settings.box_styles:
                for method in settings.propagation_methods:
                    t1 = time.perf_counter()
                    key = run_key(protocol, style, method)
                    protocols[key] = _run_box_protocol(protocol, volume, refs, predictor, settings, spacing,
                                                       style=style, method=method, case_id=case.case_id)
                    timings[key] = time.perf_counter() - t1
            continue
        timings[protocol] = time.perf_counter() - t0
    return {
        "id": case.case_id,
        "ct": str(case.ct_path),
        "label": str(case.label_path),
        "slice_range": [k0, k1],
        "reoriented_from": None if reorientation is None else reorientation.input_plane,  # k: its axial slices
        "shape_kji": list(volume.geometry.shape_kji),
        "spacing_ijk_mm": list(volume.geometry.spacing_mm),
        "seconds": time.perf_counter() - started,
        "seconds_per_protocol": timings,
        "protocols": protocols,
    }


BOX_METRICS = (
    "dice",
    "iou",
    "hd95_mm",
    "assd_mm",
    "lesion_recall",
    "lesion_precision",
)


def _overlap_defined(entry: dict, key: str):
    """``entry[key]``, or None (left out of the mean, counted as undefined) for the Dice / IoU of a structure that
    neither the reference nor the result holds: their 1 by convention says nothing of the method (a slice range
    without tumour read as a perfect tumour result)."""
    if key in ("dice", "iou") and entry.get("reference_voxels") == 0 and entry.get("predicted_voxels") == 0:
        return None
    return entry[key]


def aggregate(case_results: Sequence[dict], settings: EvaluationSettings) -> dict:
    """Mean / median / ... over cases, per protocol, structure and metric (undefined values skipped)."""
    out: dict = {}
    for protocol in run_keys(settings):
        out[protocol] = {}
        for spec in settings.structures:
            entries = [c["protocols"][protocol][spec.name] for c in case_results]
            if protocol == "clicks":
                keys = [
                    k
                    for k in (entries[0] if entries else {})
                    if k.startswith(("noc", "dice_at_", "reached", "dice_initial"))
                ]
                summary = {k: summarize(e[k] for e in entries) for k in keys}
                if entries:
                    summary["dice_per_click_pooled_mean_over_cases"] = (
                        [float(v) for v in np.mean([e["dice_per_click_pooled"] for e in entries], axis=0)]
                        if all(e["dice_per_click_pooled"] for e in entries)
                        else []
                    )
            else:
                keys = [k for k in BOX_METRICS if entries and k in entries[0]]
                summary = {k: summarize(_overlap_defined(e, k) for e in entries) for k in keys}
                reviews = [e["review"] for e in entries if "review" in e]
                if reviews:
                    wrong = sum(r["wrong_slices"] for r in reviews)
                    flagged = sum(r["flagged_slices"] for r in reviews)
                    hit = sum(r["flagged_wrong"] for r in reviews)
                    summary["review"] = {
                        "wrong_slices": wrong, "flagged_slices": flagged, "flagged_wrong": hit,
                        "recall_pooled": hit / wrong if wrong else math.nan,
                        "precision_pooled": hit / flagged if flagged else math.nan,
                        "recall_mean": summarize(r["recall"] for r in reviews).get("mean"),
                        "precision_mean": summarize(r["precision"] for r in reviews).get("mean"),
                        "max_scan_items": max(r["scan_items"] for r in reviews),
                    }
            out[protocol][spec.name] = summary
    return out


def make_predictor_factory(model, cache_mb: float = 1024.0, window=None) -> Callable:
    """A ``volume -> SlicePredictor`` factory around an already loaded model."""
    from .predictor import SlicePredictor
    from .preprocess import WindowSettings

    window = window or WindowSettings()

    def factory(volume: CTVolume):
        return SlicePredictor(model, volume, window=window, cache_mb=cache_mb)

    return factory


def evaluate(
    cases: Sequence[EvaluationCase],
    settings: EvaluationSettings,
    model="litemedsam",
    device: str = "auto",
    cache_mb: float = 1024.0,
    progress: bool = True,
    predictor_factory: Callable | None = None,
    accelerate: str = "plain",
) -> dict:
    """Evaluate ``cases`` and return the full JSON-ready result (settings, per-case results, aggregates).

    ``model`` is a model name / checkpoint path (loaded with :func:`liversam.models.load_model`) or an
    already loaded model; ``predictor_factory`` overrides how the per-case predictor is made.
    """
    from .progress import progress_bar as tqdm  # bar on a terminal, lines in a log, nothing with --quiet

    model_name = model if isinstance(model, str) else getattr(model, "name", type(model).__name__)
    if predictor_factory is None:
        if isinstance(model, str):
            from .models import load_model

            model = load_model(model, device=device, accelerate=accelerate)
        predictor_factory = make_predictor_factory(model, cache_mb=cache_mb)
    resolved_device = str(getattr(model, "device", device))
    from .acceleration import describe_acceleration

    encoders = describe_acceleration(model)  # what embedded the slices: reports name it (it differs between models)
    started = time.perf_counter()
    case_results = []
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
        case_results.append(evaluate_case(case, settings, predictor_factory, progress=progress))
    settings_dict = asdict(settings)
    settings_dict["structures"] = [asdict(s) for s in settings.structures]
    return json_safe(
        {
            "liversam_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": model_name,
            "device": resolved_device,
            "acceleration": encoders,
            "settings": settings_dict,
            "definitions": METRIC_DEFINITIONS,
            "seconds": time.perf_counter() - started,
            "cases": case_results,
            "aggregate": aggregate(case_results, settings),
        }
    )


# --- reporting ----------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def results_markdown(results: dict) -> str:
    """A markdown report: one table per protocol (per case and structure, then mean and median rows)."""
    settings = results["settings"]
    slice_range = settings.get("slice_range")
    lines = [
        f"# LiverSAM evaluation ({results['model']}, {results['device']})",
        "",
        f"LiverSAM {results['liversam_version']}, {results['created']}; "
        f"slices: {'all' if not slice_range else f'{slice_range[0]}:{slice_range[1]}'}; "
        f"box margin {settings['box_margin']} voxels; "
        + (f"organs boxed {settings['organ_seed_at']} of the way through instead of on their largest slice; "
           if settings.get("organ_seed_at") is not None else "")
        + "structures: "
        + ", ".join(f"{s['name']} = labels {tuple(s['labels'])}" for s in settings["structures"])
        + ".",
        "",
    ]
    lines += one_box_summary_markdown(results)
    for protocol in results["aggregate"]:
        lines += [f"## {protocol}", ""]
        if protocol == "clicks":
            thresholds = [f"{round(t * 100):d}" for t in settings["thresholds"]]
            clicks_cols = sorted({1, 3, 5, settings["max_clicks"]})
            columns = [(f"Dice@{n}", f"dice_at_{n}_clicks", 3) for n in clicks_cols]
            columns += [(f"NoC@{t}", f"noc{t}_mean", 2) for t in thresholds]
            box_start = settings.get("click_start") == "box"
            if box_start:
                columns.insert(0, ("Dice box only", "dice_initial_mean", 3))
            header = ["case", "structure", "slices"] + [title for title, _, _ in columns]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for case in results["cases"]:
                for name, e in case["protocols"][protocol].items():
                    row = [case["id"], name, str(e["n_slices"])]
                    row += [_fmt(e.get(key), digits) for _, key, digits in columns]
                    lines.append("| " + " | ".join(row) + " |")
            for stat in ("mean", "median"):
                for name, agg in results["aggregate"][protocol].items():
                    row = [f"**{stat}**", name, ""]
                    row += [_fmt((agg.get(key) or {}).get(stat), digits) for _, key, digits in columns]
                    lines.append("| " + " | ".join(row) + " |")
            start = (
                "the slice's oracle box(es), then corrective clicks" if box_start else "one positive click"
            )
            lines += [
                "",
                f"Start: {start}. Dice@n: Dice pooled over the evaluated slices after n clicks; NoC@t: clicks to "
                f"reach Dice 0.{thresholds[0]}/0.{thresholds[-1]} per slice (cap {settings['max_clicks']}"
                f"{', 0 when the box alone reaches it' if box_start else ''}), mean over slices.",
                "",
            ]
            continue
        header = [
            "case",
            "structure",
            "Dice",
            "IoU",
            "HD95 mm",
            "ASSD mm",
            "lesion recall",
            "lesion precision",
        ]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for case in results["cases"]:
            for name, e in case["protocols"][protocol].items():
                row = [case["id"], name] + [
                    _fmt(e.get(k), 2 if k.endswith("_mm") else 3) for k in BOX_METRICS
                ]
                if "lesion_recall" in e:
                    row[-2] += f" ({e['detected_reference_lesions']}/{e['reference_lesions']})"
                    row[-1] += f" ({e['true_positive_predictions']}/{e['predicted_lesions']})"
                else:
                    row[-2:] = ["", ""]
                lines.append("| " + " | ".join(row) + " |")
        for stat in ("mean", "median"):
            for name, agg in results["aggregate"][protocol].items():
                row = [f"**{stat}**", name] + [
                    _fmt((agg.get(k) or {}).get(stat), 2 if k.endswith("_mm") else 3) if k in agg else ""
                    for k in BOX_METRICS
                ]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def one_box_summary_markdown(results: dict) -> list[str]:
    """One row per case: the Dice of every one-box run side by side (LiverSAM and the naive loop, tight /
    loose / jittered boxes), then the mean. Empty when no one-box run is in ``results``."""
    keys = [k for k in results["aggregate"] if k.startswith("one-box")]
    if not keys:
        return []
    names = [s["name"] for s in results["settings"]["structures"]]
    header = ["case"] + [f"{name} {key}" for key in keys for name in names]
    lines = ["## one-box Dice, all runs", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in results["cases"]:
        row = [case["id"]] + [_fmt(case["protocols"][key][name].get("dice")) for key in keys for name in names]
        lines.append("| " + " | ".join(row) + " |")
    row = ["**mean**"] + [_fmt((results["aggregate"][key][name].get("dice") or {}).get("mean"))
                          for key in keys for name in names]
    lines += ["| " + " | ".join(row) + " |", ""]
    lines += ["## Review flags as a detector of wrong slices", "",
              "Wrong slice: slice Dice < 0.85, or the structure on one side only. Recall = wrong slices flagged / "
              "wrong slices; precision = flagged slices that are wrong / flagged slices.", "",
              "| run | case | structure | wrong | flagged | flagged & wrong | recall | precision | items (scan) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        for case in results["cases"]:
            for name in names:
                r = case["protocols"][key][name].get("review")
                if r:
                    lines.append(f"| {key} | {case['id']} | {name} | {r['wrong_slices']} | {r['flagged_slices']} | "
                                 f"{r['flagged_wrong']} | {_fmt(r['recall'])} | {_fmt(r['precision'])} | "
                                 f"{r['scan_items']} |")
        for name in names:
            r = results["aggregate"][key][name].get("review")
            if r:
                lines.append(f"| {key} | **pooled** | {name} | {r['wrong_slices']} | {r['flagged_slices']} | "
                             f"{r['flagged_wrong']} | {_fmt(r['recall_pooled'])} | {_fmt(r['precision_pooled'])} | "
                             f"max {r['max_scan_items']} |")
    lines.append("")
    return lines


def write_results(results: dict, json_path: str | Path, markdown_path: str | Path | None = None) -> None:
    """Write the JSON result (and optionally the markdown report) atomically."""
    from .atomic_write import write_text_atomically

    write_text_atomically(json_path, json.dumps(results, indent=2, allow_nan=False) + "\n")
    if markdown_path:
        write_text_atomically(markdown_path, results_markdown(results))


__all__ = [
    "PROTOCOLS",
    "EvaluationCase",
    "EvaluationDataError",
    "EvaluationSettings",
    "StructureSpec",
    "aggregate",
    "bounding_box_ij",
    "crop_slices",
    "default_structures",
    "discover_cases",
    "evaluate",
    "evaluate_case",
    "make_predictor_factory",
    "one_box_prompts_json",
    "one_box_seeds",
    "run_key",
    "run_keys",
    "styled_box",
    "oracle_boxes",
    "parse_slice_range",
    "read_label",
    "results_markdown",
    "structure_reference",
    "write_results",
]
