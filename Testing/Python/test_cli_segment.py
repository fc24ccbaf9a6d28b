"""``liversam segment``: end to end on real CT, and every kind of bad input fails clearly and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO_ROOT, box_of, cli_model, dice
from liversam.cli import main


def _prompts(path: Path, segments: list[dict], system: str = "IJK") -> Path:
    path.write_text(json.dumps({"coordinate_system": system, "segments": segments}))
    return path


@pytest.fixture(scope="module")
def liver_slice(lits117_label):
    liver = lits117_label > 0
    k = int(liver.sum(axis=(1, 2)).argmax())
    return k, liver[k], box_of(liver[k])


def test_segment_writes_seg_nrrd_and_labelmap_with_ct_geometry(tmp_path, capsys, lits117_ct_path, lits117_label,
                                                                liver_slice, litemedsam_openvino_fp32):
    """Both runs get the session's model (conftest.cli_model: no load and compile of their own; the second run's
    slice comes from the encoder memo, so the two outputs can be compared voxel for voxel); each asked for LiteMedSAM
    with the default ``--accelerate auto``. What auto chooses is tested in test_acceleration.py; test_write_permissions.py
    runs the command with its own model loading (default ``--accelerate auto``) in a process of its own."""
    k, truth, (i0, j0, i1, j1) = liver_slice
    # RAS prompts: the example CT has an identity direction, so RAS = (-x, -y, z) of the voxel centres.
    prompts = _prompts(tmp_path / "p.json", [{"name": "liver", "label": 1, "boxes": [[[-i0, -j0, k], [-i1, -j1, k]]]}],
                       system="RAS")
    seg_out = tmp_path / "out" / "liver.seg.nrrd"
    loads: list[dict] = []
    with cli_model(litemedsam_openvino_fp32, loads):
        assert main(["segment", str(lits117_ct_path), "--prompts", str(prompts), "--output", str(seg_out)]) == 0
    # propagate is off by default: the summary says so (one slice of a liver looked like any other result)
    assert 'voxels, ' in (out := capsys.readouterr().out) and (
        '(its prompted slices only: set "propagate": true to carry it through the volume)' in out
    )
    from liversam.segmentation_io import read_segmentation

    result = read_segmentation(seg_out)
    ct = sitk.ReadImage(str(lits117_ct_path))
    from liversam.geometry import ImageGeometry

    assert result.geometry.is_close(ImageGeometry.from_sitk(ct), tolerance_mm=1e-6)
    (liver,) = result.segments
    assert liver.name == "liver"
    assert dice(liver.mask_kji[k], truth) >= 0.90
    assert liver.mask_kji.sum() == liver.mask_kji[k].sum()  # only the prompted slice without propagation

    labelmap_out = tmp_path / "liver.nii.gz"
    report, lesions = tmp_path / "review.json", tmp_path / "lesions.csv"
    capsys.readouterr()
    with cli_model(litemedsam_openvino_fp32, loads):
        assert main(["segment", str(lits117_ct_path), "--prompts", str(prompts), "--output", str(labelmap_out),
                     "--report", str(report), "--lesions", str(lesions)]) == 0
    assert loads == [{"model": "litemedsam", "device": "auto", "accelerate": "auto"}] * 2
    # the last lines name every file written, so that a user finds the report and the lesion table
    printed = capsys.readouterr().out.splitlines()
    items = json.loads(report.read_text())["items"]
    assert printed[-3].startswith(f"wrote {labelmap_out} (")
    first = str(items[0]["slices"])  # "64" is one slice, "60-64" several
    assert printed[-2].startswith(f"wrote {report} (review report: {len(items)} slice range(s) to check: liver "
                                  f"slice{'s' if '-' in first else ''} {first}")  # fmt: skip
    assert printed[-1] == f"wrote {lesions} (lesion table: 0 lesion(s))"  # no segment inside another here
    labelmap = sitk.ReadImage(str(labelmap_out))
    assert labelmap.GetSize() == ct.GetSize() and labelmap.GetOrigin() == ct.GetOrigin()
    assert labelmap.GetSpacing() == ct.GetSpacing() and labelmap.GetDirection() == ct.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap) == 1, liver.mask_kji)


def _expect_failure(capsys, argv: list[str], output: Path, *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_bad_inputs_fail_with_specific_errors_and_write_nothing(tmp_path, capsys, lits117_ct_path, liver_slice):
    k, _, (i0, j0, i1, j1) = liver_slice
    good = _prompts(tmp_path / "good.json", [{"name": "liver", "boxes": [[[i0, j0, k], [i1, j1, k]]]}])
    out = tmp_path / "result.seg.nrrd"
    ct = str(lits117_ct_path)

    _expect_failure(capsys, ["segment", str(tmp_path / "missing.nii.gz"), "--prompts", str(good), "--output", str(out)],
                    out, "CT not found", "missing.nii.gz")

    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image([64, 64], sitk.sitkInt16), str(flat))
    _expect_failure(capsys, ["segment", str(flat), "--prompts", str(good), "--output", str(out)], out, "2D image", "flat.nrrd")

    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([32, 32, 4], sitk.sitkVectorUInt8, 3), str(rgb))
    _expect_failure(capsys, ["segment", str(rgb), "--prompts", str(good), "--output", str(out)], out, "3 components", "RGB")

    outside = _prompts(tmp_path / "outside.json", [{"name": "liver", "points": [[10, 10, 400]]}])
    _expect_failure(capsys, ["segment", ct, "--prompts", str(outside), "--output", str(out)], out, "outside the volume")

    flat_box = _prompts(tmp_path / "flatbox.json", [{"name": "liver", "boxes": [[[10, 10, k], [10, 50, k]]]}])
    _expect_failure(capsys, ["segment", ct, "--prompts", str(flat_box), "--output", str(out)], out, "zero area")

    unknown_inside = _prompts(tmp_path / "inside.json", [
        {"name": "liver", "boxes": [[[i0, j0, k], [i1, j1, k]]]},
        {"name": "tumor", "inside": "livr", "points": [[60, 60, k]]},
    ])
    _expect_failure(capsys, ["segment", ct, "--prompts", str(unknown_inside), "--output", str(out)], out,
                    "'livr'", "no segment of that name")

    wrong_checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    wrong_checkpoint.write_bytes(b"\x00" * 1024)
    _expect_failure(capsys, ["segment", ct, "--prompts", str(good), "--output", str(out), "--model",
                             f"sam_vit_b={wrong_checkpoint}"], out, "SHA-256", str(wrong_checkpoint))

    _expect_failure(capsys, ["segment", ct, "--prompts", str(good), "--output", str(tmp_path / "result.png")],
                    tmp_path / "result.png", "unsupported file type")
    _expect_failure(capsys, ["segment", ct, "--prompts", str(good), "--output", str(tmp_path / "seg.dcm")],
                    tmp_path / "seg.dcm", "DICOM")


def test_console_entry_point_exit_code(tmp_path):
    out = tmp_path / "x.seg.nrrd"
    proc = subprocess.run(
        [sys.executable, "-m", "liversam", "segment", str(tmp_path / "nope.nrrd"), "--prompts", "p.json", "--output", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT / "LiverSAM"), "PATH": ""},
    )
    assert proc.returncode == 2 and "CT not found" in proc.stderr
    assert not out.exists()
