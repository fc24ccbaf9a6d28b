"""Generated requests against ``liversam serve``'s own OpenAPI schema (schemathesis) and random request
bodies (hypothesis): the answer is a success or a 4xx with a message, never a 5xx.

In-process (ASGI) with the real LiteMedSAM model on a tiny CT, so a generated request that happens to be
valid runs for real. Bounded example counts keep this under a minute.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from liversam.server.app import create_app  # noqa: E402
from liversam.server.config import ServerConfig  # noqa: E402

pytestmark = pytest.mark.model

TOKEN = "fuzzing-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHAPE = (3, 24, 32)  # k, j, i: a tiny CT, each encode still costs one LiteMedSAM run


def make_app(model, root: Path):
    """``root``: open-path's only data root, an empty folder, so generated paths find nothing."""
    config = ServerConfig(tokens=[TOKEN], max_voxels=100_000, max_json_bytes=64 * 1024, max_sessions=64,
                          data_roots=[root])
    return create_app(config, model_loader=lambda: model)


@pytest.fixture(scope="module")
def app(litemedsam, tmp_path_factory):
    application = make_app(litemedsam, tmp_path_factory.mktemp("fuzz-root"))
    yield application
    application.state.server.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def session(client) -> str:
    rng = np.random.default_rng(0)
    voxels = rng.integers(-200, 200, size=SHAPE).astype("<i2")
    query = f"shape={','.join(map(str, SHAPE))}&spacing=1,1,2&origin=0,0,0"
    answer = client.post(f"/v1/sessions?{query}", content=voxels.tobytes(),
                         headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert answer.status_code == 201, answer.text
    return answer.json()["session_id"]


def test_generated_requests_never_get_a_server_error(litemedsam, tmp_path):
    """schemathesis: cases generated from every operation of the server's OpenAPI schema (bounded).

    An application of its own: schemathesis' client runs the app's lifespan, whose end stops the server.
    """
    app = make_app(litemedsam, tmp_path)
    api = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15
    failures: list[str] = []
    for operation in operations:

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call(headers=AUTH)
            if response.status_code >= 500 or (response.status_code >= 400
                                               and not isinstance(response.json().get("detail"), str)):
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")

        check()
    assert failures == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
numbers = st.integers(-5, 40) | st.floats(-5, 40) | st.sampled_from([math.nan, math.inf, -math.inf, "1", None])
predict_bodies = st.fixed_dictionaries(
    {"k": st.integers(-2, SHAPE[0] + 1) | st.sampled_from([None, "0", 1.5])},
    optional={"boxes": st.lists(st.lists(numbers, min_size=3, max_size=5), max_size=3),
              "points": st.lists(st.lists(numbers, min_size=1, max_size=3), max_size=3),
              "negative_points": st.lists(st.lists(numbers, min_size=2, max_size=2), max_size=2)},
)


coordinates = st.integers(-2, 34) | st.floats(-2, 34)
plausible_bodies = st.fixed_dictionaries(  # often valid: these reach the model (at most 3 slices to encode)
    {"k": st.integers(0, SHAPE[0] - 1),
     "boxes": st.lists(st.lists(coordinates, min_size=4, max_size=4), max_size=2),
     "points": st.lists(st.lists(coordinates, min_size=2, max_size=2), max_size=2)},
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(body=json_values | predict_bodies | plausible_bodies)
def test_random_predict_bodies(client, session, body):
    text = json.dumps(body)  # NaN and Infinity are written as such: the server must refuse them cleanly
    answer = client.post(f"/v1/sessions/{session}/predict", content=text,
                         headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code in (200, 413, 422), answer.text
    if answer.status_code == 200:
        assert answer.headers["X-LiverSAM-Shape"] == f"{SHAPE[1]},{SHAPE[2]}"
        assert len(answer.content) == math.ceil(SHAPE[1] * SHAPE[2] / 8)
        assert 0.0 <= float(answer.headers["X-LiverSAM-Score"]) <= 1.5
    else:
        assert answer.json()["detail"]


segment_bodies = st.fixed_dictionaries(
    {"name": st.sampled_from(["liver", "tumor", "", "a/b", 3])},
    optional={"boxes": st.lists(st.lists(st.lists(numbers, min_size=2, max_size=4), min_size=1, max_size=3), max_size=2),
              "inside": st.sampled_from(["liver", "nothing", None]),
              "label": st.integers(-1, 70000), "propagate": st.booleans()},
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(body=json_values | st.fixed_dictionaries({"segments": st.lists(segment_bodies, max_size=3)},
                                                optional={"settings": st.dictionaries(
                                                    st.sampled_from(["max_slices", "intensity_refinement", "x"]),
                                                    numbers, max_size=2)}))
def test_random_propagation_bodies(client, session, body):
    answer = client.post(f"/v1/sessions/{session}/jobs/propagate", content=json.dumps(body),
                         headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code in (202, 413, 422), answer.text
    if answer.status_code == 202:  # a valid random job: don't let it run, it would only cost time
        client.post(f"/v1/jobs/{answer.json()['job_id']}/cancel", headers=AUTH)
    else:
        assert answer.json()["detail"]
