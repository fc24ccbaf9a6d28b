"""DICOM files cut short (an interrupted copy or download) among a series, made from copies of the real dcmqi and
TotalSegmentator series.

pydicom reads a file cut short without a word: it returns the elements before the cut. Before, such a file was left out
of its series (no data set, no SeriesInstanceUID, no Rows: "not an image") and, when it was an end slice, the series
was read a slice short and "ok": a clinically wrong volume. Now it is refused, naming the file and what to do. When
its header still names its series, only that series is refused: another series of the folder is read, with a warning
naming the damaged file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset

from liversam.cli import main
from liversam.dicom_files import DamagedDicomFileError, dicom_kind, read_dicom_file
from liversam.dicom_series import list_dicom_series, read_dicom_series
from liversam.errors import InputImageError
from liversam.segmentation_io import read_segmentation


def _end_files(folder: Path) -> list[Path]:
    """The series' first and last files along the slice normal (the ones whose loss leaves no gap)."""
    files = read_dicom_series(folder).metadata["dicom_files"]
    return [Path(files[0]), Path(files[-1])]


def _element_start(path: Path, keyword: str) -> int:
    """The byte offset of the element ``keyword`` (its tag) in ``path`` (explicit VR, a 2-byte length)."""
    return pydicom.dcmread(path, stop_before_pixels=True).get_item(keyword).value_tell - 8


def _data_set_start(path: Path) -> int:
    """The byte offset of the data set: after the preamble, prefix and File Meta group (its group length says)."""
    return 132 + 12 + int(pydicom.dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength)


# Where the file is cut, and what the old code did with the series then (an end slice cut so was left out silently).
CUTS = {
    "after-its-file-meta": _data_set_start,  # no data set: "not DICOM"
    "before-its-rows": lambda p: _element_start(p, "Rows"),  # no Rows: "not an image"
    "inside-its-image-position": lambda p: _element_start(p, "ImagePositionPatient") + 8 + 5,
}


@pytest.mark.parametrize("end", [0, -1], ids=["first-slice", "last-slice"])
@pytest.mark.parametrize("cut", list(CUTS), ids=list(CUTS))
def test_an_end_slice_cut_inside_its_header_is_refused_naming_it(tmp_path, totalseg_dicom, end, cut, capsys) -> None:
    """Before, the series was read with 19 of its 20 slices and no word (the other 19 form a regular grid)."""
    folder = tmp_path / "series"
    shutil.copytree(totalseg_dicom, folder)
    damaged = folder / _end_files(totalseg_dicom)[end].name
    size = CUTS[cut](damaged)
    damaged.write_bytes(damaged.read_bytes()[:size])

    with pytest.raises(InputImageError) as caught:
        read_dicom_series(folder)
    message = str(caught.value)
    assert isinstance(caught.value, DamagedDicomFileError)
    assert f"'{damaged}' is a damaged DICOM file" in message and "cut short" in message
    assert "Replace it with a complete copy" in message and "a slice short" in message

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"coordinate_system": "IJK", "segments": [{"name": "liver", "boxes": [
        [[100, 100, 1], [300, 300, 1]]]}]}))  # fmt: skip
    argv = ["segment", str(folder), "--prompts", str(prompts), "--output", str(tmp_path / "liver.nii.gz")]
    assert main([*argv, "--check-only"]) == 2
    captured = capsys.readouterr()
    assert damaged.name in captured.err and "damaged DICOM file" in captured.err and "Traceback" not in captured.err


def test_a_slice_cut_inside_its_series_uid_is_not_read_as_another_series(tmp_path, dcmqi_ct) -> None:
    """Cut inside its SeriesInstanceUID, the last slice made a series of its own (no UID, no image): the CT was read
    with 2 of its 3 slices."""
    folder = tmp_path / "series"
    shutil.copytree(dcmqi_ct, folder)
    damaged = folder / _end_files(dcmqi_ct)[-1].name
    damaged.write_bytes(damaged.read_bytes()[: _element_start(damaged, "SeriesInstanceUID") + 8 + 10])
    with pytest.raises(DamagedDicomFileError, match="ends inside its element .0020,000E. SeriesInstanceUID"):
        list_dicom_series(folder)
    with pytest.raises(DamagedDicomFileError, match=f"'{damaged}'"):  # one of its files given as the CT
        read_dicom_series(folder / "02.dcm")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, on the values cut in two
@pytest.mark.parametrize("series", ["dcmqi", "totalseg"])
def test_every_cut_inside_a_slice_header_is_told(tmp_path, dcmqi_ct, totalseg_dicom, series) -> None:
    """Each cut between the "DICM" prefix and the pixel data (every 3rd byte), whatever element it falls in or between:
    the header read while listing the series refuses the file. The whole header (cut after it) is read."""
    source = _end_files(dcmqi_ct if series == "dcmqi" else totalseg_dicom)[-1]
    data = source.read_bytes()
    pixels = data.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    cut = tmp_path / "cut.dcm"
    told = []
    for size in range(132, pixels, 3):
        cut.write_bytes(data[:size])
        try:
            read_dicom_file(cut, stop_before_pixels=True)
        except DamagedDicomFileError:
            told.append(size)
    assert told == list(range(132, pixels, 3))
    cut.write_bytes(data[: pixels + 12])  # the header whole, the pixel data cut
    if series == "dcmqi":  # native pixel data: its length runs past the end of the file, told by the header's reading
        with pytest.raises(DamagedDicomFileError, match=r"ends inside its element \(7FE0,0010\) PixelData") as caught:
            read_dicom_file(cut, stop_before_pixels=True)
        assert caught.value.dataset.Rows == 512  # the header read before the damage, for its series to be known
    else:  # JPEG 2000 (encapsulated: no length) : the listing reads the header ...
        assert read_dicom_file(cut, stop_before_pixels=True).Rows == 512
    with pytest.raises(DamagedDicomFileError, match=f"'{cut}' is a damaged DICOM file"):  # ... reading it does not
        read_dicom_file(cut)


def test_a_slice_cut_inside_its_pixel_data_is_named_as_cut_short(tmp_path, dcmqi_ct) -> None:
    """Before, its pixel data went to GDCM after pydicom, and the message spoke of decoders."""
    folder = tmp_path / "series"
    shutil.copytree(dcmqi_ct, folder)
    damaged = folder / "03.dcm"
    damaged.write_bytes(damaged.read_bytes()[:300_000])
    with pytest.raises(DamagedDicomFileError, match=r"ends inside its element \(7FE0,0010\) PixelData") as caught:
        read_dicom_series(folder)
    assert f"'{damaged}'" in str(caught.value) and "decoder" not in str(caught.value)


def test_a_slice_without_preamble_cut_short_is_refused_when_it_names_its_image_class(tmp_path, dcmqi_ct) -> None:
    """Without the "DICM" prefix, a file is taken for a damaged DICOM file only when it names an image SOP class (it
    was parsed as one); bytes that only start like a data element are left out as before (they may be anything)."""
    folder = tmp_path / "series"
    shutil.copytree(dcmqi_ct, folder)
    ds = pydicom.dcmread(folder / "03.dcm")
    ds.preamble, ds.file_meta = None, FileMetaDataset()
    pydicom.dcmwrite(folder / "03.dcm", ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    data = (folder / "03.dcm").read_bytes()
    (folder / "03.dcm").write_bytes(data[: data.index(b"\x20\x00\x32\x00")])  # before (0020,0032) ImagePosition
    assert dicom_kind(folder / "03.dcm") == "bare"
    with pytest.raises(DamagedDicomFileError, match="it is a CT Image Storage object but the file ends before its "
                                                    "pixel data"):  # fmt: skip
        read_dicom_series(folder)
    (folder / "03.dcm").unlink()
    (folder / "looks_like_dicom.bin").write_bytes(b"\x08\x00\x05\x00\x0a\x00\x00\x00" + bytes(range(200)))
    assert dicom_kind(folder / "looks_like_dicom.bin") == "bare"
    assert [p.name for p in list_dicom_series(folder)[0].files] == ["01.dcm", "02.dcm"]


def test_a_dicom_seg_cut_short_is_refused_as_damaged(tmp_path, data_dir) -> None:
    seg = tmp_path / "liver_seg.dcm"
    seg.write_bytes((data_dir / "dcmqi_ct3slice" / "liver_seg.dcm").read_bytes()[:5000])
    reference = read_dicom_series(data_dir / "dcmqi_ct3slice" / "ct").geometry
    with pytest.raises(InputImageError, match=f"'{seg}' is a damaged DICOM file: the file ends inside its element "
                                              r"\(7FE0,0010\) PixelData"):  # fmt: skip
        read_segmentation(seg, reference=reference)


# --- a damaged file of another series (a PACS export with a cut file of a series the user does not read) -----------


def _two_series(tmp_path: Path, totalseg_dicom: Path, dcmqi_ct: Path) -> tuple[Path, str, str]:
    """(a folder with copies of both series, the TotalSegmentator copy's SeriesInstanceUID, the dcmqi one's). The
    TotalSegmentator series has no SeriesInstanceUID (anonymised): its copy gets one, so that it can be named."""
    from pydicom.uid import generate_uid

    folder = tmp_path / "export"
    shutil.copytree(dcmqi_ct, folder / "dcmqi")
    (folder / "totalseg").mkdir()
    totalseg_uid = generate_uid()
    for source in sorted(totalseg_dicom.iterdir()):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = totalseg_uid
        ds.save_as(folder / "totalseg" / source.name, enforce_file_format=True)
    dcmqi_uid = str(pydicom.dcmread(folder / "dcmqi" / "01.dcm", stop_before_pixels=True).SeriesInstanceUID)
    return folder, totalseg_uid, dcmqi_uid


def _check_only(tmp_path: Path, ct: Path, *options: str) -> list[str]:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"coordinate_system": "IJK", "segments": [{"name": "liver", "boxes": [
        [[100, 100, 1], [300, 300, 1]]]}]}))  # fmt: skip
    return ["segment", str(ct), "--prompts", str(prompts), "--output", str(tmp_path / "liver.nii.gz"), *options,
            "--check-only"]  # fmt: skip


# a dcmqi slice cut in its pixel data (most cuts: the header whole) or inside its header, after its SeriesInstanceUID
CUTS_AFTER_THE_SERIES_UID = {
    "in-its-pixel-data": lambda p: 300_000,
    "inside-its-image-position": lambda p: _element_start(p, "ImagePositionPatient") + 8 + 5,
}


@pytest.mark.parametrize("cut", list(CUTS_AFTER_THE_SERIES_UID), ids=list(CUTS_AFTER_THE_SERIES_UID))
def test_a_damaged_file_of_another_series_leaves_the_good_series_readable(tmp_path, totalseg_dicom, dcmqi_ct, cut,
                                                                         caplog, capsys) -> None:  # fmt: skip
    """Before, a cut inside the header refused the whole folder (even with --series-uid naming the good series), and
    a cut in the pixel data left the other series' reading without a word about the damaged file."""
    folder, totalseg_uid, dcmqi_uid = _two_series(tmp_path, totalseg_dicom, dcmqi_ct)
    damaged = folder / "dcmqi" / "03.dcm"
    damaged.write_bytes(damaged.read_bytes()[: CUTS_AFTER_THE_SERIES_UID[cut](damaged)])

    listed = {info.series_uid: info for info in list_dicom_series(folder)}
    assert [d.path for d in listed[dcmqi_uid].damaged] == [damaged] and len(listed[dcmqi_uid].files) == 2
    assert "1 DAMAGED file(s)" in listed[dcmqi_uid].describe() and not listed[totalseg_uid].damaged

    for options in ({}, {"series_uid": totalseg_uid}):  # the automatic choice (the CT with the most slices), named
        caplog.clear()
        volume = read_dicom_series(folder, **options)
        assert volume.metadata["dicom_series_uid"] == totalseg_uid and volume.geometry.size_ijk[2] == 20
        left_out = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "left out" in r.getMessage()]
        assert len(left_out) == 1 and f"'{damaged}'" in left_out[0], caplog.text

    with pytest.raises(DamagedDicomFileError, match=f"'{damaged}' is a damaged DICOM file") as caught:
        read_dicom_series(folder, series_uid=dcmqi_uid)
    assert f"Its header names series {dcmqi_uid}" in str(caught.value) and "a slice short" in str(caught.value)
    with pytest.raises(DamagedDicomFileError, match=f"'{damaged}'"):  # one of its whole files given as the CT
        read_dicom_series(folder / "dcmqi" / "01.dcm")

    assert main(_check_only(tmp_path, folder)) == 0
    assert main(_check_only(tmp_path, folder, "--series-uid", totalseg_uid)) == 0
    capsys.readouterr()
    assert main(_check_only(tmp_path, folder, "--series-uid", dcmqi_uid)) == 2
    err = capsys.readouterr().err
    assert str(damaged) in err and "damaged DICOM file" in err and "Traceback" not in err


def test_a_file_of_another_series_cut_before_its_series_uid_still_refuses_the_folder(tmp_path, totalseg_dicom,
                                                                                    dcmqi_ct, capsys) -> None:  # fmt: skip
    """Its series cannot be told: it may be a slice of the series read (which would be read a slice short)."""
    folder, totalseg_uid, _ = _two_series(tmp_path, totalseg_dicom, dcmqi_ct)
    damaged = folder / "dcmqi" / "03.dcm"
    damaged.write_bytes(damaged.read_bytes()[: _element_start(damaged, "SeriesInstanceUID") + 8 + 10])
    with pytest.raises(DamagedDicomFileError, match="A DICOM folder is not read with a damaged file in it"):
        list_dicom_series(folder)
    with pytest.raises(DamagedDicomFileError, match=f"'{damaged}'"):
        read_dicom_series(folder, series_uid=totalseg_uid)
    assert main(_check_only(tmp_path, folder, "--series-uid", totalseg_uid)) == 2
    err = capsys.readouterr().err
    assert str(damaged) in err and "damaged DICOM file" in err and "Traceback" not in err


def test_a_damaged_file_counts_toward_its_series_in_the_automatic_choice(tmp_path, dcmqi_ct) -> None:
    """The series that lost a file to the damage is still the largest: it is chosen and refused naming the file, not
    a smaller series read in its place without a word; a tie it makes with a whole series is refused as any tie."""
    from pydicom.uid import generate_uid

    folder = tmp_path / "export"
    shutil.copytree(dcmqi_ct, folder / "a")
    (folder / "b").mkdir()
    other_uid = generate_uid()
    for name in ("01.dcm", "02.dcm"):  # series b: 2 whole slices
        ds = pydicom.dcmread(dcmqi_ct / name)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = other_uid, generate_uid()
        ds.save_as(folder / "b" / name, enforce_file_format=True)
    damaged = folder / "a" / "03.dcm"  # series a: 2 whole slices and a damaged one
    damaged.write_bytes(damaged.read_bytes()[: _element_start(damaged, "Rows")])

    with pytest.raises(DamagedDicomFileError, match=f"'{damaged}' is a damaged DICOM file.*Its header names series"):
        read_dicom_series(folder)
    assert read_dicom_series(folder, series_uid=other_uid).geometry.size_ijk[2] == 2

    ds = pydicom.dcmread(dcmqi_ct / "03.dcm")  # series b: 3 whole slices, as many as a with its damaged one
    ds.SeriesInstanceUID, ds.SOPInstanceUID = other_uid, generate_uid()
    ds.save_as(folder / "b" / "03.dcm", enforce_file_format=True)
    with pytest.raises(InputImageError, match="holds 2 CT series with 3 images each") as caught:
        read_dicom_series(folder)
    assert "2 file(s) + 1 DAMAGED file(s)" in str(caught.value)


# --- intact files whose pixel data length is not "what is left of the file" are never taken for damaged --------------


def _intact(ds: pydicom.Dataset, path: Path, syntax: str, **write) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    if write:  # written in another encoding than its File Meta names (the File Meta is kept as it is)
        pydicom.dcmwrite(path, ds, force_encoding=True, **write)
    else:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _small(ds: pydicom.Dataset, size: int = 64) -> pydicom.Dataset:
    """``ds`` cut to its top-left ``size`` x ``size`` pixels (a pixel data element shorter than 22,351 bytes)."""
    pixels = ds.pixel_array[:size, :size].copy()
    ds.Rows, ds.Columns, ds.PixelData = size, size, pixels.tobytes()
    return ds


def _with_elements_after_pixel_data(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.add_new(0x7FE10010, "LO", "PRIVATE")  # a private element after the pixel data
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 64)  # Data Set Trailing Padding
    return ds


def _float_pixel_data(ds: pydicom.Dataset) -> pydicom.Dataset:
    import numpy as np

    values = ds.pixel_array.astype(np.float32)
    del ds.PixelData
    ds.add_new(0x7FE00008, "OF", values.tobytes())  # Float Pixel Data (a parametric map's)
    ds.BitsAllocated = 32
    return ds


def _odd_unpadded(path: Path) -> Path:
    """``path`` (explicit VR little endian, 8-bit pixel data of an odd length, padded) with its pad byte dropped and
    its length odd: not conformant, written so by some software, and whole."""
    data = path.read_bytes()
    at = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010), its VR (OB or OW), 2 reserved bytes, its length
    assert data[at + 4 : at + 8] in (b"OB\0\0", b"OW\0\0")
    length = int.from_bytes(data[at + 8 : at + 12], "little")
    path.write_bytes(data[: at + 8] + (length - 1).to_bytes(4, "little") + data[at + 12 : -1])
    return path


def _odd_8bit(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 3, 3, 8, 8, 7, 0
    ds.PixelData = bytes(range(9))
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        delattr(ds, keyword)
    return ds


INTACT_LAYOUTS = {
    # the data set deflated: the file's position after reading it tells nothing of the pixel data (it was "cut")
    "deflated": lambda ds, p: _intact(ds, p, pydicom.uid.DeflatedExplicitVRLittleEndian),
    # File Meta says implicit VR, the data set is explicit (pydicom reads it as it is): "OW\0\0" was taken for a length
    "meta-implicit-data-explicit": lambda ds, p: _intact(
        _small(ds), p, pydicom.uid.ImplicitVRLittleEndian, implicit_vr=False, little_endian=True
    ),
    "meta-explicit-data-implicit": lambda ds, p: _intact(
        _small(ds), p, pydicom.uid.ExplicitVRLittleEndian, implicit_vr=True, little_endian=True
    ),
    "elements-after-pixel-data": lambda ds, p: _intact(
        _with_elements_after_pixel_data(ds), p, pydicom.uid.ExplicitVRLittleEndian
    ),
    "elements-after-pixel-data-implicit": lambda ds, p: _intact(
        _with_elements_after_pixel_data(ds), p, pydicom.uid.ImplicitVRLittleEndian
    ),
    "trailing-zero-bytes": lambda ds, p: p.write_bytes(
        _intact(ds, p, pydicom.uid.ExplicitVRLittleEndian).read_bytes() + b"\0" * 1000
    ) and p,
    "float-pixel-data": lambda ds, p: _intact(_float_pixel_data(ds), p, pydicom.uid.ExplicitVRLittleEndian),
    "odd-length-unpadded": lambda ds, p: _odd_unpadded(_intact(_odd_8bit(ds), p, pydicom.uid.ExplicitVRLittleEndian)),
    "rle-compressed": lambda ds, p: (ds.compress(pydicom.uid.RLELossless, encoding_plugin="pydicom"),
                                     _intact(ds, p, pydicom.uid.RLELossless))[1],  # fmt: skip
}


@pytest.mark.parametrize("layout", list(INTACT_LAYOUTS), ids=list(INTACT_LAYOUTS))
# the mislabelled layouts: pydicom says it reads them in the VR it finds, which is what they are there for
@pytest.mark.filterwarnings("ignore:Expected (implicit|explicit) VR, but found:UserWarning")
def test_an_intact_file_whose_pixel_data_is_not_the_rest_of_the_file_is_not_taken_for_damaged(tmp_path, dcmqi_ct,
                                                                                              layout) -> None:  # fmt: skip
    """A false "damaged" refuses a good series. Before, a deflated CT slice ("ends before its pixel data": the file had
    been read whole to inflate it) and a small image whose File Meta names implicit VR over an explicit data set (the
    VR "OW" read as a length of 22,351 bytes) were refused as cut short."""
    path = INTACT_LAYOUTS[layout](pydicom.dcmread(dcmqi_ct / "01.dcm"), tmp_path / "slice.dcm")
    header = read_dicom_file(path, stop_before_pixels=True)
    assert header is not None and header.Rows >= 3
    whole = read_dicom_file(path)
    assert whole.pixel_array.size == whole.Rows * whole.Columns


def test_a_deflated_series_is_read(tmp_path, dcmqi_ct) -> None:
    """Before, each deflated slice was refused as cut short before its pixel data: the folder was not read."""
    folder = tmp_path / "deflated"
    folder.mkdir()
    for source in sorted(dcmqi_ct.iterdir()):
        _intact(pydicom.dcmread(source), folder / source.name, pydicom.uid.DeflatedExplicitVRLittleEndian)
    (series,) = list_dicom_series(folder)
    assert series.num_files == 3 and not series.damaged
    volume = read_dicom_series(folder)
    original = read_dicom_series(dcmqi_ct)
    assert volume.geometry.size_ijk == original.geometry.size_ijk
    assert (volume.array_kji == original.array_kji).all()
