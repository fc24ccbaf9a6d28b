"""LiverSAMTrain's inputs, with the widget's own code on slicer-core's MRML (training review items 3, 7 and 12).

- Start / Resume exported the listed pairs into ``RUN_DIR/exported-data`` before any check: pairs other than an earlier
  run's overwrote that run's inputs, and the run could not be resumed any more (``liversam train`` refuses data that
  changed). And after a Slicer restart (no pairs listed) Resume failed unless the user picked
  ``RUN_DIR/exported-data/manifest.json`` by hand.
- "Add pair" twice with the same CT listed it twice (``liversam train`` then refuses the same CT listed twice).
- The "Max slices per study" spin box accepted 1, which the command refuses; the module had no field for
  ``--liver-names`` / ``--tumor-names``, which its error messages tell the user to pass; nothing showed while the
  training caches were built (minutes to hours of encoding on a CPU): ``liversam train --events`` now prints
  ``LIVERSAM_CACHE`` lines and the widget shows them.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_slicer_widget_state import Label, Log, widgets  # noqa: F401  (the fixture)

from slicer_harness import REPO_ROOT, ensure_module_on_path, fresh_scene, slicer_environment

ensure_module_on_path()

from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge  # noqa: E402

pytestmark = pytest.mark.slicer
TRAIN_UI = REPO_ROOT / "LiverSAMTrain" / "Resources" / "UI" / "LiverSAMTrain.ui"


def study(scene, name: str, value: int):
    """A small CT volume (its voxels ``value`` HU apart from another study's) and a segmentation with a liver."""
    import slicer

    geometry = ImageGeometry((24, 20, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    volume = MRMLBridge.volume_node_from_ct(CTVolume(np.full((6, 20, 24), value, np.int16), geometry), name, scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
    liver = np.zeros((6, 20, 24), np.uint8)
    liver[1:5, 4:16, 4:20] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(liver, segmentation, segment, volume)
    return volume, segmentation


class Selector:
    def __init__(self, node=None) -> None:
        self.node = node

    def currentNode(self):  # noqa: N802 - Qt's name
        return self.node


def train_widget(train, run_dir: Path, **fields):
    """The LiverSAMTrain widget as setup() leaves it, its fields as the user set them."""
    widget = train.LiverSAMTrainWidget.__new__(train.LiverSAMTrainWidget)
    widget._pairs, widget._settings = [], None
    widget._sceneObservation, widget._timer, widget._check, widget.logic = None, None, None, None
    widget._runFolderTimer = None
    values = {"epochs": 3, "batchSize": 8, "lr": 1e-4, "augmentCopies": 0, "maxSlices": 1, "seed": 0, **fields}
    widget.ui = SimpleNamespace(
        outputPathLineEdit=SimpleNamespace(currentPath=str(run_dir)),
        dataPathLineEdit=SimpleNamespace(currentPath=values.pop("data", "")),
        trainEncoderComboBox=SimpleNamespace(currentText="none"), deviceComboBox=SimpleNamespace(currentText="cpu"),
        liverLabelsLineEdit=SimpleNamespace(text="1,2"), tumorLabelsLineEdit=SimpleNamespace(text="2"),
        liverNamesLineEdit=SimpleNamespace(text=values.pop("liverNames", "")),
        tumorNamesLineEdit=SimpleNamespace(text=values.pop("tumorNames", "")),
        modelNameLineEdit=SimpleNamespace(text=""), logTextEdit=Log(), statusLabel=Label(),
        volumeSelector=Selector(), segmentationSelector=Selector(), pairsList=SimpleNamespace(addItem=lambda text: None),
        **{f"{name}SpinBox": SimpleNamespace(value=value) for name, value in values.items()},
    )  # fmt: skip
    return widget


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_start_never_overwrites_an_earlier_runs_exported_data_with_other_pairs(widgets, tmp_path):  # noqa: F811
    _liversam, train = widgets
    scene = fresh_scene()
    a, b = study(scene, "patient A", 40), study(scene, "patient B", 60)
    run = tmp_path / "run"
    widget = train_widget(train, run)
    widget._pairs = [a]
    settings = widget._collectSettings()  # Start
    exported = run / "exported-data"
    assert settings.data == str(exported / "manifest.json") and (exported / "patient_A" / "ct.nrrd").is_file()
    (run / "state.pt").write_bytes(b"a run trained on patient A")  # liversam train ran (resumable)
    before = snapshot(exported)

    widget._pairs = [b]  # other pairs, the same run folder
    with pytest.raises(ValueError, match="holds a run trained on other data") as refused:
        widget._collectSettings()
    print(refused.value)
    assert "new run folder" in str(refused.value) and "Clear pairs and then Resume" in str(refused.value)
    assert snapshot(exported) == before  # the run's inputs are as they were
    assert sorted(p.name for p in run.iterdir()) == ["exported-data", "state.pt"]  # nothing left behind

    widget._pairs = [a]  # Resume with the run's own pairs: its export is used as it is
    mtimes = {p: p.stat().st_mtime_ns for p in exported.rglob("*") if p.is_file()}
    assert widget._collectSettings().data == str(exported / "manifest.json")
    assert snapshot(exported) == before and all(p.stat().st_mtime_ns == t for p, t in mtimes.items())

    (run / "state.pt").unlink()  # no run trained in the folder: other pairs replace the export
    widget._pairs = [b]
    assert widget._collectSettings().data == str(exported / "manifest.json")
    assert [c["id"] for c in json.loads((exported / "manifest.json").read_text())["cases"]] == ["patient_B"]
    assert not (exported / "patient_A").exists() and sorted(p.name for p in run.iterdir()) == ["exported-data"]


def test_resume_after_a_restart_uses_the_run_folders_exported_pairs(widgets, tmp_path):  # noqa: F811
    _liversam, train = widgets
    scene = fresh_scene()
    run = tmp_path / "run"
    widget = train_widget(train, run)
    with pytest.raises(ValueError, match="Choose a data folder or manifest"):
        widget._collectSettings()  # nothing to train on
    widget._pairs = [study(scene, "patient A", 40)]
    widget._collectSettings()  # Start
    restarted = train_widget(train, run)  # Slicer restarted: no pairs listed, no data folder chosen
    settings = restarted._collectSettings()
    assert settings.data == str(run / "exported-data" / "manifest.json")
    assert any("exported earlier" in line for line in restarted.ui.logTextEdit.lines)
    chosen = train_widget(train, run, data=str(tmp_path / "other-data"))  # a data folder chosen wins
    assert chosen._collectSettings().data == str(tmp_path / "other-data")


def test_a_run_started_in_the_folder_keeps_its_exported_data_and_a_live_one_refuses_start_and_resume(
    widgets, tmp_path  # noqa: F811
):
    """Only state.pt / best.pt counted as "a run is here": a run still building its caches (hours on a CPU, before any
    state.pt; its process outlives Slicer) had its exported data replaced by Start with other pairs after a Slicer
    restart, and Resume started a second liversam train in the same folder (review R4)."""
    from test_run_folder_lock import hold_in_another_process

    from liversam.run_folder_lock import LOCK_NAME

    _liversam, train = widgets
    scene = fresh_scene()
    a, b = study(scene, "patient A", 40), study(scene, "patient B", 60)
    run = tmp_path / "run"
    widget = train_widget(train, run)
    widget._pairs = [a]
    widget._collectSettings()  # Start: exported, then liversam train starts and holds the folder
    exported = run / "exported-data"
    before = snapshot(exported)
    (run / "config.json").write_text("{}")
    (run / "train.log").write_text("building the caches\n")
    process = hold_in_another_process(run)
    try:
        restarted = train_widget(train, run)  # Slicer restarted
        for pairs in ([b], [a], []):  # Start with other pairs, Start or Resume with its own, Resume without pairs
            restarted._pairs = pairs
            with pytest.raises(ValueError, match=f"training process \\(PID {process.pid}\\) is still running") as refused:
                restarted._collectSettings()
        print(refused.value)
        assert snapshot(exported) == before
    finally:
        process.kill()
        process.wait(30)

    # the run ended (here: killed) before its first epoch, and had held the lock: no run to keep, the pairs replace it
    restarted._pairs = [b]
    assert restarted._collectSettings().data == str(exported / "manifest.json")
    assert [c["id"] for c in json.loads((exported / "manifest.json").read_text())["cases"]] == ["patient_B"]

    # a run started by a liversam train that held no lock (an older version): it may still run; its data stay
    (run / LOCK_NAME).unlink()
    restarted._pairs = [a]
    before = snapshot(exported)
    with pytest.raises(ValueError, match="holds a run started on other data \\(config.json, train.log\\)") as refused:
        restarted._collectSettings()
    print(refused.value)
    assert "Clear pairs and then Resume" in str(refused.value) and "new run folder" in str(refused.value)
    assert snapshot(exported) == before


def test_the_same_ct_cannot_be_added_twice(widgets, monkeypatch):  # noqa: F811
    _liversam, train = widgets
    scene = fresh_scene()
    (volume, segmentation), (other, other_segmentation) = study(scene, "A", 40), study(scene, "B", 60)
    second_segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "A again")
    errors: list[str] = []
    monkeypatch.setattr(train.slicer.util, "errorDisplay", lambda text, *args, **kwargs: errors.append(text))
    widget = train_widget(train, Path("/unused"))
    listed: list[str] = []
    widget.ui.pairsList = SimpleNamespace(addItem=listed.append)

    def add(v, s) -> None:
        widget.ui.volumeSelector.node, widget.ui.segmentationSelector.node = v, s
        widget.onAddPair()

    add(volume, segmentation)
    add(volume, segmentation)  # pressed twice
    assert len(widget._pairs) == 1 and errors == ["The pair 'A' + 'A segmentation' is already in the list."]
    add(volume, second_segmentation)  # the same CT with another segmentation: training would refuse it
    assert len(widget._pairs) == 1 and "The CT 'A' is already in the list, with 'A segmentation'" in errors[-1]
    add(other, other_segmentation)
    assert [v.GetName() for v, _s in widget._pairs] == ["A", "B"] and len(listed) == 2


def test_a_labelmap_is_not_taken_for_the_ct_of_a_pair(widgets, monkeypatch):  # noqa: F811
    """The CT selector listed labelmaps (qMRMLNodeComboBox shows the subclasses of its node types unless
    showChildNodeTypes is false: qMRMLSortFilterProxyModel.cxx, v5.10.0), and Add pair took a labelmap loaded beside
    its CT as the CT: it was exported and trained on as one, without a word."""
    import slicer

    _liversam, train = widgets
    scene = fresh_scene()
    volume, segmentation = study(scene, "A", 40)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "A label")
    slicer.util.updateVolumeFromArray(labelmap, np.zeros((6, 20, 24), np.uint8))
    errors: list[str] = []
    monkeypatch.setattr(train.slicer.util, "errorDisplay", lambda text, *args, **kwargs: errors.append(text))
    widget = train_widget(train, Path("/unused"))
    widget.ui.volumeSelector.node, widget.ui.segmentationSelector.node = labelmap, segmentation
    widget.onAddPair()
    assert widget._pairs == [] and len(errors) == 1
    assert "'A label' is a labelmap, not a CT volume" in errors[0]
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "A photo")
    widget.ui.volumeSelector.node = colour
    widget.onAddPair()
    assert widget._pairs == [] and "'A photo' is a colour (vector) volume, not a CT volume" in errors[1]
    widget.ui.volumeSelector.node = volume
    widget.onAddPair()
    assert widget._pairs == [(volume, segmentation)] and len(errors) == 2
    selector = next(w for w in ET.parse(TRAIN_UI).getroot().iter("widget") if w.get("name") == "volumeSelector")
    shown = {p.get("name"): p for p in selector.findall("property")}
    assert shown["showChildNodeTypes"].find("bool").text == "false", "the CT selector lists labelmaps"


def test_a_data_folder_can_be_chosen_with_the_data_fields_button_and_a_manifest_with_its_own(widgets, monkeypatch):  # noqa: F811
    """The data field's filters were Dirs|Files: ctkPathLineEdit::browse then opens QFileDialog::getOpenFileName
    (CTK dd4caeae, Libs/Widgets/ctkPathLineEdit.cpp), in which no folder can be chosen, and a folder of studies is the
    usual training data. Its button now chooses a folder; "Manifest..." chooses a .json / .csv manifest."""
    _liversam, train = widgets
    root = ET.parse(TRAIN_UI).getroot()
    field = next(w for w in root.iter("widget") if w.get("name") == "dataPathLineEdit")
    filters = next(p for p in field.findall("property") if p.get("name") == "filters").find("set").text
    assert "Files" not in filters and "Dirs" in filters, "the data field's button opens a file dialog"
    assert any(w.get("name") == "dataManifestButton" for w in root.iter("widget"))
    asked = []

    def get_open_file_name(parent, caption, folder, name_filters):  # noqa: ARG001 - QFileDialog's signature
        asked.append(name_filters)
        return "/data/manifest.json"

    monkeypatch.setattr(train.qt, "QFileDialog", SimpleNamespace(getOpenFileName=get_open_file_name), raising=False)
    widget = train_widget(train, Path("/unused"))
    widget.parent = None
    widget.onChooseManifest()
    assert widget.ui.dataPathLineEdit.currentPath == "/data/manifest.json" and "*.json *.csv" in asked[0]


class PairsList:
    """``QListWidget`` as the pairs list uses it."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def addItem(self, text: str) -> None:  # noqa: N802
        self.items.append(text)

    def clear(self) -> None:
        self.items = []


def test_pairs_of_nodes_no_longer_in_the_scene_leave_the_list(widgets, tmp_path):  # noqa: F811
    """A pair whose CT or segmentation was deleted, or closed with File > Close Scene, stayed listed: Start exported
    its nodes (they still hold their data) and trained on data the user had closed, and the same CT loaded again was
    another node, so "Add pair" took it as another CT. Such pairs now leave the list as the scene removes their nodes."""
    _liversam, train = widgets
    scene = fresh_scene()
    (a, a_segmentation), (b, b_segmentation) = study(scene, "A", 40), study(scene, "B", 60)
    widget = train_widget(train, tmp_path / "run")
    widget.ui.pairsList = PairsList()
    for volume, segmentation in ((a, a_segmentation), (b, b_segmentation)):
        widget.ui.volumeSelector.node, widget.ui.segmentationSelector.node = volume, segmentation
        widget.onAddPair()
    widget._observeScene(scene)  # as setup() does, on slicer.mrmlScene
    try:
        scene.RemoveNode(b_segmentation)  # deleted in the Data module
        assert widget._pairs == [(a, a_segmentation)] and widget.ui.pairsList.items == ["A  +  A segmentation"]
        assert widget.ui.logTextEdit.lines == [
            "Pair 'B  +  B segmentation' removed from the list: its CT or segmentation is no longer in the scene."
        ]
        scene.Clear(0)  # File > Close Scene
        assert widget._pairs == [] and widget.ui.pairsList.items == []
        with pytest.raises(train.TrainingLogic.NoTrainingData):  # nothing exported from the closed scene
            train.TrainingLogic.training_data(widget._pairs, tmp_path / "run")
        with pytest.raises(ValueError, match="add loaded volume"):
            widget._collectSettings()
        assert not (tmp_path / "run" / "exported-data").exists()
    finally:
        widget.cleanup()  # the observer is removed with the widget
    assert widget._sceneObservation is None


def test_max_slices_cannot_be_one_and_segment_names_are_passed(widgets, tmp_path):  # noqa: F811
    """The spin box's lowest value is "all" (1, never sent); 1 was sent as --max-slices 1, which the command refuses."""
    from liversam.cli import build_parser
    from LiverSAMTrainLib import TrainingLogic

    _liversam, train = widgets
    spin = next(w for w in ET.parse(TRAIN_UI).getroot().iter("widget") if w.get("name") == "maxSlicesSpinBox")
    properties = {p.get("name"): (p.findtext("number") or p.findtext("string")) for p in spin.findall("property")}
    assert properties["minimum"] == "1" and properties["specialValueText"] == "all" and properties["value"] == "1"
    data = tmp_path / "data"
    for value, expected in ((1, None), (2, 2), (40, 40)):
        widget = train_widget(train, tmp_path / "run", data=str(data), maxSlices=value,
                              liverNames="Leber, liver", tumorNames="HCC")  # fmt: skip
        command = TrainingLogic.build_train_command(widget._collectSettings(), python="python")
        args = build_parser().parse_args(command[3:])
        assert args.max_slices == expected
        assert args.liver_names == ("Leber", "liver") and args.tumor_names == ("HCC",)
    default = train_widget(train, tmp_path / "run", data=str(data))  # empty fields: the command's own defaults
    args = build_parser().parse_args(TrainingLogic.build_train_command(default._collectSettings(), python="p")[3:])
    assert args.liver_names == ("liver",) and "tumor" in args.tumor_names
    names = {w.get("name") for w in ET.parse(TRAIN_UI).getroot().iter("widget")}
    assert {"liverNamesLineEdit", "tumorNamesLineEdit"} <= names


class Process:
    """``TrainingProcess`` as poll() reads it: the lines the command printed, then its end."""

    stopping = stop_requested = False

    def __init__(self, lines: list[str], code: int | None = None) -> None:
        self.lines, self.code = lines, code

    def escalate_stop(self) -> bool:
        return False

    def read_lines(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    def is_running(self) -> bool:
        return self.code is None

    @property
    def returncode(self):
        return self.code


class Bar:
    def __init__(self) -> None:
        self.maximum, self.value = 0, 0

    def setMaximum(self, value: int) -> None:  # noqa: N802
        self.maximum = value

    def setValue(self, value: int) -> None:  # noqa: N802
        self.value = value


def polled(train, lines: list[str], code: int | None = None):
    widget = train.LiverSAMTrainWidget.__new__(train.LiverSAMTrainWidget)
    widget._check, widget._finished, widget._chartShown, widget._historyStamp = None, False, None, None
    widget._settings = SimpleNamespace(epochs=5, out="/unused")
    widget._timer = SimpleNamespace(stop=lambda: None)
    widget.logic = SimpleNamespace(process=Process(lines, code), updateCurves=lambda out: None, chartNodes={},
                                   tableNode=None)  # fmt: skip
    widget.updateButtons = lambda: None
    widget.ui = SimpleNamespace(statusLabel=Label(), logTextEdit=Log(), progressBar=Bar(),
                                curvesComboBox=SimpleNamespace(currentIndex=0))  # fmt: skip
    widget.poll()
    return widget


def test_the_cache_being_built_is_shown(widgets):  # noqa: F811
    _liversam, train = widgets
    event = "LIVERSAM_CACHE "
    widget = polled(train, [event + json.dumps({"study": 2, "studies": 3, "case": "patient_B"})])
    assert widget.ui.statusLabel.text == "Preparing the training data: study 2 of 3 ('patient_B')..."
    assert widget.ui.progressBar.maximum == 0  # busy
    widget = polled(train, [event + json.dumps({"study": 2, "studies": 3, "case": "patient_B", "done": 40, "total": 120})])
    assert widget.ui.statusLabel.text == "Preparing the training data: study 2 of 3 ('patient_B'): 40 of 120 slices encoded..."
    assert (widget.ui.progressBar.maximum, widget.ui.progressBar.value) == (120, 40)
    epoch = 'LIVERSAM_EPOCH {"epoch": 1, "epochs": 5, "val_dice_mean": 0.9, "best_epoch": 1}'
    widget = polled(train, [event + json.dumps({"study": 1, "studies": 1, "case": "a", "done": 3, "total": 3}), epoch])
    assert (widget.ui.progressBar.maximum, widget.ui.progressBar.value) == (5, 1)  # the bar counts epochs again
    resumed = polled(train, ['LIVERSAM_RESUME {"epoch": 3, "finished": null}'])
    assert resumed.ui.statusLabel.text == "Resumed after epoch 3." and resumed.ui.progressBar.value == 3


def test_an_epoch_says_when_its_mean_dice_is_the_livers_alone(widgets):  # noqa: F811
    """Validation without tumour: the mean validation Dice is the liver's alone; ``liversam train`` says so in its
    EPOCH event (``val_dice_mean_of``), and the status line said only "validation Dice 0.951"."""
    _liversam, train = widgets
    row = {"epoch": 2, "epochs": 5, "val_dice_mean": 0.951, "val_dice_liver": 0.951, "val_dice_tumor": None,
           "best_epoch": 2, "val_dice_mean_of": "liver only: the validation cases have no tumour"}
    widget = polled(train, ["LIVERSAM_EPOCH " + json.dumps(row)])
    assert widget.ui.statusLabel.text == ("Epoch 2/5: validation Dice 0.951, liver only: the validation cases have no "
                                          "tumour (best epoch 2)")
    row.update(val_dice_tumor=0.7, val_dice_mean_of="mean of liver and tumour")
    widget = polled(train, ["LIVERSAM_EPOCH " + json.dumps(row)])
    assert widget.ui.statusLabel.text == "Epoch 2/5: validation Dice 0.951 (best epoch 2)"


def test_a_failed_run_says_so_and_where_the_segment_names_go(widgets):  # noqa: F811
    _liversam, train = widgets
    message = ("Study 'a' ('a/segmentation.seg.nrrd') has no liver segment (segments: Leber). Name the liver segment "
               "'liver' or pass --liver-names with its name.")  # fmt: skip
    widget = polled(train, [message], code=2)
    assert widget.ui.statusLabel.text.startswith("Training ended with an error (code 2): see the log below.")
    assert "Liver segment names" in widget.ui.statusLabel.text and message in widget.ui.logTextEdit.lines


def test_segment_names_are_advised_only_by_the_commands_advice(widgets):  # noqa: F811
    """Any line naming --liver-names / --tumor-names set the hint, argparse's usage line and a command line too: a run
    failing for another reason then said "Segment names go in Settings" (review R8)."""
    _liversam, train = widgets
    usage = ("usage: liversam train [-h] --data DATA --out OUT [--liver-names LIVER_NAMES] [--tumor-names TUMOR_NAMES]")
    command = "/venv/bin/python -m liversam train --data /d/ --out /r --liver-labels 1,2 --liver-names Leber --events"
    for lines in ([usage, "liversam train: error: argument --epochs: invalid int value: 'x'"], [command, "Killed"]):
        widget = polled(train, lines, code=2)
        assert widget.ui.statusLabel.text == "Training ended with an error (code 2): see the log below.", lines
    for advice in ("Study 'a' ('a/l.nii.gz') has no liver voxels with the configured labels (liver labels 1). Check "
                   "--liver-labels / --liver-names.",
                   "Check that this label is the liver's (--liver-labels / --liver-names), lower --min-liver-voxels"):  # fmt: skip
        assert "Liver segment names" in polled(train, [advice], code=2).ui.statusLabel.text, advice


def test_the_busy_bar_of_a_reused_cache_stops_when_the_run_ends(widgets):  # noqa: F811
    """A study whose cache was reused sends its CACHE start only (the bar busy, maximum 0); a run that ended after it
    left the bar animating (review R8)."""
    _liversam, train = widgets
    start = "LIVERSAM_CACHE " + json.dumps({"study": 1, "studies": 1, "case": "a"})
    running = polled(train, [start])
    assert running.ui.progressBar.maximum == 0  # busy while it runs
    ended = polled(train, [start], code=2)
    assert ended.ui.progressBar.maximum == 1 and ended.ui.progressBar.value == 0


def test_the_curves_list_chooses_the_chart_shown_and_epochs_leave_the_users_choice(widgets, tmp_path, monkeypatch):  # noqa: F811
    """One chart per quantity (a Dice of 0.9 beside losses of 0.05-1.5 on one y axis was hard to read): the Curves list
    chooses the chart the layout's plot view shows; an epoch shows it once per run, then updates it in place and leaves
    the plot view alone (the user may switch it to another chart); after File > Close Scene the new chart is shown."""
    import slicer

    _liversam, train = widgets
    scene = fresh_scene()
    plots = slicer.vtkSlicerPlotsLogic()  # the real Plots logic: selection node -> every plot view node
    plots.SetMRMLApplicationLogic(slicer_environment().application_logic)
    plots.SetMRMLScene(scene)
    monkeypatch.setattr(slicer.modules, "plots", SimpleNamespace(logic=lambda: plots), raising=False)
    view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")
    header, *rows = HISTORY_ROWS
    (tmp_path / "history.csv").write_text(header + rows[0])
    widget = polled(train, [], code=None)
    widget.logic = train.LiverSAMTrainLogic(process=Process([]))
    widget._settings = SimpleNamespace(epochs=5, out=str(tmp_path))
    combo = widget.ui.curvesComboBox
    items = [i.find("property/string").text for i in ET.parse(TRAIN_UI).getroot().iter("widget")
             if i.get("name") == "curvesComboBox" for i in i.iter("item")]  # fmt: skip
    assert items == [spec.title for spec in train.TrainingLogic.CHARTS.values()]

    def epoch(n: int) -> None:
        widget.logic.process = Process([f'LIVERSAM_EPOCH {{"epoch": {n}, "epochs": 5, "val_dice_mean": 0.9}}'])
        widget.poll()

    def shown():
        return scene.GetNodeByID(view.GetPlotChartNodeID())

    combo.currentIndex = 1  # Training loss, chosen before the first epoch: nothing to show yet
    widget.onCurvesChosen(1)
    assert view.GetPlotChartNodeID() is None
    epoch(0)
    charts = widget.logic.chartNodes
    assert shown() is charts["train_loss"] and shown().GetYAxisTitle() == train.TrainingLogic.TRAIN_LOSS_LABEL
    combo.currentIndex = 0  # Validation Dice
    widget.onCurvesChosen(0)
    assert shown() is charts["dice"] and tuple(shown().GetYAxisRange()) == (0.0, 1.0)
    plots.ShowChartInLayout(charts["val_loss"])  # the user picks another chart in the plot view's own list
    (tmp_path / "history.csv").write_text(header + rows[0] + rows[1])
    epoch(1)
    assert shown() is charts["val_loss"]  # left alone
    assert widget.logic.tableNode.GetTable().GetNumberOfRows() == 2
    scene.Clear(0)  # File > Close Scene during the run
    view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")
    epoch(1)
    assert widget.logic.chartNodes["dice"] is not charts["dice"] and shown() is widget.logic.chartNodes["dice"]


def test_the_curves_follow_history_csv_not_only_the_epoch_lines(widgets, tmp_path, monkeypatch):  # noqa: F811
    """The curves were read only at an EPOCH line: ``liversam train`` printed epoch 0's before it wrote history.csv
    (it writes first since commit 5c9b228), so a poll in between showed nothing until epoch 1 (an hour on a CPU), and a
    resumed run showed none of its earlier epochs until its next one. They are now read whenever history.csv changed."""
    import slicer

    _liversam, train = widgets
    scene = fresh_scene()
    plots = slicer.vtkSlicerPlotsLogic()
    plots.SetMRMLApplicationLogic(slicer_environment().application_logic)
    plots.SetMRMLScene(scene)
    monkeypatch.setattr(slicer.modules, "plots", SimpleNamespace(logic=lambda: plots), raising=False)
    view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")
    header, *rows = HISTORY_ROWS
    widget = polled(train, [], code=None)
    widget.logic = train.LiverSAMTrainLogic(process=Process(['LIVERSAM_EPOCH {"epoch": 0, "epochs": 5}']))
    widget._settings = SimpleNamespace(epochs=5, out=str(tmp_path))
    widget.poll()  # the EPOCH line, history.csv not written yet
    assert widget.logic.tableNode is None and view.GetPlotChartNodeID() is None
    (tmp_path / "history.csv").write_text(header + rows[0])
    widget.poll()  # no new line: history.csv written meanwhile
    assert widget.logic.tableNode.GetTable().GetNumberOfRows() == 1
    assert view.GetPlotChartNodeID() == widget.logic.chartNodes["dice"].GetID()

    (tmp_path / "history.csv").write_text(header + rows[0] + rows[1])  # Resume (another widget: Slicer restarted)
    resumed = polled(train, [], code=None)
    resumed.logic = train.LiverSAMTrainLogic(process=Process(['LIVERSAM_RESUME {"epoch": 1, "finished": null}']))
    resumed._settings = SimpleNamespace(epochs=5, out=str(tmp_path))
    resumed.poll()
    assert resumed.logic.tableNode.GetTable().GetNumberOfRows() == 2  # at once, not after the next epoch


def test_a_reloaded_module_shows_and_updates_the_curves_it_made_before(widgets, tmp_path, monkeypatch):  # noqa: F811
    """Slicer's Reload (slicer.util.reloadScriptedModule) makes a new widget and logic holding no nodes: each reload
    added another table, 3 charts and 5 series of the same names (the plot view's chart list showed them twice), and
    the Curves list showed nothing until the next epoch. The new logic adopts the curves' nodes of the scene."""
    import slicer

    _liversam, train = widgets
    scene = fresh_scene()
    plots = slicer.vtkSlicerPlotsLogic()
    plots.SetMRMLApplicationLogic(slicer_environment().application_logic)
    plots.SetMRMLScene(scene)
    monkeypatch.setattr(slicer.modules, "plots", SimpleNamespace(logic=lambda: plots), raising=False)
    view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode")
    header, *rows = HISTORY_ROWS
    (tmp_path / "history.csv").write_text(header + rows[0])
    widget = polled(train, [], code=None)
    widget.logic = train.LiverSAMTrainLogic(process=Process([]))
    widget._settings = SimpleNamespace(epochs=5, out=str(tmp_path))
    widget.poll()
    charts = dict(widget.logic.chartNodes)
    counts = [scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode")]
    assert counts == [1, 3, 5]

    reloaded = polled(train, [], code=None)  # the module reloaded
    reloaded.logic = train.LiverSAMTrainLogic(process=Process([]))
    reloaded.ui.curvesComboBox.currentIndex = 2
    reloaded.onCurvesChosen(2)  # before any poll: the chart made before the reload
    assert view.GetPlotChartNodeID() == charts["val_loss"].GetID()
    (tmp_path / "history.csv").write_text(header + rows[0] + rows[1])  # Resume: the next epoch
    reloaded._settings = SimpleNamespace(epochs=5, out=str(tmp_path))
    reloaded.poll()
    assert reloaded.logic.chartNodes == charts and reloaded.logic.tableNode.GetTable().GetNumberOfRows() == 2
    assert [scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode")] == counts


HISTORY_ROWS = [
    "epoch,train_loss,val_loss,val_dice_liver,val_iou_liver,val_dice_tumor,val_iou_tumor,val_dice_mean,lr,seconds,"
    "train_slices_per_second\n",
    "0,,0.344,0.894,0.808,0.818,0.692,0.856,0.0001,16.3,\n",
    "1,0.467,0.347,0.889,0.801,0.841,0.725,0.865,0.0001,68.1,0.43\n",
]


class EndingProcess(Process):
    """A process that writes its last line and ends between the poll's reading of its log and its asking whether it
    still runs."""

    def __init__(self, last_line: str) -> None:
        super().__init__([], None)
        self.last_line = last_line

    def read_lines(self) -> list[str]:
        if self.code is None:  # nothing new yet; right after this read the process prints its last line and exits
            self.code = 0
            return []
        lines, self.last_line = [self.last_line] if self.last_line else [], ""
        return lines


def test_the_last_line_of_a_process_that_ends_between_two_reads_is_shown(widgets):  # noqa: F811
    """The poll read the log, then asked whether the process still ran: a DONE (or an error) written in between was
    never read, and the run ended without "Done". The poll now asks first, and an ended process is read once more."""
    _liversam, train = widgets
    done = "LIVERSAM_DONE " + json.dumps({"best_checkpoint": "best.pt", "registered_name": "mine"})
    widget = polled(train, [])
    stops: list[bool] = []
    widget._timer = SimpleNamespace(stop=lambda: stops.append(True))
    widget.logic.process = EndingProcess(done)
    widget.poll()  # the read found nothing; the process ended right after it
    assert not stops, "the run was reported ended before its last line was read"
    widget.poll()
    assert stops and widget.ui.statusLabel.text == "Done. Best model: best.pt (registered as 'mine')"
