"""What the page shows of the case and its views, on lits117 and the TotalSegmentator CT (one page of its own):

- the header names the case as the exports do ("lits117/ct.nii.gz", "totalseg_small/ct.nii.gz": both were
  "ct.nii.gz"), with its whole path on hover;
- the Window and Level sliders show their values, and the preset shown is highlighted (neither was);
- the voxel probe follows a mouse-wheel scroll (it named the slice before until the mouse moved), and is cleared
  when the mouse leaves the axial view for another view or the panel (it kept the mouse's last place there);
- the icon buttons of each view say what they do, on hover and as their accessible name.
"""

from __future__ import annotations

import re
import time

from web_page import DATA, REPO, open_path, probe, visible_box, wait_status

CT = REPO / "examples/lits117/ct.nii.gz"
OTHER_CT = DATA / "totalseg_small" / "ct.nii.gz"
PRESETS = ("abdomen", "liver", "bone", "lung")
FILE_LABEL, FOLDER_LABEL = "Upload a CT file, a series' files or a .zip", "Upload a DICOM folder"  # the upload fields


def header(page) -> str:
    return page.get_by_test_id("ct-name").inner_text().strip()


def values(page) -> tuple[str, str]:
    return tuple(page.get_by_test_id(f"{name}-value").inner_text().strip() for name in ("window", "level"))


def pressed(page) -> list[str]:
    return [name for name in PRESETS if page.get_by_test_id(f"preset-{name}").get_attribute("aria-pressed") == "true"]


def probe_cleared(page, seconds: float = 5.0) -> bool:
    """The probe line is empty within ``seconds`` and stays so for 0.5 s (a late reading would fill it again)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not page.get_by_test_id("probe").inner_text().strip():
            time.sleep(0.5)
            return not page.get_by_test_id("probe").inner_text().strip()
        time.sleep(0.1)
    return False


def test_header_window_level_probe_and_view_buttons(page):
    open_path(page, str(CT))
    wait_status(page, r"Opened lits117/ct\.nii\.gz \(128 x 128 x 128\)", timeout=120_000)
    assert header(page) == "lits117/ct.nii.gz"
    assert page.get_by_test_id("ct-name").get_attribute("title") == str(CT)

    # window / level: the values beside the sliders, the preset shown highlighted
    assert values(page) == ("400", "40") and pressed(page) == ["abdomen"]
    assert "v-btn--active" in page.get_by_test_id("preset-abdomen").get_attribute("class")
    page.get_by_test_id("preset-liver").click()
    deadline = time.monotonic() + 10
    while values(page) != ("150", "60") or pressed(page) != ["liver"]:
        assert time.monotonic() < deadline, (values(page), pressed(page))
        time.sleep(0.2)
    slider = page.get_by_test_id("window").locator("[role=slider]").first
    slider.focus()
    slider.press("ArrowRight")  # 151: no preset's window any more
    deadline = time.monotonic() + 10
    while values(page) != ("151", "60") or pressed(page):
        assert time.monotonic() < deadline, (values(page), pressed(page))
        time.sleep(0.2)

    # the probe follows the wheel (the mouse does not move)
    red = page.locator(".remote-controlled-area").first.bounding_box()
    x, y = red["x"] + red["width"] / 2, red["y"] + red["height"] / 2
    i, j, k = probe(page, x, y)
    page.mouse.wheel(0, 100)
    field = page.get_by_test_id("axial-k").locator("input")
    deadline = time.monotonic() + 10
    while True:
        shown = int(field.input_value())
        match = re.search(r"i (-?\d+)\s+j (-?\d+)\s+k (-?\d+)", page.get_by_test_id("probe").inner_text())
        if shown != k and match and int(match.group(3)) == shown:
            break
        assert time.monotonic() < deadline, f"slice {shown} shown, the probe says {page.get_by_test_id('probe').inner_text()!r}"
        time.sleep(0.2)
    assert (int(match.group(1)), int(match.group(2))) == (i, j)  # the same place, on the new slice

    # the mouse leaves the axial view: the probe no longer names its last place there (it kept it)
    views = page.locator(".remote-controlled-area")
    assert views.count() == 4
    for n in (1, 2, 3):  # onto each other view, then back into the axial view
        other = views.nth(n).bounding_box()
        page.mouse.move(other["x"] + other["width"] / 2, other["y"] + other["height"] / 2, steps=4)
        assert probe_cleared(page), f"over view {n}: the probe still says {page.get_by_test_id('probe').inner_text()!r}"
        assert probe(page, x, y)[:2] == (i, j)  # back in the axial view: the voxel under the mouse again
    page.mouse.move(100, 400, steps=4)  # onto the panel
    assert probe_cleared(page), f"over the panel: the probe still says {page.get_by_test_id('probe').inner_text()!r}"

    # the views' icon buttons: a tooltip and an accessible name that say what they do
    tips = {"view-reset": ("Reset this view: the whole slice, fitted to the view", "Reset the 3D view's camera"),
            "view-in-3d": ("Show or hide this slice in the 3D view",)}
    for testid, expected in tips.items():
        buttons = page.get_by_test_id(testid)
        assert buttons.count() == (4 if testid == "view-reset" else 3)  # every view; the 3D view has no slice
        for n in range(buttons.count()):
            button = buttons.nth(n)
            label = button.get_attribute("aria-label")
            assert label in expected, label
            button.hover()
            deadline = time.monotonic() + 5
            while label not in [t.inner_text().strip() for t in page.locator(".v-tooltip .v-overlay__content").all()
                                if t.is_visible()]:
                assert time.monotonic() < deadline, f"no tooltip {label!r} on hover"
                time.sleep(0.1)
            page.mouse.move(5, 5)

    # another CT called ct.nii.gz: the header tells them apart
    open_path(page, str(OTHER_CT))
    wait_status(page, r"Opened totalseg_small/ct\.nii\.gz \(122 x 101 x 30\)", timeout=120_000)
    assert header(page) == "totalseg_small/ct.nii.gz"
    assert values(page) == ("400", "40") and pressed(page) == ["abdomen"]


def field_text(page, testid: str) -> str:
    """What an upload field shows (its label, then the files chosen)."""
    return page.get_by_test_id(testid).inner_text().strip()


def field_texts_once(page, expected: dict[str, str], timeout_s: float = 30.0) -> dict[str, str]:
    """What the upload fields named in ``expected`` show, once they show that (or when ``timeout_s`` is up). The server
    empties the fields whose files are not the CT shown in a state update of its own, just after the status line says
    the CT opened: read at once, a field could still hold its files (seen with the core tests running beside)."""
    deadline = time.monotonic() + timeout_s
    while True:
        texts = {testid: field_text(page, testid) for testid in expected}
        if texts == expected or time.monotonic() >= deadline:
            return texts
        time.sleep(0.1)


def test_sections_upload_fields_and_a_long_path_in_the_banner(page, tmp_path):
    """The sections were numbered 1, 2, 3, 4, 6 before the first propagation; after an upload the other field shrank
    to a sliver (its name one letter a line), and the folder field kept the last uploaded folder's file after a CT
    was opened by its path; a long path in the error banner was cut off, hiding the file's name."""
    open_path(page, str(CT))
    wait_status(page, r"Opened lits117/ct\.nii\.gz", timeout=120_000)
    titles = [t.strip() for t in page.locator(".v-card-title").all_inner_texts()]
    numbers = [int(m.group(1)) for t in titles if (m := re.match(r"(\d+)\. ", t))]
    assert numbers == [1, 2, 3, 4, 5, 6], titles
    assert page.get_by_test_id("review-empty").is_visible()
    # each upload field's label whole, not cut with "..." ("CT file(s) or .zip" was "CT file(s)..." side by side)
    for testid, label in (("upload-file", FILE_LABEL), ("upload-folder", FOLDER_LABEL)):
        assert field_text(page, testid) == label
        cut = page.get_by_test_id(testid).locator("label").first.evaluate("e => e.scrollWidth > e.clientWidth + 1")
        assert not cut, f"the label {label!r} is cut off"

    page.get_by_test_id("upload-folder").locator("input[type=file]").set_input_files(str(DATA / "dcmqi_ct3slice/ct"))
    wait_status(page, r"Opened 3 DICOM files in ct \(512 x 512 x 3\)", timeout=120_000)
    assert field_text(page, "upload-folder").endswith("3 files"), field_text(page, "upload-folder")
    for testid in ("upload-file", "upload-folder"):  # one line high, each wide enough for its name
        box = visible_box(page.get_by_test_id(testid))
        assert box["width"] >= 110 and box["height"] <= 60, (testid, box)

    page.get_by_test_id("upload-file").locator("input[type=file]").set_input_files(str(CT))
    wait_status(page, r"Opened ct\.nii\.gz \(128 x 128 x 128\)", timeout=120_000)
    assert "ct.nii.gz" in field_text(page, "upload-file")
    emptied = {"upload-folder": FOLDER_LABEL}  # emptied: its files are not the CT shown
    assert field_texts_once(page, emptied) == emptied
    for testid in ("upload-file", "upload-folder"):
        box = visible_box(page.get_by_test_id(testid))
        assert box["width"] >= 110 and box["height"] <= 60, (testid, box)

    open_path(page, str(OTHER_CT))
    wait_status(page, r"Opened totalseg_small/ct\.nii\.gz", timeout=120_000)
    # opened by its path: neither upload field names a file
    emptied = {"upload-file": FILE_LABEL, "upload-folder": FOLDER_LABEL}
    assert field_texts_once(page, emptied) == emptied

    name = "labelmap_of_the_liver_segmentation_final_version.nii.gz"
    long_path = tmp_path / ("a_rather_long_folder_name_for_the_case_of_patient_0001_" * 2) / name
    open_path(page, str(long_path))
    error = page.get_by_test_id("error")
    error.wait_for(timeout=30_000)
    assert name in error.inner_text()
    overflow = error.evaluate("e => [...e.querySelectorAll('*')].filter(c => c.scrollWidth > c.clientWidth + 1 && "
                              "getComputedStyle(c).overflowX !== 'visible').map(c => c.className)")
    assert overflow == [], f"the banner's text is cut off in {overflow}"
    banner = error.bounding_box()
    panel = page.locator(".v-navigation-drawer").bounding_box()
    assert banner["x"] + banner["width"] <= panel["x"] + panel["width"]
