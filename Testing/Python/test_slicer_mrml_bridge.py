"""LiverSAMLib.MRMLBridge against slicer-core's real MRML: geometry, voxel copies, markups -> prompts."""

from __future__ import annotations

import numpy as np
import pytest

from slicer_harness import ensure_module_on_path, fresh_scene, shared_data_dir

ensure_module_on_path()

import slicer  # noqa: E402
import vtk  # noqa: E402

from liversam.ct_io import read_ct  # noqa: E402
from liversam.errors import InputImageError, PromptError  # noqa: E402
from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge  # noqa: E402

pytestmark = pytest.mark.slicer


@pytest.fixture
def scene():
    return fresh_scene()


def _rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def oblique_volume(scene) -> tuple[object, ImageGeometry, np.ndarray]:
    """A 20 x 30 x 12 volume, anisotropic spacing, rotated about two axes, with a unique value per voxel."""
    direction = _rotation("z", 30) @ _rotation("x", 20)
    geometry = ImageGeometry(
        size_ijk=(20, 30, 12),
        spacing_mm=(0.8, 0.7, 2.5),
        origin_lps=(-40.0, 12.5, 100.0),
        direction_lps=direction,
    )
    array = np.arange(np.prod(geometry.shape_kji), dtype=np.int16).reshape(geometry.shape_kji)
    node = MRMLBridge.volume_node_from_ct(CTVolume(array.copy(), geometry), name="oblique", scene=scene)
    return node, geometry, array


def test_geometry_of_oblique_volume_matches_and_round_trips(scene):
    node, geometry, array = oblique_volume(scene)
    read = MRMLBridge.geometry_from_volume_node(node)
    assert read.is_close(geometry), read.describe_difference(geometry)
    # Slicer's own IJKToRAS is what the core calls ijk_to_ras_matrix.
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    slicer_ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(slicer_ijk_to_ras, geometry.ijk_to_ras_matrix, atol=1e-9)
    # Voxel (i, j, k) of the node holds array[k, j, i].
    ct = MRMLBridge.ct_volume_from_node(node)
    np.testing.assert_array_equal(ct.array_kji, array)
    assert ct.array_kji[3, 7, 11] == array[3, 7, 11]


def test_geometry_of_real_ct_loaded_by_mrml_equals_core_reader(scene):
    """lits117 and totalseg_small (LPS direction diag(-1,-1,1)) read by MRML's storage node == read_ct."""
    for path in (
        shared_data_dir() / "lits117" / "ct.nii.gz",
        shared_data_dir() / "totalseg_small" / "ct.nii.gz",
    ):
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.parent.name)
        assert storage.ReadData(node), path
        core = read_ct(path)
        mrml = MRMLBridge.ct_volume_from_node(node)
        assert mrml.geometry.is_close(core.geometry, tolerance_mm=1e-3), mrml.geometry.describe_difference(
            core.geometry
        )
        np.testing.assert_array_equal(mrml.array_kji, core.array_kji)


def test_ct_copy_never_aliases_the_node_voxels(scene):
    node, _geometry, array = oblique_volume(scene)
    ct = MRMLBridge.ct_volume_from_node(node)
    assert not ct.array_kji.flags.writeable
    assert not np.shares_memory(ct.array_kji, slicer.util.arrayFromVolume(node))
    # Windowing a copy of the copy (what the model's preprocessing does) leaves the node untouched.
    windowed = np.clip(ct.array_kji.astype(np.float32), 0, 100)
    assert windowed.max() == 100
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array)


def test_points_in_ras_land_on_the_right_voxels_of_an_oblique_volume(scene):
    node, geometry, _array = oblique_volume(scene)
    voxels_ijk = [(3, 4, 5), (17, 25, 5), (10, 10, 9)]
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pos")
    for ijk in voxels_ijk[:2]:
        # Off the voxel centre by less than half a voxel: must round to the same voxel.
        positive.AddControlPoint(*geometry.ijk_to_ras(np.array(ijk) + [0.3, -0.4, 0.2]))
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "neg")
    negative.AddControlPoint(*geometry.ijk_to_ras(np.array(voxels_ijk[2], dtype=float)))
    prompts = MRMLBridge.prompts_from_markups(
        MRMLBridge.geometry_from_volume_node(node), [positive], [negative, None]
    )
    assert prompts.positive_ijk == voxels_ijk[:2]
    assert prompts.negative_ijk == [voxels_ijk[2]]
    assert prompts.slices == [5, 9]
    slice_prompts = prompts.to_slice_prompts()
    assert slice_prompts[5].points_pos_ij == [(3, 4), (17, 25)]
    assert slice_prompts[9].points_neg_ij == [(10, 10)] and slice_prompts[9].is_empty()


def test_points_under_a_parent_transform_use_world_coordinates(scene):
    node, geometry, _array = oblique_volume(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 15.0)  # volume moved 15 mm to the right (R)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = MRMLBridge.geometry_from_volume_node(node)
    np.testing.assert_allclose(moved.origin_lps, np.array(geometry.origin_lps) + [-15.0, 0, 0])
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(*(geometry.ijk_to_ras([6.0, 8.0, 2.0]) + [15.0, 0, 0]))
    assert MRMLBridge.prompts_from_markups(moved, [points]).positive_ijk == [(6, 8, 2)]


def test_point_outside_the_volume_is_a_prompt_error_naming_the_node(scene):
    node, geometry, _array = oblique_volume(scene)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    points.AddControlPoint(*geometry.ijk_to_ras([5.0, 5.0, 40.0]))
    with pytest.raises(PromptError, match="clicks"):
        MRMLBridge.prompts_from_markups(geometry, [points])


def test_roi_becomes_a_box_on_its_centre_slice(scene):
    node, geometry, _array = oblique_volume(scene)
    # An ROI aligned with the volume axes: corners at voxels (4, 6, 7) and (12, 20, 7).
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    ijk_to_ras = geometry.ijk_to_ras_matrix
    object_to_world = vtk.vtkMatrix4x4()
    axes = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    for r in range(3):
        for c in range(3):
            object_to_world.SetElement(r, c, axes[r, c])
    roi.GetObjectToNodeMatrix().DeepCopy(object_to_world)
    center_ras = geometry.ijk_to_ras([8.0, 13.0, 7.0])
    roi.SetCenterWorld(*center_ras)
    roi.SetSize(8 * 0.8, 14 * 0.7, 0.5)
    prompts = MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi])
    assert prompts.boxes == [MRMLBridge.BoxPrompt(k=7, i0=4, j0=6, i1=12, j1=20, k_min=7, k_max=7)]
    assert prompts.to_slice_prompts()[7].boxes_ij == [(4, 6, 12, 20)]


def test_axis_aligned_roi_on_identity_volume_and_unplaced_roi(scene):
    geometry = ImageGeometry(size_ijk=(64, 64, 10), spacing_mm=(1.0, 1.0, 2.0), origin_lps=(0.0, 0.0, 0.0))
    MRMLBridge.volume_node_from_ct(CTVolume(np.zeros(geometry.shape_kji, np.int16), geometry), scene=scene)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    assert MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi]).is_empty()  # not placed yet
    # RAS (-10, -20, 8) is LPS (10, 20, 8) -> IJK (10, 20, 4); 10 x 6 mm box.
    roi.SetCenterWorld(-10.0, -20.0, 8.0)
    roi.SetSizeWorld(10.0, 6.0, 1.0)
    (box,) = MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi]).boxes
    assert (box.k, box.i0, box.j0, box.i1, box.j1) == (4, 5, 17, 15, 23)


def test_non_linear_transform_is_refused_with_a_fix(scene):
    node, _geometry, _array = oblique_volume(scene)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputImageError, match="Harden"):
        MRMLBridge.geometry_from_volume_node(node)


def test_terminology_strings_use_snomed_codes():
    liver = MRMLBridge.terminology_entry_string("liver")
    tumor = MRMLBridge.terminology_entry_string("tumor")
    assert "SCT^10200004^Liver" in liver and "SCT^123037004^Anatomical Structure" in liver
    assert "SCT^108369006^Neoplasm" in tumor and tumor.endswith("SCT^10200004^Liver~^^")


def test_the_default_input_is_the_first_image_volume_never_a_labelmap(scene):
    assert MRMLBridge.first_image_volume(scene) is None
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "label")
    # what the module did: GetFirstNodeByClass matches the subclass, so the label loaded first became the input
    assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is labelmap
    assert MRMLBridge.first_image_volume(scene) is None
    scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")  # an RGB image: not listed by the selector either
    hidden = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "hidden")
    hidden.SetHideFromEditors(True)  # a module's internal volume: hidden from the selector
    assert MRMLBridge.first_image_volume(scene) is None
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct 2")
    assert MRMLBridge.first_image_volume(scene) is ct
