"""LiverSAMLib.SegmentationLogic against slicer-core's real MRML, on real CT (lits117).

Segments with terminology, masks written through the Segment Editor logic (editable area, overwrite,
undo), results of the core pipeline, exports read back by MRML, and one slice of the real model.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_harness import ensure_module_on_path, fresh_scene, shared_data_dir

ensure_module_on_path()

import slicer  # noqa: E402
from liversam.ct_io import read_ct  # noqa: E402
from liversam.errors import OutputError  # noqa: E402
from liversam.segmentation import Segment, SegmentationResult  # noqa: E402
from LiverSAMLib import MRMLBridge  # noqa: E402
from LiverSAMLib.ModelSession import ModelSession, SessionSettings, lesion_rows, review_rows  # noqa: E402
from LiverSAMLib.SegmentationLogic import LIVER, TUMOR, SegmentationLogic  # noqa: E402

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


def test_editable_area_and_overwrite_settings_of_the_segment_editor_apply(case):
    _scene, volume, segmentation, logic, ids, _ct, labels = case
    liver = labels == 1
    logic.write_mask(segmentation, ids[LIVER], volume, liver)
    editor = logic.editor_node()
    # Editable area: inside the liver only; overwrite other segments (Slicer's default).
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(ids[LIVER])
    editor.SetOverwriteMode(editor.OverwriteAllSegments)
    box = np.zeros_like(liver)
    box[40:80, 30:100, 20:110] = True
    logic.write_mask(segmentation, ids[TUMOR], volume, box)
    tumor = MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume)
    np.testing.assert_array_equal(tumor, box & liver)
    # Overwrite-all removed those voxels from the liver, as a manual Paint stroke would.
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver & ~box)
    logic.undo()
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)
    assert not MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume).any()
    # A protected liver is never overwritten, and the user's overwrite setting is restored afterwards.
    logic.write_mask(segmentation, ids[TUMOR], volume, box, protect_segment_ids=[ids[LIVER]])
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver)
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume), box & liver)
    assert editor.GetOverwriteMode() == editor.OverwriteAllSegments


def test_external_undo_callback_replaces_own_history(case):
    _scene, volume, segmentation, _logic, ids, _ct, labels = case
    calls = []
    logic = SegmentationLogic(save_state_for_undo=lambda: calls.append("saved"))
    logic.write_mask(segmentation, ids[LIVER], volume, labels == 1)
    assert calls == ["saved"] and not logic.can_undo()


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
    _scene, volume, segmentation, logic, ids, ct, labels = case
    logic.write_mask(segmentation, ids[LIVER], volume, labels == 1)
    logic.write_mask(segmentation, ids[TUMOR], volume, labels == 2)
    path = logic.export_labelmap(segmentation, volume, tmp_path / "labels.nii.gz")
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    np.testing.assert_allclose(image.GetOrigin(), ct.geometry.origin_lps, atol=1e-4)
    with pytest.raises(OutputError):
        logic.export_labelmap(segmentation, volume, tmp_path / "labels.png")


def test_lesion_table_and_review_rows_on_real_labels(lits117):
    ct, labels = lits117
    rows = lesion_rows(labels == 2, ct.geometry)
    assert len(rows) >= 2  # lits117 has several lesions
    assert sum(r["volume_ml"] for r in rows) == pytest.approx(130083 / 1000.0)  # 1 mm voxels
    assert rows[0]["volume_ml"] >= rows[-1]["volume_ml"] and rows[0]["diameter_mm"] > 5
    i, j, k = rows[0]["center_ijk"]
    assert 0 <= i < 128 and 0 <= j < 128 and 0 <= k < 128
    liver = labels >= 1
    jumpy = liver.copy()
    areas = liver.sum(axis=(1, 2))
    k_mid = int(np.flatnonzero(areas)[3])  # a slice near the liver's end, with a small area
    assert areas[k_mid] * 2.5 < jumpy[k_mid].size
    jumpy[k_mid, :, :] = True  # the whole slice: leakage, the area jumps
    segment = Segment(LIVER, 1, jumpy, slice_scores={k_mid: 0.2, k_mid + 1: 0.9})
    flagged = review_rows(SegmentationResult(ct.geometry, [segment]))
    assert (k_mid, LIVER, "low model score 0.20") in flagged
    assert any(k == k_mid and "area changes" in why for k, _n, why in flagged)


@pytest.mark.model
def test_prompted_slice_with_real_model_and_prompt_change_without_reencoding(case):
    """A box on lits117's largest liver slice: Dice vs the reference; a new point re-uses the embedding."""
    import torch

    torch.set_num_threads(2)
    scene, volume, segmentation, logic, ids, _ct, labels = case
    liver = labels >= 1
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    geometry = MRMLBridge.geometry_from_volume_node(volume)
    js, is_ = np.nonzero(liver[k])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    corners = geometry.ijk_to_ras(np.array([[is_.min(), js.min(), k], [is_.max(), js.max(), k]], dtype=float))
    roi.SetCenterWorld(*corners.mean(axis=0))
    roi.SetSizeWorld(*(np.abs(corners[1] - corners[0]) + [0.0, 0.0, 0.5]))
    prompts = MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi])
    assert prompts.slices == [k]

    session = ModelSession()
    settings = SessionSettings(model="litemedsam", device="cpu", window_level_hu=60, window_width_hu=400)
    ct_copy, key = logic.volume_copy(volume)
    assert logic.volume_copy(volume)[0] is ct_copy  # unchanged voxels: same copy, same key
    predictions = SegmentationLogic.predict_prompted_slices(session, settings, ct_copy, key, prompts)
    logic.apply_slice_predictions(predictions, segmentation, ids[LIVER], volume)
    written = MRMLBridge.segment_mask(segmentation, ids[LIVER], volume)
    assert not written[np.arange(written.shape[0]) != k].any()  # only slice k written
    slice_dice = dice(written[k], liver[k])
    assert slice_dice > 0.85, slice_dice
    predictor = session.current_predictor
    assert predictor.encoded_slices == [k]

    # Add a positive point: the mask is recomputed from the cached embedding (no new encoder pass).
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pos")
    j, i = np.argwhere(liver[k])[len(np.argwhere(liver[k])) // 2]
    points.AddControlPoint(*geometry.ijk_to_ras([float(i), float(j), float(k)]))
    prompts = MRMLBridge.prompts_from_markups(geometry, [points], roi_nodes=[roi])
    predictions = SegmentationLogic.predict_prompted_slices(session, settings, ct_copy, key, prompts)
    assert session.current_predictor is predictor and predictor.encoded_slices == [k]
    logic.apply_slice_predictions(predictions, segmentation, ids[LIVER], volume)
    assert dice(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume)[k], liver[k]) > 0.85
    # The tumour on that slice, clipped to the (now segmented) liver, never erases it.
    tumor_written = np.zeros_like(liver[k])
    tumor_written[:, :] = True
    fake = type(predictions[0])(
        k=k, mask_ji=tumor_written, score=1.0, low_res_logits=predictions[0].low_res_logits
    )
    liver_before = MRMLBridge.segment_mask(segmentation, ids[LIVER], volume)
    logic.apply_slice_predictions([fake], segmentation, ids[TUMOR], volume, clip_to_segment_id=ids[LIVER])
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, ids[LIVER], volume), liver_before)
    np.testing.assert_array_equal(
        MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume)[k], liver_before[k]
    )


@pytest.mark.model
def test_propagation_results_go_into_the_segment_and_cancel_writes_nothing(lits117):
    """Propagate the liver from one box through a 5-slice slab of lits117 on the worker-style path."""
    import torch
    from liversam.geometry import ImageGeometry
    from liversam.volume import CTVolume
    from LiverSAMLib.InferenceWorker import Cancelled
    from LiverSAMLib.ModelSession import core_postprocess_settings, propagate_segment

    torch.set_num_threads(2)
    ct, labels = lits117
    areas = (labels >= 1).sum(axis=(1, 2))
    k_mid = int(np.argmax(areas))
    k0 = k_mid - 2
    g = ct.geometry
    slab_geometry = ImageGeometry(
        (g.size_ijk[0], g.size_ijk[1], 5), g.spacing_mm, tuple(g.ijk_to_lps([0, 0, k0])), g.direction_lps
    )
    slab_ct = CTVolume(np.array(ct.array_kji[k0 : k0 + 5]), slab_geometry)
    liver = labels[k0 : k0 + 5] >= 1

    scene = fresh_scene()
    volume = MRMLBridge.volume_node_from_ct(slab_ct, "slab", scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = SegmentationLogic(scene=scene)
    logic.prepare_segmentation(segmentation, volume)
    ids = logic.ensure_standard_segments(segmentation)
    geometry = MRMLBridge.geometry_from_volume_node(volume)
    js, is_ = np.nonzero(liver[2])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    corners = geometry.ijk_to_ras(np.array([[is_.min(), js.min(), 2], [is_.max(), js.max(), 2]], dtype=float))
    roi.SetCenterWorld(*corners.mean(axis=0))
    roi.SetSizeWorld(*(np.abs(corners[1] - corners[0]) + [0.0, 0.0, 0.5]))
    prompts = MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi])
    segment_prompts = SegmentationLogic.segment_prompts(LIVER, 1, prompts)
    session = ModelSession()
    settings = SessionSettings(model="litemedsam", device="cpu", window_level_hu=60, window_width_hu=400)
    ct_copy, key = logic.volume_copy(volume)
    postprocess = core_postprocess_settings(fill_holes=True, min_island_mm3=100, keep_largest=True)

    with pytest.raises(Cancelled):
        propagate_segment(session, settings, ct_copy, key, segment_prompts, postprocess, cancel=lambda: True)
    assert logic.segment_is_empty(segmentation, ids[LIVER])

    progress = []
    result = propagate_segment(
        session,
        settings,
        ct_copy,
        key,
        segment_prompts,
        postprocess,
        progress=lambda d, t, m: progress.append((d, t)),
    )
    assert progress and progress[-1][0] == progress[-1][1]
    logic.apply_result(result, segmentation, volume)
    written = MRMLBridge.segment_mask(segmentation, ids[LIVER], volume)
    assert written[[0, 4]].any()  # propagated to the slab's end slices
    assert dice(written, liver) > 0.8, dice(written, liver)
    assert len(session.current_predictor.encoded_slices) <= 5
