"""The upload fields' inputs made ready to open (``liversam_web.uploads``), without a browser: a .zip of a DICOM
series is unpacked (and refused, with what to do, when it is empty, damaged or holds a path that leaves its folder);
one DICOM slice alone is told apart from a CT file, a multi-frame file and a DICOM SEG."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from web_page import DATA

from liversam_web.mrml_scene import InputError
from liversam_web.uploads import is_zip, lone_dicom_slice, lone_slice_message, unpack_zip

SERIES = DATA / "totalseg_small" / "ct_dicom"


def series_files() -> list[Path]:
    if not SERIES.is_dir():
        pytest.fail(f"the TotalSegmentator DICOM series is not at {SERIES}: set LIVERSAM_TEST_DATA (see README)")
    return sorted(SERIES.iterdir())


def test_a_zip_of_a_series_folder_unpacks_to_its_files(tmp_path: Path) -> None:
    files = series_files()
    archive = tmp_path / "upload" / "ct_dicom.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in files:
            zipped.write(path, f"ct_dicom/{path.name}")
        zipped.writestr("ct_dicom/.DS_Store", b"finder")  # hidden files and macOS' folder are left out
        zipped.writestr("__MACOSX/ct_dicom/._x", b"resource fork")
    assert is_zip(archive)
    unpacked = unpack_zip(archive, tmp_path / "out", "ct_dicom.zip")
    assert [Path(p).name for p in unpacked] == [p.name for p in files]
    assert all(Path(p).parent == tmp_path / "out" / "ct_dicom" for p in unpacked)
    assert Path(unpacked[0]).read_bytes() == files[0].read_bytes()
    assert not is_zip(files[0]) and not is_zip(DATA / "lits117" / "ct.nii.gz")


def test_a_zip_that_cannot_be_opened_is_refused_with_what_to_do(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zipped:
        zipped.writestr("series/01.dcm", b"x")
        zipped.writestr("../../outside.dcm", b"x")
    with pytest.raises(InputError, match=r"'evil\.zip' holds a file outside its folder \('\.\./\.\./outside\.dcm'\)"):
        unpack_zip(evil, tmp_path / "out", "evil.zip")
    assert not (tmp_path / "outside.dcm").exists() and not (tmp_path / "out").exists()  # nothing written

    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zipped:
        zipped.writestr("series/", b"")
    with pytest.raises(InputError, match=r"'empty\.zip' holds no file"):
        unpack_zip(empty, tmp_path / "out2", "empty.zip")

    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    assert is_zip(damaged)  # by its name: it gets the archive's message, not "not an image"
    with pytest.raises(InputError, match=r"'damaged\.zip' could not be unpacked .*damaged or not a zip"):
        unpack_zip(damaged, tmp_path / "out3", "damaged.zip")


def test_one_dicom_slice_alone_is_told_apart() -> None:
    files = series_files()
    assert lone_dicom_slice(files[0])  # one CT image of a 20-slice series
    assert not lone_dicom_slice(DATA / "lits117" / "ct.nii.gz")  # a CT file
    assert not lone_dicom_slice(DATA / "dcmqi_ct3slice" / "liver_seg.dcm")  # a DICOM SEG: no image of a series
    message = lone_slice_message(files[0].name)
    assert files[0].name in message and "one slice of a DICOM series" in message
    assert "all its files" in message and "Upload a DICOM folder" in message and ".zip" in message


def _without_preamble(source: Path, target: Path) -> Path:
    """``source`` written without the 128-byte preamble and "DICM" prefix (File Meta kept), as older archives do."""
    import pydicom

    header = pydicom.dcmread(source)
    header.preamble = None
    pydicom.dcmwrite(target, header, enforce_file_format=False)
    assert target.read_bytes()[128:132] != b"DICM"
    return target


def test_a_dicom_file_without_preamble_is_told_as_the_core_reads_it(tmp_path: Path) -> None:
    """One CT slice without the "DICM" preamble is a lone slice; typed as the CT it opens its folder's series; a DICOM
    SEG without it is refused as a segmentation (both were taken for no DICOM file)."""
    from liversam_web.mrml_scene import dicom_file_series

    folder = tmp_path / "series"
    folder.mkdir()
    sources = sorted((DATA / "dcmqi_ct3slice" / "ct").iterdir())
    slices = [_without_preamble(path, folder / path.name) for path in sources]
    assert lone_dicom_slice(slices[0])
    assert sorted(dicom_file_series(str(slices[1]))) == sorted(map(str, slices))
    seg = _without_preamble(DATA / "dcmqi_ct3slice" / "liver_seg.dcm", tmp_path / "liver_seg")
    assert not lone_dicom_slice(seg)
    with pytest.raises(InputError, match="is a DICOM SEG"):
        dicom_file_series(str(seg))


def test_a_multi_frame_dicom_file_is_no_lone_slice(tmp_path: Path) -> None:
    """An enhanced CT holds the whole volume in one file: it is opened, not refused as one slice."""
    import pydicom

    header = pydicom.dcmread(series_files()[0])
    header.NumberOfFrames = 20
    path = tmp_path / "enhanced.dcm"
    header.save_as(path)
    assert not lone_dicom_slice(path)


def test_an_archive_that_cannot_be_unpacked_here_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    """A zip holding a file 'a' and a file 'a/b.dcm' (or a full disk): the OSError escaped, the page said nothing and
    the files unpacked so far stayed. A name with a drive letter in a later part ('series/C:x.dcm', outside the folder
    on Windows) is refused like one in the first part."""
    archive = tmp_path / "clash.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("series/a", b"first")
        zipped.writestr("series/a/b.dcm", b"second")
    with pytest.raises(InputError, match=r"could not be unpacked on the app's machine .*one file per name"):
        unpack_zip(archive, tmp_path / "out", "clash.zip")
    assert not (tmp_path / "out").exists()
    drive = tmp_path / "drive.zip"
    with zipfile.ZipFile(drive, "w") as zipped:
        zipped.writestr("series/C:x.dcm", b"x")
    with pytest.raises(InputError, match="outside its folder"):
        unpack_zip(drive, tmp_path / "out2", "drive.zip")
    assert not (tmp_path / "out2").exists()


def test_a_zip_larger_than_the_free_space_is_refused_before_unpacking(tmp_path: Path, monkeypatch) -> None:
    """A .zip may unpack to up to 8 GiB: on a nearly full disk it filled the disk and failed half-way. Its declared
    size is compared with the free space where it unpacks (with a margin): refused, saying how much it needs, how much
    is free and where, and nothing is written."""
    import shutil as real_shutil

    from liversam_web import uploads

    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("series/01.dcm", b"\0" * 3 * 1024**2)  # 3 MiB, a few KiB compressed
    usage = real_shutil.disk_usage(tmp_path)
    asked = []

    def nearly_full(path):
        asked.append(Path(path))
        return usage._replace(free=uploads.UNPACK_FREE_MARGIN + 1024**2)  # 1 MiB more than the margin

    monkeypatch.setattr(uploads.shutil, "disk_usage", nearly_full)
    with pytest.raises(InputError) as refused:
        unpack_zip(archive, tmp_path / "upload" / "unpacked", "series.zip")
    message = str(refused.value)
    assert "'series.zip' unpacks to 3 MiB" in message and "only 513 MiB free" in message
    assert f"in '{tmp_path}'" in message and "needs 515 MiB" in message and "Nothing was unpacked" in message
    assert asked == [tmp_path]  # the disk of the nearest existing folder ('upload/unpacked' is not made yet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series.zip"]  # nothing written

    monkeypatch.setattr(uploads.shutil, "disk_usage",
                        lambda path: usage._replace(free=uploads.UNPACK_FREE_MARGIN + 4 * 1024**2))
    unpacked = unpack_zip(archive, tmp_path / "upload" / "unpacked", "series.zip")
    assert [Path(p).stat().st_size for p in unpacked] == [3 * 1024**2]  # it fits: unpacked


def _lying_zip(path: Path, data: bytes, declared: int) -> None:
    """A zip whose member 'series/01.dcm' holds ``data`` but whose headers declare ``declared`` bytes (a zip bomb's
    trick: small sizes declared, so that the size checks pass), its CRC that of the declared part."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("series/01.dcm", data)
    raw = bytearray(buffer.getvalue())
    crc = zlib.crc32(data[:declared])
    for signature, crc_at, size_at in ((b"PK\x03\x04", 14, 22), (b"PK\x01\x02", 16, 24)):  # local, central header
        start = raw.find(signature)
        struct.pack_into("<I", raw, start + crc_at, crc)
        struct.pack_into("<I", raw, start + size_at, declared)
    path.write_bytes(bytes(raw))


def test_a_member_larger_than_its_header_declares_is_not_unpacked_past_it(tmp_path: Path, monkeypatch) -> None:
    """The free-space and 8 GiB checks trust the sizes the headers declare: a member holding more (a forged header, a
    zip bomb) must not be written past its declared size. Python's zipfile stops there itself; the app's own copy
    stops there too (one byte more is read to tell it), and refuses the archive, leaving nothing."""
    archive = tmp_path / "bomb.zip"
    _lying_zip(archive, b"\0" * 1024**2, declared=1000)
    unpacked = unpack_zip(archive, tmp_path / "out", "bomb.zip")  # zipfile gives the declared 1000 bytes only
    assert [Path(p).stat().st_size for p in unpacked] == [1000]

    # a reader that gives what the member really holds (not what its header says): the copy stops and refuses
    import io

    real_open = zipfile.ZipFile.open
    read = []

    class Everything(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            chunk = super().read(size)
            read.append(len(chunk))
            return chunk

    def open_all(self, member, *args, **kwargs):
        if isinstance(member, zipfile.ZipInfo) and member.filename == "series/01.dcm":
            return Everything(b"\0" * 1024**2)
        return real_open(self, member, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_all)
    with pytest.raises(InputError, match=r"'bomb\.zip' holds a file larger than its header declares "
                                         r"\('series/01\.dcm': more than 1000 bytes\)"):
        unpack_zip(archive, tmp_path / "out2", "bomb.zip")
    assert not (tmp_path / "out2").exists()  # nothing left
    assert sum(read) == 1001  # read no further than the declared size and one byte


def test_uploaded_files_are_written_at_their_path_in_the_folder_chosen(tmp_path: Path) -> None:
    """Files of one name in two subfolders (a CD-ROM export's IM0001 of each series) are both kept; a path that
    leaves the folder is written by its name, inside it; a name given twice gets " (2)" before its suffixes."""
    from liversam_web.uploads import write_uploads

    files = [{"name": "IM0001", "content": b"one"}, {"name": "IM0001", "content": b"two"},
             {"name": "x.dcm", "content": b"three"}]
    written = write_uploads(files, tmp_path / "a", ["cd/S1/IM0001", "cd/S2/IM0001", "../../x.dcm"])
    assert written == [(tmp_path / "a" / p).as_posix() for p in ("cd/S1/IM0001", "cd/S2/IM0001", "x.dcm")]
    assert [Path(p).read_bytes() for p in written] == [b"one", b"two", b"three"]
    again = write_uploads([{"name": "ct.nii.gz", "content": b"1"}, {"name": "ct.nii.gz", "content": b"2"}],
                          tmp_path / "b")
    assert [Path(p).name for p in again] == ["ct.nii.gz", "ct (2).nii.gz"]


def test_dicom_files_are_told_by_content_not_by_name(tmp_path: Path) -> None:
    """A CD-ROM export's files have no extension; its DICOMDIR (the index) and a text file are no DICOM objects."""
    from web_page import cd_export

    from liversam_web.uploads import is_dicom_file, left_out_note

    root = cd_export(tmp_path / "cd")
    assert is_dicom_file(root / "DICOM" / "S1" / "IM0001")
    assert not is_dicom_file(root / "DICOMDIR") and not is_dicom_file(root / "AUTORUN.INF")
    assert left_out_note([str(root / "DICOMDIR"), str(root / ".DS_Store")]) == ""


def test_uploaded_files_are_refused_before_writing_when_too_many_or_larger_than_the_free_space(
        tmp_path: Path, monkeypatch) -> None:
    """Uploaded files were written with no look at the free space (only a .zip's unpacking had one) and with no limit
    on their number (a folder typed has 20,000): both are checked before a file is written, the message names the
    upload, what is wrong and what to do, and the upload's folder is removed; a write that fails (a file and a
    folder of one name) leaves nothing either."""
    import shutil as real_shutil

    from liversam_web import uploads
    from liversam_web.uploads import upload_subject, write_uploads

    files = [{"name": f"IM{n}", "content": [b"x" * 1024, b"y" * 1024]} for n in range(3)]  # sent in chunks
    relative = [f"cd/S1/IM{n}" for n in range(3)]
    monkeypatch.setattr(uploads, "MAX_FOLDER_FILES", 2)
    with pytest.raises(InputError, match=r"^The uploaded folder 'cd': 3 files, more than the 2 an upload may hold\. "
                                         r"Nothing was written\. Upload the folder of one DICOM series"):
        write_uploads(files, tmp_path / "a", relative, upload_subject(3, "folder", "cd"))
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(uploads, "MAX_FOLDER_FILES", 20_000)

    (tmp_path / "b").mkdir()
    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(uploads.shutil, "disk_usage",
                        lambda path: usage._replace(free=uploads.UNPACK_FREE_MARGIN + 4 * 1024))
    with pytest.raises(InputError) as refused:
        write_uploads(files, tmp_path / "b", relative, upload_subject(3, "file"))
    message = str(refused.value)
    assert message.startswith("The 3 files chosen: 6 KiB to write, but the app's machine has only 512 MiB free in "
                              f"'{tmp_path / 'b'}' (it needs 512 MiB: the files and 512 MiB kept free). Nothing was "
                              "written. Free some space there (or start the app with TMPDIR on a larger disk)"), message
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(uploads.shutil, "disk_usage",
                        lambda path: usage._replace(free=uploads.UNPACK_FREE_MARGIN + 8 * 1024))
    written = write_uploads(files, tmp_path / "c", relative)  # it fits
    assert [Path(p).read_bytes() for p in written] == [b"x" * 1024 + b"y" * 1024] * 3

    clash = [{"name": "S1", "content": b"a file"}, {"name": "IM1", "content": b"below it"}]
    with pytest.raises(InputError, match=r"^The 2 files chosen could not be written on the app's machine \(.*\); "
                                         r"nothing of it was kept\."):
        write_uploads(clash, tmp_path / "d", ["cd/S1", "cd/S1/IM1"], upload_subject(2, "file"))
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("relative", ["//{tmp}/x", "\\\\{tmp_back}\\x", "//", "a//x", "./x", "C:x", "a/\x00b",
                                      "cd/../../x"])
def test_an_uploaded_path_that_leaves_the_folder_is_written_by_its_name_inside_it(tmp_path: Path,
                                                                                  relative: str) -> None:
    """PurePosixPath("//x") keeps "//" as one part: a path "//x" (or "\\\\x", made "//x") passed the check for
    "/" and was written at "//x", anywhere on the app's machine; a NUL raised ValueError, not an InputError. Each is
    written by its name, inside the upload's folder."""
    from liversam_web.uploads import write_uploads

    into = tmp_path / "a" / "upload"
    into.mkdir(parents=True)
    tmp = tmp_path.as_posix().lstrip("/")
    relative = relative.format(tmp=tmp, tmp_back=tmp.replace("/", "\\"))
    written = write_uploads([{"name": "IM0001", "content": b"1"}], into, [relative])
    assert written == [(into / "IM0001").as_posix()]
    assert not (tmp_path / "x").exists() and not (tmp_path / "a" / "x").exists()


def test_an_uploaded_name_with_a_nul_or_dots_is_written_as_upload(tmp_path: Path) -> None:
    from liversam_web.uploads import write_uploads

    written = write_uploads([{"name": "a\x00b", "content": b"1"}, {"name": "..", "content": b"2"}], tmp_path / "u")
    assert written == [(tmp_path / "u" / n).as_posix() for n in ("upload", "upload (2)")]


def test_a_zip_member_at_an_absolute_path_is_refused_and_nothing_is_overwritten(tmp_path: Path) -> None:
    """A member "//<path>" (and "\\\\<path>") of an uploaded .zip was unpacked there: an existing file overwritten."""
    victim = tmp_path / "victim.txt"
    for member in (f"/{victim.as_posix()}", "\\\\" + victim.as_posix().lstrip("/").replace("/", "\\"), "a/./b",
                   "a//b", "C:x"):
        victim.write_bytes(b"kept")
        archive = _zip_with_member_named(tmp_path / "b.zip", member)
        with pytest.raises(InputError, match=r"^The uploaded archive 'b\.zip' holds a file outside its folder"):
            unpack_zip(archive, tmp_path / "out", "b.zip")
        assert victim.read_bytes() == b"kept"
        assert not (tmp_path / "out").exists()


def _zip_with_member_named(archive: Path, name: str) -> Path:
    """A zip whose second member is called ``name`` as given."""
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ok/x", b"1")
        zipped.writestr(name, b"overwritten")
    return archive


def test_an_upload_that_cannot_be_written_is_told_what_to_do_by_its_error(tmp_path: Path) -> None:
    """A name too long and a file and a folder of one name were told to "free some space"."""
    from liversam_web.uploads import write_uploads

    with pytest.raises(InputError) as long_name:
        write_uploads([{"name": "x", "content": b"1"}, {"name": "y", "content": b"2"}], tmp_path / "a",
                      ["cd/" + "n" * 300, "cd/y"], "The uploaded folder 'cd'")
    assert "File name too long" in str(long_name.value) and "shorten it" in str(long_name.value)
    assert "Free some space" not in str(long_name.value)
    with pytest.raises(InputError) as clash:
        write_uploads([{"name": "a", "content": b"1"}, {"name": "b", "content": b"2"}], tmp_path / "b",
                      ["cd/a", "cd/a/b"], "The uploaded folder 'cd'")
    assert "a file and a folder of one name: rename one" in str(clash.value), str(clash.value)
    assert "Free some space" not in str(clash.value) and not (tmp_path / "b").exists()


def test_a_zip_with_a_windows_folder_entry_or_a_name_twice_unpacks_each_file_once(tmp_path: Path) -> None:
    """A member ending in '\\' (a folder entry a Windows zipper wrote) made the whole zip refused as "a file outside
    its folder"; a name given twice was listed twice among the files unpacked."""
    archive = tmp_path / "cd.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("cd\\", b"")
        zipped.writestr("cd/IM0001", b"old")
        zipped.writestr("cd/IM0002", b"two")
    with zipfile.ZipFile(archive, "a") as zipped, pytest.warns(UserWarning, match="Duplicate name"):
        zipped.writestr("cd/IM0001", b"new")
    unpacked = unpack_zip(archive, tmp_path / "out", "cd.zip")
    assert unpacked == [str(tmp_path / "out" / "cd" / name) for name in ("IM0001", "IM0002")]
    assert Path(unpacked[0]).read_bytes() == b"new"
