"""A DICOM SEG of a series stored in sagittal or coronal slices, from masks made on its axial slices (as the web app
and the server hold them): written on the series' own frames, each voxel where the series has it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_axial_reorientation import _write_dicom_series

from liversam.axial_orientation import reorient_to_axial
from liversam.ct_io import read_ct
from liversam.dicom_seg import on_series_grid, write_dicom_seg
from liversam.errors import OutputError
from liversam.segmentation import Segment, SegmentationResult
from liversam.segmentation_io import read_segmentation


def _axial_ct() -> sitk.Image:
    """A small axial CT (i 24, j 20, k 14; 0.8 x 0.9 x 2.5 mm) with a distinct value in every voxel."""
    array = (np.arange(14 * 20 * 24, dtype=np.int16).reshape(14, 20, 24) % 1500) - 500
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-10.0, 20.0, -30.0))
    return image


@pytest.fixture(scope="module", params=["sagittal", "coronal"])
def stored_series(request, tmp_path_factory, data_dir: Path):
    """(the series folder, its volume as read, that volume on its axial grid, the reorientation)."""
    order, flips = {"sagittal": ([1, 2, 0], [True, False, False]), "coronal": ([0, 2, 1], [False, True, True])}[
        request.param
    ]
    folder = tmp_path_factory.mktemp(request.param) / "series"
    stored = sitk.Flip(sitk.PermuteAxes(_axial_ct(), order), flips)  # every voxel stays at its physical point
    _write_dicom_series(stored, folder, data_dir / "dcmqi_ct3slice" / "ct" / "01.dcm")
    volume = read_ct(folder)
    axial, reorientation = reorient_to_axial(volume)
    assert reorientation is not None and reorientation.input_plane == request.param
    return folder, volume, axial, reorientation


def _axial_result(axial) -> SegmentationResult:
    nk, nj, ni = axial.geometry.shape_kji
    liver = np.zeros((nk, nj, ni), dtype=bool)
    liver[3:9, 4:15, 5:19] = True
    liver[5, 6, 6] = False  # not symmetric: a wrong flip or axis order cannot give the same voxels
    tumour = np.zeros_like(liver)
    tumour[6:8, 8:11, 12:16] = True
    return SegmentationResult(
        geometry=axial.geometry,
        segments=[Segment("liver", 1, liver, (0.8, 0.4, 0.3)), Segment("tumor", 2, tumour, (0.9, 0.9, 0.2))],
        provenance={"software": "LiverSAM"},
    )


def test_masks_on_the_axial_grid_are_written_on_the_series_own_frames(stored_series, tmp_path):
    folder, volume, axial, reorientation = stored_series
    result = _axial_result(axial)
    path = write_dicom_seg(result, folder, tmp_path / "seg.dcm")  # before: "grid does not match the DICOM series"

    back = read_segmentation(path, reference=volume.geometry)
    assert back.geometry.is_close(volume.geometry, 1e-3)
    for segment in result.segments:
        got = back.segment(segment.name).mask_kji
        np.testing.assert_array_equal(got, reorientation.to_input(segment.mask_kji))
        # the same voxels in physical space: each axial voxel's LPS point is that of its series voxel
        axial_points = axial.geometry.ijk_to_lps(np.argwhere(segment.mask_kji)[:, ::-1].astype(float))
        series_points = volume.geometry.ijk_to_lps(np.argwhere(got)[:, ::-1].astype(float))
        assert np.allclose(np.array(sorted(map(tuple, axial_points.round(3)))),
                           np.array(sorted(map(tuple, series_points.round(3)))))


def test_a_grid_that_is_neither_the_series_nor_its_axial_one_is_still_refused(stored_series, tmp_path):
    folder, volume, axial, _ = stored_series
    result = _axial_result(axial)
    shifted = SegmentationResult(
        geometry=type(axial.geometry)(
            size_ijk=axial.geometry.size_ijk,
            spacing_mm=axial.geometry.spacing_mm,
            origin_lps=tuple(np.asarray(axial.geometry.origin_lps) + (0.0, 0.0, 5.0)),
            direction_lps=axial.geometry.direction_lps,
        ),
        segments=result.segments,
    )
    assert on_series_grid(shifted, volume.geometry) is None
    assert on_series_grid(result, volume.geometry) is not None
    assert on_series_grid(result, axial.geometry) is result  # already on the grid: kept as it is
    with pytest.raises(OutputError, match="does not match the DICOM series"):
        write_dicom_seg(shifted, folder, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def _server(folder: Path):
    """An in-process ``liversam serve`` (no model: an export needs none) whose data root holds ``folder``."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from liversam.server.app import create_app
    from liversam.server.config import ServerConfig

    def no_model():
        raise AssertionError("an export must not load the model")

    return TestClient(create_app(ServerConfig(tokens=[TOKEN], data_roots=[folder.parent]), model_loader=no_model),
                      raise_server_exceptions=False)


TOKEN = "token-of-alice-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _upload_and_export(client, session: str, result: SegmentationResult, **reference) -> bytes:
    for segment in result.segments:
        answer = client.put(f"/v1/sessions/{session}/masks/{segment.name}_now",
                            content=np.packbits(segment.mask_kji).tobytes(),
                            headers={**AUTH, "Content-Type": "application/octet-stream"})
        assert answer.status_code == 204, answer.text
    answer = client.post(f"/v1/sessions/{session}/export/dicom-seg", headers=AUTH, json={
        "segments": [{"name": s.name, "mask": f"{s.name}_now"} for s in result.segments], **reference})
    assert answer.status_code == 200, answer.text
    return answer.content


def _assert_on_the_series_frames(data: bytes, tmp_path: Path, volume, result: SegmentationResult, reorientation) -> None:
    """The DICOM SEG ``data``, read back onto the series' grid, holds each axial mask of ``result`` on the series'
    own voxels."""
    path = tmp_path / "seg.dcm"
    path.write_bytes(data)
    back = read_segmentation(path, reference=volume.geometry)
    for segment in result.segments:
        np.testing.assert_array_equal(back.segment(segment.name).mask_kji, reorientation.to_input(segment.mask_kji))


def test_the_server_exports_an_axial_session_of_such_a_series(stored_series, tmp_path):
    """What the web app does: the session holds the axial slices (sent as voxels), the masks are uploaded on them, and
    the export names the series' folder and UID (before: refused, "grid does not match the DICOM series")."""
    folder, volume, axial, reorientation = stored_series
    g = axial.geometry
    query = (f"shape={','.join(map(str, g.shape_kji))}&spacing={','.join(map(str, g.spacing_mm))}"
             f"&origin={','.join(map(str, g.origin_lps))}&direction={','.join(map(str, g.direction_lps.ravel()))}")
    result = _axial_result(axial)
    with _server(folder) as client:
        answer = client.post(f"/v1/sessions?{query}", content=np.ascontiguousarray(axial.array_kji, "<i2").tobytes(),
                             headers={**AUTH, "Content-Type": "application/octet-stream"})
        assert answer.status_code == 201, answer.text
        assert answer.json()["reoriented_from"] is None  # voxels sent on a grid are kept on it
        data = _upload_and_export(client, answer.json()["session_id"], result, reference_dicom=str(folder),
                                  series_uid=volume.metadata["dicom_series_uid"])
    _assert_on_the_series_frames(data, tmp_path, volume, result, reorientation)


def test_a_series_opened_by_path_is_held_on_its_axial_slices_and_exported_on_its_own(stored_series, tmp_path):
    """``POST /v1/sessions/open-path`` on such a series: the session holds its axial slices (as liversam segment, the
    Slicer module and the web app segment it; before, its own sagittal or coronal slices), says so, and its DICOM SEG
    (the series it was read from as the reference) lies on the series' own frames."""
    folder, volume, axial, reorientation = stored_series
    result = _axial_result(axial)
    with _server(folder) as client:
        answer = client.post("/v1/sessions/open-path", json={"path": str(folder)}, headers=AUTH)
        assert answer.status_code == 201, answer.text
        info = answer.json()
        assert info["reoriented_from"] == reorientation.input_plane
        assert info["shape_kji"] == list(axial.geometry.shape_kji) != list(volume.geometry.shape_kji)
        assert np.allclose(info["origin_lps"], axial.geometry.origin_lps)
        data = _upload_and_export(client, info["session_id"], result)
    _assert_on_the_series_frames(data, tmp_path, volume, result, reorientation)


def test_with_no_uid_the_series_on_the_masks_own_grid_is_referenced_before_a_reoriented_copy(data_dir, tmp_path):
    """A study folder with an axial series and a sagittal copy of it: masks on the axial grid, no series UID given,
    reference the axial series (on their own grid), not the copy whose axial grid theirs also is."""
    study = tmp_path / "study"
    study.mkdir()
    template = data_dir / "dcmqi_ct3slice" / "ct" / "01.dcm"
    _write_dicom_series(_axial_ct(), study / "axial", template)
    _write_dicom_series(sitk.Flip(sitk.PermuteAxes(_axial_ct(), [1, 2, 0]), [True, False, False]), study / "sagittal",
                        template)
    axial = read_ct(study / "axial")
    result = _axial_result(axial)
    path = write_dicom_seg(result, study, tmp_path / "seg.dcm")
    back = read_segmentation(path, reference=axial.geometry)
    assert back.provenance["dicom_series_uid"] == axial.metadata["dicom_series_uid"]
    np.testing.assert_array_equal(back.segment("liver").mask_kji, result.segment("liver").mask_kji)


def test_a_mask_not_of_the_axial_grids_shape_is_an_output_error(stored_series, tmp_path):
    folder, volume, axial, _ = stored_series
    result = _axial_result(axial)
    wrong = SegmentationResult(geometry=result.geometry, segments=[
        Segment("liver", 1, result.segments[0].mask_kji[:-1], (0.8, 0.4, 0.3))])
    with pytest.raises(OutputError, match="mask shape .* expected .* axial grid of the"):
        write_dicom_seg(wrong, folder, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()
