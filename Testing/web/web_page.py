"""What the browser tests do with the page, as a user does it: type a path, drag a box, click, wait for the
status line, download an export. The page's voxel probe (i, j, k under the mouse) maps screen pixels to voxels.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("LIVERSAM_TEST_DATA", REPO.parent / "shared/data"))  # run_tests.sh sets it
SERVER_PYTHON = os.environ.get(
    "LIVERSAM_SERVER_PYTHON",
    str(Path(os.environ.get("LIVERSAM_VENV", Path.home() / ".cache/liversam/venv")) / "bin/python"),
)
APP_LOG = Path(os.environ.get("LIVERSAM_WEB_LOG", "/tmp/liversam-web-test.log"))  # conftest writes it live
JOB_TIMEOUT_MS = int(os.environ.get("LIVERSAM_WEB_JOB_TIMEOUT_S", "600")) * 1000  # a loaded machine is slow; a hang fails in 10 min


def visible_box(locator, timeout_s: float = 30.0) -> dict:
    """The locator's bounding box once its element is in the page and shown. A field the page re-creates under a
    new key (the upload fields after an upload) is gone for a moment, and ``bounding_box()`` then gives None (seen
    with the core tests running beside the browser tests)."""
    deadline = time.monotonic() + timeout_s
    while (box := locator.bounding_box()) is None:
        assert time.monotonic() < deadline, f"{locator} was not shown within {timeout_s:g} s"
        time.sleep(0.1)
    return box


def read_nifti(path: Path) -> np.ndarray:
    """A NIfTI-1 (.nii.gz) volume as an array [k, j, i] in file order (enough for our own files)."""
    data = gzip.decompress(path.read_bytes())
    dims = np.frombuffer(data[40:56], dtype="<i2")
    datatype = int(np.frombuffer(data[70:72], dtype="<i2")[0])
    offset = int(np.frombuffer(data[108:112], dtype="<f4")[0])
    dtype = {2: "u1", 4: "<i2", 8: "<i4", 16: "<f4", 256: "i1", 512: "<u2"}[datatype]
    ni, nj, nk = (int(d) for d in dims[1:4])
    return np.frombuffer(data[offset:], dtype=dtype, count=ni * nj * nk).reshape(nk, nj, ni)


def save_small_png(png: bytes, path: Path, width: int = 1050) -> None:
    """The page screenshot, scaled down and palettised (a small file for docs/)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def dismiss_error(page) -> None:
    error = page.get_by_test_id("error")
    if error.count():
        error.locator("button").click()
        error.wait_for(state="detached", timeout=10_000)


def folder_without_series(path: Path) -> Path:
    """A folder with two text files and no image: a bad DICOM folder."""
    path.mkdir()
    (path / "readme.txt").write_text("no images here")
    (path / "list.csv").write_text("a,b\n1,2\n")
    return path


def cd_export(root: Path, extra_series: bool = False) -> Path:
    """A CD-ROM export's layout, from the TotalSegmentator series (20 slices): ``root``/DICOMDIR (the CD's index),
    AUTORUN.INF, DICOM/S1/IM0001..IM0012 (series 1 'Abdomen S1') and DICOM/S2/IM0001..IM0008 (series 2 'Abdomen S2'):
    files without extension, of the same names in both series' folders. ``extra_series``: also what a CT study's CD
    holds beside its volumes: S3, a localiser image tagged LOCALIZER (series 3 'Topogram'); S4, two images of no
    volume (series 4 'Bolus tracking'); S5, a dose report (series 997 'Dose Report', an SR object, no pixels)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    slices = sorted((DATA / "totalseg_small" / "ct_dicom").iterdir())
    series = [(1, "Abdomen S1", slices[:12], None), (2, "Abdomen S2", slices[12:], None)]
    if extra_series:
        series += [(3, "Topogram", slices[:1], ["ORIGINAL", "PRIMARY", "LOCALIZER"]),
                   (4, "Bolus tracking", slices[5:7], None)]
    for folder_index, (number, description, files, image_type) in enumerate(series, start=1):
        folder = root / "DICOM" / f"S{folder_index}"
        folder.mkdir(parents=True)
        uid = generate_uid()
        for index, path in enumerate(files, start=1):
            header = pydicom.dcmread(path)
            header.SeriesInstanceUID, header.SeriesNumber, header.SeriesDescription = uid, number, description
            if image_type:
                header.ImageType = image_type
            header.SOPInstanceUID = header.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            header.save_as(folder / f"IM{index:04d}")
    if extra_series:  # an SR dose report: a DICOM object of the study with no image
        first = pydicom.dcmread(slices[0], stop_before_pixels=True)
        report = Dataset()
        report.file_meta = FileMetaDataset()
        report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
        report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID = generate_uid()
        report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        report.Modality, report.SeriesNumber, report.SeriesDescription = "SR", 997, "Dose Report"
        report.SeriesInstanceUID, report.StudyInstanceUID = generate_uid(), first.StudyInstanceUID
        (root / "DICOM" / "S5").mkdir()
        report.save_as(root / "DICOM" / "S5" / "IM0001", enforce_file_format=True)
    index = Dataset()  # a DICOMDIR's file meta and no SOP Class UID of a series' object (its records left out here)
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    index.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    index.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index.FileSetID = "CD"
    index.save_as(root / "DICOMDIR", enforce_file_format=True)
    (root / "AUTORUN.INF").write_text("[autorun]\nopen=viewer.exe\n")
    return root


def open_path(page, path: str, discard: bool = True) -> None:
    """Type ``path`` and press Open; when the page holds back for the open case's unexported segmentation, press Open
    again (``discard``) as a reader who does not want it would."""
    dismiss_error(page)
    page.get_by_test_id("ct-path").locator("input").fill(path)
    page.get_by_test_id("open-path").click()
    if not discard:
        return
    error = page.get_by_test_id("error")
    try:
        error.wait_for(timeout=1500)
    except Exception:  # noqa: BLE001 - no message: it is opening
        return
    if "press Open again to discard it" in error.inner_text():
        dismiss_error(page)
        page.get_by_test_id("open-path").click()


def expect_error(page, pattern: str, timeout: int = 60_000) -> str:
    error = page.get_by_test_id("error")
    error.wait_for(timeout=timeout)
    deadline = time.monotonic() + timeout / 1000
    while time.monotonic() < deadline:
        text = error.inner_text()
        if re.search(pattern, text, re.IGNORECASE):
            return text
        time.sleep(0.2)
    raise AssertionError(f"error message {text!r} does not match {pattern!r}")


def wait_status(page, pattern: str, timeout: int) -> str:
    deadline = time.monotonic() + timeout / 1000
    text = ""
    while time.monotonic() < deadline:
        error = page.get_by_test_id("error")
        if error.count():
            raise AssertionError(f"the page shows an error: {error.inner_text()}")
        status = page.get_by_test_id("status")
        text = status.inner_text() if status.count() else ""
        match = re.search(pattern, text)
        if match:
            return text
        time.sleep(0.25)
    raise AssertionError(f"status {text!r} never matched {pattern!r}")


def probe(page, x: float, y: float) -> tuple[int, int, int]:
    """Move the mouse to (x, y) and read the voxel the page reports under it, once the reading is new and has
    stayed the same for 0.3 s (a reading of an earlier mouse position can arrive late)."""
    probe_text = page.get_by_test_id("probe")
    before = probe_text.inner_text()
    page.mouse.move(x, y)
    deadline = time.monotonic() + 10
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        text = probe_text.inner_text()
        match = re.search(r"i (-?\d+)\s+j (-?\d+)\s+k (-?\d+)", text)
        if match and text != before:
            if text != last:
                last, since = text, time.monotonic()
            elif time.monotonic() - since >= 0.3:
                return int(match.group(1)), int(match.group(2)), int(match.group(3))
        time.sleep(0.1)
        if not match or text == before:
            page.mouse.move(x + 1, y)
            page.mouse.move(x, y)
    raise AssertionError(f"the voxel probe did not update at ({x}, {y}): {probe_text.inner_text()!r}")


class ScreenMap:
    """Affine map screen (x, y) <-> voxel (i, j) in the axial view, measured with the probe."""

    def __init__(self, page, view_box: dict) -> None:
        x0 = view_box["x"] + view_box["width"] * 0.3
        y0 = view_box["y"] + view_box["height"] * 0.35
        dx, dy = view_box["width"] * 0.4, view_box["height"] * 0.3
        i0, j0, k0 = probe(page, x0, y0)
        i1, j1, _ = probe(page, x0 + dx, y0)
        i2, j2, _ = probe(page, x0, y0 + dy)
        self.readings = [(i0, j0, k0), (i1, j1), (i2, j2)]
        self.k = k0
        self.matrix = np.array([[(i1 - i0) / dx, (i2 - i0) / dy], [(j1 - j0) / dx, (j2 - j0) / dy]])
        self.offset = np.array([i0, j0]) - self.matrix @ np.array([x0, y0])

    def to_screen(self, i: float, j: float) -> tuple[float, float]:
        x, y = np.linalg.solve(self.matrix, np.array([i, j]) - self.offset)
        return float(x), float(y)

    def to_voxel(self, x: float, y: float) -> np.ndarray:
        return self.matrix @ np.array([x, y]) + self.offset

    def checked(self, page, view_box: dict) -> bool:
        """The map predicts the probe at a fourth point of the view (within 1.5 voxels)."""
        x = view_box["x"] + view_box["width"] * 0.5
        y = view_box["y"] + view_box["height"] * 0.55
        i, j, k = probe(page, x, y)
        self.readings.append((i, j, k))
        return k == self.k and float(np.abs(self.to_voxel(x, y) - np.array([i, j])).max()) <= 1.5


CONSOLE: list[str] = []  # the pages' console messages (warnings and errors), printed when a live update hangs


def watch_console(page) -> None:
    page.on("console", lambda message: CONSOLE.append(f"{message.type}: {message.text}")
            if message.type in ("warning", "error") else None)
    page.on("pageerror", lambda error: CONSOLE.append(f"page error: {error}"))


def open_app_page(browser, url: str):
    """A fresh browser context on the app's page, its console watched, once the page is ready: (context, page)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    page = context.new_page()
    watch_console(page)
    page.goto(url)
    page.get_by_test_id("open-path").wait_for(timeout=60_000)
    return context, page


LAST_DRAG: dict = {}  # where the last drag started and what the page had there (printed when a live update hangs)


def element_at(page, x: float, y: float) -> str:
    return page.evaluate(
        "([x, y]) => { const e = document.elementFromPoint(x, y); if (!e) return 'nothing';"
        " return e.tagName + '.' + (e.className && e.className.baseVal !== undefined ? e.className.baseVal"
        " : e.className) + (e.id ? '#' + e.id : ''); }", [x, y])


def drag(page, a: tuple[float, float], b: tuple[float, float]) -> None:
    LAST_DRAG.update(start=a, end=b, element=element_at(page, *a), end_element=element_at(page, *b))
    page.mouse.move(*a)
    page.mouse.down()
    page.mouse.move((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, steps=4)
    page.mouse.move(*b, steps=4)
    page.mouse.up()


def axial_view_box(page) -> dict:
    box = page.locator(".remote-controlled-area").first.bounding_box()  # the axial (red) view leads the layout
    assert box is not None
    return box


def go_to_slice(page, k: int) -> ScreenMap:
    """Type k in the slice field; returns the screen map once the axial view shows slice k."""
    field = page.get_by_test_id("axial-k").locator("input")
    field.fill(str(k))
    field.press("Enter")
    view_box = axial_view_box(page)
    deadline = time.monotonic() + 30
    while True:  # the views follow the slice field; a probe read while the view was still changing is retried
        screen = ScreenMap(page, view_box)
        good = screen.k == k and abs(np.linalg.det(screen.matrix)) > 1e-6 and screen.checked(page, view_box)
        if good or time.monotonic() > deadline:
            break
        print(f"\nthe voxel probe readings disagree (the view was still moving?), measured again: {screen.readings}")
        time.sleep(0.3)
    assert screen.k == k, f"the axial view shows slice {screen.k}, not {k}"
    assert good, f"the voxel probe readings do not make a consistent screen map: {screen.readings}"
    return screen


def loose_box(mask_ji: np.ndarray, pad: int = 3) -> tuple[int, int, int, int]:
    """(i0, j0, i1, j1) around a mask, ``pad`` voxels larger (a user's box is not tight), inside the slice."""
    js, is_ = np.nonzero(mask_ji)
    nj, ni = mask_ji.shape
    return (max(int(is_.min()) - pad, 0), max(int(js.min()) - pad, 0),
            min(int(is_.max()) + pad, ni - 1), min(int(js.max()) + pad, nj - 1))


def drag_box(page, screen: ScreenMap, box: tuple[float, float, float, float]) -> None:
    a, b = screen.to_screen(*box[:2]), screen.to_screen(*box[2:])
    view = axial_view_box(page)
    for x, y in (a, b):  # a wrong screen map would drag off the view, and nothing would happen
        assert view["x"] <= x <= view["x"] + view["width"] and view["y"] <= y <= view["y"] + view["height"], (
            f"box corner ({x:.0f}, {y:.0f}) is off the axial view {view}; screen map readings {screen.readings}")
    drag(page, a, b)


def undo_label(page) -> str:
    return page.get_by_test_id("undo-label").inner_text().strip()


def wait_undo_label(page, pattern: str, timeout: int = 30_000) -> str:
    """The undo line names the last change as soon as the page has taken it (before the server answers)."""
    deadline = time.monotonic() + timeout / 1000
    text = ""
    while time.monotonic() < deadline:
        text = undo_label(page)
        if re.search(pattern, text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"undo line {text!r} never matched {pattern!r}")


def status_text(page) -> str:
    status = page.get_by_test_id("status")
    return status.inner_text() if status.count() else ""


NUDGE_AFTER_S = 60.0


def wait_slice_mask(page, segment: str, k: int, before: str = "", timeout: int = JOB_TIMEOUT_MS) -> int:
    """Wait for the live update of slice k (a status line other than ``before``); returns its voxel count.

    A live update that does not come within ``NUDGE_AFTER_S`` is reported with where the last drag went and
    what the page had there, the page's console, and a one-pixel mouse move (no click, no prompt); if it never
    comes the failure names the app's trace (LIVERSAM_WEB_LOG). (The "hang" this was written for was a drag off
    the page from a stale probe reading: see ``probe`` and ``ScreenMap.checked``.)"""
    word = {"tumor": "Tumour"}.get(segment, segment.capitalize())  # the page's spelling
    pattern = rf"{word} on slice {k}: (\d+) voxels"
    deadline = time.monotonic() + timeout / 1000
    nudge_at = time.monotonic() + NUDGE_AFTER_S
    text = ""
    while time.monotonic() < deadline:
        error = page.get_by_test_id("error")
        if error.count():
            raise AssertionError(f"the page shows an error: {error.inner_text()}")
        text = status_text(page)
        match = re.search(pattern, text)
        if match and text != before:
            return int(match.group(1))
        if time.monotonic() > nudge_at:
            print(f"\nno live update of {segment} slice {k} after {NUDGE_AFTER_S:.0f} s: nudging the mouse "
                  f"(last drag {LAST_DRAG}; now at its start: {element_at(page, *LAST_DRAG['start'])})"
                  if LAST_DRAG else f"\nno live update of {segment} slice {k} after {NUDGE_AFTER_S:.0f} s: nudging")
            print("page console (last 20):", *CONSOLE[-20:], sep="\n  ")
            page.mouse.move(6, 6)
            page.mouse.move(5, 5)
            nudge_at = time.monotonic() + NUDGE_AFTER_S
        time.sleep(0.2)
    raise AssertionError(f"no live update of {segment} slice {k} in {timeout / 1000:.0f} s: status {text!r}; "
                         f"the app's trace is in {APP_LOG}")


def wait_job_end(page, final_status: str, timeout: int = JOB_TIMEOUT_MS) -> set[str]:
    """Wait until the job just started has ended with a status line matching ``final_status`` (and no Cancel
    button); returns the status lines seen while it ran (its progress count). An error shown by the page fails at
    once."""
    seen = set()
    deadline = time.monotonic() + timeout / 1000
    while time.monotonic() < deadline:
        error = page.get_by_test_id("error")
        if error.count():
            raise AssertionError(f"the page shows an error: {error.inner_text()}")
        running = page.get_by_test_id("cancel").count() > 0
        text = status_text(page)
        if running:
            seen.add(text)
        elif re.search(final_status, text):
            return seen
        time.sleep(0.3)
    raise AssertionError(f"the job did not end in {timeout / 1000:.0f} s: {status_text(page)!r}, {seen}")


def uncovered_in_viewport(page, testid: str) -> bool:
    """The element is wholly inside the browser's viewport and the topmost element at its centre (no scrolling
    needed to see or click it)."""
    return page.get_by_test_id(testid).first.evaluate(
        "(e) => { const r = e.getBoundingClientRect(); if (r.width === 0 || r.top < 0 || r.left < 0"
        " || r.bottom > window.innerHeight || r.right > window.innerWidth) return false;"
        " const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);"
        " return hit !== null && e.contains(hit); }")


def review_table_overflow(page) -> int:
    """How many pixels the review table is wider than the panel shows it (0: every column fits)."""
    return int(page.get_by_test_id("review-row").first.evaluate(
        "(row) => { const table = row.closest('table'); const box = table.parentElement;"
        " const card = row.closest('.v-card').getBoundingClientRect();"
        " return Math.max(0, box.scrollWidth - box.clientWidth, Math.ceil(table.getBoundingClientRect().right"
        " - card.right)); }"))


def scroll_panel(page, to: str) -> None:
    """Scroll the side panel to its "top" or "bottom"."""
    page.locator(".v-navigation-drawer__content").first.evaluate(
        f"(e) => {{ e.scrollTop = {'0' if to == 'top' else 'e.scrollHeight'}; }}")


def download(page, testid: str, path: Path, timeout: int = 120_000) -> Path:
    """Click an export button and save what the browser downloads."""
    with page.expect_download(timeout=timeout) as pending:
        page.get_by_test_id(testid).click()
    pending.value.save_as(path)
    return path


def download_as_named(page, testid: str, folder: Path, timeout: int = 120_000) -> Path:
    """Click an export button and save the download under the name the page gave it, in ``folder``."""
    with page.expect_download(timeout=timeout) as pending:
        page.get_by_test_id(testid).click()
    path = folder / pending.value.suggested_filename
    pending.value.save_as(path)
    return path


def download_labels(page, path: Path) -> np.ndarray:
    """The labelmap export (liver 1, tumour 2) as [k, j, i]."""
    return read_nifti(download(page, "export-labelmap", path)).copy()


def server_side(code: str, **inputs) -> dict:
    """Run ``code`` in the server's Python (liversam, highdicom, pydicom, scipy) with ``inputs`` as a dict
    named ``inputs``; it sets a dict ``out``, returned here (JSON)."""
    program = f"import json, sys\ninputs = json.loads(sys.argv[1])\n{code}\nprint('@@' + json.dumps(out))\n"
    env = dict(os.environ, PYTHONPATH=str(REPO / "LiverSAM"))
    done = subprocess.run([SERVER_PYTHON, "-c", program, json.dumps(inputs)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.rsplit("@@", 1)[1])


HINT_START = {"box": r"(Liver|Tumour) box:", "point+": r"\+ point:", "point-": r"- point:", "navigate": r"Browse:"}
SEGMENT_IN_HINT = {"liver": r"(Liver box|liver)", "tumor": r"(Tumour box|tumour)"}


def set_mode(page, mode: str, segment: str | None = None) -> None:
    """Press the segment and mode buttons and wait until the page's hint (set by the app once the axial view has
    the mode) says so: a click right after pressing a button must not race the mode change."""
    if segment is not None:
        page.get_by_test_id(f"segment-{segment}").click()
    testid = {"box": "mode-box", "point+": "mode-plus", "point-": "mode-minus", "navigate": "mode-navigate"}[mode]
    page.get_by_test_id(testid).click()
    hint = page.get_by_test_id("mode-hint")
    deadline = time.monotonic() + 20
    while True:
        text = hint.inner_text() if hint.count() else ""
        if re.match(HINT_START[mode], text) and (segment is None or re.search(SEGMENT_IN_HINT[segment], text)):
            return
        assert time.monotonic() < deadline, f"the mode hint {text!r} does not follow the buttons ({mode}, {segment})"
        time.sleep(0.1)
