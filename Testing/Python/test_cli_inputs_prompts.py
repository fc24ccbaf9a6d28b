"""A new user's prompts on the command line: values copied from 3D Slicer (RAS) into an LPS file, a box drawn
on an axial plane of a sagittal CT, a Slicer markups file saved under a plain .json name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from liversam.cli import main

SIZE_KJI = (6, 40, 48)


def _write_ct(path: Path, direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    """A CT at origin (10, 10, 0) LPS: every LPS point of it has positive x and y, so its RAS x, y are negative."""
    array = np.full(SIZE_KJI, -1000, dtype=np.int16)
    array[:, 10:30, 12:36] = 60
    image = sitk.GetImageFromArray(array)
    image.SetOrigin((10.0, 10.0, 0.0))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def _json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _check_only(ct: Path, prompts: Path, tmp_path: Path) -> list[str]:
    return [
        "segment",
        str(ct),
        "--prompts",
        str(prompts),
        "--output",
        str(tmp_path / "o.seg.nrrd"),
        "--check-only",
    ]


def _roi(center: list[float], system: str = "LPS") -> dict:
    """An ROI as 3D Slicer 5.10 writes it (vtkMRMLMarkupsROIJsonStorageNode), with the keys LiverSAM ignores."""
    return {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/main/Modules/Loadable/Markups/Resources/Schema/"
        "markups-schema-v1.0.3.json#",
        "markups": [{
            "type": "ROI", "coordinateSystem": system, "coordinateUnits": "mm", "locked": False, "roiType": "Box",
            "center": center, "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
            "size": [20.0, 15.0, 2.0], "insideOut": False,
            "controlPoints": [{"id": "1", "label": "R", "position": center, "positionStatus": "defined"}],
            "display": {"visibility": True, "color": [0.4, 1.0, 1.0]},
        }],
    }  # fmt: skip


def test_ras_values_in_an_lps_file_are_told_which_system_fits(tmp_path, capsys):
    ct = _write_ct(tmp_path / "ct.nrrd")
    ras_box = [[-25.0, -22.0, 4.0], [-45.0, -38.0, 4.0]]  # as 3D Slicer shows the box: RAS
    prompts = _json(
        tmp_path / "p.json", {"coordinate_system": "LPS", "segments": [{"name": "liver", "boxes": [ras_box]}]}
    )
    assert main(_check_only(ct, prompts, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "lies outside the volume" in err and 'write "coordinate_system": "RAS"' in err
    ras = _json(
        tmp_path / "ras.json",
        {"coordinate_system": "RAS", "segments": [{"name": "liver", "boxes": [ras_box]}]},
    )
    assert main(_check_only(ct, ras, tmp_path)) == 0  # the hint is right


def test_a_markups_roi_with_ras_values_marked_lps_is_told_the_markups_key(tmp_path, capsys):
    ct = _write_ct(tmp_path / "ct.nrrd")
    markups = _json(tmp_path / "roi.mrk.json", _roi([-35.0, -30.0, 4.0], system="LPS"))
    assert main(_check_only(ct, markups, tmp_path)) == 2
    assert 'write "coordinateSystem": "RAS"' in capsys.readouterr().err


def test_a_box_on_an_axial_plane_of_an_oblique_sagittal_ct_says_the_slices_are_sagittal(tmp_path, capsys):
    """A sagittal CT whose in-plane axes are turned 35 degrees about L-R: no reordering of its voxels gives axial
    slices (test_axial_reorientation.py: a sagittal CT whose axes follow the patient's is segmented on its axial
    slices), so a box must lie on one of its own slices."""
    c, s = np.cos(np.deg2rad(35.0)), np.sin(np.deg2rad(35.0))
    turned = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]) @ np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    ct = _write_ct(tmp_path / "sagittal.nrrd", direction=tuple(turned.ravel()))  # k along x: sagittal slices
    box = [[12.0, 15.0, 20.0], [15.0, 30.0, 20.0]]  # one axial plane, z = 20: two sagittal slices apart
    prompts = _json(
        tmp_path / "p.json", {"coordinate_system": "LPS", "segments": [{"name": "liver", "boxes": [box]}]}
    )
    assert main(_check_only(ct, prompts, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "slices are sagittal, not axial" in err and "share their x value" in err
    assert "Orient Scalar Volume" in err


def test_a_slicer_markups_file_saved_as_plain_json_is_read_as_markups(tmp_path, capsys):
    ct = _write_ct(tmp_path / "ct.nrrd")
    roi = _roi([35.0, 30.0, 4.0])
    plain = _json(tmp_path / "liver_roi.json", roi)
    assert main(_check_only(ct, plain, tmp_path)) == 0
    as_plain = capsys.readouterr().out
    assert "1 segment(s) (liver)" in as_plain
    named = _json(tmp_path / "liver_roi.mrk.json", roi)
    assert main(_check_only(ct, named, tmp_path)) == 0
    assert capsys.readouterr().out == as_plain  # the same prompts as under its .mrk.json name
