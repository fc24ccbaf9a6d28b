"""Review of session 34's commits: bugs found, each with the test that showed it.

- A CT opened by path is held back in the memory budget (with read_ct's second copy) from the moment room is made
  for it, not only once its reading thread has started: two opens arriving together cannot both claim the same room
  (each then reading its CT and its copy beside the other's, over the budget).
- A finished job whose masks run the session over the budget gives up only the older job results that hold masks
  the session no longer keeps (or is replacing): a result of the session's current masks frees nothing, and was
  dropped anyway (410 for a result its client had not fetched yet).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

import SimpleITK as sitk  # noqa: E402
from test_server_memory_budget import CT_BYTES as SESSION_CT_BYTES  # noqa: E402
from test_server_memory_budget import MASK_BYTES, budget_client, session_of, state_of  # noqa: E402
from test_server_sharing import OTHER, TOKEN, FakeModel, auth, open_session, start_job, wait_job  # noqa: E402

CT_SHAPE = (16, 48, 48)  # k, j, i
CT_BYTES = int(np.prod(CT_SHAPE)) * 2  # int16


def write_ct(path: Path, seed: int) -> Path:
    """A small abdomen-like CT (air around a soft-tissue body) in Hounsfield units."""
    rng = np.random.default_rng(seed)
    array = np.full(CT_SHAPE, -1000, dtype=np.int16)
    array[:, 8:40, 8:40] = rng.normal(40, 25, size=(CT_SHAPE[0], 32, 32)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(path))
    return path


def open_path(client, path: Path, token: str = TOKEN):
    return client.post("/v1/sessions/open-path", json={"path": str(path)}, headers=auth(token))


def test_two_opens_at_once_cannot_both_claim_the_room_for_reading_their_cts(tmp_path, monkeypatch):
    """Alice's open has made room for her CT and its reading copy (2 CTs) but her read has not started yet; Bob's
    open of a CT as large arrives then. The budget (2.5 CTs) holds Alice's reading, not Bob's beside it: Bob is
    refused (503) before his CT is read, Alice's opens, and nothing stays held back."""
    import liversam.ct_io

    alice_ct, bob_ct = write_ct(tmp_path / "alice.nii.gz", 1), write_ct(tmp_path / "bob.nii.gz", 2)
    read, reads = liversam.ct_io.read_ct, []

    def counted_read(*args, **kwargs):
        reads.append(args[0])
        return read(*args, **kwargs)

    monkeypatch.setattr(liversam.ct_io, "read_ct", counted_read)
    with budget_client(FakeModel(), 2.5 * CT_BYTES) as client:
        store = state_of(client).sessions
        make_room, calls = store.make_room, []
        gate: concurrent.futures.Future = concurrent.futures.Future()

        def gated_make_room(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:  # Alice: room made, then held up before her read until Bob's open has decided
                make_room(*args, **kwargs).result(10)
                return gate
            try:
                return make_room(*args, **kwargs)
            finally:
                gate.set_result(None)

        store.make_room = gated_make_room
        opened: list = []
        alice = threading.Thread(target=lambda: opened.append(open_path(client, alice_ct)))
        alice.start()
        try:
            deadline = time.monotonic() + 30
            while not calls and time.monotonic() < deadline:
                time.sleep(0.01)
            assert calls, "Alice's open did not reach make_room"
            bob = open_path(client, bob_ct, token=OTHER)
        finally:
            if not gate.done():
                gate.set_result(None)
            alice.join(30)
        assert bob.status_code == 503, (
            f"Bob's CT was let in beside Alice's reading: {bob.status_code} {bob.text}"
        )
        assert "--session-memory-gb" in bob.text
        assert reads == [str(alice_ct)] or [Path(p) for p in reads] == [alice_ct], reads
        assert opened and opened[0].status_code == 201, opened
        assert store._reserved == 0
        assert store.held().total == CT_BYTES


def test_nothing_stays_held_back_when_a_ct_cannot_be_read(tmp_path, monkeypatch):
    """The reservation is given back when reading fails (422), so later opens have the whole budget."""
    import liversam.ct_io

    ct = write_ct(tmp_path / "ct.nii.gz", 3)

    def failing_read(*args, **kwargs):
        raise OSError("damaged file")

    with budget_client(FakeModel(), 2.5 * CT_BYTES) as client:
        monkeypatch.setattr(liversam.ct_io, "read_ct", failing_read)
        answer = open_path(client, ct)
        assert answer.status_code == 422 and "damaged file" in answer.text, answer.text
        assert state_of(client).sessions._reserved == 0
        monkeypatch.undo()
        assert open_path(client, ct).status_code == 201
        assert open_path(client, ct, token=OTHER).status_code == 201  # 2 CTs fit once nothing is held back


def test_a_jobs_masks_over_the_budget_keep_an_older_result_of_the_sessions_current_masks():
    """Alice's 'liver' job is done (its result not fetched yet); her 'tumor' job's mask runs the sessions over the
    budget. The liver result holds the session's current liver mask, so dropping it frees nothing: it stays
    fetchable, and Bob's idle session gives way as for an open."""
    with budget_client(FakeModel(), 2 * SESSION_CT_BYTES + 3 * MASK_BYTES // 2) as client:
        bob = open_session(client, OTHER)
        alice = open_session(client)
        liver = start_job(client, alice, name="liver", max_slices=1)
        assert wait_job(client, liver)["state"] == "done"
        tumor = start_job(client, alice, name="tumor", max_slices=1)
        status = wait_job(client, tumor)
        assert status["state"] == "done" and status.get("warning") is None, status

        answer = client.get(f"/v1/jobs/{liver}/result", headers=auth())
        assert answer.status_code == 200, f"the liver result was dropped for nothing: {answer.text}"
        assert client.get(f"/v1/jobs/{tumor}/result", headers=auth()).status_code == 200
        assert client.get(f"/v1/sessions/{bob}", headers=auth(OTHER)).status_code == 404
        assert sorted(session_of(client, alice).masks) == ["liver", "tumor"]
        state_of(client).sessions.wait_for_releases()
        assert state_of(client).sessions.held().total <= 2 * SESSION_CT_BYTES + 3 * MASK_BYTES // 2
