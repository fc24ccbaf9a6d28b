"""A corpus of bad input for the ``liversam`` command line: every kind fails with exit 2, a message that names
the problem, no traceback, and no output file (an input given as output stays byte-identical: SHA-256).

All bad files are made here in temporary folders (small synthetic CTs; a 20-slice DICOM series copied from
the shared data; the real lits117 ``.nii.gz`` cut to 1,000 bytes). The CLI runs in-process; every case
fails before the model is loaded except the checkpoint cases, which fail while loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from liversam.cli import main

SIZE = (48, 40, 6)  # i, j, k of the synthetic CT


def _synthetic_array(dtype=np.int16) -> np.ndarray:
    array = np.full(SIZE[::-1], -1000, dtype=dtype)
    array[:, 10:30, 12:36] = 60  # a bright block: something to segment
    return array


def _write_image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0), compress: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def _json(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


GOOD_SEGMENT = {"name": "liver", "label": 1, "boxes": [[[12, 10, 2], [35, 29, 2]]]}


def _prompts(path: Path, *segments, system: str = "IJK", **extra) -> Path:
    return _json(path, {"coordinate_system": system, "segments": list(segments or [GOOD_SEGMENT]), **extra})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Ctx:
    """A case's folder with a good CT, good prompts and a default output path."""

    tmp: Path
    dicom_source: Path
    lits117_ct: Path

    @property
    def ct(self) -> Path:
        path = self.tmp / "ct.nrrd"
        if not path.exists():
            _write_image(path, _synthetic_array())
        return path

    @property
    def prompts(self) -> Path:
        return _prompts(self.tmp / "prompts.json")

    @property
    def out(self) -> Path:
        return self.tmp / "out" / "result.seg.nrrd"

    def segment(self, ct=None, prompts=None, output=None, *extra: str) -> list[str]:
        return ["segment", str(ct or self.ct), "--prompts", str(prompts or self.prompts), "--output",
                str(output or self.out), "--accelerate", "plain", *extra]  # fmt: skip

    def dicom(self, name: str = "dicom") -> Path:
        folder = self.tmp / name
        shutil.copytree(self.dicom_source, folder)
        return folder

    def markups(self, markup: dict | str, name: str = "m.mrk.json") -> list[str]:
        _json(self.tmp / name, {"markups": [markup]} if isinstance(markup, dict) else markup)
        prompts = _prompts(self.tmp / "p.json", {"name": "liver", "markups": [name]})
        return self.segment(prompts=prompts)


# A case returns (argv, paths that must not exist afterwards, files that must stay byte-identical).
Build = Callable[[Ctx], tuple[list[str], list[Path], list[Path]]]


@dataclass
class Case:
    id: str
    build: Build
    needles: tuple[str, ...]


def seg(argv_of: Callable[[Ctx], list[str]]) -> Build:
    """A ``segment`` case whose output is the default output path."""
    return lambda ctx: (argv_of(ctx), [ctx.out], [])


# --- CT files --------------------------------------------------------------------------------------------


def _truncated_lits117(ctx: Ctx) -> Path:
    path = ctx.tmp / "truncated.nii.gz"
    path.write_bytes(ctx.lits117_ct.read_bytes()[:1000])
    return path


def _cut(path: Path, fraction: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _corrupt_middle(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return path


def _nifti_with_zero_spacing(ctx: Ctx) -> Path:
    path = _write_image(ctx.tmp / "zero_spacing.nii", _synthetic_array())
    data = bytearray(path.read_bytes())
    data[80:84] = struct.pack("<f", 0.0)  # pixdim[1]: spacing along i
    path.write_bytes(bytes(data))
    return path


def _nrrd_with_directions(ctx: Ctx, directions: str, name: str) -> Path:
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {SIZE[0]} {SIZE[1]} {SIZE[2]}\nspace directions: {directions}\nencoding: raw\nendian: little\n"
        "space origin: (0,0,0)\n\n"
    )
    path = ctx.tmp / name
    path.write_bytes(header.encode() + _synthetic_array().astype("<i2").tobytes())
    return path


def _nan_ct(ctx: Ctx, value: float = np.nan, name: str = "nan.nrrd") -> Path:
    array = _synthetic_array(np.float32)
    array[1, 3:5, 3:6] = value
    return _write_image(ctx.tmp / name, array)


CT_CASES = [
    Case("ct_missing", seg(lambda c: c.segment(ct=c.tmp / "nope.nii.gz")), ("CT not found", "nope.nii.gz")),
    Case("ct_empty_file", seg(lambda c: c.segment(ct=_json(c.tmp / "empty.nii.gz", ""))), ("empty", "empty.nii.gz")),
    Case("ct_truncated_nii_gz_1000_bytes", seg(lambda c: c.segment(ct=_truncated_lits117(c))),
         ("truncated.nii.gz", "truncated")),
    Case("ct_truncated_nii_gz_60_percent",
         seg(lambda c: c.segment(ct=_cut(_write_image(c.tmp / "cut.nii.gz", _synthetic_array(), compress=True)))),
         ("cut.nii.gz", "truncated")),
    Case("ct_truncated_nrrd_gzip",
         seg(lambda c: c.segment(ct=_cut(_write_image(c.tmp / "cut.nrrd", _synthetic_array(), compress=True)))),
         ("cut.nrrd", "truncated")),
    Case("ct_truncated_nii_raw", seg(lambda c: c.segment(ct=_cut(_write_image(c.tmp / "cut.nii", _synthetic_array())))),
         ("cut.nii", "truncated")),
    Case("ct_truncated_mha", seg(lambda c: c.segment(ct=_cut(_write_image(c.tmp / "cut.mha", _synthetic_array())))),
         ("cut.mha", "truncated")),
    Case("ct_corrupt_gzip_stream",
         seg(lambda c: c.segment(ct=_corrupt_middle(_write_image(c.tmp / "bad.nii.gz", _synthetic_array(), compress=True)))),
         ("bad.nii.gz", "corrupt")),
    Case("ct_text_named_nii_gz", seg(lambda c: c.segment(ct=_json(c.tmp / "notes.nii.gz", "just some text\n"))),
         ("notes.nii.gz", "not gzip")),
    Case("ct_wrong_extension", seg(lambda c: c.segment(ct=_json(c.tmp / "ct.png", "x"))),
         ("Unsupported CT file type", "ct.png")),
    Case("ct_2d_image", seg(lambda c: c.segment(ct=_write_image(c.tmp / "flat.nrrd", np.zeros((40, 48), np.int16)))),
         ("2D image", "flat.nrrd")),
    Case("ct_rgb", seg(lambda c: c.segment(ct=_write_image(c.tmp / "rgb.nrrd", np.zeros((4, 32, 32, 3), np.uint8)))),
         ("3 components", "RGB")),
    Case("ct_4d", seg(lambda c: c.segment(
        ct=(sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(_synthetic_array())] * 2), str(c.tmp / "4d.nrrd"))
            or c.tmp / "4d.nrrd"))), ("4D image", "4d.nrrd")),
    Case("ct_too_small", seg(lambda c: c.segment(ct=_write_image(c.tmp / "tiny.nrrd", np.zeros((4, 4, 4), np.int16)))),
         ("too small", "tiny.nrrd")),
    Case("ct_nan_voxels", seg(lambda c: c.segment(ct=_nan_ct(c))), ("6 non-finite voxel", "nan.nrrd", "--replace-nonfinite")),
    Case("ct_inf_voxels", seg(lambda c: c.segment(ct=_nan_ct(c, np.inf, "inf.nrrd"))), ("non-finite", "inf.nrrd")),
    Case("ct_zero_spacing_nifti", seg(lambda c: c.segment(ct=_nifti_with_zero_spacing(c))),
         ("zero_spacing.nii", "spacing")),
    Case("ct_zero_length_axis_nrrd",
         seg(lambda c: c.segment(ct=_nrrd_with_directions(c, "(0,0,0) (0,1,0) (0,0,2)", "zero_axis.nrrd"))),
         ("zero_axis.nrrd", "spacing 0")),
    Case("ct_non_invertible_direction",
         seg(lambda c: c.segment(ct=_nrrd_with_directions(c, "(1,0,0) (1,0,0) (0,0,2)", "singular.nrrd"))),
         ("singular.nrrd", "non-invertible")),
]

# --- DICOM folders ------------------------------------------------------------------------------------------


def _dicom_edit(ctx: Ctx, edit: Callable[[list[Path]], None]) -> Path:
    folder = ctx.dicom()
    edit(sorted(folder.iterdir()))
    return folder


def _duplicate_slice(files: list[Path]) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(files[5])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(files[5].with_name("copy_of_slice.dcm"))


def _resize_one(files: list[Path]) -> None:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(files[7])
    small = ds.pixel_array[::2, ::2].copy()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    ds.save_as(files[7], enforce_file_format=True)


def _set_modality(files: list[Path], modality: str = "MR") -> None:
    import pydicom

    for path in files:
        ds = pydicom.dcmread(path)
        ds.Modality = modality
        ds.save_as(path)


def _cut_end_slice(files: list[Path]) -> None:
    """The series' last slice (the files are named by SOP Instance UID, the last along the normal first) cut short
    inside its header, before Rows: it was left out as "not an image" and 19 slices were read without a word."""
    files[0].write_bytes(files[0].read_bytes()[:2000])


def _not_dicom_folder(ctx: Ctx) -> Path:
    folder = ctx.tmp / "notdicom"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    (folder / "scan.dcm").write_bytes(b"\x00" * 300)
    return folder


def _empty_folder(ctx: Ctx) -> Path:
    (ctx.tmp / "empty_dir").mkdir()
    return ctx.tmp / "empty_dir"


DICOM_CASES = [
    Case("dicom_empty_folder", seg(lambda c: c.segment(ct=_empty_folder(c))), ("No DICOM files", "empty_dir")),
    Case("dicom_no_series", seg(lambda c: c.segment(ct=_not_dicom_folder(c))), ("No DICOM files", "notdicom")),
    Case("dicom_missing_slice", seg(lambda c: c.segment(ct=_dicom_edit(c, lambda f: f[9].unlink()))),
         ("irregular slice spacing", "missing slices")),
    Case("dicom_duplicated_slice", seg(lambda c: c.segment(ct=_dicom_edit(c, _duplicate_slice))),
         ("same slice position", "copy_of_slice.dcm")),
    Case("dicom_mixed_image_sizes", seg(lambda c: c.segment(ct=_dicom_edit(c, _resize_one))),
         ("differ in size",)),
    Case("dicom_end_slice_cut_short", seg(lambda c: c.segment(ct=_dicom_edit(c, _cut_end_slice))),
         ("damaged DICOM file", "16573", "cut short", "complete copy")),
    Case("dicom_non_ct_modality", seg(lambda c: c.segment(ct=_dicom_edit(c, _set_modality))), ("No CT series", "MR")),
    Case("dicom_output_inside_series_folder",
         lambda c: (c.segment(ct=(d := c.dicom()), output=d / "seg.nrrd"), [c.tmp / "dicom" / "seg.nrrd"], []),
         ("inside the input folder", "DICOM")),
    Case("dicom_output_beside_a_series_file_given_as_ct",
         lambda c: (c.segment(ct=sorted((d := c.dicom()).iterdir())[0], output=d / "seg.nrrd"),
                    [c.tmp / "dicom" / "seg.nrrd"], []),
         ("inside the input folder",)),
]

# --- prompts -----------------------------------------------------------------------------------------------


def prompt_case(case_id: str, segments_or_text, *needles: str, **extra) -> Case:
    def argv(ctx: Ctx) -> list[str]:
        path = ctx.tmp / "bad_prompts.json"
        if isinstance(segments_or_text, (str, bytes)):
            path.write_bytes(segments_or_text if isinstance(segments_or_text, bytes) else segments_or_text.encode())
        else:
            _json(path, {"coordinate_system": "IJK", "segments": segments_or_text, **extra})
        return ctx.segment(prompts=path)

    return Case(case_id, seg(argv), needles)


def box(*corners) -> dict:
    return {"name": "liver", "boxes": [list(corners)]}


PROMPT_CASES = [
    Case("prompts_missing_file", seg(lambda c: c.segment(prompts=c.tmp / "absent.json")),
         ("Prompts file not found", "absent.json")),
    prompt_case("prompts_invalid_json", "{not json", "not valid JSON", "bad_prompts.json"),
    prompt_case("prompts_not_utf8", b'{"segments": "\xff\xfe"}', "not UTF-8"),
    prompt_case("prompts_top_level_list", "[1, 2, 3]", "expected an object"),
    prompt_case("prompts_missing_coordinate", [GOOD_SEGMENT, {"name": "tumor", "boxes": [[[10, 10, 2], [30, 30]]]}],
                "segments[1].boxes[0][1]: expected 3 numbers", "got 2"),
    prompt_case("prompts_string_coordinate", [box([12, 10, 2], [35, "29", 2])],
                "segments[0].boxes[0][1][1]: expected a number", "'29'"),
    prompt_case("prompts_nan_coordinate", '{"segments": [{"name": "liver", "points": [[12, NaN, 2]]}]}',
                "segments[0].points[0][1]: expected a finite number", "nan"),
    prompt_case("prompts_infinite_coordinate", '{"segments": [{"name": "liver", "points": [[12, 3, -Infinity]]}]}',
                "segments[0].points[0][2]: expected a finite number"),
    prompt_case("prompts_boolean_coordinate", [{"name": "liver", "points": [[12, True, 2]]}],
                "segments[0].points[0][1]: expected a number", "boolean"),
    prompt_case("prompts_extra_coordinate", [box([12, 10, 2, 0], [35, 29, 2])], "segments[0].boxes[0][0]", "got 4"),
    prompt_case("prompts_wrong_nesting", [{"name": "liver", "boxes": [[12, 10, 2], [35, 29, 2]]}],
                "segments[0].boxes[0]: expected 2 corners", "got 3"),
    prompt_case("prompts_unknown_key", [{**GOOD_SEGMENT, "boxs": []}], "segments[0].boxs: unknown key", "boxes"),
    prompt_case("prompts_unknown_coordinate_system", [GOOD_SEGMENT], "coordinate_system", "'XYZ'",
                coordinate_system="XYZ"),
    prompt_case("prompts_duplicate_names", [GOOD_SEGMENT, {**GOOD_SEGMENT, "label": 2}],
                "segments[1].name", "used twice"),
    prompt_case("prompts_duplicate_labels", [GOOD_SEGMENT, {**GOOD_SEGMENT, "name": "tumor"}],
                "segments[1].label", "used twice"),
    prompt_case("prompts_label_out_of_range", [{**GOOD_SEGMENT, "label": 70000}], "segments[0].label", "65535"),
    prompt_case("prompts_label_not_integer", [{**GOOD_SEGMENT, "label": 1.5}], "segments[0].label: expected an integer"),
    prompt_case("prompts_no_segments", [], "segments", "at least one segment"),
    prompt_case("prompts_segment_not_object", ["liver"], "segments[0]: expected an object"),
    prompt_case("prompts_name_missing", [{"boxes": GOOD_SEGMENT["boxes"]}], "segments[0].name: required key"),
    prompt_case("prompts_inside_unknown_segment", [GOOD_SEGMENT, {"name": "tumor", "inside": "livr",
                                                                   "points": [[20, 20, 2]]}],
                "segments[1].inside", "'livr'", "no segment of that name"),
    prompt_case("prompts_only_negative_points", [{"name": "liver", "negative_points": [[20, 20, 2]]}],
                "segments[0]", "no box or positive point"),
    prompt_case("prompts_point_outside_volume", [{"name": "liver", "points": [[20, 20, 400]]}],
                "segments[0].points[0]", "outside the volume"),
    prompt_case("prompts_zero_area_box", [box([12, 10, 2], [12, 29, 2])], "segments[0].boxes[0]", "zero area"),
    prompt_case("prompts_box_across_slices", [box([12, 10, 1], [35, 29, 4])], "segments[0].boxes[0]", "one axial"),
    prompt_case("prompts_duplicate_json_key",
                '{"segments": [{"name": "liver", "boxes": [], "boxes": [[[12, 10, 2], [35, 29, 2]]]}]}',
                "duplicate key", "'boxes'"),
    prompt_case("prompts_propagate_not_boolean", [{**GOOD_SEGMENT, "propagate": "yes"}],
                "segments[0].propagate: expected true or false"),
]

# --- Slicer markups -------------------------------------------------------------------------------------------

ROI = {"type": "ROI", "coordinateSystem": "LPS", "center": [24.0, 20.0, 4.0], "size": [20.0, 16.0, 1.0]}

MARKUPS_CASES = [
    Case("markups_missing_file", seg(lambda c: c.segment(
        prompts=_prompts(c.tmp / "p.json", {"name": "liver", "markups": ["gone.mrk.json"]}))),
        ("Markups file not found", "gone.mrk.json")),
    Case("markups_invalid_json", seg(lambda c: c.markups("{oops")), ("m.mrk.json", "not valid JSON")),
    Case("markups_no_markups_list", seg(lambda c: c.markups('{"points": []}')), ("m.mrk.json", "no 'markups' list")),
    Case("markups_unsupported_type", seg(lambda c: c.markups({"type": "Line", "controlPoints": []})),
         ("markups[0].type", "'Line'")),
    Case("markups_roi_without_size", seg(lambda c: c.markups({k: v for k, v in ROI.items() if k != "size"})),
         ("markups[0]", "an ROI needs size")),
    Case("markups_point_string_position", seg(lambda c: c.markups(
        {"type": "Fiducial", "controlPoints": [{"position": [10, "a", 2]}]})),
        ("markups[0].controlPoints[0].position[1]", "expected a number")),
    Case("markups_unknown_coordinate_system", seg(lambda c: c.markups({**ROI, "coordinateSystem": "XYZ"})),
         ("markups[0].coordinateSystem", "'XYZ'")),
    Case("markups_roi_outside_volume", seg(lambda c: c.markups({**ROI, "center": [500.0, 20.0, 4.0]})),
         ("m.mrk.json", "outside the volume")),
    Case("markups_as_prompts_with_nan", seg(lambda c: c.segment(prompts=_json(
        c.tmp / "direct.mrk.json", '{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, NaN, 2]}]}]}'))),
        ("direct.mrk.json", "finite number")),
]

# --- checkpoints (fail while the model loads) ------------------------------------------------------------------


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _pickled_code(ctx: Ctx) -> Path:
    path = ctx.tmp / "evil.pth"
    path.write_bytes(pickle.dumps({"model_state": _Exploit()}))
    return path


def _wrong_architecture(ctx: Ctx) -> Path:
    import torch

    path = ctx.tmp / "other_net.pt"
    torch.save({"format": "liversam-checkpoint/1", "base_model": "litemedsam",
                "model_state": {"layer.weight": torch.zeros(3, 3)}}, path)  # fmt: skip
    return path


def _truncated_checkpoint(ctx: Ctx) -> Path:
    import torch

    path = ctx.tmp / "cut.pt"
    torch.save({"model_state": {"w": torch.zeros(1000)}}, path)
    return _cut(path, 0.5)


def model_case(case_id: str, make: Callable[[Ctx], str], *needles: str) -> Case:
    return Case(case_id, seg(lambda c: c.segment(None, None, None, "--model", make(c))), needles)


CHECKPOINT_CASES = [
    model_case("checkpoint_missing", lambda c: str(c.tmp / "missing.pth"), "Unknown model", "missing.pth"),
    model_case("checkpoint_corrupt_bytes", lambda c: str(_json(c.tmp / "junk.pth", "\x00garbage" * 50)),
               "junk.pth", "is not a PyTorch checkpoint: it starts with the bytes 00 67 61 72"),
    model_case("checkpoint_pickled_code", lambda c: str(_pickled_code(c)), "evil.pth", "never pickled code"),
    model_case("checkpoint_wrong_architecture", lambda c: str(_wrong_architecture(c)), "other_net.pt",
               "does not fit"),
    model_case("checkpoint_truncated", lambda c: str(_truncated_checkpoint(c)), "cut.pt", "not a loadable"),
    model_case("checkpoint_official_name_wrong_file", lambda c: "sam_vit_b=" + str(_json(c.tmp / "v.pth", "x" * 99)),
               "SHA-256", "v.pth"),
]

# --- output paths ----------------------------------------------------------------------------------------------


def _same_as_input(ctx: Ctx, how: str) -> tuple[list[str], list[Path], list[Path]]:
    ct = ctx.tmp / "ct.nii.gz"
    _write_image(ct, _synthetic_array(), compress=True)
    if how == "same":
        out = ct
    elif how == "symlink":
        out = ctx.tmp / "link.nii.gz"
        out.symlink_to(ct)
    elif how == "hardlink":
        out = ctx.tmp / "hard.nii.gz"
        os.link(ct, out)
    else:  # the same file through a symlinked folder
        (ctx.tmp / "alias").symlink_to(ctx.tmp)
        out = ctx.tmp / "alias" / "ct.nii.gz"
    return ctx.segment(ct=ct, output=out), [], [ct]


def _parent_is_file(ctx: Ctx) -> tuple[list[str], list[Path], list[Path]]:
    blocker = _json(ctx.tmp / "blocker", "a file")
    return ctx.segment(output=blocker / "x.seg.nrrd"), [], [blocker]


def _unwritable(ctx: Ctx) -> tuple[list[str], list[Path], list[Path]]:
    # Root may write into a chmod 555 folder, so use a folder nobody can create files in.
    return ctx.segment(output=Path("/proc/liversam-test/x.seg.nrrd")), [Path("/proc/liversam-test")], []


def _output_folder(ctx: Ctx) -> tuple[list[str], list[Path], list[Path]]:
    folder = ctx.tmp / "d.nrrd"
    folder.mkdir()
    return ctx.segment(output=folder), [], []


def _export_onto_input(ctx: Ctx) -> tuple[list[str], list[Path], list[Path]]:
    label = _write_image(ctx.tmp / "label.nrrd", (_synthetic_array() > 0).astype(np.uint8))
    return ["export", str(label), "--output", str(label)], [], [label]


def _evaluate_case(ctx: Ctx, label_array: np.ndarray, cut: bool = False) -> tuple[list[str], list[Path], list[Path]]:
    case = ctx.tmp / "case"
    case.mkdir()
    _write_image(case / "ct.nii.gz", _synthetic_array(), compress=True)
    label = _write_image(case / "label.nii.gz", label_array, compress=True)
    if cut:
        _cut(label)
    out = ctx.tmp / "results.json"
    return ["evaluate", "--data", str(case), "--output", str(out), "--accelerate", "plain", "--no-progress"], [out], []


def _train_onto_manifest(ctx: Ctx) -> tuple[list[str], list[Path], list[Path]]:
    run = ctx.tmp / "run"
    run.mkdir()
    ct = _write_image(ctx.tmp / "s_ct.nii.gz", _synthetic_array(), compress=True)
    label = _write_image(ctx.tmp / "s_label.nii.gz", (_synthetic_array() > 0).astype(np.uint8), compress=True)
    manifest = _json(run / "config.json", [{"id": "s1", "ct": str(ct), "label": str(label)}])
    return ["train", "--data", str(manifest), "--out", str(run), "--no-progress"], [run / "state.pt"], [manifest]


def _train_label_grid(ctx: Ctx) -> tuple[list[str], list[Path], list[Path]]:
    study = ctx.tmp / "data" / "s1"
    study.mkdir(parents=True)
    _write_image(study / "ct.nii.gz", _synthetic_array(), compress=True)
    _write_image(study / "label.nii.gz", np.ones((6, 40, 40), np.uint8), compress=True)
    run = ctx.tmp / "run"
    return (["train", "--data", str(ctx.tmp / "data"), "--out", str(run), "--no-progress", "--device", "cpu"],
            [run / "state.pt", run / "best.pt", run / "split.json"], [])


def _export_truncated(ctx: Ctx) -> tuple[list[str], list[Path], list[Path]]:
    label = _cut(_write_image(ctx.tmp / "seg.nii.gz", (_synthetic_array() > 0).astype(np.uint8), compress=True))
    out = ctx.tmp / "converted.seg.nrrd"
    return ["export", str(label), "--output", str(out)], [out], [label]


OUTPUT_CASES = [
    Case("output_is_the_input", lambda c: _same_as_input(c, "same"), ("is the input file", "never overwrites")),
    Case("output_symlink_to_input", lambda c: _same_as_input(c, "symlink"), ("link.nii.gz", "is the input file")),
    Case("output_hard_link_to_input", lambda c: _same_as_input(c, "hardlink"), ("hard.nii.gz", "through a link")),
    Case("output_through_symlinked_folder", lambda c: _same_as_input(c, "folder"), ("is the input file",)),
    Case("output_is_the_prompts_file", lambda c: (c.segment(output=c.prompts), [], [c.prompts]),
         ("unsupported file type",)),
    Case("report_is_the_ct", lambda c: (c.segment(None, None, None, "--report", str(c.ct)), [c.out], [c.ct]),
         ("--report", "is the input file")),
    Case("lesions_is_the_prompts_file",
         lambda c: (c.segment(None, None, None, "--lesions", str(c.prompts)), [c.out], [c.prompts]),
         ("--lesions", "is the input file")),
    Case("output_equals_report", lambda c: (c.segment(None, None, c.tmp / "a.nii.gz", "--report",
                                                      str(c.tmp / "a.nii.gz")), [c.tmp / "a.nii.gz"], []),
         ("same file as",)),
    Case("output_parent_is_a_file", _parent_is_file, ("blocker", "not a folder")),
    Case("output_unwritable_folder", _unwritable, ("cannot write into the folder",)),
    Case("output_is_a_folder", _output_folder, ("is a folder",)),
    Case("output_unknown_extension", seg(lambda c: c.segment(output=c.tmp / "out" / "result.png")),
         ("unsupported file type", ".seg.nrrd")),
    Case("output_dicom_seg_without_dicom_ct", seg(lambda c: c.segment(output=c.tmp / "out" / "seg.dcm")),
         ("DICOM SEG", "not a DICOM folder")),
    Case("lesions_unknown_extension", seg(lambda c: c.segment(None, None, None, "--lesions", str(c.tmp / "l.txt"))),
         ("--lesions", ".csv or .json")),
    Case("export_onto_its_input", _export_onto_input, ("is the input file",)),
    Case("evaluate_label_on_another_grid", lambda c: _evaluate_case(c, np.zeros((6, 40, 40), np.uint8)),
         ("not on the grid", "label.nii.gz", "size")),
    Case("evaluate_truncated_label", lambda c: _evaluate_case(c, (_synthetic_array() > 0).astype(np.uint8), cut=True),
         ("label.nii.gz", "truncated")),
    Case("train_run_file_is_the_manifest", _train_onto_manifest, ("config.json", "is the input file")),
    Case("train_label_on_another_grid", _train_label_grid, ("s1", "not on the grid", "label.nii.gz")),
    Case("export_truncated_segmentation", _export_truncated, ("seg.nii.gz", "truncated")),
]

ALL_CASES = CT_CASES + DICOM_CASES + PROMPT_CASES + MARKUPS_CASES + CHECKPOINT_CASES + OUTPUT_CASES


@pytest.fixture(scope="session")
def dicom_source(data_dir: Path) -> Path:
    return data_dir / "totalseg_small" / "ct_dicom"


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(
    case: Case, tmp_path, capsys, dicom_source, lits117_ct_path
):
    ctx = Ctx(tmp=tmp_path, dicom_source=dicom_source, lits117_ct=lits117_ct_path)
    argv, must_not_exist, unchanged = case.build(ctx)
    before = {p: sha256(p) for p in unchanged}
    listing = {p for p in tmp_path.rglob("*")}
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err
    for needle in case.needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    for path in must_not_exist + ([ctx.out] if ctx.out not in unchanged else []):
        assert not path.exists(), f"{path} was written"
    for path, digest in before.items():
        assert sha256(path) == digest, f"{path} changed"
    new = {p for p in tmp_path.rglob("*")} - listing
    assert not new, f"files appeared: {sorted(new)}"


def test_corpus_covers_at_least_40_kinds():
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES) >= 40
    groups = {c.id.split("_")[0] for c in ALL_CASES}
    assert {"ct", "dicom", "prompts", "markups", "checkpoint", "output"} <= groups
