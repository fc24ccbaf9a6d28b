"""A DICOM CT in the page: open the dcmqi 3-slice GE series by its folder, drag a box around the liver,
propagate, download the DICOM SEG and read it on the server side (highdicom, pydicom, liversam.dicom_seg):
one liver segment with SNOMED CT codes, one frame per segmented slice, referencing the CT's series and its
3 instances, and a liver Dice >= 0.85 against dcmqi's own liver SEG of that series. A folder with no series
is refused and leaves the open CT as it was.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect
from web_page import (
    DATA,
    dismiss_error,
    download_as_named,
    drag_box,
    expect_error,
    folder_without_series,
    go_to_slice,
    open_path,
    server_side,
    set_mode,
    wait_job_end,
    wait_slice_mask,
    wait_status,
)

DCMQI = DATA / "dcmqi_ct3slice"

REFERENCE = """
from liversam.dicom_seg import read_dicom_seg
from liversam.dicom_series import read_dicom_series
ct = read_dicom_series(inputs["ct"])
liver = read_dicom_seg(inputs["seg"], reference=ct.geometry).segments[0].mask_kji
boxes = {}
for k in range(liver.shape[0]):
    js, is_ = liver[k].nonzero()
    boxes[k] = [int(is_.min()), int(js.min()), int(is_.max()), int(js.max())] if len(js) else None
out = {"boxes": boxes, "series_uid": ct.metadata["dicom_series_uid"],
       "instances": ct.metadata["dicom_sop_instance_uids"], "shape": list(liver.shape)}
"""

CHECK = """
import highdicom as hd
import pydicom
from liversam.dicom_seg import read_dicom_seg
from liversam.dicom_series import read_dicom_series
ds = pydicom.dcmread(inputs["ours"])
seg = hd.seg.segread(inputs["ours"])
ct = read_dicom_series(inputs["ct"])
ours = read_dicom_seg(inputs["ours"], reference=ct.geometry)
truth = read_dicom_seg(inputs["seg"], reference=ct.geometry).segments[0].mask_kji
liver = ours.segment("liver").mask_kji
referenced = ds.ReferencedSeriesSequence[0]
item = ds.SegmentSequence[0]
out = {
    "modality": str(ds.Modality), "frames": int(ds.NumberOfFrames),
    "segments": [str(s.SegmentLabel) for s in ds.SegmentSequence],
    "highdicom_segments": [int(n) for n in seg.segment_numbers],
    "type_code": str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue),
    "referenced_series": str(referenced.SeriesInstanceUID),
    "referenced_instances": sorted(str(r.ReferencedSOPInstanceUID) for r in referenced.ReferencedInstanceSequence),
    "liver_slices": [int(k) for k in range(liver.shape[0]) if liver[k].any()],
    "dice": float(2 * (liver & truth).sum() / (liver.sum() + truth.sum())),
}
"""


@pytest.fixture(scope="module")
def reference() -> dict:
    if not (DCMQI / "ct").is_dir():
        pytest.fail(f"the dcmqi CT series is not at {DCMQI / 'ct'}: set LIVERSAM_TEST_DATA (see README)")
    return server_side(REFERENCE, ct=str(DCMQI / "ct"), seg=str(DCMQI / "liver_seg.dcm"))


def box_the_liver_on_slice_1(page, reference: dict) -> None:
    """Drag a box 8 voxels around dcmqi's liver on slice 1 and wait for its live update."""
    k = 1
    set_mode(page, "box", "liver")
    screen = go_to_slice(page, k)
    i0, j0, i1, j1 = reference["boxes"][str(k)]
    drag_box(page, screen, (max(i0 - 8, 0), max(j0 - 8, 0), min(i1 + 8, 511), min(j1 + 8, 511)))
    wait_slice_mask(page, "liver", k)


def test_dicom_folder_box_propagate_and_dicom_seg_download(page, reference, tmp_path):
    open_path(page, str(DCMQI / "ct"))
    wait_status(page, r"Opened dcmqi_ct3slice/ct \(512 x 512 x 3\)", timeout=120_000)
    assert page.get_by_test_id("ct-name").inner_text().strip() == "dcmqi_ct3slice/ct"
    expect(page.get_by_test_id("export-dicomseg")).to_be_enabled(timeout=10_000)

    # a folder with no series: a message, and the DICOM CT stays open as it was
    open_path(page, str(folder_without_series(tmp_path / "no-series")))
    expect_error(page, r"no-series.*no DICOM image series")
    assert page.get_by_test_id("ct-name").inner_text().strip() == "dcmqi_ct3slice/ct"
    expect(page.get_by_test_id("export-dicomseg")).to_be_enabled(timeout=10_000)
    dismiss_error(page)

    box_the_liver_on_slice_1(page, reference)
    page.get_by_test_id("propagate").click()
    wait_job_end(page, r"Liver: \d+ voxels")

    ours = download_as_named(page, "export-dicomseg", tmp_path)
    assert ours.name == "dcmqi_ct3slice-ct-liversam-seg.dcm"  # after the CT (it was always liversam-seg.dcm)
    found = server_side(CHECK, ours=str(ours), ct=str(DCMQI / "ct"), seg=str(DCMQI / "liver_seg.dcm"))
    print(f"web app DICOM SEG of the dcmqi 3-slice CT: liver Dice {found['dice']:.3f} against dcmqi's SEG, "
          f"{found['frames']} frames")
    assert found["modality"] == "SEG"
    assert found["segments"] == ["liver"] and found["highdicom_segments"] == [1]  # the empty tumour is left out
    assert found["type_code"] == "10200004"  # SNOMED CT liver
    assert found["referenced_series"] == reference["series_uid"]
    assert found["referenced_instances"] == sorted(reference["instances"])
    assert found["liver_slices"] == [0, 1, 2]
    assert found["frames"] == len(found["liver_slices"])  # one frame per segmented slice
    assert found["dice"] >= 0.85



UPLOADED = """
import pydicom
ds = pydicom.dcmread(inputs["ours"])
referenced = ds.ReferencedSeriesSequence[0]
out = {"segments": [str(s.SegmentLabel) for s in ds.SegmentSequence], "frames": int(ds.NumberOfFrames),
       "referenced_series": str(referenced.SeriesInstanceUID),
       "referenced_instances": len(referenced.ReferencedInstanceSequence)}
"""


def test_uploaded_dicom_folder_gives_a_dicom_seg_too(page, reference, tmp_path):
    """The folder upload button: the files land in the app's temporary folder, the SEG still references them."""
    page.get_by_test_id("upload-folder").locator("input[type=file]").set_input_files(str(DCMQI / "ct"))
    wait_status(page, r"Opened 3 DICOM files in ct \(512 x 512 x 3\)", timeout=120_000)
    expect(page.get_by_test_id("export-dicomseg")).to_be_enabled(timeout=10_000)
    box_the_liver_on_slice_1(page, reference)
    ours = download_as_named(page, "export-dicomseg", tmp_path)
    assert ours.name == "ct-liversam-seg.dcm"  # after the folder chosen
    found = server_side(UPLOADED, ours=str(ours))
    assert found["segments"] == ["liver"] and found["frames"] == 1  # one slice segmented: one frame
    assert found["referenced_series"] == reference["series_uid"] and found["referenced_instances"] == 3


TOTALSEG_DICOM = DATA / "totalseg_small" / "ct_dicom"  # 512 x 512 x 20, slices 2.0 mm apart
TOTALSEG_LIVER_BOX_K10 = (74, 181, 235, 382)  # (i0, j0, i1, j1) around the liver on slice 10 (the QA review's box)


def test_faster_on_thin_slices_reaches_the_job_even_when_ticked_just_before_the_click(page):
    """The QA review ticked "Faster on thin slices" and pressed Propagate at once on the TotalSegmentator series:
    no slice was interpolated. trame's client holds a state change back while a call to the server is pending and
    sends a click at once, so the server read the checkbox as unticked. Here the client is held busy (as a pending
    call holds it) from the tick until the job has ended: the click itself must carry the setting."""
    if not TOTALSEG_DICOM.is_dir():
        pytest.fail(f"the TotalSegmentator DICOM series is not at {TOTALSEG_DICOM}: set LIVERSAM_TEST_DATA")
    open_path(page, str(TOTALSEG_DICOM))
    wait_status(page, r"Opened ct_dicom \(512 x 512 x 20\)", timeout=120_000)
    set_mode(page, "box", "liver")
    screen = go_to_slice(page, 10)
    drag_box(page, screen, TOTALSEG_LIVER_BOX_K10)
    wait_slice_mask(page, "liver", 10)
    page.evaluate("window.trame.client.beginBusy()")
    try:
        page.get_by_test_id("fast-thin").locator("input").check()
        page.get_by_test_id("propagate").click()
        wait_job_end(page, r"Liver: \d+ voxels")
    finally:
        page.evaluate("window.trame.client.endBusy()")
    sources = [t.strip() for t in page.get_by_test_id("review-source").all_inner_texts()]
    # 2.0 mm slices are thin enough: every other slice of the walk is interpolated (9 of 20 from `liversam segment
    # --skip-thin-slices 2` with this box)
    assert sources.count("interpolated") >= 5, sources
    # nothing flagged (`liversam segment` with this box: "no slice range to check"): the review says so, with no
    # "To check" heading above nothing
    assert re.search(r"; 0 slices flagged for review", page.get_by_test_id("status").inner_text())
    expect(page.get_by_test_id("review-none")).to_have_text("Nothing flagged for review.")
    assert page.get_by_test_id("review-item").count() == 0 and page.get_by_text("To check (click").count() == 0
    expect(page.get_by_test_id("fast-thin").locator("input")).to_be_checked()
    page.get_by_test_id("fast-thin").locator("input").uncheck()

    # another DICOM folder opened by its path while this work is not exported: held back once, with the right advice
    # (it said "upload it again" for a folder opened by its path), then opened when Open is pressed again
    open_path(page, str(DCMQI / "ct"), discard=False)
    expect_error(page, r"The segmentation of ct_dicom has changed since it was last exported, and opening dcmqi_ct3slice/ct "
                       r"drops it: export it first \(section 6\), or press Open again to discard it\.")
    open_path(page, str(DCMQI / "ct"))
    wait_status(page, r"Opened dcmqi_ct3slice/ct \(512 x 512 x 3\)", timeout=120_000)
