"""LiverSAMLib.SegmentationLogic against slicer-core's real MRML, on real CT (lits117, dcmqi_ct3slice).

Segments with terminology, masks written through the Segment Editor logic (editable area, overwrite,
undo shared with manual edits), results of the core pipeline, the review report and lesion table of the
core, exports read back (seg.nrrd by MRML, DICOM SEG by the core), one slice of the real model, and
fix-and-re-propagate on a CT phantom with background pre-encoding of neighbouring slices.
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
from LiverSAMLib.ModelSession import ModelSession, SessionSettings, review_rows  # noqa: E402
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
    rows = review_rows(SegmentationResult(ct.geometry, [segment]))
    flagged = {row.k: row for row in rows}
    assert "low_score" in flagged[k_mid].flags and "area_jump" in flagged[k_mid].flags
    assert "low model score 0.20" in flagged[k_mid].reason and "sudden area change" in flagged[k_mid].reason
    assert flagged[k_mid].segment == LIVER and flagged[k_mid].score == pytest.approx(0.2)
    assert flagged[k_mid].area_mm2 == pytest.approx(jumpy[k_mid].sum() * 1.0)  # 1 x 1 mm pixels
    assert k_mid + 1 not in flagged or "low_score" not in flagged[k_mid + 1].flags
    assert [row.k for row in rows] == sorted(row.k for row in rows)
    # Stricter review settings flag more slices.
    from liversam.review import ReviewSettings

    strict = review_rows(SegmentationResult(ct.geometry, [segment]), ReviewSettings(min_score=0.95))
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
    editor = SegmentEditorWidgetUndo(scene, own_logic.editor_node())
    logic = SegmentationLogic(
        scene=scene,
        save_state_for_undo=editor.saveStateForUndo,
        undo_shared=editor.undo,
        redo_shared=editor.redo,
    )
    assert logic.shares_undo and logic.editor_node() is own_logic.editor_node()
    liver = labels >= 1
    logic.write_mask(segmentation, ids[LIVER], volume, liver)  # LiverSAM's write
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

    # The reference as a folder, and as the list of files Slicer's DICOM database gives.
    files = sorted((folder / "ct").glob("*.dcm"))
    for reference, name in ((folder / "ct", "folder.dcm"), (files, "files.dcm")):
        path = logic.export_dicom_seg(
            segmentation, volume, tmp_path / name, reference, model_name="litemedsam"
        )
        assert path.is_file()
        back = read_dicom_seg(path, reference=ct.geometry)
        assert [seg.name for seg in back.segments] == [LIVER]  # the empty tumor segment is left out
        np.testing.assert_array_equal(back.segments[0].mask_kji, liver)
        assert back.geometry.is_close(ct.geometry)
    with pytest.raises(OutputError, match="DICOM files"):
        logic.export_dicom_seg(segmentation, volume, tmp_path / "none.dcm", [])
    with pytest.raises(OutputError, match="no non-empty segment"):
        logic.export_dicom_seg(segmentation, volume, tmp_path / "empty.dcm", folder / "ct", segment_ids=[])


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
def test_propagation_results_go_into_the_segment_and_cancel_writes_nothing(lits117, litemedsam):
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
    session = ModelSession(loader=lambda name, device: litemedsam)  # the test run's shared model
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


def _phantom(nk: int = 14, n: int = 128):
    """A small CT phantom: a liver-like ellipsoid (slices 1..12) in fat, 1 x 1 x 2.5 mm voxels.

    Returns (CTVolume, liver mask [k, j, i]). Organ-like contrast lets the real model segment it.
    """
    from liversam.geometry import ImageGeometry
    from liversam.volume import CTVolume

    kk, jj, ii = np.mgrid[:nk, :n, :n]

    def ellipsoid(centre, radii):
        return sum(((axis - c) / r) ** 2 for axis, c, r in zip((kk, jj, ii), centre, radii, strict=True)) <= 1

    liver = ellipsoid(((nk - 1) / 2, 64, 60), (nk / 2 - 0.6, 34, 42))
    body = ellipsoid(((nk - 1) / 2, 64, 64), (60, 60, 62))
    hu = np.full(liver.shape, -1000.0)
    hu[body] = -80.0
    hu[liver] = 110.0
    hu += np.random.default_rng(7).normal(0, 8, hu.shape)
    geometry = ImageGeometry((n, n, nk), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0))
    return CTVolume(hu.astype(np.int16), geometry, source="phantom"), liver


def _box_roi(scene, geometry, mask_ji, k, pad=2):
    js, is_ = np.nonzero(mask_ji)
    corners = geometry.ijk_to_ras(
        np.array([[is_.min() - pad, js.min() - pad, k], [is_.max() + pad, js.max() + pad, k]], dtype=float)
    )
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"box {k}")
    roi.SetCenterWorld(*corners.mean(axis=0))
    roi.SetSizeWorld(*(np.abs(corners[1] - corners[0]) + [0.0, 0.0, 0.5]))
    return roi


@pytest.mark.model
def test_fix_on_a_flagged_slice_repropagates_only_between_the_neighbouring_prompts(litemedsam):
    """Seeds on slices 4 and 8 gave a liver that leaks on slice 6; a box on slice 6 fixes slices 5..7 only.

    Also: the fix is one undo step, a cancelled fix changes nothing, the CT is untouched, and background
    pre-encoding of the neighbours of the slice being worked on makes their embeddings ready.
    """
    from liversam.errors import Cancelled
    from LiverSAMLib.ModelSession import PropagationRecord, plan_repropagation, repropagate_segment

    ct, liver = _phantom()
    scene = fresh_scene()
    volume = MRMLBridge.volume_node_from_ct(ct, "phantom", scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = SegmentationLogic(scene=scene)
    logic.prepare_segmentation(segmentation, volume)
    liver_id = logic.ensure_segment(segmentation, LIVER)
    ct_before = np.array(slicer.util.arrayFromVolume(volume), copy=True)
    geometry = MRMLBridge.geometry_from_volume_node(volume)

    # The state after a propagation from boxes on slices 4 and 8, with leakage on slice 6.
    leak = np.zeros(liver.shape[1:], bool)
    leak[40:90, 90:126] = True
    existing = liver.copy()
    existing[6] |= leak
    logic.write_mask(segmentation, liver_id, volume, existing)
    seeds = [_box_roi(scene, geometry, liver[k], k) for k in (4, 8)]
    given_before = MRMLBridge.prompts_from_markups(geometry, roi_nodes=seeds).to_slice_prompts()
    prompts = SegmentationLogic.segment_prompts(
        LIVER, 1, MRMLBridge.prompts_from_markups(geometry, roi_nodes=seeds)
    )
    session = ModelSession(loader=lambda name, device: litemedsam)
    settings = SessionSettings(model="litemedsam", device="cpu")
    ct_copy, key = logic.volume_copy(volume)
    from LiverSAMLib.ModelSession import core_postprocess_settings

    pipeline_settings = core_postprocess_settings()
    record = PropagationRecord(given_before, prompts, key, pipeline_settings)

    # The user jumps to the flagged slice 6 and draws a box around the liver there.
    fix_roi = _box_roi(scene, geometry, liver[6], 6)
    given = MRMLBridge.prompts_from_markups(geometry, roi_nodes=[*seeds, fix_roi]).to_slice_prompts()
    fix_slices = plan_repropagation(record, given, key, pipeline_settings)
    assert fix_slices == [6]
    mask_now = MRMLBridge.segment_mask(segmentation, liver_id, volume)  # manual edits included
    with pytest.raises(Cancelled):
        repropagate_segment(session, settings, ct_copy, key, record, given, fix_slices, mask_now, LIVER,
                            cancel=lambda: True)  # fmt: skip
    fix = repropagate_segment(session, settings, ct_copy, key, record, given, fix_slices, mask_now, LIVER)
    assert 6 in fix.computed_slices and set(fix.computed_slices) <= {5, 6, 7}
    assert 6 in fix.changed_slices and set(fix.changed_slices) <= {5, 6, 7}
    predictor = session.current_predictor
    assert set(predictor.encoded_slices) <= {5, 6, 7}  # no slice outside the fixed part encoded

    logic.apply_result(fix.result, segmentation, volume, k_range=fix.k_range)
    written = MRMLBridge.segment_mask(segmentation, liver_id, volume)
    outside = [k for k in range(liver.shape[0]) if not 5 <= k <= 7]
    np.testing.assert_array_equal(written[outside], existing[outside])  # untouched, exactly
    assert written[6][leak & ~liver[6]].sum() < 0.02 * (leak & ~liver[6]).sum()  # the leak is gone
    assert dice(written[5:8], liver[5:8]) > 0.85, dice(written[5:8], liver[5:8])
    assert fix.record.given == given and plan_repropagation(fix.record, given, key, pipeline_settings) == []
    assert 6 in fix.record.scores and all(row.k in range(14) for row in review_rows(fix.result))
    logic.undo()  # the fix is one undo step
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, liver_id, volume), existing)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), ct_before)

    # Background pre-encoding around slice 7: 6 and 7 are cached already, slice 8 gets encoded.
    encoded_before = list(predictor.encoded_slices)
    session.prefetch_around(7, radius=1)
    prefetcher = session.prefetcher
    assert prefetcher is not None and prefetcher.wait_idle(timeout=300)
    assert prefetcher.encoded == [8] and predictor.is_cached(8)
    session.predict_slice(ct_copy, key, settings, 8, given[8])  # decoder only now
    assert predictor.encoded_slices == [*encoded_before, 8]
    session.release()
    assert session.prefetcher is None


def test_tumour_propagation_uses_the_liver_in_the_scene_as_its_container(lits117, litemedsam):
    """A tumour propagated on the module's path gets the liver already in the segmentation as its container:
    it stays inside it and gets the core's lesion refinement (one box on a real lits117 lesion, 9-slice slab).
    """
    import dataclasses

    import torch
    from scipy import ndimage

    from liversam.geometry import ImageGeometry
    from liversam.prompts import SegmentPrompts, SlicePrompts
    from liversam.volume import CTVolume
    from LiverSAMLib.ModelSession import core_postprocess_settings, propagate_segment

    torch.set_num_threads(2)
    ct, labels = lits117
    components, _ = ndimage.label(labels == 2, structure=np.ones((3, 3, 3), dtype=bool))
    k0, nk = 33, 9  # the lesion spans slices 27..45; its largest slice is 37
    lesion = (components == components[37, 63, 15])[k0 : k0 + nk]
    liver = labels[k0 : k0 + nk] >= 1
    g = ct.geometry
    slab_geometry = ImageGeometry(
        (g.size_ijk[0], g.size_ijk[1], nk), g.spacing_mm, tuple(g.ijk_to_lps([0, 0, k0])), g.direction_lps
    )
    slab_ct = CTVolume(np.array(ct.array_kji[k0 : k0 + nk]), slab_geometry)
    js, is_ = np.nonzero(lesion[37 - k0])
    box = (float(is_.min()), float(js.min()), float(is_.max()), float(js.max()))
    segment_prompts = SegmentPrompts(TUMOR, 2, slices={37 - k0: SlicePrompts(boxes_ij=[box])}, propagate=True)
    session = ModelSession(loader=lambda name, device: litemedsam)
    settings = SessionSettings(model="litemedsam", device="cpu", window_level_hu=40, window_width_hu=400)
    postprocess = core_postprocess_settings()
    plain_postprocess = dataclasses.replace(
        postprocess, propagation=dataclasses.replace(postprocess.propagation, intensity_refinement=False)
    )

    refined = propagate_segment(session, settings, slab_ct, "slab", segment_prompts, postprocess, liver)
    plain = propagate_segment(session, settings, slab_ct, "slab", segment_prompts, plain_postprocess, liver)
    refined_mask = refined.segment(TUMOR).mask_kji
    plain_mask = plain.segment(TUMOR).mask_kji
    print("tumour Dice on the slab: refined", dice(refined_mask, lesion), "box only", dice(plain_mask, lesion))
    assert not (refined_mask & ~liver).any()
    assert refined_mask[[0, nk - 1]].any()  # propagated to both ends of the slab
    assert dice(refined_mask, lesion) >= 0.8
    assert dice(refined_mask, lesion) >= dice(plain_mask, lesion) + 0.05
    assert len(session.current_predictor.encoded_slices) <= nk
