"""The web app's workflow (prompts, undo, tumour inside liver, job specs) with a stand-in client, and its MRML
side on slicer-core 5.11 (a non-CT file is refused and leaves the scene as it was; masks survive the
segmentation node; the labelmap export keeps the CT's grid)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from liversam_web.workflow import FAST_THIN_SLICE_MM, LIVER_CONTAINER, Workflow

REPO = Path(__file__).resolve().parents[2]
SHAPE = (6, 20, 30)


class RecordingClient:
    """Answers like LiverSAMClient: a slice mask that fills each box; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def predict_slice(self, session, k, boxes_ij=(), points_ij=(), negative_points_ij=()):
        self.calls.append(("predict", k, list(boxes_ij), list(points_ij), list(negative_points_ij)))
        mask = np.zeros(SHAPE[1:], dtype=bool)
        for i0, j0, i1, j1 in boxes_ij:
            mask[int(j0):int(j1) + 1, int(i0):int(i1) + 1] = True
        return mask, 0.9

    def upload_mask(self, session, name, mask):
        self.calls.append(("upload", name, mask.copy()))

    def start_propagation(self, session, segments, **kwargs):
        self.calls.append(("propagate", segments, kwargs))
        return "job-1"

    def start_repropagation(self, session, segment, fix_slices, existing=None, container=None, **kwargs):
        self.calls.append(("repropagate", segment, fix_slices, existing, container, kwargs))
        return "job-2"

    def job_result(self, job, masks=True):
        return {"review": {"segments": [{"name": "tumor", "volume_ml": 0.1, "slices": []}]},
                "lesions": [{"lesion_id": 1, "volume_ml": 0.1}]}

    def job_mask(self, job, segment):
        mask = np.zeros(SHAPE, dtype=bool)
        mask[1:4, 2:6, 2:30] = True  # partly outside the liver (as a lesion a past-organ rule let leave it)
        return mask


def test_liver_box_undo_and_tumour_inside_the_liver():
    client = RecordingClient()
    workflow = Workflow(client, "s", SHAPE)
    workflow.push_undo("liver box")
    workflow.add_box("liver", 2, (5.0, 4.0, 20.0, 15.0))
    workflow.predict_slice("liver", 2)
    assert workflow.masks["liver"][2].sum() == 16 * 12
    workflow.push_undo("liver box again")
    workflow.add_box("liver", 2, (6.0, 4.0, 20.0, 15.0))  # a liver has one box per slice: replaced
    assert workflow.prompts["liver"][2].boxes == [(6.0, 4.0, 20.0, 15.0)]
    workflow.predict_slice("liver", 2)
    # two tumour boxes on one slice are two lesions, each predicted on its own, kept inside the liver
    workflow.push_undo("tumour boxes")
    workflow.add_box("tumor", 2, (0.0, 0.0, 8.0, 8.0))
    workflow.add_box("tumor", 2, (18.0, 10.0, 25.0, 18.0))
    tumour = workflow.predict_slice("tumor", 2)
    assert [c[2] for c in client.calls[-2:]] == [[(0.0, 0.0, 8.0, 8.0)], [(18.0, 10.0, 25.0, 18.0)]]
    assert not (tumour & ~workflow.masks["liver"][2]).any()
    assert tumour.sum() == 3 * 5 + 3 * 6  # the parts of both boxes inside the liver box (6..20, 4..15)
    assert workflow.undo() == "tumour boxes"
    assert not workflow.masks["tumor"].any() and workflow.prompts["tumor"] == {}
    assert workflow.undo() == "liver box again"
    assert workflow.prompts["liver"][2].boxes == [(5.0, 4.0, 20.0, 15.0)]
    assert workflow.masks["liver"][2].sum() == 16 * 12


def test_a_point_on_a_propagated_slice_edits_the_mask_there_without_the_model():
    """A + point on a slice the propagation segmented was sent to the model alone, whose answer replaced the whole
    slice (2,211 liver voxels became 31); a - point there was refused as if the slice had no mask."""
    client = RecordingClient()
    workflow = Workflow(client, "s", SHAPE)
    workflow.masks["liver"][3, 4:16, 5:25] = True  # a propagated slice: a mask, no prompt
    before = workflow.masks["liver"][3].copy()
    grown = workflow.edit_slice("liver", 3, (26.0, 10.0), True, (1.0, 1.0))  # just outside the mask's right edge
    assert client.calls == []  # the model was not asked
    assert (grown & before).sum() == before.sum() and grown.sum() > before.sum()  # joined, nothing lost
    assert not (grown & ~before)[:, :20].any()  # the disk only, near the click
    shrunk = workflow.edit_slice("liver", 3, (10.0, 10.0), False, (1.0, 1.0))
    assert not shrunk[10, 10] and shrunk.sum() >= before.sum() - 29  # a 3 mm disk is 29 voxels at 1 mm
    assert workflow.prompts["liver"] == {}  # a local edit, not a prompt a later propagation would send


def test_propagation_specs_use_ijk_and_the_liver_as_container():
    client = RecordingClient()
    workflow = Workflow(client, "s", SHAPE)
    with pytest.raises(ValueError, match="no box or point"):
        workflow.start_propagation("liver")
    workflow.add_box("liver", 3, (1.0, 2.0, 10.0, 12.0))
    workflow.add_point("liver", 3, (4.0, 5.0), positive=False)
    workflow.start_propagation("liver")
    (spec,) = client.calls[-1][1]
    assert spec["name"] == "liver" and spec["boxes"] == [[[1.0, 2.0, 3.0], [10.0, 12.0, 3.0]]]
    assert spec["negative_points"] == [[4.0, 5.0, 3.0]] and "inside" not in spec
    assert client.calls[-1][2] == {}  # the server's defaults: every slice predicted
    workflow.start_propagation("liver", faster_thin_slices=True)
    assert client.calls[-1][2] == {"settings": {"skip_thin_slices_mm": FAST_THIN_SLICE_MM}}
    workflow.masks["liver"][3, 2:12, 1:10] = True
    workflow.add_box("tumor", 3, (2.0, 3.0, 6.0, 7.0))
    workflow.start_propagation("tumor")
    upload = [c for c in client.calls if c[0] == "upload"][-1]
    assert upload[1] == LIVER_CONTAINER and upload[2].sum() == workflow.masks["liver"].sum()
    assert client.calls[-1][1][0]["inside"] == LIVER_CONTAINER
    with pytest.raises(ValueError, match="Propagate the liver first"):
        workflow.start_repropagation("liver", 3)
    workflow.propagated.add("liver")
    workflow.start_repropagation("liver", 3)
    assert client.calls[-1][2:] == ([3], "liver_current", None, {})
    # the tumour's partial-volume ring off: sent for a tumour inside the liver only (an older server, which does not
    # know the setting, still takes the liver's job), and a fix keeps the ring its propagation had
    job = workflow.start_propagation("tumor", tumour_ring=False)
    assert client.calls[-1][2] == {"settings": {"lesion_rim": False}}
    workflow.start_propagation("liver", faster_thin_slices=True, tumour_ring=False)
    assert client.calls[-1][2] == {"settings": {"skip_thin_slices_mm": FAST_THIN_SLICE_MM}}
    workflow.apply_result(job, "tumor")
    workflow.start_repropagation("tumor", 3)
    assert client.calls[-1][2:] == ([3], "tumor_current", LIVER_CONTAINER, {"settings": {"lesion_rim": False}})
    workflow.masks["tumor"][:] = False
    job = workflow.start_propagation("tumor")  # propagated again with the ring: its fixes have it too
    workflow.apply_result(job, "tumor")
    workflow.start_repropagation("tumor", 3)
    assert client.calls[-1][2:] == ([3], "tumor_current", LIVER_CONTAINER, {})
    workflow.undo()  # back to the result without the ring, and to its fixes without it
    workflow.start_repropagation("tumor", 3)
    assert client.calls[-1][2:] == ([3], "tumor_current", LIVER_CONTAINER, {"settings": {"lesion_rim": False}})


def test_undo_of_a_propagation_restores_its_review_and_lesions():
    client = RecordingClient()
    workflow = Workflow(client, "s", SHAPE)
    workflow.masks["liver"][:, :, :10] = True
    workflow.add_box("tumor", 2, (2.0, 2.0, 8.0, 6.0))
    workflow.start_propagation("tumor")
    workflow.apply_result("job-1", "tumor")
    assert workflow.propagated == {"tumor"} and workflow.lesions and "tumor" in workflow.review
    # the server's tumour as it is; the liver takes its voxels outside it (3 x 4 x 20), as `liversam segment` does
    assert workflow.masks["tumor"].sum() == 3 * 4 * 28 and not (workflow.masks["tumor"] & ~workflow.masks["liver"]).any()
    assert workflow.masks["liver"].sum() == SHAPE[0] * SHAPE[1] * 10 + 3 * 4 * 20
    assert workflow.undo() == "propagate tumour"
    assert workflow.propagated == set() and workflow.lesions == [] and workflow.review == {}
    assert not workflow.masks["tumor"].any() and workflow.prompts["tumor"][2].boxes == [(2.0, 2.0, 8.0, 6.0)]
    assert workflow.masks["liver"].sum() == SHAPE[0] * SHAPE[1] * 10  # the liver's gain is undone with it


def test_the_liver_takes_only_tumour_voxels_outside_the_liver_its_job_was_sent():
    """A tumour job started without a liver (no container) gives a liver drawn while it ran nothing; one started with
    the liver gives it the voxels past that liver only, not those of a liver slice cleared while it ran."""
    client = RecordingClient()
    workflow = Workflow(client, "s", SHAPE)
    workflow.add_box("tumor", 2, (2.0, 2.0, 8.0, 6.0))
    workflow.start_propagation("tumor")  # no liver yet: the tumour is not clipped, nothing to give back
    assert "inside" not in client.calls[-1][1][0]
    workflow.masks["liver"][:, :, :10] = True  # drawn while the job ran
    workflow.apply_result("job-1", "tumor")
    assert workflow.masks["liver"].sum() == SHAPE[0] * SHAPE[1] * 10  # took none of the tumour
    assert workflow.masks["tumor"].sum() == 3 * 4 * 8  # the tumour inside the liver as it is now
    workflow.start_propagation("tumor")  # now sent inside the liver
    workflow.masks["liver"][2] = False  # a liver slice cleared while the job ran
    workflow.apply_result("job-1", "tumor")
    past = np.zeros(SHAPE, dtype=bool)
    past[1:4, 2:6, 10:30] = True  # the job's tumour outside the liver it was sent
    expected = np.zeros(SHAPE, dtype=bool)
    expected[:, :, :10] = True
    expected[2] = False
    np.testing.assert_array_equal(workflow.masks["liver"], expected | past)
    assert not workflow.masks["tumor"][2, :, :10].any()  # nor does the tumour keep the cleared slice's liver part


def _write_nifti(path: Path, array: np.ndarray) -> None:
    """A minimal NIfTI-1 file (int16, 1 mm, identity sform) for the reader tests."""
    header = np.zeros(348, dtype=np.uint8).tobytes()
    h = bytearray(header)
    nk, nj, ni = array.shape
    h[0:4] = np.int32(348).tobytes()
    h[40:56] = np.array([3, ni, nj, nk, 1, 1, 1, 1], dtype="<i2").tobytes()
    h[70:72] = np.int16(4).tobytes()
    h[72:74] = np.int16(16).tobytes()
    h[76:108] = np.array([1, 1, 1, 1, 1, 1, 1, 1], dtype="<f4").tobytes()
    h[108:112] = np.float32(352).tobytes()
    h[112:116] = np.float32(1).tobytes()
    h[254:256] = np.int16(1).tobytes()
    h[280:328] = np.array([[-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 1, 0]], dtype="<f4").tobytes()
    h[344:348] = b"n+1\x00"
    path.write_bytes(gzip.compress(bytes(h) + b"\x00" * 4 + array.astype("<i2").tobytes()))


@pytest.fixture(scope="module")
def slicer_app():
    from trame_slicer.core import SlicerApp

    return SlicerApp()


def test_a_mask_file_is_not_a_ct_and_leaves_the_scene_unchanged(slicer_app, tmp_path):
    from liversam_web.mrml_scene import InputError, load_ct

    mask = np.zeros((5, 16, 16), dtype=np.int16)
    mask[2, 4:8, 4:8] = 1
    path = tmp_path / "mask.nii.gz"
    _write_nifti(path, mask)
    before = slicer_app.scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="does not look like a CT"):
        load_ct(slicer_app, [str(path)], "'mask.nii.gz'")
    assert slicer_app.scene.GetNumberOfNodes() == before


def test_segments_overlap_and_labelmap_keeps_the_grid(slicer_app, tmp_path):
    from liversam_web.mrml_scene import SceneContent, load_ct

    ct = np.full((6, 20, 30), -1000, dtype=np.int16)
    ct[1:5, 4:16, 5:25] = 60
    path = tmp_path / "ct.nii.gz"
    _write_nifti(path, ct)
    volume = load_ct(slicer_app, [str(path)], "'ct.nii.gz'")
    content = SceneContent(slicer_app, volume)
    assert content.shape_kji == ct.shape and (content.array == ct).all()
    liver = ct > 0
    tumour = np.zeros_like(liver)
    tumour[2:4, 6:9, 8:12] = True
    content.show_mask("liver", liver)
    segmentation = content.segmentation.GetSegmentation()
    # each segment in a labelmap layer of its own from its first mask: while the liver shared its layer with the
    # (empty) tumour, the page drew the liver's 2D fill blended over black, an opaque brown that hid the CT under it
    # until an export happened to split the layers (1400 x 900 page, headless Chromium)
    assert segmentation.GetNumberOfLayers() == 2
    assert segmentation.GetLayerIndex("liver") != segmentation.GetLayerIndex("tumor")
    content.show_mask("tumor", tumour)
    assert (content.segment_mask("liver") == liver).all()  # the tumour did not erase liver voxels
    assert (content.segment_mask("tumor") == tumour).all()
    labels = liver.astype(np.uint8)
    labels[tumour] = 2
    out = tmp_path / "labels.nii.gz"
    content.write_labelmap(labels, out)
    data = gzip.decompress(out.read_bytes())
    offset = int(np.frombuffer(data[108:112], dtype="<f4")[0])
    assert (np.frombuffer(data[offset:], dtype=np.uint8).reshape(ct.shape) == labels).all()
    seg = tmp_path / "case.seg.nrrd"
    content.write_segmentation(seg)
    header = seg.read_bytes()[:4000].decode("latin-1")
    assert "Segment1_Name:=tumor" in header
    # SNOMED CT liver and neoplasm, as liversam segment and the page's DICOM SEG write (both said "Tissue")
    tags = dict(line.split(":=", 1) for line in header.splitlines() if "_Tags:=" in line)
    assert "SCT^10200004^Liver" in tags["Segment0_Tags"] and "SCT^108369006^Neoplasm" in tags["Segment1_Tags"]
    assert "85756007" not in tags["Segment0_Tags"] + tags["Segment1_Tags"]
    assert "Segment0_NameAutoGenerated:=0" in header and "Segment1_ColorAutoGenerated:=0" in header
    content.remove()


def test_a_truncated_ct_file_is_refused_not_opened_grey_past_its_end(slicer_app, tmp_path):
    """Slicer's reader filled a truncated .nii.gz with zeros and the page opened it; liversam segment refuses it."""
    from liversam_web.mrml_scene import InputError, load_ct

    ct = np.full((40, 64, 64), -1000, dtype=np.int16)
    ct[5:35, 10:50, 10:50] = 60
    whole = tmp_path / "whole.nii.gz"
    _write_nifti(whole, ct)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    before = slicer_app.scene.GetNumberOfNodes()
    with pytest.raises(InputError, match=r"^'cut\.nii\.gz' is damaged: its compressed data ends early"):
        load_ct(slicer_app, [str(cut)], "'cut.nii.gz'")
    assert slicer_app.scene.GetNumberOfNodes() == before


def test_a_dicom_folder_knows_its_series_and_a_file_has_none(slicer_app, tmp_path):
    from web_page import DATA

    from liversam_web.mrml_scene import list_input_files, load_ct_with_source

    folder = DATA / "dcmqi_ct3slice" / "ct"
    volume, dicom = load_ct_with_source(slicer_app, list_input_files(str(folder)), "the dcmqi folder")
    assert volume.GetImageData().GetDimensions() == (512, 512, 3)
    assert dicom is not None and Path(dicom.folder) == folder and dicom.num_files == 3
    assert dicom.series_uid == "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
    slicer_app.scene.RemoveNode(volume)
    ct = np.full((6, 20, 30), -1000, dtype=np.int16)
    ct[1:5, 4:16, 5:25] = 60
    _write_nifti(tmp_path / "ct.nii.gz", ct)
    volume, dicom = load_ct_with_source(slicer_app, [str(tmp_path / "ct.nii.gz")], "'ct.nii.gz'")
    assert dicom is None
    slicer_app.scene.RemoveNode(volume)


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}


def _read_ct(slicer_app, tmp_path):
    from liversam_web.mrml_scene import load_ct

    ct = np.full((6, 20, 30), -1000, dtype=np.int16)
    ct[1:5, 4:16, 5:25] = 60
    path = tmp_path / "ct.nii.gz"
    _write_nifti(path, ct)
    return load_ct(slicer_app, [str(path)], "'ct.nii.gz'")


def test_a_ct_whose_node_went_first_still_loses_its_display_and_storage_nodes():
    """A volume node already taken out of the scene (a removal that failed half way): its display and storage nodes
    stayed for good (it no longer finds them by reference, and the removal stopped at the node being gone). A scene
    without Slicer's Data module logic, which takes them away by itself in the app's scene."""
    from slicer import vtkMRMLScene

    from liversam_web.mrml_scene import remove_volume

    scene = vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    volume.CreateDefaultDisplayNodes()
    volume.AddDefaultStorageNode()
    scene.RemoveNode(volume)
    assert scene.GetNumberOfNodes() == 2  # its display and storage nodes are left
    remove_volume(scene, volume)
    assert scene.GetNumberOfNodes() == 0


def test_a_case_whose_segmentation_cannot_go_still_loses_its_ct(slicer_app, tmp_path, monkeypatch):
    """``SceneContent.remove``: one node failing to go stopped the removal, the CT left in the scene; now the others
    go all the same and the error is raised after."""
    from liversam_web import mrml_scene

    scene = slicer_app.scene
    before = _node_ids(scene)
    content = mrml_scene.SceneContent(slicer_app, _read_ct(slicer_app, tmp_path))
    real = mrml_scene._remove_with_display

    def remove(scene_, node):
        if node is content.segmentation:
            raise RuntimeError("the segmentation cannot go")
        real(scene_, node)

    monkeypatch.setattr(mrml_scene, "_remove_with_display", remove)
    with pytest.raises(RuntimeError, match="the segmentation cannot go"):
        content.remove()
    assert not scene.IsNodePresent(content.volume) and scene.IsNodePresent(content.segmentation)
    real(scene, content.segmentation)
    assert _node_ids(scene) == before


def test_the_input_error_is_told_when_taking_the_read_nodes_away_fails(slicer_app, tmp_path, monkeypatch):
    """A file that is no CT, whose read nodes then could not be taken out of the scene: the error of that removal
    replaced the InputError (the reader was told of an unexpected error, not that the file is no CT)."""
    from liversam_web import mrml_scene

    mask = np.zeros((5, 16, 16), dtype=np.int16)
    mask[2, 4:8, 4:8] = 1
    path = tmp_path / "mask.nii.gz"
    _write_nifti(path, mask)
    scene = slicer_app.scene
    before = _node_ids(scene)
    real = mrml_scene._remove_new_nodes

    def fails(*_args):
        raise RuntimeError("the scene cannot remove them")

    monkeypatch.setattr(mrml_scene, "_remove_new_nodes", fails)
    with pytest.raises(mrml_scene.InputError, match="does not look like a CT"):
        mrml_scene.load_ct(slicer_app, [str(path)], "'mask.nii.gz'")
    real(scene, before)
    assert _node_ids(scene) == before
