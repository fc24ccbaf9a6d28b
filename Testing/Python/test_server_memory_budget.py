"""``liversam serve`` keeps its sessions within a memory budget (``--session-memory-gb``), counted from the arrays they
really hold, and frees an evicted session's memory off the event loop.

The fake model of test_server_sharing (a box in, the box out) keeps the tests fast: what is tested is the server's
bookkeeping, not the masks. A CT of :data:`SHAPE` int16 holds 80 KiB, so budgets of a few CTs are a few hundred KiB.
"""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from test_server_sharing import OTHER, SHAPE, TOKEN, FakeModel, auth, open_session, predict, start_job  # noqa: E402

from liversam.embedding_cache import HANDED_OUT_KEPT  # noqa: E402
from liversam.server.app import create_app  # noqa: E402
from liversam.server.config import ServerConfig, ServerConfigError  # noqa: E402
from liversam.server.sessions import Session  # noqa: E402

GIB = 2**30
CT_BYTES = int(np.prod(SHAPE)) * 2  # int16
MASK_BYTES = int(np.prod(SHAPE))  # one bool per voxel


def mb(nbytes: float) -> float:
    """MiB to one decimal, as the server reports them."""
    return round(nbytes / 2**20, 1)


def budget_client(model: FakeModel, budget_bytes: float, **limits) -> TestClient:
    config = ServerConfig(tokens=[TOKEN, OTHER], session_memory_gb=budget_bytes / GIB, **limits)
    return TestClient(create_app(config, model_loader=lambda: model), raise_server_exceptions=False)


def state_of(client: TestClient):
    return client.app.state.server


def session_of(client: TestClient, session_id: str) -> Session:
    return state_of(client).sessions._sessions[session_id]


def wait_for_releases(client: TestClient) -> None:
    """Until the closed sessions' memory is freed (on the server's release thread; a server without one freed it as
    it closed them)."""
    getattr(state_of(client).sessions, "wait_for_releases", lambda: None)()


def root_array(array: np.ndarray) -> np.ndarray:
    """The array that owns ``array``'s memory (an uploaded CT is a view of the request body's buffer)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class WideEmbeddings(FakeModel):
    """A fake model whose slice embedding has 64 KiB in fp32 (32 KiB as the cache keeps it, in fp16)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += 1
        return torch.zeros(1, 64, 16, 16)


STORED = 64 * 16 * 16 * 2  # one WideEmbeddings slice as cached (fp16)
HANDED = 64 * 16 * 16 * 4  # its fp32 copy handed out



def held_arrays_refs(session) -> list[weakref.ref]:
    """Weak references to a session, its CT buffer and its embedding cache: all dead once its memory is freed."""
    return [weakref.ref(session), weakref.ref(root_array(session.volume.array_kji)), weakref.ref(session._predictor.cache)]

def test_over_the_budget_the_least_recently_used_idle_session_is_evicted_and_its_memory_freed():
    """Three CTs do not fit a budget of two and a half: opening the third evicts the least recently used idle one (of
    another user; the session count allows all three), its owner is told to open it again, the new CT opens, and the
    evicted session's CT array and embeddings are really freed (nothing keeps a reference to them)."""
    with budget_client(FakeModel(), 2.5 * CT_BYTES) as client:
        bob = open_session(client, OTHER)
        alice = open_session(client)
        assert predict(client, bob, token=OTHER).status_code == 200  # Bob's embeddings are cached
        assert (
            predict(client, alice).status_code == 200
        )  # ... and Alice used hers after: Bob's is the LRU one
        gone = session_of(client, bob)
        freed = held_arrays_refs(gone)
        del gone

        carol = open_session(client)

        assert client.get(f"/v1/sessions/{carol}", headers=auth()).status_code == 200
        assert client.get(f"/v1/sessions/{alice}", headers=auth()).status_code == 200
        answer = client.get(f"/v1/sessions/{bob}", headers=auth(OTHER))
        assert answer.status_code == 404 and "open the CT again" in answer.json()["detail"]
        wait_for_releases(client)
        assert [ref() for ref in freed] == [None, None, None], (
            "the evicted session's memory is still referenced"
        )
        held = state_of(client).sessions.held()
        assert held.ct == 2 * CT_BYTES and held.total <= state_of(client).config.session_memory_bytes
        info = client.get("/v1/info", headers=auth()).json()
        assert info["memory"]["ct_mb"] == mb(2 * CT_BYTES) and info["memory"]["held_mb"] == mb(held.total)
        assert info["memory"]["budget_mb"] == info["limits"]["session_memory_mb"] == mb(int(2.5 * CT_BYTES))


def test_with_every_other_session_running_a_job_a_new_ct_is_refused_with_what_to_do():
    """Nothing can be evicted (the one session there runs a job): the new CT is refused with 503 before its upload is
    kept, and the message gives the memory held, the budget and what to do; the running session is untouched."""
    model = FakeModel(encode_s=0.05)
    with budget_client(model, 1.5 * CT_BYTES) as client:
        alice = open_session(client)
        job = start_job(client, alice, max_slices=None)
        voxels = np.full(SHAPE, 60, dtype="<i2").tobytes()
        answer = client.post(
            f"/v1/sessions?shape={','.join(map(str, SHAPE))}&spacing=1,1,1&origin=0,0,0",
            content=voxels,
            headers={**auth(OTHER), "Content-Type": "application/octet-stream"},
        )
        assert answer.status_code == 503, answer.text
        detail = answer.json()["detail"]
        for words in (
            f"{mb(CT_BYTES)} MB",
            f"of their {mb(int(1.5 * CT_BYTES))} MB",
            "--session-memory-gb",
            "running jobs",
            "DELETE /v1/sessions/",
        ):
            assert words in detail, (words, detail)
        assert len(state_of(client).sessions) == 1
        assert client.get(f"/v1/sessions/{alice}", headers=auth()).status_code == 200
        assert client.post(f"/v1/jobs/{job}/cancel", headers=auth()).status_code == 200


def test_a_ct_larger_than_the_whole_budget_is_refused_with_the_numbers():
    with budget_client(FakeModel(), 0.5 * CT_BYTES) as client:
        voxels = np.full(SHAPE, 60, dtype="<i2").tobytes()
        answer = client.post(
            f"/v1/sessions?shape={','.join(map(str, SHAPE))}&spacing=1,1,1&origin=0,0,0",
            content=voxels,
            headers={**auth(), "Content-Type": "application/octet-stream"},
        )
        assert answer.status_code == 503, answer.text
        assert (
            f"needs {mb(CT_BYTES)} MB, more than the server's whole session memory budget"
            in answer.json()["detail"]
        )


def test_a_ct_opened_by_path_makes_room_from_its_header_before_it_is_read(data_dir, monkeypatch):
    """open-path sizes the CT from its file's header: an idle session is evicted for it before it is read, and a CT
    that cannot fit is refused without being read at all."""
    import liversam.ct_io

    big, small = data_dir / "hcc2144" / "ct.nii.gz", data_dir / "totalseg_small" / "ct.nii.gz"
    big_bytes, small_bytes = 512 * 512 * 58 * 2, 122 * 101 * 30 * 2  # int16 (data README)
    with budget_client(FakeModel(), big_bytes + small_bytes // 2) as client:
        first = client.post("/v1/sessions/open-path", json={"path": str(small)}, headers=auth(OTHER))
        assert first.status_code == 201, first.text
        second = client.post("/v1/sessions/open-path", json={"path": str(big)}, headers=auth())
        assert second.status_code == 201, second.text
        assert (
            client.get(f"/v1/sessions/{first.json()['session_id']}", headers=auth(OTHER)).status_code == 404
        )
        assert state_of(client).sessions.held().ct == big_bytes

        read = liversam.ct_io.read_ct
        reads: list = []
        monkeypatch.setattr(liversam.ct_io, "read_ct", lambda *a, **k: reads.append(a) or read(*a, **k))
        state_of(client).sessions._sessions[
            second.json()["session_id"]
        ].active_jobs = 1  # as if a job ran on it
        refused = client.post("/v1/sessions/open-path", json={"path": str(small)}, headers=auth(OTHER))
        assert refused.status_code == 503 and "--session-memory-gb" in refused.json()["detail"], refused.text
        assert reads == []


def test_the_memory_held_is_the_bytes_of_the_ct_the_embeddings_and_every_mask_kept_once():
    """The accounting counts the CT, every cached embedding (fp16) and fp32 copy handed out, the uploaded masks and the
    job results the server keeps; a job's mask that is also a session mask counts once."""
    model = WideEmbeddings()
    with budget_client(model, 64 * CT_BYTES) as client:
        alice = open_session(client)
        container = np.zeros(SHAPE, dtype=bool)
        container[:, 4:28, 4:28] = True
        answer = client.put(
            f"/v1/sessions/{alice}/masks/liver?encoding=uint8",
            content=container.astype(np.uint8).tobytes(),
            headers={**auth(), "Content-Type": "application/octet-stream"},
        )
        assert answer.status_code == 204, answer.text
        first = start_job(client, alice, name="tumour", max_slices=2)
        from test_server_sharing import wait_job

        assert wait_job(client, first)["state"] == "done"
        second = start_job(client, alice, name="tumour", max_slices=1)  # replaces the session's 'tumour' mask
        assert wait_job(client, second)["state"] == "done"

        cached = session_of(client, alice).cached_slices
        assert cached == model.encoded == 5  # slices 18-22 (the first job's), the second job's are among them
        held = state_of(client).sessions.held()
        # the uploaded 'liver', the first job's 'tumour' (kept in its result) and the second's (the session's too)
        assert held.masks == 3 * MASK_BYTES
        assert held.ct == CT_BYTES
        assert held.embeddings == cached * STORED + HANDED_OUT_KEPT * HANDED
        memory_info = client.get("/v1/info", headers=auth()).json()["memory"]
        assert memory_info == {
            "budget_mb": mb(64 * CT_BYTES),
            "held_mb": mb(held.total),
            "ct_mb": mb(CT_BYTES),
            "embeddings_mb": mb(held.embeddings),
            "masks_mb": mb(3 * MASK_BYTES),
        }


def test_a_cache_that_cannot_grow_within_the_budget_gives_up_its_own_oldest_slices():
    """Another user's session was used a moment ago, so it is not evicted for a cache: the cache keeps to what the
    budget leaves (its oldest slices go), and what the sessions hold never goes over the budget."""
    budget = 2 * CT_BYTES + HANDED_OUT_KEPT * HANDED + 4 * STORED
    with budget_client(WideEmbeddings(), budget) as client:
        open_session(client, OTHER)
        alice = open_session(client)
        for k in range(10):
            assert predict(client, alice, k=k).status_code == 200
            assert state_of(client).sessions.held().total <= budget, f"over the budget after slice {k}"
        assert len(state_of(client).sessions) == 2
        session = session_of(client, alice)
        assert session.cached_slices == 4
        assert [session.is_cached(k) for k in range(10)] == [False] * 6 + [True] * 4


def test_a_growing_cache_evicts_a_session_nobody_has_used_for_minutes():
    """Ten slices fit the budget beside Alice's CT only: a session untouched for longer than
    IDLE_BEFORE_A_CACHE_EVICTS_S (another user's) is evicted for them."""
    from liversam.server.sessions import IDLE_BEFORE_A_CACHE_EVICTS_S

    budget = CT_BYTES + HANDED_OUT_KEPT * HANDED + 10 * STORED
    with budget_client(WideEmbeddings(), budget) as client:
        bob = open_session(client, OTHER)
        alice = open_session(client)
        session_of(client, bob).last_used -= IDLE_BEFORE_A_CACHE_EVICTS_S + 1
        for k in range(10):
            assert predict(client, alice, k=k).status_code == 200
        assert client.get(f"/v1/sessions/{bob}", headers=auth(OTHER)).status_code == 404
        assert session_of(client, alice).cached_slices == 10
        assert state_of(client).sessions.held().total <= budget


def test_a_closed_sessions_memory_is_freed_also_when_its_work_was_the_model_threads_last():
    """The model thread kept the last work it ran (a click's closure, which holds its session) until the next one came:
    a session closed after its owner's last click kept its CT and embeddings in memory for as long as nobody clicked."""
    with TestClient(create_app(ServerConfig(tokens=[TOKEN]), model_loader=FakeModel)) as client:
        alice = open_session(client)
        assert predict(client, alice).status_code == 200  # the model thread's last work
        session = session_of(client, alice)
        freed = held_arrays_refs(session)
        del session
        assert client.delete(f"/v1/sessions/{alice}", headers=auth()).status_code == 204
        wait_for_releases(client)
        # the model thread drops its last work just after it handed the click's answer over: give it that moment
        deadline = time.monotonic() + 5.0
        while any(ref() is not None for ref in freed) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [ref() for ref in freed] == [None, None, None], (
            "the closed session's memory is still referenced"
        )


def test_an_eviction_frees_the_memory_off_the_event_loop(monkeypatch):
    """While an evicted session's memory is being freed (held up here until the test lets it go), the server answers
    other requests: the release does not run on the event loop (dropping a 1 GB cache blocked it for ~100 ms)."""
    releasing, let_go = threading.Event(), threading.Event()
    release = Session.release

    def slow_release(self: Session) -> None:
        releasing.set()
        let_go.wait(30)
        release(self)

    monkeypatch.setattr(Session, "release", slow_release)
    config = ServerConfig(
        tokens=[TOKEN, OTHER], max_sessions=1
    )  # the count evicts here (on the old server too)
    with TestClient(create_app(config, model_loader=FakeModel), raise_server_exceptions=False) as client:
        open_session(client)
        opened: list[str] = []
        health: list[int] = []
        opening = threading.Thread(target=lambda: opened.append(open_session(client, OTHER)))
        asking = threading.Thread(target=lambda: health.append(client.get("/v1/health").status_code))
        opening.start()  # evicts the first session: its release starts and waits for let_go
        try:
            assert releasing.wait(30), "the first session was not released"
            asking.start()
            asking.join(20)  # a bound against a blocked server, not a timing: the release waits for the test
            assert health == [200], "the health request waited for the release (the event loop was blocked)"
            assert opening.is_alive()  # the release was still in progress: the open waits for its memory
        finally:
            let_go.set()
            opening.join(30)
            if asking.ident is not None:
                asking.join(
                    30
                )  # (the old server answers it now; leaving it running would stall the client's exit)
        assert len(opened) == 1 and len(state_of(client).sessions) == 1


def test_the_default_budget_is_half_the_memory_of_the_machine_or_of_its_container(monkeypatch, tmp_path):
    from liversam.server import memory

    monkeypatch.setattr(memory, "physical_memory_bytes", lambda: 16 * GIB)
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(memory, "CGROUP_LIMIT_FILES", (limit,))
    limit.write_text("max\n")
    assert ServerConfig(tokens=[TOKEN]).session_memory_gb == 8.0
    limit.write_text(f"{6 * GIB}\n")
    assert ServerConfig(tokens=[TOKEN]).session_memory_gb == 3.0
    assert ServerConfig(tokens=[TOKEN], session_memory_gb=1.5).session_memory_bytes == int(1.5 * GIB)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ServerConfigError, match="--session-memory-gb must be a positive number"):
            ServerConfig(tokens=[TOKEN], session_memory_gb=bad)
