"""A CT stored in sagittal or coronal slices opens in the web app on its axial slices (its voxels reordered, none
resampled: liversam.axial_orientation): a box is drawn in the red (axial) view as for any CT, the server gets the
axial slices, and the exports lie on the file's own grid, each voxel where the file has it. In this process, with
the stand-in server client of test_app_in_process.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
from test_app_in_process import (
    SHAPE,
    FakeServer,
    drag_box,
    labelled_points,
    new_app,
    open_ct,
    screen_xy,
    settle,
    synthetic_ct,
    write_nrrd,
)

# direction matrices in LPS (columns: the file's i, j, k axes); each file's k axis is not S-I
STORED = {
    # k towards the patient's right, i towards anterior, j towards superior
    "sagittal-flipped": np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
    # i towards left, j towards inferior, k towards posterior
    "coronal": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}


def _file_info(path: str) -> dict:
    """Size and direction of an image file, read with SimpleITK in the server's Python."""
    from web_page import server_side

    return server_side(
        "import SimpleITK as sitk\n"
        "image = sitk.ReadImage(inputs['files']['f'])\n"
        "out = {'size': list(image.GetSize())[:3], 'direction': list(image.GetDirection())}\n",
        files={"f": path},
    )


@pytest.mark.parametrize("name", list(STORED))
def test_a_sagittal_or_coronal_ct_is_prompted_on_axial_slices_and_exported_on_its_own_grid(name, tmp_path):
    direction = STORED[name]
    ct = synthetic_ct()
    ct_path = write_nrrd(tmp_path / f"{name}.nrrd", ct, direction)
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, ct_path)
        content = app.content
        plane = name.split("-")[0]
        assert f"stored in {plane} slices: shown and segmented on its axial slices" in app.state.status
        assert "Drag a box" in app.state.status and not app.state.error
        assert content.reorientation is not None and content.reorientation.input_plane == plane
        # the scene's volume and the server's session hold the axial slices: k runs along S-I
        assert int(np.argmax(np.abs(content.ijk_to_ras[:3, 2]))) == 2
        sent = client.sessions[app.workflow.session_id][0]
        np.testing.assert_array_equal(sent, content.reorientation.to_axial(ct))  # the same voxels, reordered
        marker = np.argwhere(content.array == 300)  # [k, j, i] on the axial grid
        k = int(marker[len(marker) // 2][0])
        app._jump(k)
        i0, j0 = int(marker[:, 2].min()) - 1, int(marker[:, 1].min()) - 2
        i1, j1 = i0 + 4, j0 + 6
        for corner in ((i0, j0, k), (i1, j1, k)):
            assert abs(screen_xy(app, corner)[2]) < 1e-3, (
                "the red view does not show axial slice k as a whole"
            )
        drag_box(app, (i0, j0, k), (i1, j1, k))
        await settle(app)
        assert not app.state.error, app.state.error
        predict = [c for c in client.calls if c[0] == "predict"][-1]
        assert predict[2] == k
        assert np.allclose(predict[3][0], (i0, j0, i1, j1), atol=0.25), predict
        mask = app.workflow.masks["liver"]
        assert mask[k].sum() == 5 * 7
        content.write_labelmap(app.workflow.labelmap(), tmp_path / "labels.nii.gz")
        content.write_segmentation(tmp_path / "case.seg.nrrd")
        return content.reorientation.to_input(mask)

    on_file_grid = asyncio.run(scenario())
    assert on_file_grid.shape == SHAPE
    # the exports hold the box's voxels where the CT file has them (physical points, read with SimpleITK) ...
    expected = labelled_points(
        str(write_nrrd(tmp_path / "expected.nrrd", on_file_grid.astype(np.int16), direction))
    )
    assert len(expected) == 35
    assert np.allclose(labelled_points(str(tmp_path / "labels.nii.gz")), expected, atol=1e-2)
    assert np.allclose(labelled_points(str(tmp_path / "case.seg.nrrd")), expected, atol=1e-2)
    # ... on the file's own grid: its voxel axes in the file's order
    for exported in ("labels.nii.gz", "case.seg.nrrd"):
        info = _file_info(str(tmp_path / exported))
        assert np.allclose(np.reshape(info["direction"], (3, 3)), direction, atol=1e-6), (exported, info)
    # the whole grid: a .seg.nrrd cropped to the box's extent is not on it
    for exported in ("labels.nii.gz", "case.seg.nrrd"):
        assert _file_info(str(tmp_path / exported))["size"] == [SHAPE[2], SHAPE[1], SHAPE[0]], exported


async def box_the_marker(app) -> None:
    """A 5 x 7 voxel box on the synthetic CT's marker, on its middle axial slice, drawn in the red view."""
    marker = np.argwhere(app.content.array == 300)  # [k, j, i] on the axial grid
    k = int(marker[len(marker) // 2][0])
    app._jump(k)
    i0, j0 = int(marker[:, 2].min()) - 1, int(marker[:, 1].min()) - 2
    drag_box(app, (i0, j0, k), (i0 + 4, j0 + 6, k))
    await settle(app)


class SegWritingServer(FakeServer):
    """The stand-in server, also answering the DICOM SEG export (records what it was asked)."""

    def export_dicom_seg(self, session, segments, reference_dicom=None, series_uid=None, **_kwargs):
        self._session(session, "/export/dicom-seg")
        self.calls.append(("export_dicom_seg", session, list(segments), reference_dicom, series_uid))
        return b"DICM-stand-in"

    def upload_mask(self, session, name, mask):
        super().upload_mask(session, name, mask)
        self.calls.append(("upload_mask", session, name, np.array(mask, copy=True)))

    def delete_mask(self, session, name):
        self._session(session, f"/masks/{name}")
        self.calls.append(("delete_mask", session, name))


def test_a_dicom_seg_of_such_a_series_is_asked_of_the_server_with_the_axial_masks(tmp_path):
    """Before, the page refused ("DICOM SEG is not written here for a series stored in sagittal slices"); now it
    sends the axial masks with the series' folder and UID, and the server's writer puts them on the series' frames
    (Testing/Python/test_dicom_seg_reoriented.py writes and reads back such a SEG through the real server)."""
    from liversam_web.mrml_scene import DicomSource

    ct_path = write_nrrd(tmp_path / "sagittal.nrrd", synthetic_ct(), STORED["sagittal-flipped"])
    client = SegWritingServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, ct_path)
        content = app.content
        content.dicom = DicomSource(str(tmp_path / "series"), "1.2.826.0.1.3680043.8.498.1", SHAPE[2])
        await box_the_marker(app)
        assert not app.state.error, app.state.error
        written = await app._export_dicom_seg(tmp_path / "seg.dcm")
        return written, app.workflow.masks["liver"].copy(), content.reorientation

    written, liver, reorientation = asyncio.run(scenario())
    assert written and not app.state.error, app.state.error
    assert (tmp_path / "seg.dcm").read_bytes() == b"DICM-stand-in"
    export = [c for c in client.calls if c[0] == "export_dicom_seg"]
    assert len(export) == 1
    _, _, segments, reference, uid = export[0]
    assert reference == str(tmp_path / "series") and uid == "1.2.826.0.1.3680043.8.498.1"
    uploaded = {c[2]: c[3] for c in client.calls if c[0] == "upload_mask"}
    # the copies sent for the export are not left on the server
    assert sorted(c[2] for c in client.calls if c[0] == "delete_mask") == sorted(uploaded)
    assert ("liver", "export_liver") in segments
    # the masks go as the session holds them: on the axial grid, not the file's
    assert uploaded["export_liver"].shape == reorientation.axial_geometry.shape_kji != reorientation.input_geometry.shape_kji
    np.testing.assert_array_equal(uploaded["export_liver"], liver)
    assert liver.sum() == 5 * 7


def export_refused(tmp_path, direction: np.ndarray, message: str, uploaded: bool = False):
    """A DICOM SEG export of a boxed CT stored with ``direction``, refused by the stand-in server with ``message`` (a
    422; "{folder}" in it is the series folder): (the app, its server, the export's outcome). ``uploaded``: the
    series lies in the app's temporary folder, as an upload does."""
    from liversam_web.mrml_scene import DicomSource
    from liversam_web.server_client import ServerRequestError

    class Refusing(SegWritingServer):
        def export_dicom_seg(self, session, segments, reference_dicom=None, series_uid=None, **_kwargs):
            raise ServerRequestError(422, message.replace("{folder}", str(reference_dicom)))

    ct_path = write_nrrd(tmp_path / "ct.nrrd", synthetic_ct(), direction)
    client = Refusing()
    app = new_app(client)

    async def scenario():
        await open_ct(app, ct_path)
        folder = Path(app._tmp.name) / "tmpotb6k2q8" if uploaded else tmp_path / "series"
        app.content.dicom = DicomSource(str(folder), "1.2.826.0.1.3680043.8.498.2", 1)
        await box_the_marker(app)
        return await app._export_dicom_seg(tmp_path / "seg.dcm")

    return app, client, asyncio.run(scenario())


def test_the_masks_sent_for_an_export_the_server_refused_are_not_left_on_it(tmp_path):
    """A DICOM SEG export that fails (here the server refuses it) leaves none of the masks it sent in the session: each
    is deleted again, and the user is told why the export failed."""
    app, client, written = export_refused(tmp_path, np.eye(3), "the segmentation's grid does not match the DICOM series")
    assert written is False
    assert "grid does not match" in app.state.error
    uploaded = [c[2] for c in client.calls if c[0] == "upload_mask"]
    assert uploaded and sorted(c[2] for c in client.calls if c[0] == "delete_mask") == sorted(uploaded)
    assert not (tmp_path / "seg.dcm").exists()


def test_a_refusal_names_an_uploaded_series_as_such_not_by_its_temporary_folder(tmp_path):
    """The TotalSegmentator series uploaded (its UIDs blanked): the message named the app's temporary folder, which the
    reader never chose ("/tmp/liversam-web-nhef0z53/tmpotb6k2q8"), and ended with "..". """
    app, _client, written = export_refused(
        tmp_path, np.eye(3), "The DICOM series in '{folder}' lacks the UIDs a DICOM SEG must reference (SOPInstanceUID empty in "
        "20 file(s)); it was "
        "probably anonymised with UIDs blanked. Export to .seg.nrrd or .nii.gz instead, or use the original series.",
        uploaded=True)
    assert written is False
    error = app.state.error
    assert error.startswith("DICOM SEG export failed: The DICOM series in the uploaded folder lacks the UIDs"), error
    assert app._tmp.name not in error and "liversam-web-" not in error
    assert error.endswith("or use the original series.") and not error.endswith(".."), error


def test_an_older_server_that_cannot_write_it_gets_the_command_that_can(tmp_path):
    """A server from before session 35 refuses axial masks for a sagittal series ("does not match the DICOM series"):
    the page says the server cannot do it and gives the liversam export command, not the server's advice to
    resample."""
    app, _client, written = export_refused(
        tmp_path, STORED["sagittal-flipped"], "The segmentation's grid does not match the DICOM series 1.2.3 in 'x': ...")
    assert written is False
    error = app.state.error
    assert "cannot write a DICOM SEG of a series stored in sagittal slices" in error, error
    assert re.search(r"liversam export \S+-liversam\.seg\.nrrd --reference-dicom SERIES_FOLDER --output "
                     r"\S+-liversam-seg\.dcm", error), error  # the names of this CT's exports
