"""DICOM files without the 128-byte preamble and "DICM" prefix, with or without the File Meta group (older archives,
ACR-NEMA style files, some PACS and CD exports), made from copies of the real dcmqi and TotalSegmentator series.

Before, the core took them for "not DICOM": a folder of them gave "No DICOM files found", and a series with only
some of them was read without those slices and without a word (an end slice missing is no irregular gap)."""

from __future__ import annotations

import gzip
import json
import shutil
import zipfile
from pathlib import Path

import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset

from liversam.cli import main
from liversam.dicom_files import dicom_kind
from liversam.dicom_seg import read_dicom_seg, write_dicom_seg
from liversam.dicom_series import list_dicom_series, read_dicom_series
from liversam.errors import InputImageError
from liversam.image_integrity import DICOM, sniff_image_format
from liversam.segmentation import Segment, SegmentationResult
from liversam.segmentation_io import read_segmentation
from liversam.volume import CTVolume


def _strip(source: Path, target: Path, file_meta: bool = True, explicit_vr: bool = False) -> Path:
    """``source`` written to ``target`` without preamble and prefix; with ``file_meta=False`` without the File Meta
    group too (then uncompressed, in implicit VR unless ``explicit_vr``: nothing would name a codec)."""
    ds = pydicom.dcmread(source)
    ds.preamble = None
    if file_meta:
        pydicom.dcmwrite(target, ds, enforce_file_format=False)
    else:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        ds.file_meta = FileMetaDataset()
        pydicom.dcmwrite(target, ds, enforce_file_format=False, implicit_vr=not explicit_vr, little_endian=True)
    start = target.read_bytes()[:132]
    assert start[128:132] != b"DICM" and start[:2] == (b"\x02\x00" if file_meta else b"\x08\x00")
    return target


def _copy_series(source: Path, target: Path, stripped: set[str] | None = None, **strip_options) -> Path:
    """A copy of the series in ``source``: the files named in ``stripped`` (all when None) without preamble."""
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if stripped is None or path.name in stripped:
            _strip(path, target / path.name, **strip_options)
        else:
            shutil.copy(path, target / path.name)
    return target


def _assert_same_volume(volume: CTVolume, original: CTVolume) -> None:
    assert volume.array_kji.dtype == original.array_kji.dtype
    np.testing.assert_array_equal(volume.array_kji, original.array_kji)
    geometry, expected = volume.geometry, original.geometry
    assert geometry.size_ijk == expected.size_ijk
    assert geometry.spacing_mm == expected.spacing_mm and geometry.origin_lps == expected.origin_lps
    np.testing.assert_array_equal(geometry.direction_lps, expected.direction_lps)
    assert [Path(f).name for f in volume.metadata["dicom_files"]] == [
        Path(f).name for f in original.metadata["dicom_files"]
    ]


@pytest.fixture(scope="module")
def dcmqi_volume(dcmqi_ct: Path) -> CTVolume:
    return read_dicom_series(dcmqi_ct)


@pytest.fixture(scope="module")
def totalseg_volume(totalseg_dicom: Path) -> CTVolume:
    return read_dicom_series(totalseg_dicom)  # JPEG 2000 lossless, 20 slices


@pytest.mark.parametrize(
    "options",
    [{"file_meta": True}, {"file_meta": False}, {"file_meta": False, "explicit_vr": True}],
    ids=["file-meta", "no-file-meta-implicit-vr", "no-file-meta-explicit-vr"],
)
def test_series_without_preamble_reads_as_the_original(tmp_path, dcmqi_ct, dcmqi_volume, options) -> None:
    folder = _copy_series(dcmqi_ct, tmp_path / "bare", **options)
    assert all(sniff_image_format(p) == DICOM for p in folder.iterdir())
    _assert_same_volume(read_dicom_series(folder), dcmqi_volume)


@pytest.mark.parametrize("file_meta", [True, False], ids=["file-meta-jpeg2000", "no-file-meta-decompressed"])
def test_compressed_series_without_preamble_reads_as_the_original(
    tmp_path, totalseg_dicom, totalseg_volume, file_meta
) -> None:
    _assert_same_volume(read_dicom_series(_copy_series(totalseg_dicom, tmp_path / "bare", file_meta=file_meta)),
                        totalseg_volume)  # fmt: skip


@pytest.mark.parametrize("slices", [(0, -1), (9,)], ids=["end-slices", "a-middle-slice"])
def test_a_series_with_some_files_without_preamble_keeps_every_slice(
    tmp_path, totalseg_dicom, totalseg_volume, slices
) -> None:
    """Before, the end slices were left out without a word (18 slices, "ok"); a middle one made an irregular gap."""
    files = totalseg_volume.metadata["dicom_files"]
    stripped = {Path(files[k]).name for k in slices}
    folder = _copy_series(totalseg_dicom, tmp_path / "mixed", stripped=stripped, file_meta=True)
    _assert_same_volume(read_dicom_series(folder), totalseg_volume)


def test_non_dicom_files_beside_the_series_are_not_taken_for_slices(
    tmp_path, data_dir, dcmqi_ct, dcmqi_volume
) -> None:
    folder = _copy_series(dcmqi_ct, tmp_path / "series", file_meta=False)
    rng = np.random.default_rng(0)
    (folder / "notes.txt").write_text("Patient CT, 3 slices.\n")
    (folder / "empty").write_bytes(b"")
    (folder / "random.bin").write_bytes(rng.bytes(4096))
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(512))
    (folder / "archive.zip").write_bytes(b"PK\x03\x04" + rng.bytes(512))
    shutil.copy(data_dir / "totalseg_small" / "ct.nii.gz", folder / "ct.nii.gz")
    # Bytes that pass the first-bytes test (a File Meta element) but hold no DICOM object.
    (folder / "looks_like_meta.bin").write_bytes(b"\x02\x00\x00\x00UL\x04\x00" + rng.bytes(2048))
    assert [sniff_image_format(folder / n) for n in ("notes.txt", "empty", "random.bin", "image.png", "archive.zip")] \
        == [None] * 5  # fmt: skip
    (series,) = list_dicom_series(folder)
    assert sorted(p.name for p in series.files) == ["01.dcm", "02.dcm", "03.dcm"]
    _assert_same_volume(read_dicom_series(folder), dcmqi_volume)


def test_compressed_pixel_data_without_file_meta_is_refused_clearly(tmp_path, totalseg_dicom) -> None:
    """Encapsulated (JPEG 2000) pixel data in a file without File Meta: nothing names its codec."""
    folder = tmp_path / "one"
    folder.mkdir()
    source = sorted(totalseg_dicom.iterdir())[0]
    ds = pydicom.dcmread(source)
    ds.preamble, ds.file_meta = None, FileMetaDataset()
    pydicom.dcmwrite(folder / source.name, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    with pytest.raises(InputImageError, match="no File Meta group") as caught:
        read_dicom_series(folder)
    assert source.name in str(caught.value) and "compressed (encapsulated) pixel data" in str(caught.value)


def _prompts(path: Path) -> Path:
    box = [[[150, 150, 1], [300, 300, 1]]]
    path.write_text(json.dumps({"coordinate_system": "IJK", "segments": [{"name": "liver", "boxes": box}]}))
    return path


def test_segment_reads_a_series_without_preamble_from_one_of_its_files(tmp_path, dcmqi_ct, capsys) -> None:
    folder = _copy_series(dcmqi_ct, tmp_path / "series", file_meta=False)
    prompts = _prompts(tmp_path / "prompts.json")
    for ct in (folder, folder / "02.dcm"):
        args = ["segment", str(ct), "--prompts", str(prompts), "--output", str(tmp_path / "out" / "liver.dcm")]
        assert main([*args, "--check-only"]) == 0
        assert "ok: CT (512, 512, 3)" in capsys.readouterr().out


def test_dicom_seg_references_a_series_without_file_meta(tmp_path, data_dir, dcmqi_ct, dcmqi_volume) -> None:
    folder = _copy_series(dcmqi_ct, tmp_path / "series", file_meta=False)
    voxels, _ = nrrd.read(str(data_dir / "dcmqi_ct3slice" / "liver_seg.nrrd"))
    liver = voxels.transpose(2, 1, 0) > 0
    ct = read_dicom_series(folder)
    result = SegmentationResult(
        geometry=ct.geometry,
        segments=[Segment("liver", 1, liver, (221 / 255, 130 / 255, 101 / 255))],
        provenance={"dicom_series_uid": ct.metadata["dicom_series_uid"]},
    )
    out = write_dicom_seg(result, folder, tmp_path / "liver.dcm")
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.PatientID == "99000"
    assert ds.StudyInstanceUID == dcmqi_volume.metadata["dicom_study_uid"]
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == dcmqi_volume.metadata["dicom_series_uid"]
    assert sorted(r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence) == sorted(
        dcmqi_volume.metadata["dicom_sop_instance_uids"]
    )
    np.testing.assert_array_equal(read_dicom_seg(out, reference=ct.geometry).segments[0].mask_kji, liver)


@pytest.mark.parametrize("file_meta", [True, False], ids=["file-meta", "no-file-meta"])
def test_a_dicom_seg_without_preamble_reads_as_the_original(tmp_path, data_dir, dcmqi_volume, file_meta) -> None:
    original = data_dir / "dcmqi_ct3slice" / "liver_seg.dcm"
    stripped = _strip(original, tmp_path / "liver_seg", file_meta=file_meta, explicit_vr=True)
    seg = read_segmentation(stripped, reference=dcmqi_volume.geometry)  # no suffix: told DICOM by its content
    expected = read_dicom_seg(original, reference=dcmqi_volume.geometry)
    assert [s.name for s in seg.segments] == [s.name for s in expected.segments] == ["Liver"]
    np.testing.assert_array_equal(seg.segments[0].mask_kji, expected.segments[0].mask_kji)


@pytest.mark.parametrize("explicit_vr", [False, True], ids=["implicit-vr", "explicit-vr"])
def test_pixel_data_without_file_meta_decodes_in_the_syntax_it_was_read_in(tmp_path, dcmqi_ct, explicit_vr) -> None:
    """pydicom itself decodes it (GDCM is the fallback for codecs pydicom lacks, not for this)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from liversam.dicom_files import dicom_kind, read_dicom_file, with_transfer_syntax

    original = dcmqi_ct / "02.dcm"
    stripped = _strip(original, tmp_path / "02.dcm", file_meta=False, explicit_vr=explicit_vr)
    assert (dicom_kind(original), dicom_kind(stripped)) == ("part10", "bare")
    ds = read_dicom_file(stripped)
    assert "TransferSyntaxUID" not in ds.file_meta
    assert with_transfer_syntax(ds).file_meta.TransferSyntaxUID == (
        ExplicitVRLittleEndian if explicit_vr else ImplicitVRLittleEndian
    )
    np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(original).pixel_array)
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert dicom_kind(tmp_path / "notes.txt") is None and read_dicom_file(tmp_path / "notes.txt") is None


def _files_of_other_formats(folder: Path) -> list[Path]:
    array = (np.arange(6 * 16 * 16).reshape(6, 16, 16) % 300).astype(np.int16)
    for name in ("ct.nii", "ct.nii.gz", "ct.nrrd", "ct.mha"):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / name))
    sitk.WriteImage(sitk.GetImageFromArray(array[0].astype(np.uint8)), str(folder / "slice.png"))
    (folder / "prompts.json").write_text(json.dumps({"segments": [{"name": "liver"}]}))
    (folder / "notes.txt").write_text("CT, 6 slices\n")
    (folder / "slice.dcm.gz").write_bytes(gzip.compress(b"\x00" * 128 + b"DICM" + bytes(64)))
    with zipfile.ZipFile(folder / "series.zip", "w") as archive:
        archive.writestr("01.dcm", b"\x00" * 128 + b"DICM")
    np.save(folder / "array.npy", array)
    # raw voxels: a byte 8 then zeros (a label map), int16 8 then air (-1024): the start of group 0x0008
    (folder / "labels.raw").write_bytes(np.array([8] + [0] * 511, np.uint8).tobytes())
    (folder / "ct.raw").write_bytes(np.array([8, 0] + [-1024] * 510, np.int16).tobytes())
    return sorted(folder.iterdir())


def test_files_of_other_formats_are_never_taken_for_dicom(tmp_path, dcmqi_ct) -> None:
    """The first-bytes test for files without the "DICM" prefix passes no image, archive, text or raw voxel file,
    and passes a real CT slice without preamble (with and without File Meta)."""
    others = _files_of_other_formats(tmp_path)
    assert [p.name for p in others if sniff_image_format(p) == DICOM or dicom_kind(p) is not None] == []
    for file_meta in (True, False):
        ds = pydicom.dcmread(dcmqi_ct / "01.dcm")
        ds.preamble = None
        if not file_meta:
            ds.file_meta = FileMetaDataset()
        bare = tmp_path / f"bare_{file_meta}"
        pydicom.dcmwrite(bare, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
        assert (sniff_image_format(bare), dicom_kind(bare)) == (DICOM, "bare")
