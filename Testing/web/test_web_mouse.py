"""The mouse in the page's views, on lits117 (one page of its own):

- Browse: a left drag in the axial view changes the window/level (the sliders follow, the view changes); it did
  nothing (Slicer's slice views adjust window/level on a drag only in their "Adjust window/level" mouse mode);
- a gesture that makes no prompt says why instead of nothing: a click or a 2 px drag in the Box mode, a point
  click whose mouse moved 6 px, a box dragged in the coronal or sagittal view; none of them changes the work,
  and in a prompt mode a drag in those views leaves the window/level as it was;
- the voxel probe of lits117 is gone once another CT opens (it stayed, naming a voxel of the CT before), and that
  CT's labelmap downloads under its own name (every export had the same name).
"""

from __future__ import annotations

import time

from web_page import (
    DATA,
    REPO,
    download_as_named,
    drag,
    drag_box,
    expect_error,
    go_to_slice,
    open_path,
    probe,
    set_mode,
    undo_label,
    wait_slice_mask,
    wait_status,
)

CT = REPO / "examples/lits117/ct.nii.gz"
OTHER_CT = DATA / "totalseg_small" / "ct.nii.gz"  # 122 x 101 x 30, 3 mm: also named ct.nii.gz


def views(page) -> list[dict]:
    """The four views' boxes: axial (red, the large one), then 3D, coronal (green) and sagittal (yellow)."""
    areas = page.locator(".remote-controlled-area")
    return [areas.nth(n).bounding_box() for n in range(areas.count())]


def centre(box: dict) -> tuple[float, float]:
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def window_level(page) -> tuple[int, int]:
    """The Window and Level sliders' values, as the page shows them."""
    return tuple(int(float(page.get_by_test_id(name).locator("[role=slider]").first.get_attribute("aria-valuenow")))
                 for name in ("window", "level"))


def test_browse_drag_changes_window_level(page):
    open_path(page, str(CT))
    wait_status(page, r"Opened lits117/ct\.nii\.gz", timeout=120_000)
    assert window_level(page) == (400, 40)
    set_mode(page, "navigate")
    assert "window/level" in page.get_by_test_id("mode-hint").inner_text()
    red = views(page)[0]
    x, y = centre(red)
    before = page.screenshot(clip=red)
    drag(page, (x, y), (x + 80, y - 40))  # right: a wider window; up: a higher level
    deadline = time.monotonic() + 10
    while window_level(page) == (400, 40):
        assert time.monotonic() < deadline, "the window/level sliders did not follow the drag"
        time.sleep(0.2)
    window, level = window_level(page)
    assert window > 400 and level > 40, (window, level)
    page.wait_for_timeout(1000)
    assert page.screenshot(clip=red) != before, "the axial view looks the same after the window/level drag"


def test_gestures_that_make_no_prompt_say_why(page):
    open_path(page, str(CT))
    wait_status(page, r"Opened lits117/ct\.nii\.gz", timeout=120_000)
    red, _, coronal, sagittal = views(page)
    x, y = centre(red)
    set_mode(page, "box", "liver")
    shown = window_level(page)

    page.mouse.click(x, y)
    expect_error(page, r"Box ignored: a click draws no box\. Press, drag across the liver and release")
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 2, y + 1)
    page.mouse.up()
    expect_error(page, r"Box ignored: the mouse moved only 2 px between press and release, too little for a box")

    set_mode(page, "point+")
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 6, y + 2, steps=3)
    page.mouse.up()
    expect_error(page, r"Point ignored: the mouse moved 6 px between press and release \(a click may move 3 px at "
                       r"most\)\. Click again without moving the mouse")

    set_mode(page, "box")
    for box, label in ((coronal, r"coronal \(green\)"), (sagittal, r"sagittal \(yellow\)")):
        cx, cy = centre(box)
        drag(page, (cx - 30, cy - 20), (cx + 30, cy + 20))
        expect_error(page, rf"Box ignored: boxes and points are drawn in the axial \(red\) view, on one axial slice; "
                           rf"the {label} view only shows them")
    assert window_level(page) == shown  # a drag in a prompt mode is not a window/level drag
    assert undo_label(page) == ""  # no prompt was taken


def test_another_ct_clears_the_probe_and_names_its_exports(page, tmp_path):
    open_path(page, str(CT))
    wait_status(page, r"Opened lits117/ct\.nii\.gz", timeout=120_000)
    x, y = centre(views(page)[0])
    assert probe(page, x, y)[2] >= 0  # lits117's voxel under the mouse
    assert "HU" in page.get_by_test_id("probe").inner_text()
    page.mouse.move(5, 5)  # off the views: the next CT's probe can only come from a new mouse move there
    open_path(page, str(OTHER_CT))
    wait_status(page, r"Opened totalseg_small/ct\.nii\.gz \(122 x 101 x 30\)", timeout=120_000)
    assert page.get_by_test_id("probe").inner_text().strip() == ""

    set_mode(page, "box", "liver")
    screen = go_to_slice(page, 15)
    drag_box(page, screen, (20, 20, 70, 70))
    wait_slice_mask(page, "liver", 15)
    labels = download_as_named(page, "export-labelmap", tmp_path)
    assert labels.name == "totalseg_small-ct-liversam-labels.nii.gz"
