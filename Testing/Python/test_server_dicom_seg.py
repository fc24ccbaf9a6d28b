"""``POST /v1/sessions/{id}/export/dicom-seg``: session masks as a DICOM SEG on the real dcmqi 3-slice CT series.

The application runs in-process (Starlette's test client); no model is loaded (an export needs none).
"""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import pydicom
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from liversam.dicom_seg import read_dicom_seg  # noqa: E402
from liversam.dicom_series import read_dicom_series  # noqa: E402
from liversam.server.app import create_app  # noqa: E402
from liversam.server.config import ServerConfig  # noqa: E402

TOKEN = "token-of-alice-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class NoModel:
    def __call__(self):
        raise AssertionError("an export must not load the model")


@pytest.fixture(scope="module")
def dcmqi(data_dir: Path) -> Path:
    return data_dir / "dcmqi_ct3slice"


@pytest.fixture(scope="module")
def client(data_dir: Path, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside-the-root")
    config = ServerConfig(tokens=[TOKEN], data_roots=[data_dir])
    application = create_app(config, model_loader=NoModel())
    with TestClient(application, raise_server_exceptions=False) as test_client:
        test_client.outside = outside
        yield test_client


@pytest.fixture(scope="module")
def ct(dcmqi: Path):
    return read_dicom_series(dcmqi / "ct")


@pytest.fixture(scope="module")
def liver(dcmqi: Path) -> np.ndarray:
    voxels, _header = nrrd.read(str(dcmqi / "liver_seg.nrrd"))  # [i, j, k], on the series' grid
    return voxels.transpose(2, 1, 0) > 0


def upload(client: TestClient, session: str, name: str, mask: np.ndarray) -> None:
    answer = client.put(f"/v1/sessions/{session}/masks/{name}", content=np.packbits(mask).tobytes(),
                        headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert answer.status_code == 204, answer.text


def open_voxels(client: TestClient, ct, spacing=None) -> str:
    g = ct.geometry
    spacing = spacing or g.spacing_mm
    query = (f"shape={','.join(map(str, g.shape_kji))}&spacing={','.join(map(str, spacing))}"
             f"&origin={','.join(map(str, g.origin_lps))}&direction={','.join(map(str, g.direction_lps.ravel()))}")
    answer = client.post(f"/v1/sessions?{query}", content=np.ascontiguousarray(ct.array_kji, "<i2").tobytes(),
                         headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert answer.status_code == 201, answer.text
    return answer.json()["session_id"]


def export(client: TestClient, session: str, **body):
    body.setdefault("segments", [{"name": "liver", "mask": "liver_now"}, {"name": "tumor", "mask": "tumor_now"}])
    return client.post(f"/v1/sessions/{session}/export/dicom-seg", json=body, headers=AUTH)


def refused(answer, status: int, *words: str) -> str:
    assert answer.status_code == status, f"expected {status}, got {answer.status_code}: {answer.text}"
    detail = answer.json()["detail"]
    for word in words:
        assert word.lower() in detail.lower(), detail
    return detail


def test_session_opened_from_the_dicom_folder_exports_its_masks(client, dcmqi, ct, liver, tmp_path):
    answer = client.post("/v1/sessions/open-path", json={"path": str(dcmqi / "ct")}, headers=AUTH)
    assert answer.status_code == 201, answer.text
    session = answer.json()["session_id"]
    tumor = np.zeros_like(liver)
    tumor[1, 240:270, 150:180] = True
    tumor &= liver
    upload(client, session, "liver_now", liver)
    upload(client, session, "tumor_now", tumor)

    answer = export(client, session)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom"
    path = tmp_path / "seg.dcm"
    path.write_bytes(answer.content)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG"
    assert [str(s.SegmentLabel) for s in ds.SegmentSequence] == ["liver", "tumor"]
    assert int(ds.NumberOfFrames) == 3 + 1  # liver on the 3 slices, tumour on one (empty frames omitted)
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == ct.metadata["dicom_series_uid"]
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == set(
        ct.metadata["dicom_sop_instance_uids"])

    back = read_dicom_seg(path, reference=ct.geometry)
    assert np.array_equal(back.segment("liver").mask_kji, liver)
    assert np.array_equal(back.segment("tumor").mask_kji, tumor)


def test_voxel_session_with_the_reference_folder(client, dcmqi, ct, liver, tmp_path):
    session = open_voxels(client, ct)
    upload(client, session, "liver_now", liver)
    upload(client, session, "tumor_now", np.zeros_like(liver))
    refused(export(client, session), 422, "not read from a DICOM series", "reference_dicom")

    answer = export(client, session, reference_dicom=str(dcmqi / "ct"))
    assert answer.status_code == 200, answer.text
    path = tmp_path / "seg.dcm"
    path.write_bytes(answer.content)
    back = read_dicom_seg(path, reference=ct.geometry)
    assert [s.name for s in back.segments] == ["liver"]  # the empty tumour is left out
    assert np.array_equal(back.segment("liver").mask_kji, liver)
    assert back.provenance["dicom_series_uid"] == ct.metadata["dicom_series_uid"]


def test_bad_exports_are_refused_with_what_is_wrong(client, dcmqi, ct, liver, data_dir):
    wrong_grid = open_voxels(client, ct, spacing=(1.0, 1.0, 1.0))
    upload(client, wrong_grid, "liver_now", liver)
    upload(client, wrong_grid, "tumor_now", liver)
    refused(export(client, wrong_grid, reference_dicom=str(dcmqi / "ct")), 422, "does not match the DICOM series")

    session = open_voxels(client, ct)
    upload(client, session, "liver_now", np.zeros_like(liver))
    upload(client, session, "tumor_now", np.zeros_like(liver))
    refused(export(client, session, reference_dicom=str(dcmqi / "ct")), 422, "empty")
    refused(export(client, session, reference_dicom=str(dcmqi / "ct"),
                   segments=[{"name": "liver", "mask": "never_uploaded"}]), 422, "never_uploaded", "not in the session")
    upload(client, session, "liver_now", liver)
    refused(export(client, session, reference_dicom=str(data_dir / "no-such-folder")), 422, "not found")
    refused(export(client, session, reference_dicom=str(client.outside)), 403, "outside the server's data roots")
    no_series = data_dir / "lits117"  # a folder with files but no DICOM series
    refused(export(client, session, reference_dicom=str(no_series)), 422, "DICOM")
    refused(export(client, "no-such-session"), 404)


def test_series_uid_that_is_not_in_the_folder_is_named(client, dcmqi, ct, liver):
    session = open_voxels(client, ct)
    upload(client, session, "liver_now", liver)
    upload(client, session, "tumor_now", np.zeros_like(liver))
    refused(export(client, session, reference_dicom=str(dcmqi / "ct"), series_uid="1.2.3.4"), 422, "1.2.3.4")
