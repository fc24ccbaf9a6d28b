"""A DICOM series uploaded from the browser, which sends only the files chosen, never their folder:

- one slice of the series chosen alone said "a single 2D image, not a CT volume"; now the page says it is one slice
  of a series and how to upload the series (all its files, its folder, or a .zip of the folder), and opens nothing;
- every file of the series chosen at once in the file field opens the series (a DICOM SEG can reference it);
- a .zip of the series' folder opens the series; a .zip holding a path outside its folder is refused;
- a CD-ROM export's folder (two series, files of one name in each series' folder) chosen in the folder field opens
  its larger series whole, named, and names the other (the files overwrote each other: one broken series); the
  page lists the upload's series (a localiser, a 2-image series and a dose report too, with why they are not
  opened first), and a click on the other phase opens it from the same upload (it had to be uploaded again);
- another export whose first series fails to open is listed under the CT shown's list, which stays (it was
  replaced by it), and a click on its other series opens that.
Real data: the TotalSegmentator 20-slice CT series (512 x 512 x 20).
"""

from __future__ import annotations

import zipfile

import pytest
from playwright.sync_api import expect
from web_page import DATA, cd_export, dismiss_error, expect_error, wait_status

SERIES = DATA / "totalseg_small" / "ct_dicom"
FILE_LABEL = "Upload a CT file, a series' files or a .zip"


def file_field(page):
    return page.get_by_test_id("upload-file").locator("input[type=file]")


def header(page) -> str:
    return page.get_by_test_id("ct-name").inner_text().strip()


def test_a_dicom_series_uploaded_as_its_files_or_a_zip(page, tmp_path):
    if not SERIES.is_dir():
        pytest.fail(f"the TotalSegmentator DICOM series is not at {SERIES}: set LIVERSAM_TEST_DATA (see README)")
    files = sorted(SERIES.iterdir())

    # one slice alone: what it is and what to do, nothing opened, the field emptied for another try
    before = header(page)  # the app is shared by the session's tests: the CT an earlier test opened, or none
    file_field(page).set_input_files(str(files[0]))
    text = expect_error(page, r"one slice of a DICOM series")
    assert files[0].name in text and "a single 2D image" not in text
    assert "all its files" in text and "Upload a DICOM folder" in text and ".zip of the folder" in text
    assert header(page) == before
    assert page.get_by_test_id("upload-file").inner_text().strip() == FILE_LABEL
    dismiss_error(page)

    # all the series' files chosen at once in the file field: the series
    file_field(page).set_input_files([str(f) for f in files])
    wait_status(page, r"Opened 20 DICOM files \(512 x 512 x 20\)", timeout=120_000)
    assert header(page) == "20 DICOM files"
    assert page.get_by_test_id("upload-file").inner_text().strip().endswith("20 files")
    expect(page.get_by_test_id("export-dicomseg")).to_be_enabled(timeout=10_000)  # read as a DICOM series

    # a .zip of the series' folder (as a PACS export or a colleague sends it)
    archive = tmp_path / "ct_dicom.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in files:
            zipped.write(path, f"ct_dicom/{path.name}")
    file_field(page).set_input_files(str(archive))
    wait_status(page, r"Opened 20 DICOM files in ct_dicom\.zip \(512 x 512 x 20\)", timeout=120_000)
    assert header(page) == "20 DICOM files in ct_dicom.zip"
    expect(page.get_by_test_id("export-dicomseg")).to_be_enabled(timeout=10_000)

    # a .zip with a path that leaves its folder: refused, the series shown stays
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zipped:
        zipped.writestr("../outside.dcm", files[0].read_bytes())
    file_field(page).set_input_files(str(evil))
    expect_error(page, r"'evil\.zip' holds a file outside its folder")
    assert header(page) == "20 DICOM files in ct_dicom.zip"


def test_a_cd_rom_export_folder_opens_its_largest_series_whole_and_another_from_the_list(page, tmp_path):
    cd_export(tmp_path / "cd", extra_series=True)
    dismiss_error(page)  # (the page is shared: an earlier test's refusal)
    page.get_by_test_id("upload-folder").locator("input[type=file]").set_input_files(str(tmp_path / "cd"))
    status = wait_status(page, r"Opened 12 DICOM files of series 1 'Abdomen S1' in cd \(512 x 512 x 12\)",
                         timeout=120_000)
    assert "Not opened: series 2 'Abdomen S2' (8 files, 512 x 512 x 8)" in status, status
    assert "regular grid" not in status, status
    assert header(page) == "12 DICOM files of series 1 'Abdomen S1' in cd"

    # the series list: every series of the upload, the one shown marked, why the others were not opened first
    rows = page.get_by_test_id("series-row")
    expect(rows).to_have_count(5, timeout=10_000)
    # whose files the list shows (a list kept after an upload's series failed to open is not the CT shown's)
    expect(page.get_by_test_id("series-caption")).to_have_text(
        "DICOM series of the uploaded folder 'cd', the files of the CT shown (click another to open it instead)")
    assert [rows.nth(n).locator("td").first.inner_text().strip() for n in range(5)] == ["1", "2", "4", "3", "997"]
    assert "(shown)" in rows.nth(0).inner_text()
    assert "SR: a report (e.g. a dose report), no image" in rows.nth(4).inner_text()
    expect(rows.nth(4)).to_be_disabled()  # a dose report is no CT (aria-disabled; a click does nothing)
    expect(rows.nth(1)).to_be_enabled()

    rows.nth(1).click()  # the other phase, from the same upload
    status = wait_status(page, r"Opened 8 DICOM files of series 2 'Abdomen S2' in cd \(512 x 512 x 8\)",
                         timeout=120_000)
    assert "series 2 'Abdomen S2' (8 files) was opened, as chosen" in status, status
    assert header(page) == "8 DICOM files of series 2 'Abdomen S2' in cd"
    expect(rows.nth(1)).to_contain_text("(shown)", timeout=10_000)
    expect(page.get_by_test_id("export-dicomseg")).to_be_enabled(timeout=10_000)  # the series' files are kept

    # another export whose series 1 is not a CT in HU: its list is shown under the CT shown's, which stays (it was
    # replaced); a click on its series 2 opens it, and its list becomes the CT shown's
    import pydicom

    second = cd_export(tmp_path / "cd2")
    for path in (second / "DICOM" / "S1").iterdir():
        header_ = pydicom.dcmread(path)
        header_.RescaleIntercept = 2000
        header_.save_as(path)
    page.get_by_test_id("upload-folder").locator("input[type=file]").set_input_files(str(second))
    expect_error(page, r"The DICOM series 1 'Abdomen S1' of the uploaded folder 'cd2' does not look like a CT",
                 timeout=120_000)
    expect(rows).to_have_count(5)
    expect(rows.nth(1)).to_contain_text("(shown)")
    other = page.get_by_test_id("other-series-row")
    expect(other).to_have_count(2, timeout=10_000)
    expect(page.get_by_test_id("other-series-caption")).to_have_text(
        "DICOM series of the uploaded folder 'cd2', chosen after the CT shown (8 DICOM files of series 2 'Abdomen S2' "
        "in cd), which is not one of them: click one to open it instead")
    expect(other.nth(0)).to_contain_text("could not be opened: does not look like a CT in Hounsfield units")
    expect(page.get_by_test_id("other-series-close")).to_be_visible()
    dismiss_error(page)
    other.nth(1).click()
    wait_status(page, r"Opened 8 DICOM files of series 2 'Abdomen S2' in cd2 \(512 x 512 x 8\)", timeout=120_000)
    expect(rows).to_have_count(2, timeout=10_000)
    expect(rows.nth(1)).to_contain_text("(shown)")
    expect(other).to_have_count(0)
