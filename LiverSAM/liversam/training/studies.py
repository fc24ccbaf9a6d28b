"""Training studies: where they are (folders, manifests, 3D-IRCADb) and how their labels become masks.

Accepted ``--data``:

- a manifest ``.json`` (a list of objects, or ``{"cases": [...]}``) or ``.csv`` (header ``id,ct,label``);
  each entry has ``ct`` (file or DICOM folder) and ``label`` (labelmap ``.nii.gz``/``.nrrd``, Slicer
  ``.seg.nrrd`` or DICOM SEG), or ``path`` (a study folder in any layout below); optional ``id``.
  Relative paths are relative to the manifest's folder.
- a study folder, or a folder of study folders, where a study folder holds
  - ``ct.<ext>`` + ``label.<ext>`` (labelmap), or
  - ``ct.<ext>`` (or a ``ct/`` DICOM folder) + one ``*.seg.nrrd`` (a Slicer segmentation), or
  - the 3D-IRCADb layout: ``PATIENT_DICOM/`` + ``MASKS_DICOM/liver/`` + ``MASKS_DICOM/livertumor*/``
    (every mask a DICOM series, non-zero = inside; ``liverkyst``/cysts and other organs are ignored);
- a folder of ``<id>_ct.<ext>`` + ``<id>_label.<ext>`` or LiTS ``volume-<n>`` + ``segmentation-<n>`` pairs.

One layout per data folder: study folders beside a study's own files (``ct`` + ``label``) or beside such pairs at
the top level are refused (:func:`check_one_layout`), never half used.

A study becomes a CT volume and two boolean masks on its grid: liver (including tumours by default)
and tumour (all lesions; individual lesions are the 2D connected components on each slice).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputImageError
from ..volume import CTVolume
from .config import LabelConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LABEL_KINDS = ("labelmap", "segmentation", "ircadb")


class TrainingDataError(InputImageError):
    """The training data (folder, manifest, a study's files) cannot be used."""


@dataclass(frozen=True)
class TrainingStudy:
    """One patient's study: the CT (file or DICOM folder) and where its labels are.

    ``kind``: ``labelmap`` (label values), ``segmentation`` (.seg.nrrd / DICOM SEG: segments by name) or
    ``ircadb`` (``label_path`` is the ``MASKS_DICOM`` folder).
    """

    case_id: str
    ct_path: Path
    label_path: Path
    kind: str

    def input_files(self) -> list[Path]:
        """Every file the study is read from (for the cache's content hash)."""
        return _files_of(self.ct_path) + _files_of(self.label_path)

    def ct_hash(self) -> str:
        """SHA-256 over the bytes of the CT's files alone (the same scan under another name or path has the same)."""
        digest = hashlib.sha256()
        for path in _files_of(self.ct_path):
            with open(path, "rb") as handle:
                while chunk := handle.read(4 << 20):
                    digest.update(chunk)
        return digest.hexdigest()

    def content_hash(self) -> str:
        """SHA-256 over the names and bytes of every input file (changes when any input changes)."""
        digest = hashlib.sha256()
        for path in self.input_files():
            digest.update(str(path.name).encode())
            with open(path, "rb") as handle:
                while chunk := handle.read(4 << 20):
                    digest.update(chunk)
        return digest.hexdigest()


def _files_of(path: Path) -> list[Path]:
    """``path``, or the files under it when it is a folder (a DICOM series), sorted."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def check_distinct_cts(studies: list[TrainingStudy]) -> None:
    """Refuse two studies with the same CT (byte for byte): the patient split would put one scan in training and in
    validation or test, and the model would be scored on slices it was trained on (a pair added twice in
    LiverSAMTrain, a case listed twice in a manifest). Only CTs of equal size are read."""
    by_size: dict[int, list[TrainingStudy]] = {}
    for study in studies:
        by_size.setdefault(sum(f.stat().st_size for f in _files_of(study.ct_path)), []).append(study)
    for group in (g for g in by_size.values() if len(g) > 1):
        by_hash: dict[str, list[TrainingStudy]] = {}
        for study in group:
            by_hash.setdefault(study.ct_hash(), []).append(study)
        for same in (s for s in by_hash.values() if len(s) > 1):
            listed = ", ".join(f"'{s.case_id}' ('{s.ct_path}')" for s in same)
            raise TrainingDataError(
                f"Studies {listed} have the same CT: the split would put one scan in training and in validation or "
                "test, and validation would score slices the model trained on. Keep one study per scan (in "
                "LiverSAMTrain, remove the pair added twice; in a manifest, the repeated entry)."
            )


@dataclass
class LoadedStudy:
    """A study in memory: the CT and boolean masks [k, j, i] on its grid."""

    study: TrainingStudy
    volume: CTVolume
    liver_kji: np.ndarray
    tumor_kji: np.ndarray


# --- discovery --------------------------------------------------------------------------------------------


def _find_image(folder: Path, stem: str) -> Path | None:
    """``<stem>.<ext>`` (an image file) or a ``<stem>/`` folder (a DICOM series) in ``folder``, in any letter case
    (``CT.nii.gz``, ``Label.nrrd``; a label was matched in any case, its CT only in lower case)."""
    entries = {p.name.lower(): p for p in sorted(folder.iterdir(), reverse=True)} if folder.is_dir() else {}
    for suffix in IMAGE_SUFFIXES:
        candidate = entries.get(f"{stem}{suffix}")
        if candidate is not None and candidate.is_file() and not candidate.name.lower().endswith(".seg.nrrd"):
            return candidate
    candidate = entries.get(stem)
    return candidate if candidate is not None and candidate.is_dir() else None


def _is_ircadb(folder: Path) -> bool:
    return (folder / "PATIENT_DICOM").is_dir() and (folder / "MASKS_DICOM").is_dir()


def study_from_folder(folder: Path) -> TrainingStudy | None:
    """The study in ``folder`` (layouts in the module docstring), or None when it is not a study folder."""
    if _is_ircadb(folder):
        return TrainingStudy(folder.name, folder / "PATIENT_DICOM", folder / "MASKS_DICOM", "ircadb")
    ct = _find_image(folder, "ct")
    if ct is None:
        return None
    label = _find_image(folder, "label")
    if label is not None and label.is_file():
        return TrainingStudy(folder.name, ct, label, "labelmap")
    segs = sorted(folder.glob("*.seg.nrrd")) + sorted(folder.glob("*seg*.dcm"))
    if len(segs) > 1:
        raise TrainingDataError(
            f"Study folder '{folder}' holds several segmentations ({', '.join(p.name for p in segs)}); keep one, "
            "or list the study in a manifest with its 'label'."
        )
    if segs:
        return TrainingStudy(folder.name, ct, segs[0], "segmentation")
    return None


def incomplete_study_problem(folder: Path) -> str | None:
    """What is missing when ``folder`` holds part of a study (a CT without a label, a label without a CT, half of
    the 3D-IRCADb layout), else None (a complete study, or a folder with no study files at all)."""
    if study_from_folder(folder) is not None:
        return None
    patient, masks = (folder / "PATIENT_DICOM").is_dir(), (folder / "MASKS_DICOM").is_dir()
    if patient != masks:
        have, lack = (
            ("PATIENT_DICOM/", "MASKS_DICOM/ (the masks)")
            if patient
            else ("MASKS_DICOM/", "PATIENT_DICOM/ (the CT)")
        )
        return f"has {have} but no {lack} of the 3D-IRCADb layout"
    ct = _find_image(folder, "ct")
    labels = [
        p for p in sorted(folder.iterdir())
        if p.is_file() and (p.name.lower().startswith("label.") or p.name.lower().endswith(".seg.nrrd"))
    ]  # fmt: skip
    if ct is not None:
        others = sorted(p.name for p in folder.iterdir() if p != ct and not p.name.startswith("."))
        found = f" (found: {', '.join(others[:6])}{', ...' if len(others) > 6 else ''})" if others else ""
        return (
            f"has the CT '{ct.name}' but no label{found}: expected label.<ext> (a labelmap: "
            f"{', '.join(IMAGE_SUFFIXES)}) or one Slicer *.seg.nrrd"
        )
    if labels:
        return f"has the label '{labels[0].name}' but no CT: expected ct.<ext> ({', '.join(IMAGE_SUFFIXES)}) or a ct/ DICOM folder"
    return None


#: top-level file names of the pair layout (``<id>_ct``, ``<id>_label``, LiTS ``volume-<n>``, ``segmentation-<n>``)
PAIR_FILE_NAME = re.compile(r"(.+_ct|.+_label|volume-\w+|segmentation-\w+)", flags=re.IGNORECASE)


def pair_layout_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` named as in the pair layout (paired or not), sorted."""
    from ..evaluate import _strip_suffix

    return [
        p for p in sorted(folder.iterdir())
        if p.is_file() and (split := _strip_suffix(p.name)) is not None and PAIR_FILE_NAME.fullmatch(split[0])
    ]  # fmt: skip


def _listed(paths: list[Path], limit: int = 6) -> str:
    names = [f"'{p.name}'" for p in paths[:limit]]
    return ", ".join(names) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _example_move(data: Path, path: Path) -> str:
    """Where a top-level pair file goes in the study-folder layout, e.g. "'volume-0.nii' -> '<data>/0/ct.nii'"."""
    from ..evaluate import _strip_suffix

    stem, suffix = _strip_suffix(path.name) or (path.name, "")
    lower = stem.lower()
    for prefix, role in (("volume-", "ct"), ("segmentation-", "label")):
        if lower.startswith(prefix):
            return f"e.g. '{path.name}' -> '{data / stem[len(prefix):] / (role + suffix)}'"
    case_id, _, role = stem.rpartition("_")
    return f"e.g. '{path.name}' -> '{data / case_id / (role.lower() + suffix)}'"


def check_one_layout(data: Path, single: TrainingStudy | None, nested: list[TrainingStudy]) -> None:
    """Refuse a data folder that mixes layouts: study folders (``nested``) beside a study's own files at its top level
    (``single``: the folder was read as that one study and the study folders were left out), or beside top-level files
    of the pair layout (``volume-0.nii`` + ``segmentation-0.nii``, ``<id>_ct`` + ``<id>_label``: these were left
    out). Which of them the user meant to train on cannot be told, so nothing is guessed: the message names the
    files and how to arrange them."""
    if not nested:
        return
    folders = [s.ct_path.parent for s in nested]  # ct.<ext>, a ct/ DICOM folder or PATIENT_DICOM: in the study folder
    where = f"{len(nested)} study folder(s) ({_listed(folders)})"
    fix = ("or list every study to train on in a .json/.csv manifest (id, ct, label; docs/TRAINING.md). Nothing was "
           "read or encoded.")  # fmt: skip
    if single is not None:
        own = [single.ct_path, single.label_path]
        raise TrainingDataError(
            f"Data folder '{data}' is a study itself ({_listed(own)} at its top level) and also holds {where}: it is "
            "either one study or a folder of studies, not both. Move the top-level files into a study folder of their "
            f"own (e.g. '{data / 'case1'}/' with {_listed(own)}) or out of the data folder, {fix}"
        )
    loose = pair_layout_files(data)
    if loose:
        example = next((p for p in loose if re.match(r"volume-|.+_ct\.", p.name, flags=re.IGNORECASE)), loose[0])
        raise TrainingDataError(
            f"Data folder '{data}' holds {where} and, at its top level, CT / label files of the pair layout "
            f"({_listed(loose)}), which a folder of study folders does not read: they would be left out of the "
            f"training. Move each pair into a study folder of its own as ct.<ext> + label.<ext> ({_example_move(data, example)}), "
            f"move the files out of the data folder if they are not training data, {fix}"
        )


def _label_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".seg.nrrd") or name.endswith(".dcm"):
        return "segmentation"
    if path.is_dir():
        return "ircadb"
    if name.endswith(".nrrd"):
        from ..segmentation_io import _is_slicer_segmentation

        return "segmentation" if _is_slicer_segmentation(path) else "labelmap"
    return "labelmap"


def _read_manifest(path: Path) -> list[TrainingStudy]:
    base = path.parent
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data.get("cases") if isinstance(data, dict) else data
        else:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
    except (OSError, json.JSONDecodeError, csv.Error, UnicodeDecodeError) as exc:
        raise TrainingDataError(
            f"Cannot read manifest '{path}': {exc}. Fix the file or give a data folder."
        ) from exc
    if not isinstance(rows, list):
        raise TrainingDataError(f"Manifest '{path}': expected a list of studies or {{\"cases\": [...]}}.")

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    studies = []
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise TrainingDataError(f"Manifest '{path}', entry {index}: expected an object, got {row!r}.")
        case_id = str(row.get("id") or "").strip()
        if row.get("path"):
            folder = resolve(row["path"])
            study = study_from_folder(folder) if folder.is_dir() else None
            if study is None:
                raise TrainingDataError(
                    f"Manifest '{path}', entry {index}: '{folder}' is not a study folder (ct + label, ct + "
                    ".seg.nrrd, or PATIENT_DICOM + MASKS_DICOM)."
                )
            studies.append(
                TrainingStudy(case_id or study.case_id, study.ct_path, study.label_path, study.kind)
            )
            continue
        if not row.get("ct") or not row.get("label"):
            raise TrainingDataError(
                f"Manifest '{path}', entry {index}: needs 'ct' and 'label' (or 'path'), got {row!r}."
            )
        ct, label = resolve(row["ct"]), resolve(row["label"])
        for what, p in (("CT", ct), ("label", label)):
            if not p.exists():
                raise TrainingDataError(f"Manifest '{path}', entry {index}: {what} '{p}' does not exist.")
        studies.append(TrainingStudy(case_id or f"case{index:03d}", ct, label, _label_kind(label)))
    return studies


def discover_studies(data: str | Path) -> list[TrainingStudy]:
    """The studies in a manifest or data folder, sorted by id. Raises :class:`TrainingDataError`."""
    data = Path(data).expanduser()
    if not data.exists():
        raise TrainingDataError(
            f"Training data '{data}' does not exist. Give a data folder or a manifest file."
        )
    if data.is_file():
        if data.suffix.lower() not in (".json", ".csv"):
            raise TrainingDataError(f"'{data}' is not a manifest: expected .json or .csv, or a data folder.")
        studies = _read_manifest(data)
    else:
        single = study_from_folder(data)
        subfolders = sorted(p for p in data.iterdir() if p.is_dir())
        if single is not None:
            check_one_layout(data, single, [s for sub in subfolders if (s := study_from_folder(sub))])
            studies = [single]
        else:
            # A study folder with a file missing is an error, not a study silently left out of the training.
            incomplete = [
                (p, problem) for p in [data, *subfolders] if (problem := incomplete_study_problem(p))
            ]
            if incomplete:
                details = "; ".join(f"'{p}' {problem}" for p, problem in incomplete[:5])
                more = f" (and {len(incomplete) - 5} more)" if len(incomplete) > 5 else ""
                raise TrainingDataError(
                    f"Incomplete study folder(s) in '{data}': {details}{more}. Add the missing file(s), or move "
                    "such folders out of the data folder (or list the studies to use in a .json/.csv manifest)."
                )
            studies = [s for sub in subfolders if (s := study_from_folder(sub))]
            check_one_layout(data, None, studies)
            if not studies:
                from ..evaluate import _paired_files

                studies = [
                    TrainingStudy(c.case_id, c.ct_path, c.label_path, "labelmap") for c in _paired_files(data)
                ]
    if not studies:
        raise TrainingDataError(
            f"No training studies found in '{data}'. Accepted: folders with ct.<ext> + label.<ext>, ct + *.seg.nrrd, "
            "3D-IRCADb PATIENT_DICOM + MASKS_DICOM, <id>_ct/<id>_label or volume-<n>/segmentation-<n> pairs, or "
            "a .json/.csv manifest (id, ct, label)."
        )
    ids = [s.case_id for s in studies]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise TrainingDataError(
            f"Duplicate study ids in '{data}': {duplicates}. Give each study a unique id."
        )
    return sorted(studies, key=lambda s: s.case_id)


# --- loading ----------------------------------------------------------------------------------------------


def _names_match(name: str, patterns: tuple[str, ...]) -> bool:
    lower = name.strip().lower()
    return any(p.lower() in lower for p in patterns)


def _is_cyst(name: str) -> bool:
    return bool(re.search(r"cyst|kyst", name, flags=re.IGNORECASE))


def masks_from_segmentation(result, labels: LabelConfig, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Liver and tumour masks from a :class:`SegmentationResult` whose segments are named.

    A segment is tumour when its name contains one of ``labels.tumor_names`` (and no "cyst"/"kyst"), liver
    when it equals/contains one of ``labels.liver_names`` and is not tumour. Raises when no liver is found.
    """
    shape = result.geometry.shape_kji
    liver = np.zeros(shape, dtype=bool)
    tumor = np.zeros(shape, dtype=bool)
    found_liver = False
    for segment in result.segments:
        if _is_cyst(segment.name):
            continue
        if _names_match(segment.name, labels.tumor_names):
            tumor |= segment.mask_kji
        elif _names_match(segment.name, labels.liver_names):
            liver |= segment.mask_kji
            found_liver = True
    if not found_liver:
        names = ", ".join(s.name for s in result.segments) or "(none)"
        raise TrainingDataError(
            f"Segmentation '{source}' has no liver segment (segments: {names}). Name the liver segment 'liver' "
            "or pass --liver-names with its name."
        )
    if labels.liver_includes_tumor:
        liver |= tumor
    return liver, tumor


def _read_mask_series(folder: Path, geometry) -> np.ndarray:
    from ..ct_io import read_ct
    from ..segmentation_io import resample_mask

    mask_volume = read_ct(folder, allow_non_ct=True)
    mask = np.asarray(mask_volume.array_kji) > 0
    if mask_volume.geometry.shape_kji != geometry.shape_kji or not mask_volume.geometry.is_close(
        geometry, 1e-2
    ):
        mask = resample_mask(mask, mask_volume.geometry, geometry)
    return mask


def check_study_ct(study: TrainingStudy, volume: CTVolume, context: str = "") -> None:
    """Refuse a study whose CT (``volume``, read from ``study.ct_path``) looks like a label mask, or does not hold
    Hounsfield units (as ``liversam segment`` refuses it): it would train the model on masks, or on the flat grey
    picture that the CT window makes of such values. ``context`` is added after the study's name (e.g. which cache
    was built from it)."""
    from ..ct_io import check_hounsfield_units, check_not_label_mask

    try:
        check_not_label_mask(
            volume, override_hint=f"are the CT and the label of study '{study.case_id}' swapped? (label: "
            f"'{study.label_path}')"
        )  # fmt: skip
        check_hounsfield_units(volume, override_hint=f"or leave study '{study.case_id}' out of the training data")
    except InputImageError as exc:
        raise TrainingDataError(f"Study '{study.case_id}'{context}: {exc}") from exc


def load_study(study: TrainingStudy, labels: LabelConfig) -> LoadedStudy:
    """Read a study's CT and its liver/tumour masks on the CT grid. Raises :class:`TrainingDataError`."""
    from ..ct_io import read_ct

    found = ""
    volume = read_ct(study.ct_path)
    check_study_ct(study, volume)
    geometry = volume.geometry
    if study.kind == "labelmap":
        from ..evaluate import read_label

        try:
            array = read_label(study.label_path, geometry, study.ct_path)
        except InputImageError as exc:
            raise TrainingDataError(f"Study '{study.case_id}': {exc}") from exc
        liver = np.isin(array, np.asarray(labels.liver_labels))
        tumor = (
            np.isin(array, np.asarray(labels.tumor_labels)) if labels.tumor_labels else np.zeros_like(liver)
        )
        if labels.liver_includes_tumor:
            liver |= tumor
        values = [int(v) for v in np.unique(array)]
        found = f"; the label holds the values {', '.join(map(str, values[:12]))}{', ...' if len(values) > 12 else ''}"
        unused = [v for v in values if v != 0 and v not in labels.liver_labels + labels.tumor_labels]
        if unused and liver.any():
            log.warning("Study '%s': label value(s) %s of '%s' are neither liver %s nor tumour %s and are read as "
                        "background (--liver-labels / --tumor-labels)", study.case_id, ", ".join(map(str, unused[:12])),
                        study.label_path, labels.liver_labels, labels.tumor_labels)  # fmt: skip
    elif study.kind == "segmentation":
        from ..segmentation_io import read_segmentation

        result = read_segmentation(study.label_path, reference=geometry)
        liver, tumor = masks_from_segmentation(result, labels, study.label_path)
    elif study.kind == "ircadb":
        liver_dir = study.label_path / "liver"
        if not liver_dir.is_dir():
            raise TrainingDataError(
                f"3D-IRCADb study '{study.case_id}': '{liver_dir}' is missing (expected MASKS_DICOM/liver)."
            )
        liver = _read_mask_series(liver_dir, geometry)
        tumor = np.zeros_like(liver)
        for folder in sorted(study.label_path.iterdir()):
            if folder.is_dir() and folder.name.lower().startswith("livertumor"):
                tumor |= _read_mask_series(folder, geometry)
        if labels.liver_includes_tumor:
            liver |= tumor
    else:
        raise TrainingDataError(f"Study '{study.case_id}': unknown label kind '{study.kind}'.")
    if not liver.any():
        raise TrainingDataError(
            f"Study '{study.case_id}' ('{study.label_path}') has no liver voxels with the configured labels "
            f"(liver labels {labels.liver_labels}{found if study.kind == 'labelmap' else ''}). Check --liver-labels / "
            "--liver-names."
        )
    return LoadedStudy(study=study, volume=volume, liver_kji=liver, tumor_kji=tumor)
