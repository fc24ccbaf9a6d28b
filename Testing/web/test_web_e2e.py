"""The LiverSAM web page in headless Chromium, end to end against a real `liversam serve`.

A user's session in order: bad inputs first (each shows a message and changes nothing), then lits117: open
it by path, a box dragged outside the image is refused, a box dragged around the liver on slice 33 gives
that slice's mask, Cancel stops a propagation and changes nothing, propagation runs with a progress bar, a tumour box on slice 83 gives a lesion mask, the labelmap downloaded from the page has a 3D liver
Dice >= 0.90 against examples/lits117/label.nii.gz (labels 1 + 2), the .seg.nrrd downloads, undo works.
The page's voxel probe (i, j, k under the mouse) maps screen pixels to voxels, as a user reads it.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from web_page import (
    JOB_TIMEOUT_MS,
    ScreenMap,
    dismiss_error,
    drag,
    expect_error,
    open_path,
    read_nifti,
    save_small_png,
    wait_status,
)

REPO = Path(__file__).resolve().parents[2]
CT = REPO / "examples/lits117/ct.nii.gz"
LABEL = REPO / "examples/lits117/label.nii.gz"
SCREENSHOT = Path(os.environ.get("LIVERSAM_WEB_SCREENSHOT", REPO / "docs/web_app.png"))
SLICE_K = 33
TUMOUR_K = 83
TUMOUR_BOX = (56, 0, 115, 25)  # examples/lits117/prompts.json: (i0, j0, i1, j1) on slice 83


def test_bad_inputs_show_a_message_and_change_nothing(page, tmp_path):
    not_ct = tmp_path / "notes.nii.gz"
    not_ct.write_text("this is not a CT")
    open_path(page, str(not_ct))
    text = expect_error(page, r"not an image|could not be read")
    assert "notes.nii.gz" in text
    assert page.get_by_test_id("ct-name").inner_text().strip() == ""  # no CT opened

    no_series = tmp_path / "no-dicom"
    no_series.mkdir()
    (no_series / "readme.txt").write_text("no images here")
    (no_series / "more.txt").write_text("still none")
    open_path(page, str(no_series))
    expect_error(page, r"no DICOM image series")
    assert page.get_by_test_id("ct-name").inner_text().strip() == ""

    open_path(page, str(tmp_path / "missing.nrrd"))
    expect_error(page, r"does not exist")
    assert page.get_by_test_id("ct-name").inner_text().strip() == ""

    upload = tmp_path / "upload.nrrd"
    upload.write_text("NRRD0004\nnot really\n")
    dismiss_error(page)
    page.get_by_test_id("upload-file").locator("input[type=file]").set_input_files(str(upload))
    expect_error(page, r"uploaded file 'upload\.nrrd'.*(not an image|could not be read)")
    assert page.get_by_test_id("ct-name").inner_text().strip() == ""


def test_lits117_box_propagate_export(page, tmp_path):
    label = read_nifti(LABEL)
    liver = label > 0
    open_path(page, str(CT))
    wait_status(page, r"Opened ct\.nii\.gz", timeout=120_000)
    assert page.get_by_test_id("ct-name").inner_text().strip() == "ct.nii.gz"

    slice_field = page.get_by_test_id("axial-k").locator("input")
    slice_field.fill(str(SLICE_K))
    slice_field.press("Enter")
    view = page.locator(".remote-controlled-area").first  # the axial (red) view leads the layout
    view_box = view.bounding_box()
    assert view_box is not None
    deadline = time.monotonic() + 20
    while True:  # the views follow the slice field
        screen = ScreenMap(page, view_box)
        if screen.k == SLICE_K or time.monotonic() > deadline:
            break
    assert screen.k == SLICE_K, f"the axial view shows slice {screen.k}, not {SLICE_K}"

    # a box dragged where there is no image (left of the CT, i < 0) is refused and changes nothing
    left = screen.to_screen(-40, 20)
    if left[0] > view_box["x"] + 5:
        drag(page, left, screen.to_screen(-10, 60))
        expect_error(page, r"outside the image")
        dismiss_error(page)
        assert not page.get_by_test_id("undo").is_enabled()

    # a user's loose box around the liver on slice 33
    js, is_ = np.nonzero(liver[SLICE_K])
    ni, nj = liver.shape[2], liver.shape[1]
    corner_a = screen.to_screen(max(is_.min() - 3, 0), max(js.min() - 3, 0))
    corner_b = screen.to_screen(min(is_.max() + 3, ni - 1), min(js.max() + 3, nj - 1))
    drag(page, corner_a, corner_b)
    status = wait_status(page, rf"Liver on slice {SLICE_K}: (\d+) voxels", timeout=JOB_TIMEOUT_MS)  # the first call loads the model
    area = int(re.search(r": (\d+) voxels", status).group(1))
    truth_area = int(liver[SLICE_K].sum())
    assert 0.85 * truth_area <= area <= 1.15 * truth_area, (area, truth_area)

    # Cancel stops the job and changes nothing; then propagate for real
    page.get_by_test_id("propagate").click()
    page.get_by_test_id("cancel").click(timeout=30_000)
    wait_status(page, r"Propagating the liver: cancelled; nothing changed", timeout=JOB_TIMEOUT_MS)
    assert page.get_by_test_id("review-row").count() == 0
    assert page.get_by_test_id("undo").is_enabled()  # the box is still there to undo

    page.get_by_test_id("propagate").click()
    page.get_by_test_id("progress").wait_for(timeout=30_000)
    progress_texts = set()
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        progress_texts.add(page.get_by_test_id("progress-text").inner_text())
        if page.get_by_test_id("cancel").count() == 0 and page.get_by_test_id("review-row").count():
            break
        time.sleep(0.3)
    status = wait_status(page, r"Liver: \d+ voxels", timeout=10_000)
    assert any(re.search(r"Propagating the liver: .*\d+/\d+", t) for t in progress_texts), progress_texts
    assert page.get_by_test_id("review-row").count() > 10

    # a tumour: the lesion box of the demo prompts on slice 83, segmented inside the liver
    tumour = label == 2
    page.get_by_test_id("segment-tumor").click()
    slice_field.fill(str(TUMOUR_K))
    slice_field.press("Enter")
    deadline = time.monotonic() + 20
    while True:
        screen = ScreenMap(page, view_box)
        if screen.k == TUMOUR_K or time.monotonic() > deadline:
            break
    assert screen.k == TUMOUR_K
    drag(page, screen.to_screen(*TUMOUR_BOX[:2]), screen.to_screen(*TUMOUR_BOX[2:]))
    wait_status(page, rf"Tumor on slice {TUMOUR_K}: [1-9]\d* voxels", timeout=JOB_TIMEOUT_MS)

    page.get_by_test_id("mode-navigate").click()  # put the mouse away for a clean screenshot
    page.mouse.move(5, 5)
    page.get_by_test_id("review-row").first.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    save_small_png(page.screenshot(), SCREENSHOT)

    with page.expect_download(timeout=60_000) as download:
        page.get_by_test_id("export-labelmap").click()
    labels_path = tmp_path / "labels.nii.gz"
    download.value.save_as(labels_path)
    ours = read_nifti(labels_path)
    assert ours.shape == liver.shape
    predicted = ours > 0
    dice = 2.0 * (predicted & liver).sum() / (predicted.sum() + liver.sum())
    print(f"web app lits117 one-box liver Dice {dice:.3f} (slice {SLICE_K} area {area} vs {truth_area})")
    assert dice >= 0.90
    ours_tumour, true_tumour = ours[TUMOUR_K] == 2, tumour[TUMOUR_K]
    tumour_dice = 2.0 * (ours_tumour & true_tumour).sum() / (ours_tumour.sum() + true_tumour.sum())
    print(f"web app lits117 tumour Dice on slice {TUMOUR_K} (one box): {tumour_dice:.3f}")
    assert tumour_dice >= 0.5

    with page.expect_download(timeout=60_000) as download:
        page.get_by_test_id("export-segnrrd").click()
    seg_path = tmp_path / "liversam.seg.nrrd"
    download.value.save_as(seg_path)
    header = seg_path.read_bytes()[:4000].decode("latin-1")
    assert header.startswith("NRRD") and "Segment0_Name:=liver" in header and "Segment1_Name:=tumor" in header

    # review row click: the views jump to that slice
    row = page.get_by_test_id("review-row").nth(3)
    row_k = int(row.locator("td").first.inner_text())
    row.click()
    deadline = time.monotonic() + 10
    while page.get_by_test_id("axial-k").locator("input").input_value() != str(row_k):
        assert time.monotonic() < deadline, "the slice field did not follow the review row"
        time.sleep(0.2)

    page.get_by_test_id("undo").click()
    wait_status(page, rf"Undone: tumor box on slice {TUMOUR_K}", timeout=20_000)
    page.get_by_test_id("undo").click()
    wait_status(page, r"Undone: propagate liver", timeout=20_000)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-s"]))
