"""One ``liversam serve`` shared by several users for a day: a long job must not freeze the others' clicks, an
idle timeout must not drop a session whose job just finished, old job results must not pile up in memory, and
the server must stop promptly when told to, even with a job running and a request waiting.

A fake model (a box in, the box out; a configurable sleep per encoded slice) keeps every test fast and
deterministic: what is tested is the server's scheduling and bookkeeping, not the masks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from liversam.models.registry import MODEL_SPECS  # noqa: E402
from liversam.server.app import create_app  # noqa: E402
from liversam.server.config import ServerConfig  # noqa: E402

TOKEN = "token-of-alice-0123456789"
OTHER = "token-of-bob-0123456789ab"
SHAPE = (40, 32, 32)  # k, j, i
REPO = Path(__file__).resolve().parents[2]


class FakeModel:
    """Stands in for a LoadedModel: ``encode`` sleeps ``encode_s`` (a slow encoder), ``decode`` answers a square."""

    spec = MODEL_SPECS["litemedsam"]
    name = source = "fake"
    device = torch.device("cpu")
    encoder_override = decoder_override = None
    input_size = spec.input_size

    def __init__(self, encode_s: float = 0.0) -> None:
        self.encode_s = encode_s
        self.encoded = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(self.encode_s)
        self.encoded += 1
        return torch.zeros(1, 8, 4, 4)

    def decode(self, embedding, points_xy=None, labels=None, box_xyxy=None, mask_logits=None, multimask=False):
        low = torch.full((1, 1, self.input_size, self.input_size), -10.0)
        low[..., 80:160, 80:160] = 10.0  # the same square on every slice (voxels 10-19 of a 32 x 32 slice)
        return low, torch.tensor([0.9])


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def make_client(model: FakeModel, **limits) -> TestClient:
    config = ServerConfig(tokens=[TOKEN, OTHER], **limits)
    return TestClient(create_app(config, model_loader=lambda: model), raise_server_exceptions=False)


def open_session(client: TestClient, token: str = TOKEN) -> str:
    voxels = np.full(SHAPE, 60, dtype="<i2")
    answer = client.post(f"/v1/sessions?shape={','.join(map(str, SHAPE))}&spacing=1,1,1&origin=0,0,0",
                         content=voxels.tobytes(), headers={**auth(token), "Content-Type": "application/octet-stream"})
    assert answer.status_code == 201, answer.text
    return answer.json()["session_id"]


def predict(client: TestClient, session: str, k: int = 20, token: str = TOKEN):
    return client.post(f"/v1/sessions/{session}/predict", json={"k": k, "boxes": [[8, 8, 20, 20]]}, headers=auth(token))


def start_job(client: TestClient, session: str, name: str = "liver", max_slices: int = 10, token: str = TOKEN) -> str:
    body = {"segments": [{"name": name, "boxes": [[[8, 8, 20], [20, 20, 20]]]}],
            "settings": {"intensity_refinement": False, "max_slices": max_slices, "crf": []}}
    answer = client.post(f"/v1/sessions/{session}/jobs/propagate", json=body, headers=auth(token))
    assert answer.status_code == 202, answer.text
    return answer.json()["job_id"]


def wait_job(client: TestClient, job: str, token: str = TOKEN, timeout: float = 30.0,
             until=lambda status: status["state"] in ("done", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        answer = client.get(f"/v1/jobs/{job}", headers=auth(token))
        assert answer.status_code == 200, answer.text
        status = answer.json()
        if until(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def test_a_long_job_does_not_hold_up_another_users_click():
    """Bob's click on his CT is answered while Alice's propagation runs (within about one of its slices), not
    after the whole job: the job lets waiting interactive predictions run between its slices."""
    model = FakeModel(encode_s=0.15)
    with make_client(model) as client:
        alice, bob = open_session(client), open_session(client, OTHER)
        assert predict(client, bob, token=OTHER).status_code == 200  # Bob's slice is encoded (cached)
        job = start_job(client, alice, max_slices=12)  # 25 slices x 0.15 s: about 4 s
        status = wait_job(client, job, until=lambda s: s["state"] != "queued" and s["done"] >= 2)
        assert status["state"] == "running", status
        start = time.monotonic()
        answer = predict(client, bob, token=OTHER)
        waited = time.monotonic() - start
        assert answer.status_code == 200, answer.text
        still = client.get(f"/v1/jobs/{job}", headers=auth()).json()
        assert still["state"] == "running", "the click was only answered after the job"
        assert waited < 1.5, f"a click waited {waited:.1f} s behind another session's job"
        # Alice's own click on her session (another slice) is answered meanwhile too, and her job's result is
        # the same as without it
        assert predict(client, alice, k=2).status_code == 200
        final = wait_job(client, job)
        assert final["state"] == "done", final
        result = client.get(f"/v1/jobs/{job}/result", headers=auth()).json()
        assert result["segments"][0]["computed_slices"] == list(range(8, 33))


def test_a_job_longer_than_the_idle_timeout_leaves_its_session_open():
    """The idle timeout counts from the last use; a job running is use, so its session is not closed (and its
    result forgotten) the moment the job ends."""
    model = FakeModel(encode_s=0.1)
    with make_client(model, idle_timeout_s=1.0) as client:
        session = open_session(client)
        job = start_job(client, session, max_slices=8)  # 17 slices x 0.1 s: about 2 s
        assert wait_job(client, job)["state"] == "done"
        app_state = client.app.state.server
        assert app_state.sessions.expire() == []  # the janitor's pass right after the job
        answer = client.get(f"/v1/jobs/{job}/result", headers=auth())
        assert answer.status_code == 200, answer.text
        assert client.get(f"/v1/sessions/{session}", headers=auth()).json()["masks"] == ["liver"]


def test_old_job_results_are_released_not_kept_all_day():
    """A session keeps the results (full-volume masks) of its last few jobs only; an older one answers 410 with
    what to do, and the masks the jobs wrote stay in the session."""
    from liversam.server import jobs as jobs_module

    keep = getattr(jobs_module, "KEEP_RESULTS_PER_SESSION", 4)
    with make_client(FakeModel()) as client:
        session, other = open_session(client), open_session(client)
        jobs = [start_job(client, session, name=f"try{n}", max_slices=1) for n in range(keep + 2)]
        others = start_job(client, other, max_slices=1)
        for job in [*jobs, others]:
            assert wait_job(client, job)["state"] == "done"
        store = client.app.state.server.jobs
        kept = [store.get(job, client.app.state.server.config.owner_of(TOKEN)).output is not None for job in jobs]
        assert kept == [False, False] + [True] * keep
        for job in jobs[:2]:
            answer = client.get(f"/v1/jobs/{job}/result", headers=auth())
            assert answer.status_code == 410, answer.text
            assert "released" in answer.json()["detail"] and "session" in answer.json()["detail"]
            assert client.get(f"/v1/jobs/{job}/masks/try0", headers=auth()).status_code == 410
            assert client.get(f"/v1/jobs/{job}", headers=auth()).json()["state"] == "done"
        for job in [*jobs[2:], others]:  # the newest ones, and another session's, are all there
            assert client.get(f"/v1/jobs/{job}/result", headers=auth()).status_code == 200
        masks = client.get(f"/v1/sessions/{session}", headers=auth()).json()["masks"]
        assert masks == sorted(f"try{n}" for n in range(len(jobs)))


SERVE = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{liversam!r}, {tests!r}]
    from test_server_sharing import FakeModel
    from liversam.server import app
    app.ServerState._load_model = lambda self: FakeModel(encode_s=0.5)  # a slow encoder: 40 slices take 20 s
    from liversam.cli import main
    main(["serve", "--port", "0", "--token", {token!r}, "--token", {other!r}, "--token-file", {token_file!r}])
""")


def test_sigterm_with_a_job_running_a_click_waiting_and_a_stalled_upload_stops_within_seconds(tmp_path):
    """``liversam serve`` told to stop (SIGTERM: systemd, the Slicer module's stop) while a propagation runs, a click
    waits for the model and a client has stopped sending in the middle of an upload: it answers the click, cancels
    the job, drops the upload and exits within seconds, not when the job ends (or never), and deletes the token
    file it wrote."""
    import http.client
    import json
    import socket

    script = SERVE.format(liversam=str(REPO / "LiverSAM"), tests=str(Path(__file__).resolve().parent),
                          token=TOKEN, other=OTHER, token_file=str(tmp_path / "token"))
    env = dict(os.environ, LIVERSAM_HOME=str(tmp_path))
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    try:
        line = server.stdout.readline()
        assert (tmp_path / "token").exists()
        assert "listening on http://127.0.0.1:" in line, line + server.stdout.read()
        port = int(line.rsplit(":", 1)[1])

        def call(method, path, body=None, token=TOKEN, content_type="application/json"):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
            data = json.dumps(body).encode() if content_type == "application/json" and body is not None else body
            connection.request(method, path, body=data, headers=headers)
            answer = connection.getresponse()
            return answer.status, answer.read()

        deadline = time.monotonic() + 60
        while True:  # the address is printed before uvicorn listens
            try:
                assert call("GET", "/v1/health")[0] == 200
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the server did not answer /v1/health"
                time.sleep(0.1)
        voxels = np.full(SHAPE, 60, dtype="<i2").tobytes()
        query = f"/v1/sessions?shape={','.join(map(str, SHAPE))}&spacing=1,1,1&origin=0,0,0"
        sessions = [json.loads(call("POST", query, voxels, token, "application/octet-stream")[1])["session_id"]
                    for token in (TOKEN, OTHER)]
        job_body = {"segments": [{"name": "liver", "boxes": [[[8, 8, 20], [20, 20, 20]]]}],
                    "settings": {"intensity_refinement": False, "max_slices": None, "crf": []}}
        status, answer = call("POST", f"/v1/sessions/{sessions[0]}/jobs/propagate", job_body)
        assert status == 202, answer
        job = json.loads(answer)["job_id"]
        deadline = time.monotonic() + 30
        while json.loads(call("GET", f"/v1/jobs/{job}")[1])["done"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        clicked: list = []
        click = threading.Thread(target=lambda: clicked.append(call(
            "POST", f"/v1/sessions/{sessions[1]}/predict", {"k": 5, "boxes": [[8, 8, 20, 20]]}, OTHER)[0]))
        click.start()
        stalled = socket.create_connection(("127.0.0.1", port))  # an upload that stops half-way
        stalled.sendall((f"POST {query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Type: application/octet-stream\r\nContent-Length: {len(voxels)}\r\n\r\n").encode()
                        + voxels[:1000])
        time.sleep(0.3)
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("liversam serve was still running 15 s after SIGTERM")
        took = time.monotonic() - start
        output = server.stdout.read()
        assert took < 8, f"stopping took {took:.1f} s\n{output}"
        assert server.returncode in (0, -signal.SIGTERM), output
        assert not (tmp_path / "token").exists(), "the token file outlived the server"
        click.join(10)
        assert clicked == [200]  # the waiting click was answered, not dropped
        stalled.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_sigterm_deletes_the_token_file_it_wrote(tmp_path):
    """The token file ``liversam serve`` wrote is deleted when it stops, by SIGTERM too (systemd's stop): uvicorn
    re-raises the signal with its default action, which ended the process before the deletion ran."""
    script = SERVE.format(liversam=str(REPO / "LiverSAM"), tests=str(Path(__file__).resolve().parent),
                          token=TOKEN, other=OTHER, token_file=str(tmp_path / "token"))
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(os.environ, LIVERSAM_HOME=str(tmp_path)))
    try:
        assert "listening on" in server.stdout.readline()
        assert (tmp_path / "token").exists()
        time.sleep(1.0)  # uvicorn up (its signal handlers installed)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=15)
        assert not (tmp_path / "token").exists(), "the token file outlived the server"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_client_that_disconnects_mid_upload_gets_a_4xx_not_a_server_error():
    """A Slicer that crashes (or loses the network) in the middle of sending its CT: the request ends as a refusal,
    not as an unhandled exception (a 500 and a traceback in the server's log), and no session is opened."""
    import asyncio

    app = create_app(ServerConfig(tokens=[TOKEN]), model_loader=FakeModel)
    nbytes = int(np.prod(SHAPE)) * 2
    query = f"shape={','.join(map(str, SHAPE))}&spacing=1,1,1&origin=0,0,0".encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/sessions", "raw_path": b"/v1/sessions", "root_path": "", "query_string": query,
             "headers": [(b"host", b"x"), (b"authorization", f"Bearer {TOKEN}".encode()),
                         (b"content-type", b"application/octet-stream"), (b"content-length", str(nbytes).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    messages = [{"type": "http.request", "body": b"\0" * 1000, "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # the old server raised ClientDisconnect out of the application
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert 400 <= start["status"] < 500
    assert b"disconnected" in b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert len(app.state.server.sessions) == 0
    app.state.server.close()


def test_an_upload_is_held_once_in_memory():
    """A CT upload is written into one buffer as it arrives: the server's peak is about the CT's size, not twice it
    (a 1 GB float32 CT cost 2 GB plus a second of blocked event loop for the copy)."""
    import tracemalloc

    shape = (32, 256, 512)
    data = np.full(shape, 60, dtype="<i2").tobytes()
    with make_client(FakeModel()) as client:
        query = f"/v1/sessions?shape={','.join(map(str, shape))}&spacing=1,1,1&origin=0,0,0"
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            answer = client.post(query, content=data, headers={**auth(), "Content-Type": "application/octet-stream"})
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert answer.status_code == 201, answer.text
    assert peak < 1.4 * len(data), f"uploading {len(data) >> 20} MB peaked at {peak / len(data):.2f}x its size"


def test_a_job_started_while_its_session_is_closed_is_refused_not_kept(monkeypatch):
    """Alice closes her CT (or another user's new CT evicts it) while her propagate request is being handled: the
    job is refused as for an unknown session, instead of being kept for ever (holding the closed session's CT) with
    nobody to cancel or forget it."""
    from liversam.server import app as app_module

    with make_client(FakeModel()) as client:
        session = open_session(client)
        state = client.app.state.server
        convert = app_module.segment_prompts

        def closed_meanwhile(*args, **kwargs):  # the other request's DELETE lands between lookup and start
            state.sessions.remove(session, state.config.owner_of(TOKEN))
            return convert(*args, **kwargs)

        monkeypatch.setattr(app_module, "segment_prompts", closed_meanwhile)
        body = {"segments": [{"name": "liver", "boxes": [[[8, 8, 20], [20, 20, 20]]]}], "settings": {"crf": []}}
        answer = client.post(f"/v1/sessions/{session}/jobs/propagate", json=body, headers=auth())
        assert answer.status_code == 404, answer.text
        assert "closed" in answer.json()["detail"]
        assert state.jobs.counts() == (0, 0) and not state.jobs._jobs


FORK_WITH_STDIN_WATCH = textwrap.dedent("""
    import multiprocessing, sys, threading, time
    sys.path.insert(0, {liversam!r})
    from types import SimpleNamespace
    from liversam.commands.serve import _stop_when_stdin_closes

    server = SimpleNamespace(should_exit=False)
    _stop_when_stdin_closes(server)  # what --exit-with-stdin starts: a thread waiting for the end of stdin
    time.sleep(0.5)

    def fork():  # what OpenVINO's telemetry does from a thread of its own
        child = multiprocessing.get_context("fork").Process(target=int)
        child.start()
        child.join(10)
        print("child", "hung" if child.is_alive() else "ended", flush=True)
        if child.is_alive():
            child.kill()

    thread = threading.Thread(target=fork)
    thread.start()
    thread.join()
""")


def test_a_process_forked_by_the_server_does_not_hang_on_its_stdin_watch(tmp_path):
    """``--exit-with-stdin`` waits for the end of standard input in a thread. Read through ``sys.stdin`` that thread
    holds the buffer's lock for ever, and a process the server forks (OpenVINO's telemetry does, from a thread) closes
    ``sys.stdin`` as it starts (multiprocessing) and waits for that lock: it hung for ever, holding a copy of the
    server's memory (about 560 MB each, still there after the server ended: five of them after two test runs)."""
    script = FORK_WITH_STDIN_WATCH.format(liversam=str(REPO / "LiverSAM"))
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # its input stays open, as the module's pipe
    try:
        line = process.stdout.readline()
        assert line.strip() == "child ended", line + process.stdout.read()
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
