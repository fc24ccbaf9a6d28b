"""The module's liver segment takes the tumour voxels a server job placed outside it (``ServerSegmentation``).

A tumour propagated inside the liver comes back inside the liver mask it was sent, except where a past-organ rule
(``hyperdense_lesions_past_organ`` / ``hypodense_lesions_past_organ``) let a lesion the liver's mask left out leave
it. ``liversam segment`` gives those voxels to its liver; the module does the same to the liver segment, in the undo
step of the tumour's write. On slicer-core's real MRML and Segment Editor logic, with the job's answer built here
(what ``LiverSAMClient.job_result`` returns), so no model runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from slicer_harness import ensure_module_on_path, fresh_scene

ensure_module_on_path()

from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge  # noqa: E402
from LiverSAMLib.SegmentationLogic import LIVER, TUMOR, SegmentationLogic  # noqa: E402
from LiverSAMLib.ServerSegmentation import PropagationPlan, ServerSegmentation  # noqa: E402

pytestmark = pytest.mark.slicer
SHAPE = (8, 40, 48)  # k, j, i


@pytest.fixture
def scene():
    """A small CT, its segmentation with a liver (slices 1-6, a block) and an empty tumour."""
    scene = fresh_scene()
    geometry = ImageGeometry((SHAPE[2], SHAPE[1], SHAPE[0]), (0.8, 0.8, 2.5), (0.0, 0.0, 0.0), np.eye(3))
    ct = CTVolume(np.full(SHAPE, 60, dtype=np.int16), geometry)
    volume = MRMLBridge.volume_node_from_ct(ct, "ct", scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    logic = SegmentationLogic(scene=scene)
    logic.prepare_segmentation(segmentation, volume)
    ids = logic.ensure_standard_segments(segmentation)
    liver = np.zeros(SHAPE, bool)
    liver[1:7, 5:35, 5:30] = True
    logic.write_mask(segmentation, ids[LIVER], volume, liver, save_undo=False)
    return volume, segmentation, logic, ids, liver


def plan_for(server, volume, segmentation, ids, container, fix_slices=None, existing=None, container_id="liver"):
    """What ``plan_propagation`` builds for the tumour (no server session: the job's answer is given)."""
    return PropagationPlan(server, segmentation, volume, ids[TUMOR], TUMOR, 2, (1.0, 0.0, 0.0), {}, ("ct", 1), {},
                           fix_slices, existing, container, lambda client: "session",
                           ids[LIVER] if container_id == "liver" else container_id)  # fmt: skip


def answer(mask):
    return {"segments": [{"name": TUMOR, "label": 2, "color": [1.0, 0.0, 0.0], "mask": mask}], "review": {}}


def tumour_past_the_liver():
    """A lesion on slices 2-4 at the liver's right edge, 4 voxels of each of its rows outside the liver."""
    tumour = np.zeros(SHAPE, bool)
    tumour[2:5, 15:22, 24:34] = True
    return tumour


def test_the_liver_takes_the_tumour_voxels_outside_it_in_the_tumours_undo_step(scene):
    volume, segmentation, logic, ids, liver = scene
    server = ServerSegmentation(logic)
    tumour = tumour_past_the_liver()
    plan = plan_for(server, volume, segmentation, ids, liver.copy())
    server.apply_propagation(plan, answer(tumour))
    liver_now = MRMLBridge.segment_mask(segmentation, ids[LIVER], volume)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume), tumour)
    np.testing.assert_array_equal(liver_now, liver | tumour)  # exactly the tumour's voxels outside it, nothing else
    assert (tumour & ~liver).sum() == 3 * 7 * 4
    logic.undo()  # one step takes back the tumour and the liver's gain together
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)
    assert not MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume).any()


def test_a_tumour_inside_the_liver_leaves_the_liver_as_it_is(scene):
    volume, segmentation, logic, ids, liver = scene
    server = ServerSegmentation(logic)
    tumour = tumour_past_the_liver() & liver
    server.apply_propagation(plan_for(server, volume, segmentation, ids, liver.copy()), answer(tumour))
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume), tumour)


def test_a_tumour_not_clipped_to_the_liver_gives_it_nothing(scene):
    """Without *Keep tumours inside the liver* there is no container: the liver is not the tumour's."""
    volume, segmentation, logic, ids, liver = scene
    server = ServerSegmentation(logic)
    tumour = tumour_past_the_liver()
    server.apply_propagation(plan_for(server, volume, segmentation, ids, None, container_id=None), answer(tumour))
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)


def test_a_fix_gives_the_liver_only_the_voxels_of_the_slices_it_changed(scene):
    """A fix writes the slices whose tumour changed; the liver gains what lies outside it there only (here the
    tumour's part outside the liver on slices 2-3 is not in the liver, and the fix changed slice 4 only)."""
    volume, segmentation, logic, ids, liver = scene
    server = ServerSegmentation(logic)
    before = tumour_past_the_liver()
    before[4] = False
    logic.write_mask(segmentation, ids[TUMOR], volume, before, save_undo=False)
    fixed = tumour_past_the_liver()
    plan = plan_for(server, volume, segmentation, ids, liver.copy(), fix_slices=[4], existing=before)
    assert server.apply_propagation(plan, answer(fixed)) == [4]
    expected = liver.copy()
    expected[4] |= fixed[4]
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), expected)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume), fixed)


def test_a_liver_deleted_while_the_job_ran_is_not_recreated(scene):
    volume, segmentation, logic, ids, liver = scene
    server = ServerSegmentation(logic)
    plan = plan_for(server, volume, segmentation, ids, liver.copy())
    segmentation.GetSegmentation().RemoveSegment(ids[LIVER])
    server.apply_propagation(plan, answer(tumour_past_the_liver()))
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume), tumour_past_the_liver())
    assert segmentation.GetSegmentation().GetSegment(ids[LIVER]) is None


def test_a_fix_gives_nothing_from_a_slice_between_the_ones_it_changed(scene):
    volume, segmentation, logic, ids, liver = scene
    server = ServerSegmentation(logic)
    before = tumour_past_the_liver()
    before[[2, 4]] = False
    logic.write_mask(segmentation, ids[TUMOR], volume, before, save_undo=False)
    plan = plan_for(server, volume, segmentation, ids, liver.copy(), fix_slices=[2, 4], existing=before)
    assert server.apply_propagation(plan, answer(tumour_past_the_liver())) == [2, 4]
    expected = liver | (tumour_past_the_liver() & ~liver)
    expected[3] = liver[3]  # slice 3 did not change: its tumour part outside the liver stays outside
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), expected)


def test_a_liver_renamed_while_the_job_ran_takes_the_voxels_and_the_tumour_keeps_them(scene):
    """The tumour's write protects the container it was sent, and the container's write the tumour, by ID: a
    renamed liver is not "the liver" by name, and the Segment Editor's default overwrite mode would take the
    voxels from the tumour."""
    volume, segmentation, logic, ids, liver = scene
    server = ServerSegmentation(logic)
    tumour = tumour_past_the_liver()
    plan = plan_for(server, volume, segmentation, ids, liver.copy())
    segmentation.GetSegmentation().GetSegment(ids[LIVER]).SetName("Liver (edited)")
    server.apply_propagation(plan, answer(tumour))
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume), tumour)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver | tumour)
