"""The LiverSAM web page in headless Chromium, end to end against a real `liversam serve`.

Bad inputs first (each shows a message and opens nothing). Then one reader's session on
lits117 in one page, step by step (each test goes on from where the previous one left the page, so they run
in file order; a step that finds the page not where it expects fails and says so):

1. open lits117 by path; a box dragged outside the image is refused; a loose box around the liver on slice 33
   gives that slice's mask (area within 15 % of the label's);
2. a - point and a + point change the mask on slice 33 only, and the clicked voxels leave / join the liver;
3. undo steps back through both points to exactly the box's mask;
4. Cancel stops a propagation and changes nothing; the propagation shows its progress; the labelmap downloaded
   from the page has a 3D liver Dice >= 0.90 against examples/lits117/label.nii.gz (labels 1 + 2); a review
   row moves the views; the screenshot in docs/ is taken here;
5. a box on the worst propagated slice fixes it; re-propagating from it changes the fixed slice and at most one
   slice each way (none at or below the box slice 33), keeps the fix, and does not lower the 3D liver Dice;
6. a tumour box on slice 83 gives a lesion mask (slice Dice >= 0.5); propagating it fills several slices,
   inside the liver (no voxel outside the liver appears), lists the lesion; the .seg.nrrd downloads;
7. undo of the tumour propagation restores the labelmap exactly and empties the lesion table;
8. with this case open, a folder with no series, a box outside the volume and a tumour point with no lesion box
   give messages and change nothing.

Every check reads what the page shows or what it downloads (the labelmap export: what the user gets).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from web_page import (
    DATA,
    JOB_TIMEOUT_MS,
    REPO,
    ScreenMap,
    axial_view_box,
    dismiss_error,
    download_as_named,
    download_labels,
    drag_box,
    expect_error,
    folder_without_series,
    go_to_slice,
    loose_box,
    open_app_page,
    open_path,
    probe,
    read_nifti,
    review_table_overflow,
    save_small_png,
    scroll_panel,
    set_mode,
    status_text,
    uncovered_in_viewport,
    undo_label,
    wait_job_end,
    wait_slice_mask,
    wait_status,
    wait_undo_label,
)

CT = REPO / "examples/lits117/ct.nii.gz"
LABEL = REPO / "examples/lits117/label.nii.gz"
SCREENSHOT = Path(os.environ.get("LIVERSAM_WEB_SCREENSHOT", REPO / "docs/web_app.png"))
SLICE_K = 33
TUMOUR_K = 83
TUMOUR_BOX = (56, 0, 115, 25)  # examples/lits117/prompts.json: (i0, j0, i1, j1) on slice 83


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def blob_centre(region: np.ndarray) -> tuple[int, int]:
    """(i, j) of the region voxel with the most region voxels around it (7 x 7): well inside an error."""
    padded = np.pad(region.astype(np.int32), 3)
    counts = sum(np.roll(np.roll(padded, dj, 0), di, 1) for dj in range(-3, 4) for di in range(-3, 4))[3:-3, 3:-3]
    counts[~region] = -1
    j, i = np.unravel_index(int(np.argmax(counts)), counts.shape)
    return int(i), int(j)


def test_bad_inputs_show_a_message_and_change_nothing(page, tmp_path):
    """Whatever case the app shows (none, or the last test's), each bad input leaves it shown."""
    shown = page.get_by_test_id("ct-name").inner_text().strip()
    not_ct = tmp_path / "notes.nii.gz"
    not_ct.write_text("this is not a CT")
    open_path(page, str(not_ct))
    text = expect_error(page, r"not an image|could not be read|not a NIfTI image")
    assert "notes.nii.gz" in text
    assert page.get_by_test_id("ct-name").inner_text().strip() == shown  # no CT opened

    open_path(page, str(folder_without_series(tmp_path / "no-dicom")))
    expect_error(page, r"no DICOM image series")
    assert page.get_by_test_id("ct-name").inner_text().strip() == shown

    open_path(page, str(tmp_path / "missing.nrrd"))
    expect_error(page, r"does not exist")
    assert page.get_by_test_id("ct-name").inner_text().strip() == shown

    upload = tmp_path / "upload.nrrd"
    upload.write_text("NRRD0004\nnot really\n")
    dismiss_error(page)
    page.get_by_test_id("upload-file").locator("input[type=file]").set_input_files(str(upload))
    expect_error(page, r"uploaded file 'upload\.nrrd'.*(not an image|could not be read|is damaged)")
    assert page.get_by_test_id("ct-name").inner_text().strip() == shown


# ====================================================================== one reader's session on lits117
class Session:
    """The page of the lits117 session and what the steps measured on it."""

    def __init__(self, page, folder: Path) -> None:
        self.page = page
        self.folder = folder
        self.label = read_nifti(LABEL)
        self.liver = self.label > 0
        self.tumour = self.label == 2
        self.step = 0
        self.labels: dict[str, np.ndarray] = {}
        self._downloads = 0

    def go_on_from(self, step: int) -> None:
        """Each step starts where the previous one left the page."""
        if self.step != step:
            pytest.fail(f"step {step} of the lits117 session did not finish; this step needs its result")

    def labels_now(self) -> np.ndarray:
        self._downloads += 1
        return download_labels(self.page, self.folder / f"labels-{self._downloads}.nii.gz")


@pytest.fixture(scope="module")
def lits(browser, web_app, tmp_path_factory):
    context, page = open_app_page(browser, web_app.url)
    yield Session(page, tmp_path_factory.mktemp("lits117-downloads"))
    context.close()


def outside_drag(screen: ScreenMap, view_box: dict, ni: int, nj: int) -> tuple[tuple, tuple]:
    """Two screen points of a box that lies in the view but entirely outside the CT (left, right, above or below)."""
    for a, b in (((-40, 20), (-10, 60)), ((ni + 10, 20), (ni + 40, 60)), ((20, -40), (60, -10)),
                 ((20, nj + 10), (60, nj + 40))):
        pa, pb = screen.to_screen(*a), screen.to_screen(*b)
        inside = all(view_box["x"] + 5 < p[0] < view_box["x"] + view_box["width"] - 5
                     and view_box["y"] + 5 < p[1] < view_box["y"] + view_box["height"] - 5 for p in (pa, pb))
        if inside:
            return pa, pb
    raise AssertionError("the axial view shows no background around the CT to drag a box on")


def drag_outside_the_ct(page, lits: Session, k: int) -> ScreenMap:
    """On slice k, drag a box on the view's background beside the CT: the page refuses it (message dismissed)."""
    screen = go_to_slice(page, k)
    _, nj, ni = lits.liver.shape
    a, b = outside_drag(screen, axial_view_box(page), ni, nj)
    page.mouse.move(*a)
    page.mouse.down()
    page.mouse.move(*b, steps=6)
    page.mouse.up()
    expect_error(page, r"Box ignored: .*outside the image")
    dismiss_error(page)
    return screen


def test_1_open_refuse_a_box_outside_and_segment_slice_33(lits):
    page = lits.page
    open_path(page, str(CT))
    wait_status(page, r"Opened lits117/ct\.nii\.gz", timeout=120_000)
    assert page.get_by_test_id("ct-name").inner_text().strip() == "lits117/ct.nii.gz"
    assert not page.get_by_test_id("export-dicomseg").is_enabled()  # not a DICOM CT: no DICOM SEG
    assert "opened from a DICOM series" in page.get_by_test_id("dicomseg-note").inner_text()
    # an export refused (nothing segmented yet) says so and downloads nothing (it downloaded a file holding "null")
    downloads: list = []

    def downloaded(download) -> None:
        downloads.append(download)

    page.on("download", downloaded)
    page.get_by_test_id("export-segnrrd").click()
    expect_error(page, r"Nothing to export yet")
    page.wait_for_timeout(1500)
    page.remove_listener("download", downloaded)
    assert downloads == []
    dismiss_error(page)

    set_mode(page, "box", "liver")
    screen = drag_outside_the_ct(page, lits, SLICE_K)
    assert not page.get_by_test_id("undo").is_enabled()  # nothing happened

    drag_box(page, screen, loose_box(lits.liver[SLICE_K]))
    area = wait_slice_mask(page, "liver", SLICE_K)  # the first call loads the model
    truth_area = int(lits.liver[SLICE_K].sum())
    print(f"web app lits117 slice {SLICE_K}: box mask {area} voxels, label {truth_area}")
    assert 0.85 * truth_area <= area <= 1.15 * truth_area, (area, truth_area)
    labels = lits.labels_now()
    assert int((labels[SLICE_K] == 1).sum()) == area
    assert not np.delete(labels, SLICE_K, axis=0).any()  # one slice segmented, nothing else
    lits.labels["box"] = labels
    lits.step = 1


def click_point(page, screen: ScreenMap, i: int, j: int) -> tuple[int, int, int]:
    """Click on voxel (i, j); returns the voxel the page's probe reports under the mouse there."""
    x, y = screen.to_screen(i, j)
    voxel = probe(page, x, y)
    page.mouse.click(x, y)
    return voxel


def test_2_points_change_the_mask_on_their_slice_only(lits):
    lits.go_on_from(1)
    page = lits.page
    screen = go_to_slice(page, SLICE_K)
    box = lits.labels["box"]

    # a - point where the mask is not liver (or, with no such error, on the mask): that voxel leaves the mask
    mask = box[SLICE_K] > 0
    wrong = mask & ~lits.liver[SLICE_K]
    set_mode(page, "point-")
    before = status_text(page)
    i, j, k = click_point(page, screen, *blob_centre(wrong if wrong.sum() >= 20 else mask))
    assert k == SLICE_K and mask[j, i], (i, j, k)
    wait_undo_label(page, rf"- point on slice {SLICE_K}")
    area = wait_slice_mask(page, "liver", SLICE_K, before=before)
    minus = lits.labels_now()
    assert minus[k, j, i] == 0, "the voxel of the - point is still in the liver mask"
    assert int((minus[SLICE_K] == 1).sum()) == area != int(mask.sum())
    assert np.array_equal(np.delete(minus, SLICE_K, axis=0), np.delete(box, SLICE_K, axis=0))

    # a + point on liver the mask now misses: that voxel joins the mask
    missed = lits.liver[SLICE_K] & (minus[SLICE_K] == 0)
    set_mode(page, "point+")
    before = status_text(page)
    i, j, k = click_point(page, screen, *blob_centre(missed))
    assert k == SLICE_K and missed[j, i], (i, j, k)
    wait_undo_label(page, rf"\+ point on slice {SLICE_K}")
    area = wait_slice_mask(page, "liver", SLICE_K, before=before)
    plus = lits.labels_now()
    assert plus[k, j, i] == 1, "the voxel of the + point is not in the liver mask"
    assert int((plus[SLICE_K] == 1).sum()) == area
    assert not np.array_equal(plus[SLICE_K], minus[SLICE_K])
    assert np.array_equal(np.delete(plus, SLICE_K, axis=0), np.delete(box, SLICE_K, axis=0))
    print(f"web app lits117 slice {SLICE_K} Dice: box {dice(mask, lits.liver[SLICE_K]):.3f}, after - point "
          f"{dice(minus[SLICE_K] > 0, lits.liver[SLICE_K]):.3f}, after + point "
          f"{dice(plus[SLICE_K] > 0, lits.liver[SLICE_K]):.3f}")
    lits.labels["minus"] = minus
    lits.step = 2


def test_3_undo_steps_back_through_the_points(lits):
    lits.go_on_from(2)
    page = lits.page
    page.get_by_test_id("undo").click()
    wait_status(page, rf"Undone: \+ point on slice {SLICE_K}", timeout=20_000)
    assert np.array_equal(lits.labels_now(), lits.labels["minus"])
    page.get_by_test_id("undo").click()
    wait_status(page, rf"Undone: - point on slice {SLICE_K}", timeout=20_000)
    assert np.array_equal(lits.labels_now(), lits.labels["box"])
    assert re.search(rf"liver box on slice {SLICE_K}", undo_label(page))
    set_mode(page, "box")
    lits.step = 3


def test_4_cancel_then_propagate_the_liver(lits):
    lits.go_on_from(3)
    page = lits.page
    page.get_by_test_id("propagate").click()
    page.get_by_test_id("cancel").wait_for(timeout=30_000)
    # at 1400 x 900 the progress and Cancel stay in sight, the panel scrolled up or down (Cancel and the bar were
    # below the fold under section 4, and the status line had no count)
    for to in ("bottom", "top"):
        scroll_panel(page, to)
        assert uncovered_in_viewport(page, "cancel"), f"Cancel is out of sight with the panel scrolled to the {to}"
        assert uncovered_in_viewport(page, "progress") and uncovered_in_viewport(page, "status")
    wait_status(page, r"Propagating the liver: .*\d+/\d+", timeout=JOB_TIMEOUT_MS)
    page.get_by_test_id("cancel").click(timeout=30_000)
    wait_status(page, r"Propagating the liver: cancelled; nothing changed", timeout=JOB_TIMEOUT_MS)
    assert page.get_by_test_id("review-row").count() == 0
    assert np.array_equal(lits.labels_now(), lits.labels["box"])

    page.get_by_test_id("propagate").click()
    progress = wait_job_end(page, r"Liver: \d+ voxels, \d+\.\d mL; \d+ slices? flagged for review")  # (it said "649.432 ml")
    assert any(re.search(r"Propagating the liver: .*\d+/\d+", t) for t in progress), progress
    assert page.get_by_test_id("review-row").count() > 10
    labels = lits.labels_now()
    liver_dice = dice(labels > 0, lits.liver)
    print(f"web app lits117 one-box liver Dice {liver_dice:.3f}")
    assert liver_dice >= 0.90
    lits.labels["propagated"] = labels

    row = page.get_by_test_id("review-row").nth(3)  # a review row moves the views to its slice
    row_k = int(row.locator("td").first.inner_text())
    row.click()
    deadline = time.monotonic() + 10
    while page.get_by_test_id("axial-k").locator("input").input_value() != str(row_k):
        assert time.monotonic() < deadline, "the slice field did not follow the review row"
        time.sleep(0.2)

    items = page.get_by_test_id("review-item")  # ranges with reasons; a click goes to the range's first slice
    assert 1 <= items.count() <= 10
    first_item = items.first.inner_text()
    match = re.match(r"liver (\d+)(?:-(\d+))?: ?\S", first_item)
    assert match, first_item
    items.first.click()
    deadline = time.monotonic() + 10
    while page.get_by_test_id("axial-k").locator("input").input_value() != match.group(1):
        assert time.monotonic() < deadline, "the slice field did not follow the review item"
        time.sleep(0.2)

    set_mode(page, "navigate")  # the screenshot in docs/: the one-box propagation, the mouse put away
    page.mouse.move(5, 5)
    page.get_by_test_id("review-row").first.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    save_small_png(page.screenshot(), SCREENSHOT)

    # a + point on a propagated slice (no prompt of its own) edits the mask where it is clicked, and nothing else:
    # it was sent to the model alone, whose answer replaced the whole slice
    propagated = labels > 0
    ks = [k for k in range(propagated.shape[0]) if abs(k - SLICE_K) > 10 and propagated[k].sum() > 500]
    k = ks[len(ks) // 2]
    mask = propagated[k]

    def grown(region: np.ndarray) -> np.ndarray:
        out = region.copy()
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            out |= np.roll(region, shift, axis=axis)
        return out

    # (j, i) two voxels outside the mask's outline: a click a voxel off (the screen mapping's rounding on another
    # machine's masks) still lands outside it (one voxel out, it landed on the mask once: nothing to join)
    near = grown(mask)
    outside = np.argwhere(grown(near) & ~near)
    centre = np.argwhere(mask).mean(axis=0)
    j, i = outside[np.argmin(((outside - centre) ** 2).sum(axis=1))]
    screen = go_to_slice(page, k)
    set_mode(page, "point+", "liver")
    before = status_text(page)
    clicked_i, clicked_j, clicked_k = click_point(page, screen, int(i), int(j))
    assert clicked_k == k and not mask[clicked_j, clicked_i], ((clicked_i, clicked_j), (int(i), int(j)))
    area = wait_slice_mask(page, "liver", k, before=before)
    edited = lits.labels_now() > 0
    print(f"web app lits117 + point on propagated slice {k}: {int(mask.sum())} -> {area} voxels")
    assert int(mask.sum()) < area <= int(mask.sum()) + 40  # the point's 3 mm disk, not a new slice
    assert (edited[k] | ~mask).all()  # nothing of the propagated mask lost
    assert np.array_equal(np.delete(edited, k, axis=0), np.delete(propagated, k, axis=0))
    page.get_by_test_id("undo").click()
    wait_status(page, rf"Undone: \+ point on slice {k}", timeout=20_000)
    assert np.array_equal(lits.labels_now(), labels)
    set_mode(page, "box")
    lits.step = 4


def test_5_fix_a_slice_and_repropagate(lits):
    lits.go_on_from(4)
    page = lits.page
    propagated = lits.labels["propagated"] > 0
    nk = propagated.shape[0]
    scores = {k: dice(propagated[k], lits.liver[k]) for k in range(SLICE_K + 5, nk) if lits.liver[k].sum() > 1500}
    fix_k = min(scores, key=scores.get)  # the worst propagated slice above the box, where a reader would fix
    screen = go_to_slice(page, fix_k)
    before = status_text(page)
    drag_box(page, screen, loose_box(lits.liver[fix_k]))
    wait_slice_mask(page, "liver", fix_k, before=before)
    fixed = lits.labels_now() > 0
    assert np.array_equal(np.delete(fixed, fix_k, axis=0), np.delete(propagated, fix_k, axis=0))
    fix_dice = dice(fixed[fix_k], lits.liver[fix_k])
    assert fix_dice > scores[fix_k]

    assert page.get_by_test_id("repropagate").inner_text().strip().lower() == f"re-propagate from slice {fix_k}"
    page.get_by_test_id("repropagate").click()
    wait_job_end(page, r"Liver: \d+ voxels")
    repropagated = lits.labels_now()
    liver_now = repropagated > 0
    # only the slices between the box slice and the end of the volume may change; the fix stays
    assert np.array_equal(repropagated[: SLICE_K + 1], lits.labels["propagated"][: SLICE_K + 1])
    assert dice(liver_now[fix_k], fixed[fix_k]) >= 0.9
    changed = [k for k in range(nk) if not np.array_equal(liver_now[k], propagated[k])]
    assert fix_k in changed and set(changed) <= {fix_k - 1, fix_k, fix_k + 1}  # REPROPAGATION_MAX_REACH
    before_dice, after_dice = dice(propagated, lits.liver), dice(liver_now, lits.liver)
    worse = [(k, round(dice(propagated[k], lits.liver[k]), 2), round(dice(liver_now[k], lits.liver[k]), 2))
             for k in changed if dice(liver_now[k], lits.liver[k]) < dice(propagated[k], lits.liver[k]) - 0.05]
    print(f"web app lits117 fix on slice {fix_k}: slice Dice {scores[fix_k]:.3f} -> {fix_dice:.3f}; "
          f"re-propagation changed slices {changed[0]}..{changed[-1]} ({len(changed)}); 3D liver Dice "
          f"{before_dice:.3f} -> {after_dice:.3f}; slices worse by > 0.05 (k, before, after): {worse}")
    # Before the fix's reach was capped at one slice each way, this re-propagation replaced slices 34..84 with a
    # track that under-segmented them: 0.951 -> 0.840 (benchmarks/fix_reach.py measures the cap on four cases).
    assert after_dice >= before_dice - 0.002
    lits.labels["repropagated"] = repropagated
    lits.step = 5


def test_6_tumour_inside_the_liver_with_propagation(lits):
    lits.go_on_from(5)
    page = lits.page
    set_mode(page, "box", "tumor")
    screen = go_to_slice(page, TUMOUR_K)
    before = status_text(page)
    drag_box(page, screen, TUMOUR_BOX)
    wait_slice_mask(page, "tumor", TUMOUR_K, before=before)
    box_labels = lits.labels_now()
    ours, truth = box_labels[TUMOUR_K] == 2, lits.tumour[TUMOUR_K]
    slice_dice = dice(ours, truth)
    print(f"web app lits117 tumour Dice on slice {TUMOUR_K} (one box): {slice_dice:.3f}")
    assert slice_dice >= 0.5
    lits.labels["tumour box"] = box_labels

    page.get_by_test_id("propagate").click()
    wait_job_end(page, r"Tumour: \d+ voxels")
    assert page.get_by_test_id("lesion-row").count() >= 1
    labels = lits.labels_now()
    tumour = labels == 2
    slices = [k for k in range(tumour.shape[0]) if tumour[k].any()]
    precision = float((tumour & lits.tumour).sum()) / max(1, int(tumour.sum()))
    print(f"web app lits117 tumour propagation: slices {slices[0]}..{slices[-1]}, {int(tumour.sum())} voxels, "
          f"{precision:.2f} of them in the label's tumours")
    assert len(slices) >= 5
    assert precision >= 0.7
    # the tumour's review table fits the panel (its "from" column was cut to "fr") and says its flags in words
    # (they were code names: beyond_end, low_score)
    assert review_table_overflow(page) == 0
    flags = " ".join(page.get_by_test_id("review-flags").all_inner_texts())
    assert "may go on" in flags and "_" not in flags, flags
    assert np.array_equal(labels > 0, lits.labels["repropagated"] > 0)  # inside the liver: no voxel outside it
    lits.labels["tumour"] = labels

    seg = download_as_named(page, "export-segnrrd", lits.folder)
    assert seg.name == "lits117-ct-liversam.seg.nrrd"  # after the CT (it was always liversam.seg.nrrd)
    header = seg.read_bytes()[:4000].decode("latin-1")
    assert header.startswith("NRRD") and "Segment0_Name:=liver" in header and "Segment1_Name:=tumor" in header
    lits.step = 6


def test_7_undo_the_tumour_propagation(lits):
    lits.go_on_from(6)
    page = lits.page
    page.get_by_test_id("undo").click()
    wait_status(page, r"Undone: propagate tumour", timeout=20_000)
    assert np.array_equal(lits.labels_now(), lits.labels["tumour box"])
    assert page.get_by_test_id("lesion-row").count() == 0
    assert page.get_by_test_id("review-row").count() > 10  # the liver's review is back
    assert re.search(rf"tumour box on slice {TUMOUR_K}", undo_label(page))
    lits.step = 7


def test_8_bad_input_with_a_case_open_changes_nothing(lits, tmp_path):
    lits.go_on_from(7)
    page = lits.page
    before_undo = undo_label(page)
    open_path(page, str(folder_without_series(tmp_path / "no-series")))
    expect_error(page, r"no-series.*no DICOM image series")
    assert page.get_by_test_id("ct-name").inner_text().strip() == "lits117/ct.nii.gz"
    dismiss_error(page)

    set_mode(page, "box")
    drag_outside_the_ct(page, lits, TUMOUR_K)

    # a tumour point on a slice with no lesion box: nothing to refine
    set_mode(page, "point+", "tumor")
    screen = go_to_slice(page, SLICE_K)
    click_point(page, screen, *blob_centre(lits.liver[SLICE_K]))
    expect_error(page, r"Point ignored: a tumour point refines a lesion box")
    dismiss_error(page)
    assert undo_label(page) == before_undo
    assert np.array_equal(lits.labels_now(), lits.labels["tumour box"])
    lits.step = 8


def test_9_faster_on_thin_slices_interpolates_every_other_liver_slice(lits):
    lits.go_on_from(8)
    page = lits.page
    set_mode(page, "box", "liver")
    page.get_by_test_id("fast-thin").locator("input").check()
    page.get_by_test_id("propagate").click()
    wait_job_end(page, r"Liver: \d+ voxels")
    sources = [t.strip() for t in page.get_by_test_id("review-source").all_inner_texts()]
    # lits117's 1 mm slices: about half the liver's slices come from their neighbours, the prompted ones never
    assert sources.count("interpolated") >= len(sources) // 4, sources
    assert sources.count("your prompt") >= 1 and sources.count("model") >= len(sources) // 4, sources
    liver_dice = dice(lits.labels_now() > 0, lits.liver)
    print(f"web app lits117 liver, faster on thin slices: {sources.count('interpolated')} of {len(sources)} "
          f"slices interpolated, Dice {liver_dice:.3f}")
    assert liver_dice >= 0.90
    page.get_by_test_id("fast-thin").locator("input").uncheck()
    lits.step = 9


def test_10_opening_another_ct_holds_back_once_for_a_segmentation_not_exported(lits):
    """Opening another CT dropped the masks and the undo steps without a word."""
    lits.go_on_from(9)
    page = lits.page
    page.get_by_test_id("undo").click()  # a change after the last export (labels_now exports a labelmap)
    wait_status(page, r"Undone: propagate liver", timeout=20_000)
    open_path(page, str(CT), discard=False)
    expect_error(page, r"The segmentation of lits117/ct\.nii\.gz has changed since it was last exported, and "
                       r"opening lits117/ct\.nii\.gz drops it: export it first \(section 6\), or press Open again to discard it")
    assert page.get_by_test_id("undo").is_enabled()  # nothing dropped
    other = DATA / "totalseg_small" / "ct.nii.gz"  # another CT of the same file name
    open_path(page, str(other), discard=False)  # held back for that CT too: the first one's answer is not its
    expect_error(page, r"opening totalseg_small/ct\.nii\.gz drops it")
    assert page.get_by_test_id("undo").is_enabled()
    open_path(page, str(CT))  # pressed again: opened, the old work discarded
    wait_status(page, r"Opened lits117/ct\.nii\.gz", timeout=120_000)
    assert not page.get_by_test_id("undo").is_enabled()
    lits.step = 10


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-s"]))
