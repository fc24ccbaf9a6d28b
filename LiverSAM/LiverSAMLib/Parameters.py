"""LiverSAM's parameter node: every setting of the module, typed, saved with the scene.

Widgets in ``Resources/UI/LiverSAM.ui`` carry a ``SlicerParameterName`` property naming the parameter they
edit (nested packs as ``postprocess.fillHoles``); ``connectGui`` keeps both in sync. This is the module's
Qt boundary: ``slicer.parameterNodeWrapper`` needs the Slicer application (it imports ``qt``), so this file
is imported by ``LiverSAM.py`` only, never by the MRML-only helpers.
"""

from pathlib import Path
from typing import Annotated

from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper, parameterPack

DEVICES = ("auto", "cpu", "cuda", "mps")
EXPORT_FORMATS = (".seg.nrrd", "labelmap .nrrd", "labelmap .nii.gz", "DICOM SEG")


@parameterPack
class PostprocessParameters:
    """Clean-up applied to every predicted mask (2D per slice and 3D after propagation)."""

    fillHoles: bool = True
    # Connected components smaller than this are removed (mm^3; 0 keeps all).
    minIslandVolumeMm3: Annotated[float, WithinRange(0.0, 100000.0)] = 500.0
    # Liver: keep only the largest 3D component.
    keepLargestComponent: bool = True
    # Morphological closing radius in mm (0: none).
    closingRadiusMm: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
    # Tumours are clipped to the liver and never overwrite it.
    clipTumorToLiver: bool = True


@parameterPack
class PropagationParameters:
    """Slice-to-slice propagation from the prompted slices."""

    # Stop when the model's predicted IoU falls below this value.
    minScore: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    # Stop when the mask area changes by more than this factor between neighbouring slices.
    maxAreaRatio: Annotated[float, WithinRange(1.0, 10.0)] = 2.5


@parameterNodeWrapper
class LiverSAMParameterNode:
    """All LiverSAM settings.

    inputVolume - the CT (never modified: a windowed copy feeds the model).
    outputSegmentation / targetSegmentID - where results go (``liver`` / ``tumor`` created when missing).
    model / device - which SAM model and where it runs.
    positivePoints / negativePoints / boxROI - the prompt markups placed in the slice views.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    targetSegmentID: str = ""
    model: str = "litemedsam"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    windowLevel: Annotated[float, WithinRange(-1024.0, 3071.0)] = 40.0
    windowWidth: Annotated[float, WithinRange(1.0, 4096.0)] = 400.0
    cacheMB: Annotated[float, WithinRange(64.0, 65536.0)] = 1024.0
    liveUpdate: bool = True
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    boxROI: vtkMRMLMarkupsROINode
    postprocess: PostprocessParameters
    propagation: PropagationParameters
    exportFormat: Annotated[str, Choice(list(EXPORT_FORMATS))] = ".seg.nrrd"
    exportPath: Path = Path()
