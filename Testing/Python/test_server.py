"""``liversam serve`` as a real process on a free port, driven by the Slicer module's client (issue 12's bar).

One server for the module (plain PyTorch on the CPU, like the ``litemedsam`` fixture, so its masks can be
compared bit for bit with the in-process :class:`SlicePredictor`). lits117 is 128^3: few, cheap encodes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import box_of, dice

pytest.importorskip("fastapi")

from LiverSAMLib.ServerClient import (  # noqa: E402
    AuthError,
    LiverSAMClient,
    LocalServerProcess,
    ServerRequestError,
    ServerUnavailable,
    box_ijk,
    segment_spec,
)

pytestmark = pytest.mark.model

REPO = Path(__file__).resolve().parents[2]
OTHER_TOKEN = "second-user-token-0123456789"
K, BOX = 33, (2.0, 7.0, 123.0, 127.0)  # the liver box of examples/lits117/prompts.json (IJK = LPS there)
MAX_SLICES = 1  # propagation: the seed slice and one slice each way (few encodes)
REFERENCE: dict = {}  # results of one-at-a-time requests, compared with the concurrent ones


def server_env(home: Path) -> dict:
    path = os.pathsep.join(p for p in (str(REPO / "LiverSAM"), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, LIVERSAM_HOME=str(home))


@pytest.fixture(scope="module")
def server(data_dir, tmp_path_factory):
    process = LocalServerProcess(
        sys.executable,
        ["--accelerate", "plain", "--device", "cpu", "--threads", "2", "--token", OTHER_TOKEN,
         "--data-root", str(data_dir), "--max-sessions", "4", "--max-voxels", str(128**3)],
        startup_timeout=120, env=server_env(tmp_path_factory.mktemp("server-home")),
    )
    client = process.start()
    yield process, client
    process.stop()
    assert not process.running()


def open_lits117(client: LiverSAMClient, volume) -> str:
    g = volume.geometry
    info = client.open_volume(volume.array_kji, g.spacing_mm, g.origin_lps, g.direction_lps.ravel())
    assert info["shape_kji"] == [128, 128, 128]
    return info["session_id"]


@pytest.fixture(scope="module")
def session(server, lits117_volume) -> str:
    return open_lits117(server[1], lits117_volume)


def liver_job(client: LiverSAMClient, session: str, name: str = "liver", max_slices=MAX_SLICES) -> str:
    spec = segment_spec(name, 1, boxes_ijk=[box_ijk(*BOX, K)])
    return client.start_propagation(session, [spec], max_slices=max_slices)


def test_refused_without_or_with_a_wrong_token_and_nothing_computed(server, lits117_volume):
    process, client = server
    assert LiverSAMClient(process.url, None).health()["status"] == "ok"  # the only open endpoint
    g = lits117_volume.geometry
    for token in (None, "not-the-token-0123456789"):
        stranger = LiverSAMClient(process.url, token)
        for call in (stranger.info,
                     lambda s=stranger: s.open_volume(lits117_volume.array_kji, g.spacing_mm, g.origin_lps),
                     lambda s=stranger: s.predict_slice("any", K, boxes_ij=[BOX]),
                     lambda s=stranger: s.start_propagation("any", [segment_spec("liver", 1, [box_ijk(*BOX, K)])])):
            with pytest.raises(AuthError, match="token"):
                call()
    info = client.info()
    assert info["sessions"] == 0 and info["jobs_queued"] == 0 and not info["model"]["loaded"]


def test_predicted_slice_is_the_cores_mask(server, session, lits117_predictor, lits117_label):
    from liversam.prompts import SlicePrompts

    client = server[1]
    mask, score = client.predict_slice(session, K, boxes_ij=[BOX])
    reference = lits117_predictor.predict(K, SlicePrompts(boxes_ij=[BOX]))
    assert mask.shape == (128, 128) and mask.dtype == bool
    assert np.array_equal(mask, reference.mask_ji)
    assert score == pytest.approx(reference.score, abs=1e-5)
    assert dice(mask, lits117_label[K] > 0) > 0.9
    info = client.info()
    assert info["model"]["loaded"] and info["model"]["encoder_backend"] == "plain" and info["sessions"] == 1
    REFERENCE["slice"] = mask


def test_propagation_job_reports_progress(server, session, lits117_label):
    client = server[1]
    job = liver_job(client, session)
    seen: list[dict] = []
    final = client.wait_job(job, timeout=300, poll=0.02, on_progress=seen.append)
    assert final["state"] == "done", final
    running = [(s["stage"], s["done"]) for s in seen if s["state"] == "running"]
    propagated = [done for stage, done in running if stage.startswith("propagating")]
    assert propagated and propagated == sorted(propagated)  # progress only moves forward
    assert final["progress_events"] >= 2 * MAX_SLICES + 1  # one event per predicted slice at least

    result = client.job_result(job)
    (liver,) = result["segments"]
    mask = liver["mask"]
    slices = np.flatnonzero(mask.any(axis=(1, 2))).tolist()
    assert slices == list(range(K - MAX_SLICES, K + MAX_SLICES + 1))
    assert liver["computed_slices"] == slices and liver["voxels"] == int(mask.sum())
    assert dice(mask[slices], lits117_label[slices] > 0) > 0.85
    assert result["review"]["segments"][0]["name"] == "liver" and result["lesions"] == []
    assert np.array_equal(client.job_labelmap(job), mask.astype(np.uint8))
    assert "liver" in client.session_info(session)["masks"]  # a finished job writes its masks
    REFERENCE["propagation"] = mask


def test_clean_up_settings_reach_the_pipeline(server, session, lits117_predictor, lits117_volume):
    """The Slicer module's clean-up settings (fill holes, closing, 3D islands, keep largest, CRF off) give the
    server's job exactly what ``segment_volume`` gives in-process with the same settings, and change it."""
    from liversam.pipeline import segment_volume
    from liversam.server.jobs import pipeline_settings, segment_prompts
    from liversam.server.schemas import JobSettings, SegmentSpec

    client = server[1]
    assert "propagation" in REFERENCE, "needs the default propagation before it"
    spec = segment_spec("liver_cleanup", 1, boxes_ijk=[box_ijk(*BOX, K)])  # the session's "liver" stays
    cleanup = {"fill_holes": False, "closing_radius_mm": 4.0, "min_island_mm3": 3000.0, "keep_largest": [],
               "crf": [], "max_slices": MAX_SLICES}
    job = client.start_propagation(session, [spec], settings=cleanup)
    final = client.wait_job(job, timeout=300)
    assert final["state"] == "done", final
    (liver,) = client.job_result(job)["segments"]

    settings = JobSettings(**cleanup)
    segments = segment_prompts([SegmentSpec(**spec)], "IJK", lits117_volume.geometry, {})
    expected = segment_volume(lits117_volume, segments, lits117_predictor, pipeline_settings(settings, segments))
    assert np.array_equal(liver["mask"], expected.segment("liver_cleanup").mask_kji)
    assert not np.array_equal(liver["mask"], REFERENCE["propagation"])  # the defaults give another mask
    assert pipeline_settings(settings).slice_postprocess.closing_radius_mm == 4.0
    assert pipeline_settings(JobSettings()).postprocess_3d["liver"].keep_largest  # default: the liver's largest


def test_repropagation_changes_only_what_the_fix_affects(server, session, lits117_label):
    client = server[1]
    existing = REFERENCE["propagation"]
    k_fix = K + 1
    fix_box = box_of(lits117_label[k_fix] > 0)
    segment = segment_spec("liver", 1, boxes_ijk=[box_ijk(*BOX, K), box_ijk(*fix_box, k_fix)])
    job = client.start_repropagation(session, segment, [k_fix], max_slices=MAX_SLICES)
    final = client.wait_job(job, timeout=300)
    assert final["state"] == "done", final
    (liver,) = client.job_result(job)["segments"]
    mask = liver["mask"]
    assert np.array_equal(mask[: k_fix], existing[: k_fix])  # the slices up to the seed keep their masks
    assert set(liver["computed_slices"]) == {k_fix, k_fix + 1}  # the fixed slice and one beyond (max_slices)
    assert dice(mask[k_fix : k_fix + 2], lits117_label[k_fix : k_fix + 2] > 0) > 0.85
    assert "liver" in client.session_info(session)["masks"]  # the session's liver is now the fixed one


def test_cancelled_job_writes_nothing(server, session):
    client = server[1]
    job = liver_job(client, session, name="liver_cancelled", max_slices=None)  # the whole liver
    status = client.job_status(job)
    while status["state"] == "queued" or status["done"] < 2:  # mid-way: a couple of slices propagated
        assert status["state"] in ("queued", "running"), status
        time.sleep(0.02)
        status = client.job_status(job)
    client.cancel_job(job)
    final = client.wait_job(job, timeout=120, poll=0.05)
    assert final["state"] == "cancelled" and "nothing was written" in final["error"]
    assert final["done"] < final["total"]
    with pytest.raises(ServerRequestError, match="cancelled") as refused:
        client.job_result(job)
    assert refused.value.status == 409
    assert "liver_cancelled" not in client.session_info(session)["masks"]


def test_two_client_sessions_at_once_give_the_same_results(server, lits117_volume):
    process = server[0]
    assert "slice" in REFERENCE and "propagation" in REFERENCE, "needs the one-at-a-time tests before it"

    def user(token: str):
        client = LiverSAMClient(process.url, token)
        sid = open_lits117(client, lits117_volume)
        mask, _ = client.predict_slice(sid, K, boxes_ij=[BOX])
        job = liver_job(client, sid)
        assert client.wait_job(job, timeout=300)["state"] == "done"
        propagated = client.job_result(job)["segments"][0]["mask"]
        client.close_session(sid)
        return mask, propagated

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(user, [server[1].token, OTHER_TOKEN]))
    for mask, propagated in results:
        assert np.array_equal(mask, REFERENCE["slice"])
        assert np.array_equal(propagated, REFERENCE["propagation"])


def test_another_tokens_session_is_not_reachable(server, session):
    other = LiverSAMClient(server[0].url, OTHER_TOKEN)
    with pytest.raises(ServerRequestError, match="unknown session") as refused:
        other.predict_slice(session, K, boxes_ij=[BOX])
    assert refused.value.status == 404
    with pytest.raises(ServerRequestError):
        other.close_session(session)
    assert server[1].session_info(session)["session_id"] == session


def test_twenty_requests_from_four_threads(server, session):
    """Correct answers or 4xx, never a 5xx or a dropped connection, while requests interleave."""
    client = server[1]
    expected = REFERENCE["slice"]
    failures: list[str] = []
    lock = threading.Lock()

    def request(n: int) -> None:
        try:
            kind = n % 5
            if kind == 0:
                mask, _ = client.predict_slice(session, K, boxes_ij=[BOX])  # cached embedding: decoder only
                assert np.array_equal(mask, expected)
            elif kind == 1:
                assert client.info()["sessions"] >= 1
            elif kind == 2:
                assert client.session_info(session)["shape_kji"] == [128, 128, 128]
            elif kind == 3:
                with pytest.raises(ServerRequestError, match="far past the edge of the volume"):
                    client.predict_slice(session, K, boxes_ij=[(0, 0, 900, 10)])
            else:
                with pytest.raises(ServerRequestError, match="unknown session"):
                    client.predict_slice("no-such-session", K, boxes_ij=[BOX])
        except BaseException as exc:  # collected: pytest.raises inside threads
            with lock:
                failures.append(f"request {n}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(request, range(20)))
    assert failures == []


def test_open_path_inside_the_data_root_and_traversal(server, data_dir):
    client = server[1]
    info = client.open_path(str(data_dir / "lits117" / "ct.nii.gz"))
    assert info["shape_kji"] == [128, 128, 128]
    client.close_session(info["session_id"])
    with pytest.raises(ServerRequestError, match="unknown session"):
        client.session_info(info["session_id"])
    for path in (str(data_dir / ".." / ".." / "etc" / "passwd"), "/etc/passwd"):
        with pytest.raises(ServerRequestError, match="outside the server's data roots") as refused:
            client.open_path(path)
        assert refused.value.status == 403


def test_unreachable_server_and_a_server_that_cannot_start(tmp_path):
    with pytest.raises(ServerUnavailable, match="not reachable"):
        LiverSAMClient("http://127.0.0.1:9", "x", timeout=2).health()
    process = LocalServerProcess(sys.executable, ["--max-sessions", "0"], startup_timeout=60, env=server_env(tmp_path))
    with pytest.raises(ServerUnavailable, match="argument --max-sessions: 0: give a whole number of 1 or more") as error:
        process.start()
    assert "usage:" not in str(error.value)  # argparse's usage lines would push the reason out of the status line
    assert not process.running()
