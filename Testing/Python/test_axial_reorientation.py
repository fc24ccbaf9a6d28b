"""A CT stored in sagittal or coronal slices is segmented on its axial slices (liversam.axial_orientation).

Geometry: every permutation and flip of the voxel axes, each voxel's LPS / RAS position unchanged, exact round
trips, IJK in both directions, prompts in IJK of the file mapped. Real CT: sagittal and coronal copies of lits117
(SimpleITK PermuteAxes / Flip, physical positions kept) segmented by ``liversam segment`` with the example's LPS
prompts give the axial run's masks on the copy's own grid.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_cli_inputs_prompts import _check_only

from conftest import cli_model, dice
from liversam.axial_orientation import axial_reorientation, reorient_to_axial
from liversam.errors import InputImageError, PromptError
from liversam.geometry import ImageGeometry, lps_to_ras
from liversam.prompts import parse_prompts
from liversam.segmentation import Segment, SegmentationResult
from liversam.volume import CTVolume

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = REPO_ROOT / "examples" / "lits117" / "prompts.json"
K_FIRST, K_COUNT = 28, 32  # the slices of lits117 the real-CT runs segment


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _signed_permutations():
    """Every direction matrix whose columns are +-the patient axes: 6 permutations x 8 sign patterns."""
    for axes in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            direction = np.zeros((3, 3))
            for column, (axis, sign) in enumerate(zip(axes, signs, strict=True)):
                direction[axis, column] = sign
            yield axes, signs, direction


def _geometry(direction: np.ndarray) -> ImageGeometry:
    return ImageGeometry(
        size_ijk=(5, 6, 7),
        spacing_mm=(0.7, 1.3, 2.5),
        origin_lps=(-31.0, 12.5, 40.25),
        direction_lps=direction,
    )


def _all_ijk(geometry: ImageGeometry) -> np.ndarray:
    ni, nj, nk = geometry.size_ijk
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    # [k, j, i, 3]: voxel (i, j, k) at array index [k, j, i]
    return np.stack([i, j, k], axis=-1).astype(float)


CASES = list(_signed_permutations())


@pytest.mark.parametrize("tilt_deg", [0.0, 12.0])
@pytest.mark.parametrize(("axes", "signs", "direction"), CASES, ids=[f"{a}{s}" for a, s, _ in CASES])
def test_every_permutation_and_flip_keeps_each_voxel_where_it_was(axes, signs, direction, tilt_deg):
    # tilted about L-R: still within 25 deg of its axes
    geometry = _geometry(_rotation(0, tilt_deg) @ direction)
    reorientation = axial_reorientation(geometry)
    k_along_si = axes[2] == 2
    if k_along_si:
        assert reorientation is None  # axial slices (any in-plane order): kept as they are
        return
    assert reorientation is not None
    axial = reorientation.axial_geometry
    assert reorientation.input_plane == ("sagittal", "coronal")[axes[2]]
    # the axial grid runs i towards L, j towards P, k towards S (each within the tilt)
    assert np.all(np.argmax(np.abs(axial.direction_lps), axis=0) == [0, 1, 2])
    assert np.all(np.diag(axial.direction_lps) > 0.9)
    if tilt_deg == 0:
        np.testing.assert_allclose(axial.direction_lps, np.eye(3), atol=1e-12)
    assert sorted(axial.size_ijk) == sorted(geometry.size_ijk)
    assert np.isclose(axial.voxel_volume_mm3, geometry.voxel_volume_mm3)

    # every value unique
    values = np.arange(np.prod(geometry.shape_kji), dtype=np.int32).reshape(geometry.shape_kji)
    moved = reorientation.to_axial(values)
    assert moved.shape == axial.shape_kji and moved.flags.c_contiguous
    np.testing.assert_array_equal(reorientation.to_input(moved), values)  # exact round trip of the array

    ijk_in = _all_ijk(geometry).reshape(-1, 3)
    ijk_ax = reorientation.input_ijk_to_axial_ijk(ijk_in)
    # exact round trip of IJK
    np.testing.assert_array_equal(reorientation.axial_ijk_to_input_ijk(ijk_ax), ijk_in)
    assert np.array_equal(ijk_ax, np.round(ijk_ax)) and np.all(axial.contains_ijk(ijk_ax, tolerance=0.0))
    # the same voxel: the same value and the same LPS and RAS position on both grids
    i, j, k = ijk_ax.astype(int).T
    np.testing.assert_array_equal(moved[k, j, i], values.reshape(-1))
    np.testing.assert_allclose(axial.ijk_to_lps(ijk_ax), geometry.ijk_to_lps(ijk_in), atol=1e-9)
    np.testing.assert_allclose(axial.ijk_to_ras(ijk_ax), geometry.ijk_to_ras(ijk_in), atol=1e-9)
    np.testing.assert_allclose(axial.ijk_to_ras(ijk_ax), lps_to_ras(geometry.ijk_to_lps(ijk_in)), atol=1e-9)
    # and from millimetres: LPS / RAS -> IJK of either grid names the same voxel
    lps = geometry.ijk_to_lps(ijk_in)
    np.testing.assert_allclose(axial.lps_to_ijk(lps), ijk_ax, atol=1e-9)
    np.testing.assert_allclose(axial.ras_to_ijk(lps_to_ras(lps)), ijk_ax, atol=1e-9)


def test_oblique_or_axial_ct_is_kept_as_it_is():
    sagittal = _geometry(np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]))
    assert axial_reorientation(sagittal) is not None
    for degrees in (30.0, 45.0):  # tilted further than 25 deg: oblique, no permutation fits
        assert axial_reorientation(_geometry(_rotation(0, degrees) @ sagittal.direction_lps)) is None
    assert axial_reorientation(_geometry(np.eye(3))) is None
    volume = CTVolume(np.zeros((7, 6, 5), np.int16), _geometry(np.diag([-1.0, -1, 1])))
    same, reorientation = reorient_to_axial(volume)
    assert same is volume and reorientation is None


def test_reoriented_volume_and_result_map_back_to_the_input_grid():
    # sagittal, k towards R, i towards A
    geometry = _geometry(np.array([[0.0, 0, -1], [-1, 0, 0], [0, 1, 0]]))
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=geometry.shape_kji).astype(np.int16)
    volume = CTVolume(array.copy(), geometry, source="sag.nrrd", metadata={"x": 1})
    axial, reorientation = reorient_to_axial(volume)
    assert reorientation is not None and axial.geometry is reorientation.axial_geometry
    np.testing.assert_array_equal(volume.array_kji, array)  # the input is not changed
    assert not axial.array_kji.flags.writeable and axial.metadata["reoriented_from"] == "sagittal"
    mask = axial.array_kji > 0
    result = SegmentationResult(
        axial.geometry,
        [Segment("liver", 1, mask, slice_scores={3: 0.9})],
        provenance={"model": "m", "propagation": {}, "before_crf": {}},
    )
    back = reorientation.result_to_input(result)
    assert back.geometry is geometry
    # the same voxels, on the input grid
    np.testing.assert_array_equal(back.segment("liver").mask_kji, array > 0)
    assert back.provenance["model"] == "m" and "propagation" not in back.provenance
    with pytest.raises(ValueError, match="not on the axial grid"):
        reorientation.result_to_input(SegmentationResult(geometry, [Segment("liver", 1, array > 0)]))


def test_prompts_in_ijk_name_the_files_voxels_and_lps_prompts_work_unchanged():
    # coronal: i along L, j along S, k along A (k towards anterior: flipped on the axial grid)
    geometry = ImageGeometry(
        size_ijk=(40, 30, 20),
        spacing_mm=(1.0, 2.0, 1.5),
        origin_lps=(5.0, -7.0, 100.0),
        direction_lps=np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]),
    )
    reorientation = axial_reorientation(geometry)
    assert reorientation is not None and reorientation.input_plane == "coronal"
    axial = reorientation.axial_geometry
    # a box on the file's row j = 12 (one axial plane), corners (i, j, k) = (3, 12, 2) and (30, 12, 15)
    corners_ijk = [[3, 12, 2], [30, 12, 15]]
    corners_lps = geometry.ijk_to_lps(np.array(corners_ijk, float)).tolist()
    expected = reorientation.input_ijk_to_axial_ijk(np.array(corners_ijk, float))
    k_expected = int(expected[0, 2])
    box_expected = (*expected[:, :2].min(axis=0), *expected[:, :2].max(axis=0))
    for system, corners in (
        ("IJK", corners_ijk),
        ("LPS", corners_lps),
        ("RAS", lps_to_ras(np.array(corners_lps)).tolist()),
    ):
        data = {
            "coordinate_system": system,
            "segments": [{"name": "liver", "label": 1, "boxes": [corners], "points": [corners[0]]}],
        }
        [segment] = parse_prompts(data, axial, ijk_geometry=geometry)
        assert list(segment.slices) == [k_expected], system
        np.testing.assert_allclose(segment.slices[k_expected].boxes_ij[0], box_expected, atol=1e-9)
        np.testing.assert_allclose(segment.slices[k_expected].points_pos_ij[0], expected[0, :2], atol=1e-9)
    # a box on one of the file's own (coronal) slices spans axial slices: refused, saying which IJK axis to share
    data = {"coordinate_system": "IJK", "segments": [{"name": "liver", "boxes": [[[3, 2, 5], [30, 25, 5]]]}]}
    with pytest.raises(PromptError, match="corners must share their j \\(the file's axis along S-I\\)"):
        parse_prompts(data, axial, ijk_geometry=geometry)
    # outside the file: the extent is given in the file's own IJK
    data = {"coordinate_system": "IJK", "segments": [{"name": "liver", "points": [[3, 2, 25]]}]}
    with pytest.raises(PromptError, match="i 0..39, j 0..29, k 0..19"):
        parse_prompts(data, axial, ijk_geometry=geometry)


def _write_small_ct(path: Path, direction: np.ndarray) -> Path:
    array = np.full((24, 30, 40), -1000, dtype=np.int16)  # [k, j, i]
    array[4:20, 6:24, 8:32] = 60
    image = sitk.GetImageFromArray(array)
    image.SetOrigin((10.0, 10.0, 0.0))
    image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    sitk.WriteImage(image, str(path))
    return path


def test_slice_size_is_checked_on_the_axial_slices_a_ct_is_segmented_on(tmp_path):
    """A sagittal file of 5 axial slices is a CT (its axial slices 40 x 30 voxels; before, refused as "too small": its
    file's j axis has 5 voxels); a single coronal image is not (its axial slices would be 40 x 1 voxels; before, read
    and segmented on that coronal image)."""
    from liversam.ct_io import read_ct

    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i along A-P, j along S-I, k along L-R
    array = np.full((40, 5, 30), -1000, dtype=np.int16)  # [k, j, i]: 5 voxels along S-I
    array[10:30, 1:4, 5:25] = 60
    image = sitk.GetImageFromArray(array)
    image.SetDirection(tuple(sagittal.ravel()))
    sitk.WriteImage(image, str(tmp_path / "sagittal.nrrd"))
    volume = read_ct(tmp_path / "sagittal.nrrd")
    assert volume.geometry.shape_kji == (40, 5, 30)  # as stored; its axial grid is 5 slices of 40 x 30
    coronal = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # k along A-P
    image = sitk.GetImageFromArray(np.full((1, 30, 40), 40, dtype=np.int16))
    image.SetDirection(tuple(coronal.ravel()))
    sitk.WriteImage(image, str(tmp_path / "coronal.nrrd"))
    with pytest.raises(InputImageError, match=r"stored in coronal slices, its axial slices would be 40 x 1 voxels"):
        read_ct(tmp_path / "coronal.nrrd")


def test_cli_takes_an_axial_box_on_a_sagittal_ct_and_still_refuses_it_on_an_oblique_one(
    tmp_path, capsys, caplog
):
    from liversam.cli import main

    sagittal = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # i along z, k along x
    box = [[12.0, 15.0, 20.0], [15.0, 30.0, 20.0]]  # one axial plane, z = 20: on several sagittal slices
    prompts = tmp_path / "p.json"
    prompts.write_text(
        json.dumps({"coordinate_system": "LPS", "segments": [{"name": "liver", "boxes": [box]}]})
    )
    ct = _write_small_ct(tmp_path / "sagittal.nrrd", sagittal)
    command = _check_only(ct, prompts, tmp_path)
    with caplog.at_level(logging.INFO, logger="liversam"):
        assert main(command) == 0
    assert "stored in sagittal slices" in caplog.text and "reoriented losslessly" in caplog.text
    # turned 35 deg about L-R: its i and j axes follow no patient axis, so it keeps its own slices and the message
    oblique = _rotation(0, 35.0) @ sagittal
    command[1] = str(_write_small_ct(tmp_path / "oblique.nrrd", oblique))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert (
        "slices are sagittal, not axial" in err
        and "share their x value" in err
        and "Orient Scalar Volume" in err
    )


# --- real CT -----------------------------------------------------------------------------------------------


def _stored_as(image: sitk.Image, order: list[int], flips: list[bool]) -> sitk.Image:
    """The same CT with its voxel axes permuted and flipped; every voxel stays at its physical position."""
    out = sitk.Flip(sitk.PermuteAxes(image, order), flips)
    probe = [(3, 100, 30), (120, 7, 13), (64, 64, 20)]  # (i, j, k) inside 128 x 128 x K_COUNT
    for index in probe:
        point = image.TransformIndexToPhysicalPoint(index)
        assert out[out.TransformPhysicalPointToIndex(point)] == image[index]
    return out


def _write_dicom_series(image: sitk.Image, folder: Path, template: Path) -> Path:
    """``image`` as a DICOM CT series (one file per slice k, its geometry in ImagePositionPatient and
    ImageOrientationPatient), from a real CT file as the template."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir()
    array = sitk.GetArrayFromImage(image)  # [k, j, i]
    nk, nj, ni = array.shape
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing, origin = image.GetSpacing(), np.asarray(image.GetOrigin(), dtype=float)
    series_uid = generate_uid()
    for k in range(nk):
        ds = pydicom.dcmread(template)
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "SliceLocation"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID, ds.InstanceNumber = series_uid, k + 1
        ds.Rows, ds.Columns = nj, ni
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.ImagePositionPatient = [float(v) for v in origin + k * spacing[2] * direction[:, 2]]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(array[k], dtype="<i2").tobytes()
        ds.save_as(folder / f"{k:03d}.dcm")
    return folder


@pytest.fixture(scope="module")
def segment_runs(tmp_path_factory, lits117_ct_path, litemedsam_openvino_fp32, data_dir):
    """``liversam segment`` (in-process, the tests' OpenVINO fp32 model) on 32 axial slices of lits117 as stored
    (-> .seg.nrrd), on a sagittal copy as a DICOM series (-> DICOM SEG) and on a coronal copy (-> labelmap), with the
    example's LPS prompts; for each: the input grid as read, the output read back (a DICOM SEG onto the series' grid),
    the log. The copies' axial slices are the axial run's pixels, so the model's encoder memo (conftest.py) encodes
    each once; a copy whose slices came out other than the axial ones would be encoded anew. (Session 40: 32 slices
    instead of 64 and the memo, a third of the time; measured liver Dice against the label 0.978, was 0.961 on 64.)"""
    from liversam.cli import build_parser
    from liversam.ct_io import read_ct
    from liversam.segmentation_io import read_segmentation

    folder = tmp_path_factory.mktemp("planes")
    # the slices of lits117 holding the liver's and the second tumour's boxes (axial slices 28..59: 128 x 128 x 32,
    # so that a mix-up of axes changes a grid's shape), with the example's prompts on it (LPS, unchanged)
    image = sitk.ReadImage(str(lits117_ct_path))[:, :, K_FIRST : K_FIRST + K_COUNT]
    axial_path = folder / "axial.nrrd"
    sitk.WriteImage(image, str(axial_path))
    prompts = json.loads(PROMPTS.read_text())
    assert prompts["coordinate_system"] == "LPS"
    tumour = prompts["segments"][1]
    tumour["boxes"] = [box for box in tumour["boxes"] if K_FIRST <= box[0][2] < K_FIRST + K_COUNT]
    assert len(tumour["boxes"]) == 1
    prompts_path = folder / "prompts.json"
    prompts_path.write_text(json.dumps(prompts))
    coronal_path = folder / "coronal.nrrd"
    # k along L-R (sagittal), i reversed; k along A-P (coronal), k and j reversed: physical positions kept
    sitk.WriteImage(_stored_as(image, [0, 2, 1], [False, True, True]), str(coronal_path))
    sagittal_dicom = _write_dicom_series(
        _stored_as(image, [1, 2, 0], [True, False, False]),
        folder / "sagittal_dicom",
        data_dir / "dcmqi_ct3slice" / "ct" / "01.dcm",
    )
    copies = {
        "axial": (axial_path, folder / "axial.seg.nrrd"),
        "sagittal": (sagittal_dicom, folder / "sagittal_seg.dcm"),
        "coronal": (coronal_path, folder / "coronal_labels.nii.gz"),
    }
    runs = {}
    with cli_model(litemedsam_openvino_fp32):  # its encoder memo: the copies' axial slices are the axial run's
        memo = litemedsam_openvino_fp32.encoder_override
        for name, (ct, output) in copies.items():
            encodes_before = memo.misses
            handler = _ListHandler()
            logger = logging.getLogger("liversam")
            level = logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            try:
                # --skip-thin-slices 2 and no CRF for all three runs: half the encodes (lits117 has 1 mm slices)
                args = build_parser().parse_args(
                    ["segment", str(ct), "--prompts", str(prompts_path), "--output", str(output), "--quiet",
                     "--report", str(folder / f"{name}_review.json"), "--skip-thin-slices", "2", "--crf", "none",
                     "--lesions", str(folder / f"{name}_lesions.csv")]
                )  # fmt: skip
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    assert args.run(args) == 0
            finally:
                logger.removeHandler(handler)
                logger.setLevel(level)
            own = read_ct(ct).geometry
            runs[name] = {
                "grid": own,
                "seg": read_segmentation(output, reference=own if name == "sagittal" else None),
                "log": handler.lines,
                "output": output,
                "input": ct,
                "review": json.loads((folder / f"{name}_review.json").read_text()),
                "printed": printed.getvalue(),
                "encodes": memo.misses - encodes_before,  # slice inputs the memo had not seen (the axial run's)
            }
    return runs


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _on_axial_grid(seg, reference: ImageGeometry) -> dict[str, np.ndarray]:
    """Each segment's mask resampled (nearest neighbour) onto the axial CT's grid."""
    from liversam.segmentation_io import resample_mask

    return {s.name: resample_mask(s.mask_kji, seg.geometry, reference) for s in seg.segments}


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_sagittal_and_coronal_copies_of_lits117_give_the_axial_runs_segmentation(
    segment_runs, plane, lits117_label
):
    axial_run, run = segment_runs["axial"], segment_runs[plane]
    own = run["grid"]
    assert own.shape_kji != axial_run["grid"].shape_kji  # the copy's voxels are stored in another order
    # written on the copy's own grid (the sagittal DICOM SEG's frames are the series' own slices, read back onto
    # them; the coronal labelmap's grid is the file's): it overlays the file as stored
    assert run["seg"].geometry.is_close(own), run["seg"].geometry.describe_difference(own)
    assert any("reoriented losslessly" in line and f"stored in {plane} slices" in line for line in run["log"])
    assert not any("reoriented losslessly" in line for line in axial_run["log"])
    assert run["review"]["slice_grid"]["input_slices"] == plane
    # the lesion table numbers the axial slices too, and the command says so (the review report has slice_grid)
    assert f"axial slices k of the {plane} CT reoriented" in run["printed"], run["printed"]
    assert "lesion table" in axial_run["printed"] and "axial slices k" not in axial_run["printed"]
    if (
        plane == "sagittal"
    ):  # the SEG was written (its writer refuses masks off the series' grid) on the series' images
        import pydicom

        seg = pydicom.dcmread(run["output"])
        referenced = {
            image.ReferencedSOPInstanceUID
            for frame in seg.PerFrameFunctionalGroupsSequence
            for image in frame.DerivationImageSequence[0].SourceImageSequence
        }
        series = {pydicom.dcmread(path).SOPInstanceUID for path in Path(run["input"]).iterdir()}
        assert seg.Modality == "SEG" and referenced and referenced <= series
    # the model saw the axial run's slices, to the byte: every input of the copy's run was one the axial run encoded
    print(f"{plane}: {run['encodes']} slice inputs new to the encoder memo (the axial run: {axial_run['encodes']})")
    assert run["encodes"] == 0
    reference = axial_run["seg"].geometry
    ours, theirs = _on_axial_grid(run["seg"], reference), _on_axial_grid(axial_run["seg"], reference)
    assert set(ours) == {"liver", "tumor"}
    for name in ours:
        score = dice(ours[name], theirs[name])
        print(f"{plane} {name}: {int(ours[name].sum())} voxels, Dice against the axial run {score:.4f}")
        assert ours[name].any() and score >= 0.99
    liver_dice = dice(ours["liver"] | ours["tumor"], lits117_label[K_FIRST : K_FIRST + K_COUNT] > 0)
    print(f"{plane}: liver (with tumour) Dice against the label {liver_dice:.4f}")
    assert liver_dice >= 0.9
