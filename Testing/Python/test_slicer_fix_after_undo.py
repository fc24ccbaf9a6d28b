"""Propagate, Undo, change a prompt, Propagate: a propagation again, not a fix of the changed slice.

After a propagation the module plans the next Propagate as a fix of the slices whose prompts changed
(``ServerRequests.plan_repropagation``): the server re-propagates those slices and at most one slice each way
(``liversam.propagation.REPROPAGATION_MAX_REACH``) on the segment as it is. Undo (the module's, on slicer-core's real
Segment Editor logic here) takes the propagation back, but its record stayed: the next Propagate after a changed prompt
was planned as a fix of an otherwise empty segment, and wrote three slices of the liver. The job's answer is built
here (what ``LiverSAMClient.job_result`` returns), so no model runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from slicer_harness import ensure_module_on_path, fresh_scene

ensure_module_on_path()

from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.prompts import SlicePrompts  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge, ServerRequests  # noqa: E402
from LiverSAMLib.SegmentationLogic import LIVER, SegmentationLogic  # noqa: E402
from LiverSAMLib.ServerSegmentation import ServerSegmentation  # noqa: E402

pytestmark = pytest.mark.slicer
SHAPE = (10, 30, 32)  # k, j, i
BOX = MRMLBridge.BoxPrompt(k=4, i0=5, j0=5, i1=25, j1=22, k_min=4, k_max=4)
WINDOW = (40.0, 400.0)


@pytest.fixture
def propagated():
    """A liver propagated from a box on slice 4 over slices 1-8 (one undo step), after a live update of slice 4."""
    scene = fresh_scene()
    geometry = ImageGeometry((SHAPE[2], SHAPE[1], SHAPE[0]), (0.8, 0.8, 2.5), (0.0, 0.0, 0.0), np.eye(3))
    volume = MRMLBridge.volume_node_from_ct(CTVolume(np.full(SHAPE, 60, np.int16), geometry), "ct", scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    logic = SegmentationLogic(scene=scene)
    logic.prepare_segmentation(segmentation, volume)
    liver_id = logic.ensure_segment(segmentation, LIVER)
    liver = np.zeros(SHAPE, bool)
    liver[1:9, 6:22, 6:25] = True
    logic.apply_slice_masks({4: liver[4]}, segmentation, liver_id, volume)  # the box's live update
    logic.end_user_action()
    server = ServerSegmentation(logic)
    prompts = MRMLBridge.MarkupsPrompts(boxes=[BOX])
    plan = server.plan_propagation(segmentation, volume, liver_id, None, prompts, {}, WINDOW)
    assert plan.fix_slices is None
    server.apply_propagation(plan, {"segments": [{"name": LIVER, "label": 1, "mask": liver}], "review": {}})
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, liver_id, volume), liver)
    return server, logic, segmentation, volume, liver_id, liver


def with_a_point_on_slice(k: int):
    return MRMLBridge.MarkupsPrompts(positive_ijk=[(15, 14, k)], boxes=[BOX])


@pytest.mark.parametrize("live", [False, True])
def test_a_changed_prompt_after_an_undone_propagation_propagates_again(propagated, live):
    """``live``: the point's live update wrote its slice (6, one the propagation had filled) before Propagate."""
    server, logic, segmentation, volume, liver_id, liver = propagated
    logic.undo()  # the propagation taken back: the live update's slice 4 is left
    assert not MRMLBridge.segment_mask(segmentation, liver_id, volume)[[1, 2, 3, 5, 6, 7, 8]].any()
    if live:
        logic.apply_slice_masks({4: liver[4], 6: liver[6]}, segmentation, liver_id, volume)
    plan = server.plan_propagation(segmentation, volume, liver_id, None, with_a_point_on_slice(6), {}, WINDOW)
    assert plan.fix_slices is None and plan.existing is None, "planned as a fix of a propagation that was undone"


def test_a_changed_prompt_after_manual_edits_is_still_a_fix(propagated):
    """Edits of a few slices (here slices 7-8 erased) keep the fix: it builds on the segment as edited."""
    server, logic, segmentation, volume, liver_id, liver = propagated
    edited = liver.copy()
    edited[7:9] = False
    logic.write_mask(segmentation, liver_id, volume, edited)
    plan = server.plan_propagation(segmentation, volume, liver_id, None, with_a_point_on_slice(6), {}, WINDOW)
    assert plan.fix_slices == [6]
    np.testing.assert_array_equal(plan.existing, edited)


def test_the_record_names_the_slices_the_propagation_filled(propagated):
    server, _logic, segmentation, _volume, liver_id, liver = propagated
    record = server.records[(segmentation.GetID(), liver_id)]
    assert record.filled == tuple(range(1, 9))
    assert ServerRequests.propagation_still_there(record, liver)
    only_prompted = np.zeros_like(liver)
    only_prompted[4] = liver[4]
    assert not ServerRequests.propagation_still_there(record, only_prompted)
    only_prompted[6] = liver[6]  # slice 6 prompted now (its live update): not the propagation's
    assert ServerRequests.propagation_still_there(record, only_prompted)
    assert not ServerRequests.propagation_still_there(record, only_prompted, {6: None})
    # a propagation that filled only its prompted slice is told by that slice: still there while it holds voxels
    record = ServerRequests.record_of({4: SlicePrompts(boxes_ij=[(5, 5, 25, 22)])}, ("ct", 1), {}, "", LIVER, filled=[4])
    assert ServerRequests.propagation_still_there(record, only_prompted)
    assert not ServerRequests.propagation_still_there(record, np.zeros_like(liver))
    # a propagation that found nothing: a fix builds on the same empty segment
    empty = ServerRequests.record_of({4: SlicePrompts(boxes_ij=[(5, 5, 25, 22)])}, ("ct", 1), {}, "", LIVER)
    assert ServerRequests.propagation_still_there(empty, np.zeros_like(liver))


def test_an_undone_propagation_of_its_prompted_slice_only_propagates_again(propagated):
    """A propagation that filled only the prompted slice (a lesion on one slice), with live updates off: Undo leaves the
    segment empty, and a fix of the new prompt's slice on it left the first prompt's slice empty."""
    server, logic, segmentation, volume, liver_id, liver = propagated
    logic.undo()  # the fixture's propagation
    logic.undo()  # and its live update: live updates off
    assert not MRMLBridge.segment_mask(segmentation, liver_id, volume).any()
    one_slice = np.zeros_like(liver)
    one_slice[4] = liver[4]
    prompts = MRMLBridge.MarkupsPrompts(boxes=[BOX])
    plan = server.plan_propagation(segmentation, volume, liver_id, None, prompts, {}, WINDOW)
    assert plan.fix_slices is None
    server.apply_propagation(plan, {"segments": [{"name": LIVER, "label": 1, "mask": one_slice}], "review": {}})
    assert server.records[(segmentation.GetID(), liver_id)].filled == (4,)
    logic.undo()
    assert not MRMLBridge.segment_mask(segmentation, liver_id, volume).any()
    plan = server.plan_propagation(segmentation, volume, liver_id, None, with_a_point_on_slice(5), {}, WINDOW)
    assert plan.fix_slices is None and plan.existing is None, "planned as a fix of a propagation that was undone"


def test_telling_a_large_segment_still_there_copies_none_of_its_slices():
    """Planned on the main thread before every fix: a liver of 300 slices of 512 x 512 is looked at slice by slice up to
    the first voxel found (indexing it with the list of slices copied them: 79 MB, a fifth of a second)."""
    import tracemalloc

    liver = np.zeros((300, 512, 512), bool)
    liver[:, 100:400, 100:400] = True
    record = ServerRequests.record_of({150: SlicePrompts(boxes_ij=[(100, 100, 400, 400)])}, ("ct", 1), {}, "", LIVER,
                                      filled=range(300))  # fmt: skip
    tracemalloc.start()
    try:
        assert ServerRequests.propagation_still_there(record, liver)
        liver[:] = False
        liver[150, 100:400, 100:400] = True  # undone: the prompted slice only
        assert not ServerRequests.propagation_still_there(record, liver)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 512 * 512, f"{peak / 1e6:.0f} MB allocated to look at the segment"
