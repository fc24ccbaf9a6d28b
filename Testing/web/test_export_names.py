"""Export file names after the CT (they were always ``liversam.seg.nrrd`` ...): the case's stem, sanitised."""

from __future__ import annotations

import pytest

from liversam_web.export_names import case_stem, case_title, export_names


@pytest.mark.parametrize(("path", "stem"), [
    ("examples/lits117/ct.nii.gz", "lits117-ct"),  # a generic name takes its folder's
    ("/work/shared/data/totalseg_small/ct.nii.gz", "totalseg_small-ct"),
    ("/work/shared/data/dcmqi_ct3slice/ct", "dcmqi_ct3slice-ct"),  # a DICOM folder
    ("/data/ct_dicom/", "ct_dicom"),
    ("patient 12 (arterial).nrrd", "patient_12_arterial"),
    ("/scans/Leber-Ä_01.mha", "Leber-_01"),
    ("ct.nii.gz", "ct"),  # an upload: no folder known
    ("..nii.gz", "ct"),  # nothing usable left
    ("x" * 200 + ".nii", "x" * 80),
])
def test_case_stem(path: str, stem: str) -> None:
    assert case_stem(path) == stem


def test_export_names_per_kind() -> None:
    assert export_names("lits117-ct") == {"segnrrd": "lits117-ct-liversam.seg.nrrd",
                                          "labelmap": "lits117-ct-liversam-labels.nii.gz",
                                          "dicomseg": "lits117-ct-liversam-seg.dcm"}
    assert export_names("a/b") == export_names("a_b")  # never a path


@pytest.mark.parametrize(("path", "title"), [
    ("/work/main/examples/lits117/ct.nii.gz", "lits117/ct.nii.gz"),  # the header told two ct.nii.gz apart by nothing
    ("/work/shared/data/totalseg_small/ct.nii.gz", "totalseg_small/ct.nii.gz"),
    ("/work/shared/data/dcmqi_ct3slice/ct/", "dcmqi_ct3slice/ct"),
    ("/data/ct_dicom", "ct_dicom"),
    ("/data/hcc0697.nii.gz", "hcc0697.nii.gz"),
    ("ct.nii.gz", "ct.nii.gz"),
])
def test_case_title_puts_the_folder_before_a_generic_name(path: str, title: str) -> None:
    assert case_title(path) == title
