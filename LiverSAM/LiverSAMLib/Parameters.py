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

EXPORT_FORMATS = (".seg.nrrd", "labelmap .nrrd", "labelmap .nii.gz", "DICOM SEG")


@parameterPack
class PostprocessParameters:
    """Clean-up of a propagation (``LiverSAMLib.ServerRequests.POSTPROCESS_PARAMETERS``: sent to the server as
    its job settings; the defaults are ``liversam segment``'s)."""

    # Fill holes in the slice masks of segments clipped to the liver and in each 3D result (an organ keeps its slice holes).
    fillHoles: bool = True
    # 3D connected components smaller than this are removed (mm^3; 0 keeps all: small lesions stay).
    minIslandVolumeMm3: Annotated[float, WithinRange(0.0, 100000.0)] = 0.0
    # Liver: keep only the largest 3D component.
    keepLargestComponent: bool = True
    # Morphological closing radius of every slice mask in mm (0: none).
    closingRadiusMm: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
    # Refine the propagated liver and tumours with a dense CRF on the CT (where the server has pydensecrf2).
    denseCrf: bool = True
    # Tumours are clipped to the liver and never overwrite it.
    clipTumorToLiver: bool = True


@parameterPack
class PropagationParameters:
    """Slice-to-slice propagation from the prompted slices (``liversam.propagation.PropagationSettings``).

    Every member maps one-to-one onto a field of the core's settings (``LiverSAMLib.ServerRequests.
    PROPAGATION_PARAMETERS``) sent to the server, except ``skipThinSlicesMm`` and ``lesionRim``, the server's job
    settings ``skip_thin_slices_mm`` (sent only when on) and ``lesion_rim`` (sent only when off, and only for a
    segment with a container); the defaults are the core's defaults.
    """

    # Stop when the model's predicted IoU on a slice falls below this value.
    minScore: Annotated[float, WithinRange(0.0, 1.0)] = 0.45
    # Margin (mm) added around the previous slice's mask to make the next slice's box prompt (an organ on
    # thick slices takes at least 1.4 x the slice thickness; lesions two thirds of it).
    boxMarginMm: Annotated[float, WithinRange(0.0, 50.0)] = 3.0
    # Also give the previous slice's mask to the model as a dense prompt.
    useMaskPrompt: bool = False
    # Stop when the mask is smaller than this (mm^2): the structure has ended.
    minAreaMm2: Annotated[float, WithinRange(0.0, 10000.0)] = 15.0
    # Stop when the area falls below this fraction of the previous slice's area (the mask collapsed).
    collapseRatio: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    # Stop when less than this fraction of the new mask overlaps the previous slice's mask (it jumped away).
    minOverlap: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    # At most this many slices per direction from each prompted slice (0: no limit).
    maxSlices: Annotated[int, WithinRange(0, 10000)] = 0
    # Leak guard: stop when the area grows by more than this factor (plus the allowance) from one slice to
    # the next (0: off).
    maxGrowthRatio: Annotated[float, WithinRange(0.0, 10.0)] = 1.5
    growthAllowanceMm2: Annotated[float, WithinRange(0.0, 10000.0)] = 40.0
    # Leak guard: stop when the mask's mean HU moves this far from the prompted slice's (0: off). Tumours
    # (segments inside another) use half of it and two thirds of the box margin (liversam.propagation.for_lesions).
    maxMeanHuShift: Annotated[float, WithinRange(0.0, 1000.0)] = 80.0
    # Intensity refinement (liversam.intensity_refinement): the liver drops tissue far brighter or darker
    # than its parenchyma on the prompted slice (a run into the kidney) and, at the end, its dark partial-volume
    # rim (liversam.organ_rim); a tumour keeps only the parts of each slice's mask that differ from the liver's
    # parenchyma the way its box does and, at the end, takes its partial-volume ring (liversam.lesion_rim).
    intensityRefinement: bool = True
    # A tumour's outline takes its partial-volume ring: the voxels one step outside it that still lean to the
    # tumour's side of the parenchyma (liversam.lesion_rim; only with intensity refinement). Off: the outline
    # stays where the threshold half-way between tumour and liver puts it (labels drawn around a tumour's core).
    lesionRim: bool = True
    # Faster on thin slices: the liver (a segment with no container) on slices at most this thick (mm, under
    # 3) is predicted on every other slice and interpolated between (``skip_thin_slices_mm``; 0: off).
    skipThinSlicesMm: Annotated[float, WithinRange(0.0, 2.9)] = 0.0


@parameterNodeWrapper
class LiverSAMParameterNode:
    """All LiverSAM settings.

    inputVolume - the CT (never modified: a windowed copy feeds the model).
    outputSegmentation / targetSegmentID - where results go (``liver`` / ``tumor`` created when missing).
    (The model, the device and the server are application settings of the module's Server section.)
    positivePoints / negativePoints / boxROI - the prompt markups placed in the slice views.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    targetSegmentID: str = ""
    windowLevel: Annotated[float, WithinRange(-1024.0, 3071.0)] = 40.0
    windowWidth: Annotated[float, WithinRange(1.0, 4096.0)] = 400.0
    # Slices on each side of the one being prompted that are encoded in the background (0: off).
    prefetchRadius: Annotated[int, WithinRange(0, 20)] = 2
    liveUpdate: bool = True
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    boxROI: vtkMRMLMarkupsROINode
    postprocess: PostprocessParameters
    propagation: PropagationParameters
    exportFormat: Annotated[str, Choice(list(EXPORT_FORMATS))] = ".seg.nrrd"
    exportPath: Path = Path()
