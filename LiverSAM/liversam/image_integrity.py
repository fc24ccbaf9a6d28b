"""Is an image file complete? Compare the voxel bytes a file holds with the size its header declares.

ITK's readers fill the voxels missing from a truncated file with zeros and report no error, so a damaged
download would be segmented as if it were fine. :func:`check_image_file` reads the header of a NIfTI
(``.nii``, ``.nii.gz``), NRRD (raw / gzip / bzip2, attached or detached data) or MetaImage (``.mha``,
``.mhd``, raw or zlib-compressed) file, counts the bytes of voxel data (decompressing streams chunk by
chunk, so memory stays small) and raises :class:`~liversam.errors.InputImageError` naming the file when
the data is shorter than declared, the compressed stream is cut or corrupt, or the header is unreadable.
"""

from __future__ import annotations

import bz2
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import InputImageError

CHUNK_BYTES = 8 << 20
_HINT = "The file is truncated or damaged (an interrupted download or copy?); get a complete copy of it."

_NRRD_TYPES = {
    "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2, "int16_t": 2,
    "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2, "uint16_t": 2,
    "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4,
    "uint32_t": 4, "longlong": 8, "long long": 8, "long long int": 8, "signed long long": 8,
    "signed long long int": 8, "int64": 8, "int64_t": 8, "ulonglong": 8, "unsigned long long": 8,
    "unsigned long long int": 8, "uint64": 8, "uint64_t": 8, "float": 4, "double": 8, "block": 1,
}  # fmt: skip
_META_TYPES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


def _damaged(path: Path, what: str) -> InputImageError:
    return InputImageError(f"'{path}' is damaged: {what}. {_HINT}")


def _inflate(handle: BinaryIO, path: Path, wbits: int = 47) -> Iterator[bytes]:
    """Decompressed chunks of a gzip (possibly multi-member) or zlib stream; damage raises InputImageError."""
    inflater = zlib.decompressobj(wbits)
    produced, members, pending = 0, 0, False
    while chunk := handle.read(CHUNK_BYTES):
        while chunk:
            pending = True
            try:
                out = inflater.decompress(chunk)
            except zlib.error as exc:
                raise _damaged(path, f"its compressed data is corrupt after {produced:,} bytes ({exc})") from None
            produced += len(out)
            yield out
            chunk = b""
            if inflater.eof:
                members, pending = members + 1, False
                chunk = inflater.unused_data.lstrip(b"\0")  # next gzip member (padding zeros allowed)
                inflater = zlib.decompressobj(wbits)
    if pending or members == 0:
        raise _damaged(path, f"its compressed data ends early (truncated after {produced:,} decompressed bytes)")


def _count_chunks(chunks: Iterator[bytes], limit: int) -> int:
    """Bytes in ``chunks`` (stops counting past ``limit``)."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            break
    return total


def _count_stream(read: Callable[[int], bytes], path: Path, limit: int) -> int:
    """Bytes produced by ``read`` until EOF (stops counting past ``limit``)."""
    total = 0
    try:
        while total <= limit and (chunk := read(CHUNK_BYTES)):
            total += len(chunk)
    except EOFError:
        raise _damaged(path, f"its compressed data ends early (truncated after {total:,} decompressed bytes)") from None
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise _damaged(path, f"its compressed data is corrupt after {total:,} bytes ({exc})") from None
    return total


def _check_count(path: Path, have: int, expected: int, what: str) -> None:
    if have < expected:
        raise _damaged(
            path,
            f"{what} holds {have:,} bytes of image data but its header declares {expected:,} "
            f"({100.0 * have / max(expected, 1):.1f}% present, truncated)",
        )


# --- NIfTI -------------------------------------------------------------------------------------------------


def _nifti_expected_bytes(header: bytes, path: Path) -> int:
    """vox_offset + voxel bytes declared by a NIfTI-1 or NIfTI-2 header."""
    for endian in "<>":
        if len(header) >= 4 and struct.unpack(endian + "i", header[:4])[0] == 348 and len(header) >= 348:
            dim = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset, minimum = struct.unpack(endian + "f", header[108:112])[0], 352
            break
        if len(header) >= 4 and struct.unpack(endian + "i", header[:4])[0] == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dim = struct.unpack(endian + "8q", header[16:80])
            offset, minimum = struct.unpack(endian + "q", header[168:176])[0], 544
            break
    else:
        raise InputImageError(f"'{path}' is not a NIfTI image (no valid NIfTI header). {_HINT}")
    ndim = int(dim[0])
    pixdim = (
        struct.unpack(endian + "8f", header[76:108]) if minimum == 352 else struct.unpack(endian + "8d", header[104:168])
    )
    spatial = [float(v) for v in pixdim[1 : min(ndim, 3) + 1]]
    if any(not np.isfinite(v) or v == 0 for v in spatial):
        raise InputImageError(
            f"'{path}' declares voxel spacing {spatial} mm (NIfTI pixdim): every spacing must be a non-zero finite "
            "number. The header is damaged; fix the spacing and save it again."
        )
    if not 1 <= ndim <= 7 or any(int(d) < 0 for d in dim[1 : ndim + 1]) or bitpix <= 0:
        raise _damaged(path, f"its NIfTI header is invalid (dim {list(dim)}, bitpix {bitpix})")
    voxels = int(np.prod([max(int(d), 1) for d in dim[1 : ndim + 1]], dtype=np.float64))
    offset = int(offset) if np.isfinite(offset) else 0
    return max(offset, minimum) + voxels * bitpix // 8


def _check_nifti(path: Path, compressed: bool) -> None:
    with open(path, "rb") as handle:
        if compressed:
            chunks = _inflate(handle, path, wbits=31)
            header = b""
            for chunk in chunks:
                header += chunk
                if len(header) >= 540:
                    break
            expected = _nifti_expected_bytes(header[:540], path)
            have = len(header) + _count_chunks(chunks, expected)
        else:
            header = handle.read(540)
            expected = _nifti_expected_bytes(header, path)
            handle.seek(0, 2)
            have = handle.tell()
    _check_count(path, have, expected, "it")


# --- NRRD ---------------------------------------------------------------------------------------------------


def _read_text_header(handle: BinaryIO, path: Path, stop: Callable[[str], bool]) -> list[str]:
    lines = []
    for _ in range(4096):
        raw = handle.readline(1 << 16)
        if not raw:
            break
        line = raw.decode("latin-1").rstrip("\r\n")
        if stop(line):
            lines.append(line)
            break
        lines.append(line)
    else:
        raise _damaged(path, "its header does not end")
    return lines


def _nrrd_fields(lines: list[str]) -> dict[str, str]:
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line or ":=" in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields


def _check_nrrd(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if magic != b"NRRD":
            raise InputImageError(f"'{path}' is not an NRRD file (it starts with {magic!r}). {_HINT}")
        handle.seek(0)
        lines = _read_text_header(handle, path, lambda line: line == "")
        fields = _nrrd_fields(lines)
        try:
            sizes = [int(v) for v in fields["sizes"].split()]
            item = _NRRD_TYPES[fields["type"].lower()]
        except (KeyError, ValueError):
            raise _damaged(path, "its NRRD header lacks valid 'sizes' or 'type' fields") from None
        if fields.get("type", "").lower() == "block":
            item = int(fields.get("block size", fields.get("blocksize", "1")))
        _check_nrrd_geometry(path, fields)
        encoding = fields.get("encoding", "raw").lower()
        expected = int(np.prod(sizes, dtype=np.float64)) * item
        data_file = fields.get("data file", fields.get("datafile"))
        if encoding in ("ascii", "text", "txt") or (data_file and data_file.upper().startswith("LIST")):
            return  # ITK reports short text data itself; lists of files: checked when read
        if data_file:
            target = Path(data_file.split()[0])
            target = target if target.is_absolute() else path.parent / target
            if not target.is_file():
                raise _damaged(path, f"its data file '{target}' is missing")
            data_handle: BinaryIO = open(target, "rb")  # noqa: SIM115 - closed below
        else:
            data_handle = handle
        try:
            _check_nrrd_data(path, data_handle, encoding, expected, fields)
        finally:
            if data_handle is not handle:
                data_handle.close()


def _check_nrrd_geometry(path: Path, fields: dict[str, str]) -> None:
    """Zero, non-finite or linearly dependent axis vectors (``space directions``) or zero ``spacings``."""
    vectors = []
    for part in fields.get("space directions", "").split():
        if part.lower() == "none":
            continue
        try:
            vectors.append([float(v) for v in part.strip("()").split(",")])
        except ValueError:
            raise InputImageError(f"'{path}' has an unreadable NRRD 'space directions' field: {part!r}.") from None
    problem = ""
    if len(vectors) == 3 and all(len(v) == 3 for v in vectors):
        matrix = np.array(vectors)
        lengths = np.linalg.norm(matrix, axis=1)
        if not np.all(np.isfinite(matrix)) or np.any(lengths == 0):
            problem = f"an axis of zero or non-finite length (space directions {vectors}: voxel spacing 0)"
        elif abs(np.linalg.det(matrix / lengths[:, None])) < 1e-6:
            problem = f"axes that are not independent (space directions {vectors}: a non-invertible direction)"
    spacings = [v for v in fields.get("spacings", "").split() if v.lower() != "nan"]
    try:
        if any(float(v) == 0 or not np.isfinite(float(v)) for v in spacings):
            problem = f"voxel spacing 0 or non-finite (spacings {spacings})"
    except ValueError:
        problem = f"unreadable spacings {spacings}"
    if problem:
        raise InputImageError(
            f"'{path}' has {problem}; its voxels cannot be placed in patient space. The header is damaged; "
            "fix it and save the image again."
        )


def _check_nrrd_data(path: Path, handle: BinaryIO, encoding: str, expected: int, fields: dict) -> None:
    skip = int(fields.get("byte skip", fields.get("byteskip", "0")) or 0)
    if encoding == "raw":
        start = handle.tell()
        handle.seek(0, 2)
        have = handle.tell() - start - max(skip, 0)
        _check_count(path, have, expected, "it")
        return
    if encoding in ("gzip", "gz"):
        have = _count_chunks(_inflate(handle, path), expected) - max(skip, 0)
    elif encoding in ("bzip2", "bz2"):
        with bz2.BZ2File(handle, mode="rb") as reader:
            have = _count_stream(reader.read, path, expected) - max(skip, 0)
    else:
        return
    _check_count(path, have, expected, "it")


# --- MetaImage ----------------------------------------------------------------------------------------------


def _check_metaimage(path: Path) -> None:
    with open(path, "rb") as handle:
        lines = _read_text_header(handle, path, lambda line: line.replace(" ", "").lower().startswith("elementdatafile="))
        fields = {}
        for line in lines:
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip().lower()] = value.strip()
        try:
            sizes = [int(v) for v in fields["dimsize"].split()]
            item = _META_TYPES[fields["elementtype"].upper()] * int(fields.get("elementnumberofchannels", "1"))
        except (KeyError, ValueError):
            raise _damaged(path, "its MetaImage header lacks valid DimSize or ElementType") from None
        expected = int(np.prod(sizes, dtype=np.float64)) * item
        data_file = fields.get("elementdatafile", "")
        compressed = fields.get("compresseddata", "false").lower() == "true"
        if data_file.upper() == "LOCAL":
            _check_meta_data(path, handle, compressed, expected)
        elif data_file.upper().startswith("LIST") or "%" in data_file:
            return
        else:
            target = Path(data_file)
            target = target if target.is_absolute() else path.parent / target
            if not target.is_file():
                raise _damaged(path, f"its data file '{target}' is missing")
            with open(target, "rb") as data:
                _check_meta_data(path, data, compressed, expected)


def _check_meta_data(path: Path, handle: BinaryIO, compressed: bool, expected: int) -> None:
    if compressed:
        have = _count_chunks(_inflate(handle, path), expected)
    else:
        start = handle.tell()
        handle.seek(0, 2)
        have = handle.tell() - start
    _check_count(path, have, expected, "it")


# --- entry point --------------------------------------------------------------------------------------------


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _magic(path: Path) -> str:
    with open(path, "rb") as handle:
        start = handle.read(16)
    if not start:
        return "it is empty"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in start):
        return f"it starts with text {start.decode('ascii', 'replace')[:16]!r}"
    return f"it starts with bytes {start[:8].hex(' ')}"


# What a file holds, told by its first bytes: (name of the format, the file name ending it should have).
NIFTI = ("an uncompressed NIfTI image", ".nii")
NIFTI_GZ = ("a gzip-compressed NIfTI image", ".nii.gz")
NRRD = ("an NRRD image", ".nrrd")
METAIMAGE = ("a MetaImage", ".mha")
DICOM = ("a DICOM file", "")
_SUFFIX_FORMATS = {
    ".nii.gz": NIFTI_GZ,
    ".nii": NIFTI,
    ".nrrd": NRRD,
    ".nhdr": NRRD,
    ".mha": METAIMAGE,
    ".mhd": METAIMAGE,
}


def _is_nifti_header(start: bytes) -> bool:
    """NIfTI-1 (sizeof_hdr 348, magic n+1 / ni1) or NIfTI-2 (540, n+2 / ni2), either byte order."""
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", start[:4])[0] if len(start) >= 4 else 0
        if sizeof_hdr == 348 and start[344:347] in (b"n+1", b"ni1"):
            return True
        if sizeof_hdr == 540 and start[4:7] in (b"n+2", b"ni2"):
            return True
    return False


# The value representations of PS3.5 (6.2): an explicit-VR data element names one of them in bytes 4..5.
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
# The groups a DICOM file without preamble starts with: the File Meta group, or the identifying group (0008,xxxx)
# every composite object has (its SOP Class UID, SOP Instance UID, Modality) when it has no File Meta.
_BARE_DICOM_GROUPS = (0x0002, 0x0008)


def is_bare_dicom(start: bytes, size: int) -> bool:
    """``start`` (the first 8 bytes or more of a file of ``size`` bytes) is the start of a DICOM file written without
    the 128-byte preamble and "DICM" prefix (older archives, ACR-NEMA style files, some PACS and CD exports), with or
    without the File Meta group: a little-endian data element tag of group 0x0002 or 0x0008 followed either by an
    explicit VR (two letters of a known VR; the File Meta group is always explicit VR) or, for group 0x0008 only, by
    an implicit-VR 4-byte length that fits in the file (or is undefined), is even (PS3.5 7.1.1) and is 4 for the group
    length (0008,0000) (so a run of zero bytes after a byte 8, as in a raw voxel file, does not pass). DCMTK and GDCM
    read such files too; big endian ones (retired) are not recognised. Text, images, archives and random bytes almost
    never pass."""
    if len(start) < 8:
        return False
    group, element = struct.unpack("<HH", start[:4])
    if group not in _BARE_DICOM_GROUPS:
        return False
    if start[4:6] in _DICOM_VRS:
        return True
    length = struct.unpack("<I", start[4:8])[0]
    if group != 0x0008:
        return False
    if length == 0xFFFFFFFF:
        return True
    return length % 2 == 0 and length <= size - 8 and (element != 0 or length == 4)


def has_dicom_prefix(start: bytes) -> bool:
    """``start`` (the first 132 bytes or more of a file) holds the DICOM File Format's "DICM" prefix at byte 128."""
    return start[128:132] == b"DICM"


def sniff_image_format(path: str | Path) -> tuple[str, str] | None:
    """What ``path`` holds by its content: one of NIFTI, NIFTI_GZ, NRRD, METAIMAGE, DICOM (with or without the
    preamble: :func:`is_bare_dicom`), or None (unknown)."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(544)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return None
    if has_dicom_prefix(start) or is_bare_dicom(start, size):
        return DICOM
    if start.startswith(b"NRRD"):
        return NRRD
    if start.lstrip().lower().startswith((b"objecttype", b"ndims")):
        return METAIMAGE
    if _is_nifti_header(start):
        return NIFTI
    if start.startswith(b"\x1f\x8b"):
        try:
            inner = zlib.decompressobj(31).decompress(start, 348)
        except zlib.error:
            return None
        return NIFTI_GZ if _is_nifti_header(inner) else None
    return None


def _suffix_format(name: str) -> tuple[str, str] | None:
    return next((fmt for suffix, fmt in _SUFFIX_FORMATS.items() if name.endswith(suffix)), None)


def _check_content_matches_name(path: Path) -> None:
    """A known image format under another format's name (e.g. a NIfTI named .nrrd): say what it is."""
    named = _suffix_format(path.name.lower())
    found = sniff_image_format(path)
    if named is None or found is None or found == named:
        return
    if found == DICOM:
        fix = "give the DICOM series' folder as the CT, not a file renamed as an image"
    else:
        fix = f"rename it to end with {found[1]} (or export it again from the tool that made it)"
    raise InputImageError(
        f"'{path}' is named as {named[0]} ({named[1]}) but holds {found[0]}: its name does not match its content; "
        f"{fix}."
    )


def check_image_file(path: str | Path) -> None:
    """Raise :class:`InputImageError` when an image file is empty, truncated or its data is corrupt."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputImageError(f"Cannot read '{path}': {exc.strerror or exc}.") from None
    if size == 0:
        raise InputImageError(f"'{path}' is empty (0 bytes). {_HINT}")
    name = path.name.lower()
    _check_content_matches_name(path)
    try:
        if name.endswith(".nii.gz"):
            if not _is_gzip(path):
                raise InputImageError(
                    f"'{path}' is named .nii.gz but is not gzip-compressed ({_magic(path)}): not a NIfTI image, "
                    "or a damaged one."
                )
            _check_nifti(path, compressed=True)
        elif name.endswith(".nii"):
            _check_nifti(path, compressed=False)
        elif name.endswith(".nrrd") or name.endswith(".nhdr"):
            _check_nrrd(path)
        elif name.endswith(".mha") or name.endswith(".mhd"):
            _check_metaimage(path)
    except PermissionError as exc:
        raise InputImageError(f"Cannot read '{path}': {exc.strerror}.") from None
