"""LiverSAMLib.SegmentationLogic against slicer-core's real MRML, on real CT (lits117, dcmqi_ct3slice).

Segments with terminology, masks written through the Segment Editor logic (editable area, overwrite,
undo shared with manual edits only while the Segment Editor edits the same segmentation), the defects of
issue 12 (liver writes keep every tumour voxel, one undo state per live-update action, the Segment
Editor's selection never switched, no segment added unasked, results of a closed scene dropped), results
of the core pipeline, the review report and lesion table of the core, exports read back (seg.nrrd and
labelmaps by MRML, DICOM SEG by ``liversam export`` in the LiverSAM environment). The model runs in the
server: see ``test_slicer_server_path.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_harness import MODULE_DIR, ensure_module_on_path, fresh_scene, shared_data_dir

ensure_module_on_path()

import slicer  # noqa: E402

from liversam.ct_io import read_ct  # noqa: E402
from liversam.errors import OutputError  # noqa: E402
from liversam.segmentation import Segment, SegmentationResult  # noqa: E402
from LiverSAMLib import MRMLBridge  # noqa: E402
from LiverSAMLib.SegmentationLogic import LIVER, SEGMENT_EDITOR_SINGLETON_TAG, TUMOR, SegmentationLogic  # noqa: E402
from LiverSAMLib.ServerRequests import review_rows  # noqa: E402

pytestmark = pytest.mark.slicer


@pytest.fixture(scope="module")
def lits117():
    """(CTVolume, labels [k, j, i]: 1 liver, 2 tumour) of the real example case."""
    folder = shared_data_dir() / "lits117"
    ct = read_ct(folder / "ct.nii.gz")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz")))
    return ct, labels


@pytest.fixture
def case(lits117):
    """A fresh scene with the CT as a volume node and an empty segmentation holding liver + tumor."""
    scene = fresh_scene()
    ct, labels = lits117
    volume = MRMLBridge.volume_node_from_ct(ct, name="lits117", scene=scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    logic = SegmentationLogic(scene=scene)
    logic.prepare_segmentation(segmentation, volume)
    ids = logic.ensure_standard_segments(segmentation)
    return scene, volume, segmentation, logic, ids, ct, labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_standard_segments_have_terminology_colour_and_are_not_duplicated(case):
    _scene, _volume, segmentation, logic, ids, _ct, _labels = case
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 2
    assert seg.GetSegment(ids[LIVER]).GetName() == LIVER
    assert "SCT^10200004^Liver" in seg.GetSegment(ids[LIVER]).GetTerminology()
    assert "SCT^108369006^Neoplasm" in seg.GetSegment(ids[TUMOR]).GetTerminology()
    np.testing.assert_allclose(
        seg.GetSegment(ids[LIVER]).GetColor(), (221 / 255, 130 / 255, 101 / 255), atol=1e-6
    )
    assert logic.ensure_standard_segments(segmentation) == ids
    assert seg.GetNumberOfSegments() == 2


def test_mask_written_reads_back_equal_and_ct_is_unchanged(case):
    _scene, volume, segmentation, logic, ids, ct, labels = case
    before = np.array(slicer.util.arrayFromVolume(volume), copy=True)
    liver = labels == 1
    logic.write_mask(segmentation, ids[LIVER], volume, liver)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)
    assert int(liver.sum()) == 485268  # the data README's count
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before)
    np.testing.assert_array_equal(ct.array_kji, before)
    assert not logic.segment_is_empty(segmentation, ids[LIVER])
    assert logic.segment_is_empty(segmentation, ids[TUMOR])


def test_slice_write_touches_only_that_slice_and_undo_restores(case):
    _scene, volume, segmentation, logic, ids, _ct, labels = case
    liver = labels == 1
    logic.write_mask(segmentation, ids[LIVER], volume, liver)
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    new_slice = np.zeros(liver.shape[1:], bool)
    new_slice[10:30, 40:90] = True
    logic.write_slices(segmentation, ids[LIVER], volume, new_slice, k)
    expected = liver.copy()
    expected[k] = new_slice
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), expected)
    assert logic.can_undo()
    logic.undo()
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)
    logic.redo()
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), expected)


def shared_editor_node(scene, segmentation=None, volume=None):
    """The Segment Editor module's node (its singleton tag), editing ``segmentation`` when given."""
    node = scene.GetSingletonNode(SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
        node.UnRegister(None)
        node.SetSingletonTag(SEGMENT_EDITOR_SINGLETON_TAG)
        node = scene.AddNode(node)
    node.SetAndObserveSegmentationNode(segmentation)
    node.SetAndObserveSourceVolumeNode(volume)
    return node


def test_editable_area_of_the_segment_editor_applies_when_it_edits_the_same_segmentation(case):
    scene, volume, segmentation, logic, ids, _ct, labels = case
    liver = labels == 1
    logic.write_mask(segmentation, ids[LIVER], volume, liver)
    editor = shared_editor_node(scene, segmentation, volume)
    # Editable area: inside the liver only; overwrite other segments (Slicer's default).
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(ids[LIVER])
    editor.SetOverwriteMode(editor.OverwriteAllSegments)
    lesion = logic.ensure_segment(segmentation, "lesion 2")
    box = np.zeros_like(liver)
    box[40:80, 30:100, 20:110] = True
    logic.write_mask(segmentation, lesion, volume, box)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, lesion, volume), box & liver)
    # A segment inside the liver never erases it, whatever the overwrite mode says.
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)
    assert editor.GetOverwriteMode() == editor.OverwriteAllSegments  # the user's setting is untouched
    logic.undo()
    assert not MRMLBridge.segment_mask(segmentation, lesion, volume).any()
    # The Segment Editor on another segmentation: its editable area does not apply to this one.
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    editor.SetAndObserveSegmentationNode(other)
    logic.write_mask(segmentation, lesion, volume, box)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, lesion, volume), box)


def test_a_write_replaces_the_segment_under_outside_all_segments(case):
    """The editable area "outside all segments" leaves out the other segments only: a smaller mask replaces the
    segment, whole or slab by slab (the written segment was not selected on LiverSAM's editor node, so its own
    voxels counted as not editable and a segment could only grow)."""
    scene, volume, segmentation, logic, ids, _ct, labels = case
    editor = shared_editor_node(scene, segmentation, volume)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    liver = labels >= 1
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    smaller = np.zeros_like(liver)
    smaller[k - 2 : k + 3] = liver[k - 2 : k + 3]
    logic.write_mask(segmentation, ids[LIVER], volume, liver)
    logic.write_mask(segmentation, ids[LIVER], volume, smaller)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), smaller)
    logic.write_mask(segmentation, ids[LIVER], volume, liver)
    logic.write_mask(segmentation, ids[LIVER], volume, smaller, k_range=(k - 5, k + 5))
    expected = liver.copy()
    expected[k - 5 : k + 6] = smaller[k - 5 : k + 6]
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), expected)


def test_a_tumour_slab_write_inside_the_liver_gives_the_liver_nothing(case):
    """Under the editable area "inside liver" an erase hands the erased voxels to the liver (Slicer's split by
    erasing): a tumour's live update or fix must not move its old voxels into the liver. Tumour outside the liver
    lies outside the editable area and stays, as Slicer's own "set" keeps a segment outside the editable area."""
    scene, volume, segmentation, logic, ids, _ct, labels = case
    tumour = labels == 2
    cut = np.zeros_like(tumour)
    cut[:, :, : tumour.shape[2] // 2] = True
    liver = (labels >= 1) & ~(tumour & cut)  # the liver's mask leaves out part of the lesions
    outside = tumour & ~liver
    assert outside.any() and (tumour & liver).any()
    logic.write_mask(segmentation, ids[LIVER], volume, liver)
    logic.write_mask(segmentation, ids[TUMOR], volume, tumour)
    editor = shared_editor_node(scene, segmentation, volume)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(ids[LIVER])
    ks = np.flatnonzero(outside.any(axis=(1, 2)) & (tumour & liver).any(axis=(1, 2)))
    k = int(ks[len(ks) // 2])
    logic.write_mask(segmentation, ids[TUMOR], volume, np.zeros_like(tumour), k_range=(k - 1, k + 1))  # a fix
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)
    expected = tumour.copy()
    expected[k - 1 : k + 2] = outside[k - 1 : k + 2]
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume), expected)
    assert logic.editor_node().GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment
    logic.write_mask(segmentation, ids[TUMOR], volume, tumour, k_range=(k - 1, k + 1))  # written back
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume), tumour)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)


def test_liver_write_keeps_every_tumour_voxel_in_overwrite_all_mode(case):
    """Issue 12 item 5: the Segment Editor's default overwrite mode must not erase tumours under a liver
    write, on every write path (live update, propagation, fix, pipeline result)."""
    scene, volume, segmentation, logic, ids, ct, labels = case
    editor = shared_editor_node(scene, segmentation, volume)
    editor.SetOverwriteMode(editor.OverwriteAllSegments)
    tumour = labels == 2
    logic.write_mask(segmentation, ids[TUMOR], volume, tumour)
    liver = labels >= 1  # the liver includes its tumours
    k = int(np.argmax(tumour.sum(axis=(1, 2))))
    logic.apply_slice_masks({k: liver[k]}, segmentation, ids[LIVER], volume, undo_key=("live", k))  # live update
    logic.write_mask(segmentation, ids[LIVER], volume, liver)  # propagation
    logic.write_mask(segmentation, ids[LIVER], volume, liver, k_range=(k - 3, k + 3))  # a fix
    logic.apply_result(SegmentationResult(ct.geometry, [Segment(LIVER, 1, liver)]), segmentation, volume)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume), tumour)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)
    # The test can fail: without the protection (the old behaviour) the liver write erases the tumour.
    logic.protected_segments = lambda *_args: []
    logic.write_mask(segmentation, ids[LIVER], volume, liver)
    assert not MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume).any()


def test_live_updates_of_one_action_are_one_undo_state(case):
    """Issue 12 item 8: five live updates while the user moves a box on one slice are one undo step, so the
    user's earlier edits stay in the (10-state) history."""
    _scene, volume, segmentation, logic, ids, _ct, labels = case
    liver = labels >= 1
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    manual = np.zeros_like(liver)
    manual[k + 5, 100:120, 100:120] = True
    logic.write_mask(segmentation, ids[LIVER], volume, manual)  # an earlier, separate action
    key = (segmentation.GetID(), ids[LIVER], (k,))
    for step in range(5):
        mask = np.zeros(liver.shape[1:], bool)
        mask[50 + step : 150, 60:160] = True
        logic.apply_slice_masks({k: mask}, segmentation, ids[LIVER], volume, undo_key=key)
    logic.undo()  # one undo removes all five live updates ...
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), manual)
    logic.undo()  # ... and the next one the earlier action
    assert not MRMLBridge.segment_mask(segmentation, ids[LIVER], volume).any()
    # A new action (after Clear prompts, Propagate, Undo) gets its own state.
    logic.apply_slice_masks({k: liver[k]}, segmentation, ids[LIVER], volume, undo_key=("a",))
    logic.end_user_action()
    logic.apply_slice_masks({k + 1: liver[k + 1]}, segmentation, ids[LIVER], volume, undo_key=("a",))
    logic.undo()
    assert MRMLBridge.segment_mask(segmentation, ids[LIVER], volume)[k].any()
    assert not MRMLBridge.segment_mask(segmentation, ids[LIVER], volume)[k + 1].any()


def test_writes_never_switch_the_segment_editor_selection(case):
    """Issue 12 item 8: LiverSAM writes through its own hidden editor node; the Segment Editor module keeps
    showing the segmentation and source volume the user chose."""
    scene, volume, segmentation, logic, ids, _ct, labels = case
    other_segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user's")
    other_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "user's volume")
    editor = shared_editor_node(scene, other_segmentation, other_volume)
    logic.write_mask(segmentation, ids[LIVER], volume, labels >= 1)
    logic.apply_slice_masks({5: (labels >= 1)[5]}, segmentation, ids[LIVER], volume)
    assert editor.GetSegmentationNode() is other_segmentation and editor.GetSourceVolumeNode() is other_volume
    own = logic.editor_node()
    assert own is not editor and own.GetHideFromEditors() and not own.GetSaveWithScene()
    assert own.GetSegmentationNode() is segmentation


def test_choosing_a_segmentation_adds_no_segment(case):
    """Issue 12 item 8: selecting an output segmentation only sets its geometry; segments come when asked."""
    import ast

    from slicer_harness import MODULE_DIR

    scene, volume, _segmentation, logic, _ids, _ct, _labels = case
    chosen = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen")
    chosen.GetSegmentation().AddEmptySegment("kidney", "kidney")
    logic.prepare_segmentation(chosen, volume)
    segmentation = chosen.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())] == ["kidney"]
    tree = ast.parse((MODULE_DIR / "LiverSAM.py").read_text(encoding="utf-8"))
    handler = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "onOutputSegmentationChanged")
    called = {n.func.attr for n in ast.walk(handler) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "prepare_segmentation" in called and not called & {"ensure_segment", "ensure_standard_segments"}


def test_results_of_a_closed_scene_are_dropped(case):
    """Issue 12 item 9: an answer that arrives after the scene closed is never written (the widget's
    onSceneStartClose invalidates the call queue), a queued call never runs; later calls work."""
    import threading
    import time

    from LiverSAMLib.BackgroundCalls import CallQueue

    _scene, volume, segmentation, logic, ids, _ct, labels = case
    calls = CallQueue()
    release = threading.Event()
    ran, written = [], []

    def slow_server_answer():
        ran.append(True)
        release.wait(10)
        return {40: (labels >= 1)[40]}

    def write(masks):
        logic.apply_slice_masks(masks, segmentation, ids[LIVER], volume)
        written.append(True)

    calls.submit(slow_server_answer, write, name="live update")
    calls.submit(slow_server_answer, write, name="queued")
    deadline = time.monotonic() + 10
    while not ran and time.monotonic() < deadline:
        calls.poll(0.01)
    calls.invalidate()  # scene StartCloseEvent
    release.set()
    while not calls.idle() and time.monotonic() < deadline:
        calls.poll(0.05)
    calls.poll(0.05)
    assert ran == [True] and written == [] and logic.segment_is_empty(segmentation, ids[LIVER])
    calls.submit(lambda: {41: (labels >= 1)[41]}, write)
    while not written and time.monotonic() < deadline + 10:
        calls.poll(0.05)
    assert written == [True] and not logic.segment_is_empty(segmentation, ids[LIVER])
    calls.close()


def test_external_undo_callback_is_used_only_while_the_segment_editor_edits_this_segmentation(case):
    scene, volume, segmentation, _logic, ids, _ct, labels = case
    calls = []
    logic = SegmentationLogic(scene=scene, save_state_for_undo=lambda: calls.append("saved"),
                              undo_shared=lambda: calls.append("undo"))  # fmt: skip
    logic.write_mask(segmentation, ids[LIVER], volume, labels == 1)
    assert calls == [] and logic.can_undo()  # the Segment Editor edits nothing: LiverSAM's own history
    shared_editor_node(scene, segmentation, volume)
    logic.write_mask(segmentation, ids[LIVER], volume, labels >= 1)
    assert calls == ["saved"] and logic.shares_undo
    logic.undo()
    assert calls == ["saved", "undo"]


def test_wrong_shape_and_missing_segment_are_output_errors(case):
    _scene, volume, segmentation, logic, ids, _ct, labels = case
    with pytest.raises(OutputError, match="does not match"):
        logic.write_mask(segmentation, ids[LIVER], volume, np.zeros((3, 4, 5), bool))
    with pytest.raises(OutputError, match="no segment"):
        logic.write_mask(segmentation, "nope", volume, labels == 1)


def test_pipeline_result_goes_into_segments_with_one_undo_state(case):
    _scene, volume, segmentation, logic, ids, ct, labels = case
    result = SegmentationResult(
        geometry=ct.geometry,
        segments=[
            Segment(LIVER, 1, labels >= 1),
            Segment(TUMOR, 2, labels == 2),
            Segment("lesion 1", 3, labels == 2),
        ],
    )
    written = logic.apply_result(
        result, segmentation, volume, protect={TUMOR: [LIVER], "lesion 1": [LIVER, TUMOR]}
    )
    assert written[LIVER] == ids[LIVER] and written[TUMOR] == ids[TUMOR]
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 3
    assert (
        "SCT^108369006^Neoplasm"
        in segmentation.GetSegmentation().GetSegment(written["lesion 1"]).GetTerminology()
    )
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), labels >= 1)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume), labels == 2)
    logic.undo()
    assert not MRMLBridge.segment_mask(segmentation, ids[LIVER], volume).any()
    round_trip = logic.result_from_segmentation(segmentation, volume, [ids[LIVER], ids[TUMOR]])
    assert [s.name for s in round_trip.segments] == [LIVER, TUMOR]
    assert round_trip.geometry.is_close(ct.geometry)


def test_result_on_another_grid_is_refused(case):
    _scene, volume, segmentation, logic, _ids, ct, labels = case
    from liversam.geometry import ImageGeometry

    other = ImageGeometry(ct.geometry.size_ijk, (2.0, 2.0, 2.0), ct.geometry.origin_lps)
    with pytest.raises(OutputError, match="different grid"):
        logic.apply_result(SegmentationResult(other, [Segment(LIVER, 1, labels == 1)]), segmentation, volume)


def test_seg_nrrd_written_by_mrml_reads_back_equal(case, tmp_path):
    scene, volume, segmentation, logic, ids, _ct, labels = case
    logic.write_mask(segmentation, ids[LIVER], volume, labels >= 1)
    logic.write_mask(segmentation, ids[TUMOR], volume, labels == 2, protect_segment_ids=[ids[LIVER]])
    path = logic.export_seg_nrrd(segmentation, tmp_path / "case.seg.nrrd")
    assert path.is_file() and not list(tmp_path.glob(".case*"))  # atomic: no temporary left
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    assert storage.ReadData(loaded)
    seg = loaded.GetSegmentation()
    assert seg.GetNumberOfSegments() == 2
    liver_id, tumor_id = seg.GetSegmentIdBySegmentName(LIVER), seg.GetSegmentIdBySegmentName(TUMOR)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(loaded, liver_id, volume), labels >= 1)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(loaded, tumor_id, volume), labels == 2)
    assert "SCT^10200004^Liver" in seg.GetSegment(liver_id).GetTerminology()
    with pytest.raises(OutputError, match=".seg.nrrd"):
        logic.export_seg_nrrd(segmentation, tmp_path / "case.nrrd")


def test_labelmap_export_has_segment_order_labels(case, tmp_path):
    scene, volume, segmentation, logic, ids, ct, labels = case
    logic.write_mask(segmentation, ids[LIVER], volume, labels == 1)
    logic.write_mask(segmentation, ids[TUMOR], volume, labels == 2)
    nodes_before = scene.GetNumberOfNodes()
    path = logic.export_labelmap(segmentation, volume, tmp_path / "labels.nii.gz")
    assert scene.GetNumberOfNodes() == nodes_before  # no labelmap, display or colour table node left behind
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    np.testing.assert_allclose(image.GetOrigin(), ct.geometry.origin_lps, atol=1e-4)
    with pytest.raises(OutputError):
        logic.export_labelmap(segmentation, volume, tmp_path / "labels.png")


def test_lesion_table_of_the_tumor_segment_is_the_core_table(case):
    """The module's lesion table is ``liversam.lesions.lesion_table_from_mask`` of the tumor segment in MRML."""
    from liversam.lesions import lesion_table_from_mask

    _scene, volume, segmentation, logic, ids, ct, labels = case
    assert logic.lesion_table(segmentation, volume) == []  # empty tumor segment: no lesion
    logic.write_mask(segmentation, ids[TUMOR], volume, labels == 2)
    table = logic.lesion_table(segmentation, volume)
    assert table == lesion_table_from_mask(labels == 2, ct.geometry, TUMOR)
    assert len(table) >= 2  # lits117 has several lesions
    assert sum(lesion.voxels for lesion in table) == 130083  # the data README's count (1 mm voxels)
    assert sum(lesion.volume_ml for lesion in table) == pytest.approx(130.083, abs=1e-3)
    assert [lesion.lesion_id for lesion in table] == list(range(1, len(table) + 1))
    assert table[0].volume_ml >= table[-1].volume_ml and table[0].longest_axial_diameter_mm > 5
    first = table[0]
    assert 0 <= first.slice_first <= first.slice_last < labels.shape[0]
    centre_ijk = ct.geometry.lps_to_ijk(np.asarray(first.centre_lps))
    assert first.slice_first - 0.5 <= float(np.ravel(centre_ijk)[2]) <= first.slice_last + 0.5


def test_review_rows_are_the_core_review_flags(lits117):
    ct, labels = lits117
    liver = labels >= 1
    jumpy = liver.copy()
    areas = liver.sum(axis=(1, 2))
    k_mid = int(np.flatnonzero(areas)[3])  # a slice near the liver's end, with a small area
    assert areas[k_mid] * 2.5 < jumpy[k_mid].size
    jumpy[k_mid, :, :] = True  # the whole slice: leakage, the area jumps
    segment = Segment(LIVER, 1, jumpy, slice_scores={k_mid: 0.2, k_mid + 1: 0.9})
    from liversam.review import ReviewSettings, build_review_report

    all_flags = ReviewSettings(organ_flags_off=())  # organs do without area_jump by default
    rows = review_rows(build_review_report(SegmentationResult(ct.geometry, [segment]), all_flags))
    flagged = {row.k: row for row in rows}
    assert "low_score" in flagged[k_mid].flags and "area_jump" in flagged[k_mid].flags
    assert "low model score 0.20" in flagged[k_mid].reason and "sudden area change" in flagged[k_mid].reason
    assert flagged[k_mid].segment == LIVER and flagged[k_mid].score == pytest.approx(0.2)
    assert flagged[k_mid].area_mm2 == pytest.approx(jumpy[k_mid].sum() * 1.0)  # 1 x 1 mm pixels
    assert k_mid + 1 not in flagged or "low_score" not in flagged[k_mid + 1].flags
    assert [row.k for row in rows] == sorted(row.k for row in rows)
    # Stricter review settings flag more slices.
    strict = review_rows(build_review_report(SegmentationResult(ct.geometry, [segment]), ReviewSettings(min_score=0.95)))
    assert any(row.k == k_mid + 1 and "low_score" in row.flags for row in strict)


class SegmentEditorWidgetUndo:
    """The undo part of ``qMRMLSegmentEditorWidget`` (Slicer >= 5.10): its slots delegate to its own
    ``vtkSlicerSegmentEditorLogic`` on the Segment Editor node. Manual edits go through it too."""

    def __init__(self, scene, editor_node) -> None:
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetMaximumNumberOfUndoStates(10)
        self.logic.SetSegmentEditorNode(editor_node)

    def saveStateForUndo(self) -> None:
        self.logic.SaveStateForUndo()

    def undo(self) -> None:
        self.logic.Undo()

    def redo(self) -> None:
        self.logic.Redo()


def test_undo_is_shared_with_manual_segment_editor_edits(case):
    scene, volume, segmentation, own_logic, ids, _ct, labels = case
    editor = SegmentEditorWidgetUndo(scene, shared_editor_node(scene, segmentation, volume))
    logic = SegmentationLogic(
        scene=scene,
        save_state_for_undo=editor.saveStateForUndo,
        undo_shared=editor.undo,
        redo_shared=editor.redo,
    )
    liver = labels >= 1
    logic.write_mask(segmentation, ids[LIVER], volume, liver)  # LiverSAM's write
    assert logic.shares_undo and logic.editor_node() is not editor.logic.GetSegmentEditorNode()
    # A manual Erase stroke in the Segment Editor: it saves its state, then removes a slab.
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    editor.saveStateForUndo()
    erase = MRMLBridge.oriented_image_from_slab(
        np.ones((3,) + liver.shape[1:], bool),
        k - 1,
        MRMLBridge.ijk_to_segmentation_matrix(volume, segmentation),
    )
    editor.logic.ModifySegmentByLabelmap(
        segmentation,
        ids[LIVER],
        erase,
        editor.logic.ModificationModeRemove,
        list(erase.GetExtent()),
        True,
        False,
    )
    erased = liver.copy()
    erased[k - 1 : k + 2] = False
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), erased)
    # Ctrl+Z twice (from LiverSAM): first the manual edit, then LiverSAM's write, from one history.
    logic.undo()
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)
    logic.undo()
    assert not MRMLBridge.segment_mask(segmentation, ids[LIVER], volume).any()
    assert not logic.can_undo()  # nothing went into LiverSAM's own history
    logic.redo()
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)


def test_dicom_seg_export_reads_back_equal_on_the_dicom_grid(tmp_path):
    """dcmqi_ct3slice: CT series -> volume node, the dcmqi liver into a segment, DICOM SEG export, read back."""
    from liversam.dicom_seg import read_dicom_seg

    folder = shared_data_dir() / "dcmqi_ct3slice"
    ct = read_ct(folder / "ct")
    scene = fresh_scene()
    volume = MRMLBridge.volume_node_from_ct(ct, name="ct3slice", scene=scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    logic = SegmentationLogic(scene=scene)
    logic.prepare_segmentation(segmentation, volume)
    ids = logic.ensure_standard_segments(segmentation)
    liver = read_dicom_seg(folder / "liver_seg.dcm", reference=ct.geometry).segments[0].mask_kji
    assert int(liver.sum()) == 107098  # the data README's count
    logic.write_mask(segmentation, ids[LIVER], volume, liver)

    # The reference as a folder, and as the list of files Slicer's DICOM database gives. The SEG is written
    # by `liversam export` in the LiverSAM environment (here: this test's Python and checkout).
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": str(MODULE_DIR)}
    files = sorted((folder / "ct").glob("*.dcm"))
    for reference, name in ((folder / "ct", "folder.dcm"), (files, "files.dcm")):
        export = logic.prepare_dicom_seg_export(
            segmentation, volume, tmp_path / name, reference, sys.executable, model_name="litemedsam"
        )
        path = export.run(env=env)
        assert path.is_file() and not export.work_folder.exists()  # temporary files removed
        back = read_dicom_seg(path, reference=ct.geometry)
        assert [seg.name for seg in back.segments] == [LIVER]  # the empty tumor segment is left out
        np.testing.assert_array_equal(back.segments[0].mask_kji, liver)
        assert back.geometry.is_close(ct.geometry)
    with pytest.raises(OutputError, match="DICOM files"):
        logic.prepare_dicom_seg_export(segmentation, volume, tmp_path / "none.dcm", [], sys.executable)
    with pytest.raises(OutputError, match="no non-empty segment"):
        logic.prepare_dicom_seg_export(segmentation, volume, tmp_path / "e.dcm", folder / "ct", sys.executable, segment_ids=[])
    with pytest.raises(OutputError, match="Server section"):
        logic.prepare_dicom_seg_export(segmentation, volume, tmp_path / "e.dcm", folder / "ct", "")
    failing = logic.prepare_dicom_seg_export(segmentation, volume, tmp_path / "bad.dcm", tmp_path, sys.executable)
    with pytest.raises(OutputError, match="failed"):
        failing.run(env=env)  # no DICOM series in tmp_path: the export's own error reaches the user


def test_review_list_shows_ranges_with_reasons_and_jumps_to_their_first_slice(lits117):
    """Issue 18: the module's review list is the core report's items (ranges of consecutive flagged slices with
    the reason in words), not one row per slice; a report without items still gives one row per flagged slice."""
    ct, labels = lits117
    from liversam.review import build_review_report
    from LiverSAMLib.ServerRequests import review_items

    liver = labels >= 1
    ks = np.flatnonzero(liver.any(axis=(1, 2)))
    scores = {int(k): 0.95 for k in ks}
    low = [int(k) for k in ks[40:44]]  # four consecutive slices the model was unsure of
    scores.update({k: 0.3 for k in low})
    report = build_review_report(SegmentationResult(ct.geometry, [Segment(LIVER, 1, liver, slice_scores=scores)]))
    items = review_items(report)
    assert items, report.get("items")
    assert len(items) <= 10
    covering = [item for item in items if item.first_slice <= low[0] and low[-1] <= item.last_slice]
    assert covering and covering[0].segment == LIVER and covering[0].reason
    assert covering[0].slices == f"{covering[0].first_slice}-{covering[0].last_slice}"
    old_style = {key: value for key, value in report.items() if key != "items"}
    per_slice = review_items(old_style)
    assert [i.first_slice for i in per_slice] == [r.k for r in review_rows(old_style)]
    assert all(i.first_slice == i.last_slice for i in per_slice)
