"""The upload fields' inputs made ready to open (``liversam_web.uploads``), without a browser: a .zip of a DICOM
series is unpacked (and refused, with what to do, when it is empty, damaged or holds a path that leaves its folder);
one DICOM slice alone is told apart from a CT file, a multi-frame file and a DICOM SEG."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from web_page import DATA

from liversam_web.mrml_scene import InputError
from liversam_web.uploads import is_zip, lone_dicom_slice, lone_slice_message, unpack_zip

SERIES = DATA / "totalseg_small" / "ct_dicom"


def series_files() -> list[Path]:
    if not SERIES.is_dir():
        pytest.fail(f"the TotalSegmentator DICOM series is not at {SERIES}: set LIVERSAM_TEST_DATA (see README)")
    return sorted(SERIES.iterdir())


def test_a_zip_of_a_series_folder_unpacks_to_its_files(tmp_path: Path) -> None:
    files = series_files()
    archive = tmp_path / "upload" / "ct_dicom.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in files:
            zipped.write(path, f"ct_dicom/{path.name}")
        zipped.writestr("ct_dicom/.DS_Store", b"finder")  # hidden files and macOS' folder are left out
        zipped.writestr("__MACOSX/ct_dicom/._x", b"resource fork")
    assert is_zip(archive)
    unpacked = unpack_zip(archive, tmp_path / "out", "ct_dicom.zip")
    assert [Path(p).name for p in unpacked] == [p.name for p in files]
    assert all(Path(p).parent == tmp_path / "out" / "ct_dicom" for p in unpacked)
    assert Path(unpacked[0]).read_bytes() == files[0].read_bytes()
    assert not is_zip(files[0]) and not is_zip(DATA / "lits117" / "ct.nii.gz")


def test_a_zip_that_cannot_be_opened_is_refused_with_what_to_do(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zipped:
        zipped.writestr("series/01.dcm", b"x")
        zipped.writestr("../../outside.dcm", b"x")
    with pytest.raises(InputError, match=r"'evil\.zip' holds a file outside its folder \('\.\./\.\./outside\.dcm'\)"):
        unpack_zip(evil, tmp_path / "out", "evil.zip")
    assert not (tmp_path / "outside.dcm").exists() and not (tmp_path / "out").exists()  # nothing written

    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zipped:
        zipped.writestr("series/", b"")
    with pytest.raises(InputError, match=r"'empty\.zip' holds no file"):
        unpack_zip(empty, tmp_path / "out2", "empty.zip")

    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    assert is_zip(damaged)  # by its name: it gets the archive's message, not "not an image"
    with pytest.raises(InputError, match=r"'damaged\.zip' could not be unpacked .*damaged or not a zip"):
        unpack_zip(damaged, tmp_path / "out3", "damaged.zip")


def test_one_dicom_slice_alone_is_told_apart() -> None:
    files = series_files()
    assert lone_dicom_slice(files[0])  # one CT image of a 20-slice series
    assert not lone_dicom_slice(DATA / "lits117" / "ct.nii.gz")  # a CT file
    assert not lone_dicom_slice(DATA / "dcmqi_ct3slice" / "liver_seg.dcm")  # a DICOM SEG: no image of a series
    message = lone_slice_message(files[0].name)
    assert files[0].name in message and "one slice of a DICOM series" in message
    assert "all its files" in message and "Upload a DICOM folder" in message and ".zip" in message


def test_a_multi_frame_dicom_file_is_no_lone_slice(tmp_path: Path) -> None:
    """An enhanced CT holds the whole volume in one file: it is opened, not refused as one slice."""
    import pydicom

    header = pydicom.dcmread(series_files()[0])
    header.NumberOfFrames = 20
    path = tmp_path / "enhanced.dcm"
    header.save_as(path)
    assert not lone_dicom_slice(path)


def test_an_archive_that_cannot_be_unpacked_here_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    """A zip holding a file 'a' and a file 'a/b.dcm' (or a full disk): the OSError escaped, the page said nothing and
    the files unpacked so far stayed. A name with a drive letter in a later part ('series/C:x.dcm', outside the folder
    on Windows) is refused like one in the first part."""
    archive = tmp_path / "clash.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("series/a", b"first")
        zipped.writestr("series/a/b.dcm", b"second")
    with pytest.raises(InputError, match=r"could not be unpacked on the app's machine .*one file per name"):
        unpack_zip(archive, tmp_path / "out", "clash.zip")
    assert not (tmp_path / "out").exists()
    drive = tmp_path / "drive.zip"
    with zipfile.ZipFile(drive, "w") as zipped:
        zipped.writestr("series/C:x.dcm", b"x")
    with pytest.raises(InputError, match="outside its folder"):
        unpack_zip(drive, tmp_path / "out2", "drive.zip")
    assert not (tmp_path / "out2").exists()
