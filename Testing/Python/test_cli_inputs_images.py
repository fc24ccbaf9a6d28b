"""A new user's image files on the command line: a file whose name does not match its content, and a volume
whose values are not Hounsfield units (stored values without the rescale, an 8-bit picture)."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from liversam.cli import main


def _ct_array() -> np.ndarray:
    """k, j, i: air around a soft-tissue block, with CT noise (hundreds of distinct values, not a label mask)."""
    array = np.full((6, 40, 48), -1000.0)
    array[:, 10:30, 12:36] = 60.0
    return np.rint(array + np.random.default_rng(0).normal(0.0, 80.0, array.shape)).astype(np.int16)


def _write(path: Path, array: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(path))
    return path


def _segment_check_only(tmp_path: Path, ct: Path, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.json"
    box = [[[12, 10, 2], [35, 29, 2]]]
    prompts.write_text(
        json.dumps({"coordinate_system": "IJK", "segments": [{"name": "liver", "boxes": box}]})
    )
    return ["segment", str(ct), "--prompts", str(prompts), "--output", str(tmp_path / "out.seg.nrrd"),
            "--check-only", *extra]  # fmt: skip


def _gzipped(source: Path, target: Path) -> Path:
    target.write_bytes(gzip.compress(source.read_bytes()))
    return target


@pytest.mark.parametrize(
    ("make", "named", "fix"),
    [
        (
            lambda d: shutil.copy(_write(d / "a.nii", _ct_array()), d / "ct.nrrd"),
            "ct.nrrd",
            "rename it to end with .nii",
        ),
        (
            lambda d: _gzipped(_write(d / "a.nii", _ct_array()), d / "ct.nii"),
            "ct.nii",
            "rename it to end with .nii.gz",
        ),
        (
            lambda d: shutil.copy(_write(d / "a.nrrd", _ct_array()), d / "ct.nii"),
            "ct.nii",
            "rename it to end with .nrrd",
        ),
        (
            lambda d: _gzipped(_write(d / "a.nii", _ct_array()), d / "ct"),
            "ct",
            "rename it to end with .nii.gz",
        ),
    ],
    ids=["nifti_named_nrrd", "nii_gz_named_nii", "nrrd_named_nii", "nii_gz_without_suffix"],
)
def test_a_file_whose_name_does_not_match_its_content_is_named_with_the_fix(
    tmp_path, capsys, make, named, fix
):
    make(tmp_path)
    assert main(_segment_check_only(tmp_path, tmp_path / named)) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / named}'" in err and fix in err
    assert "truncated" not in err  # the file is complete: it is only misnamed


@pytest.mark.parametrize(
    "array",
    [(_ct_array().astype(np.int32) + 1024).astype(np.uint16),  # stored values, RescaleIntercept -1024 not applied
     np.clip((_ct_array() + 160) / 400 * 255, 0, 255).astype(np.uint8)],  # windowed for display, 8 bits
    ids=["stored_values_without_rescale", "windowed_8_bit"],
)  # fmt: skip
def test_a_volume_without_hounsfield_units_is_refused_unless_allowed(tmp_path, capsys, array):
    ct = _write(tmp_path / "ct.nrrd", array)
    assert main(_segment_check_only(tmp_path, ct)) == 2
    err = capsys.readouterr().err
    assert "does not hold Hounsfield units" in err and f"{array.min():g}..{array.max():g}" in err
    assert "--allow-non-ct" in err
    assert main(_segment_check_only(tmp_path, ct, "--allow-non-ct")) == 0


def test_a_ct_in_hounsfield_units_passes(tmp_path):
    assert main(_segment_check_only(tmp_path, _write(tmp_path / "ct.nrrd", _ct_array()))) == 0


def test_micrometre_spacing_is_warned_about_and_the_empty_result_is_said(tmp_path, caplog):
    """A header in the wrong units (0.001 mm voxels): the clean-up in mm removes every mask. The run says why."""
    image = sitk.GetImageFromArray(_ct_array())
    image.SetSpacing((0.001, 0.001, 0.002))
    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(ct))
    argv = _segment_check_only(tmp_path, ct)[:-1]  # a full run: without --check-only
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--accelerate", "plain", "--crf", "none"]) == 0
    assert "voxel spacing (0.001, 0.001, 0.002) mm, outside the 0.1..20 mm of a CT" in caplog.text
    assert "segment(s) 'liver' came out empty" in caplog.text


def test_the_folder_of_a_nifti_ct_given_as_the_ct_names_the_file_to_give(tmp_path, capsys):
    folder = tmp_path / "case1"
    folder.mkdir()
    _write(folder / "ct.nii.gz", _ct_array())
    assert main(_segment_check_only(tmp_path, folder)) == 2
    assert f"Give the CT file itself (e.g. '{folder / 'ct.nii.gz'}')" in capsys.readouterr().err


def test_a_4d_file_with_one_volume_is_read_as_that_volume(tmp_path, capsys):
    ct = tmp_path / "ct4d.nrrd"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(_ct_array())]), str(ct))  # size (48, 40, 6, 1)
    assert main(_segment_check_only(tmp_path, ct)) == 0
    assert "ok: CT (48, 40, 6)" in capsys.readouterr().out


def test_a_4d_file_with_several_volumes_says_how_many_and_what_to_give(tmp_path, capsys):
    ct = tmp_path / "phases.nrrd"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(_ct_array())] * 3), str(ct))
    assert main(_segment_check_only(tmp_path, ct)) == 2
    err = capsys.readouterr().err
    assert "4D image holding 3 3D volumes of (48, 40, 6) voxels" in err and "file of its own" in err
