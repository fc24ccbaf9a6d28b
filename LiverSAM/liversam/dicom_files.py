"""Read one DICOM file with pydicom, with or without the DICOM File Format's preamble and File Meta group.

A DICOM file (PS3.10) starts with a 128-byte preamble, the prefix "DICM" and the File Meta group (0002,xxxx), which
names the Transfer Syntax. Older archives, ACR-NEMA style files and some PACS or CD exports have no preamble and
prefix, and sometimes no File Meta group either; 3D Slicer's DICOM module (DCMTK) and GDCM read them. pydicom reads
them only with ``force=True``, which makes a data set of any bytes, so ``force`` is used only for a file whose first
bytes are a plausible data element (:func:`liversam.image_integrity.is_bare_dicom`): a text, NIfTI, PNG, zip or
empty file is never parsed as DICOM.

A data set read without File Meta has no Transfer Syntax UID, which pydicom needs to decode its pixel data:
:func:`with_transfer_syntax` gives it the one its encoding implies (how pydicom read it: implicit or explicit VR,
little or big endian). Encapsulated (compressed) pixel data without File Meta does not say its codec; pydicom
cannot decode it (GDCM, which looks at the codestream, may).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from .image_integrity import has_dicom_prefix, is_bare_dicom

DicomKind = Literal["part10", "bare"]


def dicom_kind(path: str | Path) -> DicomKind | None:
    """"part10" for a file with the "DICM" prefix, "bare" for one without preamble and prefix, None for any other
    file (by its first bytes). Raises OSError (PermissionError) when ``path`` cannot be read."""
    with open(path, "rb") as handle:
        start = handle.read(132)
        size = os.fstat(handle.fileno()).st_size
    if has_dicom_prefix(start):
        return "part10"
    return "bare" if is_bare_dicom(start, size) else None


def read_dicom_file(path: str | Path, stop_before_pixels: bool = False):
    """The pydicom data set of ``path`` (a ``FileDataset``), or None when ``path`` is not a DICOM file or cannot be
    parsed as one. Raises OSError (PermissionError) when it cannot be read: the caller decides what that means."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    kind = dicom_kind(path)
    if kind is None:
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=kind == "bare")
    except PermissionError:
        raise
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        return None
    except Exception:  # noqa: BLE001 - force=True on bytes that only looked like DICOM raises many kinds
        if kind == "part10":
            raise
        return None


def transfer_syntax_of(ds) -> str | None:
    """The Transfer Syntax UID of ``ds``: its File Meta's, else the one its encoding implies for native (not
    encapsulated) pixel data, else None (encapsulated pixel data without File Meta: the codec is not named)."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return meta.TransferSyntaxUID
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        return None
    implicit, little = ds.original_encoding
    if implicit is None:
        return None
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def with_transfer_syntax(ds):
    """``ds`` with a File Meta Transfer Syntax UID when it had none and its encoding tells it (see
    :func:`transfer_syntax_of`), so that pydicom can decode its pixel data. Changes ``ds`` in place; returns it."""
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return ds
    syntax = transfer_syntax_of(ds)
    if syntax is not None:
        if meta is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    return ds
