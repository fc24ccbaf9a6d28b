"""The names of the files the page downloads, after the CT they segment: ``lits117-ct-liversam.seg.nrrd``.

Every export was called ``liversam.seg.nrrd`` (``liversam-labels.nii.gz``, ``liversam-seg.dcm``), so a second case
overwrote the first in the reader's Downloads folder, or came as "liversam (1).seg.nrrd".
"""

from __future__ import annotations

import re
from pathlib import PurePath

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
# file or folder names that say nothing of the case: the folder above is put in front (examples/lits117/ct.nii.gz ->
# "lits117-ct"; the TotalSegmentator and dcmqi data call their CT "ct" too)
GENERIC_STEMS = {"ct", "image", "img", "volume", "vol", "scan", "data", "input", "series", "dicom"}
MAX_STEM = 80
FALLBACK = "ct"
EXPORTS = {"segnrrd": "-liversam.seg.nrrd", "labelmap": "-liversam-labels.nii.gz", "dicomseg": "-liversam-seg.dcm"}


def sanitise(text: str) -> str:
    """Letters, digits, '.', '_' and '-' only (others become '_'), no leading dots, at most ``MAX_STEM`` long."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    text = re.sub(r"_{2,}", "_", text).strip("._-")
    return text[:MAX_STEM].rstrip("._-")


def _parts(path: str) -> tuple[str, str, str]:
    """(file or folder name, that name without its image suffix, the folder above when the name is a generic one
    such as "ct", else "")."""
    pure = PurePath(str(path).rstrip("/\\") or ".")
    name = pure.name
    lower = name.lower()
    stem = next((name[: -len(s)] for s in IMAGE_SUFFIXES if lower.endswith(s) and len(name) > len(s)), name)
    folder = pure.parent.name if stem.lower() in GENERIC_STEMS else ""
    return name, stem, folder


def case_stem(path: str) -> str:
    """The name of the case a CT file or DICOM folder holds, for file names: its name without the image suffix,
    after its folder's name when it is a generic one ("ct"), sanitised; "ct" when nothing is left."""
    _name, stem, folder = _parts(path)
    return sanitise(f"{folder}-{stem}" if folder else stem) or FALLBACK


def case_title(path: str) -> str:
    """The CT's name in the page's header and messages, by the same rule: its file or folder name, after its folder's
    name when it is a generic one ("lits117/ct.nii.gz", "dcmqi_ct3slice/ct"; two cases called ct.nii.gz were both
    "ct.nii.gz"), else the name alone ("hcc0697.nii.gz")."""
    name, _stem, folder = _parts(path)
    return f"{folder}/{name}" if folder else name or str(path)


def export_names(stem: str) -> dict[str, str]:
    """The download name of each export kind ("segnrrd", "labelmap", "dicomseg") of the case ``stem``."""
    stem = sanitise(stem) or FALLBACK
    return {kind: stem + suffix for kind, suffix in EXPORTS.items()}
