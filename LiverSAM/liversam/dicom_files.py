"""Read one DICOM file with pydicom, with or without the DICOM File Format's preamble and File Meta group, and refuse
one that is cut short or damaged.

A DICOM file (PS3.10) starts with a 128-byte preamble, the prefix "DICM" and the File Meta group (0002,xxxx), which
names the Transfer Syntax. Older archives, ACR-NEMA style files and some PACS or CD exports have no preamble and
prefix, and sometimes no File Meta group either; 3D Slicer's DICOM module (DCMTK) and GDCM read them. pydicom reads
them only with ``force=True``, which makes a data set of any bytes, so ``force`` is used only for a file whose first
bytes are a plausible data element (:func:`liversam.image_integrity.is_bare_dicom`): a text, NIfTI, PNG, zip or
empty file is never parsed as DICOM.

pydicom reads a file cut short without a word: it stops at the end of the file and returns the elements it got (an
element cut in two keeps the bytes it has). A slice whose file lost its end would then be left out of its series
(no SeriesInstanceUID, no Rows: "not an image") or read without its rescale. :func:`read_dicom_file` raises
:class:`DamagedDicomFileError` for such a file, naming it and what to do.

A data set read without File Meta has no Transfer Syntax UID, which pydicom needs to decode its pixel data:
:func:`with_transfer_syntax` gives it the one its encoding implies (how pydicom read it: implicit or explicit VR,
little or big endian). Encapsulated (compressed) pixel data without File Meta does not say its codec; pydicom
cannot decode it (GDCM, which looks at the codestream, may).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from .errors import InputImageError
from .image_integrity import has_dicom_prefix, is_bare_dicom

DicomKind = Literal["part10", "bare"]

# (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_UNDEFINED_LENGTH = 0xFFFFFFFF
# explicit VR (PS3.5 7.1.2): these VRs have 2 reserved bytes and a 4-byte length, the others a 2-byte length
_LONG_LENGTH_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
_SHORT_LENGTH_VRS = (b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                     b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US")  # fmt: skip


class DamagedDicomFileError(InputImageError):
    """A DICOM file that pydicom cannot read whole: cut short (an interrupted copy or download) or damaged.

    ``dataset``: the elements read before the damage, without an element cut in two (None when pydicom could not
    parse the file): what the file still tells, e.g. the series it belongs to."""

    def __init__(self, message: str, dataset=None) -> None:
        super().__init__(message)
        self.dataset = dataset


def _kind(start: bytes, size: int) -> DicomKind | None:
    if has_dicom_prefix(start):
        return "part10"
    return "bare" if is_bare_dicom(start, size) else None


def dicom_kind(path: str | Path) -> DicomKind | None:
    """"part10" for a file with the "DICM" prefix, "bare" for one without preamble and prefix, None for any other
    file (by its first bytes). Raises OSError (PermissionError) when ``path`` cannot be read."""
    with open(path, "rb") as handle:
        return _kind(handle.read(132), os.fstat(handle.fileno()).st_size)


def read_dicom_file(path: str | Path, stop_before_pixels: bool = False):
    """The pydicom data set of ``path`` (a ``FileDataset``), or None when ``path`` is not a DICOM file.

    Raises :class:`DamagedDicomFileError` (an :class:`InputImageError`) for a DICOM file that is cut short or
    damaged: one with the "DICM" prefix that pydicom cannot parse, with an element that runs past the end of the
    file, that holds no data set, or that names an image (or SEG) SOP class and ends before its pixel data; and a
    file without the prefix that names an image (or SEG) SOP class and is cut short so (:func:`header_problem`). Raises OSError (PermissionError) when it cannot be
    read: the caller decides what that means. The file is opened once (its first bytes tell the kind).
    """
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = Path(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        kind = _kind(handle.read(132), size)
        if kind is None:
            return None
        handle.seek(0)
        try:
            ds = pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels, force=kind == "bare")
        except MemoryError:
            raise
        except OSError as exc:
            if exc.errno is not None:  # the disk's or the system's (EIO, ...): the caller's to tell
                raise
            parse_error = exc  # pydicom's own ("No tag to read at file position ...": a sequence cut short)
        except Exception as exc:  # noqa: BLE001 - a damaged file (or, with force=True, any bytes) raises many kinds
            parse_error = exc
        else:
            parse_error = None
        if parse_error is not None:
            if kind == "bare":
                # Its first bytes only looked like a data element (the test is 4 to 6 bytes: any binary file, a
                # stray raw voxel dump, passes it now and then): it may not be DICOM at all, and refusing the
                # folder for it would refuse the good series beside it. Left out, as any file that is no DICOM.
                return None
            problem = f"pydicom cannot parse it ({type(parse_error).__name__}: {one_line(parse_error, 200)})"
            raise DamagedDicomFileError(damaged_message(path, problem)) from None
        # A deflated data set (Deflated Explicit VR Little Endian) is read whole from the file and inflated, so
        # the file's position tells nothing; zlib refuses a deflate stream cut short (a parse error above).
        meta = getattr(ds, "file_meta", None)
        deflated = meta is not None and str(meta.get("TransferSyntaxUID", "") or "") == DeflatedExplicitVRLittleEndian
        stopped_at_pixels = stop_before_pixels and (deflated or handle.tell() < size)
        problem = header_problem(ds, size, stopped_at_pixels)
        if problem is None and stopped_at_pixels and not deflated:
            problem = _pixel_data_problem(handle, ds, size)
    if problem is not None and (kind == "part10" or _pixel_sop_class(ds) is not None):
        # Without the prefix, only a data set that names an image (or SEG) SOP class is surely a damaged DICOM
        # object; other bytes that passed the first-bytes test may be anything (left out as before).
        raise DamagedDicomFileError(damaged_message(path, problem), dataset=_without_cut_element(ds))
    return ds


def _pixel_data_problem(handle, ds, size: int) -> str | None:
    """Read with ``stop_before_pixels``, ``handle`` is at the pixel data element: why it is cut short (its length
    runs past the end of the file), else None. Only its tag and length are read (a few bytes). Encapsulated
    (compressed) pixel data has no length (its items end it): reading the pixel data tells when it is cut.

    The element is read as pydicom read the data set (``original_encoding``: its Transfer Syntax) and, when its
    bytes tell otherwise, as they tell (explicit VR when they name a VR, else implicit): a file whose File Meta names
    the wrong one (pydicom reads it as it is, with a warning) would otherwise show a length that is no length. It is
    told cut short only when every such reading runs past the end of the file: a false "damaged" refuses a good
    series, while a cut this misses is still told when its pixel data is read."""
    implicit, little = ds.original_encoding
    if implicit is None:
        return None
    start = handle.tell()
    head = handle.read(12)
    order = "little" if little else "big"
    if len(head) < 8:
        return None  # header_problem's "ends inside its element" would have told a cut this close
    tag = (int.from_bytes(head[0:2], order) << 16) | int.from_bytes(head[2:4], order)
    if tag not in _PIXEL_DATA_TAGS:
        return None
    readings = {_element_head(head, order, explicit) for explicit in (not implicit, _names_a_vr(head[4:6]))}
    cuts = [(header, length) for header, length in readings if length is not None
            and length != _UNDEFINED_LENGTH and size - start - header < length]  # fmt: skip
    if not cuts or len(cuts) < len(readings):
        return None
    header, length = cuts[0]
    have = size - start - header
    return (
        f"the file ends inside its element {_tag_name(tag)} ({max(have, 0)} of its {length} bytes; the file is "
        f"{size} bytes): it was cut short"
    )


def _names_a_vr(two: bytes) -> bool:
    return two in _LONG_LENGTH_VRS or two in _SHORT_LENGTH_VRS


def _element_head(head: bytes, order: Literal["little", "big"], explicit: bool) -> tuple[int, int | None]:
    """(the element header's size, the value length) of the element ``head`` starts, read with explicit or implicit
    VR; the length is None when ``head`` is too short to hold it."""
    if not explicit:
        return 8, int.from_bytes(head[4:8], order)
    if head[4:6] in _LONG_LENGTH_VRS:
        return 12, int.from_bytes(head[8:12], order) if len(head) >= 12 else None
    return 8, int.from_bytes(head[6:8], order)


def _without_cut_element(ds):
    """``ds`` (a data set read from a file cut short) without the element cut in two, if one was (only the last one
    read can be): the values left are whole. Changes ``ds`` in place; returns it."""
    for raw in list(ds.values()):
        if _is_cut(raw):
            del ds[raw.tag]
    return ds


def _is_cut(raw) -> bool:
    """``raw`` (an element as pydicom read it, not converted) is cut in two: it holds fewer bytes than its length."""
    value, length = getattr(raw, "value", None), getattr(raw, "length", 0)
    return getattr(raw, "is_raw", False) and isinstance(value, bytes) and length != _UNDEFINED_LENGTH \
        and len(value) < length  # fmt: skip


def damaged_message(path: Path, problem: str) -> str:
    """Which file, what is wrong with it, what to do."""
    return (
        f"'{path}' is a damaged DICOM file: {problem}. Replace it with a complete copy (copy it again from its source, "
        "or export the series again), or remove it if it is no part of the series."
    )


def header_problem(ds, size: int, stopped_at_pixels: bool) -> str | None:
    """Why the data set pydicom read from a file of ``size`` bytes is not the whole file's, or None when nothing
    shows it: no data set after the File Meta; an element that runs past the end of the file; an image (by its SOP
    class, or Rows) whose file ends before its pixel data. ``stopped_at_pixels``: it was read with
    ``stop_before_pixels`` and stopped at its pixel data (its header is whole up to there)."""
    if len(ds) == 0:
        return (
            f"pydicom read no element of its data set (the file ends at byte {size}: before its data set, or inside "
            "a sequence or compressed pixel data); it was cut short"
        )
    meta = getattr(ds, "file_meta", None)
    # pydicom keeps the bytes it got of an element cut in two (only the last one read can be); values() gives the
    # elements as read (RawDataElement), without converting them
    for raw in [*(meta.values() if meta is not None else ()), *ds.values()]:
        if _is_cut(raw):
            return (
                f"the file ends inside its element {_tag_name(raw.tag)} ({len(raw.value)} of its {raw.length} bytes; "
                f"the file is {size} bytes): it was cut short"
            )
    if stopped_at_pixels or any(tag in ds for tag in _PIXEL_DATA_TAGS):
        return None
    image = _pixel_sop_class(ds) or ("an image (it has Rows)" if "Rows" in ds else None)
    if image is not None:
        return f"it is {image} but the file ends before its pixel data (at byte {size}): it was cut short"
    return None


def _pixel_sop_class(ds) -> str | None:
    """"a CT Image Storage object" when ``ds`` (or its File Meta) names a SOP class pydicom knows whose objects hold
    pixel data (an image, a DICOM SEG), else None."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    for where, keyword in ((ds, "SOPClassUID"), (meta, "MediaStorageSOPClassUID")):
        try:
            uid = where.get(keyword) if where is not None else None
            name = UID(str(uid)).name if uid else ""
        except Exception:  # noqa: BLE001 - a damaged value (or bytes that only looked like DICOM): no known class
            name = ""
        if "Image Storage" in name or "Segmentation Storage" in name:
            return f"a {name} object"
    return None


def _tag_name(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    keyword = keyword_for_tag(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}){' ' + keyword if keyword else ''}"


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception's message on one line: ITK's file/line prefixes dropped, whitespace collapsed, cut at ``limit``."""
    text = " ".join(str(exc).split())
    # ITK: "Exception thrown in SimpleITK ...: /path/x.cxx:312: ITK ERROR: GDCMImageIO(0x..): what went wrong"
    itk = re.search(r"ITK ERROR: [^:]*\):\s*(.+)", text)
    text = (itk.group(1) if itk else text) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
