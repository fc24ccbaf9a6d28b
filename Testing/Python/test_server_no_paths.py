"""No file path of the server's machine reaches a token holder through the HTTP API (session 39).

Every token holder reads the server's answers. GET /v1/models and GET /v1/info already named a checkpoint by its file
name (session 38); the model's load error (GET /v1/info's ``model.error``, the 503 of every request that needs the
model, a job's ``error``), a DICOM SEG export's errors and the DICOM SEG itself still gave the server's paths (user
names, folders, where the weights and temporary files lie). Now they name files by their file names (LiverSAM's own
folders by their documented names, so that "put it at ..." still says where), the full message goes to the server's
log once, and paths the client may open (under the data roots) are still given back.

The application runs in-process (Starlette's test client), with the real model loader where the load must fail.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from liversam.server.app import create_app, public_description  # noqa: E402
from liversam.server.config import ServerConfig  # noqa: E402

TOKEN = "token-of-alice-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHAPE = (6, 20, 24)  # k, j, i
PROPAGATE = {"segments": [{"name": "liver", "boxes": [[[1, 1, 2], [8, 8, 2]]]}]}


def open_volume(client: TestClient) -> str:
    answer = client.post("/v1/sessions?shape=6,20,24&spacing=0.8,0.8,2.5&origin=0,0,0",
                         content=np.zeros(SHAPE, "<i2").tobytes(),
                         headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert answer.status_code == 201, answer.text
    return answer.json()["session_id"]


def finished_job(client: TestClient, job_id: str, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never ended: {status}")


def model_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "model cannot be loaded" in
            r.getMessage()]


@pytest.fixture
def corrupt_checkpoint(tmp_path) -> Path:
    """A damaged checkpoint in a folder whose names hold spaces (a user name, run folders)."""
    path = tmp_path / "alice smith" / "my runs" / "a b" / "best.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x80\x02 this is no pickle a torch checkpoint holds")
    return path


def test_a_model_that_cannot_be_loaded_is_named_by_its_file_name_and_logged_once(corrupt_checkpoint, tmp_path,
                                                                                  caplog):
    """``liversam serve --model '/home/alice smith/my runs/a b/best.pt'`` with a damaged file: the 503 of each request
    needing the model, GET /v1/info's model.error and the job's error gave every token holder that path."""
    caplog.set_level(logging.INFO)
    # a server other machines reach (a loopback one gives its user every path: see the loopback test below)
    config = ServerConfig(tokens=[TOKEN], host="0.0.0.0", model=str(corrupt_checkpoint), accelerate="plain")
    with TestClient(create_app(config), raise_server_exceptions=False) as client:  # the real loader
        session = open_volume(client)
        answers = [client.post(f"/v1/sessions/{session}/predict", json={"k": 2, "boxes": [[1, 1, 8, 8]]},
                               headers=AUTH) for _ in range(2)]
        info = client.get("/v1/info", headers=AUTH).json()
        job = client.post(f"/v1/sessions/{session}/jobs/propagate", json=PROPAGATE, headers=AUTH)
        assert job.status_code == 202, job.text
        status = finished_job(client, job.json()["job_id"])
        session_info = client.get(f"/v1/sessions/{session}", headers=AUTH)
        closed = client.delete(f"/v1/sessions/{session}", headers=AUTH)

    for answer in answers:
        assert answer.status_code == 503, answer.text
        detail = answer.json()["detail"]
        assert detail.startswith("the server's model cannot be used: 'best.pt' is not a loadable weights-only "
                                 "PyTorch checkpoint"), detail
        assert "check that this is the right file" in detail  # the advice stays
    error = info["model"]["error"]
    assert error.startswith("'best.pt' is not a loadable weights-only PyTorch checkpoint"), error
    assert info["model"]["name"] == "best.pt" and not info["model"]["loaded"]
    # the job failed saying why (it stayed 'queued' for good: its work never ran, and nobody said so)
    assert status["state"] == "failed", status
    assert status["error"].startswith("the server's model cannot be used: 'best.pt' is not a loadable"), status
    assert session_info.status_code == 200 and closed.status_code == 204
    for text in [a.text for a in answers] + [str(info), str(status)]:
        assert str(tmp_path) not in text and "alice smith" not in text and "my runs" not in text, text
    # the server's log has the full message: once, not once per request that tried to load the model
    logged = model_errors(caplog)
    assert len(logged) == 1, logged
    assert str(corrupt_checkpoint) in logged[0]


def test_the_advice_to_put_missing_weights_in_the_models_folder_still_says_where(tmp_path, monkeypatch):
    """``--model sam_vit_b`` without its official file: "put it at '/home/alice/.liversam/models/sam_vit_b_01ec64.pth'"
    named the server's user; now the folder's documented name, and the download address and ``--model`` advice stay."""
    home = tmp_path / "alice smith" / "liversam home"
    monkeypatch.setenv("LIVERSAM_HOME", str(home))
    config = ServerConfig(tokens=[TOKEN], host="0.0.0.0", model="sam_vit_b", accelerate="plain")
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        session = open_volume(client)
        answer = client.post(f"/v1/sessions/{session}/predict", json={"k": 2, "boxes": [[1, 1, 8, 8]]}, headers=AUTH)
    assert answer.status_code == 503, answer.text
    detail = answer.json()["detail"]
    assert str(tmp_path) not in detail, detail
    assert ("Checkpoint for 'sam_vit_b' not found at '$LIVERSAM_HOME/models/sam_vit_b_01ec64.pth'. Download the "
            "official file from https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth, then put it at "
            "'$LIVERSAM_HOME/models/sam_vit_b_01ec64.pth' or give its path as "
            "--model sam_vit_b=/path/to/sam_vit_b_01ec64.pth.") in detail, detail


def test_a_loader_failing_with_another_error_is_a_503_without_paths(tmp_path, caplog):
    """A loader failing with an OSError (a file it cannot read): each request needing the model was a 500, and
    GET /v1/info's model.error quoted the path."""
    caplog.set_level(logging.INFO)
    weights = tmp_path / "alice" / "w.pt"

    def unreadable():
        raise PermissionError(errno.EACCES, "Permission denied", str(weights))

    with TestClient(create_app(ServerConfig(tokens=[TOKEN], host="0.0.0.0"), model_loader=unreadable),
                    raise_server_exceptions=False) as client:
        session = open_volume(client)
        answer = client.post(f"/v1/sessions/{session}/predict", json={"k": 2, "boxes": [[1, 1, 8, 8]]}, headers=AUTH)
        error = client.get("/v1/info", headers=AUTH).json()["model"]["error"]
    assert answer.status_code == 503, answer.text
    assert answer.json()["detail"] == ("the server's model cannot be used: loading it failed: PermissionError: "
                                       "[Errno 13] Permission denied: 'w.pt'")
    assert error == "loading it failed: PermissionError: [Errno 13] Permission denied: 'w.pt'"
    assert len(model_errors(caplog)) == 1 and str(weights) in model_errors(caplog)[0]


@pytest.mark.parametrize(("description", "public"), [
    ("trained model /home/alice/my runs/a b/best.pt", "trained model best.pt"),
    ("weights in /home/alice/my runs/a b/best.pt (fold 2)", "weights in best.pt (fold 2)"),
    ("from /srv/models/liver v2/final; validation by bob", "from final; validation by bob"),
    ("run folder /srv/runs/run 7/out", "run folder out"),
    (r"weights C:\Users\Alice Smith\runs\best.pt, fold 1", "weights best.pt, fold 1"),
    (r"weights \\nas\share\liver runs\best.pth", "weights best.pth"),
    # a path with no space does not eat the words after it; text that holds no path stays as it is
    ("data in /home/alice/data and model best.pt", "data in data and model best.pt"),
    ("data in /home/alice/data and/or more", "data in data and/or more"),
    ("see https://example.org/liver/model.pt; or /opt/x/y.onnx", "see https://example.org/liver/model.pt; or y.onnx"),
    ("liver, 2/3 of the studies; $LIVERSAM_HOME/models", "liver, 2/3 of the studies; $LIVERSAM_HOME/models"),
])
def test_descriptions_with_paths_holding_spaces_are_shortened_whole(description, public):
    """The path pattern stopped at a space: "/home/alice/my runs/a b/best.pt" became "my runs/a b/best.pt"."""
    assert public_description(description) == public


@pytest.mark.parametrize(("text", "public"), [
    # words after a path without spaces were taken for more of it until a later word held a "/" (session 39's review)
    ("Trained from /home/alice/data on 2024/05/01", "Trained from data on 2024/05/01"),
    ("fine-tuned on /srv/lits for liver/tumour", "fine-tuned on lits for liver/tumour"),
    ("internal error: KeyError: /home/alice/x not in cache. Set dtype int16/float32",
     "internal error: KeyError: x not in cache. Set dtype int16/float32"),
    ("use --cache-dir /tmp/x or set %LIVERSAM_HOME%\\models", "use --cache-dir x or set %LIVERSAM_HOME%\\models"),
    ("Could not open /home/alice/in: use the input/output folder", "Could not open in: use the input/output folder"),
    ("first /srv/a\nsecond line/with a slash", "first a\nsecond line/with a slash"),
    # paths with spaces are still shortened whole
    ("reading file /home/alice/My Scans/ct 1.nii.gz failed", "reading file ct 1.nii.gz failed"),
    ("cannot read /home/alice/My Documents/CT/case1 (not a DICOM folder)", "cannot read case1 (not a DICOM folder)"),
    ("Exception: /home/alice/x\n/home/bob/y z/w.pt", "Exception: x\nw.pt"),
    # a user name is never left: a home folder alone, a Windows profile's name with spaces
    ("[Errno 13] Permission denied: '/home/alice'", "[Errno 13] Permission denied: '(a folder)'"),
    ("cannot write to /home/alice: Permission denied", "cannot write to (a folder): Permission denied"),
    ("cannot write to /home/alice: see the input/output folder", "cannot write to (a folder): see the input/output folder"),
    ("cannot write to /Users/alice/ at all", "cannot write to (a folder) at all"),
    (r"'C:\Users\Alice Smith' is full", "'(a folder)' is full"),
    (r"cannot read C:\Users\Alice Smith\data is not a DICOM folder", "cannot read data is not a DICOM folder"),
    (r"C:\Users\Anna van Dijk\AppData\Local\liversam\cache\encoders\abc-1024px is not writable",
     "abc-1024px is not writable"),
    ("Load model from /home/alice smith/.cache/x/encoder.onnx failed", "Load model from encoder.onnx failed"),
    ("in /home/alice smith/runs today", "in runs today"),
    # a file:// URL's path and a path after a colon are paths; other URLs and LiverSAM's documented folders stay
    ("file:///home/alice/w.pt", "file:w.pt"),
    ("see path:/home/alice/w.pt", "see path:w.pt"),
    ("from https://example.org/a/b.pth and HTTP://x.org/c", "from https://example.org/a/b.pth and HTTP://x.org/c"),
    ("Checkpoint not found at '~/.liversam/models/sam_vit_b_01ec64.pth'; put it in ~/.liversam/models.",
     "Checkpoint not found at '~/.liversam/models/sam_vit_b_01ec64.pth'; put it in ~/.liversam/models."),
    ("Close a session you no longer need (DELETE /v1/sessions/{id})",
     "Close a session you no longer need (DELETE /v1/sessions/{id})"),
])
def test_public_text_takes_no_words_for_a_path_and_leaves_no_user_name(text, public, monkeypatch):
    """An unquoted path was carried over the following words until one held a separator and ended the text (or
    preceded "; "), so whole sentences vanished; a home folder alone left its user's name."""
    from liversam.server.public import public_text

    monkeypatch.delenv("LIVERSAM_HOME", raising=False)
    monkeypatch.delenv("LIVERSAM_CACHE_DIR", raising=False)
    assert public_text(text) == public


def test_home_folders_in_descriptions_and_model_names_are_not_named_by_their_user():
    from liversam.server.public import public_model_name

    assert public_description("trained model /home/alice") == "trained model (a folder)"
    assert public_model_name("medsam=/home/alice") == "medsam=(a folder)"
    assert public_model_name("C:/Users/alice/") == "(a folder)"


def test_a_loopback_server_tells_its_user_which_model_file_failed(corrupt_checkpoint):
    """A loopback server without --data-root gives back every path (its token holders read any file its user can),
    but the model's load error was shortened: a local Slicer user whose registered model failed saw only 'best.pt',
    the name of every run's checkpoint."""
    config = ServerConfig(tokens=[TOKEN], model=str(corrupt_checkpoint), accelerate="plain")
    assert config.allow_any_path
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        session = open_volume(client)
        answer = client.post(f"/v1/sessions/{session}/predict", json={"k": 2, "boxes": [[1, 1, 8, 8]]}, headers=AUTH)
        info = client.get("/v1/info", headers=AUTH).json()
        job = client.post(f"/v1/sessions/{session}/jobs/propagate", json=PROPAGATE, headers=AUTH)
        status = finished_job(client, job.json()["job_id"])
    assert answer.status_code == 503, answer.text
    assert answer.json()["detail"].startswith(f"the server's model cannot be used: '{corrupt_checkpoint}' is not a "
                                              "loadable"), answer.text
    assert info["model"]["error"].startswith(f"'{corrupt_checkpoint}' is not a loadable"), info
    assert status["state"] == "failed" and f"'{corrupt_checkpoint}'" in status["error"], status


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_a_failed_jobs_full_error_goes_to_the_log_when_the_client_gets_it_shortened(host, tmp_path, monkeypatch,
                                                                                   caplog):
    """A job failing with a LiverSAMError that names a path of the server: the client's message names the file only,
    and the full message was logged nowhere (the docs say it goes to the server's log)."""
    from liversam.errors import LiverSAMError

    cache = tmp_path / "alice smith" / "cache" / "encoder.onnx"

    def failing(*args, **kwargs):
        raise LiverSAMError(f"Cannot write the encoder cache '{cache}': Permission denied.")

    monkeypatch.setattr("liversam.server.jobs.segment_volume", failing)  # (the model is not used)
    monkeypatch.setattr("liversam.server.sessions.Session.predictor", lambda session, model: None)
    caplog.set_level(logging.INFO)
    config = ServerConfig(tokens=[TOKEN], host=host, accelerate="plain")
    with TestClient(create_app(config, model_loader=object), raise_server_exceptions=False) as client:
        session = open_volume(client)
        job = client.post(f"/v1/sessions/{session}/jobs/propagate", json=PROPAGATE, headers=AUTH)
        status = finished_job(client, job.json()["job_id"])
    logged = [r.getMessage() for r in caplog.records if str(cache) in r.getMessage()]
    assert status["state"] == "failed", status
    if config.allow_any_path:  # the loopback server's user may read it: nothing shortened, nothing logged again
        assert status["error"] == f"Cannot write the encoder cache '{cache}': Permission denied.", status
        assert logged == [], logged
    else:
        assert status["error"] == "Cannot write the encoder cache 'encoder.onnx': Permission denied.", status
        assert len(logged) == 1 and job.json()["job_id"] in logged[0], logged


def test_paths_under_the_data_roots_are_still_given_back(tmp_path):
    """A CT the client opened by path (under a data root) is named in the error as before: the client sent it."""
    root = tmp_path / "data root"
    (root / "case 1").mkdir(parents=True)
    (root / "case 1" / "ct.nii.gz").write_bytes(b"not a CT")
    config = ServerConfig(tokens=[TOKEN], host="0.0.0.0", data_roots=[root])
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        answer = client.post("/v1/sessions/open-path", json={"path": str(root / "case 1" / "ct.nii.gz")}, headers=AUTH)
    assert answer.status_code == 422, answer.text
    assert f"'{root / 'case 1' / 'ct.nii.gz'}'" in answer.json()["detail"]


# --- DICOM SEG ------------------------------------------------------------------------------------------------------
@pytest.fixture
def dicom_session(data_dir: Path, tmp_path):
    """A session opened from the dcmqi 3-slice DICOM series, with a liver mask, on a server whose --model is a path."""
    import nrrd

    dcmqi = data_dir / "dcmqi_ct3slice"
    config = ServerConfig(tokens=[TOKEN], data_roots=[data_dir], model=str(tmp_path / "alice" / "runs" / "best.pt"))
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        answer = client.post("/v1/sessions/open-path", json={"path": str(dcmqi / "ct")}, headers=AUTH)
        assert answer.status_code == 201, answer.text
        session = answer.json()["session_id"]
        voxels, _ = nrrd.read(str(dcmqi / "liver_seg.nrrd"))
        answer = client.put(f"/v1/sessions/{session}/masks/liver", content=np.packbits(voxels.transpose(2, 1, 0) > 0),
                            headers={**AUTH, "Content-Type": "application/octet-stream"})
        assert answer.status_code == 204, answer.text
        yield client, session


def export(client: TestClient, session: str):
    return client.post(f"/v1/sessions/{session}/export/dicom-seg", json={"segments": [{"name": "liver", "mask": "liver"}]},
                       headers=AUTH)


def test_the_dicom_seg_names_the_model_by_its_file_name(dicom_session, tmp_path):
    """An export before the model was loaded wrote ``--model``, a path of the server's machine, into the SEG the
    client downloads (ContentDescription, the segments' algorithm, ManufacturerModelName)."""
    client, session = dicom_session
    answer = export(client, session)
    assert answer.status_code == 200, answer.text
    assert str(tmp_path).encode() not in answer.content
    (tmp_path / "seg.dcm").write_bytes(answer.content)
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    assert ds.ManufacturerModelName == "best.pt"
    assert str(ds.ContentDescription).endswith("model best.pt")


def test_a_dicom_seg_the_server_cannot_write_names_no_folder_of_the_server(dicom_session, tmp_path, monkeypatch,
                                                                           caplog):
    """A full disk under the server's temporary folder answered 422 "Cannot write '/tmp/liversam-seg-x/liversam-seg.dcm':
    ...; free some disk space in '/tmp/liversam-seg-x'", advice the client cannot follow; a temporary folder that
    cannot be made was a 500. Both are now a 503 saying it is the server's machine; the log names the folder."""
    import highdicom

    client, session = dicom_session
    caplog.set_level(logging.INFO)

    def disk_full(self, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(highdicom.seg.Segmentation, "save_as", disk_full)
    answer = export(client, session)
    assert answer.status_code == 503, answer.text
    detail = answer.json()["detail"]
    assert "cannot write the DICOM SEG to its temporary folder (No space left on device)" in detail, detail
    assert "administrator" in detail and "liversam-seg-" not in detail and "/" not in detail, detail
    assert any("liversam-seg-" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)

    monkeypatch.undo()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "removed temp"))  # the folder is gone
    answer = export(client, session)
    assert answer.status_code == 503, answer.text
    detail = answer.json()["detail"]
    assert "temporary folder (No such file or directory)" in detail and str(tmp_path) not in detail, detail


def test_public_text_keeps_the_data_roots_and_names_liversams_folders(tmp_path, monkeypatch):
    from liversam.server.public import public_text

    monkeypatch.setenv("LIVERSAM_CACHE_DIR", str(tmp_path / "cache dir"))
    root = tmp_path / "data root"
    text = (f"'{root}/case 1/ct.nii.gz' and '{tmp_path}/elsewhere/ct.nii.gz'; cache "
            f"{tmp_path}/cache dir/encoders/abc-1024px/encoder.onnx; [Errno 13] Permission denied: "
            f"'{tmp_path}/O'Brien/w.pt'; from https://example.org/a/b.pth")
    assert public_text(text, keep=[root]) == (
        f"'{root}/case 1/ct.nii.gz' and 'ct.nii.gz'; cache $LIVERSAM_CACHE_DIR/encoders/abc-1024px/encoder.onnx; "
        "[Errno 13] Permission denied: 'w.pt'; from https://example.org/a/b.pth")
    assert public_text(r"'C:\Users\Alice Smith\w.pt' and D:/runs/x y/b.ckpt") == "'w.pt' and b.ckpt"
