"""What the page shows of the case and its views, on lits117 and the TotalSegmentator CT (one page of its own):

- the header names the case as the exports do ("lits117/ct.nii.gz", "totalseg_small/ct.nii.gz": both were
  "ct.nii.gz"), with its whole path on hover;
- the Window and Level sliders show their values, and the preset shown is highlighted (neither was);
- the voxel probe follows a mouse-wheel scroll (it named the slice before until the mouse moved);
- the icon buttons of each view say what they do, on hover and as their accessible name.
"""

from __future__ import annotations

import re
import time

from web_page import DATA, REPO, open_path, probe, wait_status

CT = REPO / "examples/lits117/ct.nii.gz"
OTHER_CT = DATA / "totalseg_small" / "ct.nii.gz"
PRESETS = ("abdomen", "liver", "bone", "lung")


def header(page) -> str:
    return page.get_by_test_id("ct-name").inner_text().strip()


def values(page) -> tuple[str, str]:
    return tuple(page.get_by_test_id(f"{name}-value").inner_text().strip() for name in ("window", "level"))


def pressed(page) -> list[str]:
    return [name for name in PRESETS if page.get_by_test_id(f"preset-{name}").get_attribute("aria-pressed") == "true"]


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
