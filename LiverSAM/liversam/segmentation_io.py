"""Read and write segmentations: Slicer ``.seg.nrrd``, labelmaps (NRRD, NIfTI) and DICOM SEG.

:func:`write_segmentation` and :func:`read_segmentation` pick the format from the file name:

- ``.seg.nrrd``: a 3D Slicer segmentation (written with ``slicerio``): one Slicer segment per
  :class:`Segment` with its name, colour, label value and SNOMED CT terminology; segments that overlap
  go to separate layers (a 4D NRRD, as Slicer stores them). The grid is the CT's exact geometry
  (spacing, origin and direction, LPS).
- ``.nrrd``, ``.nii``, ``.nii.gz`` (and ``.mha`` for reading): a labelmap holding each segment's
  ``label`` (later segments win where segments overlap). NRRD labelmaps also carry the label names in a
  ``LiverSAM_labels`` header field.
- ``.dcm``: a DICOM SEG (see :mod:`liversam.dicom_seg`), which needs the CT's DICOM folder.

Every output is written atomically: on any error nothing is left at the output path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .atomic_write import atomic_path, describe_write_error
from .errors import InputImageError, OutputError
from .geometry import ImageGeometry
from .segmentation import Segment, SegmentationResult, default_color
from .terminology import DEFAULT_LABEL_NAMES, Terminology, terminology_for, terminology_from_slicer_string

logger = logging.getLogger(__name__)

WRITE_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii", ".nii.gz", ".dcm")
READ_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii", ".nii.gz", ".mha", ".dcm")
LABELS_HEADER_KEY = "LiverSAM_labels"


def segmentation_format(path: str | Path) -> str:
    """``"seg.nrrd"``, ``"nrrd"``, ``"nifti"``, ``"mha"``, ``"dicom-seg"`` or ``""`` from the file name."""
    name = Path(path).name.lower()
    if name.endswith(".seg.nrrd"):
        return "seg.nrrd"
    if name.endswith(".nrrd"):
        return "nrrd"
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".mha"):
        return "mha"
    if name.endswith(".dcm"):
        return "dicom-seg"
    return ""


def _check_masks(result: SegmentationResult, path: Path) -> None:
    shape = result.geometry.shape_kji
    for segment in result.segments:
        if segment.mask_kji.shape != shape:
            raise OutputError(
                f"Cannot write '{path}': segment '{segment.name}' has mask shape {segment.mask_kji.shape}, but the "
                f"segmentation grid is {shape} [k, j, i]."
            )
        if not 0 < int(segment.label) < 65536:
            raise OutputError(
                f"Cannot write '{path}': segment '{segment.name}' has label {segment.label}; labels must be 1..65535."
            )


# --- writing ----------------------------------------------------------------------------------------


def write_segmentation(
    result: SegmentationResult,
    path: str | Path,
    reference_dicom: str | Path | Sequence[str | Path] | None = None,
    model_name: str = "",
) -> Path:
    """Write ``result`` to ``path``; the format follows the suffix (see the module docstring).

    ``reference_dicom`` (the CT's DICOM folder, or its files) is required for ``.dcm``. ``model_name`` is recorded as
    provenance (DICOM SEG algorithm parameters, NRRD header). Raises :class:`OutputError` for an unknown
    suffix, a missing reference or a grid mismatch; nothing is left at ``path`` on error.
    """
    path = Path(path)
    fmt = segmentation_format(path)
    if fmt in ("", "mha"):
        raise OutputError(
            f"Unknown segmentation output type: '{path}'. Use one of: {', '.join(WRITE_SUFFIXES)} "
            "(.seg.nrrd for 3D Slicer, .nrrd/.nii/.nii.gz for a labelmap, .dcm for DICOM SEG)."
        )
    _check_masks(result, path)
    model_name = model_name or str(result.provenance.get("model", "") or "")
    if fmt == "dicom-seg":
        if reference_dicom is None:
            raise OutputError(
                f"Writing DICOM SEG '{path}' needs the DICOM series of the CT that was segmented: pass "
                "--reference-dicom DIR (Python: reference_dicom=DIR), or write .seg.nrrd / .nii.gz instead."
            )
        from .dicom_seg import write_dicom_seg

        return write_dicom_seg(result, reference_dicom, path, model_name=model_name)
    if fmt == "seg.nrrd":
        return write_seg_nrrd(result, path, model_name=model_name)
    return write_labelmap(result, path, model_name=model_name)


def _overlaps(a: np.ndarray, b: np.ndarray, slab: int = 16) -> bool:
    """Whether two masks [k, j, i] share a voxel, a few slices at a time (no whole-volume temporary)."""
    return any(np.logical_and(a[k : k + slab], b[k : k + slab]).any() for k in range(0, a.shape[0], slab))


def _assign_layers(segments: list[Segment]) -> list[int]:
    """A layer per segment: the first layer where its label is free and it overlaps no other segment.

    The masks are only read (no copy: the writer's memory on a large CT is the output's array and its bytes)."""
    layers: list[tuple[set[int], list[np.ndarray]]] = []
    assignment = []
    for segment in segments:
        for index, (labels, members) in enumerate(layers):
            if segment.label not in labels and not any(_overlaps(m, segment.mask_kji) for m in members):
                labels.add(segment.label)
                members.append(segment.mask_kji)
                assignment.append(index)
                break
        else:
            layers.append(({segment.label}, [segment.mask_kji]))
            assignment.append(len(layers) - 1)
    return assignment


def _unique_ids(names: list[str]) -> list[str]:
    ids, seen = [], set()
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "Segment"
        candidate, n = base, 1
        while candidate in seen:
            n += 1
            candidate = f"{base}_{n}"
        seen.add(candidate)
        ids.append(candidate)
    return ids


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]+")


def _header_text(text: str) -> str:
    """A header value on one line: a line break or other control character would end the NRRD field early."""
    return _CONTROL_CHARACTERS.sub(" ", str(text)).strip()


def _ascii_or_token(text: str, tokens: dict[str, str]) -> str:
    """``text`` if it is ASCII, else a placeholder (pynrrd writes ASCII only) that :func:`_write_utf8_header`
    replaces by the text's UTF-8 bytes, as 3D Slicer itself writes and reads them."""
    text = _header_text(text)
    if text.isascii():
        return text
    token = f"@@LiverSAM-utf8-{len(tokens)}@@"
    tokens[token] = text
    return token


def _write_utf8_header(path: Path, tokens: dict[str, str]) -> None:
    """Put the UTF-8 text back for the placeholders in the header of the NRRD file ``path``."""
    data = path.read_bytes()
    end = data.find(b"\n\n")  # the blank line between the header and the attached data
    if end < 0:
        raise OutputError(f"Cannot write '{path}': the NRRD writer produced no header.")
    header = data[:end]
    for token, text in tokens.items():
        header = header.replace(token.encode("ascii"), text.encode("utf-8"))
    path.write_bytes(header + data[end:])


def write_seg_nrrd(result: SegmentationResult, path: str | Path, model_name: str = "") -> Path:
    """Write a 3D Slicer ``.seg.nrrd`` (readable by Slicer and ``slicerio``). Returns ``path``.

    Segment names may hold any character: like Slicer, the header stores them as UTF-8."""
    import slicerio

    path = Path(path)
    _check_masks(result, path)
    segments = result.segments
    utf8_tokens: dict[str, str] = {}
    layer_of = _assign_layers(segments)
    n_layers = max(layer_of, default=0) + 1
    max_label = max((s.label for s in segments), default=1)
    dtype = np.uint8 if max_label < 256 else np.uint16
    voxels_kji = np.zeros((n_layers, *result.geometry.shape_kji), dtype=dtype)
    shape_ijk = result.geometry.size_ijk
    full_extent = [0, shape_ijk[0] - 1, 0, shape_ijk[1] - 1, 0, shape_ijk[2] - 1]
    segment_dicts = []
    for segment, layer, segment_id in zip(
        segments, layer_of, _unique_ids([s.name for s in segments]), strict=True
    ):
        voxels_kji[layer][segment.mask_kji] = segment.label
        terminology = terminology_for(segment.name)
        segment_dicts.append(
            {
                "id": segment_id,
                "name": _ascii_or_token(segment.name, utf8_tokens),
                "nameAutoGenerated": False,
                "color": [round(float(c), 6) for c in segment.color],
                "colorAutoGenerated": False,
                "labelValue": int(segment.label),
                "layer": int(layer),
                # Full extent for every segment: older Slicer versions crop a shared layer to the first extent.
                "extent": full_extent if segment.mask_kji.any() else [0, -1, 0, -1, 0, -1],
                "terminology": terminology.slicerio_dict(),
            }
        )
    # slicerio (pynrrd, Fortran order) takes voxels indexed [i, j, k] or [layer, i, j, k].
    voxels = voxels_kji[0].transpose(2, 1, 0) if n_layers == 1 else voxels_kji.transpose(0, 3, 2, 1)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": result.geometry.ijk_to_lps_matrix,
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segment_dicts,
        "LiverSAM_version": __version__,
    }
    if model_name:
        segmentation["LiverSAM_model"] = _ascii_or_token(model_name, utf8_tokens)
    try:
        with atomic_path(path) as tmp:
            slicerio.write_segmentation(str(tmp), segmentation, compression_level=6)
            if utf8_tokens:
                _write_utf8_header(tmp, utf8_tokens)
    except OSError as exc:
        raise OutputError(describe_write_error(path, exc)) from exc
    logger.info("wrote %s (%d segments, %d layer(s))", path, len(segments), n_layers)
    return path


def write_labelmap(result: SegmentationResult, path: str | Path, model_name: str = "") -> Path:
    """Write a labelmap (.nrrd, .nii, .nii.gz) holding each segment's label on the CT grid. Returns ``path``."""
    import SimpleITK as sitk

    from .ct_io import volume_to_sitk

    path = Path(path)
    _check_masks(result, path)
    labels = {}
    for segment in result.segments:
        labels.setdefault(int(segment.label), segment.name)
    overlapping = [
        (a.name, b.name)
        for n, a in enumerate(result.segments)
        for b in result.segments[n + 1 :]
        if a.label != b.label and np.any(a.mask_kji & b.mask_kji)
    ]
    if overlapping:
        logger.info(
            "%s: overlapping segments %s; the later segment's label wins in the labelmap (use .seg.nrrd to keep both)",
            path,
            ", ".join(f"{a}/{b}" for a, b in overlapping),
        )
    image = volume_to_sitk(result.to_labelmap(), result.geometry)
    image.SetMetaData(
        LABELS_HEADER_KEY, ";".join(f"{label}={name}" for label, name in sorted(labels.items()))
    )
    image.SetMetaData("LiverSAM_version", __version__)
    if model_name:
        image.SetMetaData("LiverSAM_model", model_name)
    try:
        with atomic_path(path) as tmp:
            try:
                sitk.WriteImage(image, str(tmp), useCompression=True)
            except RuntimeError as exc:
                raise OutputError(f"Cannot write labelmap '{path}': {str(exc).strip().splitlines()[-1]}") from exc
    except OSError as exc:
        raise OutputError(describe_write_error(path, exc)) from exc
    return path


# --- reading ----------------------------------------------------------------------------------------


def resample_mask(mask_kji: np.ndarray, source: ImageGeometry, target: ImageGeometry) -> np.ndarray:
    """Nearest-neighbour resample of a boolean mask [k, j, i] from grid ``source`` onto ``target``.

    Voxels of ``target`` whose centres fall outside ``source`` are False.
    """
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(mask_kji, dtype=np.uint8))
    source.apply_to_sitk(image)
    reference = sitk.Image([int(s) for s in target.size_ijk], sitk.sitkUInt8)
    target.apply_to_sitk(reference)
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled).astype(bool)


def _place_on_reference(
    result: SegmentationResult, reference: ImageGeometry | None, path: Path
) -> SegmentationResult:
    """Put the masks on ``reference`` (resampling when the grids differ).

    Raises :class:`InputImageError` when the segmentation does not overlap the reference at all (a
    reference of another scan); warns when a segment loses more than 5 % of its volume at the edges.
    """
    if reference is None or result.geometry.is_close(reference, tolerance_mm=1e-3):
        if reference is not None:
            result.geometry = reference
        return result
    logger.info(
        "%s: grid differs from the reference (%s); resampling (nearest neighbour)",
        path,
        result.geometry.describe_difference(reference),
    )
    source_voxel_mm3, target_voxel_mm3 = result.geometry.voxel_volume_mm3, reference.voxel_volume_mm3
    resampled, lost = [], []
    for segment in result.segments:
        before_mm3 = float(segment.mask_kji.sum()) * source_voxel_mm3
        mask = resample_mask(segment.mask_kji, result.geometry, reference)
        after_mm3 = float(mask.sum()) * target_voxel_mm3
        if before_mm3 > 0 and after_mm3 < 0.95 * before_mm3:
            lost.append(f"'{segment.name}' {before_mm3 / 1000:.1f} -> {after_mm3 / 1000:.1f} mL")
        resampled.append(mask)
    if any(s.mask_kji.any() for s in result.segments) and not any(m.any() for m in resampled):
        raise InputImageError(
            f"Segmentation '{path}' does not overlap the reference CT grid at all "
            f"({result.geometry.describe_difference(reference)}; segmentation vs reference). It was made on another "
            "scan or in another frame of reference: give the CT it was made on."
        )
    if lost:
        logger.warning(
            "%s: part of the segmentation lies outside the reference CT: %s", path, "; ".join(lost)
        )
    for segment, mask in zip(result.segments, resampled, strict=True):
        segment.mask_kji = mask
    result.geometry = reference
    return result


def _plan_labels(
    entries: list[tuple[str, Terminology | None, int]], label_names: dict[int, str] | None
) -> list[int]:
    """A unique label per segment: a ``label_names`` match, else the terminology's default, else ``fallback``."""
    by_name = {str(v).strip().lower(): int(k) for k, v in (label_names or {}).items()}
    wanted = []
    for name, terminology, fallback in entries:
        if name.strip().lower() in by_name:
            wanted.append(by_name[name.strip().lower()])
        elif terminology is not None and terminology.default_label:
            wanted.append(terminology.default_label)
        elif terminology_for(name).default_label:
            wanted.append(terminology_for(name).default_label)
        else:
            wanted.append(int(fallback))
    labels, used = [], set()
    for label in wanted:
        if label in used or label < 1:  # several tumours, or a clash: keep them apart
            label = max(used | set(wanted)) + 1
        used.add(label)
        labels.append(label)
    return labels


def _geometry_from_ijk_to_lps(matrix: np.ndarray, size_ijk) -> ImageGeometry:
    m = np.asarray(matrix, dtype=float)
    axes = m[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return ImageGeometry(
        size_ijk=tuple(int(s) for s in size_ijk),
        spacing_mm=tuple(spacing),
        origin_lps=tuple(m[:3, 3]),
        direction_lps=axes / spacing,
    )


def _is_slicer_segmentation(path: Path) -> bool:
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception:  # noqa: BLE001 - not a readable NRRD: let the labelmap reader report it
        return False
    return any(re.match(r"^Segment\d+_(ID|LabelValue|Name)$", key) for key in header)


def _raw_header_fields(path: Path) -> dict[str, str]:
    """The ``key:=value`` fields of an NRRD header, values decoded as UTF-8 (as Slicer writes them).

    pynrrd decodes the header as ASCII and drops every other character ("Läsion" would read "Lsion")."""
    fields: dict[str, str] = {}
    try:
        with open(path, "rb") as handle:
            for line in handle:
                line = line.rstrip(b"\r\n")
                if not line:  # the blank line before the data
                    break
                key, sep, value = line.partition(b":=")
                if sep:
                    try:
                        text = value.decode("utf-8")
                    except UnicodeDecodeError:
                        text = value.decode("latin-1")
                    fields[key.decode("ascii", "ignore")] = text
    except OSError:
        return {}
    return fields


def read_seg_nrrd(path: str | Path, label_names: dict[int, str] | None = None) -> SegmentationResult:
    """Read a 3D Slicer ``.seg.nrrd`` (any layers, any extent) on its own grid.

    Files of Slicer 4.10 and older have no ``SegmentN_Layer`` / ``SegmentN_LabelValue`` fields: as in Slicer's
    reader, segment N is then layer N of a 4D file, with label value 1."""
    import slicerio
    from slicerio.segmentation import terminology_entry_to_string

    path = Path(path)
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # noqa: BLE001 - pynrrd/slicerio raise many types
        raise InputImageError(f"Cannot read Slicer segmentation '{path}': {exc}") from exc
    voxels = segmentation["voxels"]
    if voxels.ndim not in (3, 4):
        raise InputImageError(
            f"'{path}' holds a {voxels.ndim}D array; a Slicer segmentation is 3D or 4D (layers)."
        )
    geometry = _geometry_from_ijk_to_lps(segmentation["ijkToLPS"], voxels.shape[-3:])
    layers_kji = voxels.transpose(2, 1, 0)[np.newaxis] if voxels.ndim == 3 else voxels.transpose(0, 3, 2, 1)
    segment_infos = segmentation.get("segments", [])
    raw_fields = _raw_header_fields(path)
    # slicerio lists the segments in the order of their header index (Segment<N>_...).
    header_indices = sorted(
        {int(m.group(1)) for m in (re.match(r"^Segment(\d+)_", key) for key in raw_fields) if m}
    )
    if len(header_indices) != len(segment_infos):
        header_indices = list(range(len(segment_infos)))
    entries, masks, colors, terminologies = [], [], [], {}
    for index, info in enumerate(segment_infos):
        header_index = header_indices[index]
        raw_name = raw_fields.get(f"Segment{header_index}_Name") or raw_fields.get(f"Segment{header_index}_ID")
        name = str(raw_name or info.get("name") or info.get("id") or f"Segment_{index + 1}")
        label_value = int(info.get("labelValue", 1))
        if "layer" in info:
            layer = int(info["layer"])
        else:  # Slicer <= 4.10: one layer per segment (a 3D file has only layer 0)
            layer = header_index if voxels.ndim == 4 else 0
        if layer >= layers_kji.shape[0]:
            raise InputImageError(
                f"'{path}': segment '{name}' is in layer {layer}, but the file has {layers_kji.shape[0]}."
            )
        masks.append(layers_kji[layer] == label_value)
        terminology = None
        if "terminology" in info:
            terminology = terminology_from_slicer_string(terminology_entry_to_string(info["terminology"]))
        if terminology is not None:
            terminologies[name] = terminology
        colors.append(info.get("color"))
        entries.append((name, terminology, label_value))
    labels = _plan_labels(entries, label_names)
    segments = [
        Segment(
            name=name,
            label=label,
            mask_kji=mask,
            color=tuple(float(c) for c in color[:3]) if color else default_color(name, n),
        )
        for n, ((name, _, _), label, mask, color) in enumerate(
            zip(entries, labels, masks, colors, strict=True)
        )
    ]
    provenance = {"source": str(path), "format": "seg.nrrd", "terminology": terminologies}
    return SegmentationResult(geometry=geometry, segments=segments, provenance=provenance)


def read_labelmap(path: str | Path, label_names: dict[int, str] | None = None) -> SegmentationResult:
    """Read a labelmap (.nrrd, .nii, .nii.gz, .mha): one segment per label value present.

    Names come from ``label_names`` when given (a label it does not name is ``label_<value>``: the defaults are not
    mixed in, so a labelmap whose 2 is the spleen is not called a tumour), else the file's ``LiverSAM_labels`` header,
    else :data:`DEFAULT_LABEL_NAMES` (1 liver, 2 tumor), else ``label_<value>``. Every label named in
    ``label_names`` gets a segment, empty if the label is absent (logged).
    """
    import SimpleITK as sitk

    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputImageError(f"Cannot read labelmap '{path}': {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"'{path}' is not a 3D single-component labelmap (dimension {image.GetDimension()}, "
            f"{image.GetNumberOfComponentsPerPixel()} components)."
        )
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.rint(array)):
            raise InputImageError(
                f"'{path}' holds non-integer voxel values; a labelmap must hold integer labels (0 = background)."
            )
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise InputImageError(f"'{path}' holds negative values; a labelmap must hold labels >= 0.")
    names: dict[int, str] = {}
    if label_names:
        names = {int(k): str(v) for k, v in label_names.items()}
    elif image.HasMetaDataKey(LABELS_HEADER_KEY):
        for item in image.GetMetaData(LABELS_HEADER_KEY).split(";"):
            value, _, name = item.partition("=")
            if value.strip().isdigit() and name:
                names[int(value)] = name
    present = [int(v) for v in np.unique(array) if v != 0]
    label_values = sorted(set(present) | (set(names) if label_names else set()))
    if label_names:
        if absent := sorted(set(names) - set(present)):
            logger.warning("'%s' has no voxel of label(s) %s (%s): written as empty segment(s)", path,
                           ", ".join(map(str, absent)), ", ".join(names[v] for v in absent))  # fmt: skip
        if unnamed := [v for v in present if v not in names]:
            logger.warning("label(s) %s of '%s' are not in the names given: called %s", ", ".join(map(str, unnamed)),
                           path, ", ".join(f"label_{v}" for v in unnamed))  # fmt: skip
    segments = []
    for n, value in enumerate(label_values):
        default = None if label_names else DEFAULT_LABEL_NAMES.get(value)
        name = names.get(value) or default or f"label_{value}"
        segments.append(
            Segment(name=name, label=value, mask_kji=array == value, color=default_color(name, n))
        )
    provenance = {"source": str(path), "format": "labelmap"}
    return SegmentationResult(
        geometry=ImageGeometry.from_sitk(image), segments=segments, provenance=provenance
    )


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM file by its first bytes, with or without the preamble (:func:`liversam.dicom_files.dicom_kind`)."""
    from .dicom_files import dicom_kind

    try:
        return dicom_kind(path) is not None
    except OSError:
        return False


def read_segmentation(
    path: str | Path,
    reference: ImageGeometry | None = None,
    label_names: dict[int, str] | None = None,
) -> SegmentationResult:
    """Read a segmentation (.seg.nrrd, labelmap .nrrd/.nii/.nii.gz/.mha, DICOM SEG) into a :class:`SegmentationResult`.

    With ``reference`` (the CT's geometry) the masks are placed on the CT grid (nearest-neighbour
    resampling when the file's grid differs, e.g. a cropped Slicer segmentation); without it they stay on
    the file's own grid. ``label_names`` maps label values to segment names (labelmaps) or names to the
    label values to use (Slicer and DICOM segmentations). Raises :class:`InputImageError`.
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"Segmentation not found: '{path}'.")
    if path.is_dir():
        raise InputImageError(
            f"'{path}' is a folder; give a segmentation file ({', '.join(READ_SUFFIXES)} or a DICOM SEG file)."
        )
    fmt = segmentation_format(path)
    if fmt == "" and _looks_like_dicom(path):
        fmt = "dicom-seg"
    if fmt == "nrrd" and _is_slicer_segmentation(path):
        fmt = "seg.nrrd"
    if fmt == "dicom-seg":
        from .dicom_seg import read_dicom_seg

        return read_dicom_seg(path, reference=reference, label_names=label_names)
    if fmt in ("seg.nrrd", "nrrd", "nifti", "mha"):
        from .image_integrity import check_image_file

        check_image_file(path)  # a truncated file would otherwise read as a partly empty segmentation
    if fmt == "seg.nrrd":
        result = read_seg_nrrd(path, label_names=label_names)
    elif fmt in ("nrrd", "nifti", "mha"):
        result = read_labelmap(path, label_names=label_names)
    else:
        raise InputImageError(
            f"Unknown segmentation file type: '{path}'. Supported: {', '.join(READ_SUFFIXES)} or a DICOM SEG file."
        )
    return _place_on_reference(result, reference, path)
