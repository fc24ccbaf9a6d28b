"""DICOM SEG write (highdicom) and read back on the real dcmqi 3-slice CT series and dcmqi's own SEG."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import nrrd
import numpy as np
import pydicom
import pytest

from liversam import __version__
from liversam.dicom_seg import read_dicom_seg, write_dicom_seg
from liversam.dicom_series import read_dicom_series
from liversam.errors import OutputError
from liversam.geometry import ImageGeometry
from liversam.segmentation import Segment, SegmentationResult
from liversam.segmentation_io import read_segmentation, write_segmentation


@pytest.fixture(scope="module")
def dcmqi(data_dir: Path) -> Path:
    return data_dir / "dcmqi_ct3slice"


@pytest.fixture(scope="module")
def ct(dcmqi: Path):
    return read_dicom_series(dcmqi / "ct")


@pytest.fixture(scope="module")
def liver_nrrd_mask(dcmqi: Path) -> np.ndarray:
    voxels, header = nrrd.read(str(dcmqi / "liver_seg.nrrd"))  # [i, j, k]
    assert header["space"] == "left-posterior-superior"
    return voxels.transpose(2, 1, 0) > 0


def _liver_and_tumor(ct, liver: np.ndarray) -> SegmentationResult:
    tumor = np.zeros_like(liver)
    tumor[0, 250:262, 150:171] = True  # a small lesion on the first slice only
    tumor[1, 240:270, 150:180] = True
    tumor &= liver
    return SegmentationResult(
        geometry=ct.geometry,
        segments=[
            Segment("liver", 1, liver, (221 / 255, 130 / 255, 101 / 255)),
            Segment("tumor", 2, tumor, (144 / 255, 238 / 255, 144 / 255)),
        ],
        provenance={"dicom_series_uid": ct.metadata["dicom_series_uid"]},
    )


def test_dcmqi_seg_reads_as_the_nrrd(dcmqi: Path, ct, liver_nrrd_mask: np.ndarray) -> None:
    native = read_dicom_seg(dcmqi / "liver_seg.dcm")
    assert [(s.name, s.label) for s in native.segments] == [("Liver", 1)]
    np.testing.assert_array_equal(native.segments[0].mask_kji, liver_nrrd_mask)
    assert native.segments[0].mask_kji.sum() == 107098
    assert native.geometry.is_close(ct.geometry)

    on_ct = read_segmentation(dcmqi / "liver_seg.dcm", reference=ct.geometry)  # dispatch by suffix
    np.testing.assert_array_equal(on_ct.segments[0].mask_kji, liver_nrrd_mask)
    assert on_ct.geometry is ct.geometry
    assert sorted(on_ct.provenance["referenced_sop_instance_uids"]) == sorted(
        ct.metadata["dicom_sop_instance_uids"]
    )
    # dcmqi's old SRT code T-62000 for liver: no LiverSAM terminology, still label 1 by segment number.
    assert on_ct.provenance["terminology"]["Liver"].type.value == "T-62000"


def test_round_trip_on_dcmqi_ct(tmp_path: Path, dcmqi: Path, ct, liver_nrrd_mask: np.ndarray) -> None:
    result = _liver_and_tumor(ct, liver_nrrd_mask)
    out = write_segmentation(
        result, tmp_path / "result.dcm", reference_dicom=dcmqi / "ct", model_name="litemedsam"
    )
    assert out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.dcm"]  # no temp file left

    back = read_segmentation(out, reference=ct.geometry)
    assert [(s.name, s.label) for s in back.segments] == [("liver", 1), ("tumor", 2)]
    for original, read in zip(result.segments, back.segments, strict=True):
        np.testing.assert_array_equal(read.mask_kji, original.mask_kji)
        np.testing.assert_allclose(read.color, original.color, atol=2 / 255)
    native = read_dicom_seg(out)  # without a reference: the SEG's own grid is the CT grid
    assert native.geometry.is_close(ct.geometry)
    np.testing.assert_array_equal(native.segments[0].mask_kji, liver_nrrd_mask)

    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == ct.metadata["dicom_study_uid"]
    assert ds.FrameOfReferenceUID == ct.metadata["dicom_frame_of_reference_uid"]
    assert ds.PatientID == "99000"
    # References: the CT series and its three instances.
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == ct.metadata["dicom_series_uid"]
    assert sorted(r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence) == sorted(
        ct.metadata["dicom_sop_instance_uids"]
    )
    # Each frame names the CT instance at its own position.
    uid_by_z = {
        round(float(pydicom.dcmread(f).ImagePositionPatient[2]), 2): uid
        for f, uid in zip(ct.metadata["dicom_files"], ct.metadata["dicom_sop_instance_uids"], strict=True)
    }
    for frame in ds.PerFrameFunctionalGroupsSequence:
        z = round(float(frame.PlanePositionSequence[0].ImagePositionPatient[2]), 2)
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source == uid_by_z[z]
    # Codes and algorithm identification.
    liver, tumor = ds.SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert tumor.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert tumor.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert tumor.AnatomicRegionSequence[0].CodeValue == "10200004"
    for item in (liver, tumor):
        assert item.SegmentAlgorithmType == "SEMIAUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "LiverSAM" and algorithm.AlgorithmVersion == __version__
        assert "model=litemedsam" in algorithm.AlgorithmParameters
    # highdicom reads it back as a valid SEG with the same masks.
    seg = hd.seg.segread(out)
    assert seg.get_segment_numbers(segment_label="tumor") == [2]
    volume = seg.get_volume(combine_segments=False)
    assert int(volume.array[..., 0].sum()) == int(liver_nrrd_mask.sum())


def test_list_of_files_as_reference(tmp_path: Path, dcmqi: Path, ct, liver_nrrd_mask: np.ndarray) -> None:
    """Slicer's DICOM database gives the CT's files, not a folder."""
    result = _liver_and_tumor(ct, liver_nrrd_mask)
    files = sorted((dcmqi / "ct").iterdir())
    out = write_dicom_seg(result, files, tmp_path / "from_files.dcm")
    back = read_dicom_seg(out, reference=ct.geometry)
    np.testing.assert_array_equal(back.segment("tumor").mask_kji, result.segment("tumor").mask_kji)


def test_geometry_mismatch_writes_nothing(
    tmp_path: Path, dcmqi: Path, ct, liver_nrrd_mask: np.ndarray
) -> None:
    g = ct.geometry
    shifted = ImageGeometry(
        g.size_ijk, g.spacing_mm, (g.origin_lps[0] + 5.0, *g.origin_lps[1:]), g.direction_lps
    )
    result = SegmentationResult(shifted, [Segment("liver", 1, liver_nrrd_mask)])
    target = tmp_path / "out" / "bad.dcm"
    with pytest.raises(OutputError, match=r"does not match the DICOM series.*origin"):
        write_segmentation(result, target, reference_dicom=dcmqi / "ct")
    assert not target.exists()
    assert not any(target.parent.iterdir()) if target.parent.exists() else True

    resized = SegmentationResult(
        ImageGeometry((512, 512, 2), g.spacing_mm, g.origin_lps, g.direction_lps),
        [Segment("liver", 1, liver_nrrd_mask[:2])],
    )
    with pytest.raises(OutputError, match=r"size \(512, 512, 2\) vs \(512, 512, 3\)"):
        write_segmentation(resized, target, reference_dicom=dcmqi / "ct")
    assert not target.exists()


def test_dcm_needs_reference_and_referenceable_series(tmp_path: Path, data_dir: Path, ct) -> None:
    result = SegmentationResult(ct.geometry, [Segment("liver", 1, np.ones(ct.geometry.shape_kji, bool))])
    with pytest.raises(OutputError, match="--reference-dicom"):
        write_segmentation(result, tmp_path / "x.dcm")
    # totalseg_small/ct_dicom was anonymised with blank UIDs: a SEG cannot reference it.
    anonymised = read_dicom_series(data_dir / "totalseg_small" / "ct_dicom")
    result = SegmentationResult(
        anonymised.geometry, [Segment("liver", 1, np.ones(anonymised.geometry.shape_kji, bool))]
    )
    with pytest.raises(OutputError, match="SOPInstanceUID empty in 20 file"):
        write_segmentation(
            result, tmp_path / "y.dcm", reference_dicom=data_dir / "totalseg_small" / "ct_dicom"
        )
    assert list(tmp_path.iterdir()) == []


def test_picks_the_matching_series_in_a_mixed_folder(
    tmp_path: Path, dcmqi: Path, data_dir: Path, ct, liver_nrrd_mask
) -> None:
    folder = tmp_path / "study"
    shutil.copytree(data_dir / "totalseg_small" / "ct_dicom", folder / "other")
    shutil.copytree(dcmqi / "ct", folder / "ct")
    result = _liver_and_tumor(ct, liver_nrrd_mask)
    result.provenance.pop("dicom_series_uid")  # found by its grid
    out = write_dicom_seg(result, folder, tmp_path / "seg.dcm")
    assert (
        pydicom.dcmread(out).ReferencedSeriesSequence[0].SeriesInstanceUID == ct.metadata["dicom_series_uid"]
    )


def test_frames_placed_on_a_larger_or_coarser_reference(
    tmp_path: Path, dcmqi: Path, ct, liver_nrrd_mask
) -> None:
    g = ct.geometry
    # One extra slice below and two above: the frames land on k + 1.
    taller = ImageGeometry((512, 512, 6), g.spacing_mm, tuple(g.ijk_to_lps((0, 0, -1))), g.direction_lps)
    placed = read_dicom_seg(dcmqi / "liver_seg.dcm", reference=taller).segments[0].mask_kji
    assert placed.shape == (6, 512, 512)
    np.testing.assert_array_equal(placed[1:4], liver_nrrd_mask)
    assert not placed[0].any() and not placed[4:].any()
    # Half the in-plane resolution: resampled nearest-neighbour, volume kept within 2 %.
    coarse = ImageGeometry(
        (256, 256, 3),
        (2 * g.spacing_mm[0], 2 * g.spacing_mm[1], g.spacing_mm[2]),
        tuple(g.ijk_to_lps((0.5, 0.5, 0))),
        g.direction_lps,
    )
    resampled = read_dicom_seg(dcmqi / "liver_seg.dcm", reference=coarse).segments[0].mask_kji
    assert resampled.shape == (3, 256, 256)
    assert resampled.sum() * 4 == pytest.approx(liver_nrrd_mask.sum(), rel=0.02)


@pytest.mark.model
def test_segment_command_writes_dicom_seg_for_a_dicom_ct(
    tmp_path: Path, dcmqi: Path, ct, liver_nrrd_mask
) -> None:
    """``liversam segment CT_DIR ... --output result.dcm``: one box on one slice (one encode), real model."""
    import json

    from liversam.cli import main as cli_main

    k = 1
    js, is_ = np.nonzero(liver_nrrd_mask[k])
    box = [[int(is_.min()), int(js.min()), k], [int(is_.max()), int(js.max()), k]]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            {
                "coordinate_system": "IJK",
                "segments": [{"name": "liver", "label": 1, "boxes": [box], "propagate": False}],
            }
        )
    )
    out = tmp_path / "result.dcm"
    assert (
        cli_main(
            ["segment", str(dcmqi / "ct"), "--prompts", str(prompts), "--output", str(out), "--threads", "2"]
        )
        == 0
    )
    back = read_segmentation(out, reference=ct.geometry)
    mask = back.segment("liver").mask_kji
    reference = liver_nrrd_mask[k]
    dice = 2 * (mask[k] & reference).sum() / (mask[k].sum() + reference.sum())
    assert dice > 0.85
    referenced = pydicom.dcmread(out).ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == ct.metadata["dicom_series_uid"]
    assert len(referenced.ReferencedInstanceSequence) == 3
