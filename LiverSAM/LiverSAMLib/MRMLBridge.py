"""Conversions between MRML nodes and the core package's plain data (MRML + numpy only, no Qt).

Frames: Slicer holds points in RAS millimetres ("world" when parent transforms are applied); the core
package (`liversam`) uses LPS millimetres and voxel arrays indexed ``[k, j, i]``. A volume node's
``IJKToRAS`` matrix is the RAS counterpart of :attr:`liversam.geometry.ImageGeometry.ijk_to_ras_matrix`.

Every function here takes nodes and returns numpy arrays / core objects, or raises a
:class:`liversam.errors.LiverSAMError` subclass with a message a user can act on. Nothing touches the GUI.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk
import vtk.util.numpy_support as vtk_np

from liversam.axial_orientation import AxialReorientation, axial_reorientation
from liversam.errors import InputImageError, OutputError, PromptError
from liversam.geometry import ImageGeometry
from liversam.volume import CTVolume

from .SliceNumbers import SliceNumbering, instance_numbers_of

logger = logging.getLogger(__name__)

# Where markups a user has placed count as prompts: control points being placed (preview) do not.
_DEFINED_POSITION_STATUSES = ("PositionDefined",)


# ---------------------------------------------------------------------------------------------------
# Volume geometry
# ---------------------------------------------------------------------------------------------------
def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world_matrix(node) -> np.ndarray:
    """4x4 matrix from a transformable node's local RAS to world RAS (identity without a parent transform).

    Raises :class:`InputImageError` when a parent transform is non-linear (the volume must be hardened or
    resampled first: a SAM slice needs a regular voxel grid).
    """
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise InputImageError(
            f"Node '{node.GetName()}' is under the non-linear transform '{transform_node.GetName()}'. "
            "LiverSAM needs a regular voxel grid: harden the transform (Transforms module, 'Harden') "
            "or resample the volume, then try again."
        )
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return _matrix_to_numpy(matrix)


def local_ijk_to_ras_matrix(volume_node) -> np.ndarray:
    """4x4 matrix from the volume's voxel indices to its own RAS, without its parent transform (the grid its files and
    a labelmap exported on it are written on)."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return _matrix_to_numpy(ijk_to_ras)


def ijk_to_world_ras_matrix(volume_node) -> np.ndarray:
    """4x4 matrix from the volume's voxel indices (i, j, k) to world RAS millimetres."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return node_to_world_matrix(volume_node) @ _matrix_to_numpy(ijk_to_ras)


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, size_ijk: Sequence[int]) -> ImageGeometry:
    """An :class:`ImageGeometry` (LPS) from an IJK-to-RAS 4x4 matrix and the grid size (ni, nj, nk)."""
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijk_to_ras, dtype=float)
    axes_lps = ijk_to_lps[:3, :3]
    spacing_mm = np.linalg.norm(axes_lps, axis=0)
    if np.any(spacing_mm <= 0):
        raise InputImageError(
            f"Volume has a zero voxel spacing ({spacing_mm} mm): its IJKToRAS matrix is invalid."
        )
    return ImageGeometry(
        size_ijk=tuple(int(s) for s in size_ijk),
        spacing_mm=tuple(float(s) for s in spacing_mm),
        origin_lps=tuple(float(v) for v in ijk_to_lps[:3, 3]),
        direction_lps=axes_lps / spacing_mm,
    )


def input_geometry_from_volume_node(volume_node) -> ImageGeometry:
    """The volume node's own grid in world LPS: size, spacing (mm), origin (LPS mm), direction cosines (LPS)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        name = volume_node.GetName() if volume_node is not None else "(none)"
        raise InputImageError(f"Volume '{name}' has no voxel data: load a CT volume and select it as input.")
    return geometry_from_ijk_to_ras(ijk_to_world_ras_matrix(volume_node), image.GetDimensions())


def axial_reorientation_of(volume_node) -> AxialReorientation | None:
    """How a volume stored in sagittal or coronal slices is seen on its axial slices (voxels permuted and flipped,
    none resampled: ``liversam.axial_orientation``), or None for an axial or an oblique volume (kept as it is)."""
    return axial_reorientation(input_geometry_from_volume_node(volume_node))


def geometry_from_volume_node(volume_node) -> ImageGeometry:
    """The grid LiverSAM works on for this volume, in world LPS: the node's own grid, or for a volume stored in
    sagittal or coronal slices its axial grid (:func:`axial_reorientation_of`). Every IJK, [k, j, i] array and
    slice number k the module handles is on this grid: prompts, the CT sent to the server, masks written."""
    geometry = input_geometry_from_volume_node(volume_node)
    reorientation = axial_reorientation(geometry)
    return geometry if reorientation is None else reorientation.axial_geometry


def slice_numbering(volume_node) -> SliceNumbering:
    """How the module shows this volume's working slice numbers k: as the volume's own voxel index, the (i, j, k) of
    Slicer's Data Probe (:mod:`LiverSAMLib.SliceNumbers`); on a CT whose own k slices are its working slices, with the
    DICOM instance numbers Slicer's DICOM loader recorded (``DICOM.instanceNumbers``), when they name those slices one
    to one."""
    numbering = SliceNumbering.of(axial_reorientation_of(volume_node))
    image = volume_node.GetImageData()
    if numbering.axis != 2 or image is None:
        return numbering  # a CT stored in sagittal / coronal slices: its images are not the axial slices
    numbers = instance_numbers_of(volume_node.GetAttribute("DICOM.instanceNumbers"), image.GetDimensions()[2])
    return numbering.with_instance_numbers(numbers)


def working_ijk_to_world_ras_matrix(volume_node) -> np.ndarray:
    """4x4 matrix from the IJK of :func:`geometry_from_volume_node`'s grid to world RAS millimetres."""
    reorientation = axial_reorientation_of(volume_node)
    if reorientation is None:
        return ijk_to_world_ras_matrix(volume_node)
    return reorientation.axial_geometry.ijk_to_ras_matrix


# ---------------------------------------------------------------------------------------------------
# Slice views
# ---------------------------------------------------------------------------------------------------
#: How far a slice view's plane may lean from the working grid's slices and still be taken to show one of them (as
#: ``liversam.axial_orientation`` takes a voxel axis for a patient axis).
VIEW_SLICE_ANGLE_DEG = 25.0


def slice_shown_in_view(geometry: ImageGeometry, slice_to_ras) -> int | None:
    """The working slice k a slice view shows (its node's ``SliceToRAS``, a vtkMatrix4x4 or 4x4 array: its third column
    is the view's normal, its fourth the RAS point at the view's centre): the slice through the view's centre when the
    view's plane runs along the working grid's slices, else None (a view across the slices, e.g. the Red view turned to
    sagittal, whose centre says nothing about the slice the user works on; or the centre outside the volume)."""
    m = slice_to_ras if isinstance(slice_to_ras, np.ndarray) else _matrix_to_numpy(slice_to_ras)
    normal = np.asarray(m[:3, 2], float)
    slices_normal = np.asarray(geometry.direction_lps, float)[:, 2] * [-1.0, -1.0, 1.0]  # the k axis in RAS
    if abs(float(normal @ slices_normal)) < np.cos(np.radians(VIEW_SLICE_ANGLE_DEG)) * np.linalg.norm(normal):
        return None
    k = int(np.rint(float(geometry.ras_to_ijk(np.asarray(m[:3, 3], float)[np.newaxis])[0][2])))
    return k if 0 <= k < geometry.size_ijk[2] else None


def slice_centre_ras(geometry: ImageGeometry, k: int) -> np.ndarray:
    """The RAS point at the centre of working slice ``k``: where the views jump to show it (with a centred jump)."""
    ni, nj, _nk = geometry.size_ijk
    return geometry.ijk_to_ras(np.array([[(ni - 1) / 2.0, (nj - 1) / 2.0, float(k)]]))[0]


def lps_to_ras_point(point_lps) -> tuple[float, float, float]:
    """A core LPS point (a lesion's centre) in Slicer's RAS."""
    x, y, z = (float(v) for v in point_lps)
    return -x, -y, z


def first_image_volume(scene):
    """The first volume the module's input selector lists (the module's default input), or None.

    ``vtkMRMLScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")`` matches subclasses too (labelmaps, vector / RGB,
    tensor, diffusion volumes), so a labelmap or a colour image loaded before the CT became the input, one the
    selector does not list: with ``showChildNodeTypes`` false it keeps exactly that class, and it hides nodes marked
    HideFromEditors (qMRMLSortFilterProxyModel.cxx).
    """
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    nodes.UnRegister(scene)  # the caller owns the collection (vtkMRMLScene.h), as slicer.util.getNodesByClass does
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        if node.GetClassName() == "vtkMRMLScalarVolumeNode" and not node.GetHideFromEditors():
            return node
    return None


def ct_volume_from_node(volume_node) -> CTVolume:
    """A :class:`CTVolume` holding a *copy* of the node's voxels (HU) in world geometry.

    The copy is what the model's preprocessing (windowing, resizing) works on: the node's own voxel
    array is never handed out, so the CT shown in Slicer cannot be modified through it.
    """
    geometry = geometry_from_volume_node(volume_node)
    image = volume_node.GetImageData()
    if image.GetNumberOfScalarComponents() != 1:
        raise InputImageError(
            f"Volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "LiverSAM needs a scalar CT volume (convert colour/vector volumes with the Vector to Scalar Volume module)."
        )
    array_kji = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    reorientation = axial_reorientation_of(volume_node)
    if reorientation is not None:  # a sagittal / coronal volume: its axial copy (geometry is its axial grid)
        array_kji = reorientation.to_axial(array_kji)
        logger.info("LiverSAM: volume '%s': %s", volume_node.GetName(), reorientation.describe())
    return CTVolume(array_kji=array_kji, geometry=geometry, source=volume_node.GetName())


def volume_node_from_ct(ct_volume: CTVolume, name: str = "CT", scene=None):
    """Add a scalar volume node holding a copy of a :class:`CTVolume` (used by tests and the self-test)."""
    scene = scene or slicer.mrmlScene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_numpy_to_matrix(ct_volume.geometry.ijk_to_ras_matrix))
    slicer.util.updateVolumeFromArray(node, np.array(ct_volume.array_kji, copy=True))
    node.CreateDefaultDisplayNodes()
    return node


# ---------------------------------------------------------------------------------------------------
# Markups -> prompts
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoxPrompt:
    """A box on slice ``k`` in voxel indices (inclusive ``i0..i1``, ``j0..j1``).

    ``k_min..k_max`` is the slice range the ROI spans (equal to ``k`` for a flat box drawn on one slice).
    """

    k: int
    i0: int
    j0: int
    i1: int
    j1: int
    k_min: int
    k_max: int


@dataclass
class MarkupsPrompts:
    """Prompts read from markups nodes, in voxel indices of the CT grid, grouped by slice ``k``."""

    positive_ijk: list[tuple[int, int, int]] = field(default_factory=list)
    negative_ijk: list[tuple[int, int, int]] = field(default_factory=list)
    boxes: list[BoxPrompt] = field(default_factory=list)

    @property
    def slices(self) -> list[int]:
        """Sorted slice indices that hold at least one prompt."""
        ks = {p[2] for p in self.positive_ijk} | {p[2] for p in self.negative_ijk} | {b.k for b in self.boxes}
        return sorted(ks)

    def is_empty(self) -> bool:
        return not (self.positive_ijk or self.negative_ijk or self.boxes)

    def to_slice_prompts(self) -> dict:
        """``{k: liversam.prompts.SlicePrompts}``: SAM's ``(x, y)`` is ``(i, j)``."""
        from liversam.prompts import SlicePrompts

        result = {}
        for k in self.slices:
            result[k] = SlicePrompts(
                boxes_ij=[(b.i0, b.j0, b.i1, b.j1) for b in self.boxes if b.k == k],
                points_pos_ij=[(i, j) for i, j, kk in self.positive_ijk if kk == k],
                points_neg_ij=[(i, j) for i, j, kk in self.negative_ijk if kk == k],
            )
        return result


def control_points_world_ras(markups_node) -> np.ndarray:
    """World RAS positions (N, 3) of the node's placed control points (preview points are skipped)."""
    points = []
    for index in range(markups_node.GetNumberOfControlPoints()):
        status = markups_node.GetNthControlPointPositionStatus(index)
        if status != markups_node.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(index, position)
        points.append(position)
    return np.asarray(points, dtype=float).reshape(-1, 3)


def world_ras_to_voxel(geometry: ImageGeometry, points_ras: np.ndarray, what: str) -> np.ndarray:
    """World RAS points (N, 3) to the nearest voxel indices (N, 3) as int (i, j, k).

    Raises :class:`PromptError` naming ``what`` when a point lies outside the volume.
    """
    points_ijk = geometry.ras_to_ijk(np.asarray(points_ras, dtype=float).reshape(-1, 3))
    inside = geometry.contains_ijk(points_ijk)
    if not np.all(inside):
        bad = int(np.flatnonzero(~inside)[0])
        ras = ", ".join(f"{v:.1f}" for v in np.asarray(points_ras).reshape(-1, 3)[bad])
        raise PromptError(
            f"{what}: point {bad + 1} at RAS ({ras}) mm lies outside the input volume "
            f"(size {geometry.size_ijk} voxels). Move or delete it in a slice view of the input volume."
        )
    return np.rint(points_ijk).astype(int)


def roi_corners_world_ras(roi_node) -> np.ndarray:
    """The 8 corners (8, 3) of a markups ROI in world RAS (rotated ROIs included)."""
    size = np.asarray(roi_node.GetSize(), dtype=float)
    object_to_world = _matrix_to_numpy(roi_node.GetObjectToWorldMatrix())
    signs = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
    corners_object = np.hstack([signs * size, np.ones((8, 1))])
    return (corners_object @ object_to_world.T)[:, :3]


#: Node attribute holding the world RAS position of a box's first corner while the user draws it
#: ("x,y,z"), set by :func:`remember_first_corner`; it tells the view the box was drawn in.
FIRST_CORNER_ATTRIBUTE = "LiverSAM.FirstCorner"
AXIS_NAMES = ("i (sagittal for an axial CT)", "j (coronal for an axial CT)", "k (axial)")


def remember_first_corner(roi_node) -> None:
    """Store the first corner of a box being drawn (call on PointPositionDefinedEvent).

    While a ROI is placed in a slice view it has two control points, one per click, both on the view's
    plane; once both are defined Slicer replaces them by the centre point
    (``vtkMRMLMarkupsROINode::UpdateControlPointsFromBoxROI``). The first corner plus the final centre
    give the second corner, and the two corners give the plane the box was drawn in.
    """
    if roi_node.GetNumberOfDefinedControlPoints() != 1 or roi_node.GetRequiredNumberOfControlPoints() != 2:
        return
    position = [0.0, 0.0, 0.0]
    roi_node.GetNthControlPointPositionWorld(0, position)
    roi_node.SetAttribute(FIRST_CORNER_ATTRIBUTE, ",".join(f"{v:.6f}" for v in position))


def box_drawn_axis(geometry: ImageGeometry, roi_node) -> int | None:
    """The voxel axis (0 i, 1 j, 2 k) perpendicular to the view a box was drawn in; None when unknown.

    Known when the box was drawn interactively (:func:`remember_first_corner`): the axis along which
    the two corners lie within half a voxel of each other.
    """
    text = roi_node.GetAttribute(FIRST_CORNER_ATTRIBUTE)
    if not text:
        return None
    first = np.array([float(v) for v in text.split(",")], dtype=float)
    centre = np.zeros(3)
    roi_node.GetCenterWorld(centre)
    second = 2.0 * centre - first
    delta = np.abs(geometry.ras_to_ijk(second[np.newaxis])[0] - geometry.ras_to_ijk(first[np.newaxis])[0])
    flat = [axis for axis in range(3) if delta[axis] < 0.5]
    return flat[0] if len(flat) == 1 else None


def box_from_roi(geometry: ImageGeometry, roi_node) -> BoxPrompt:
    """A box prompt from a markups ROI: the ROI's bounding rectangle in (i, j) on the slice of its centre.

    The rectangle is clipped to the volume; a ROI entirely outside the volume raises :class:`PromptError`,
    and so does a box drawn in a view across the volume's slices (a coronal or sagittal view of an axial
    CT): SAM segments the volume's k slices, and such a box has no meaning on them.
    """
    axis = box_drawn_axis(geometry, roi_node)
    if axis is not None and axis != 2:
        raise PromptError(
            f"Box '{roi_node.GetName()}' was drawn in a view across the volume's slices (its plane is "
            f"perpendicular to the {AXIS_NAMES[axis]} axis). LiverSAM segments the volume's slices: draw the "
            "box in the axial (Red) slice view, on the slice where the structure is largest."
        )
    corners_ijk = geometry.ras_to_ijk(roi_corners_world_ras(roi_node))
    center_ijk = corners_ijk.mean(axis=0)
    size = np.asarray(geometry.size_ijk)
    low = np.floor(corners_ijk.min(axis=0) + 0.5).astype(int)
    high = np.ceil(corners_ijk.max(axis=0) - 0.5).astype(int)
    high = np.maximum(high, low)
    if np.any(high < 0) or np.any(low > size - 1):
        raise PromptError(
            f"Box '{roi_node.GetName()}' lies outside the input volume. Draw the box on a slice of the input volume."
        )
    low = np.clip(low, 0, size - 1)
    high = np.clip(high, 0, size - 1)
    k = int(np.clip(np.rint(center_ijk[2]), 0, size[2] - 1))
    return BoxPrompt(
        k=k,
        i0=int(low[0]),
        j0=int(low[1]),
        i1=int(high[0]),
        j1=int(high[1]),
        k_min=int(low[2]),
        k_max=int(high[2]),
    )


def prompts_from_markups(
    geometry: ImageGeometry,
    positive_nodes: Iterable = (),
    negative_nodes: Iterable = (),
    roi_nodes: Iterable = (),
) -> MarkupsPrompts:
    """Read point lists (positive / negative clicks) and ROIs (boxes) into voxel-index prompts.

    ``None`` entries are ignored, so optional parameter-node references can be passed directly.
    """
    prompts = MarkupsPrompts()
    for nodes, target in ((positive_nodes, prompts.positive_ijk), (negative_nodes, prompts.negative_ijk)):
        for node in nodes:
            if node is None:
                continue
            voxels = world_ras_to_voxel(
                geometry, control_points_world_ras(node), f"Point list '{node.GetName()}'"
            )
            target.extend((int(i), int(j), int(k)) for i, j, k in voxels)
    for node in roi_nodes:
        if node is None or not _roi_is_defined(node):
            continue
        prompts.boxes.append(box_from_roi(geometry, node))
    return prompts


def boxes_redrawn_by(geometry: ImageGeometry, roi_node, others) -> list:
    """The ROI nodes among ``others`` that ``roi_node`` redraws: placed boxes on the same slice that it overlaps by at
    least half of the smaller box (a user who draws a box again over the first means it instead). Boxes on other
    slices, a box beside it on the same slice (another lesion) and boxes that cannot be read are kept. Empty while
    ``roi_node`` is not placed."""
    if not _roi_is_defined(roi_node):
        return []
    new = box_from_roi(geometry, roi_node)
    redrawn = []
    for other in others:
        if other is roi_node or other is None or not _roi_is_defined(other):
            continue
        try:
            old = box_from_roi(geometry, other)
        except PromptError:
            continue  # e.g. drawn in a coronal view: refused with its message when the prompts are read
        if old.k == new.k and _overlap_fraction(old, new) >= REDRAWN_BOX_OVERLAP:
            redrawn.append(other)
    return redrawn


REDRAWN_BOX_OVERLAP = 0.5  # of the smaller box's area


def _overlap_fraction(a: BoxPrompt, b: BoxPrompt) -> float:
    """The area two boxes share (inclusive voxel bounds) over the smaller box's area."""
    wi = min(a.i1, b.i1) - max(a.i0, b.i0) + 1
    wj = min(a.j1, b.j1) - max(a.j0, b.j0) + 1
    if wi <= 0 or wj <= 0:
        return 0.0
    smaller = min((a.i1 - a.i0 + 1) * (a.j1 - a.j0 + 1), (b.i1 - b.i0 + 1) * (b.j1 - b.j0 + 1))
    return wi * wj / smaller


def _roi_is_defined(roi_node) -> bool:
    """A ROI counts once it has been placed (its centre point is defined) and has a non-zero size. While the
    user draws it, its first corner is defined and the second follows the mouse as a *preview* point, and the
    ROI is sized from both (vtkSlicerMarkupsWidget::UpdatePreviewPoint, vtkMRMLMarkupsROINode::
    UpdateBoxROIFromControlPoints): a half-drawn box does not count."""
    if roi_node.GetNumberOfControlPoints() < 1:
        return False
    if roi_node.GetNthControlPointPositionStatus(0) != roi_node.PositionDefined:
        return False
    if roi_node.GetNumberOfDefinedControlPoints(True) > roi_node.GetNumberOfDefinedControlPoints(False):
        return False
    return bool(np.all(np.asarray(roi_node.GetSize()) > 0))


# ---------------------------------------------------------------------------------------------------
# Masks <-> vtkOrientedImageData / segments
# ---------------------------------------------------------------------------------------------------
def oriented_image_from_slab(slab_kji: np.ndarray, k0: int, ijk_to_ras: np.ndarray):
    """A ``vtkOrientedImageData`` (uint8 0/1) holding slices ``k0 .. k0 + len(slab) - 1`` of a grid.

    ``slab_kji`` is [k, j, i] for those slices only; ``ijk_to_ras`` is the full grid's IJK-to-RAS matrix, so
    the image lies exactly on the grid's slices ``k0 ..`` (its extent starts at ``k0``).
    """
    slab = np.asarray(slab_kji)
    if slab.ndim == 2:
        slab = slab[np.newaxis]
    nk, nj, ni = slab.shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, ni - 1, 0, nj - 1, int(k0), int(k0) + nk - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_np.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(
        slab > 0, dtype=np.uint8
    ).ravel()
    image.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras))
    return image


def oriented_image_from_mask(
    mask_kji: np.ndarray, ijk_to_ras: np.ndarray, k_range: tuple[int, int] | None = None
):
    """A ``vtkOrientedImageData`` of a whole-grid mask, or of its slices ``k_range=(k0, k1)`` (inclusive)."""
    mask_kji = np.asarray(mask_kji)
    nk = mask_kji.shape[0]
    k0, k1 = (0, nk - 1) if k_range is None else (int(k_range[0]), int(k_range[1]))
    if not (0 <= k0 <= k1 < nk):
        raise ValueError(f"slice range {k0}..{k1} outside 0..{nk - 1}")
    return oriented_image_from_slab(mask_kji[k0 : k1 + 1], k0, ijk_to_ras)


def on_reference_grid(modifier, reference_geometry: str):
    """``modifier`` (a labelmap in the segmentation's coordinates) on the grid of ``reference_geometry`` (the
    segmentation's serialized reference image geometry), nearest neighbour, over the reference voxels it covers
    that lie inside the reference extent; ``modifier`` itself when the grids are the same (or the geometry cannot be
    read); None when none of it lies on the reference grid; OutputError when it lies between the voxel centres of a
    coarser grid (a CT slice of 1 mm on a segmentation of 5 mm slices).

    The Segment Editor builds its editable-area and intensity masks on the reference grid, and Slicer 5.10 drops the
    masks of a modifier on another grid without a word (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap:
    the editable area merge fails on the geometry mismatch, the intensity range returns before writing). A CT stored
    in sagittal or coronal slices is written from its axial grid; a segmentation made on another grid keeps it.
    For the axial permutation the voxel centres coincide, so the copy is exact."""
    reference = slicer.vtkOrientedImageData()
    if not reference_geometry or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(
        reference_geometry, reference, False
    ):
        return modifier
    if slicer.vtkOrientedImageDataResample.DoGeometriesMatch(modifier, reference):
        return modifier
    to_world = vtk.vtkMatrix4x4()
    modifier.GetImageToWorldMatrix(to_world)
    reference_to_world = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(reference_to_world)
    modifier_to_reference = np.linalg.inv(_matrix_to_numpy(reference_to_world)) @ _matrix_to_numpy(to_world)
    extent = np.asarray(modifier.GetExtent(), dtype=float).reshape(3, 2)
    # the corners of the modifier's voxels (half a voxel past its first and last centres) in reference IJK: the
    # reference voxels whose centres lie inside them
    corners = np.array([[x, y, z, 1.0] for x in extent[0] + (-0.5, 0.5) for y in extent[1] + (-0.5, 0.5)
                        for z in extent[2] + (-0.5, 0.5)])  # fmt: skip
    in_reference = (modifier_to_reference @ corners.T)[:3]
    low = np.ceil(in_reference.min(axis=1) - 1e-6).astype(int)
    high = np.floor(in_reference.max(axis=1) + 1e-6).astype(int)
    whole = np.asarray(reference.GetExtent()).reshape(3, 2)
    if np.all(whole[:, 0] <= whole[:, 1]):  # a reference extent: the Segment Editor edits within it
        if np.any(in_reference.max(axis=1) < whole[:, 0] - 0.5) or np.any(in_reference.min(axis=1) > whole[:, 1] + 0.5):
            return None  # nothing of it on the reference grid
        low, high = np.maximum(low, whole[:, 0]), np.minimum(high, whole[:, 1])
    if np.any(low > high):  # it lies between the centres of a coarser grid's voxels
        spacing = " x ".join(f"{v:g}" for v in reference.GetSpacing())
        raise OutputError(
            f"The segmentation's grid ({spacing} mm voxels) is coarser than the CT's: this slice lies between its "
            "voxels, so the Segment Editor's editable area or intensity range cannot be applied to it. Set the "
            "Segment Editor's editable area to 'Everywhere' and its intensity range off, or give the segmentation "
            "the CT's geometry (Segment Editor > Specify geometry)."
        )
    reference.SetExtent(int(low[0]), int(high[0]), int(low[1]), int(high[1]), int(low[2]), int(high[2]))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        modifier, reference, resampled, False, False
    ):
        return None
    return resampled


def ijk_to_segmentation_matrix(volume_node, segmentation_node) -> np.ndarray:
    """4x4 matrix from the volume's IJK to the segmentation node's local RAS (both transforms linear)."""
    segmentation_to_world = node_to_world_matrix(segmentation_node)
    return np.linalg.inv(segmentation_to_world) @ working_ijk_to_world_ras_matrix(volume_node)


def segment_mask(segmentation_node, segment_id: str, volume_node, on_input_grid: bool = False) -> np.ndarray:
    """The segment as a bool array [k, j, i] on the volume's working grid (:func:`geometry_from_volume_node`),
    or with ``on_input_grid`` on the node's own grid."""
    array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
    mask = np.asarray(array) > 0
    reorientation = None if on_input_grid else axial_reorientation_of(volume_node)
    return mask if reorientation is None else reorientation.to_axial(mask)


# ---------------------------------------------------------------------------------------------------
# Terminology (standard SNOMED CT codes for the segments LiverSAM creates)
# ---------------------------------------------------------------------------------------------------
def terminology_entry_string(name: str) -> str:
    """Slicer's ``TerminologyEntry`` string for a segment name (liver, tumour / lesion, else tissue)."""
    from liversam.terminology import terminology_for

    return terminology_for(name).slicer_string()
