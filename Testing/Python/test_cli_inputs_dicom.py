"""A new user's DICOM inputs to the command line: one file of the series (or a DICOMDIR) given as the CT, a scout
image inside the series, a series mixing orientations, pixel data no decoder can read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.fileset import FileSet
from pydicom.uid import JPEGLSLossless, generate_uid

from liversam.cli import main
from liversam.dicom_series import read_dicom_series
from liversam.errors import InputImageError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def series(tmp_path: Path, data_dir: Path) -> Path:
    """A copy of the real 3-slice dcmqi CT series (512 x 512, axial)."""
    return Path(shutil.copytree(data_dir / "dcmqi_ct3slice" / "ct", tmp_path / "series"))


def _prompts(path: Path) -> Path:
    box = [[[150, 150, 1], [300, 300, 1]]]
    path.write_text(json.dumps({"coordinate_system": "IJK", "segments": [{"name": "liver", "boxes": box}]}))
    return path


def _check_only(tmp_path: Path, ct: Path, output: Path, *extra: str) -> list[str]:
    prompts = _prompts(tmp_path / "prompts.json")
    return ["segment", str(ct), "--prompts", str(prompts), "--output", str(output), "--check-only", *extra]


def _add_image(
    folder: Path, source: Path, name: str, orientation: list[float], position: list[float]
) -> Path:
    """A copy of ``source`` in the same series with another orientation (a scout not tagged LOCALIZER)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageOrientationPatient = orientation
    ds.ImagePositionPatient = position
    ds.save_as(folder / name)
    return folder / name


SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]


def test_one_dicom_file_as_the_ct_reads_its_series(tmp_path, series, capsys):
    one_file = series / "02.dcm"
    assert main(_check_only(tmp_path, one_file, tmp_path / "out" / "liver.seg.nrrd")) == 0
    assert "ok: CT (512, 512, 3)" in capsys.readouterr().out
    # A DICOM SEG can reference that series, and the folder of the file stays out of bounds for outputs.
    assert main(_check_only(tmp_path, one_file, tmp_path / "out" / "liver.dcm")) == 0
    assert main(_check_only(tmp_path, one_file, series / "liver.seg.nrrd")) == 2
    assert "inside the input folder" in capsys.readouterr().err


def test_a_dicomdir_as_the_ct_reads_the_series_it_lists(tmp_path, series, capsys):
    fileset = FileSet()
    for path in sorted(series.iterdir()):
        fileset.add(pydicom.dcmread(path))
    media = tmp_path / "media"
    fileset.write(media)
    assert main(_check_only(tmp_path, media / "DICOMDIR", tmp_path / "liver.seg.nrrd")) == 0
    assert "ok: CT (512, 512, 3)" in capsys.readouterr().out


def test_export_with_one_dicom_file_as_reference_ct_writes_a_dicom_seg(tmp_path, series, data_dir, capsys):
    output = tmp_path / "liver_seg.dcm"
    segmentation = data_dir / "dcmqi_ct3slice" / "liver_seg.nrrd"
    assert (
        main(["export", str(segmentation), "--reference-ct", str(series / "01.dcm"), "--output", str(output)])
        == 0
    )
    seg = pydicom.dcmread(output)
    assert seg.Modality == "SEG"
    referenced = {item.ReferencedSOPInstanceUID for item in seg.PerFrameFunctionalGroupsSequence[0]
                  .DerivationImageSequence[0].SourceImageSequence}  # fmt: skip
    series_uids = {pydicom.dcmread(p).SOPInstanceUID for p in series.iterdir()}
    assert referenced <= series_uids


def test_a_scout_in_the_series_without_localizer_tag_is_set_aside_by_name(series, caplog):
    _add_image(series, series / "01.dcm", "scout.dcm", SAGITTAL, [0.0, -250.0, 0.0])
    volume = read_dicom_series(series)
    assert volume.array_kji.shape == (3, 512, 512)
    assert all(Path(f).name != "scout.dcm" for f in volume.metadata["dicom_files"])
    assert "'scout.dcm' (sagittal)" in caplog.text


def test_a_series_mixing_axial_and_coronal_images_names_both_and_no_series_option(series):
    for index in range(3):
        _add_image(series, series / "01.dcm", f"coronal{index}.dcm", CORONAL, [0.0, float(index), 0.0])
    with pytest.raises(InputImageError) as error:
        read_dicom_series(series)
    message = str(error.value)
    assert "3 axial image(s)" in message and "3 coronal image(s)" in message
    assert "--series-uid" not in message  # one series: choosing another series cannot help


def test_undecodable_pixel_data_gives_one_message_with_the_transfer_syntax_and_no_traceback(tmp_path, series):
    for path in series.iterdir():  # raw pixel data labelled JPEG-LS: no decoder can read it
        ds = pydicom.dcmread(path)
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.save_as(path, enforce_file_format=True)
    argv = _check_only(tmp_path, series, tmp_path / "liver.seg.nrrd", "--accelerate", "plain")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "LiverSAM"), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run([sys.executable, "-m", "liversam", *argv], capture_output=True, text=True, env=env)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "transfer syntax JPEG-LS Lossless" in run.stderr
    assert "decompress the series" in run.stderr
    assert np.sum([line.startswith("liversam segment: error:") for line in run.stderr.splitlines()]) == 1


def test_a_series_a_dicom_seg_cannot_reference_is_refused_before_the_model_runs(tmp_path, series, capsys, monkeypatch):
    """An anonymised copy with its UIDs blanked: --check-only said "outputs writable", and a real run propagated
    through the whole CT before refusing to write (and dropped the --report and --lesions it had made too)."""
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ""
        ds.save_as(path)
    output = tmp_path / "seg.dcm"
    assert main(_check_only(tmp_path, series, output)) == 2
    err = capsys.readouterr().err
    assert "lacks the UIDs a DICOM SEG must reference (SOPInstanceUID empty in 3 file(s))" in err
    assert ".seg.nrrd or .nii.gz instead" in err

    import liversam.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for an output that cannot be written")

    monkeypatch.setattr(liversam.models, "load_model", no_model)
    argv = _check_only(tmp_path, series, output, "--report", str(tmp_path / "review.json"))
    assert main(argv[: argv.index("--check-only")] + argv[argv.index("--check-only") + 1 :]) == 2
    assert "lacks the UIDs" in capsys.readouterr().err
    assert not output.exists() and not (tmp_path / "review.json").exists()


def test_check_only_accepts_a_dicom_seg_of_a_series_it_can_reference(tmp_path, series, capsys):
    assert main(_check_only(tmp_path, series, tmp_path / "seg.dcm")) == 0
    assert "outputs writable" in capsys.readouterr().out
