"""Slicer .seg.nrrd, labelmaps (NRRD/NIfTI), format dispatch, atomic writes and ``liversam export``."""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from liversam.cli import main as cli_main
from liversam.errors import InputImageError, OutputError
from liversam.geometry import ImageGeometry
from liversam.segmentation import Segment, SegmentationResult
from liversam.segmentation_io import read_segmentation, write_segmentation
from liversam.terminology import LIVER_TERMINOLOGY, LIVER_TUMOR_TERMINOLOGY, terminology_for


def _oblique_geometry(size_ijk=(40, 30, 12)) -> ImageGeometry:
    """A grid with a non-trivial direction (rotated 30 degrees about z, k flipped) and anisotropic spacing."""
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])
    return ImageGeometry(size_ijk, (0.7, 0.8, 2.5), (-120.5, 33.25, 410.0), direction)


def _liver_with_tumor(geometry: ImageGeometry) -> SegmentationResult:
    nk, nj, ni = geometry.shape_kji
    k, j, i = np.ogrid[:nk, :nj, :ni]
    liver = ((i - ni / 2) / (ni / 3)) ** 2 + ((j - nj / 2) / (nj / 3)) ** 2 + (
        (k - nk / 2) / (nk / 3)
    ) ** 2 <= 1
    tumor = ((i - ni / 2) ** 2 + (j - nj / 2) ** 2 <= 9) & (np.abs(k - nk // 2) <= 1)
    lesion2 = np.zeros_like(liver)
    lesion2[nk // 2, nj // 2 + 5, ni // 2 - 6 : ni // 2 - 3] = True
    return SegmentationResult(
        geometry=geometry,
        segments=[
            Segment("liver", 1, liver, LIVER_TERMINOLOGY.color),
            Segment("tumor", 2, tumor & liver, LIVER_TUMOR_TERMINOLOGY.color),
            Segment("tumor 2", 3, lesion2 & liver, (0.9, 0.2, 0.1)),
        ],
        provenance={"model": "litemedsam"},
    )


def test_seg_nrrd_round_trip_with_overlaps_and_direction(tmp_path: Path) -> None:
    result = _liver_with_tumor(_oblique_geometry())
    path = write_segmentation(result, tmp_path / "case.seg.nrrd", model_name="litemedsam")

    # Read by slicerio as Slicer would: names, colours, terminology, layers, exact geometry.
    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(seg["ijkToLPS"], result.geometry.ijk_to_lps_matrix, atol=1e-9)
    assert seg["voxels"].shape == (2, 40, 30, 12)  # tumours overlap the liver: a second layer
    by_name = {s["name"]: s for s in seg["segments"]}
    assert by_name["liver"]["layer"] == 0 and by_name["liver"]["labelValue"] == 1
    assert by_name["tumor"]["layer"] == 1 and by_name["tumor"]["labelValue"] == 2
    assert by_name["tumor 2"]["layer"] == 1 and by_name["tumor 2"]["labelValue"] == 3
    assert by_name["liver"]["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert by_name["tumor"]["terminology"]["type"] == ["SCT", "108369006", "Neoplasm"]
    assert by_name["tumor"]["terminology"]["anatomicRegion"] == ["SCT", "10200004", "Liver"]
    np.testing.assert_allclose(by_name["tumor 2"]["color"], (0.9, 0.2, 0.1))
    for segment in result.segments:
        mask_ijk = slicerio.segment_mask(seg, segment.name)
        np.testing.assert_array_equal(mask_ijk.transpose(2, 1, 0), segment.mask_kji)
    assert nrrd.read_header(str(path))["LiverSAM_model"] == "litemedsam"

    back = read_segmentation(path)
    assert back.geometry.is_close(result.geometry, tolerance_mm=1e-6)
    assert [(s.name, s.label) for s in back.segments] == [("liver", 1), ("tumor", 2), ("tumor 2", 3)]
    for original, read in zip(result.segments, back.segments, strict=True):
        np.testing.assert_array_equal(read.mask_kji, original.mask_kji)
    assert back.provenance["terminology"]["tumor"].same_concept(LIVER_TUMOR_TERMINOLOGY)


def test_seg_nrrd_read_by_slicer_storage_node(tmp_path: Path) -> None:
    """slicer-core's own reader (vtkMRMLSegmentationStorageNode) loads the file with the right segments."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    result = _liver_with_tumor(_oblique_geometry())
    path = write_segmentation(result, tmp_path / "slicer.seg.nrrd")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    for index, original in enumerate(result.segments):
        segment = segmentation.GetNthSegment(index)
        assert segment.GetName() == original.name
        tag = vtk.mutable("")
        assert segment.GetTag("TerminologyEntry", tag)
        assert terminology_for(original.name).type.value in str(tag)
        labelmap = segment.GetRepresentation("Binary labelmap")
        extent = labelmap.GetExtent()
        voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        voxels = voxels.reshape(
            extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1
        )
        assert int((voxels == segment.GetLabelValue()).sum()) == int(original.mask_kji.sum())
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)  # IJK -> RAS in Slicer
        ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        np.testing.assert_allclose(ijk_to_ras, result.geometry.ijk_to_ras_matrix, atol=1e-6)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz"])
def test_labelmap_round_trip(tmp_path: Path, suffix: str) -> None:
    result = _liver_with_tumor(_oblique_geometry())
    path = write_segmentation(result, tmp_path / f"labels{suffix}")
    image = sitk.ReadImage(str(path))
    labelmap = sitk.GetArrayFromImage(image)
    # Expected labels from the masks themselves (a later segment wins an overlap), not from to_labelmap().
    liver, tumor, lesion2 = (s.mask_kji for s in result.segments)
    assert (liver & tumor).any() and (liver & lesion2).any(), "the overlaps must be there to be resolved"
    expected_labels = np.select([lesion2, tumor, liver], [3, 2, 1], default=0)
    np.testing.assert_array_equal(labelmap, expected_labels)
    assert labelmap.dtype == np.uint8
    assert ImageGeometry.from_sitk(image).is_close(result.geometry, tolerance_mm=1e-4)

    back = read_segmentation(path)
    # Liver label keeps only liver-not-tumour voxels in a labelmap (later segments win).
    expected = {1: liver & ~tumor & ~lesion2, 2: tumor & ~lesion2, 3: lesion2}
    assert [s.label for s in back.segments] == [1, 2, 3]
    for segment in back.segments:
        np.testing.assert_array_equal(segment.mask_kji, expected[segment.label])
    names = [s.name for s in back.segments]
    # NRRD carries the names in its header; NIfTI falls back to the default names (3 has none).
    assert names == (["liver", "tumor", "tumor 2"] if suffix == ".nrrd" else ["liver", "tumor", "label_3"])
    named = read_segmentation(path, label_names={1: "Liver", 2: "Tumour", 4: "vessels"})
    assert [(s.name, s.label) for s in named.segments] == [
        ("Liver", 1),
        ("Tumour", 2),
        ("label_3", 3),
        ("vessels", 4),
    ]
    assert not named.segments[-1].mask_kji.any()
    # names given replace the defaults: a label they leave out is not called "tumor" (nor coded as a neoplasm)
    only_liver = read_segmentation(path, label_names={1: "liver"})
    assert [(s.name, s.label) for s in only_liver.segments] == [("liver", 1), ("label_2", 2), ("label_3", 3)]


def test_unknown_suffix_and_bad_masks_write_nothing(tmp_path: Path) -> None:
    result = _liver_with_tumor(_oblique_geometry())
    with pytest.raises(OutputError, match=r"\.seg\.nrrd, \.nrrd, \.nii, \.nii\.gz, \.dcm"):
        write_segmentation(result, tmp_path / "out.vtk")
    broken = SegmentationResult(result.geometry, [Segment("liver", 1, np.ones((2, 2, 2), bool))])
    for name in ("bad.seg.nrrd", "bad.nii.gz"):
        with pytest.raises(OutputError, match="mask shape"):
            write_segmentation(broken, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_survives_a_failed_write(tmp_path: Path, monkeypatch) -> None:
    result = _liver_with_tumor(_oblique_geometry())
    path = write_segmentation(result, tmp_path / "keep.seg.nrrd")
    before = path.read_bytes()

    def failing_write(*args, **kwargs):
        Path(args[0]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(slicerio, "write_segmentation", failing_write)
    with pytest.raises(OutputError, match=r"Cannot write '.*keep\.seg\.nrrd': disk full"):
        write_segmentation(result, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.seg.nrrd"]


def test_cropped_seg_nrrd_is_placed_on_the_reference(tmp_path: Path) -> None:
    """Slicer often saves a segmentation cropped to its extent; reading it onto the CT grid must restore it."""
    full = _liver_with_tumor(_oblique_geometry())
    g = full.geometry
    k0, j0, i0 = 3, 5, 7
    cropped_geometry = ImageGeometry(
        (20, 15, 6), g.spacing_mm, tuple(g.ijk_to_lps((i0, j0, k0))), g.direction_lps
    )
    cropped = SegmentationResult(
        cropped_geometry,
        [
            Segment(s.name, s.label, s.mask_kji[k0 : k0 + 6, j0 : j0 + 15, i0 : i0 + 20], s.color)
            for s in full.segments
        ],
    )
    path = write_segmentation(cropped, tmp_path / "cropped.seg.nrrd")
    placed = read_segmentation(path, reference=g)
    assert placed.geometry is g
    for original, read in zip(cropped.segments, placed.segments, strict=True):
        expected = np.zeros(g.shape_kji, bool)
        expected[k0 : k0 + 6, j0 : j0 + 15, i0 : i0 + 20] = original.mask_kji
        np.testing.assert_array_equal(read.mask_kji, expected)


def test_reading_errors(tmp_path: Path) -> None:
    with pytest.raises(InputImageError, match="not found"):
        read_segmentation(tmp_path / "missing.seg.nrrd")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InputImageError, match="Unknown segmentation file type"):
        read_segmentation(text)
    floats = tmp_path / "prob.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 8, 8), 0.5, np.float32)), str(floats))
    with pytest.raises(InputImageError, match="non-integer"):
        read_segmentation(floats)


def test_terminology_for_names() -> None:
    assert terminology_for("Liver").type.value == "10200004"
    for name in ("tumor", "Tumour", "liver_tumor", "lesion 3", "tumor_12", "HCC"):
        terminology = terminology_for(name)
        assert (terminology.type.value, terminology.default_label) == ("108369006", 2), name
    assert terminology_for("spleen").type.meaning == "Tissue"
    assert LIVER_TERMINOLOGY.slicer_string() == (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver"
        "~^^~Anatomic codes - DICOM master list~^^~^^"
    )


def test_export_command(tmp_path: Path, data_dir: Path, capsys) -> None:
    dcmqi = data_dir / "dcmqi_ct3slice"
    seg_dcm = tmp_path / "liver.dcm"
    assert (
        cli_main(
            [
                "export",
                str(dcmqi / "liver_seg.nrrd"),
                "--reference-dicom",
                str(dcmqi / "ct"),
                "-o",
                str(seg_dcm),
            ]
        )
        == 0
    )
    assert "liver (label 1, 107098 voxels" in capsys.readouterr().out
    seg_nrrd = tmp_path / "liver.seg.nrrd"
    assert cli_main(["export", str(seg_dcm), "--output", str(seg_nrrd)]) == 0
    reference = read_segmentation(dcmqi / "liver_seg.nrrd")
    back = read_segmentation(seg_nrrd)
    np.testing.assert_array_equal(back.segment("liver").mask_kji, reference.segment("liver").mask_kji)

    # lits117 labelmap (liver + tumour) to a Slicer segmentation on the CT grid.
    lits = data_dir / "lits117"
    out = tmp_path / "lits.seg.nrrd"
    assert (
        cli_main(
            ["export", str(lits / "label.nii.gz"), "--reference-ct", str(lits / "ct.nii.gz"), "-o", str(out)]
        )
        == 0
    )
    result = read_segmentation(out)
    assert [(s.name, s.label, int(s.mask_kji.sum())) for s in result.segments] == [
        ("liver", 1, 485268),
        ("tumor", 2, 130083),
    ]

    # Errors: exit code 2 with a message, nothing written.
    assert cli_main(["export", str(seg_nrrd), "--output", str(tmp_path / "x.dcm")]) == 2
    assert "--reference-dicom" in capsys.readouterr().err
    assert cli_main(["export", str(seg_nrrd), "--output", str(tmp_path / "x.stl")]) == 2
    other_scan = data_dir / "totalseg_small" / "liver_model_output.nii.gz"
    assert (
        cli_main(
            ["export", str(other_scan), "--reference-dicom", str(dcmqi / "ct"), "-o", str(tmp_path / "y.dcm")]
        )
        == 2
    )
    assert "does not overlap the reference CT" in capsys.readouterr().err
    assert not (tmp_path / "x.dcm").exists() and not (tmp_path / "y.dcm").exists()


def test_labelmap_order_decides_overlaps_and_large_labels_need_16_bits(tmp_path: Path) -> None:
    geometry = ImageGeometry((6, 5, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    a = np.zeros(geometry.shape_kji, bool)
    b = np.zeros(geometry.shape_kji, bool)
    a[0, 1:4, 1:4] = True
    b[0, 2:5, 2:6] = True
    # The segment listed later wins, whatever the label values.
    result = SegmentationResult(geometry, [Segment("big", 300, a), Segment("small", 7, b)])
    path = write_segmentation(result, tmp_path / "labels.nrrd")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert labels.dtype == np.uint16
    assert labels[0, 2, 2] == 7 and labels[0, 1, 1] == 300 and labels[0, 4, 5] == 7 and labels[1].max() == 0
    assert int((labels == 300).sum()) == 9 - 4 and int((labels == 7).sum()) == 12
    swapped = SegmentationResult(geometry, [Segment("small", 7, b), Segment("big", 300, a)])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(write_segmentation(swapped, tmp_path / "swapped.nrrd"))))
    assert labels[0, 2, 2] == 300 and int((labels == 7).sum()) == 12 - 4


def test_segments_that_meet_on_one_far_slice_only_go_to_separate_layers(tmp_path: Path) -> None:
    # the writer checks overlap a few slices at a time: a shared voxel on the last slice must still count
    geometry = ImageGeometry((8, 6, 40), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    a = np.zeros(geometry.shape_kji, bool)
    b = np.zeros(geometry.shape_kji, bool)
    c = np.zeros(geometry.shape_kji, bool)
    a[:, 1, 1] = True
    b[39, 1, 1] = True  # meets a on the last slice only
    c[0, 4, 4] = True  # meets nobody
    d = np.zeros(geometry.shape_kji, bool)
    d[0, 4, 4:6] = True  # meets the vessel only: a later member of the first layer, not its first
    segments = [Segment("liver", 1, a, (1.0, 0.0, 0.0)), Segment("tumor", 2, b, (0.0, 1.0, 0.0)),
                Segment("vessel", 3, c, (0.0, 0.0, 1.0)), Segment("cyst", 4, d, (1.0, 1.0, 0.0))]
    path = write_segmentation(SegmentationResult(geometry=geometry, segments=segments), tmp_path / "s.seg.nrrd")
    layers = {s["name"]: s["layer"] for s in slicerio.read_segmentation(str(path))["segments"]}
    assert layers == {"liver": 0, "tumor": 1, "vessel": 0, "cyst": 1}
    for segment, mask in zip(segments, (a, b, c, d), strict=True):
        assert segment.mask_kji is mask and mask.sum() == {1: 40, 2: 1, 3: 1, 4: 2}[segment.label]  # only read


def test_export_refuses_label_names_that_name_two_labels_alike(tmp_path: Path, capsys) -> None:
    """``--label-names 1=liver,2=liver`` wrote two segments named liver (Slicer shows both alike); PROMPTS.json
    already refuses duplicate names."""
    from liversam.cli import main

    path = write_segmentation(_liver_with_tumor(_oblique_geometry()), tmp_path / "labels.nii.gz")
    out = tmp_path / "out.seg.nrrd"
    code = main(["export", str(path), "--label-names", "1=liver,2=Liver", "--output", str(out)])
    assert code == 2
    assert "labels 1 and 2 are both named 'Liver'" in capsys.readouterr().err
    assert not out.exists()
