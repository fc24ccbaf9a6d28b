"""DICOM CT input on real series: selection among several series, rescale, geometry, irregular/tilted grids."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from liversam.ct_io import read_ct
from liversam.dicom_series import list_dicom_series, read_dicom_series, select_dicom_series
from liversam.errors import InputImageError


def _copy_with(src: Path, dst: Path, edit=None, files: list[Path] | None = None) -> Path:
    """Copy a series into ``dst``, optionally editing each header with ``edit(ds, index)``."""
    dst.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(files if files is not None else sorted(src.iterdir())):
        if edit is None:
            shutil.copy(path, dst / path.name)
        else:
            ds = pydicom.dcmread(path)
            edit(ds, index)
            ds.save_as(dst / path.name)
    return dst


def test_dcmqi_series_hu_and_geometry(dcmqi_ct: Path) -> None:
    volume = read_dicom_series(dcmqi_ct)
    assert volume.array_kji.shape == (3, 512, 512)
    assert volume.array_kji.dtype == np.int16
    assert not volume.array_kji.flags.writeable
    meta = volume.metadata
    assert meta["modality"] == "CT"
    assert meta["dicom_series_uid"] == "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
    assert meta["dicom_study_uid"].startswith("1.2.392.200103")
    assert len(meta["dicom_files"]) == 3
    # Sorted along +z (the slice normal): 03.dcm (z=-128.69) first.
    assert Path(meta["dicom_files"][0]).name == "03.dcm"
    for k, file in enumerate(meta["dicom_files"]):
        ds = pydicom.dcmread(file)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(volume.geometry.ijk_to_lps((0, 0, k)), ipp, atol=1e-4)
        # Rescale applied: stored * slope + intercept (intercept -1024 here).
        expected = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array_kji[k], expected)
        assert meta["dicom_sop_instance_uids"][k] == ds.SOPInstanceUID
    assert volume.geometry.spacing_mm == pytest.approx((0.810547, 0.810547, 1.0), abs=1e-6)
    np.testing.assert_allclose(volume.geometry.direction_lps, np.eye(3))
    assert volume.array_kji.min() == -3024  # padding -2000 stored, rescaled


def test_matches_simpleitk_series_reader(totalseg_dicom: Path) -> None:
    volume = read_ct(totalseg_dicom)  # ct_io dispatches folders to read_dicom_series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(volume.metadata["dicom_files"])
    image = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.array_kji)
    np.testing.assert_allclose(image.GetOrigin(), volume.geometry.origin_lps, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), volume.geometry.spacing_mm, atol=1e-4)
    assert volume.geometry.size_ijk == (512, 512, 20)
    assert volume.array_kji.dtype == np.int16  # JPEG 2000, unsigned stored + intercept -1024
    assert volume.metadata["dicom_series_uid"] == ""  # anonymised: UIDs blanked


def test_folder_with_two_series(tmp_path: Path, dcmqi_ct: Path, totalseg_dicom: Path) -> None:
    folder = tmp_path / "study"
    _copy_with(totalseg_dicom, folder / "a")
    _copy_with(dcmqi_ct, folder / "b" / "nested")
    series = list_dicom_series(folder)
    assert [s.num_files for s in series] == [20, 3]
    assert all(s.modality == "CT" and s.is_image for s in series)

    default = read_dicom_series(folder)  # most slices wins
    assert default.num_slices == 20
    uid = series[1].series_uid
    by_uid = read_dicom_series(folder, series_uid=uid)
    assert by_uid.num_slices == 3 and by_uid.metadata["dicom_series_uid"] == uid
    by_number = read_dicom_series(folder, series_number=2)
    assert by_number.num_slices == 3
    with pytest.raises(InputImageError, match="No series with SeriesInstanceUID 1.2.3.4") as info:
        read_dicom_series(folder, series_uid="1.2.3.4")
    assert "20 file(s)" in str(info.value) and uid in str(info.value)  # the choices are listed


def test_tie_is_ambiguous_and_lists_choices(tmp_path: Path, dcmqi_ct: Path) -> None:
    folder = tmp_path / "tie"
    _copy_with(dcmqi_ct, folder / "one")

    def other_series(ds, index):
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1.{index + 1}"
        ds.SeriesNumber = 7

    _copy_with(dcmqi_ct, folder / "two", edit=other_series)
    with pytest.raises(InputImageError) as info:
        read_dicom_series(folder)
    message = str(info.value)
    assert "2 CT series with 3 images" in message and "--series-uid" in message
    assert "1.2.826.0.1.3680043.8.498.1" in message and "23430.1" in message
    assert (
        read_dicom_series(folder, series_number=7).metadata["dicom_series_uid"]
        == "1.2.826.0.1.3680043.8.498.1"
    )


def test_non_ct_refused_unless_allowed(tmp_path: Path, dcmqi_ct: Path) -> None:
    folder = _copy_with(dcmqi_ct, tmp_path / "mr", edit=lambda ds, i: setattr(ds, "Modality", "MR"))
    with pytest.raises(InputImageError, match="No CT series.*MR.*allow-non-ct"):
        read_dicom_series(folder)
    volume = read_dicom_series(folder, allow_non_ct=True)
    assert volume.metadata["modality"] == "MR" and volume.num_slices == 3


def test_seg_objects_are_not_image_series(data_dir: Path) -> None:
    folder = data_dir / "dcmqi_ct3slice"  # ct/ plus liver_seg.dcm
    series = list_dicom_series(folder)
    assert {(s.modality, s.is_image) for s in series} == {("CT", True), ("SEG", False)}
    assert select_dicom_series(folder).modality == "CT"
    seg_uid = next(s.series_uid for s in series if s.modality == "SEG")
    with pytest.raises(InputImageError, match="SEG object, not an image series"):
        read_dicom_series(folder, series_uid=seg_uid)


def test_missing_slice_is_an_error_or_resampled(tmp_path: Path, totalseg_dicom: Path) -> None:
    files = sorted(totalseg_dicom.iterdir())
    full = read_dicom_series(totalseg_dicom)
    missing = files[10]  # InstanceNumber 277, z = -786.5
    folder = _copy_with(totalseg_dicom, tmp_path / "gap", files=[f for f in files if f != missing])
    with pytest.raises(
        InputImageError, match="irregular slice spacing.*4.000 mm.*2.000 mm.*--resample-irregular"
    ):
        read_dicom_series(folder)

    resampled = read_dicom_series(folder, resample_irregular=True)
    assert resampled.metadata["dicom_resampled"] is True
    assert resampled.geometry.is_close(full.geometry)
    k_missing = full.metadata["dicom_files"].index(str(totalseg_dicom / missing.name))
    untouched = [k for k in range(full.num_slices) if k != k_missing]
    np.testing.assert_allclose(resampled.array_kji[untouched], full.array_kji[untouched], atol=1e-3)
    neighbours = (full.array_kji[k_missing - 1].astype(float) + full.array_kji[k_missing + 1]) / 2
    np.testing.assert_allclose(resampled.array_kji[k_missing], neighbours, atol=1e-3)


def test_gantry_tilt_is_an_error_or_resampled(tmp_path: Path, dcmqi_ct: Path) -> None:
    # Shear the series as a 20-degree gantry tilt does: each slice 1 mm further in z moves tan(20°) mm in y.
    shift_per_slice = float(np.tan(np.radians(20.0)))

    def tilt(ds, index):
        z = float(ds.ImagePositionPatient[2])
        k = round(-126.69 - z)  # 01.dcm is at -126.69, then -127.69, -128.69
        x, y = float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1])
        ds.ImagePositionPatient = [x, y + k * shift_per_slice, z]
        ds.GantryDetectorTilt = 20

    folder = _copy_with(dcmqi_ct, tmp_path / "tilt", edit=tilt)
    with pytest.raises(
        InputImageError, match="shifted in-plane.*GantryDetectorTilt 20.*--resample-irregular"
    ):
        read_dicom_series(folder)
    volume = read_dicom_series(folder, resample_irregular=True)
    original = read_dicom_series(dcmqi_ct)
    assert volume.geometry.size_ijk == original.geometry.size_ijk
    # The first sorted slice (03.dcm, 2 slices along the tilt) is the grid's origin; the last one (01.dcm)
    # lies 2 * shift mm further along -y relative to it, i.e. rows move by 2 * shift / 0.81 pixels.
    rows_moved = 2 * shift_per_slice / 0.810547
    assert volume.geometry.origin_lps[1] == pytest.approx(-226.8 + 2 * shift_per_slice, abs=1e-3)
    j = 256
    expected = original.array_kji[2, j + int(np.floor(rows_moved))].astype(float)
    got = volume.array_kji[2, j]
    frac = rows_moved - np.floor(rows_moved)
    expected = (1 - frac) * expected + frac * original.array_kji[2, j + int(np.floor(rows_moved)) + 1]
    np.testing.assert_allclose(got, expected, atol=0.5)


def test_errors_name_the_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    with pytest.raises(InputImageError, match=r"No DICOM files found in '.*empty'"):
        read_dicom_series(empty)
    with pytest.raises(InputImageError, match="not found"):
        read_dicom_series(tmp_path / "missing")


def test_a_file_that_may_not_be_read_is_named_not_left_out(tmp_path: Path, totalseg_dicom: Path, monkeypatch) -> None:
    """A series file this user may not read was taken for "not DICOM" and left out: the series was read without it
    (or refused as irregular, with no word of the file). It is now named, with what to do."""
    folder = _copy_with(totalseg_dicom, tmp_path / "series")
    locked = sorted(folder.iterdir())[10]
    read = pydicom.dcmread

    def dcmread(path, *args, **kwargs):
        # (given the file liversam.dicom_files opened, or its path) what a file of mode 000 gives a user without root's
        # override
        if Path(getattr(path, "name", path)) == locked:
            raise PermissionError(13, "Permission denied", str(locked))
        return read(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    for reading in (list_dicom_series, read_dicom_series):
        with pytest.raises(InputImageError, match=rf"'{locked}' cannot be read \(permission denied\).*chmod -R a\+rX"):
            reading(folder)
