"""Property-based tests (hypothesis) of prompt files fed to ``liversam segment``.

Random JSON documents and random mutations of a valid prompts file either pass or fail with exit 2 and a
message: never an exit 3 (internal error) or a traceback, and never a partial output file. Most examples
use ``--check-only`` (validation without the model); a few run the model on a small synthetic CT and check
that any output is complete.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liversam.cli import main

VALID = {
    "coordinate_system": "IJK",
    "segments": [
        {"name": "liver", "label": 1, "propagate": True, "boxes": [[[12, 10, 2], [35, 29, 2]]],
         "points": [[20, 20, 2]], "negative_points": [[2, 2, 2]]},
        {"name": "tumor", "label": 2, "inside": "liver", "boxes": [[[18, 14, 3], [26, 22, 3]]]},
    ],
}  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["liver", "tumor", "IJK", "RAS", "LPS", "boxes", "points", "m.mrk.json", ""])
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


def _paths(value, prefix=()):
    """Every (container path) inside a JSON value, with the container itself."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, prefix + (index,))


@st.composite
def mutated_prompts(draw, base: dict = VALID):
    """The valid document with 1-3 random edits: replace, delete, insert, duplicate."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "delete", "insert", "duplicate", "nudge"]))
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete":
            del parent[key]
        elif action == "insert" and isinstance(parent, list):
            parent.insert(key, draw(json_values))
        elif action == "insert":
            parent[draw(st.text(max_size=8))] = draw(json_values)
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        elif isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
            parent[key] = parent[key] + draw(st.sampled_from([-1000, -1, 0.5, 1, 1e9]))
    return doc


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc, allow_nan=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory) -> Path:
    array = np.full((6, 40, 48), -1000, dtype=np.int16)
    array[:, 10:30, 12:36] = 60
    array[3, 15:21, 19:25] = 150
    image = sitk.GetImageFromArray(array)
    path = tmp_path_factory.mktemp("ct") / "ct.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# database=None: no .hypothesis folder in the checkout; derandomize: the same examples on every run (CI).
FAST = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(doc=json_values | mutated_prompts())
def test_any_prompts_document_gives_exit_0_or_2_never_a_traceback(doc, small_ct, tmp_path, capsys):
    prompts = _write(tmp_path / "prompts.json", doc)
    out = tmp_path / "never" / "out.seg.nrrd"
    code, err = _run(capsys, ["segment", str(small_ct), "--prompts", str(prompts), "--output", str(out), "--check-only"])
    assert code in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err
    if code == 2:
        assert err.startswith("liversam segment: error: ") and len(err.strip().splitlines()[0]) > 30
    assert not out.parent.exists()


# Without propagation, so that a run encodes at most the two prompted slices.
SINGLE_SLICE = {**VALID, "segments": [{**s, "propagate": False} for s in VALID["segments"]]}


@settings(max_examples=3, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=mutated_prompts(SINGLE_SLICE))
def test_a_full_run_on_mutated_prompts_writes_a_complete_output_or_none(doc, small_ct, tmp_path_factory, capsys):
    from liversam.segmentation_io import read_segmentation

    folder = tmp_path_factory.mktemp("run")
    prompts = _write(folder / "prompts.json", doc)
    out = folder / "out.seg.nrrd"
    code, err = _run(capsys, ["segment", str(small_ct), "--prompts", str(prompts), "--output", str(out),
                              "--accelerate", "plain", "--threads", "2"])  # fmt: skip
    assert code in (0, 2), err
    assert "Traceback" not in err
    leftovers = [p.name for p in folder.iterdir() if p.name not in ("prompts.json", "out.seg.nrrd")]
    assert not leftovers, leftovers
    if code == 0:
        result = read_segmentation(out)
        assert result.geometry.size_ijk == (48, 40, 6) and result.segments
    else:
        assert not out.exists()
