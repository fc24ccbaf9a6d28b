"""PROMPTS.json and Slicer markups: coordinate systems, validation, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from liversam.errors import PromptError
from liversam.geometry import ImageGeometry
from liversam.prompts import load_prompts, markups_to_prompts, parse_prompts


@pytest.fixture
def oblique() -> ImageGeometry:
    angle = np.deg2rad(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    return ImageGeometry(size_ijk=(64, 48, 30), spacing_mm=(0.8, 0.8, 2.0), origin_lps=(10.0, -20.0, 55.0),
                         direction_lps=direction)


def _one_point(system: str, point) -> dict:
    return {"coordinate_system": system, "segments": [{"name": "liver", "points": [list(point)]}]}


def test_point_in_lps_ras_ijk_lands_on_the_same_voxel(oblique):
    ijk = np.array([20.0, 17.0, 12.0])
    lps = oblique.ijk_to_lps(ijk)
    ras = oblique.ijk_to_ras(ijk)
    results = []
    for system, point in (("IJK", ijk), ("LPS", lps), ("RAS", ras)):
        (seg,) = parse_prompts(_one_point(system, point), oblique)
        ((k, prompts),) = seg.slices.items()
        results.append((k, prompts.points_pos_ij[0]))
    for k, (i, j) in results:
        assert k == 12
        assert (round(i), round(j)) == (20, 17)


def test_box_segments_labels_colors_and_inside(oblique):
    c0 = oblique.ijk_to_lps([5, 6, 3])
    c1 = oblique.ijk_to_lps([30, 25, 3])
    data = {
        "coordinate_system": "LPS",
        "segments": [
            {"name": "liver", "boxes": [[list(c0), list(c1)]], "negative_points": [list(oblique.ijk_to_lps([6, 7, 3]))]},
            {"name": "tumor", "label": 2, "inside": "liver", "color": [255, 0, 0], "boxes": [[list(c0), list(c1)]],
             "propagate": True},
        ],
    }
    liver, tumor = parse_prompts(data, oblique)
    assert liver.label == 1 and tumor.label == 2 and tumor.inside == "liver" and tumor.propagate
    assert tumor.color == (1.0, 0.0, 0.0)
    i0, j0, i1, j1 = liver.slices[3].boxes_ij[0]
    assert (round(i0), round(j0), round(i1), round(j1)) == (5, 6, 30, 25)
    assert len(liver.slices[3].points_neg_ij) == 1


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ([{"name": "liver", "points": [[500, 0, 0]]}], "outside the volume"),
        ([{"name": "liver", "boxes": [[[5, 5, 3], [5, 20, 3]]]}], "zero area"),
        ([{"name": "liver", "boxes": [[[5, 5, 3], [20, 20, 9]]]}], "one axial"),
        ([{"name": "liver", "boxes": [[[5, 5, 3], [20, 20, 3]]]},
          {"name": "tumor", "inside": "lung", "points": [[8, 8, 3]]}], "no segment of that name"),
        ([{"name": "liver", "negative_points": [[8, 8, 3]]}], "no box or positive point"),
        ([{"name": "liver", "points": [[8, 8, 3]]}, {"name": "liver", "points": [[9, 9, 3]]}], "used twice"),
    ],
)
def test_bad_prompts_give_specific_errors(oblique, segments, message):
    with pytest.raises(PromptError, match=message):
        parse_prompts({"coordinate_system": "IJK", "segments": segments}, oblique)


def test_unknown_coordinate_system(oblique):
    with pytest.raises(PromptError, match="coordinate_system"):
        parse_prompts({"coordinate_system": "XYZ", "segments": [{"name": "a", "points": [[1, 1, 1]]}]}, oblique)


def test_slicer_markups_roi_and_points(tmp_path, oblique):
    center_ras = oblique.ijk_to_ras([32, 24, 10])
    roi = {"markups": [{"type": "ROI", "coordinateSystem": "RAS", "center": list(center_ras),
                        "size": [10.0, 8.0, 3.0], "orientation": [1, 0, 0, 0, 1, 0, 0, 0, 1]}]}
    points = {"markups": [{"type": "Fiducial", "coordinateSystem": "LPS",
                           "controlPoints": [{"position": list(oblique.ijk_to_lps([31, 22, 10]))}]}]}
    (tmp_path / "roi.mrk.json").write_text(json.dumps(roi))
    (tmp_path / "pts.mrk.json").write_text(json.dumps(points))
    boxes = markups_to_prompts(tmp_path / "roi.mrk.json", oblique)
    # A 3 mm thick ROI on 2 mm slices covers the centre slice and at most one neighbour on each side.
    assert 10 in boxes and set(boxes) <= {9, 10, 11}
    i0, j0, i1, j1 = boxes[10].boxes_ij[0]
    assert i0 < 32 < i1 and j0 < 24 < j1
    pts = markups_to_prompts(tmp_path / "pts.mrk.json", oblique, positive=False)
    assert [tuple(round(v) for v in p) for p in pts[10].points_neg_ij] == [(31, 22)]
    # Markups referenced from PROMPTS.json, and a bare .mrk.json as the prompts file.
    prompts = {"coordinate_system": "LPS", "segments": [{"name": "liver", "markups": ["roi.mrk.json"],
                                                          "negative_markups": "pts.mrk.json"}]}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (seg,) = load_prompts(tmp_path / "prompts.json", oblique)
    assert seg.slices[10].boxes_ij and seg.slices[10].points_neg_ij
    (seg,) = load_prompts(tmp_path / "roi.mrk.json", oblique)
    assert seg.name == "liver" and 10 in seg.slices


def test_missing_and_invalid_files(tmp_path, oblique):
    with pytest.raises(PromptError, match="not found"):
        load_prompts(tmp_path / "nope.json", oblique)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompts(tmp_path / "bad.json", oblique)
