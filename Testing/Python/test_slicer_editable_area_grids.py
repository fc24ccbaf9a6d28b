"""The Segment Editor's editable area and intensity range hold when LiverSAM's grid is not the segmentation's.

LiverSAM writes from the grid it works on: a CT stored in sagittal or coronal slices is written from its axial
grid, and a segmentation made on another grid keeps its own. Slicer 5.10 builds the editable-area and intensity
masks on the segmentation's reference grid and, for a modifier on another grid, silently drops the editable area
and writes nothing at all under an intensity range (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap). Each
write is now put on the reference grid first. Real CT (a lits117 slab), slicer-core's MRML, no model.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_slicer_reoriented_ct import lits117_slab, stored_as
from test_slicer_segmentation_logic import shared_editor_node

from slicer_harness import ensure_module_on_path, fresh_scene

ensure_module_on_path()

import slicer  # noqa: E402

from liversam.errors import OutputError  # noqa: E402
from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge  # noqa: E402
from LiverSAMLib.SegmentationLogic import LIVER, TUMOR, SegmentationLogic  # noqa: E402

pytestmark = pytest.mark.slicer
HU_RANGE = (60.0, 200.0)  # the editable intensity range: part of the liver's voxels, not all


@pytest.fixture(scope="module")
def axial_slab():
    """(a slab of lits117 around the liver's largest slice, that slice's liver label)"""
    return lits117_slab()


def scene_with(ct: CTVolume, reference: CTVolume | None = None):
    """A scene with ``ct`` as the input volume and a segmentation holding liver + tumor, its reference grid that of
    ``reference`` when given (a segmentation made on another volume), else the CT's."""
    scene = fresh_scene()
    volume = MRMLBridge.volume_node_from_ct(ct, name="ct", scene=scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    logic = SegmentationLogic(scene=scene)
    if reference is not None:
        other = MRMLBridge.volume_node_from_ct(reference, name="other grid", scene=scene)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(other)
        ids = logic.ensure_standard_segments(segmentation)
        logic.prepare_segmentation(segmentation, volume)  # it has segments: its grid is kept
    else:
        logic.prepare_segmentation(segmentation, volume)
        ids = logic.ensure_standard_segments(segmentation)
    return scene, volume, segmentation, logic, ids


def write_tumour_box_under(
    mode: str, ct: CTVolume, liver_slice: np.ndarray, reference: CTVolume | None = None
):
    """Write the liver, then a tumour box over three slices with the Segment Editor's editable area "inside liver"
    (``mode="inside"``) or its intensity range on; (tumour written, tumour expected) on LiverSAM's working grid."""
    scene, volume, segmentation, logic, ids = scene_with(ct, reference)
    working = MRMLBridge.geometry_from_volume_node(volume)
    reorientation = MRMLBridge.axial_reorientation_of(volume)
    hu = ct.array_kji if reorientation is None else reorientation.to_axial(ct.array_kji)
    liver = np.zeros(working.shape_kji, bool)
    liver[:] = liver_slice
    logic.write_mask(segmentation, ids[LIVER], volume, liver)
    editor = shared_editor_node(scene, segmentation, volume)
    if mode == "inside":
        editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
        editor.SetMaskSegmentID(ids[LIVER])
    else:
        editor.SetSourceVolumeIntensityMask(True)
        editor.SetSourceVolumeIntensityMaskRange(*HU_RANGE)
    ys, xs = np.nonzero(liver_slice)
    box = np.zeros_like(liver)
    box[
        2:5,
        max(0, ys.min() - 3) : (ys.min() + ys.max()) // 2,
        max(0, xs.min() - 3) : (xs.min() + xs.max()) // 2,
    ] = True
    logic.write_mask(segmentation, ids[TUMOR], volume, box, k_range=(2, 4))
    written = MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume)
    if mode == "inside":
        expected = box & liver
    else:
        expected = box & (hu >= HU_RANGE[0]) & (hu <= HU_RANGE[1])
    return written, expected


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
@pytest.mark.parametrize("mode", ["inside", "intensity"])
def test_a_ct_stored_in_sagittal_or_coronal_slices_keeps_the_editable_area_and_range(axial_slab, plane, mode):
    axial, liver_slice = axial_slab
    written, expected = write_tumour_box_under(mode, stored_as(axial, plane), liver_slice)
    # the same write on the axial copy: what the masks must give on every grid
    axial_written, axial_expected = write_tumour_box_under(mode, axial, liver_slice)
    np.testing.assert_array_equal(axial_written, axial_expected)
    assert 0 < expected.sum() < written.size
    np.testing.assert_array_equal(written, expected)  # before: the whole box (inside), or nothing (intensity)
    np.testing.assert_array_equal(written, axial_written)


@pytest.mark.parametrize("mode", ["inside", "intensity"])
def test_a_segmentation_made_on_another_grid_keeps_the_editable_area_and_range(axial_slab, mode):
    """The segmentation's grid has half the CT's in-plane spacing (e.g. made with the Segment Editor's
    oversampling): every CT voxel is four of its voxels. The editable area is exact on the CT's voxels; the intensity
    range is applied, as for the Segment Editor's own effects, to the CT linearly resampled onto the finer grid
    (vtkSlicerSegmentEditorLogic::UpdateAlignedSourceVolume), so voxels at the range's edges may differ."""
    axial, liver_slice = axial_slab
    g = axial.geometry
    half = (g.spacing_mm[0] / 2, g.spacing_mm[1] / 2, g.spacing_mm[2])
    origin = tuple(g.ijk_to_lps([-0.25, -0.25, 0]))  # the fine voxels' corners on the CT voxels' corners
    size = (2 * g.size_ijk[0], 2 * g.size_ijk[1], g.size_ijk[2])
    fine = CTVolume(np.zeros(size[::-1], np.int16), ImageGeometry(size, half, origin, g.direction_lps))
    written, expected = write_tumour_box_under(mode, axial, liver_slice, reference=fine)
    assert 0 < expected.sum() < written.size
    if mode == "inside":
        np.testing.assert_array_equal(written, expected)
    else:  # before: nothing written
        overlap = 2.0 * float((written & expected).sum()) / float(written.sum() + expected.sum())
        print(
            f"intensity range on a finer segmentation grid: Dice {overlap:.4f} against the CT voxels in range"
        )
        assert overlap >= 0.9


def test_a_segmentation_whose_grid_misses_the_ct_is_refused_with_what_to_do(axial_slab):
    """With the Segment Editor's editable area on (the write must go onto the segmentation's grid)."""
    axial, liver_slice = axial_slab
    g = axial.geometry
    far = CTVolume(np.zeros((3, 8, 8), np.int16),
                   ImageGeometry((8, 8, 3), g.spacing_mm, tuple(np.add(g.origin_lps, (0, 0, 500.0))), g.direction_lps))  # fmt: skip
    scene, volume, segmentation, logic, ids = scene_with(axial, reference=far)
    editor = shared_editor_node(scene, segmentation, volume)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    liver = np.zeros(axial.array_kji.shape, bool)
    liver[:] = liver_slice
    with pytest.raises(OutputError, match="does not cover the input CT.*Create new Segmentation"):
        logic.write_mask(segmentation, ids[LIVER], volume, liver)


def test_a_coarser_segmentation_grid_refuses_a_masked_slice_write_clearly_and_takes_an_unmasked_one(axial_slab):
    """A segmentation with slices three times the CT's: with the editable area on, a CT slice between its slice
    centres cannot be masked there (said so, no undo state saved); without masking the slice is written as before,
    on the CT's own grid."""
    axial, liver_slice = axial_slab
    g = axial.geometry
    coarse = CTVolume(np.zeros((3, g.size_ijk[1], g.size_ijk[0]), np.int16),
                      ImageGeometry((g.size_ijk[0], g.size_ijk[1], 3), (g.spacing_mm[0], g.spacing_mm[1], 3 * g.spacing_mm[2]),
                                    tuple(g.ijk_to_lps([0, 0, 1])), g.direction_lps))  # fmt: skip
    scene, volume, segmentation, logic, ids = scene_with(axial, reference=coarse)
    liver = np.zeros(axial.array_kji.shape, bool)
    liver[:] = liver_slice
    logic.write_mask(segmentation, ids[LIVER], volume, liver, k_range=(3, 3))  # no masking: written as it is
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume)[3], liver_slice)
    editor = shared_editor_node(scene, segmentation, volume)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    with pytest.raises(OutputError, match=r"grid \(.* mm voxels\) is coarser than the CT's: this slice lies between"):
        logic.write_mask(segmentation, ids[TUMOR], volume, liver, k_range=(2, 2))
    logic.undo()  # one undo takes back the liver slice: the refused write saved no (empty) undo state of its own
    assert not MRMLBridge.segment_mask(segmentation, ids[LIVER], volume).any()
