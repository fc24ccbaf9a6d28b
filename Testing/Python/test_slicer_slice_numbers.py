"""The slice numbers the module shows are the ones Slicer shows: the CT's own voxel index (Data Probe), also on a CT
stored in sagittal or coronal slices.

LiverSAM works on such a CT's axial copy (``liversam.axial_orientation``), and the server, the core's review report
and its lesion table number that copy's slices (working k). The review table, its reasons and track summary, the
lesion table and the status line used to show those k: on a sagittal CT, whose rows run from the top down, "slice 1"
in LiverSAM was the voxel row the Data Probe calls j = 5. Checked on a real CT (a lits117 slab stored as a sagittal and
a coronal series) with the widget's own code on slicer-core's MRML, against the index computed from the volume node's
own RASToIJK matrix, as the Data Probe computes it (``DataProbe.py``: XY -> IJK of the layer's volume, rounded).
"""

from __future__ import annotations

import contextlib
import re
from types import SimpleNamespace

import numpy as np
import pytest
from test_slicer_reoriented_ct import lits117_slab, stored_as
from test_slicer_widget_state import Label, widgets  # noqa: F401  (the fixture)

from slicer_harness import ensure_module_on_path, fresh_scene, shared_data_dir

ensure_module_on_path()

from liversam.review import build_review_report  # noqa: E402
from liversam.segmentation import Segment, SegmentationResult  # noqa: E402
from LiverSAMLib import MRMLBridge  # noqa: E402
from LiverSAMLib.SegmentationLogic import SegmentationLogic  # noqa: E402
from LiverSAMLib.ServerRequests import track_summary  # noqa: E402
from LiverSAMLib.SliceNumbers import SliceNumbering  # noqa: E402

pytestmark = pytest.mark.slicer


@pytest.fixture(scope="module")
def slab():
    return lits117_slab()


def data_probe_ijk(volume_node, ras) -> np.ndarray:
    """The volume's own IJK of a RAS point, as the Data Probe shows it (the node's RASToIJK, rounded)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(matrix)
    return np.rint(np.array(matrix.MultiplyPoint([*ras, 1.0])[:3])).astype(int)


def superior_axis(volume_node) -> int:
    """The volume's own IJK axis that runs closest to S (read from its IJKToRAS matrix, not from LiverSAM's code)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return int(np.argmax([abs(matrix.GetElement(2, c)) for c in range(3)]))


class Item:
    """``qt.QTableWidgetItem``: its text and tooltip."""

    def __init__(self, text: str) -> None:
        self.text, self.tip = text, ""

    def setToolTip(self, text: str) -> None:  # noqa: N802 - Qt's name
        self.tip = text


class Table:
    """``QTableWidget`` as the widget fills it: headers, cells (:class:`Item`), header tooltips."""

    def __init__(self) -> None:
        self.headers: list[str] = []
        self.cells: dict[tuple[int, int], str] = {}
        self.header_tips: dict[int, str] = {}
        self.rows = 0

    def clear(self) -> None:
        self.headers, self.cells, self.header_tips = [], {}, {}

    def setColumnCount(self, n: int) -> None:
        pass

    def setHorizontalHeaderLabels(self, labels) -> None:
        self.headers = list(labels)

    def horizontalHeaderItem(self, column: int):
        return SimpleNamespace(setToolTip=lambda text: self.header_tips.__setitem__(column, text))

    def setRowCount(self, n: int) -> None:
        self.rows = n

    def setItem(self, row: int, column: int, item) -> None:
        self.cells[(row, column)] = item

    def column(self, c: int) -> list[str]:
        return [self.cells[(r, c)].text for r in range(self.rows)]

    def tips(self, c: int) -> list[str]:
        return [self.cells[(r, c)].tip for r in range(self.rows)]


def table_widget(module, volume, segmentation, logic, monkeypatch):
    """The LiverSAM widget with the two tables (cells as plain text) and the logic the tables use."""
    monkeypatch.setattr(module.qt, "QTableWidgetItem", Item, raising=False)
    monkeypatch.setattr(module.slicer.util, "tryWithErrorDisplay", lambda *a, **k: contextlib.nullcontext())
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    widget.ui = SimpleNamespace(reviewTable=Table(), lesionTable=Table(), reviewLabel=Label(),
                                reviewCollapsibleButton=SimpleNamespace(collapsed=True))  # fmt: skip
    widget._parameterNode = SimpleNamespace(inputVolume=volume, outputSegmentation=segmentation)
    widget.logic = SimpleNamespace(segmentation=logic)
    return widget


@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal"])
def test_the_numbering_is_the_data_probe_index_along_the_axial_direction(slab, plane):
    axial, _liver = slab
    ct = axial if plane == "axial" else stored_as(axial, plane)
    scene = fresh_scene()
    volume = MRMLBridge.volume_node_from_ct(ct, "ct", scene)
    numbering = MRMLBridge.slice_numbering(volume)
    working = MRMLBridge.geometry_from_volume_node(volume)
    assert numbering.axis == superior_axis(volume) and (numbering.plane or "axial") == plane
    shown = []
    for k in range(working.size_ijk[2]):
        ijk = data_probe_ijk(volume, working.ijk_to_ras(np.array([[100.0, 200.0, k]]))[0])
        shown.append(int(ijk[numbering.axis]))
        assert numbering.number(k) == ijk[numbering.axis] and numbering.working_k(ijk[numbering.axis]) == k
    if plane == "axial":
        assert shown == list(range(7))
    else:  # the rows of a reformatted series run from the top down: the axial slices' k backwards
        assert shown == list(range(6, -1, -1)) and numbering.reversed


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_the_lesion_table_shows_the_slices_the_data_probe_shows(widgets, slab, plane, monkeypatch):  # noqa: F811
    module, _train = widgets
    axial, _liver = slab
    ct = stored_as(axial, plane)
    scene = fresh_scene()
    volume = MRMLBridge.volume_node_from_ct(ct, "ct", scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    logic = SegmentationLogic(scene=scene)
    logic.prepare_segmentation(segmentation, volume)
    ids = logic.ensure_standard_segments(segmentation)
    tumour = np.zeros(MRMLBridge.geometry_from_volume_node(volume).shape_kji, bool)
    tumour[1:3, 60:75, 70:85] = True  # axial slices 1-2 of the working grid
    tumour[5, 20:25, 20:25] = True  # a second lesion on slice 5
    logic.write_mask(segmentation, ids["tumor"], volume, tumour)

    widget = table_widget(module, volume, segmentation, logic, monkeypatch)
    widget.onUpdateLesions()
    table = widget.ui.lesionTable
    axis = superior_axis(volume)
    assert table.headers[3] == f"Slices ({'ijk'[axis]})" and "Data Probe" in table.header_tips[3]
    # the expected rows from the segment on the volume's own voxels (Slicer's export) and its own axis
    import slicer
    from scipy import ndimage

    own = np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, ids["tumor"], volume)) > 0
    numpy_axis = 2 - axis

    labels, n = ndimage.label(own)
    expected = []
    for lesion in range(1, n + 1):
        index = np.nonzero((labels == lesion).any(axis=tuple(a for a in range(3) if a != numpy_axis)))[0]
        expected.append((int((labels == lesion).sum()), f"{index.min()}-{index.max()}"))
    expected = [text for _size, text in sorted(expected, reverse=True)]  # largest first, as the table
    print(f"{plane}: lesion table slices {table.column(3)} (working k 1-2 and 5-5)")
    assert table.column(3) == expected == ["4-5", "1-1"]


def review_report(axial_geometry) -> dict:
    """The core's review report of a liver on working slices 1-5 of the slab, with a low score on slice 4."""
    mask = np.zeros(axial_geometry.shape_kji, bool)
    mask[1:6, 30:100, 20:100] = True
    mask[4, 30:100, 20:60] = False
    scores = {1: 0.95, 2: 0.95, 3: 0.95, 4: 0.3, 5: 0.95}
    result = SegmentationResult(axial_geometry, [Segment("liver", 1, mask, slice_scores=scores)])
    return build_review_report(result)


def slice_numbers(text: str) -> list[int]:
    """Every number a "slice(s) ..." phrase names (runs expanded)."""
    numbers = []
    for phrase in re.findall(r"slices? ((?:\d+(?:-\d+)?(?:, (?!\d+ of them)| and )?)+)", text):
        for run in re.findall(r"\d+(?:-\d+)?", phrase):
            a, _, b = run.partition("-")
            numbers += list(range(int(a), int(b or a) + 1))
    return sorted(numbers)


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_the_review_table_and_its_reasons_show_the_slices_the_data_probe_shows(widgets, slab, plane, monkeypatch):  # noqa: F811
    module, _train = widgets
    axial, _liver = slab
    scene = fresh_scene()
    volume = MRMLBridge.volume_node_from_ct(stored_as(axial, plane), "ct", scene)
    working = MRMLBridge.geometry_from_volume_node(volume)
    report = review_report(working)
    assert report["items"], "the report flags nothing: the test is not meaningful"
    widget = table_widget(module, volume, None, None, monkeypatch)
    widget._fillReviewTable(report, MRMLBridge.slice_numbering(volume))
    table = widget.ui.reviewTable
    axis = superior_axis(volume)

    def probe(k: int) -> int:
        return int(data_probe_ijk(volume, working.ijk_to_ras(np.array([[0.0, 0.0, k]]))[0])[axis])

    assert table.headers[0] == f"Slices ({'ijk'[axis]})" and "Data Probe" in table.header_tips[0]
    items = sorted(report["items"], key=lambda item: probe(item["last_slice"]))  # shown in the order of their numbers
    assert table.column(0) == ["0-2", "5-6"] and table.column(1) == ["liver", "liver"]
    for row, item in enumerate(items):
        shown = sorted({probe(item["first_slice"]), probe(item["last_slice"])})
        assert table.column(0)[row] == "-".join(map(str, dict.fromkeys(shown)))
        reason = table.column(2)[row]
        print(f"{plane}: {item['slices']!r} -> {table.column(0)[row]!r}; {item['reason']!r} -> {reason!r}")
        assert slice_numbers(reason) == sorted(probe(k) for k in slice_numbers(item["reason"]))
        assert widget._reviewFirstSlices[row] == min(range(item["first_slice"], item["last_slice"] + 1), key=probe)
    tracks = widget.ui.reviewLabel.toolTip
    seed = report["segments"][0]["tracks"] and report["segments"][0]["tracks"][0]["seed_slice"]
    if seed:
        assert f"from slice {probe(seed)}" in tracks
    assert "Data Probe" in tracks


def test_renumbering_covers_every_phrase_of_the_core_review():
    reversed7 = SliceNumbering(axis=1, size=7, reversed=True, plane="sagittal")
    cases = {
        "liver begins at slice 1: check (slices 0-1)": "liver begins at slice 5: check (slices 5-6)",
        "outline is ragged on slices 0, 2-3 and 6: it may": "outline is ragged on slices 0, 3-4 and 6: it may",
        "area changes on slices 0 and 2 (score 0.30)": "area changes on slices 4 and 6 (score 0.30)",
        "unsure on slices 0-6, 5 of them; 40 % of its largest slice": "unsure on slices 0-6, 5 of them; 40 % of its largest slice",
        "user prompts on slice 2": "user prompts on slice 4",
    }
    for text, expected in cases.items():
        assert reversed7.renumber(text) == expected
    assert SliceNumbering().renumber("slice 2") == "slice 2"
    summary = track_summary({"segments": [{"name": "liver", "tracks": [
        {"seed_slice": 2, "first_slice": 1, "last_slice": 5, "stopped": {"up": "user prompts on slice 5", "down": "structure ended"}}]}]},
        reversed7)  # fmt: skip
    assert summary == ["liver: from slice 4, slices 1-5 (up: user prompts on slice 1; down: structure ended)"]


def test_the_status_line_and_a_fixs_message_show_the_volumes_own_slices(widgets, slab):  # noqa: F811
    module, _train = widgets
    axial, _liver = slab
    volume = MRMLBridge.volume_node_from_ct(stored_as(axial, "sagittal"), "ct", fresh_scene())
    numbering = MRMLBridge.slice_numbering(volume)
    assert module.modelScoresText({1: 0.9, 2: 0.8}, numbering) == (
        "Model score (predicted IoU): slice 4: 0.80, slice 5: 0.90 (index j)")  # fmt: skip
    logic = module.LiverSAMLogic.__new__(module.LiverSAMLogic)
    logic.server = SimpleNamespace(apply_propagation=lambda plan, answer: [1, 2, 3])
    plan = SimpleNamespace(fix_slices=[2], volume_node=volume)
    assert logic.applyPropagation(plan, {}) == "Fixed slice(s) 4; slices 3-5 re-propagated (index j)."
    axial_volume = MRMLBridge.volume_node_from_ct(axial, "axial", fresh_scene())
    assert module.modelScoresText({1: 0.9}, MRMLBridge.slice_numbering(axial_volume)).endswith("slice 1: 0.90 (index k)")


def test_a_fixs_job_stage_on_the_status_line_shows_the_volumes_own_slice(widgets, slab):  # noqa: F811
    """The server's stage of a fix names the fixed slice by its working k ("re-propagating 'liver' from slice 2"); the
    status line showed it as it came, while the same job's end message named the volume's own index (4)."""
    module, _train = widgets
    axial, _liver = slab
    volume = MRMLBridge.volume_node_from_ct(stored_as(axial, "sagittal"), "ct", fresh_scene())
    plan = SimpleNamespace(restarted=False, volume_node=volume, fix_slices=[2])
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    widget._job = {"plan": plan, "cancelled": False, "what": "Propagation"}
    widget.ui = SimpleNamespace(statusLabel=Label(), progressBar=SimpleNamespace(maximum=0, value=0))
    statuses = iter([
        {"state": "running", "stage": "re-propagating 'liver' from slice 2", "done": 0, "total": 1},  # jobs.py
        {"state": "running", "stage": "propagating 'liver'", "done": 3, "total": 7},
    ])  # fmt: skip
    widget._calls = SimpleNamespace(submit=lambda work, done, failed, name="": done(next(statuses)))
    widget._pollJob()
    assert widget.ui.statusLabel.text == "re-propagating 'liver' from slice 4 (index j)"
    widget._pollJob()
    assert widget.ui.statusLabel.text == "propagating 'liver'"  # no slice named: no index note


def test_the_index_is_named_on_an_axial_ct_too(widgets, slab, monkeypatch):  # noqa: F811
    """An axial CT's column said plain "Slices" without a tooltip, though a CT loaded from DICOM shows another
    "slice" number in the Data Probe ([slice: N], the instance number)."""
    module, _train = widgets
    axial, _liver = slab
    volume = MRMLBridge.volume_node_from_ct(axial, "ct", fresh_scene())
    widget = table_widget(module, volume, None, None, monkeypatch)
    widget._fillReviewTable(review_report(MRMLBridge.geometry_from_volume_node(volume)), MRMLBridge.slice_numbering(volume))
    table = widget.ui.reviewTable
    assert table.headers[0] == "Slices (k)"
    tip = table.header_tips[0]
    assert "index k" in tip and "(i, j, k)" in tip and "[slice: N]" in tip and "not DICOM instance numbers" in tip
    assert set(table.tips(0)) == {""}  # no DICOM instance numbers on this CT
    assert tip in widget.ui.reviewLabel.toolTip


def slicer_data_probe():
    """``generateIJKPixelDescription`` of Slicer's Data Probe at v5.10.0 (from the Slicer git mirror)."""
    import ast
    import os
    import subprocess
    import textwrap
    from pathlib import Path

    source_dir = Path(os.environ.get("LIVERSAM_SLICER_SOURCE", "/work/.mirror/Slicer+Slicer/repo"))
    try:
        source = subprocess.run(["git", "-C", str(source_dir), "show", "v5.10.0:Modules/Scripted/DataProbe/DataProbe.py"],
                                check=True, capture_output=True, text=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no Slicer source at {source_dir} (set LIVERSAM_SLICER_SOURCE to a Slicer git checkout)")
    function = next(n for n in ast.walk(ast.parse(source))
                    if isinstance(n, ast.FunctionDef) and n.name == "generateIJKPixelDescription")  # fmt: skip
    namespace = {"_": lambda text: text}
    exec(textwrap.dedent(ast.get_source_segment(source, function)), namespace)  # noqa: S102 - Slicer's own code
    describe = namespace["generateIJKPixelDescription"]
    return lambda ijk, volume: describe(None, [int(v) for v in ijk], SimpleNamespace(GetVolumeNode=lambda: volume))


def dicom_loaded_ct(scene):
    """The shared real series totalseg_small/ct_dicom (20 axial images) as Slicer's DICOM loader leaves it: k along S
    and ``DICOM.instanceNumbers`` in k order (DICOMScalarVolumePlugin v5.10.0), which here run the other way."""
    import pydicom

    from liversam.ct_io import read_ct

    folder = shared_data_dir() / "totalseg_small" / "ct_dicom"
    if not folder.is_dir():
        pytest.skip(f"no {folder}")
    volume = MRMLBridge.volume_node_from_ct(read_ct(folder, allow_non_ct=True), "CT", scene)
    headers = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))  # fmt: skip
    volume.SetAttribute("DICOM.instanceNumbers", " ".join(str(ds.InstanceNumber) for ds in headers))
    return volume


def test_a_dicom_cts_rows_give_the_instance_numbers_the_data_probe_shows(widgets, monkeypatch):  # noqa: F811
    """Slicer's Data Probe shows "(i, j, k) [slice: N]" on a CT loaded from DICOM, N its instance number, which here
    runs against k (LiverSAM's "slice 0" is "[slice: 286]"). The docs said the module showed "the number the Data
    Probe shows"; the tables now name the index (k) and give each row's instance numbers in its tooltip, checked
    against Slicer 5.10's own Data Probe code."""
    module, _train = widgets
    scene = fresh_scene()
    volume = dicom_loaded_ct(scene)
    probe = slicer_data_probe()
    numbering = MRMLBridge.slice_numbering(volume)
    assert numbering.instance_numbers is not None and numbering.instance_numbers[0] > numbering.instance_numbers[-1]
    working = MRMLBridge.geometry_from_volume_node(volume)
    widget = table_widget(module, volume, None, None, monkeypatch)
    report = review_report(working)
    widget._fillReviewTable(report, numbering)
    table = widget.ui.reviewTable
    assert table.headers[0] == "Slices (k)" and "[slice: N]" in table.header_tips[0]
    for row, item in enumerate(sorted(report["items"], key=lambda item: item["first_slice"])):
        ends = [re.search(r"\[slice: (\d+)\]", probe((0, 0, k), volume)).group(1)
                for k in (item["first_slice"], item["last_slice"])]  # fmt: skip
        low, high = sorted(map(int, ends))
        expected = f"DICOM instance number {low}" if low == high else f"DICOM instance numbers {low}-{high}"
        print(f"row {table.column(0)[row]!r}: {table.tips(0)[row]!r}; Data Probe {probe((0, 0, item['first_slice']), volume)!r}")
        assert table.tips(0)[row].startswith(expected)
        assert table.column(0)[row] == numbering.text(item["first_slice"], item["last_slice"])  # still the index k

    # the lesion table's slices cell too
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    logic = SegmentationLogic(scene=scene)
    logic.prepare_segmentation(segmentation, volume)
    ids = logic.ensure_standard_segments(segmentation)
    tumour = np.zeros(working.shape_kji, bool)
    tumour[3:6, 200:230, 200:230] = True
    logic.write_mask(segmentation, ids["tumor"], volume, tumour)
    widget = table_widget(module, volume, segmentation, logic, monkeypatch)
    widget.onUpdateLesions()
    lesions = widget.ui.lesionTable
    first, last = (re.search(r"\[slice: (\d+)\]", probe((0, 0, k), volume)).group(1) for k in (3, 5))
    assert lesions.column(3) == ["3-5"] and lesions.headers[3] == "Slices (k)"
    assert lesions.tips(3)[0].startswith(f"DICOM instance numbers {min(int(first), int(last))}-{max(int(first), int(last))}")


def test_instance_numbers_are_used_only_when_they_name_the_slices_one_to_one():
    from LiverSAMLib.SliceNumbers import instance_numbers_of

    assert instance_numbers_of("3 2 1", 3) == (3, 2, 1) and instance_numbers_of("1 2 4", 3) == (1, 2, 4)
    assert instance_numbers_of(None, 3) is None and instance_numbers_of("", 3) is None
    assert instance_numbers_of("1 ? 3", 3) is None  # a missing tag (the loader writes "?")
    assert instance_numbers_of("1 2", 3) is None  # cropped or resampled: not one per slice
    assert instance_numbers_of("1 3 2", 3) is None and instance_numbers_of("1 1 2", 3) is None  # not a run
    numbering = SliceNumbering().with_instance_numbers((30, 20, 10))
    assert numbering.instance_text(0, 2) == "DICOM instance numbers 10-30 (the Data Probe's [slice: N])"
    assert numbering.instance_text(1).startswith("DICOM instance number 20") and SliceNumbering().instance_text(1) == ""

