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


def _liver_and(second: dict, liver_name: str = "liver") -> dict:
    return {"coordinate_system": "IJK", "segments": [
        {"name": liver_name, "boxes": [[[5, 5, 3], [40, 30, 3]]], "propagate": True},
        {"boxes": [[[10, 10, 3], [20, 20, 3]]], "propagate": True, **second}]}


@pytest.mark.parametrize("name", ["tumor", "Tumour", "lesion_3", "HCC", "liver lesions"])
def test_a_liver_tumour_without_inside_is_kept_inside_the_liver(oblique, name, caplog):
    """A user who writes the tumour's segment without "inside" gets what the README's example gives: the tumour
    inside the liver, refined against its parenchyma (without a container one-box tumour Dice on the four cases
    falls from 0.808 to 0.457), and is told so."""
    with caplog.at_level("INFO", logger="liversam.prompts"):
        _, tumor = parse_prompts(_liver_and({"name": name}), oblique, source="p.json")
    assert tumor.inside == "liver"
    assert f"p.json: segments[1] ('{name}') gives no \"inside\"; kept inside 'liver'" in caplog.text
    _, explicit = parse_prompts(_liver_and({"name": name, "inside": "liver"}), oblique)
    assert explicit.inside == "liver" and explicit.slices[3].boxes_ij == tumor.slices[3].boxes_ij


@pytest.mark.parametrize(
    ("second", "liver_name"),
    [({"name": "tumor", "inside": None}, "liver"),  # an explicit null keeps the segment on its own
     ({"name": "spleen"}, "liver"),  # not a liver tumour's name
     ({"name": "tumor"}, "organ")],  # no segment named as the liver
)
def test_a_segment_stays_on_its_own_where_the_default_does_not_apply(oblique, second, liver_name):
    _, other = parse_prompts(_liver_and(second, liver_name), oblique)
    assert other.inside is None


def test_no_default_that_would_make_a_loop_or_choose_between_livers(oblique, caplog):
    data = _liver_and({"name": "tumor"})
    data["segments"][0]["inside"] = "tumor"  # odd, but the user's word: the default would make a loop
    liver, tumor = parse_prompts(data, oblique)
    assert liver.inside == "tumor" and tumor.inside is None
    data = _liver_and({"name": "tumor"})
    data["segments"].append({"name": "Hepar", "points": [[30, 20, 3]]})
    with caplog.at_level("INFO", logger="liversam.prompts"):
        _, tumor, _ = parse_prompts(data, oblique, source="p.json")
    assert tumor.inside is None
    assert "p.json: 2 segments are named as the liver (liver, Hepar)" in caplog.text


def test_the_server_reads_inside_as_a_prompts_file_does(oblique, caplog):
    """A propagation request holds segments in PROMPTS.json form: the same default, the same explicit null."""
    from liversam.server.jobs import segment_prompts
    from liversam.server.schemas import SegmentSpec

    for second, expected in (({"name": "tumor"}, "liver"), ({"name": "tumor", "inside": None}, None),
                             ({"name": "tumor", "inside": "kidney"}, "kidney")):
        specs = [SegmentSpec(**spec) for spec in _liver_and(second)["segments"]]
        caplog.clear()
        with caplog.at_level("INFO", logger="liversam.prompts"):
            _, tumor = segment_prompts(specs, "IJK", oblique, {"kidney": np.zeros((30, 48, 64), bool)})
        assert tumor.inside == expected
        assert ("gives no \"inside\"" in caplog.text) == ("inside" not in second)  # said only when it applies


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


def _roi(system: str, center, size, axes) -> dict:
    """A Slicer ROI markup; ``axes``' columns are the ROI's axes (Slicer writes the matrix row by row)."""
    return {"markups": [{"type": "ROI", "coordinateSystem": system, "center": list(map(float, center)),
                         "size": list(map(float, size)), "orientation": list(np.asarray(axes, float).ravel())}]}


def _ras_axes_of_ijk_directions(geometry: ImageGeometry, angle_deg: float) -> np.ndarray:
    """RAS axes of an ROI turned by ``angle_deg`` in the image plane from the i axis (and k as third axis)."""
    a = np.deg2rad(angle_deg)
    in_ijk = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    lps = np.asarray(geometry.direction_lps) @ in_ijk  # columns: the ROI axes in LPS
    return np.diag([-1.0, -1.0, 1.0]) @ lps


@pytest.mark.parametrize("system", ["RAS", "LPS"])
def test_slicer_markups_roi_oriented_with_the_image_gives_its_exact_box(tmp_path, oblique, system):
    # The volume is turned 20 degrees in its plane; an ROI turned the same way is a straight box in IJK:
    # 16 x 12 mm = 20 x 15 voxels of 0.8 mm around voxel (32, 24, 10), 3 mm thick on 2 mm slices.
    axes = _ras_axes_of_ijk_directions(oblique, 0.0)
    center = oblique.ijk_to_ras([32, 24, 10])
    if system == "LPS":
        center, axes = center * [-1, -1, 1], np.diag([-1.0, -1.0, 1.0]) @ axes
    (tmp_path / "roi.mrk.json").write_text(json.dumps(_roi(system, center, (16.0, 12.0, 3.0), axes)))
    boxes = markups_to_prompts(tmp_path / "roi.mrk.json", oblique)
    # k from 9.25 to 10.75: the slabs of slices 9, 10 and 11 (each k +- 0.5) overlap it.
    assert sorted(boxes) == [9, 10, 11]
    for k in (9, 10, 11):
        (box,) = boxes[k].boxes_ij
        np.testing.assert_allclose(box, (22.0, 16.5, 42.0, 31.5), atol=1e-6)
    (tmp_path / "thin.mrk.json").write_text(json.dumps(_roi(system, center, (16.0, 12.0, 1.0), axes)))
    assert sorted(markups_to_prompts(tmp_path / "thin.mrk.json", oblique)) == [10]


def test_slicer_markups_roi_turned_against_the_image_gives_its_bounding_box(tmp_path, oblique):
    # Turned 30 degrees against the image's axes: the box is the IJK bounding box of the turned rectangle.
    a = np.deg2rad(30.0)
    half_i, half_j = 16.0 / 2 / 0.8, 8.0 / 2 / 0.8  # half sizes in voxels along the ROI's own axes
    extent_i = half_i * np.cos(a) + half_j * np.sin(a)
    extent_j = half_i * np.sin(a) + half_j * np.cos(a)
    center = oblique.ijk_to_ras([32, 24, 10])
    roi = _roi("RAS", center, (16.0, 8.0, 1.0), _ras_axes_of_ijk_directions(oblique, 30.0))
    (tmp_path / "roi.mrk.json").write_text(json.dumps(roi))
    boxes = markups_to_prompts(tmp_path / "roi.mrk.json", oblique)
    assert sorted(boxes) == [10]
    np.testing.assert_allclose(
        boxes[10].boxes_ij[0], (32 - extent_i, 24 - extent_j, 32 + extent_i, 24 + extent_j), atol=1e-6
    )


def test_slicer_markups_roi_reaching_outside_is_clipped_to_the_volume(tmp_path, oblique):
    center = oblique.ijk_to_ras([60, 2, 0])
    roi = _roi("RAS", center, (8.0, 8.0, 1.0), _ras_axes_of_ijk_directions(oblique, 0.0))
    (tmp_path / "roi.mrk.json").write_text(json.dumps(roi))
    boxes = markups_to_prompts(tmp_path / "roi.mrk.json", oblique)
    assert sorted(boxes) == [0]
    np.testing.assert_allclose(boxes[0].boxes_ij[0], (55.0, 0.0, 63.0, 7.0), atol=1e-6)


def test_slicer_markups_points_and_references(tmp_path, oblique):
    center_ras = oblique.ijk_to_ras([32, 24, 10])
    roi = _roi("RAS", center_ras, (16.0, 12.0, 1.0), _ras_axes_of_ijk_directions(oblique, 0.0))
    points = {"markups": [{"type": "Fiducial", "coordinateSystem": "LPS",
                           "controlPoints": [{"position": list(oblique.ijk_to_lps([31.3, 22.6, 10]))},
                                             {"position": list(oblique.ijk_to_lps([5.0, 6.0, 3.2]))}]}]}
    (tmp_path / "roi.mrk.json").write_text(json.dumps(roi))
    (tmp_path / "two.mrk.json").write_text(json.dumps(points))
    points["markups"][0]["controlPoints"].pop()
    (tmp_path / "pts.mrk.json").write_text(json.dumps(points))
    pts = markups_to_prompts(tmp_path / "two.mrk.json", oblique, positive=False)
    assert sorted(pts) == [3, 10]
    np.testing.assert_allclose(pts[10].points_neg_ij, [(31.3, 22.6)], atol=1e-6)
    np.testing.assert_allclose(pts[3].points_neg_ij, [(5.0, 6.0)], atol=1e-6)
    assert not pts[10].points_pos_ij and not pts[10].boxes_ij
    positives = markups_to_prompts(tmp_path / "two.mrk.json", oblique)
    np.testing.assert_allclose(positives[10].points_pos_ij, [(31.3, 22.6)], atol=1e-6)
    # Markups referenced from PROMPTS.json, and a bare .mrk.json as the prompts file.
    prompts = {"coordinate_system": "LPS", "segments": [{"name": "liver", "markups": ["roi.mrk.json"],
                                                          "negative_markups": "pts.mrk.json"}]}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (seg,) = load_prompts(tmp_path / "prompts.json", oblique)
    np.testing.assert_allclose(seg.slices[10].boxes_ij, [(22.0, 16.5, 42.0, 31.5)], atol=1e-6)
    np.testing.assert_allclose(seg.slices[10].points_neg_ij, [(31.3, 22.6)], atol=1e-6)
    assert not seg.slices[10].points_pos_ij
    (seg,) = load_prompts(tmp_path / "roi.mrk.json", oblique)
    assert seg.name == "liver" and sorted(seg.slices) == [10]


def test_missing_and_invalid_files(tmp_path, oblique):
    with pytest.raises(PromptError, match="not found"):
        load_prompts(tmp_path / "nope.json", oblique)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompts(tmp_path / "bad.json", oblique)


def test_point_outside_names_the_volume_extent_in_the_prompt_system(oblique):
    with pytest.raises(PromptError) as error:
        parse_prompts(_one_point("IJK", [70, 10, 3]), oblique)
    assert "[70.0, 10.0, 3.0] (IJK) lies outside the volume (volume extent: i 0..63, j 0..47, k 0..29)" in str(
        error.value
    )
    corners = np.array([[a, b, c] for a in (0, 63) for b in (0, 47) for c in (0, 29)], dtype=float)
    for system, world in (("RAS", oblique.ijk_to_ras(corners)), ("LPS", oblique.ijk_to_lps(corners))):
        lo, hi = world.min(axis=0), world.max(axis=0)
        extent = ", ".join(f"{axis} {a:.1f}..{b:.1f} mm" for axis, a, b in zip(system, lo, hi, strict=True))
        outside = oblique.ijk_to_ras([80, 10, 3]) if system == "RAS" else oblique.ijk_to_lps([80, 10, 3])
        with pytest.raises(PromptError) as error:
            parse_prompts(_one_point(system, outside), oblique)
        assert f"({system}) lies outside the volume (volume extent: {extent})." in str(error.value)


def test_box_corners_in_any_order_and_slice_rounding(oblique):
    data = {"coordinate_system": "IJK", "segments": [{"name": "liver", "boxes": [[[30, 25, 3.2], [5, 6, 3.4]]]}]}
    (seg,) = parse_prompts(data, oblique)
    assert list(seg.slices) == [3]
    (box,) = seg.slices[3].boxes_ij
    assert box == (5.0, 6.0, 30.0, 25.0) and all(type(v) is float for v in box)
    # A box on the volume's edge slices (within half a voxel) is clamped onto the first / last slice.
    for k, expected in ((-0.5, 0), (29.5, 29)):  # round(29.5) is 30: clamped
        data["segments"][0]["boxes"] = [[[5, 6, k], [30, 25, k]]]
        (seg,) = parse_prompts(data, oblique)
        assert list(seg.slices) == [expected]
    data["segments"][0]["boxes"] = [[[5, 6, 3.0], [30, 25, 3.6]]]
    with pytest.raises(PromptError, match=r"segments\[0\]\.boxes\[0\] \(segment 'liver' box 0\) spans slices k=3.00..3.60; a box's two corners must lie on one"):
        parse_prompts(data, oblique)
    data["segments"][0]["boxes"] = [[[5, 6, 3.0], [30, 25, 3.5]]]  # half a slice apart: still one slice
    (seg,) = parse_prompts(data, oblique)
    assert list(seg.slices) == [3]


def test_box_shape_and_area_errors_are_specific(oblique):
    def parse(boxes):
        return parse_prompts({"coordinate_system": "IJK", "segments": [{"name": "liver", "boxes": boxes}]}, oblique)

    with pytest.raises(PromptError, match=r"segments\[0\]\.boxes\[0\]: expected 2 corners \[\[x0, y0, z\], \[x1, y1, z\]\], got 1 item"):
        parse([[[5, 6, 3]]])
    with pytest.raises(PromptError, match=r"box 0\) has \(almost\) zero area: 0.50 x 19.00 voxels"):
        parse([[[5, 6, 3], [5.5, 25, 3]]])
    with pytest.raises(PromptError, match=r"box 0\) has \(almost\) zero area: 25.00 x 0.90 voxels"):
        parse([[[5, 6, 3], [30, 6.9, 3]]])
    (seg,) = parse([[[5, 6, 3], [6, 7, 3]]])  # one voxel wide in each direction is enough
    assert seg.slices[3].boxes_ij == [(5.0, 6.0, 6.0, 7.0)]


def _one_box(system: str, corners) -> dict:
    return {"coordinate_system": system, "segments": [{"name": "liver", "boxes": [[list(c) for c in corners]]}]}


def test_a_box_drawn_a_little_past_the_edge_is_clipped_to_the_slice(oblique, caplog):
    """A liver touching the border of a cropped CT: the user's box runs a few voxels past it. It was refused as lying
    "outside the volume"; Slicer's ROI boxes were already clipped."""
    corners_ijk = np.array([[40.0, 5.0, 12.0], [70.0, 50.0, 12.0]])  # i to 70 of 0..63, j to 50 of 0..47
    for system, corners in (("IJK", corners_ijk), ("LPS", oblique.ijk_to_lps(corners_ijk)),
                            ("RAS", oblique.ijk_to_ras(corners_ijk))):  # fmt: skip
        caplog.clear()
        with caplog.at_level("INFO", logger="liversam.prompts"):
            (seg,) = parse_prompts(_one_box(system, corners), oblique)
        assert list(seg.slices) == [12]
        np.testing.assert_allclose(seg.slices[12].boxes_ij[0], (40.0, 5.0, 63.0, 47.0), atol=1e-6)
        assert "reaches past the edge of the volume: clipped to it (72 % of the box lies inside)" in caplog.text


def test_a_box_mostly_outside_or_off_every_slice_is_refused(oblique):
    with pytest.raises(PromptError, match=r"reaches far past the edge of the volume: only 2 % of it lies inside"):
        parse_prompts(_one_box("IJK", [[50, 40, 12], [150, 100, 12]]), oblique)
    with pytest.raises(PromptError, match="lies outside the volume"):  # its slice is not in the volume
        parse_prompts(_one_box("IJK", [[40, 5, 40], [70, 50, 40]]), oblique)
    with pytest.raises(PromptError, match="lies outside the volume"):  # nothing of it inside
        parse_prompts(_one_box("IJK", [[70, 5, 12], [90, 50, 12]]), oblique)
