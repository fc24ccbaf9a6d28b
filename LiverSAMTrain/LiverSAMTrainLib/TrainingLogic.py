"""LiverSAMTrain logic: MRML and files only, no Qt.

- :func:`export_training_pairs`: loaded (CT volume, segmentation) node pairs -> study folders
  (``ct.nrrd`` + ``label.nii.gz``: 1 liver, 2 tumour) and a ``manifest.json`` that ``liversam train`` reads;
- :func:`build_train_command`: the ``PythonSlicer -m liversam train ...`` command line for the settings;
- :func:`update_curves`: ``history.csv`` of a run -> a table node and plot chart (loss, Dice per epoch);
- :func:`parse_event`: the ``LIVERSAM_EPOCH`` / ``LIVERSAM_DONE`` lines the command prints;
- :func:`register_model`: add a checkpoint to LiverSAM's model list.
"""

from __future__ import annotations

import csv
import json
import os
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


@dataclass
class TrainingSettings:
    """What the user chose in the module (mirrors ``liversam train``'s options)."""

    data: str
    out: str
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-4
    augment_copies: int = 0
    max_slices: int = 0  # 0: all liver slices
    seed: int = 0
    train_encoder: str = "none"
    device: str = "auto"
    liver_labels: str = "1,2"
    tumor_labels: str = "2"
    model_name: str = ""
    extra_args: list[str] = field(default_factory=list)


def python_executable() -> str:
    """``PythonSlicer`` next to Slicer's Python when it exists (in the application), else this Python."""
    folder = Path(sys.executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (folder / name).is_file():
            return str(folder / name)
    return sys.executable


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
    if settings.max_slices:
        command += ["--max-slices", str(int(settings.max_slices))]
    if settings.model_name:
        command += ["--name", settings.model_name]
    return command + list(settings.extra_args)


def core_package_env() -> dict:
    """Environment for the process: ``liversam`` importable from this module's installation."""
    import liversam

    package_parent = str(Path(liversam.__file__).resolve().parents[1])
    existing = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": package_parent + (os.pathsep + existing if existing else "")}


def parse_event(line: str) -> tuple[str, dict] | None:
    """``("EPOCH"|"RESUME"|"DONE", payload)`` for a ``LIVERSAM_<KIND> {json}`` line, else None."""
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


def export_training_pairs(pairs, folder: str | Path, label_config=None) -> Path:
    """Write each (scalar volume node, segmentation node) pair as a study folder and return the manifest.

    Segments are classified by name as in ``liversam train`` (``liver``; tumour / lesion / ...; cysts
    ignored) and written as one labelmap on the CT grid: 1 liver, 2 tumour. Raises a
    :class:`liversam.errors.LiverSAMError` naming the pair when it has no liver segment.
    """
    import SimpleITK as sitk

    from liversam.atomic_write import atomic_path, write_text_atomically
    from liversam.ct_io import volume_to_sitk
    from liversam.segmentation import Segment, SegmentationResult
    from liversam.training import LabelConfig
    from liversam.training.studies import masks_from_segmentation
    from LiverSAMLib import MRMLBridge

    folder = Path(folder)
    entries, used = [], set()
    for volume_node, segmentation_node in pairs:
        ct = MRMLBridge.ct_volume_from_node(volume_node)
        segmentation = segmentation_node.GetSegmentation()
        segments = []
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            name = segmentation.GetSegment(segment_id).GetName()
            mask = MRMLBridge.segment_mask(segmentation_node, segment_id, volume_node)
            segments.append(Segment(name=name, label=index + 1, mask_kji=np.asarray(mask, dtype=bool)))
        result = SegmentationResult(ct.geometry, segments)
        liver, tumor = masks_from_segmentation(
            result, label_config or LabelConfig(), Path(segmentation_node.GetName())
        )
        labelmap = np.zeros(liver.shape, dtype=np.uint8)
        labelmap[liver] = 1
        labelmap[tumor] = 2
        case_id = _safe_name(volume_node.GetName())
        while case_id in used:
            case_id += "_"
        used.add(case_id)
        study = folder / case_id
        study.mkdir(parents=True, exist_ok=True)
        for array, name in ((np.asarray(ct.array_kji), "ct.nrrd"), (labelmap, "label.nii.gz")):
            with atomic_path(study / name) as tmp:
                sitk.WriteImage(volume_to_sitk(array, ct.geometry), str(tmp), useCompression=True)
        entries.append({"id": case_id, "ct": f"{case_id}/ct.nrrd", "label": f"{case_id}/label.nii.gz"})
    manifest = folder / "manifest.json"
    write_text_atomically(manifest, json.dumps({"cases": entries}, indent=2))
    return manifest


# --- curves -------------------------------------------------------------------------------------------------------
def read_history(csv_path: str | Path) -> dict[str, np.ndarray]:
    """Columns of ``history.csv`` as float arrays (empty cells -> NaN); {} when the file does not exist."""
    path = Path(csv_path)
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    return {
        key: np.array([float(r[key]) if r[key] not in ("", None) else np.nan for r in rows])
        for key in rows[0]
    }


def update_curves(csv_path: str | Path, scene=None, table_node=None, chart_node=None):
    """Fill (or create) a table node with the run's curves and a plot chart with one series per curve.

    Returns ``(table_node, chart_node)``; ``(None, None)`` when there is no history yet.
    """
    import vtk

    scene = scene or slicer.mrmlScene
    history = read_history(csv_path)
    if not history:
        return table_node, chart_node
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", "LiverSAMTrain curves")
    table = table_node.GetTable()
    table.Initialize()
    for key, values in history.items():
        column = vtk.vtkDoubleArray()
        column.SetName(key)
        for value in values:
            column.InsertNextValue(float(value))
        table.AddColumn(column)
    table_node.Modified()
    if chart_node is None:
        chart_node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "LiverSAMTrain curves")
        chart_node.SetTitle("LiverSAMTrain: loss and validation Dice per epoch")
        chart_node.SetXAxisTitle("epoch")
        chart_node.SetYAxisTitle("loss / Dice")
        for key, (name, color) in {**LOSS_SERIES, **DICE_SERIES}.items():
            if key not in history:
                continue
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
            series.SetAndObserveTableNodeID(table_node.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(key)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            series.SetColor(*color)
            chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
    return table_node, chart_node


def register_model(checkpoint: str | Path, name: str) -> str:
    """Add ``checkpoint`` to LiverSAM's model list under ``name`` (what ``liversam train`` does at the end)."""
    from liversam.training.report import register_best_model

    return register_best_model(Path(checkpoint), name)
