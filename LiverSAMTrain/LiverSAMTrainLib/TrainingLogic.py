"""LiverSAMTrain logic: MRML and files only, no Qt.

- :func:`export_training_pairs`: loaded (CT volume, segmentation) node pairs -> study folders
  (``ct.nrrd`` + ``segmentation.seg.nrrd``, written by MRML's storage nodes) and a ``manifest.json`` that
  ``liversam train`` reads (it classifies the segments by name: liver, tumour / lesion, ...);
  :func:`training_data` decides where Start / Resume take the data from (an earlier run's exported data is never
  overwritten with other pairs; Resume without pairs uses it); :func:`paired_with` finds a CT already paired;
- :func:`build_train_command`: the ``<LiverSAM python> -m liversam train ...`` command line for the settings
  (the LiverSAM Python environment of the server, never Slicer's own Python: training needs torch);
- :class:`EnvironmentCheck` / :func:`environment_problem`: whether that environment can train (checked once per
  environment, in a background process the widget polls);
- :func:`update_curves`: ``history.csv`` of a run -> a table node and one plot chart per quantity (:data:`CHARTS`:
  validation Dice on a fixed 0-1 axis, training loss, validation loss), as curves.png has a panel each; the nodes are
  marked (:data:`CURVES_ATTRIBUTE`) and :func:`curves_in_scene` adopts them (a reloaded module adds no second set);
  :func:`run_folder_curves` shows one run folder's curves, or empties them (:func:`clear_curves`) when it has none, so
  that they never show another run folder's as its own (:data:`CURVES_FOLDER_ATTRIBUTE` names the folder shown);
- :func:`parse_event`: the ``LIVERSAM_CACHE`` / ``_RESUME`` / ``_EPOCH`` / ``_DONE`` lines the command prints;
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer

# The columns plotted, with their series names and colours (RGB 0..1).
LOSS_SERIES = {
    "train_loss": ("Training loss", (0.2, 0.4, 0.9)),
    "val_loss": ("Validation loss", (0.9, 0.4, 0.1)),
}
DICE_SERIES = {
    "val_dice_liver": ("Validation Dice liver", (0.85, 0.5, 0.4)),
    "val_dice_tumor": ("Validation Dice tumour", (0.3, 0.75, 0.3)),
    "val_dice_mean": ("Validation Dice mean", (0.4, 0.4, 0.4)),
}
#: the legend's name of the mean when the validation slices show no tumour (the mean is then the liver's alone)
DICE_MEAN_LIVER_ONLY = "Validation Dice mean (liver only: no tumour in validation)"
# The axis titles of curves.png (liversam.training.trainer's TRAIN_LOSS_LABEL, VAL_LOSS_LABEL, DICE_LABEL; that module
# imports torch, which Slicer's Python has not: a test checks that they are the same).
TRAIN_LOSS_LABEL = "Dice + BCE + IoU-head MSE (unitless)"
VAL_LOSS_LABEL = "Dice + BCE, exact boxes (unitless)"
DICE_LABEL = "Dice (0-1)"
EPOCH_LABEL = "epoch (0: base model)"


@dataclass(frozen=True)
class ChartSpec:
    """One plot chart of the curves. Slicer's plot chart has one y axis, so quantities of different scales get a
    chart each, as curves.png gives them a panel each: a Dice of 0.9 drawn beside losses of 0.05-1.5 flattened both."""

    title: str  # the chart's entry in the module's "Curves" list (and in the plot view's chart list)
    y_title: str
    series: dict  # column of history.csv -> (series name, colour)
    # a fixed y range; None: fitted to the curves. The user may zoom (the plot view writes the zoomed range into the
    # chart node): a zoom that leaves out a value of a later epoch is undone, back to this range
    y_range: tuple[float, float] | None = None
    pending: str = ""  # the chart title's note while its columns hold no value yet ("" : none can be missing)


#: The charts, in the order of the module's "Curves" list (LiverSAMTrain.ui's curvesComboBox; a test checks it):
#: validation Dice first (the best model is chosen by it).
CHARTS: dict[str, ChartSpec] = {
    "dice": ChartSpec("Validation Dice", DICE_LABEL, DICE_SERIES, (0.0, 1.0)),
    # epoch 0 (the base model) has no training loss: until epoch 1 the chart holds one empty point, its title says why
    "train_loss": ChartSpec("Training loss", TRAIN_LOSS_LABEL, {"train_loss": LOSS_SERIES["train_loss"]},
                            pending="drawn from epoch 1: epoch 0 is the base model, before any training"),
    "val_loss": ChartSpec("Validation loss", VAL_LOSS_LABEL, {"val_loss": LOSS_SERIES["val_loss"]}),
}


@dataclass
class TrainingSettings:
    """What the user chose in the module (mirrors ``liversam train``'s options)."""

    data: str
    out: str
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-4
    augment_copies: int = 0
    max_slices: int = 0  # 0 (or 1, the spin box's "all"): all liver slices; the command needs at least 2
    seed: int = 0
    train_encoder: str = "none"
    device: str = "auto"
    liver_labels: str = "1,2"
    tumor_labels: str = "2"
    liver_names: str = ""  # segment names of the liver in a .seg.nrrd ("" : the command's default, "liver")
    tumor_names: str = ""  # segment name parts that mean tumour ("" : the command's default list)
    model_name: str = ""
    extra_args: list[str] = field(default_factory=list)


def python_executable() -> str:
    """The LiverSAM Python environment (LiverSAM's Server settings), which has torch; '' when none is set."""
    try:
        import qt

        from LiverSAMLib.ServerConnection import ServerSettings

        return ServerSettings.load(qt.QSettings()).python
    except ImportError:  # outside the Slicer application (tests): this Python
        return sys.executable


_CHECKED: dict[str, str | None] = {}
CHECK_IMPORTS = "import liversam.training, torch"
# The training process's console (its stdout events and stderr) goes here, in the run folder; the trainer writes its
# own log lines to train.log (liversam.training.trainer.TRAIN_LOG_NAME). The same file for both held every line twice.
CONSOLE_LOG_NAME = "console.log"


class EnvironmentCheck:
    """Whether ``python`` can run ``liversam train`` (it exists and imports liversam and torch), found out in a
    background process: :meth:`done` never blocks, so the widget polls it from its ``QTimer`` and Slicer stays
    responsive while torch imports (seconds; minutes on a cold disk). The answer is kept per interpreter."""

    def __init__(self, python: str, timeout_s: float = 180.0) -> None:
        import subprocess
        import tempfile
        import time

        self.python = python
        self.problem: str | None = None
        self._process = None
        self._output = None
        self._deadline = time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        if python in _CHECKED:
            self.problem, self._done = _CHECKED[python], True
            return
        self._done = False
        if not python or not Path(python).is_file():
            self._finish(
                f"No LiverSAM Python environment ('{python}'). Run 'bash setup.sh' in the LiverSAM checkout, or "
                "choose its python in LiverSAM's Server section: training runs there, not in Slicer's Python."
            )
            return
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
        self._output = tempfile.TemporaryFile()  # not a pipe: a long warning cannot fill it and stall the child
        try:
            self._process = subprocess.Popen(
                [python, "-c", CHECK_IMPORTS], stdout=self._output, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, creationflags=flags, env=core_package_env(),
            )  # fmt: skip
        except OSError as error:
            self._finish(f"'{python}' could not be run: {error}")

    def _finish(self, problem: str | None, cache: bool = True) -> None:
        self.problem, self._done = problem, True
        if cache and problem is None:  # only a success: after `bash setup.sh` the next Start checks again
            _CHECKED[self.python] = problem
        if self._output is not None:
            self._output.close()
            self._output = None

    def done(self) -> bool:
        """True once the answer (:attr:`problem`: None when the environment can train) is known; never blocks."""
        import time

        if self._done:
            return True
        code = self._process.poll()
        if code is None:
            if time.monotonic() < self._deadline:
                return False
            self.cancel()
            self._finish(f"'{self.python}' could not be run: importing liversam and torch took over "
                         f"{self._timeout_s:.0f} s", cache=False)  # fmt: skip
            return True
        self._output.seek(0)
        text = self._output.read().decode("utf-8", "replace").strip()
        self._finish(None if code == 0 else (
            f"'{self.python}' cannot train: {(text.splitlines() or ['no output'])[-1]}. Install LiverSAM with its "
            "training packages there (bash setup.sh)."
        ))  # fmt: skip
        return True

    def wait(self, poll_s: float = 0.05) -> str | None:
        """Block until :meth:`done` (scripts and tests; the widget polls instead); returns :attr:`problem`."""
        import time

        while not self.done():
            time.sleep(poll_s)
        return self.problem

    def cancel(self) -> None:
        """Stop a check still running (the module is closed, or Stop is pressed while it runs)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if not self._done:
            self._finish("the environment check was cancelled", cache=False)


def environment_problem(python: str, timeout_s: float = 180.0) -> str | None:
    """Why ``python`` cannot run ``liversam train`` (missing, no liversam / torch), or None. Checked once
    per interpreter (the import takes a few seconds). Blocks: the widget uses :class:`EnvironmentCheck`."""
    return EnvironmentCheck(python, timeout_s).wait()


def build_train_command(settings: TrainingSettings, python: str | None = None) -> list[str]:
    """The command line that trains (or resumes) with ``settings``; ``--events`` makes it print progress."""
    command = [
        python or python_executable(), "-m", "liversam", "train",
        "--data", settings.data, "--out", settings.out,
        "--epochs", str(int(settings.epochs)), "--batch-size", str(int(settings.batch_size)),
        "--lr", repr(float(settings.lr)), "--augment-copies", str(int(settings.augment_copies)),
        "--seed", str(int(settings.seed)), "--train-encoder", settings.train_encoder,
        "--device", settings.device,
        "--liver-labels", settings.liver_labels, "--tumor-labels", settings.tumor_labels,
        "--events", "--no-progress",
    ]  # fmt: skip
    if int(settings.max_slices) >= 2:  # the command refuses fewer; 0 and 1 mean all slices
        command += ["--max-slices", str(int(settings.max_slices))]
    if settings.liver_names.strip():
        command += ["--liver-names", settings.liver_names.strip()]
    if settings.tumor_names.strip():
        command += ["--tumor-names", settings.tumor_names.strip()]
    if settings.model_name:
        command += ["--name", settings.model_name]
    return command + list(settings.extra_args)


def core_package_env() -> dict:
    """The training process's environment: Slicer's Python variables removed (the LiverSAM environment has
    its own standard library and its own ``liversam``)."""
    from LiverSAMLib.ServerConnection import server_environment

    return server_environment()


#: how liversam train's messages advise its segment-name options ("... or pass --liver-names with its name", "Check
#: --liver-labels / --liver-names"); a command line ("--liver-names Leber") or argparse's usage ("[--liver-names ...]")
#: names them without advice
_SEGMENT_NAMES_ADVICE = re.compile(r"(?:\bpass|\bCheck|--(?:liver|tumor)-labels /) --(?:liver|tumor)-names\b")


def advises_segment_names(line: str) -> bool:
    """True for a line of the command's output that tells the user to pass ``--liver-names`` / ``--tumor-names`` (in
    the module: its Liver / Tumour segment names fields)."""
    return bool(_SEGMENT_NAMES_ADVICE.search(line)) and not line.lstrip().startswith("usage:")


def parse_event(line: str) -> tuple[str, dict] | None:
    """``("CACHE"|"RESUME"|"EPOCH"|"DONE", payload)`` for a ``LIVERSAM_<KIND> {json}`` line, else None."""
    if not line.startswith("LIVERSAM_"):
        return None
    kind, _, payload = line[len("LIVERSAM_") :].partition(" ")
    try:
        return kind, json.loads(payload)
    except json.JSONDecodeError:
        return None


# --- exporting loaded data ----------------------------------------------------------------------------------------
def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_") or "case"


def export_training_pairs(pairs, folder: str | Path) -> Path:
    """Write each (scalar volume node, segmentation node) pair as a study folder and return the manifest.

    ``<case>/ct.nrrd`` and ``<case>/segmentation.seg.nrrd`` are written with MRML's own storage nodes (no
    package beyond Slicer's); ``liversam train`` classifies the segments by name (``liver``; tumour /
    lesion / ...; cysts ignored) and says which pair has no liver segment.
    """
    from liversam.atomic_write import atomic_path, write_text_atomically

    folder = Path(folder)
    entries, used = [], set()
    for volume_node, segmentation_node in pairs:
        case_id = _safe_name(volume_node.GetName())
        while case_id in used:
            case_id += "_"
        used.add(case_id)
        study = folder / case_id
        study.mkdir(parents=True, exist_ok=True)
        for node, storage, name in (
            (volume_node, slicer.vtkMRMLVolumeArchetypeStorageNode(), "ct.nrrd"),
            (segmentation_node, slicer.vtkMRMLSegmentationStorageNode(), "segmentation.seg.nrrd"),
        ):
            storage.SetUseCompression(True)
            with atomic_path(study / name) as tmp:
                storage.SetFileName(str(tmp))
                if not storage.WriteData(node):
                    raise OSError(f"Could not write '{study / name}' for '{node.GetName()}': check the folder is writable.")
        entries.append({"id": case_id, "ct": f"{case_id}/ct.nrrd", "label": f"{case_id}/segmentation.seg.nrrd"})
    manifest = folder / "manifest.json"
    write_text_atomically(manifest, json.dumps({"cases": entries}, indent=2))
    return manifest


EXPORTED_DATA = "exported-data"  # the folder of a run folder the loaded pairs are exported to
#: files of a run folder that mean a run trained there (``liversam train``: resumable, or finished)
RUN_FILES = ("state.pt", "best.pt")
#: files ``liversam train`` writes as it starts, before its first epoch (building the caches can take hours): a run was
#: started there, and its process may still be running (it outlives Slicer)
STARTED_FILES = ("config.json", "split.json", "train.log")


class NoTrainingData(ValueError):
    """Start / Resume with neither pairs, nor a data folder or manifest, nor an earlier export in the run folder."""


def not_a_ct(volume_node) -> str:
    """Why ``volume_node`` cannot be a pair's CT ("" when it can): a labelmap, or a vector / colour / tensor volume.
    The CT selector lists scalar volumes only (``showChildNodeTypes`` false); with Slicer's default (true,
    qMRMLSortFilterProxyModel.cxx) it listed their subclasses too, and a labelmap loaded beside its CT was exported and
    trained on as the CT, without a word."""
    if volume_node.GetClassName() == "vtkMRMLScalarVolumeNode":
        return ""
    kinds = (("vtkMRMLLabelMapVolumeNode", "a labelmap"), ("vtkMRMLVectorVolumeNode", "a colour (vector) volume"),
             ("vtkMRMLTensorVolumeNode", "a tensor volume"), ("vtkMRMLDiffusionWeightedVolumeNode", "a diffusion volume"))  # fmt: skip
    kind = next((words for cls, words in kinds if volume_node.IsA(cls)), f"a {volume_node.GetClassName()}")
    return (
        f"'{volume_node.GetName()}' is {kind}, not a CT volume: choose the CT (its segmentation goes in the "
        "Segmentation field; a labelmap can be turned into one with the Segmentations module's Import)."
    )


def paired_with(pairs, volume_node):
    """The segmentation node ``volume_node`` is paired with in ``pairs``, or None. A CT may be in one pair only:
    ``liversam train`` refuses the same CT listed twice (it would be trained and validated on), and "Add pair" twice
    with the same nodes listed the same pair twice."""
    return next((segmentation for volume, segmentation in pairs if volume is volume_node), None)


def pairs_in_scene(pairs, scene) -> tuple[list, list]:
    """``(kept, dropped)``: the pairs whose CT volume and segmentation are both still in ``scene``, and the others (a node
    deleted, or File > Close Scene). A dropped pair's nodes still hold their data, and exporting them trained on data
    the user had closed; the same CT loaded again is another node, which "Add pair" then took as another CT."""
    kept, dropped = [], []
    for volume, segmentation in pairs:
        (kept if volume.GetScene() is scene and segmentation.GetScene() is scene else dropped).append((volume, segmentation))
    return kept, dropped


def _same_exported_data(a: Path, b: Path) -> bool:
    """True when two exports hold the same studies with byte-identical files (MRML's writers are deterministic: the
    same nodes give the same bytes)."""
    try:
        cases_a = json.loads((a / "manifest.json").read_text(encoding="utf-8"))["cases"]
        cases_b = json.loads((b / "manifest.json").read_text(encoding="utf-8"))["cases"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if cases_a != cases_b:
        return False
    for case in cases_a:
        for key in ("ct", "label"):
            first, second = a / case[key], b / case[key]
            if not (first.is_file() and second.is_file()) or first.stat().st_size != second.stat().st_size:
                return False
            if first.read_bytes() != second.read_bytes():
                return False
    return True


def training_data(pairs, run_dir: str | Path, data: str = "", export=None) -> tuple[str, str]:
    """What Start / Resume pass as ``--data``, and a note for the log ("" when there is nothing to say).

    - A ``liversam train`` still running in the folder (it holds ``RUN_DIR/train.lock``: :mod:`liversam.run_folder_lock`;
      it outlives Slicer): :class:`ValueError`, nothing exported, no second process started.
    - Pairs listed: they are exported to ``RUN_DIR/exported-data``. When that folder already holds an export, the pairs
      are exported next to it first and compared: the same data is used as it is (Resume after Start); other data
      replaces it only when no run trained in the folder yet and none may still be running there (a run started by a
      ``liversam train`` that held no lock), else :class:`ValueError` says so (the run folder's run could not be
      resumed any more: ``liversam train`` refuses data that changed).
    - No pairs: the data folder or manifest chosen; else, on a run folder whose pairs were exported before (Resume after
      a Slicer restart, when the pairs list is empty), that export's manifest.
    ``export(pairs, folder)``: :func:`export_training_pairs` (tests pass their own)."""
    import shutil
    import tempfile

    from liversam.run_folder_lock import LOCK_NAME, holder

    export = export or export_training_pairs
    run_dir = Path(run_dir)
    pid = holder(run_dir)
    if pid is not None:  # a liversam train started earlier (perhaps before Slicer was restarted) still runs there
        raise ValueError(
            f"A training process{f' (PID {pid})' if pid else ''} is still running in the run folder '{run_dir}': a "
            "second one would overwrite its checkpoints, and its data must stay as they are. Wait for it to end (its "
            f"progress is in '{run_dir / 'train.log'}'), stop it (LiverSAMTrain shows it, and Stop stops it, when this "
            "run folder is chosen), or choose a new run folder."
        )
    exported = run_dir / EXPORTED_DATA
    manifest = exported / "manifest.json"
    note = ("Training on the listed volume + segmentation pairs; the data folder or manifest chosen above is not used."
            if pairs and data else "")  # fmt: skip
    if not pairs:
        if data:
            return data, ""
        if manifest.is_file():
            return str(manifest), f"Training on the pairs exported earlier to '{exported}' (no pairs listed)."
        raise NoTrainingData("Choose a data folder or manifest, or add loaded volume + segmentation pairs.")
    if not manifest.is_file():
        return str(export(pairs, exported)), note
    run_dir.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f"{EXPORTED_DATA}.new-", dir=run_dir))
    try:
        export(pairs, fresh)
        if _same_exported_data(fresh, exported):
            return str(manifest), note  # the run's own data, left as it is (its files' hashes are in its state)
        if any((run_dir / name).is_file() for name in RUN_FILES):
            raise ValueError(
                f"The run folder '{run_dir}' holds a run trained on other data: the pairs exported to '{exported}' "
                "differ from the pairs listed now. Exporting these would overwrite that run's data, and it could not "
                "be resumed any more. Choose a new run folder for these pairs, or press Clear pairs and then Resume "
                "to continue that run with its own data."
            )
        started = [name for name in STARTED_FILES if (run_dir / name).is_file()]
        if started and not (run_dir / LOCK_NAME).is_file():
            # started by a liversam train that holds no lock (an older version): it may still be building its caches
            raise ValueError(
                f"The run folder '{run_dir}' holds a run started on other data ({', '.join(started)}), which may still "
                f"be running: a training process keeps running after Slicer closes. The pairs exported to '{exported}' "
                "differ from the pairs listed now, and exporting these would take that run's data away. Choose a new "
                "run folder for these pairs, or press Clear pairs and then Resume to continue that run with its own "
                "data. If no training process runs there any more, you may also delete the run folder."
            )
        old = run_dir / f"{fresh.name}.old"
        exported.rename(old)  # no run trained on it: replaced by the pairs listed now
        fresh.rename(exported)
        shutil.rmtree(old, ignore_errors=True)
        return str(manifest), note
    finally:
        if fresh.exists():
            shutil.rmtree(fresh, ignore_errors=True)


# --- curves -------------------------------------------------------------------------------------------------------
class HistoryUnreadable(ValueError):
    """A ``history.csv`` that ``liversam train`` did not write (another tool's, say: fastai's CSVLogger names its file
    so): a value that is not a number, a row longer than the header, bytes that are not UTF-8 text. The message names
    the file, and the row and column."""


def _number(path: Path, row: int, column: str, text: str | None) -> float:
    if text in ("", None):
        return np.nan
    try:
        return float(text)
    except ValueError:
        raise HistoryUnreadable(f"{path}, row {row}, column '{column}': '{text}' is not a number") from None


def read_history(csv_path: str | Path) -> dict[str, np.ndarray]:
    """Columns of ``history.csv`` as float arrays (empty cells, cells a short row lacks -> NaN); {} when the file does
    not exist or cannot be read (a run folder that cannot be searched: permission denied). Raises
    :class:`HistoryUnreadable` for a file ``liversam train`` did not write."""
    path = Path(csv_path)
    try:
        if not path.is_file():
            return {}
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except OSError:
        return {}
    except UnicodeDecodeError as error:
        raise HistoryUnreadable(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise HistoryUnreadable(f"{path} is not a CSV file: {error}") from None
    if not rows:
        return {}
    for number, row in enumerate(rows, start=2):  # (row 1: the header)
        if None in row:  # DictReader's restkey: values past the header's columns
            raise HistoryUnreadable(f"{path}, row {number}: more values than the header's {len(columns)} columns")
    return {
        key: np.array([_number(path, number, key, row.get(key)) for number, row in enumerate(rows, start=2)])
        for key in columns
    }


def history_stamp(run_dir: str | Path) -> tuple[int, int] | None:
    """``(mtime_ns, size)`` of ``RUN_DIR/history.csv`` (None when there is none): the widget reads the curves again when
    it changes. ``liversam train`` writes the file (atomically) before it prints an epoch's EPOCH line, yet the EPOCH
    line alone is not enough: a resumed run's earlier epochs are in the file before its first new epoch (a Resume shows
    them at once), and after File > Close Scene the curves are made again from the file."""
    try:
        stat = (Path(run_dir) / "history.csv").stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


#: The attribute that marks the nodes of the curves (value: ``table``, ``chart:<CHARTS key>``, ``series:<column>``): a new
#: logic (the module reloaded, a saved scene loaded again) adopts the ones in the scene instead of adding another set of
#: nodes of the same names, and a chart the user deleted gets its series back instead of new ones.
CURVES_ATTRIBUTE = "LiverSAMTrain.curves"
#: The attribute of the curves' table that names the run folder whose ``history.csv`` it holds ("" : none, the curves
#: emptied by :func:`clear_curves`); saved with the scene.
CURVES_FOLDER_ATTRIBUTE = "LiverSAMTrain.runFolder"


def _nodes_by_class(scene, class_name: str) -> list:
    return [scene.GetNthNodeByClass(n, class_name) for n in range(scene.GetNumberOfNodesByClass(class_name))]


def _tagged(scene, class_name: str, tag: str):
    """The first node of ``class_name`` in ``scene`` marked ``tag`` (:data:`CURVES_ATTRIBUTE`), or None."""
    return next((node for node in _nodes_by_class(scene, class_name) if node.GetAttribute(CURVES_ATTRIBUTE) == tag), None)


def _unused_series(scene, column: str):
    """A series of ``column`` made by this module that no chart of ``scene`` shows (its chart was deleted), or None."""
    used = {
        chart.GetNthPlotSeriesNodeID(n)
        for chart in _nodes_by_class(scene, "vtkMRMLPlotChartNode")
        for n in range(chart.GetNumberOfPlotSeriesNodes())
    }
    return next(
        (node for node in _nodes_by_class(scene, "vtkMRMLPlotSeriesNode")
         if node.GetAttribute(CURVES_ATTRIBUTE) == f"series:{column}" and node.GetID() not in used),
        None,
    )  # fmt: skip


def curves_in_scene(scene=None, table_node=None, chart_nodes: dict | None = None):
    """``(table_node, {chart key: chart node})``: the nodes given that are still in ``scene``, and for those missing
    the curves' nodes already in ``scene`` (:data:`CURVES_ATTRIBUTE`: made by an earlier logic, before the module was
    reloaded); None / no entry where there are none."""
    scene = scene or slicer.mrmlScene
    if table_node is None or table_node.GetScene() is not scene:
        table_node = _tagged(scene, "vtkMRMLTableNode", "table")
    charts = {key: chart for key, chart in (chart_nodes or {}).items() if chart is not None and chart.GetScene() is scene}
    for key in CHARTS:
        if key not in charts:
            chart = _tagged(scene, "vtkMRMLPlotChartNode", f"chart:{key}")
            if chart is not None:
                charts[key] = chart
    return table_node, charts


def update_curves(csv_path: str | Path, scene=None, table_node=None, chart_nodes: dict | None = None):
    """Fill (or create) a table node with the run's curves and one plot chart per :data:`CHARTS` entry.

    Returns ``(table_node, {chart key: chart node})``; ``(table_node, {})`` when there is no history yet (the nodes of
    :func:`curves_in_scene` when there are some). Nodes no longer in ``scene`` (File > Close Scene during a run, or
    deleted by the user) are replaced by the curves' nodes still in the scene, else by new ones, so the curves keep
    showing; a chart kept while the table is replaced has its series pointed at the new table.
    """
    import vtk

    scene = scene or slicer.mrmlScene
    table_node, charts = curves_in_scene(scene, table_node, chart_nodes)
    history = read_history(csv_path)
    if not history:
        return table_node, charts
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", "LiverSAMTrain curves")
        table_node.SetAttribute(CURVES_ATTRIBUTE, "table")
    table_node.SetAttribute(CURVES_FOLDER_ATTRIBUTE, str(Path(csv_path).parent))
    table = table_node.GetTable()
    table.Initialize()
    for key, values in history.items():
        column = vtk.vtkDoubleArray()
        column.SetName(key)
        for value in values:
            column.InsertNextValue(float(value))
        table.AddColumn(column)
    table_node.Modified()
    tumor = history.get("val_dice_tumor")
    liver_only = tumor is not None and bool(np.isnan(tumor).all())  # fixed for a run: the validation set is
    for key, spec in CHARTS.items():
        chart_node = charts.get(key)
        if chart_node is None:
            chart_node = _new_chart(scene, key, spec)
        _fill_chart(scene, chart_node, spec, table_node, history, liver_only)
        charts[key] = chart_node
    return table_node, charts


#: the charts' title note while the run folder chosen has no curves (:func:`clear_curves`)
NO_CURVES_NOTE = "no curves: the run folder chosen has no epoch in a history.csv"


def _chart_title(spec: ChartSpec, pending: bool = False, empty: bool = False) -> str:
    title = f"LiverSAMTrain: {spec.title.lower()} per epoch"
    if empty:
        return f"{title} ({NO_CURVES_NOTE})"
    return f"{title} ({spec.pending})" if pending and spec.pending else title


def _own_title(spec: ChartSpec, title: str | None) -> bool:
    """True for a title this module gave the chart (one the user wrote is left alone)."""
    return title in (_chart_title(spec), _chart_title(spec, pending=True), _chart_title(spec, empty=True))


def curves_folder(table_node) -> str | None:
    """The run folder whose ``history.csv`` the curves' table holds (:data:`CURVES_FOLDER_ATTRIBUTE`; "" : emptied;
    None: no table, or one made before the attribute existed)."""
    return None if table_node is None else table_node.GetAttribute(CURVES_FOLDER_ATTRIBUTE)


def clear_curves(scene=None, table_node=None, chart_nodes: dict | None = None):
    """Empty the curves' nodes (the run folder chosen has no curves, or none is chosen): the table loses its columns
    and rows, and so does any other table of this module that a chart's series read; the charts keep their series,
    which the plot view then draws as nothing (qMRMLPlotView skips a series whose column its table has not), and
    their titles say why (a title the user wrote is left alone). Nothing is created or removed (a chart in the layout's
    plot view stays there, empty). Returns ``(table_node, {chart key: chart node})`` as :func:`curves_in_scene`."""
    scene = scene or slicer.mrmlScene
    table_node, charts = curves_in_scene(scene, table_node, chart_nodes)
    tables = {} if table_node is None else {table_node.GetID(): table_node}
    for chart in charts.values():
        for n in range(chart.GetNumberOfPlotSeriesNodes()):
            series = chart.GetNthPlotSeriesNode(n)
            table = series.GetTableNode() if series is not None else None
            if table is not None and table.GetAttribute(CURVES_ATTRIBUTE) == "table":
                tables[table.GetID()] = table
    for table in tables.values():
        if table.GetTable().GetNumberOfColumns() or curves_folder(table):
            table.GetTable().Initialize()
            table.SetAttribute(CURVES_FOLDER_ATTRIBUTE, "")
            table.Modified()
    for key, chart in charts.items():
        spec = CHARTS[key]
        if _own_title(spec, chart.GetTitle()) and chart.GetTitle() != _chart_title(spec, empty=True):
            chart.SetTitle(_chart_title(spec, empty=True))
    return table_node, charts


def run_folder_curves(run_dir: str | Path | None, scene=None, table_node=None, chart_nodes: dict | None = None):
    """The curves of the run folder ``run_dir``: :func:`update_curves` from its ``history.csv`` when that holds an
    epoch, else (none yet, or no run folder: "" / None) :func:`clear_curves`; never another run folder's curves left
    as if they were this one's. Returns ``(table_node, {chart key: chart node})``."""
    if run_dir and read_history(Path(run_dir) / "history.csv"):
        return update_curves(Path(run_dir) / "history.csv", scene, table_node, chart_nodes)
    return clear_curves(scene, table_node, chart_nodes)


def _new_chart(scene, key: str, spec: ChartSpec) -> slicer.vtkMRMLPlotChartNode:
    chart_node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"LiverSAMTrain: {spec.title.lower()}")
    chart_node.SetAttribute(CURVES_ATTRIBUTE, f"chart:{key}")
    chart_node.SetTitle(_chart_title(spec))
    chart_node.SetXAxisTitle(EPOCH_LABEL)
    chart_node.SetYAxisTitle(spec.y_title)
    if spec.y_range is not None:  # set once: a range the user zooms to in the plot view is written back here
        chart_node.SetYAxisRangeAuto(False)
        chart_node.SetYAxisRange(*spec.y_range)
    return chart_node


def _fill_chart(scene, chart_node, spec: ChartSpec, table_node, history: dict, liver_only: bool) -> None:
    """A series per column of ``spec`` in ``history`` (one missing is added: new chart, series deleted by the user;
    the series of a chart the user deleted are taken back), each reading ``table_node``; the mean Dice's name says
    when it is the liver's alone. The title says why a chart is empty (:attr:`ChartSpec.pending`), and a fixed y range
    the user zoomed into is reset when a value falls outside it."""
    existing = {}
    for n in range(chart_node.GetNumberOfPlotSeriesNodes()):
        series = chart_node.GetNthPlotSeriesNode(n)
        if series is not None:
            existing[series.GetYColumnName()] = series
    for column, (name, color) in spec.series.items():
        if column not in history:
            continue
        series = existing.get(column)
        if series is None:
            series = _unused_series(scene, column)
            if series is None:
                series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
                series.SetAttribute(CURVES_ATTRIBUTE, f"series:{column}")
                series.SetXColumnName("epoch")
                series.SetYColumnName(column)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
                series.SetColor(*color)
            chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
        if series.GetTableNodeID() != table_node.GetID():
            series.SetAndObserveTableNodeID(table_node.GetID())
        legend = DICE_MEAN_LIVER_ONLY if column == "val_dice_mean" and liver_only else name
        if series.GetName() != legend:
            series.SetName(legend)
    values = np.concatenate([history[column] for column in spec.series if column in history] or [np.array([])])
    values = values[np.isfinite(values)]
    title = _chart_title(spec, pending=values.size == 0)
    if _own_title(spec, chart_node.GetTitle()) and chart_node.GetTitle() != title:
        chart_node.SetTitle(title)  # (a title the user wrote is left alone)
    if spec.y_range is not None and values.size and not chart_node.GetYAxisRangeAuto():
        low, high = chart_node.GetYAxisRange()
        if values.min() < low or values.max() > high:  # zoomed in the plot view (it writes the range here) before
            chart_node.SetYAxisRange(*spec.y_range)
