"""``POST /v1/sessions/open-path`` on an irregular DICOM series (a slice missing from the real TotalSegmentator series):
refused by default with the request field that opens it, opened on a regular grid with ``resample_irregular: true``
(sized for the budget from its headers as that grid, before a pixel is read), and never exported as a DICOM SEG that
would reference slices it does not have."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("fastapi")

from test_server_memory_budget import budget_client, state_of  # noqa: E402
from test_server_sharing import FakeModel, auth  # noqa: E402

from liversam.dicom_series import find_series, resampled_read_size, sort_series  # noqa: E402

GAP = 10  # the slice taken out (of 20, 2 mm apart): slices 9 and 11 are then 4 mm apart


@pytest.fixture(scope="module")
def irregular(data_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("irregular") / "ct_dicom"
    shutil.copytree(data_dir / "totalseg_small" / "ct_dicom", folder)
    by_z = sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True)
                                                       .ImagePositionPatient[2]))
    by_z[GAP].unlink()
    return folder


def open_folder(client, folder: Path, **options):
    return client.post("/v1/sessions/open-path", json={"path": str(folder), **options}, headers=auth())


def test_an_irregular_series_is_refused_with_the_field_that_opens_it(irregular):
    with budget_client(FakeModel(), 2**30) as client:
        answer = open_folder(client, irregular)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert str(irregular) in detail and "regular" in detail, detail
    assert '"resample_irregular": true' in detail, detail  # what a client of the server sends, not only the CLI's flag


def test_resample_irregular_opens_it_on_a_regular_grid_sized_before_it_is_read(irregular, monkeypatch):
    import liversam.dicom_series

    sorted_series = sort_series(find_series(irregular)[1], irregular)
    assert not sorted_series.regular
    voxels, ct_bytes, reading_bytes = resampled_read_size(sorted_series)
    decode = liversam.dicom_series._read_slice_hu
    reserved: list[int] = []

    def watched(*args, **kwargs):
        reserved.append(state_of(client).sessions._reserved)
        return decode(*args, **kwargs)

    monkeypatch.setattr(liversam.dicom_series, "_read_slice_hu", watched)
    with budget_client(FakeModel(), 2**30) as client:
        answer = open_folder(client, irregular, resample_irregular=True)
        assert answer.status_code == 201, answer.text
        info = answer.json()
        assert info["resampled"] is True
        assert set(reserved) == {ct_bytes + reading_bytes}, (reserved, ct_bytes, reading_bytes)
        assert state_of(client).sessions._reserved == 0
        held = state_of(client).sessions.held().total
        assert held == ct_bytes  # the estimate is what the open session holds
    # the regular grid spans the series: 19 files over 38 mm, so 20 slices 2 mm apart (the gap interpolated)
    assert info["shape_kji"] == [20, 512, 512] and voxels == 20 * 512 * 512
    assert info["spacing_mm"][2] == pytest.approx(2.0)
    assert info["dtype"] == "float32"  # interpolated values (the estimate's 4 bytes a voxel)


def test_a_resampled_session_is_never_exported_as_a_dicom_seg(irregular):
    with budget_client(FakeModel(), 2**30) as client:
        session = open_folder(client, irregular, resample_irregular=True).json()["session_id"]
        mask = np.zeros((20, 512, 512), dtype=bool)
        mask[5:15, 200:300, 200:300] = True
        put = client.put(f"/v1/sessions/{session}/masks/liver", content=np.packbits(mask).tobytes(),
                         headers={**auth(), "Content-Type": "application/octet-stream"})
        assert put.status_code == 204, put.text
        for body in ({}, {"reference_dicom": str(irregular)}):
            answer = client.post(f"/v1/sessions/{session}/export/dicom-seg",
                                 json={"segments": [{"name": "liver", "mask": "liver"}], **body}, headers=auth())
            assert answer.status_code == 422, answer.text
            assert "resampled" in answer.json()["detail"] and ".seg.nrrd" in answer.json()["detail"], answer.text
