"""What arrives in a session keeps to ``liversam serve``'s memory budget as an open does: an uploaded mask evicts the
least recently used idle sessions of others (never its own, never one running a job) or is refused with 503 and
nothing kept; a finished job's masks are never lost: the session's older results, idle sessions and its own
embeddings give way first, and what is still over is kept, logged and reported in the job's status. The default
budget reads the machine's memory from sysconf, else psutil (Windows), under a container's limit.

A real in-process app with the fake models of test_server_sharing / test_server_memory_budget (a CT of SHAPE int16
holds 80 KiB, a mask 40 KiB), so budgets are a few hundred KiB.
"""

from __future__ import annotations

import re
import sys
import threading
import types

import numpy as np
import pytest

pytest.importorskip("fastapi")

from test_server_memory_budget import (  # noqa: E402
    CT_BYTES,
    GIB,
    MASK_BYTES,
    STORED,
    WideEmbeddings,
    budget_client,
    mb,
    session_of,
    state_of,
    wait_for_releases,
)
from test_server_sharing import OTHER, REPO, SHAPE, TOKEN, FakeModel, auth, open_session, start_job, wait_job  # noqa: E402

from liversam.server import memory  # noqa: E402
from liversam.server.config import ServerConfig  # noqa: E402


def put_mask(client, session: str, name: str = "liver", token: str = TOKEN, nbytes: int | None = None):
    """Upload a box-shaped mask as uint8 (``nbytes``: send that many bytes instead, a malformed body)."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[:, 4:28, 4:28] = 1
    body = mask.tobytes() if nbytes is None else bytes(nbytes)
    return client.put(
        f"/v1/sessions/{session}/masks/{name}?encoding=uint8",
        content=body,
        headers={**auth(token), "Content-Type": "application/octet-stream"},
    )


def held(client) -> int:
    return state_of(client).sessions.held().total


def budget(client) -> int:
    return state_of(client).config.session_memory_bytes


# --- mask uploads ---------------------------------------------------------------------------------------------------
def test_a_mask_upload_over_the_budget_evicts_another_users_idle_session():
    """Two CTs and half a mask fit: Alice's mask evicts Bob's idle session (the least recently used one), and the
    sessions hold no more than the budget."""
    with budget_client(FakeModel(), 2 * CT_BYTES + MASK_BYTES // 2) as client:
        bob = open_session(client, OTHER)
        alice = open_session(client)

        assert put_mask(client, alice).status_code == 204

        assert client.get(f"/v1/sessions/{bob}", headers=auth(OTHER)).status_code == 404
        assert client.get(f"/v1/sessions/{alice}", headers=auth()).json()["masks"] == ["liver"]
        wait_for_releases(client)
        assert held(client) == CT_BYTES + MASK_BYTES <= budget(client)


def test_a_mask_sent_again_replaces_the_old_one_and_needs_no_more_room():
    """One CT and one and a half masks fit: the same mask sent again takes the place of the one it replaces."""
    with budget_client(FakeModel(), CT_BYTES + 3 * MASK_BYTES // 2) as client:
        alice = open_session(client)
        for _ in range(3):
            assert put_mask(client, alice).status_code == 204
        assert held(client) == CT_BYTES + MASK_BYTES
        assert put_mask(client, alice, name="second").status_code == 503  # a second mask does not fit


def test_a_mask_that_cannot_fit_is_refused_with_the_figures_and_nothing_of_it_kept():
    """The other session runs a job (it is never evicted) and the session written to is never evicted for its own
    mask: 503 with the MB needed, the MB held of the budget, the sessions held, and what to do; the mask is not kept
    (also not when its body had not been read yet: the budget is asked before it is)."""
    with budget_client(FakeModel(), 2 * CT_BYTES + MASK_BYTES // 2) as client:
        alice = open_session(client)
        bob = open_session(client, OTHER)
        session_of(client, bob).active_jobs = 1  # as if a job ran on it
        before = held(client)

        answer = put_mask(client, alice)

        assert answer.status_code == 503, answer.text
        detail = answer.json()["detail"]
        for words in (
            f"mask 'liver' of session '{alice}' ({mb(MASK_BYTES)} MB)",
            f"its 2 sessions hold {mb(before)} MB of their {mb(budget(client))} MB memory budget",
            "1 of them running jobs",
            "nothing of the mask was kept",
            "DELETE /v1/sessions/{id}",
            "--session-memory-gb",
        ):
            assert words in detail, (words, detail)
        assert client.get(f"/v1/sessions/{alice}", headers=auth()).json()["masks"] == []
        assert client.get(f"/v1/sessions/{bob}", headers=auth(OTHER)).status_code == 200
        assert held(client) == before
        # refused before its body is read: a body of the wrong length gets the 503, not the 422 about its length
        assert put_mask(client, alice, nbytes=7).status_code == 503
        session_of(client, bob).active_jobs = 0  # the job "ended": Bob's idle session now gives way
        assert put_mask(client, alice).status_code == 204
        assert client.get(f"/v1/sessions/{bob}", headers=auth(OTHER)).status_code == 404


# --- job results ----------------------------------------------------------------------------------------------------
def job_state(client, job: str) -> dict:
    status = wait_job(client, job)
    assert status["state"] == "done", status
    return status


def test_a_jobs_masks_evict_another_users_idle_session_as_an_open_does():
    with budget_client(FakeModel(), 2 * CT_BYTES + MASK_BYTES // 2) as client:
        bob = open_session(client, OTHER)
        alice = open_session(client)
        status = job_state(client, start_job(client, alice, max_slices=1))
        assert status.get("warning", "missing") is None, status
        assert client.get(f"/v1/sessions/{bob}", headers=auth(OTHER)).status_code == 404
        assert client.get(f"/v1/sessions/{alice}", headers=auth()).json()["masks"] == ["liver"]
        wait_for_releases(client)
        assert held(client) <= budget(client)


def test_a_jobs_masks_drop_the_sessions_older_results_first():
    """A second run of 'liver' replaces the session's mask, but the first job's result still holds the old one: that
    older result gives way (410, as a result released to save memory) before anyone's session is evicted."""
    with budget_client(FakeModel(), 2 * CT_BYTES + 3 * MASK_BYTES // 2) as client:
        bob = open_session(client, OTHER)
        alice = open_session(client)
        first = start_job(client, alice, max_slices=1)
        job_state(client, first)
        second = start_job(client, alice, max_slices=1)
        assert job_state(client, second).get("warning", "missing") is None

        assert client.get(f"/v1/jobs/{first}/result", headers=auth()).status_code == 410
        assert client.get(f"/v1/jobs/{second}/result", headers=auth()).status_code == 200
        assert client.get(f"/v1/sessions/{bob}", headers=auth(OTHER)).status_code == 200
        assert held(client) <= budget(client)


def test_a_jobs_masks_take_the_place_of_the_sessions_own_embeddings_when_no_session_can_go():
    """Bob's session runs a job: Alice's own cached slices (encoded again when needed) make room for her job's mask."""
    model = WideEmbeddings()
    with budget_client(model, 10 * CT_BYTES) as client:
        bob = open_session(client, OTHER)
        alice = open_session(client)
        session_of(client, bob).active_jobs = 1
        job_state(client, start_job(client, alice, name="warmup", max_slices=2))  # encodes 5 slices
        slices = session_of(client, alice).cached_slices
        assert slices == model.encoded == 5
        # the next mask finds room for all of it but one slice and a little: it takes the place of two slices
        state_of(client).sessions.memory_limit_bytes = held(client) + MASK_BYTES - STORED - 100
        status = job_state(client, start_job(client, alice, name="liver", max_slices=2))

        assert status.get("warning", "missing") is None, status
        assert held(client) <= state_of(client).sessions.memory_limit_bytes
        assert session_of(client, alice).cached_slices == slices - 2
        assert client.get(f"/v1/sessions/{bob}", headers=auth(OTHER)).status_code == 200
        assert sorted(client.get(f"/v1/sessions/{alice}", headers=auth()).json()["masks"]) == [
            "liver",
            "warmup",
        ]


def test_a_jobs_masks_that_cannot_fit_are_kept_and_the_overshoot_is_reported(caplog):
    """Nothing can give way (Bob's session runs a job, Alice's has no job result or slice to spare): the finished
    propagation is kept all the same (a result is never lost), and its status says by how much the budget is over."""
    with budget_client(FakeModel(), 2 * CT_BYTES + MASK_BYTES // 2) as client:
        alice = open_session(client)
        bob = open_session(client, OTHER)
        session_of(client, bob).active_jobs = 1
        job = start_job(client, alice, max_slices=1)
        with caplog.at_level("WARNING", logger="liversam.server.jobs"):
            status = job_state(client, job)

        over = held(client) - budget(client)
        assert over > 0
        warning = status.get("warning") or ""
        for words in (
            f"({mb(MASK_BYTES)} MB) were kept",
            f"2 sessions now hold {mb(held(client))} MB of their {mb(budget(client))} MB memory budget",
            f"{mb(over)} MB over",
            "--session-memory-gb",
        ):
            assert words in warning, (words, warning)
        assert any(words in r.getMessage() for r in caplog.records for words in [f"{mb(over)} MB over"])
        assert client.get(f"/v1/jobs/{job}/result", headers=auth()).status_code == 200
        assert client.get(f"/v1/sessions/{alice}", headers=auth()).json()["masks"] == ["liver"]
        assert client.get(f"/v1/sessions/{bob}", headers=auth(OTHER)).status_code == 200


# --- a CT being read ------------------------------------------------------------------------------------------------
BIG, SMALL = ("hcc2144", 512 * 512 * 58 * 2), ("totalseg_small", 122 * 101 * 30 * 2)  # int16 (data README)


def open_path(client, data_dir, case: str, token: str = TOKEN):
    return client.post(
        "/v1/sessions/open-path", json={"path": str(data_dir / case / "ct.nii.gz")}, headers=auth(token)
    )


def test_opening_a_ct_by_path_makes_room_for_the_second_copy_reading_it_holds(data_dir):
    """read_ct holds the CT twice for a moment (the image, then its array; measured: peak RSS +139 MB for a 59.5 MB
    CT): an idle session gives way for that copy too. A CT that fits only without the copy still opens."""
    with budget_client(FakeModel(), 2 * BIG[1] + SMALL[1] // 2) as client:
        bob = open_path(client, data_dir, SMALL[0], token=OTHER)
        assert bob.status_code == 201, bob.text
        alice = open_path(client, data_dir, BIG[0])
        assert alice.status_code == 201, alice.text
        assert client.get(f"/v1/sessions/{bob.json()['session_id']}", headers=auth(OTHER)).status_code == 404
    with budget_client(FakeModel(), BIG[1] + SMALL[1]) as client:
        assert open_path(client, data_dir, SMALL[0], token=OTHER).status_code == 201
        assert open_path(client, data_dir, BIG[0]).status_code == 201
        assert len(state_of(client).sessions) == 2 and held(client) == BIG[1] + SMALL[1]


def test_a_ct_being_read_counts_in_the_budget_for_what_arrives_meanwhile(data_dir, monkeypatch):
    """While Alice's CT is read (held up here until the test lets it go), it and its reading copy count: Bob's mask
    does not fit beside them (503); once her session is open and the copy gone, it does."""
    import liversam.ct_io

    reading, let_go = threading.Event(), threading.Event()
    read = liversam.ct_io.read_ct

    def slow_read(*args, **kwargs):
        reading.set()
        let_go.wait(30)
        return read(*args, **kwargs)

    small_mask = bytes(SMALL[1] // 2)  # uint8, one byte per voxel of the small CT
    with budget_client(FakeModel(), 2 * BIG[1] + SMALL[1] + SMALL[1] // 4) as client:
        bob = open_path(client, data_dir, SMALL[0], token=OTHER).json()["session_id"]
        monkeypatch.setattr(liversam.ct_io, "read_ct", slow_read)
        opened: list = []
        opening = threading.Thread(target=lambda: opened.append(open_path(client, data_dir, BIG[0])))
        opening.start()
        try:
            assert reading.wait(30), "the CT was not read"
            answer = client.put(
                f"/v1/sessions/{bob}/masks/liver?encoding=uint8",
                content=small_mask,
                headers={**auth(OTHER), "Content-Type": "application/octet-stream"},
            )
            assert answer.status_code == 503, answer.text
        finally:
            let_go.set()
            opening.join(30)
        assert opened and opened[0].status_code == 201, opened
        answer = client.put(
            f"/v1/sessions/{bob}/masks/liver?encoding=uint8",
            content=small_mask,
            headers={**auth(OTHER), "Content-Type": "application/octet-stream"},
        )
        assert answer.status_code == 204, answer.text
        assert held(client) == BIG[1] + SMALL[1] + SMALL[1] // 2 <= budget(client)


def test_a_ct_sent_as_voxels_counts_in_the_budget_while_its_body_arrives(monkeypatch):
    """While Alice's CT arrives as raw voxels (its body held up here), the room made for it is held back: Bob's mask does
    not fit beside it (503), and her open then evicts nothing. Before, the room was only made: Bob's mask took it, and
    Alice's open then evicted Bob's idle session."""
    import asyncio

    import liversam.server.app as server_app

    holding, arriving, let_go = threading.Event(), threading.Event(), threading.Event()
    read_body = server_app._read_body

    async def slow_body(request, expected, what):
        if " CT " in what and holding.is_set():
            arriving.set()
            await asyncio.to_thread(let_go.wait, 30)
        return await read_body(request, expected, what)

    monkeypatch.setattr(server_app, "_read_body", slow_body)
    with budget_client(FakeModel(), 2 * CT_BYTES + MASK_BYTES - 1) as client:
        bob = open_session(client, token=OTHER)
        holding.set()  # Alice's CT, next
        opened: list = []
        opening = threading.Thread(target=lambda: opened.append(open_session(client)))
        opening.start()
        try:
            assert arriving.wait(30), "the CT's body was not read"
            answer = put_mask(client, bob, token=OTHER)
            assert answer.status_code == 503, answer.text
        finally:
            let_go.set()
            opening.join(30)
        assert opened, "Alice's CT did not open"
        wait_for_releases(client)
        assert client.get(f"/v1/sessions/{bob}", headers=auth(OTHER)).status_code == 200  # not evicted
        assert held(client) == 2 * CT_BYTES <= budget(client)
        assert state_of(client).sessions._reserved == 0  # given back


def test_a_mask_deleted_frees_its_memory_and_an_unknown_one_is_named():
    """``DELETE /v1/sessions/{id}/masks/{name}``: what a client sent for one request (an export's copies, or the first
    of two masks when the second was refused) need not stay in the session until it is replaced."""
    with budget_client(FakeModel(), 8 * CT_BYTES) as client:
        session = open_session(client)
        assert put_mask(client, session, "export_liver").status_code == 204
        assert put_mask(client, session, "export_tumor").status_code == 204
        assert held(client) == CT_BYTES + 2 * MASK_BYTES
        answer = client.delete(f"/v1/sessions/{session}/masks/export_liver", headers=auth(TOKEN))
        assert answer.status_code == 204, answer.text
        assert held(client) == CT_BYTES + MASK_BYTES
        assert sorted(session_of(client, session).masks) == ["export_tumor"]
        answer = client.delete(f"/v1/sessions/{session}/masks/export_liver", headers=auth(TOKEN))
        assert answer.status_code == 404 and "masks: export_tumor" in answer.json()["detail"], answer.text
        answer = client.delete(f"/v1/sessions/{session}/masks/export_tumor", headers=auth(OTHER))
        assert answer.status_code == 404 and "unknown session" in answer.json()["detail"], answer.text
        assert held(client) == CT_BYTES + MASK_BYTES  # another user's request deleted nothing


# --- the default budget ---------------------------------------------------------------------------------------------
def test_the_machines_memory_comes_from_sysconf_else_psutil_else_the_fallback_under_a_containers_limit(
    monkeypatch, tmp_path
):
    """Linux and macOS answer sysconf; Windows has none (AttributeError) and answers psutil, a dependency of the server
    extra; with neither, the budget is FALLBACK_BUDGET_GB. A container's cgroup limit that is lower still wins."""
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(memory, "CGROUP_LIMIT_FILES", (limit,))
    limit.write_text("max\n")
    fake_psutil = types.SimpleNamespace(virtual_memory=lambda: types.SimpleNamespace(total=12 * GIB))
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil)
    pages = {"SC_PHYS_PAGES": 4 * GIB // 4096, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(memory.os, "sysconf", lambda name: pages[name], raising=False)
    assert memory.default_session_memory_gb() == 2.0  # sysconf first

    pages["SC_PHYS_PAGES"] = -1  # sysconf does not know: psutil answers
    assert memory.default_session_memory_gb() == 6.0
    monkeypatch.delattr(memory.os, "sysconf")  # Windows
    assert memory.default_session_memory_gb() == 6.0
    limit.write_text(f"{4 * GIB}\n")  # a container's lower limit
    assert memory.default_session_memory_gb() == 2.0
    limit.write_text("max\n")
    monkeypatch.setitem(sys.modules, "psutil", None)  # psutil not installed: the fallback
    assert memory.default_session_memory_gb() == memory.FALLBACK_BUDGET_GB
    assert ServerConfig(tokens=[TOKEN]).session_memory_gb == memory.FALLBACK_BUDGET_GB


def test_psutil_is_a_dependency_of_the_server_extra():
    server = re.search(r"^server = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert server is not None, "pyproject.toml has no 'server' extra"
    assert re.search(r'"psutil\b', server.group(1)), server.group(0)


DICOM_CT = ("totalseg_small", "ct_dicom")  # 20 slices of 512 x 512, integral rescale (data README): int16
DICOM_BYTES = 20 * 512 * 512 * 2
DICOM_READING = 20 * 512 * 512 * 4 + 512 * 512 * 3 * 8  # the int32 slices, and one slice decoded through float64


def open_folder(client, data_dir, token: str = TOKEN):
    return client.post(
        "/v1/sessions/open-path", json={"path": str(data_dir.joinpath(*DICOM_CT))}, headers=auth(token)
    )


def test_a_dicom_folder_counts_in_the_budget_from_its_headers_while_its_slices_are_read(data_dir, monkeypatch):
    """A DICOM series is sized from its headers (slices x rows x columns) before a pixel is read: the room it and its
    reading copy need is held back while its slices are decoded, given back once it is open. Before, a folder held
    nothing back, so what arrived meanwhile could fill the budget under it."""
    import liversam.dicom_series

    decode = liversam.dicom_series._read_slice_hu
    reserved_while_reading: list[int] = []

    def watched_decode(*args, **kwargs):
        reserved_while_reading.append(state_of(client).sessions._reserved)
        return decode(*args, **kwargs)

    monkeypatch.setattr(liversam.dicom_series, "_read_slice_hu", watched_decode)
    with budget_client(FakeModel(), 4 * DICOM_BYTES) as client:
        answer = open_folder(client, data_dir)
        assert answer.status_code == 201, answer.text
        assert set(reserved_while_reading) == {DICOM_BYTES + DICOM_READING}, set(reserved_while_reading)
        assert state_of(client).sessions._reserved == 0
        assert held(client) == DICOM_BYTES  # the estimate is what the open session holds


def test_a_dicom_folder_that_cannot_fit_is_refused_before_its_slices_are_read(data_dir, monkeypatch):
    """Too many voxels for --max-voxels (413), or no room beside a session running a job (503): refused with what to do
    and no slice decoded. Before, the whole series was read first."""
    import liversam.dicom_series

    decoded: list = []
    decode = liversam.dicom_series._read_slice_hu
    monkeypatch.setattr(liversam.dicom_series, "_read_slice_hu", lambda *a, **k: decoded.append(a) or decode(*a, **k))
    with budget_client(FakeModel(), 4 * DICOM_BYTES, max_voxels=20 * 512 * 512 - 1) as client:
        answer = open_folder(client, data_dir)
        assert answer.status_code == 413 and "--max-voxels" in answer.json()["detail"], answer.text
        assert "5242880 voxels" in answer.json()["detail"], answer.text
    with budget_client(FakeModel(), DICOM_BYTES + CT_BYTES // 2) as client:  # no room beside Bob's busy CT
        bob = open_session(client, token=OTHER)
        session_of(client, bob).active_jobs = 1  # as if a job ran on it
        answer = open_folder(client, data_dir)
        assert answer.status_code == 503 and "--session-memory-gb" in answer.json()["detail"], answer.text
    assert decoded == []
