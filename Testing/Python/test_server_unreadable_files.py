"""Files of the client's input that cannot be read (permission denied, vanished or replaced while the server read them,
a name the file system refuses) are answered with what is wrong with which input and what to do (a 4xx naming the
path as the client gave it), a problem of the server's machine (too many open files) with a 503 naming no path of
it; never a 500 "Internal Server Error" without a message. In-process (Starlette's test client), on a copy of the
real dcmqi 3-slice CT series in a data root; no model is loaded.

The server's tests run as root, which chmod cannot stop: a folder without search permission is what the standard
library raises for it (``Path.is_file`` -> PermissionError), a vanished file is really deleted or replaced.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import nrrd
import numpy as np
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

import liversam.dicom_seg as dicom_seg  # noqa: E402
import liversam.server.app as server_app  # noqa: E402
from liversam.server.app import create_app  # noqa: E402
from liversam.server.config import ServerConfig  # noqa: E402

TOKEN = "token-of-alice-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def no_model():
    raise AssertionError("no request here needs the model")


@pytest.fixture(scope="module")
def root(data_dir: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data-root")
    shutil.copytree(data_dir / "dcmqi_ct3slice" / "ct", root / "study" / "locked" / "ct")
    return root


@pytest.fixture(scope="module")
def client(root: Path):
    application = create_app(ServerConfig(tokens=[TOKEN], data_roots=[root]), model_loader=no_model)
    with TestClient(application, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def liver(data_dir: Path) -> np.ndarray:
    voxels, _header = nrrd.read(str(data_dir / "dcmqi_ct3slice" / "liver_seg.nrrd"))  # [i, j, k]
    return voxels.transpose(2, 1, 0) > 0


def refused(answer, status: int, *words: str) -> str:
    assert answer.status_code == status, f"expected {status}, got {answer.status_code}: {answer.text}"
    detail = answer.json()["detail"]
    for word in words:
        assert word.lower() in detail.lower(), detail
    return detail


def open_path(client: TestClient, path: str):
    return client.post("/v1/sessions/open-path", json={"path": path}, headers=AUTH)


def no_search_permission(monkeypatch, folder: Path) -> None:
    """What the standard library raises for the files of ``folder`` when it may be listed but not searched (r--)."""
    is_file = Path.is_file

    def denied(self: Path) -> bool:
        if folder in self.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return is_file(self)

    monkeypatch.setattr(Path, "is_file", denied)


def test_a_name_the_file_system_refuses_is_told(client):
    name = "x" * 300  # longer than a file name may be: exists() raises (ENAMETOOLONG)
    detail = refused(open_path(client, name), 422, f"'{name}'", "file name too long", "give another path")
    assert "Internal Server Error" not in detail


def test_a_folder_that_may_not_be_searched_is_named(client, root, monkeypatch):
    no_search_permission(monkeypatch, root / "study" / "locked")
    refused(open_path(client, "study"), 422, "the CT 'study' cannot be read", "permission denied",
            str(root / "study" / "locked" / "ct"), "open (search) every folder", "made readable")


def test_a_problem_of_the_servers_machine_is_503_naming_none_of_its_paths(client, root, monkeypatch):
    def too_many_open_files(path, *args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files", str(path))

    monkeypatch.setattr(server_app, "_read_axial_ct", too_many_open_files)
    detail = refused(open_path(client, "study/locked/ct"), 503, "'study/locked/ct'", "too many open files",
                     "server's machine", "server's log")
    assert str(root) not in detail


def open_with_masks(client: TestClient, liver: np.ndarray, path: str = "study/locked/ct") -> str:
    answer = open_path(client, path)
    assert answer.status_code == 201, answer.text
    session = answer.json()["session_id"]
    answer = client.put(f"/v1/sessions/{session}/masks/liver", content=np.packbits(liver).tobytes(),
                        headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert answer.status_code == 204, answer.text
    return session


def export(client: TestClient, session: str, **body):
    body.setdefault("segments", [{"name": "liver", "mask": "liver"}])
    return client.post(f"/v1/sessions/{session}/export/dicom-seg", json=body, headers=AUTH)


@pytest.mark.parametrize("change, words", [
    (lambda file: file.unlink(), ("vanished", "deleted or moved")),
    (lambda file: (file.unlink(), file.mkdir()), ("a folder stands where a file was expected",)),
], ids=["deleted", "replaced-by-a-folder"])
def test_a_series_file_gone_after_its_headers_were_read_is_named(client, root, liver, monkeypatch, change, words):
    """The SEG's writer lists the series (headers), then reads each file again: one deleted or replaced meanwhile."""
    shutil.copytree(root / "study" / "locked" / "ct", root / "vanishing")
    session = open_with_masks(client, liver, "vanishing")
    reference_for = dicom_seg._reference_for

    def then_one_goes(*args, **kwargs):
        found = reference_for(*args, **kwargs)
        change(Path(found[1].files[1]))
        return found

    monkeypatch.setattr(dicom_seg, "_reference_for", then_one_goes)
    try:
        refused(export(client, session), 422, "the DICOM series this session was read from cannot be read",
                         *words, str(root / "vanishing" / "02.dcm"), "put it back", "reference_dicom",
                         "nothing was written")
    finally:
        shutil.rmtree(root / "vanishing")


def test_a_reference_folder_that_may_not_be_searched_is_named(client, root, liver, monkeypatch):
    session = open_with_masks(client, liver)
    no_search_permission(monkeypatch, root / "study" / "locked")
    refused(export(client, session, reference_dicom="study/locked/ct/01.dcm"), 422,
            "the reference DICOM 'study/locked/ct/01.dcm' cannot be read", "permission denied",
            "another reference_dicom")
    refused(export(client, session), 422, "the DICOM series this session was read from cannot be read",
            "permission denied", "reference_dicom")


def test_a_reference_name_the_file_system_refuses_is_told(client, liver):
    session = open_with_masks(client, liver)
    name = "y" * 300
    refused(export(client, session, reference_dicom=name), 422, f"the reference DICOM '{name}'",
            "file name too long")


def test_a_symbolic_link_loop_is_told(client, root, liver):
    (root / "loop").symlink_to(root / "loop")
    (root / "there").symlink_to(root / "back")
    (root / "back").symlink_to(root / "there")
    for path in ("loop", "there/ct", str(root / "loop")):
        refused(open_path(client, path), 422, f"path '{path}' holds a symbolic link loop", "fix the link")
    session = open_with_masks(client, liver)
    refused(export(client, session, reference_dicom="loop"), 422, "path 'loop' holds a symbolic link loop")
