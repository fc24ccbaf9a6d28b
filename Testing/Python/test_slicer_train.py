"""LiverSAMTrain's Slicer logic against slicer-core's real MRML: curves CSV -> table and plot nodes, loaded
volume + segmentation pairs -> training files that `liversam train` reads back, the command line it builds,
the background process wrapper, model registration; and the module's files (CMake list, .ui names)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_harness import REPO_ROOT, ensure_module_on_path, fresh_scene, shared_data_dir

ensure_module_on_path()
TRAIN_DIR = REPO_ROOT / "LiverSAMTrain"
if str(TRAIN_DIR) not in sys.path:
    sys.path.insert(0, str(TRAIN_DIR))

import slicer  # noqa: E402

from LiverSAMTrainLib import AttachedProcess, TrainingLogic  # noqa: E402
from LiverSAMTrainLib.TrainingProcess import TrainingProcess  # noqa: E402

pytestmark = pytest.mark.slicer

HISTORY = (
    "epoch,train_loss,val_loss,val_dice_liver,val_iou_liver,val_dice_tumor,val_iou_tumor,val_dice_mean,lr,seconds,"
    "train_slices_per_second\n"
    "0,,0.344,0.894,0.808,0.818,0.692,0.856,0.0001,16.3,\n"
    "1,0.467,0.347,0.889,0.801,0.841,0.725,0.865,0.0001,68.1,0.43\n"
    "2,0.430,0.349,0.877,0.781,0.830,0.709,0.853,0.00005,79.9,0.34\n"
)


def _series(chart_node) -> dict:
    return {
        chart_node.GetNthPlotSeriesNode(n).GetYColumnName(): chart_node.GetNthPlotSeriesNode(n)
        for n in range(chart_node.GetNumberOfPlotSeriesNodes())
    }


def test_curves_csv_becomes_a_table_and_a_chart_per_quantity(tmp_path):
    """The losses and the Dice were drawn in one chart, on its one y axis: a Dice of 0.9 beside losses of 0.05-1.5 made
    both hard to read. Each quantity now has a chart, as curves.png has a panel each; the Dice's y axis is 0-1."""
    scene = fresh_scene()
    (tmp_path / "history.csv").write_text(HISTORY)
    table_node, charts = TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene)
    table = table_node.GetTable()
    assert table.GetNumberOfRows() == 3
    assert table.GetColumnByName("val_dice_tumor").GetValue(1) == pytest.approx(0.841)
    assert np.isnan(table.GetColumnByName("train_loss").GetValue(0))  # epoch 0: the base model, no training
    assert list(charts) == ["dice", "train_loss", "val_loss"]
    assert {key: set(_series(chart)) for key, chart in charts.items()} == {
        "dice": {"val_dice_liver", "val_dice_tumor", "val_dice_mean"},
        "train_loss": {"train_loss"},
        "val_loss": {"val_loss"},
    }
    for chart in charts.values():
        assert all(s.GetTableNode() is table_node and s.GetXColumnName() == "epoch" for s in _series(chart).values())
        assert chart.GetXAxisTitle() == "epoch (0: base model)"
    dice, train_loss, val_loss = charts["dice"], charts["train_loss"], charts["val_loss"]
    assert not dice.GetYAxisRangeAuto() and tuple(dice.GetYAxisRange()) == (0.0, 1.0)
    assert train_loss.GetYAxisRangeAuto() and val_loss.GetYAxisRangeAuto()  # fitted to their own curves
    # the axis titles are curves.png's (the core module imports torch: Slicer's Python copies them)
    from liversam.training import trainer

    assert (dice.GetYAxisTitle(), train_loss.GetYAxisTitle(), val_loss.GetYAxisTitle()) == (
        trainer.DICE_LABEL, trainer.TRAIN_LOSS_LABEL, trainer.VAL_LOSS_LABEL
    )
    assert _series(dice)["val_dice_mean"].GetName() == "Validation Dice mean"
    # A later epoch updates the same nodes instead of adding new ones.
    (tmp_path / "history.csv").write_text(HISTORY + "3,0.40,0.33,0.90,0.82,0.85,0.74,0.875,0.00001,70,0.4\n")
    again = TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene, table_node=table_node, chart_nodes=charts)
    assert again[0] is table_node and again[1] == charts and table.GetNumberOfRows() == 4
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 3
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 5
    # The table deleted by the user: a new one, and the charts kept read it (they stay where the user put them).
    scene.RemoveNode(table_node)
    table_new, charts_new = TrainingLogic.update_curves(
        tmp_path / "history.csv", scene=scene, table_node=table_node, chart_nodes=charts
    )
    assert table_new is not table_node and charts_new == charts
    assert all(s.GetTableNode() is table_new for c in charts.values() for s in _series(c).values())
    # File > Close Scene during a run: the next epoch's curves go into new nodes of the scene, not the old ones.
    scene.Clear(0)
    table_after, charts_after = TrainingLogic.update_curves(
        tmp_path / "history.csv", scene=scene, table_node=table_new, chart_nodes=charts
    )
    assert table_after.GetScene() is scene and all(c.GetScene() is scene for c in charts_after.values())
    assert table_after.GetTable().GetNumberOfRows() == 4
    assert all(s.GetTableNode() is table_after for c in charts_after.values() for s in _series(c).values())


def test_the_mean_dice_says_when_it_is_the_livers_alone(tmp_path):
    """Validation without tumour: the mean is the liver's alone; the legend says so, as curves.png's does."""
    scene = fresh_scene()
    rows = [line.split(",") for line in HISTORY.strip().split("\n")]
    for row in rows[1:]:
        row[5] = row[6] = ""  # val_dice_tumor, val_iou_tumor
    (tmp_path / "history.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    _table, charts = TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene)
    assert _series(charts["dice"])["val_dice_mean"].GetName() == TrainingLogic.DICE_MEAN_LIVER_ONLY


def _counts(scene) -> tuple[int, int, int]:
    return tuple(scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode"))


def test_a_reloaded_module_adopts_the_curves_already_in_the_scene(tmp_path):
    """Each module reload (a new logic holding no nodes) added another table, 3 charts and 5 series of the same names:
    the plot view's chart list showed every chart twice, three times... The curves' nodes are marked and adopted."""
    scene = fresh_scene()
    (tmp_path / "history.csv").write_text(HISTORY)
    table, charts = TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene)
    assert _counts(scene) == (1, 3, 5)
    (tmp_path / "history.csv").write_text(HISTORY + "3,0.40,0.33,0.90,0.82,0.85,0.74,0.875,0.00001,70,0.4\n")
    again_table, again_charts = TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene)  # reloaded: no nodes
    assert _counts(scene) == (1, 3, 5)
    assert again_table is table and again_charts == charts and table.GetTable().GetNumberOfRows() == 4
    assert table.GetAttribute(TrainingLogic.CURVES_ATTRIBUTE) == "table"  # (saved with the scene)
    # before the reloaded module's first epoch (no history in its run folder yet) its Curves list shows them too
    assert TrainingLogic.update_curves(tmp_path / "none.csv", scene=scene) == (table, charts)


def test_a_deleted_chart_gets_its_series_back(tmp_path):
    """A chart the user deleted left its series in the scene, and the next epoch made a new chart with new series
    (5 -> 8 series nodes, three of them in no chart). The new chart takes the old series back."""
    scene = fresh_scene()
    (tmp_path / "history.csv").write_text(HISTORY)
    table, charts = TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene)
    dice_series = _series(charts["dice"])
    scene.RemoveNode(charts["dice"])
    _table, after = TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene, table_node=table, chart_nodes=charts)
    assert after["dice"] is not charts["dice"] and after["train_loss"] is charts["train_loss"]
    assert _counts(scene) == (1, 3, 5)
    assert _series(after["dice"]) == dice_series
    assert not after["dice"].GetYAxisRangeAuto() and tuple(after["dice"].GetYAxisRange()) == (0.0, 1.0)


def test_a_zoom_that_would_hide_a_later_epoch_is_undone(tmp_path):
    """The plot view writes a zoomed range into the chart (qMRMLPlotView::updateMRMLChartAxisRangeFromWidget) and the
    Dice chart's range is fixed: a value of a later epoch outside the zoom was never drawn. A zoom that still shows
    every value is kept."""
    scene = fresh_scene()
    (tmp_path / "history.csv").write_text(HISTORY)
    table, charts = TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene)
    dice = charts["dice"]
    dice.SetYAxisRange(0.8, 0.9)  # as the plot view does after the user zoomed
    TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene, table_node=table, chart_nodes=charts)
    assert tuple(dice.GetYAxisRange()) == (0.8, 0.9)  # every value still in view
    (tmp_path / "history.csv").write_text(HISTORY + "3,0.40,0.33,0.95,0.82,0.85,0.74,0.9,0.00001,70,0.4\n")
    TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene, table_node=table, chart_nodes=charts)
    assert tuple(dice.GetYAxisRange()) == (0.0, 1.0) and not dice.GetYAxisRangeAuto()


def test_the_training_loss_chart_says_why_it_is_empty_until_epoch_1(tmp_path):
    """Epoch 0 is the base model: no training loss. Until epoch 1 the chart held one empty point and no word why."""
    scene = fresh_scene()
    header, epoch0, epoch1 = HISTORY.splitlines(keepends=True)[:3]
    (tmp_path / "history.csv").write_text(header + epoch0)
    table, charts = TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene)
    assert charts["train_loss"].GetTitle() == (
        "LiverSAMTrain: training loss per epoch (drawn from epoch 1: epoch 0 is the base model, before any training)"
    )
    assert charts["val_loss"].GetTitle() == "LiverSAMTrain: validation loss per epoch"  # epoch 0 has one
    (tmp_path / "history.csv").write_text(header + epoch0 + epoch1)
    TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene, table_node=table, chart_nodes=charts)
    assert charts["train_loss"].GetTitle() == "LiverSAMTrain: training loss per epoch"
    charts["val_loss"].SetTitle("my title")  # a title the user wrote is left alone
    TrainingLogic.update_curves(tmp_path / "history.csv", scene=scene, table_node=table, chart_nodes=charts)
    assert charts["val_loss"].GetTitle() == "my title"


def test_a_run_folder_without_curves_empties_them_instead_of_showing_another_folders(tmp_path):
    """Another run folder chosen (no run followed there): the curves of the last run stayed in the table and charts, as
    if they were the new folder's. They are now the folder's own history.csv, or emptied when it has no epoch (no
    history.csv, one with its header only, no folder chosen): the nodes stay (a chart in the plot view stays there,
    empty, its title saying why), their series too, and they hold no other folder's data."""
    scene = fresh_scene()
    first, header_only, second = tmp_path / "first", tmp_path / "header-only", tmp_path / "second"
    for folder in (first, header_only, second):
        folder.mkdir()
    header, epoch0, _epoch1 = HISTORY.splitlines(keepends=True)[:3]
    (first / "history.csv").write_text(HISTORY)
    (header_only / "history.csv").write_text(header)
    (second / "history.csv").write_text(header + epoch0)
    table, charts = TrainingLogic.run_folder_curves(first, scene=scene)
    assert table.GetTable().GetNumberOfRows() == 3 and TrainingLogic.curves_folder(table) == str(first)
    series = {key: _series(chart) for key, chart in charts.items()}
    charts["val_loss"].SetTitle("my title")  # a title the user wrote is left alone
    for empty in (header_only, tmp_path / "no-such-folder", ""):
        again = TrainingLogic.run_folder_curves(empty, scene=scene, table_node=table, chart_nodes=charts)
        assert again == (table, charts) and _counts(scene) == (1, 3, 5)
        assert (table.GetTable().GetNumberOfRows(), table.GetTable().GetNumberOfColumns()) == (0, 0)
        assert TrainingLogic.curves_folder(table) == ""
        assert {key: _series(chart) for key, chart in charts.items()} == series  # kept, reading the emptied table
        assert all(s.GetTableNode() is table for chart in charts.values() for s in _series(chart).values())
        assert charts["dice"].GetTitle().endswith(f"({TrainingLogic.NO_CURVES_NOTE})")
        assert charts["train_loss"].GetTitle().endswith(f"({TrainingLogic.NO_CURVES_NOTE})")
        assert charts["val_loss"].GetTitle() == "my title"
    TrainingLogic.run_folder_curves(second, scene=scene, table_node=table, chart_nodes=charts)
    assert table.GetTable().GetNumberOfRows() == 1 and TrainingLogic.curves_folder(table) == str(second)
    assert table.GetTable().GetColumnByName("val_dice_mean").GetValue(0) == pytest.approx(0.856)
    assert charts["dice"].GetTitle() == "LiverSAMTrain: validation dice per epoch"  # its own title again
    assert charts["train_loss"].GetTitle().endswith("(drawn from epoch 1: epoch 0 is the base model, before any training)")
    # a reloaded module (a logic holding no nodes) empties the curves already in the scene, not a set of its own
    assert TrainingLogic.run_folder_curves("", scene=scene) == (table, charts)
    assert table.GetTable().GetNumberOfRows() == 0 and _counts(scene) == (1, 3, 5)
    # an empty scene: nothing is made
    empty_scene = fresh_scene()
    assert TrainingLogic.run_folder_curves("", scene=empty_scene) == (None, {}) and _counts(empty_scene) == (0, 0, 0)


def test_loaded_volume_and_segmentation_pairs_export_to_training_files(tmp_path):
    from liversam.ct_io import read_ct
    from liversam.training import LabelConfig, discover_studies, load_study
    from LiverSAMLib import MRMLBridge

    scene = fresh_scene()
    folder = shared_data_dir() / "lits117"
    ct = read_ct(folder / "ct.nii.gz")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz")))
    volume_node = MRMLBridge.volume_node_from_ct(ct, name="patient 7", scene=scene)
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "patient 7 segmentation")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    cyst = np.zeros(labels.shape, dtype=np.uint8)
    cyst[60, 60:63, 60:63] = 1
    for name, mask in (("Liver", labels == 1), ("Tumor", labels == 2), ("Liver cyst", cyst)):
        segment_id = segmentation.AddEmptySegment(name, name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            mask.astype(np.uint8), segmentation_node, segment_id, volume_node
        )
    manifest = TrainingLogic.export_training_pairs([(volume_node, segmentation_node)], tmp_path / "export")
    data = json.loads(manifest.read_text())
    assert [c["id"] for c in data["cases"]] == ["patient_7"]
    assert (
        data["cases"][0]["label"] == "patient_7/segmentation.seg.nrrd"
    )  # segments by name, as `liversam train` reads
    [study] = discover_studies(manifest)
    loaded = load_study(study, LabelConfig())
    assert np.array_equal(loaded.liver_kji, np.isin(labels, (1, 2)))
    assert np.array_equal(loaded.tumor_kji, labels == 2)
    assert np.array_equal(np.asarray(loaded.volume.array_kji), np.asarray(ct.array_kji))
    assert loaded.volume.geometry.is_close(ct.geometry, 1e-3)


def test_command_line_for_the_settings():
    settings = TrainingLogic.TrainingSettings(
        data="/data/cases",
        out="/runs/a",
        epochs=12,
        lr=3e-4,
        max_slices=40,
        tumor_labels="2,3",
        model_name="mine",
    )
    command = TrainingLogic.build_train_command(settings, python="/home/me/.cache/liversam/venv/bin/python")
    assert command[:4] == ["/home/me/.cache/liversam/venv/bin/python", "-m", "liversam", "train"]

    def value(option):
        return command[command.index(option) + 1]

    assert value("--data") == "/data/cases" and value("--out") == "/runs/a" and value("--epochs") == "12"
    assert float(value("--lr")) == 3e-4 and value("--max-slices") == "40" and value("--tumor-labels") == "2,3"
    assert value("--name") == "mine" and "--events" in command
    # The core CLI accepts exactly this command line.
    from liversam.cli import build_parser

    args = build_parser().parse_args(command[3:])
    assert args.epochs == 12 and args.max_slices == 40 and args.tumor_labels == (2, 3)
    assert TrainingLogic.parse_event('LIVERSAM_EPOCH {"epoch": 3}') == ("EPOCH", {"epoch": 3})
    assert TrainingLogic.parse_event("epoch 3: train loss 0.4") is None


def test_background_process_output_is_polled_and_stop_ends_it(tmp_path):
    process = TrainingProcess()
    script = (
        "import json, time\n"
        "for e in range(3):\n"
        "    print('LIVERSAM_EPOCH ' + json.dumps({'epoch': e}), flush=True)\n"
        "time.sleep(60)\n"
    )
    process.start([sys.executable, "-c", script], tmp_path / "train.log")
    events, deadline = [], time.monotonic() + 30
    while len(events) < 3 and time.monotonic() < deadline:
        events += [e for e in map(TrainingLogic.parse_event, process.read_lines()) if e]
        time.sleep(0.05)
    assert [payload["epoch"] for _, payload in events] == [0, 1, 2]
    assert process.is_running()
    process.stop(grace_seconds=5)
    assert _ended(process) and process.returncode == -signal.SIGTERM and not process.stopping


def _ended(process: TrainingProcess, timeout_s: float = 30.0) -> bool:
    """Poll as the widget's timer does (escalate_stop, then is_running) until the process is gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process.escalate_stop()
        if not process.is_running():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(
    sys.platform == "win32", reason="SIGTERM cannot be ignored on Windows: terminate() kills there"
)
def test_stop_returns_at_once_and_a_process_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    """Stop used to wait on Slicer's main thread (up to 10 s) for a process that ignores SIGTERM: Slicer froze. Now
    stop() only sends SIGTERM; the widget's timer calls escalate_stop(), which kills the process once the grace period
    has passed. A fake clock decides when that is, so the test asserts states, not timings."""
    now = [0.0]
    process = TrainingProcess(clock=lambda: now[0])
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    process.start([sys.executable, "-c", script], tmp_path / "console.log")
    lines, deadline = [], time.monotonic() + 30
    while "ready" not in lines and time.monotonic() < deadline:
        lines += process.read_lines()
        time.sleep(0.05)
    assert "ready" in lines  # the SIGTERM handler is in place
    assert not process.stopping and not process.stop_requested
    process.stop(grace_seconds=10)
    # Returned while the process (ignoring SIGTERM) still runs: the old stop() waited for it to end.
    assert process.is_running() and process.stopping and process.stop_requested
    process.stop(grace_seconds=10)  # a second Stop neither waits nor restarts the grace period
    now[0] = 9.9
    assert process.escalate_stop() is True  # within the grace period: not killed
    os.kill(process.pid, 0)  # still alive (raises if not)
    assert process.is_running() and process.returncode is None
    now[0] = 10.0  # the grace period has passed: the next timer tick kills it
    assert _ended(process)
    assert process.returncode == -signal.SIGKILL and not process.stopping and process.stop_requested


def test_training_runs_in_the_liversam_environment_checked_once(tmp_path, monkeypatch):
    """A missing interpreter and one without torch are refused with the reason; the result is cached."""
    TrainingLogic._CHECKED.clear()
    assert "setup.sh" in TrainingLogic.environment_problem(str(tmp_path / "no-python"))
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    bare_python = str(bare / "bin" / "python")
    problem = TrainingLogic.environment_problem(bare_python)
    assert problem and "cannot train" in problem and "No module named" in problem and "setup.sh" in problem
    # a failure is not remembered: after `bash setup.sh` (here: the environment's python becomes a working one) the
    # next Start checks again instead of repeating the old error until Slicer restarts
    assert bare_python not in TrainingLogic._CHECKED
    assert (
        TrainingLogic.environment_problem(sys.executable) is None and sys.executable in TrainingLogic._CHECKED
    )
    calls = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    assert (
        TrainingLogic.environment_problem(sys.executable) is None and not calls
    )  # a success is cached: not run again
    TrainingLogic._CHECKED.clear()


def test_the_environment_check_runs_in_the_background_and_never_blocks(tmp_path):
    """Start used to import torch in the LiverSAM Python with subprocess.run on Slicer's main thread (seconds, up to
    the 180 s timeout on a cold disk: Slicer frozen). The check now runs in a background process the widget's timer
    polls: starting it and asking whether it is done return at once."""
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 3\nexit 0\n")
    slow.chmod(0o755)
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\"\nexit 1\n")
    broken.chmod(0o755)
    TrainingLogic._CHECKED.clear()
    started = time.monotonic()
    check = TrainingLogic.EnvironmentCheck(str(slow))
    assert not check.done() and time.monotonic() - started < 1.0
    assert check.wait() is None and check.done()  # the environment can train
    assert TrainingLogic.EnvironmentCheck(str(slow)).done()  # answered once per interpreter: no new process
    failing = TrainingLogic.EnvironmentCheck(str(broken))
    problem = failing.wait()
    assert "cannot train" in problem and "No module named 'torch'" in problem and "setup.sh" in problem
    slow_again = tmp_path / "slow-again"
    shutil.copy(slow, slow_again)
    cancelled = TrainingLogic.EnvironmentCheck(str(slow_again))
    cancelled.cancel()  # Stop pressed while checking: the check process ends, nothing is cached
    assert cancelled.done() and cancelled.problem and str(slow_again) not in TrainingLogic._CHECKED
    TrainingLogic._CHECKED.clear()


def test_the_modules_console_log_is_not_the_trainers_own_log():
    from liversam.training.trainer import TRAIN_LOG_NAME

    # both in the run folder: one file for both held every log line twice (the trainer's handler and its stderr)
    assert TrainingLogic.CONSOLE_LOG_NAME != TRAIN_LOG_NAME
    # an attached run started from a terminal is read from the trainer's own log (LiverSAMTrainLib.AttachedProcess)
    assert AttachedProcess.TRAIN_LOG_NAME == TRAIN_LOG_NAME
    source = (TRAIN_DIR / "LiverSAMTrain.py").read_text()
    assert "TrainingLogic.CONSOLE_LOG_NAME" in source and '"train.log"' not in source


def test_the_process_outlives_its_parent_and_has_no_console(tmp_path):
    """The training child runs in its own session (POSIX) / process group without console (Windows), and its
    output goes to a log file, so closing Slicer (the parent) neither kills it nor breaks its output."""
    from LiverSAMTrainLib.TrainingProcess import detached_process_options

    flags = detached_process_options()
    if sys.platform == "win32":
        assert flags["creationflags"] & subprocess.CREATE_NO_WINDOW
    else:
        assert flags == {"start_new_session": True}
    log = tmp_path / "run" / "train.log"
    parent = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(TRAIN_DIR)!r})\n"
        "from LiverSAMTrainLib.TrainingProcess import TrainingProcess\n"
        "p = TrainingProcess()\n"
        "p.start([sys.executable, '-c', 'import time\\nfor i in range(40):\\n    print(i, flush=True)\\n    time.sleep(0.1)'],"
        f" {str(log)!r})\n"
        "print(p.pid, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    child = int(done.stdout.strip())
    time.sleep(1.0)  # the parent has exited; the child keeps writing
    os.kill(child, 0)  # still alive (raises if not)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "39" not in log.read_text():
        time.sleep(0.2)
    assert log.read_text().split() == [str(i) for i in range(40)]


def test_module_files_are_listed_in_cmake_and_ui_names_exist():
    cmake = (TRAIN_DIR / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"[\w/${}]+\.(?:py|png|ui)", cmake))
    listed = {p.replace("${MODULE_NAME}", "LiverSAMTrain") for p in listed}
    on_disk = {
        str(p.relative_to(TRAIN_DIR))
        for p in TRAIN_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert on_disk - {"CMakeLists.txt"} == listed
    root = ET.parse(TRAIN_DIR / "Resources" / "UI" / "LiverSAMTrain.ui").getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (TRAIN_DIR / "LiverSAMTrain.py").read_text()))
    assert used and used <= set(widgets), used - set(widgets)
    assert widgets["volumeSelector"] == "qMRMLNodeComboBox" and widgets["startButton"] == "QPushButton"


def test_a_history_csv_liversam_train_did_not_write_is_refused_with_where_and_why(tmp_path):
    """A run folder chosen in the module is read at once (its curves), so any folder's history.csv is read: one another
    tool wrote (fastai's CSVLogger writes a "time" column of "00:05"), a ragged row or bytes that are not UTF-8 raised
    a bare ValueError / UnicodeDecodeError / TypeError from the Qt timer. They now raise HistoryUnreadable (a ValueError)
    naming the file, the row and the column."""
    csv_path = tmp_path / "history.csv"
    csv_path.write_text("epoch,train_loss,valid_loss,accuracy,time\n0,0.52,0.41,0.81,00:05\n")
    with pytest.raises(TrainingLogic.HistoryUnreadable, match=r"history\.csv, row 2, column 'time': '00:05' is not a number"):
        TrainingLogic.read_history(csv_path)
    csv_path.write_text("epoch,val_loss\n0,0.4,0.3\n")
    with pytest.raises(TrainingLogic.HistoryUnreadable, match=r"row 2: more values than the header's 2 columns"):
        TrainingLogic.read_history(csv_path)
    csv_path.write_bytes(b"epoch,val_loss\n0,\xff\xfe\n")
    with pytest.raises(TrainingLogic.HistoryUnreadable, match="not UTF-8 text"):
        TrainingLogic.read_history(csv_path)
    assert issubclass(TrainingLogic.HistoryUnreadable, ValueError)
    csv_path.write_text("epoch,val_loss\n0,0.4\n1,\n")  # an empty cell, a short row: NaN, as before
    history = TrainingLogic.read_history(csv_path)
    assert list(history["epoch"]) == [0.0, 1.0] and np.isnan(history["val_loss"][1])
