"""The web app's MRML side: load a CT, check it is one, show masks as segments, prompts as markups, export.

Runs in trame-slicer's ``SlicerApp`` (slicer-core 5.11). Arrays are ``[k, j, i]`` (VTK's point order); the
volume node's IJKToRAS matrix maps them to RAS. Files are written in LPS by Slicer's storage nodes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pydicom.errors
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLSegmentationStorageNode,
    vtkMRMLSliceNode,
    vtkMRMLVolumeArchetypeStorageNode,
    vtkOrientedImageData,
    vtkSegmentationConverter,
    vtkSlicerSegmentationsModuleLogic,
)
from trame_slicer.core.volumes_reader import VolumesReader
from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from . import server_client  # noqa: F401 - puts the checkout's LiverSAM folder on sys.path (liversam, imported below)
from .volume_geometry import ijk_to_ras, server_geometry
from .workflow import SEGMENTS, SlicePrompts

if TYPE_CHECKING:
    from liversam.axial_orientation import AxialReorientation

logger = logging.getLogger("liversam_web")
SEGMENT_COLORS = {"liver": (0.86, 0.47, 0.35), "tumor": (0.35, 0.85, 0.35)}
MAX_FOLDER_FILES = 20000
MIN_AIR_HU = -300.0  # a CT of the abdomen has air (about -1000 HU) around and inside the body


class InputError(ValueError):
    """What the user gave cannot be opened as a CT; the message says which file and what to do."""


def matrix_to_numpy(matrix: vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray) -> vtkMatrix4x4:
    matrix = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volume_ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def volume_array(volume_node) -> np.ndarray:
    """The volume's voxels as a numpy view [k, j, i]."""
    image = volume_node.GetImageData()
    ni, nj, nk = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni)


def list_input_files(path: str) -> list[str]:
    """A file, or every file under a folder (a DICOM series); InputError when there is nothing to read."""
    target = Path(path).expanduser()
    if not str(path).strip():
        raise InputError("Type the path of a CT file (.nii.gz, .nrrd, .mha) or of a DICOM folder first.")
    if not target.exists():
        raise InputError(f"'{target}' does not exist on the server. Check the path (it is read on the machine "
                         "running this app).")
    if target.is_file():
        return [str(target)]
    files = []
    for root, _dirs, names in os.walk(target):
        files += [os.path.join(root, name) for name in sorted(names) if not name.startswith(".")]
        if len(files) > MAX_FOLDER_FILES:
            raise InputError(f"'{target}' holds more than {MAX_FOLDER_FILES} files: choose the folder of one "
                             "DICOM series.")
    if not files:
        raise InputError(f"The folder '{target}' is empty: choose a folder with a DICOM CT series.")
    return files


# DICOM objects that hold no image of a series (a segmentation, a structure set, a report, ...)
NOT_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"}


def dicom_file_series(path: str) -> list[str] | None:
    """One DICOM file typed as the CT: the files of its folder, to read its series from (as ``liversam segment`` reads
    one DICOM file: ``liversam.ct_io.read_ct``, the file's own series from its folder); None when ``path`` is no
    DICOM file (its content, as the core tells it: the "DICM" preamble, or a file without it that starts like a
    DICOM data set). InputError for a DICOM file of no image series (a DICOM SEG given as the CT)."""
    from liversam.dicom_files import DamagedDicomFileError, read_dicom_file
    from liversam.image_integrity import DICOM, sniff_image_format

    target = Path(path).expanduser()
    if not target.is_file() or sniff_image_format(target) != DICOM:
        return None
    try:
        header = read_dicom_file(target, stop_before_pixels=True)
    except (OSError, DamagedDicomFileError):  # a damaged file: reading its folder's series says what is wrong with it
        header = None
    modality = str(header.get("Modality", "") or "").upper() if header is not None else ""
    if modality in NOT_IMAGE_MODALITIES:
        kind = {"SEG": "a DICOM SEG (a segmentation)", "RTSTRUCT": "a DICOM RT structure set"}.get(
            modality, f"a DICOM {modality} object")
        raise InputError(f"'{path}' is {kind}, not an image of a CT series. Open the CT series' folder, or one of "
                         "its image files.")
    return list_input_files(str(target.parent))


@dataclass(frozen=True)
class DicomSource:
    """The DICOM series a CT was read from: what a DICOM SEG of it must reference."""

    folder: str
    series_uid: str
    num_files: int
    # why its slices form no regular grid (a missing slice, uneven spacing, gantry tilt), "" when they do: trame-slicer's
    # reader then interpolates them onto a regular grid, so the CT shown is not the series' images one to one
    irregular: str = ""
    label: str = ""  # "series 3 'Abdomen 1.0 B30f'": how the page names it among others
    # the other DICOM series (or parts of one: another acquisition, orientation) among the files given, set aside
    # for this one: "series 2 'Topogram' (1 file, 512 x 512 x 1; only 1 image, likely a localiser or a dose screen)"
    other_series: tuple[str, ...] = ()
    # every DICOM series among the files given (headers only), the default first, and the one read: the page lists
    # them so that another can be opened without uploading again
    series: tuple[SeriesChoice, ...] = ()
    chosen: SeriesChoice | None = None


# fewer images than this: a localiser (scout), a dose screen or a key image, never opened first when a series with
# more is there (the core sets aside up to 3 images of another orientation in a series: liversam.dicom_series)
MIN_VOLUME_IMAGES = 4
# what a DICOM object that holds no image is, for the series list ("SR: a report (e.g. a dose report), no image")
_NON_IMAGE_KINDS = {"SEG": "a segmentation", "RTSTRUCT": "a structure set", "SR": "a report (e.g. a dose report)",
                    "PR": "a presentation state", "KO": "a key-image note", "DOC": "a document",
                    "RTPLAN": "a treatment plan", "REG": "a registration"}


@dataclass(frozen=True)
class SeriesChoice:
    """One DICOM series among the files given, told from its headers only (``liversam.dicom_series`` groups them:
    by SeriesInstanceUID, localiser images set aside); no pixel is read to list it."""

    key: str  # unique among the series of one list
    number: int | None
    description: str
    modality: str
    files: tuple[str, ...]
    images: int  # its slices: the frames of its image files (a multi-frame file holds a whole volume)
    rows: int | None
    columns: int | None
    is_image: bool
    why_not: str = ""  # why it is not opened first ("" for a CT series of MIN_VOLUME_IMAGES images or more)
    # the core's error naming its damaged file (cut short), "" when its files are whole: it is not opened
    damaged: str = ""

    @property
    def label(self) -> str:
        """"series 3 'Abdomen 1.0 B30f'" (its number and description, as a PACS viewer lists them)."""
        label = f"series {self.number}" if self.number is not None else "a series"
        return f"{label} '{self.description}'" if self.description else label

    @property
    def openable(self) -> bool:
        """An image series of two images or more (one image is no volume; a SEG or a report has none), none of its
        files damaged."""
        return self.is_image and self.images >= 2 and not self.damaged

    def describe(self) -> str:
        """"series 2 'Abdomen S2' (8 files, 512 x 512 x 8)", with why it is not opened first when it is not."""
        count = "1 file" if len(self.files) == 1 else f"{len(self.files)} files"
        what = f"{count}, {self.columns} x {self.rows} x {self.images}" if self.is_image else count
        return f"{self.label} ({what}{'; ' + self.why_not if self.why_not else ''})"


def dicom_series_choices(files: list[str]) -> list[SeriesChoice]:
    """The DICOM series among ``files`` from their headers only (no pixel data read): grouped as the core groups them
    (``liversam.dicom_series.list_dicom_series_files``: SeriesInstanceUID; localiser images set aside), the one to
    open first first: an image series before an object of no image (SEG, SR), a CT series of ``MIN_VOLUME_IMAGES``
    images or more before the others, then the one with the most images (of most pixels), the lowest series number.
    Files that are no DICOM are not in any (files without the DICOM file header are DICOM when they start like a DICOM
    data set: ``liversam.dicom_files``); [] when none is. A series with a damaged file (cut short, its header naming
    the series: ``liversam.dicom_series``) is listed with it (``damaged``, its reason in ``why_not``), not openable;
    the damaged file counts as one of its images, as the core counts it, so that it keeps its place in the order
    (first, it is refused on open naming the file: a smaller series is not opened in its place without a word)."""
    from liversam.dicom_series import NON_IMAGE_MODALITIES, list_dicom_series_files
    from liversam.errors import InputImageError

    try:
        infos = list_dicom_series_files(files)
    except InputImageError as exc:  # a file removed meanwhile, unreadable, or damaged (cut short: a slice short)
        raise InputError(str(exc)) from None
    except Exception:  # noqa: BLE001 - a header the core cannot take: trame-slicer's reader reads the files whole
        logger.warning("the DICOM series could not be told apart from their headers; reading the files whole",
                       exc_info=True)
        return []
    choices: list[tuple[SeriesChoice, str]] = []  # with why it is not opened first, its damage left aside
    for info in infos:
        images = sum(_frames(header) for header in info.headers) if info.is_image else len(info.files)
        images += len(info.damaged)
        if not info.is_image:
            if info.modality in NON_IMAGE_MODALITIES:
                kind = _NON_IMAGE_KINDS.get(info.modality, "a non-image object")
                why = f"{info.modality}: {kind}, no image"
            elif any("LOCALIZER" in [str(v).upper() for v in (h.get("ImageType") or [])] for h in info.headers):
                why = "localiser (scout) images only"
            else:
                why = "no image"
        elif info.modality != "CT":
            why = f"modality {info.modality or 'unknown'}, not CT"
        elif images < MIN_VOLUME_IMAGES:
            why = f"only {images} image{'' if images == 1 else 's'}, likely a localiser or a dose screen"
        else:
            why = ""
        damaged_files = [damage.path for damage in info.damaged]
        shown_why = (f"damaged DICOM file '{damaged_files[0].name}'"
                     + (f" and {len(damaged_files) - 1} more" if len(damaged_files) > 1 else "")
                     + " (cut short)") if damaged_files else why
        choices.append((SeriesChoice("", info.series_number, info.description.strip(), info.modality,
                                     tuple(str(f) for f in (*info.files, *damaged_files)), images, info.rows,
                                     info.columns, info.is_image, shown_why, info.damaged_message()), why))
    choices.sort(key=lambda pair: (not pair[0].is_image, bool(pair[1]), pair[0].modality != "CT", -pair[0].images,
                                   -((pair[0].rows or 0) * (pair[0].columns or 0)),
                                   pair[0].number if pair[0].number is not None else 1 << 30))
    return [dataclasses.replace(choice, key=str(index)) for index, (choice, _) in enumerate(choices)]


def pick_series(choices: list[SeriesChoice] | tuple[SeriesChoice, ...], what: str,
                 series_of: str | None) -> SeriesChoice:
    """The series to open: the one holding ``series_of`` (a DICOM file typed), else the first image series."""
    if series_of is not None:
        typed = os.path.abspath(series_of)
        holding = [c for c in choices if c.is_image and typed in map(os.path.abspath, c.files)]
        if not holding:
            raise InputError(f"{what} could not be read: '{Path(series_of).name}' belongs to no image series LiverSAM "
                             "can read in its folder. Open the CT series' folder instead.")
        return holding[0]
    images = [c for c in choices if c.is_image]
    if not images:
        found = "; ".join(c.describe() for c in choices[:6]) + ("; ..." if len(choices) > 6 else "")
        raise InputError(f"{what} holds no DICOM image series, only {found}. Choose the folder of a CT series (files "
                         "with pixel data), or a .nii.gz / .nrrd file.")
    return images[0]


def _add_segment(node: vtkMRMLSegmentationNode, name: str, color) -> None:
    """An empty segment with the SNOMED CT terminology ``liversam segment`` and the DICOM SEG give it (a .seg.nrrd
    written from the page said "Tissue" for both), its name and colour marked as chosen, not generated."""
    from liversam.terminology import terminology_for

    segmentation = node.GetSegmentation()
    segmentation.AddEmptySegment(name, name, [float(c) for c in color])
    segment = segmentation.GetSegment(name)
    segment.SetTerminology(terminology_for(name).slicer_string())
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)


def load_ct(slicer_app, files: list[str], what: str) -> vtkMRMLScalarVolumeNode:
    """Load ``files`` (one image file or the files of DICOM series) and keep the largest 3D scalar volume."""
    return load_ct_with_source(slicer_app, files, what)[0]


def _load_volumes(slicer_app, files: list[str]) -> list[tuple[object, list[str] | None]]:
    """Every volume in ``files`` with the DICOM files it was read from (None for an image file).

    DICOM files are split into series the way trame-slicer's reader splits them (series, acquisition,
    image type, orientation), each series loaded on its own so the app knows which one it shows.
    """
    if not VolumesReader.contains_dcm_volume(files):
        return [(v, None) for v in slicer_app.io_manager.load_volumes(files) if v is not None]
    loaded = []
    for group in VolumesReader.split_volumes(files):
        loaded += [(v, list(group)) for v in slicer_app.io_manager.load_volumes(list(group)) if v is not None]
    return loaded


def _dicom_source(files: list[str], others: tuple[str, ...] = (), series: tuple[SeriesChoice, ...] = (),
                  chosen: SeriesChoice | None = None) -> DicomSource | None:
    try:
        header = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
    except (OSError, pydicom.errors.InvalidDicomError):
        return None
    uid = str(header.get("SeriesInstanceUID", "") or "")  # empty in some anonymised series: the export says so
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    label = chosen.label if chosen is not None else _series_label(files)
    return DicomSource(folder, uid, len(files), _irregularity(files), label, others, series, chosen)


def _series_label(files: list[str]) -> str:
    """How a reader knows a DICOM series: "series 3 'Abdomen 1.0 B30f'" (its number and description, as a PACS
    viewer lists them), from its first file; "a series" when it has neither."""
    try:
        header = pydicom.dcmread(files[0], stop_before_pixels=True, force=True,
                                 specific_tags=["SeriesNumber", "SeriesDescription"])
    except Exception:  # noqa: BLE001 - a label only: a file pydicom cannot read gets none
        return "a series"
    number = str(header.get("SeriesNumber", "") or "").strip()
    description = str(header.get("SeriesDescription", "") or "").strip()
    label = f"series {number}" if number else "a series"
    return f"{label} '{description}'" if description else label


def _volume_label(volume, files: list[str]) -> str:
    """An other series set aside: "series 2 'Topogram' (1 file, 512 x 512 x 1)"."""
    image = volume.GetImageData()
    dims = " x ".join(str(d) for d in image.GetDimensions()) if image is not None else "no image"
    count = "1 file" if len(files) == 1 else f"{len(files)} files"
    return f"{_series_label(files)} ({count}, {dims})"


def _irregularity(files: list[str]) -> str:
    """Why the slices of the DICOM series in ``files`` form no regular orthogonal grid (the core's own check, headers
    only: ``liversam.dicom_series.sort_series``), "" when they do."""
    from liversam.dicom_series import list_dicom_series_files, sort_series
    from liversam.errors import InputImageError

    try:
        series = [info for info in list_dicom_series_files(files) if info.is_image]
        if not series or any(_frames(header) > 1 for header in series[0].headers):
            return ""  # an enhanced (multi-frame) CT holds its volume in one file: no slice grid to check here
        sorted_series = sort_series(series[0], os.path.dirname(os.path.abspath(files[0])))
    except InputImageError as exc:  # e.g. images of two sizes: whatever the reader made of them, no SEG fits it
        return str(exc)
    return "" if sorted_series.regular else sorted_series.problem


def _frames(header) -> int:
    try:
        return int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _check_complete(path: str, what: str) -> None:
    """InputError when an image file is empty, truncated or corrupt (liversam's own check, as ``liversam segment``
    makes it): Slicer's readers fill what is missing with zeros and say nothing."""
    from liversam.errors import InputImageError
    from liversam.image_integrity import check_image_file

    if not Path(path).name.lower().endswith((".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")):
        return  # not an image file's name: the readers' refusal says what it is
    try:
        check_image_file(path)
    except InputImageError as exc:  # its message names the file by its path here: by what the reader knows instead
        message = str(exc)
        raise InputError(message.replace(f"'{path}'", what) if f"'{path}'" in message else f"{what}: {message}") from None


def load_ct_with_source(slicer_app, files: list[str], what: str, series_of: str | None = None,
                        choices: list[SeriesChoice] | tuple[SeriesChoice, ...] | None = None,
                        chosen: SeriesChoice | None = None) -> tuple[vtkMRMLScalarVolumeNode, DicomSource | None]:
    """Load ``files`` and keep the largest 3D scalar volume -> (volume, its DICOM series or None).

    DICOM files are sorted into series from their headers (``dicom_series_choices``, or ``choices`` when the caller
    has them) and only one series is read: ``chosen``, else the one holding ``series_of`` (one DICOM file among
    ``files``, typed as the CT), else the first (a CT series with the most images). Every series was read, pixels
    and all, to keep the largest: a CD-ROM export of many series took that memory and time. Files with no DICOM
    file header are sorted into their series by the core too; when trame-slicer's reader fails on them, InputError
    says so.

    Nothing stays in the scene when the input is not a CT (InputError says why, naming ``what``), nor when reading
    it fails in any other way (a MemoryError while checking it: its volume stayed in the scene).
    """
    scene = slicer_app.scene
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        return _load_ct_with_source(slicer_app, files, what, series_of, choices, chosen)
    except BaseException:
        try:
            _remove_new_nodes(scene, before)
        except Exception:  # noqa: BLE001 - the reader is told the error of the read (an InputError says why)
            logger.exception("could not take the nodes of %s out of the scene again", what)
        raise


def _without_file_header(files: list[str]) -> list[str]:
    """The DICOM files among ``files`` without the DICOM file header (no "DICM" preamble), which the core reads and
    trame-slicer's reader (ITK's, GDCM or DCMTK) often does not."""
    from liversam.dicom_files import dicom_kind

    def bare(path: str) -> bool:
        try:
            return dicom_kind(path) == "bare"
        except OSError:
            return False

    return [path for path in files if bare(path)]


def _load_ct_with_source(slicer_app, files: list[str], what: str, series_of: str | None,
                         choices: list[SeriesChoice] | tuple[SeriesChoice, ...] | None,
                         chosen: SeriesChoice | None) -> tuple[vtkMRMLScalarVolumeNode, DicomSource | None]:
    """``load_ct_with_source`` but for taking its new nodes out of the scene again when it raises."""
    scene = slicer_app.scene
    dicom_input = VolumesReader.contains_dcm_volume(files)
    if len(files) == 1 and not dicom_input:
        _check_complete(files[0], what)  # a truncated file would open as a volume grey past its end
    if dicom_input and chosen is None:
        choices = dicom_series_choices(files) if choices is None else choices
        chosen = pick_series(choices, what, series_of) if choices else None
    if chosen is not None and chosen.damaged:  # (the page's series list marks it, and offers the others)
        raise InputError(f"{what} has a damaged DICOM file: {chosen.damaged}")
    choices = tuple(choices or ()) if chosen is not None else ()
    loaded = []
    try:
        loaded = _load_volumes(slicer_app, list(chosen.files) if chosen is not None else files)
    except Exception as exc:  # noqa: BLE001 - the readers raise many kinds; the user gets one clear message
        read = list(chosen.files) if chosen is not None else files
        if bare := _without_file_header(read):
            raise InputError(
                f"{what} could not be read as an image: {len(bare)} of its {len(read)} DICOM files have no DICOM file "
                f"header (no \"DICM\" preamble; e.g. '{Path(bare[0]).name}'), which the viewer's reader (ITK) does "
                "not read reliably. Rewrite them as standard DICOM files (e.g. DCMTK's dcmconv IN OUT, file by file), "
                "or segment the series with the liversam command, which reads them "
                f"({type(exc).__name__}: {exc})."
            ) from None
        raise InputError(f"{what} could not be read as an image ({type(exc).__name__}: {exc}).") from None
    volumes = [v for v, _ in loaded]
    candidates = [v for v in volumes if v.IsA("vtkMRMLScalarVolumeNode") and not v.IsA("vtkMRMLLabelMapVolumeNode")
                  and v.GetImageData() is not None and v.GetImageData().GetNumberOfScalarComponents() == 1]
    if series_of is not None and chosen is None:  # (DICOM files the core could not group: read whole)
        groups = {id(v): group or [] for v, group in loaded}
        candidates = [v for v in candidates if os.path.abspath(series_of) in map(os.path.abspath, groups[id(v)])]
        if not candidates:
            raise InputError(f"{what} could not be read: '{Path(series_of).name}' belongs to no image series LiverSAM "
                             "can read in its folder. Open the CT series' folder instead.")
    if not candidates:
        if len(files) > 1:
            raise InputError(f"{what} has no DICOM image series or image file LiverSAM can read. Choose the "
                             "folder of one CT series (files with pixel data), or a .nii.gz / .nrrd file.")
        if volumes:
            raise InputError(f"{what} is a colour or vector image, not a CT. Open a CT volume in Hounsfield units.")
        raise InputError(f"{what} is not an image LiverSAM can read. Open a CT as .nii / .nii.gz / .nrrd / "
                         ".mha / .mhd or a DICOM folder.")
    volume = max(candidates, key=lambda v: int(np.prod(v.GetImageData().GetDimensions())))
    check_ct(volume, what)
    # the other series, then the parts of the one read set aside (another acquisition or orientation in it)
    others = tuple(c.describe() for c in choices if c is not chosen)
    others += tuple(_volume_label(v, group) for v, group in loaded if v is not volume and group)
    for other in volumes:
        if other is not volume:
            scene.RemoveNode(other)
    dicom_files = next(group for v, group in loaded if v is volume)
    return volume, (_dicom_source(dicom_files, others, choices, chosen) if dicom_files else None)


def check_ct(volume, what: str) -> None:
    dims = volume.GetImageData().GetDimensions()
    if min(dims) < 2:
        raise InputError(f"{what} is a single 2D image ({dims[0]} x {dims[1]}), not a CT volume. Open a 3D CT.")
    low, high = volume.GetImageData().GetScalarRange()
    if low > MIN_AIR_HU or high - low < 200:
        raise InputError(f"{what} does not look like a CT in Hounsfield units: its values run from {low:g} to "
                         f"{high:g}, while a CT has air near -1000 HU. Open an abdominal CT (not MRI, not a mask).")


def reorient_volume_to_axial(volume) -> AxialReorientation | None:
    """A CT stored in sagittal or coronal slices whose axes each follow a patient axis: its voxels reordered in the
    node onto axial slices (``liversam.axial_orientation``: no interpolation, each voxel keeps its value and its
    place in patient space), so that it is shown, prompted and propagated on axial slices like any CT. Returns how
    (exports go back onto the file's own grid with it), or None for an axial or an oblique CT (left as it is)."""
    # liversam's numpy-only modules, from this checkout (server_client put its LiverSAM folder on sys.path)
    from liversam.axial_orientation import axial_reorientation
    from liversam.geometry import ImageGeometry

    matrix = volume_ijk_to_ras(volume)
    ni, nj, nk = volume.GetImageData().GetDimensions()
    server = server_geometry(matrix)
    geometry = ImageGeometry(size_ijk=(ni, nj, nk), spacing_mm=server.spacing, origin_lps=server.origin_lps,
                             direction_lps=np.reshape(server.direction_lps, (3, 3)))
    reorientation = axial_reorientation(geometry)
    if reorientation is None:
        return None
    axial_array = reorientation.to_axial(volume_array(volume))
    image = vtkImageData()
    ai, aj, ak = reorientation.axial_geometry.size_ijk
    image.SetDimensions(ai, aj, ak)
    # to_axial made a copy: VTK uses it as it is (numpy_to_vtk keeps a reference to it with the VTK array)
    image.GetPointData().SetScalars(numpy_to_vtk(axial_array.ravel(), deep=False))
    volume.SetIJKToRASMatrix(numpy_to_matrix(reorientation.axial_geometry.ijk_to_ras_matrix))
    volume.SetAndObserveImageData(image)
    return reorientation


def remove_volume(scene, volume) -> None:
    """Take a volume read by ``load_ct_with_source`` out of the scene again, with its display and storage nodes."""
    _remove_with_display(scene, volume)


def _remove_with_display(scene, node) -> None:
    """Take ``node`` out of the scene with its display and storage nodes: those of a node already taken out too
    (found by the ids it keeps: they were left in the scene when it went first), each removal on its own."""
    if node is None:
        return
    ids = [node.GetNthDisplayNodeID(n) for n in range(node.GetNumberOfDisplayNodes())] \
        if node.IsA("vtkMRMLDisplayableNode") else []
    ids += [node.GetNthStorageNodeID(n) for n in range(node.GetNumberOfStorageNodes())] \
        if node.IsA("vtkMRMLStorableNode") else []
    # (by id: a node out of the scene no longer finds the nodes it refers to)
    found = [scene.GetNodeByID(each) for each in ids if each]
    errors = []
    for each in [node, *found]:
        try:
            if each is not None and scene.IsNodePresent(each):
                scene.RemoveNode(each)
        except Exception as exc:  # noqa: BLE001 - the others go all the same; the first error is raised after
            errors.append(exc)
    if errors:
        raise errors[0]


def _remove_new_nodes(scene, before: set[str]) -> None:
    new = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    for node in new:
        if node is not None and node.GetID() not in before and scene.IsNodePresent(node):
            scene.RemoveNode(node)


def oriented_image(mask_kji: np.ndarray, ijk_to_ras_matrix: np.ndarray) -> vtkOrientedImageData:
    image = vtkOrientedImageData()
    nk, nj, ni = mask_kji.shape
    image.SetDimensions(ni, nj, nk)
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras_matrix))
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(mask_kji, dtype=np.uint8).ravel(), deep=True))
    return image


class SceneContent:
    """The CT, the liver/tumour segmentation and the prompt markups of the current case."""

    def __init__(self, slicer_app, volume, dicom: DicomSource | None = None,
                 reorientation: AxialReorientation | None = None) -> None:
        self.app = slicer_app
        self.scene = slicer_app.scene
        self.volume = volume
        self.dicom = dicom  # the DICOM series the CT was read from (a DICOM SEG references it)
        # a sagittal / coronal file shown on its axial slices (reorient_volume_to_axial): exports go back to its grid
        self.reorientation = reorientation
        self.ijk_to_ras = volume_ijk_to_ras(volume)
        self.array = volume_array(volume)
        self.shape_kji = tuple(int(s) for s in self.array.shape)
        self._markups: list = []
        before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        try:  # (nothing of it stays in the scene when it cannot be made: a failed open leaves the scene as it was)
            self.segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
            assert isinstance(self.segmentation, vtkMRMLSegmentationNode)
            self.segmentation.CreateDefaultDisplayNodes()
            self.segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            for name in SEGMENTS:
                _add_segment(self.segmentation, name, SEGMENT_COLORS[name])
            display = self.segmentation.GetDisplayNode()
            display.SetOpacity2DFill(0.45)
        except BaseException:
            try:
                _remove_new_nodes(self.scene, before)
            except Exception:  # noqa: BLE001 - the error that stopped it is the one raised
                logger.exception("could not take a segmentation that could not be made out of the scene")
            raise

    def remove(self) -> None:
        """Take the case out of the scene: its markups, its segmentation and the CT, with their display and storage
        nodes. Each on its own: one failing to go leaves the others removed all the same (the first error is raised
        after)."""
        errors = []
        for node in [*self._markups, self.segmentation, self.volume]:
            try:
                _remove_with_display(self.scene, node)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        self._markups = []
        if errors:
            raise errors[0]

    # --- masks -----------------------------------------------------------------------------------------
    def show_mask(self, segment: str, mask_kji: np.ndarray, surface: bool = False) -> None:
        logic = vtkSlicerSegmentationsModuleLogic
        logic.SetBinaryLabelmapToSegment(oriented_image(mask_kji, self.ijk_to_ras), self.segmentation, segment,
                                         logic.MODE_REPLACE, None)
        # a layer of its own: sharing one with the other segment, its 2D fill was drawn over black (an opaque brown
        # that hid the CT and the lesions under the liver) until an export split the layers
        self.segmentation.GetSegmentation().SeparateSegmentLabelmap(segment)
        if surface:
            self.segmentation.CreateClosedSurfaceRepresentation()

    def segment_mask(self, segment: str) -> np.ndarray:
        """The segment as the scene holds it, resampled to the CT's grid [k, j, i] (used by exports and tests)."""
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{segment}-export")
        try:
            ids = _string_array([segment])
            vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(self.segmentation, ids, labelmap,
                                                                          self.volume)
            return volume_array(labelmap) > 0
        finally:
            self.scene.RemoveNode(labelmap)

    # --- prompts ---------------------------------------------------------------------------------------
    def show_prompts(self, prompts: dict[str, dict[int, SlicePrompts]]) -> None:
        """Rebuild the markups from the prompts: an ROI per box (one slice thick), green + / red - points."""
        for node in self._markups:
            if self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        self._markups = []
        positive = self._fiducials("positive points", (0.2, 0.9, 0.2))
        negative = self._fiducials("negative points", (0.95, 0.2, 0.2))
        spacing_k = float(np.linalg.norm(self.ijk_to_ras[:3, 2]))
        for segment, by_slice in prompts.items():
            for k, slice_prompts in by_slice.items():
                for n, (i0, j0, i1, j1) in enumerate(slice_prompts.boxes):
                    roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{segment} box k={k} #{n + 1}")
                    assert isinstance(roi, vtkMRMLMarkupsROINode)
                    a = ijk_to_ras(self.ijk_to_ras, (i0, j0, k))
                    b = ijk_to_ras(self.ijk_to_ras, (i1, j1, k))
                    roi.SetCenter(*((a + b) / 2.0))
                    size = np.abs(a - b)
                    size[np.argmin(size)] = spacing_k * 0.5
                    roi.SetSize(*size)
                    roi.SetLocked(True)
                    roi.CreateDefaultDisplayNodes()
                    display = roi.GetDisplayNode()
                    display.SetSelectedColor(*SEGMENT_COLORS[segment])
                    display.SetHandlesInteractive(False)
                    display.SetFillOpacity(0.0)
                    display.SetPropertiesLabelVisibility(False)
                    display.SetPointLabelsVisibility(False)
                    self._markups.append(roi)
                for points, node in ((slice_prompts.points, positive), (slice_prompts.negative_points, negative)):
                    for i, j in points:
                        node.AddControlPoint(*ijk_to_ras(self.ijk_to_ras, (i, j, k)))

    def _fiducials(self, name: str, color: tuple[float, float, float]) -> vtkMRMLMarkupsFiducialNode:
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.SetLocked(True)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        display.SetPointLabelsVisibility(False)
        display.SetPropertiesLabelVisibility(False)
        display.SetGlyphScale(2.0)
        self._markups.append(node)
        return node

    # --- views -----------------------------------------------------------------------------------------
    def jump_to_slice(self, k: int) -> None:
        r, a, s = slice_centre_ras(self.ijk_to_ras, k, self.shape_kji)
        vtkMRMLSliceNode.JumpAllSlices(self.scene, float(r), float(a), float(s))

    def set_window(self, window: float, level: float) -> None:
        display = self.volume.GetDisplayNode()
        display.SetAutoWindowLevel(0)
        display.SetWindowLevel(float(window), float(level))

    # --- export ----------------------------------------------------------------------------------------
    def write_segmentation(self, path: Path) -> None:
        """Slicer's .seg.nrrd (both segments, overlapping allowed: one layer each), as Slicer's Save writes it; for
        a reoriented CT on the file's own grid (the same voxels, in the file's order)."""
        segmentation, temporary = self.segmentation, None
        if self.reorientation is not None:
            temporary = segmentation = self._on_input_grid()
        try:
            storage = vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(path))
            storage.SetUseCompression(True)
            if not storage.WriteData(segmentation) or not path.is_file():
                raise OSError(f"the segmentation could not be written to {path}")
        finally:
            if temporary is not None:
                self.scene.RemoveNode(temporary)

    def _on_input_grid(self) -> vtkMRMLSegmentationNode:
        """A scene copy of the segments on the CT file's own grid (before the reorientation), for writing."""
        assert self.reorientation is not None
        matrix = self.reorientation.input_geometry.ijk_to_ras_matrix
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM (file grid)")
        assert isinstance(node, vtkMRMLSegmentationNode)
        # the file's whole grid as the reference geometry (as SceneContent's own node has the CT's): without it the
        # .seg.nrrd is written cropped to the segments' extent, not on the file's grid
        grid = vtkOrientedImageData()
        grid.SetDimensions(*self.reorientation.input_geometry.size_ijk)
        grid.SetImageToWorldMatrix(numpy_to_matrix(matrix))
        node.GetSegmentation().SetConversionParameter(
            vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            vtkSegmentationConverter.SerializeImageGeometry(grid))
        segments = self.segmentation.GetSegmentation()
        for name in SEGMENTS:
            segment = segments.GetSegment(name)
            _add_segment(node, name, segment.GetColor() if segment else SEGMENT_COLORS[name])
            mask = self.reorientation.to_input(self.segment_mask(name))
            vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                oriented_image(mask, matrix), node, name, vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, None)
        return node

    def write_labelmap(self, labels_kji: np.ndarray, path: Path) -> None:
        """A labelmap volume on the CT's grid (liver 1, tumour 2), .nii.gz or .nrrd, LPS on disk; for a reoriented
        CT on the file's own grid."""
        matrix = self.ijk_to_ras
        if self.reorientation is not None:
            labels_kji = self.reorientation.to_input(labels_kji)
            matrix = self.reorientation.input_geometry.ijk_to_ras_matrix
        node = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "LiverSAM labels")
        assert isinstance(node, vtkMRMLLabelMapVolumeNode)
        try:
            image = vtkImageData()
            nk, nj, ni = labels_kji.shape
            image.SetDimensions(ni, nj, nk)
            image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(labels_kji, np.uint8).ravel(), deep=True))
            node.SetIJKToRASMatrix(numpy_to_matrix(matrix))
            node.SetAndObserveImageData(image)
            storage = vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(path))
            storage.SetUseCompression(True)
            if not storage.WriteData(node):
                raise OSError(f"the labelmap could not be written to {path}")
        finally:
            self.scene.RemoveNode(node)


def slice_centre_ras(matrix: np.ndarray, k: int, shape_kji: tuple[int, ...]) -> np.ndarray:
    from .volume_geometry import slice_centre_ras as centre

    return centre(matrix, k, shape_kji)


def _string_array(values: list[str]):
    from vtkmodules.vtkCommonCore import vtkStringArray

    array = vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def read_volume_array(slicer_app, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a volume file with Slicer's reader -> (array [k, j, i], IJKToRAS); for tests and checks."""
    volumes = slicer_app.io_manager.load_volumes([path])
    if not volumes:
        raise InputError(f"'{path}' could not be read")
    node = volumes[0]
    try:
        return volume_array(node).copy(), volume_ijk_to_ras(node)
    finally:
        slicer_app.scene.RemoveNode(node)
