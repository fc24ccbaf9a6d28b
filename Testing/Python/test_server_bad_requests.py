"""Bad requests to ``liversam serve`` (issue 15, server half): each gets its 4xx code, a message naming the
problem, and nothing is computed (the model loader is never called).

The application runs in-process (Starlette's test client speaks ASGI to the same app, middleware included);
test_server.py drives a real server process.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from liversam.server.app import create_app  # noqa: E402
from liversam.server.config import ServerConfig  # noqa: E402

TOKEN = "token-of-alice-0123456789"
OTHER = "token-of-bob-0123456789ab"
SHAPE = (6, 20, 24)  # k, j, i
MAX_VOXELS = 20_000


class NoModel:
    """A model loader that must never run: every request here is refused before any model call."""

    calls = 0

    def __call__(self):
        NoModel.calls += 1
        raise AssertionError("a refused request reached the model")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-root")
    (root / "inside.txt").write_text("not a CT")
    config = ServerConfig(tokens=[TOKEN, OTHER], max_voxels=MAX_VOXELS, max_json_bytes=64 * 1024, data_roots=[root])
    application = create_app(config, model_loader=NoModel())
    application.state.root = root
    with TestClient(application, raise_server_exceptions=False) as client:
        application.state.client = client
        yield application
    assert NoModel.calls == 0


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return app.state.client


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def volume_query(shape=SHAPE, dtype="int16") -> str:
    return f"shape={','.join(map(str, shape))}&spacing=0.8,0.8,2.5&origin=0,0,0&dtype={dtype}"


def open_session(client: TestClient, token: str = TOKEN) -> str:
    voxels = np.zeros(SHAPE, dtype="<i2")
    answer = client.post(f"/v1/sessions?{volume_query()}", content=voxels.tobytes(),
                         headers={**auth(token), "Content-Type": "application/octet-stream"})
    assert answer.status_code == 201, answer.text
    return answer.json()["session_id"]


@pytest.fixture(scope="module")
def session(client) -> str:
    return open_session(client)


def refused(answer, status: int, *words: str) -> None:
    assert answer.status_code == status, f"expected {status}, got {answer.status_code}: {answer.text}"
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and detail
    for word in words:
        assert word.lower() in detail.lower(), f"'{word}' not in the message: {detail}"


def post_json(client, path: str, body, token: str = TOKEN):
    return client.post(path, content=json.dumps(body), headers={**auth(token), "Content-Type": "application/json"})


# --- authentication -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer "}])
def test_no_or_wrong_token_is_401_before_the_body_is_read(client, headers):
    refused(client.get("/v1/info", headers=headers), 401, "token")
    answer = client.post(f"/v1/sessions?{volume_query()}", content=b"\0" * 2 * math.prod(SHAPE),
                         headers={**headers, "Content-Type": "application/octet-stream"})
    refused(answer, 401, "token")
    assert answer.headers["www-authenticate"] == "Bearer"
    refused(client.post("/v1/sessions/x/predict", content="{not json", headers={**headers, "Content-Type": "application/json"}),
            401, "token")
    refused(client.get("/openapi.json", headers=headers), 401, "token")


def test_health_needs_no_token(client):
    answer = client.get("/v1/health")
    assert answer.status_code == 200 and answer.json()["status"] == "ok"


# --- bodies ---------------------------------------------------------------------------------------------------
def test_malformed_json(client, session):
    answer = client.post(f"/v1/sessions/{session}/predict", content=b'{"k": 1, "boxes": [[1,2,3,4]',
                         headers={**auth(), "Content-Type": "application/json"})
    refused(answer, 422, "malformed JSON")


def test_oversized_json_body(client, session):
    body = json.dumps({"k": 1, "points": [[1.0, 2.0]] * 20000})
    assert len(body) > 64 * 1024
    refused(post_json(client, f"/v1/sessions/{session}/predict", json.loads(body)), 413, "larger than", "limit")


def test_oversized_body_without_content_length(client, session):
    def chunks():
        for _ in range(100):
            yield b" " * 4096

    answer = client.post(f"/v1/sessions/{session}/predict", content=chunks(),
                         headers={**auth(), "Content-Type": "application/json"})
    refused(answer, 413, "larger than")


def test_wrong_content_types(client, session):
    refused(client.post(f"/v1/sessions/{session}/predict", content=b"k=1", headers={**auth(), "Content-Type": "text/plain"}),
            415, "text/plain", "application/json")
    refused(client.post(f"/v1/sessions?{volume_query()}", content=json.dumps([0] * 10),
                        headers={**auth(), "Content-Type": "application/json"}), 415, "application/octet-stream")
    refused(client.put(f"/v1/sessions/{session}/masks/liver", content=b"\0" * 10,
                       headers={**auth(), "Content-Type": "multipart/form-data"}), 415, "multipart/form-data")


def test_volume_with_wrong_binary_length(client):
    answer = client.post(f"/v1/sessions?{volume_query()}", content=b"\0" * (2 * math.prod(SHAPE) - 1),
                         headers={**auth(), "Content-Type": "application/octet-stream"})
    refused(answer, 422, "expected exactly", str(2 * math.prod(SHAPE)))


def test_volume_too_large(client):
    answer = client.post(f"/v1/sessions?{volume_query(shape=(100, 100, 100))}", content=b"\0" * 16,
                         headers={**auth(), "Content-Type": "application/octet-stream"})
    refused(answer, 413, "1000000 voxels", str(MAX_VOXELS))


@pytest.mark.parametrize(("query", "words"), [
    ("shape=6,20&spacing=1,1,1&origin=0,0,0", ["shape", "3"]),
    ("shape=6,20,-4&spacing=1,1,1&origin=0,0,0", ["positive integers"]),
    ("shape=6,20,24&spacing=1,0,1&origin=0,0,0", ["spacing", "positive"]),
    ("shape=6,20,24&spacing=1,1,1&origin=0,nan,0", ["origin", "finite"]),
    ("shape=6,20,24&spacing=1,1,1&origin=0,0,0&direction=0,0,0,0,0,0,0,0,0", ["direction", "singular"]),
    ("shape=6,20,24&spacing=1,1,1&origin=0,0,0&dtype=float64", ["dtype"]),
    ("spacing=1,1,1&origin=0,0,0", ["shape", "required"]),
])
def test_volume_with_bad_geometry(client, query, words):
    answer = client.post(f"/v1/sessions?{query}", content=b"\0" * 2 * math.prod(SHAPE),
                         headers={**auth(), "Content-Type": "application/octet-stream"})
    refused(answer, 422, *words)


def test_float_volume_with_nan_voxels(client):
    voxels = np.zeros(SHAPE, dtype="<f4")
    voxels[2, 3, 4] = np.nan
    answer = client.post(f"/v1/sessions?{volume_query(dtype='float32')}", content=voxels.tobytes(),
                         headers={**auth(), "Content-Type": "application/octet-stream"})
    refused(answer, 422, "1 NaN")


# --- ids and ownership --------------------------------------------------------------------------------------------
def test_unknown_session_and_job(client):
    refused(post_json(client, "/v1/sessions/nope/predict", {"k": 0, "boxes": [[1, 1, 5, 5]]}), 404, "unknown session", "nope")
    refused(client.get("/v1/sessions/nope", headers=auth()), 404, "unknown session")
    refused(client.delete("/v1/sessions/nope", headers=auth()), 404, "unknown session")
    refused(client.get("/v1/jobs/nope", headers=auth()), 404, "unknown job", "nope")
    refused(client.post("/v1/jobs/nope/cancel", headers=auth()), 404, "unknown job")
    refused(client.get("/v1/jobs/nope/result", headers=auth()), 404, "unknown job")


def test_another_tokens_session_is_unknown_to_it(client, session):
    refused(post_json(client, f"/v1/sessions/{session}/predict", {"k": 0, "boxes": [[1, 1, 5, 5]]}, OTHER),
            404, "unknown session", "another token")
    refused(client.delete(f"/v1/sessions/{session}", headers=auth(OTHER)), 404, "unknown session")
    assert client.get(f"/v1/sessions/{session}", headers=auth()).status_code == 200  # still there for its owner


# --- paths ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["../../../etc/passwd", "/etc/passwd", "sub/../../outside.nii.gz"])
def test_path_traversal_is_refused(app, client, path):
    refused(post_json(client, "/v1/sessions/open-path", {"path": path}), 403, "outside", "data roots")


def test_path_inside_root_that_is_no_ct(app, client):
    refused(post_json(client, "/v1/sessions/open-path", {"path": "inside.txt"}), 422, "inside.txt")
    refused(post_json(client, "/v1/sessions/open-path", {"path": "missing.nii.gz"}), 422, "not found")
    refused(post_json(client, "/v1/sessions/open-path", {"path": "a\u0000b"}), 422, "NUL")
    # "~name" of no user on the server's machine (found by the schema fuzzer: a 500 before)
    refused(post_json(client, "/v1/sessions/open-path", {"path": "~no-such-user-0/ct.nii.gz"}), 422, "names no user")


def test_a_label_mask_opened_as_the_ct_is_refused_unless_allowed(app, client):
    import SimpleITK as sitk

    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2:4, 5:15, 6:18] = 1
    mask[3, 8:10, 9:12] = 2
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(app.state.root / "label.nrrd"))
    refused(post_json(client, "/v1/sessions/open-path", {"path": "label.nrrd"}), 422,
            "label.nrrd", "looks like a label mask", "(0, 1, 2)", "allow_non_ct")
    answer = post_json(client, "/v1/sessions/open-path", {"path": "label.nrrd", "allow_non_ct": True})
    assert answer.status_code == 201, answer.text
    client.delete(f"/v1/sessions/{answer.json()['session_id']}", headers=auth())


# --- prompts ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "status", "words"), [
    ({"k": 2, "boxes": [[1, 1, 500, 10]]}, 422, ["predict: boxes[0] [[1.0, 1.0, 2.0], [500.0, 10.0, 2.0]] (IJK) reaches "
                                                 "far past the edge of the volume", "Check the values;"]),
    ({"k": 2, "boxes": [[600, 1, 700, 10]]}, 422, ["predict: boxes[0] ", "lies outside the volume",
                                                   "Check the values (i, j: voxel indices on slice k)."]),
    ({"k": 2, "boxes": [[1, 1, 1.2, 10]]}, 422, ["zero area"]),
    ({"k": 99, "boxes": [[1, 1, 5, 5]]}, 422, ["k=99", "outside"]),
    ({"k": 2, "negative_points": [[3, 3]]}, 422, ["box or positive point"]),
    ({"k": 2}, 422, ["box or positive point"]),
    ({"k": 2, "boxes": [[1, 1, 5]]}, 422, ["boxes.0", "at least 4"]),
    ({"k": 2, "boxes": [[1, "a", 5, 5]]}, 422, ["boxes.0.1", "number"]),
    ({"k": 2, "points": [[1, 2]], "colour": 3}, 422, ["colour", "extra"]),
    ({"boxes": [[1, 1, 5, 5]]}, 422, ["k", "required"]),
    ([1, 2, 3], 422, ["body"]),
])
def test_bad_predict_prompts(client, session, body, status, words):
    answer = post_json(client, f"/v1/sessions/{session}/predict", body)
    refused(answer, status, *words)
    # in the request's own terms: it has no segments, and its coordinates are IJK by definition
    assert "segments[0]" not in answer.text and "coordinate" not in answer.text


def test_predict_never_suggests_another_coordinate_system_nor_lets_one_stop_a_clip():
    """A predict request is in IJK by definition. On a CT whose LPS millimetres read like its voxel indices (origin 0,
    spacing about 1 mm) a point past the edge was told to 'write "coordinate_system": "LPS"', and a box 88 % inside
    was refused there but clipped on a CT with another origin."""
    from liversam.errors import PromptError
    from liversam.geometry import ImageGeometry
    from liversam.server.jobs import slice_prompts
    from liversam.server.schemas import PredictRequest

    for origin in ((0.0, 0.0, 0.0), (-300.0, -300.0, 0.0)):
        geometry = ImageGeometry((512, 512, 100), (1.2, 1.2, 3.0), origin)
        with pytest.raises(PromptError) as error:
            slice_prompts(PredictRequest(k=2, points=[[600, 5]]), geometry)
        assert "points[0]" in str(error.value) and "coordinate" not in str(error.value)
        box = slice_prompts(PredictRequest(k=2, boxes=[[400, 5, 520, 50]]), geometry).boxes_ij[0]
        assert box == (400.0, 5.0, 511.0, 50.0)  # clipped, whatever the origin


def test_nan_coordinates(client, session):
    for text in ('{"k": 2, "boxes": [[1, NaN, 5, 5]]}', '{"k": 2, "points": [[Infinity, 2]]}'):
        answer = client.post(f"/v1/sessions/{session}/predict", content=text,
                             headers={**auth(), "Content-Type": "application/json"})
        refused(answer, 422, "finite")


@pytest.mark.parametrize(("body", "words"), [
    ({"segments": []}, ["segments", "at least 1"]),
    ({"segments": [{"name": "liver", "boxes": [[[1, 1, 2], [5, 5, 3]]]}]}, ["spans slices"]),
    ({"segments": [{"name": "tumor", "inside": "liver", "boxes": [[[1, 1, 2], [5, 5, 2]]]}]}, ["'liver'", "session mask"]),
    ({"segments": [{"name": "a", "label": 1, "boxes": [[[1, 1, 2], [5, 5, 2]]]},
                   {"name": "b", "label": 1, "boxes": [[[1, 1, 2], [5, 5, 2]]]}]}, ["label 1", "unique"]),
    ({"segments": [{"name": "liver", "markups": ["../../secret.mrk.json"]}]}, ["markups", "extra"]),
    ({"segments": [{"name": "../x", "boxes": [[[1, 1, 2], [5, 5, 2]]]}]}, ["name", "pattern"]),
    ({"coordinate_system": "XYZ", "segments": [{"name": "liver"}]}, ["coordinate_system"]),
    ({"segments": [{"name": "liver", "boxes": [[[1, 1, 2], [5, 5, 2]]]}], "settings": {"max_slices": -1}},
     ["max_slices"]),
])
def test_bad_propagation_requests(client, session, body, words):
    refused(post_json(client, f"/v1/sessions/{session}/jobs/propagate", body), 422, *words)


def test_bad_repropagation_requests(client, session):
    segment = {"name": "liver", "boxes": [[[1, 1, 2], [5, 5, 2]]]}
    refused(post_json(client, f"/v1/sessions/{session}/jobs/repropagate", {"segment": segment, "fix_slices": [3]}),
            422, "k=3", "prompted slices")
    refused(post_json(client, f"/v1/sessions/{session}/jobs/repropagate", {"segment": segment, "fix_slices": [2]}),
            422, "existing mask 'liver'", "not in the session")


def test_mask_upload(client, session):
    shape = SHAPE
    good = np.packbits(np.ones(shape, dtype=bool).ravel()).tobytes()
    headers = {**auth(), "Content-Type": "application/octet-stream"}
    refused(client.put(f"/v1/sessions/{session}/masks/liver", content=good[:-1], headers=headers), 422, "expected exactly")
    refused(client.put(f"/v1/sessions/{session}/masks/liver?encoding=rle", content=good, headers=headers), 422, "encoding")
    assert client.put(f"/v1/sessions/{session}/masks/liver", content=good, headers=headers).status_code == 204
    assert "liver" in client.get(f"/v1/sessions/{session}", headers=auth()).json()["masks"]


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing", headers=auth()).status_code == 404
    assert client.put("/v1/info", headers=auth()).status_code == 405


def test_job_settings_are_the_cores_propagation_settings():
    """Every job setting is a field of the core's PropagationSettings with the core's default (none restated),
    a clean-up setting, or the CRF's; the defaults build ``liversam segment``'s pipeline settings."""
    import dataclasses

    from liversam.pipeline import PipelineSettings
    from liversam.propagation import PropagationSettings
    from liversam.server.jobs import CLEANUP_FIELDS, PIPELINE_FIELDS, pipeline_settings
    from liversam.server.schemas import JobSettings

    core = {f.name for f in dataclasses.fields(PropagationSettings)}
    assert set(JobSettings.model_fields) - CLEANUP_FIELDS - PIPELINE_FIELDS <= core
    defaults = pipeline_settings(JobSettings())
    assert defaults.propagation == PropagationSettings()
    assert defaults.organ_track == PipelineSettings().organ_track and defaults.organ_track.skip_max_thickness_mm is None
    assert pipeline_settings(JobSettings(skip_thin_slices_mm=2.0)).organ_track.skip_max_thickness_mm == 2.0
    assert defaults.lesion_rim == PipelineSettings().lesion_rim is not None
    assert pipeline_settings(JobSettings(lesion_rim=False)).lesion_rim is None
    assert (defaults.postprocess_3d, defaults.default_3d) == (PipelineSettings().postprocess_3d, PipelineSettings().default_3d)
    assert defaults.slice_postprocess == PipelineSettings().slice_postprocess
    changed = pipeline_settings(JobSettings(min_score=0.3, max_growth_ratio=None)).propagation
    assert changed.min_score == 0.3 and changed.max_growth_ratio is None


def test_bad_job_settings(client, session):
    segment = {"name": "liver", "boxes": [[[1, 1, 2], [5, 5, 2]]]}
    for settings, words in (({"min_score": 2}, ["min_score", "less than or equal to 1"]),
                            ({"box_margin_mm": "wide"}, ["box_margin_mm"]),
                            ({"unknown_rule": 1}, ["unknown_rule", "extra"]),
                            ({"crf": ["tumour"]}, ["settings.crf: no segment named 'tumour'", "'liver'"])):
        refused(post_json(client, f"/v1/sessions/{session}/jobs/propagate", {"segments": [segment], "settings": settings}),
                422, *words)


def test_sessions_are_bounded_and_least_recently_used_goes(client):
    config = client.app.state.server.config
    ids = [open_session(client) for _ in range(config.max_sessions + 1)]
    # each new session beyond the limit evicted the least recently used one: the module's, then ids[0]
    assert client.get(f"/v1/sessions/{ids[0]}", headers=auth()).status_code == 404
    assert all(client.get(f"/v1/sessions/{i}", headers=auth()).status_code == 200 for i in ids[1:])
    assert len(client.app.state.server.sessions) == config.max_sessions  # last: evicts the module's session
