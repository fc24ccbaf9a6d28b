"""DICOM SEG export from Slicer is refused, with what to do, when the CT no longer lies on the DICOM instances it names.

A SEG's frame ``k`` is the referenced series' slice ``k``; LiverSAM writes it from the CT volume node's own grid and
references the instances the node names (``DICOM.instanceUIDs``, set by Slicer's DICOM loader). A transform hardened
on the CT changes that grid but not the names:

- Slicer's acquisition-geometry regularization (DICOMScalarVolumePlugin, on by default in 5.10) puts a grid transform
  on a CT whose slices are unevenly spaced or sheared (tilted gantry). LiverSAM refuses a non-linear transform and says
  to harden it; hardening resamples the CT onto a regular grid (vtkMRMLVolumeNode::ApplyNonLinearTransform), whose
  slices are not the series' images any more.
- A hardened linear transform (a registration) moves the grid: ``liversam export`` put the labelmap back onto the
  series grid in physical space, so the SEG was moved by the transform, without a word.

Checked on a real CT series (``totalseg_small/ct_dicom``, 20 slices) with Slicer's own regularization code
(``AcquisitionModeling`` of DICOMScalarVolumePlugin.py at v5.10.0, from the Slicer git mirror, ``LIVERSAM_SLICER_SOURCE``;
that test is skipped without it) on slicer-core's MRML, and a DICOM database that answers from the files' headers.
"""

from __future__ import annotations

import ast
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_slicer_widget_state import widgets  # noqa: F401  (the fixture)

from slicer_harness import ensure_module_on_path, fresh_scene, shared_data_dir, slicer_environment

ensure_module_on_path()

from liversam.ct_io import read_ct  # noqa: E402
from liversam.errors import InputImageError, OutputError  # noqa: E402
from LiverSAMLib import MRMLBridge  # noqa: E402
from LiverSAMLib.SegmentationLogic import (  # noqa: E402
    DICOM_GRID_TOLERANCE_FRACTION,
    DICOM_GRID_TOLERANCE_MM,
    SegmentationLogic,
    dicom_grid_problem,
)

pytestmark = pytest.mark.slicer
SERIES = shared_data_dir() / "totalseg_small" / "ct_dicom"
SLICER_SOURCE = Path(os.environ.get("LIVERSAM_SLICER_SOURCE", "/work/.mirror/Slicer+Slicer/repo"))


class DicomDatabase:
    """``slicer.dicomDatabase`` (ctkDICOMDatabase) for the files of one folder: ``instanceValue(uid, "gggg,eeee")`` gives
    the tag's value as text, several values joined by backslashes; ``fileForInstance(uid)`` the file."""

    def __init__(self, folder: Path) -> None:
        import pydicom

        self.headers = {}
        for path in sorted(folder.iterdir()):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self.headers[str(ds.SOPInstanceUID)] = (path, ds)

    def instanceValue(self, uid: str, tag: str) -> str:
        _path, ds = self.headers[uid]
        element = ds.get(tuple(int(part, 16) for part in tag.split(",")))
        if element is None:
            return ""
        from pydicom.multival import MultiValue

        value = element.value
        return "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)

    def fileForInstance(self, uid: str) -> str:
        return str(self.headers[uid][0])


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """The real series with the UIDs a SEG references (the shared copy is anonymised: its images share one instance
    UID, and their series, study and class UIDs are empty)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("series") / "ct"
    folder.mkdir()
    study, series_uid = generate_uid(), generate_uid()
    for path in sorted(SERIES.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.save_as(folder / path.name)
    return folder


@pytest.fixture
def database(monkeypatch):
    import slicer

    def use(folder: Path) -> DicomDatabase:
        db = DicomDatabase(folder)
        monkeypatch.setattr(slicer, "dicomDatabase", db, raising=False)
        return db

    return use


def loaded(folder: Path, scene):
    """The series as Slicer's DICOM module loads a regular one: a volume node on its grid (i along the rows, j down the
    columns, k along the slice normal from the first image) naming its images in slice order."""
    ct = read_ct(folder, allow_non_ct=True)
    node = MRMLBridge.volume_node_from_ct(ct, "CT", scene)
    node.SetAttribute("DICOM.instanceUIDs", " ".join(ct.metadata["dicom_sop_instance_uids"]))
    return node


def liver_segmentation(scene, volume):
    logic = SegmentationLogic(scene=scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    logic.prepare_segmentation(segmentation, volume)
    ids = logic.ensure_standard_segments(segmentation)
    mask = np.zeros(MRMLBridge.geometry_from_volume_node(volume).shape_kji, bool)
    mask[5:15, 200:300, 200:320] = True
    logic.write_mask(segmentation, ids["liver"], volume, mask)
    return segmentation


def liversam_logic(module):
    logic = module.LiverSAMLogic.__new__(module.LiverSAMLogic)
    logic.segmentation = SegmentationLogic(scene=slicer_environment().scene)
    logic.connection = SimpleNamespace(settings=SimpleNamespace(python=sys.executable, model="litemedsam"))
    return logic


def test_a_ct_as_loaded_passes_and_its_export_is_prepared(widgets, series, database, tmp_path):  # noqa: F811
    module, _train = widgets
    database(series)
    scene = fresh_scene()
    volume = loaded(series, scene)
    assert dicom_grid_problem(volume) is None
    export = liversam_logic(module).prepareDicomSegExport(liver_segmentation(scene, volume), volume,
                                                          str(tmp_path / "seg.dcm"))  # fmt: skip
    assert "--reference-dicom" in export.command
    shutil.rmtree(export.work_folder, ignore_errors=True)


def test_a_ct_under_a_linear_transform_not_hardened_passes(series, database):
    """Its labelmap is written on its own grid, the series' (the transform is the node's parent, not in its voxels)."""
    import vtk

    database(series)
    scene = fresh_scene()
    volume = loaded(series, scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 20.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert dicom_grid_problem(volume) is None


def test_a_hardened_registration_is_refused_with_what_to_do(widgets, series, database, tmp_path):  # noqa: F811
    """A CT moved by 20 mm and hardened: its SEG used to be written moved by 20 mm."""
    import vtk

    module, _train = widgets
    database(series)
    scene = fresh_scene()
    volume = loaded(series, scene)
    segmentation = liver_segmentation(scene, volume)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 20.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    volume.HardenTransform()
    assert volume.GetParentTransformNode() is None
    problem = dicom_grid_problem(volume)
    assert problem and "up to 20.00 mm" in problem.difference and problem.irregular is None  # the series is regular
    with pytest.raises(OutputError, match="no longer lies on the slices of the DICOM series") as refused:
        liversam_logic(module).prepareDicomSegExport(segmentation, volume, str(tmp_path / "seg.dcm"))
    message = str(refused.value)
    print(message)
    assert "up to 20.00 mm" in message and "a transform was hardened on it" in message
    # advice that works: the series loaded again lies on its images (test_a_ct_as_loaded_passes...)
    assert "export to .seg.nrrd or a labelmap instead" in message and "load the series again" in message
    assert not (tmp_path / "seg.dcm").exists()


def uneven_copy(folder: Path, target: Path, missing: int = 10) -> Path:
    """The series without one image in the middle: its slices are unevenly spaced (a gap of two)."""
    target.mkdir()
    for index, path in enumerate(sorted(folder.iterdir(), key=lambda p: read_position(p))):
        if index != missing:
            shutil.copyfile(path, target / path.name)
    return target


def read_position(path: Path) -> float:
    import pydicom

    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def slicer_acquisition_modeling():
    """``DICOMScalarVolumePluginClass.AcquisitionModeling`` from Slicer's source at v5.10.0."""
    try:
        source = subprocess.run(["git", "-C", str(SLICER_SOURCE), "show",
                                 "v5.10.0:Modules/Scripted/DICOMPlugins/DICOMScalarVolumePlugin.py"],
                                check=True, capture_output=True, text=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no Slicer source at {SLICER_SOURCE} (set LIVERSAM_SLICER_SOURCE to a Slicer git checkout)")
    import slicer
    import vtk

    tree = ast.parse(source)
    plugin = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DICOMScalarVolumePluginClass")
    modeling = next(n for n in plugin.body if isinstance(n, ast.ClassDef) and n.name == "AcquisitionModeling")
    namespace = {"numpy": np, "vtk": vtk, "slicer": slicer, "logging": logging}
    exec(textwrap.dedent(ast.get_source_segment(source, modeling)), namespace)  # noqa: S102 - Slicer's own code
    return namespace["AcquisitionModeling"]


def test_slicers_regularization_of_an_uneven_series_once_hardened_is_refused(widgets, series, database, tmp_path):  # noqa: F811
    import slicer

    module, _train = widgets
    folder = uneven_copy(series, tmp_path / "uneven")
    database(folder)
    scene = fresh_scene()
    # Slicer's reader puts the 19 images on a regular grid from the first to the last (ITK's series reader: 19 slices
    # evenly spaced); the loader names the images in slice order, then regularizes and (here) hardens
    ct = read_ct(folder, allow_non_ct=True, resample_irregular=True)  # its regular grid; the voxels are not checked
    uids = [str(ds.SOPInstanceUID) for ds in sorted((h for _p, h in slicer.dicomDatabase.headers.values()),
                                                    key=lambda ds: float(ds.ImagePositionPatient[2]))]  # fmt: skip
    g = ct.geometry
    n = len(uids)
    spacing_k = (g.size_ijk[2] - 1) * g.spacing_mm[2] / (n - 1)
    from liversam.geometry import ImageGeometry
    from liversam.volume import CTVolume

    regular = ImageGeometry((g.size_ijk[0], g.size_ijk[1], n), (g.spacing_mm[0], g.spacing_mm[1], spacing_k),
                            g.origin_lps, g.direction_lps)  # fmt: skip
    volume = MRMLBridge.volume_node_from_ct(CTVolume(np.zeros(regular.shape_kji, np.int16), regular), "CT", scene)
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    as_read = dicom_grid_problem(volume)  # as read, its slices are already not the images'
    assert as_read is not None and "unevenly spaced" in as_read.irregular
    modeling = slicer_acquisition_modeling()()
    modeling.createAcquisitionTransform(volume, addAcquisitionTransformIfNeeded=True, hardenAcquisitionTransform=False)
    transform = volume.GetParentTransformNode()
    assert transform is not None and transform.IsA("vtkMRMLGridTransformNode"), "Slicer added no regularization"
    with pytest.raises(InputImageError, match="harden the transform"):
        MRMLBridge.input_geometry_from_volume_node(volume)  # LiverSAM's refusal before: harden it
    volume.HardenTransform()
    assert volume.GetParentTransformNode() is None
    segmentation = liver_segmentation(scene, volume)
    problem = dicom_grid_problem(volume)
    assert problem and "unevenly spaced" in problem.irregular
    with pytest.raises(OutputError, match="LiverSAM cannot write a DICOM SEG of the CT") as refused:
        liversam_logic(module).prepareDicomSegExport(segmentation, volume, str(tmp_path / "seg.dcm"))
    print(f"hardened ({volume.GetImageData().GetDimensions()}): {refused.value}")
    assert_irregular_series_message(str(refused.value))


def assert_irregular_series_message(message: str) -> None:
    """The refusal of an irregular series: why, and only advice that works (segmenting "the CT as loaded" leads to
    LiverSAM's own refusal of its acquisition transform, "harden the transform", and hardening it gives this CT)."""
    assert "its images are unevenly spaced (2.00 to 4.00 mm apart)" in message
    assert "Export the segmentation to .seg.nrrd or a labelmap instead" in message
    assert "hardened" not in message and "as loaded" not in message and "load the series again" not in message


def test_an_uneven_series_read_without_regularization_is_refused_without_blaming_a_transform(
    widgets, series, database, tmp_path  # noqa: F811
):
    """With Slicer's regularization off (DICOM/ScalarVolume/AcquisitionGeometryRegularization = none) the CT has no
    transform, ever; the refusal said "A transform was hardened on it" and advised to "segment the CT as loaded"."""
    import slicer

    module, _train = widgets
    folder = uneven_copy(series, tmp_path / "uneven")
    database(folder)
    scene = fresh_scene()
    ct = read_ct(folder, allow_non_ct=True, resample_irregular=True)
    uids = [str(ds.SOPInstanceUID) for ds in sorted((h for _p, h in slicer.dicomDatabase.headers.values()),
                                                    key=lambda ds: float(ds.ImagePositionPatient[2]))]  # fmt: skip
    g, n = ct.geometry, len(uids)
    from liversam.geometry import ImageGeometry
    from liversam.volume import CTVolume

    regular = ImageGeometry((g.size_ijk[0], g.size_ijk[1], n),
                            (g.spacing_mm[0], g.spacing_mm[1], (g.size_ijk[2] - 1) * g.spacing_mm[2] / (n - 1)),
                            g.origin_lps, g.direction_lps)  # fmt: skip
    volume = MRMLBridge.volume_node_from_ct(CTVolume(np.zeros(regular.shape_kji, np.int16), regular), "CT", scene)
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    assert volume.GetParentTransformNode() is None
    with pytest.raises(OutputError) as refused:
        liversam_logic(module).prepareDicomSegExport(liver_segmentation(scene, volume), volume, str(tmp_path / "s.dcm"))
    print(refused.value)
    assert_irregular_series_message(str(refused.value))


def test_a_tilted_series_is_named_as_such():
    from LiverSAMLib.SegmentationLogic import dicom_series_irregularity

    def image(z: float, y: float = 0.0) -> dict:
        return {"position": [0.0, y, z], "orientation": [1, 0, 0, 0, 1, 0], "spacing": [0.8, 0.8]}

    assert dicom_series_irregularity([image(z) for z in (0, 2, 4, 6)]) is None
    assert "unevenly spaced (2.00 to 4.00 mm apart)" in dicom_series_irregularity([image(z) for z in (0, 2, 6)])
    tilted = dicom_series_irregularity([image(2.0 * k, 0.5 * k) for k in range(4)])
    assert "shifted sideways" in tilted and "tilted gantry" in tilted
    other = [image(0), image(2), {**image(4), "orientation": [1, 0, 0, 0, 0.9, 0.1]}]
    assert "same orientation" in dicom_series_irregularity(other)


def test_the_tolerance_is_the_core_dicom_readers():
    from liversam import dicom_series

    assert (DICOM_GRID_TOLERANCE_MM, DICOM_GRID_TOLERANCE_FRACTION) == (
        dicom_series.POSITION_TOLERANCE_MM, dicom_series.POSITION_TOLERANCE_FRACTION)  # fmt: skip
