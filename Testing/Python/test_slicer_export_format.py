"""Export: a labelmap is written in the format chosen, or refused with what to change.

``SegmentationLogic.export_labelmap`` writes the format its file name ends with (MRML's storage node), so the
format chosen in the Export section was not applied: "labelmap .nii.gz" with a file named ``liver.nrrd`` wrote a NRRD
file without a word. ``LiverSAMLogic.export`` now refuses a name that does not end as the format says. On slicer-core's
real MRML and storage nodes.
"""

from __future__ import annotations

import gzip
from types import SimpleNamespace

import numpy as np
import pytest
from test_slicer_widget_state import widgets  # noqa: F401  (the fixture)

from slicer_harness import ensure_module_on_path, fresh_scene

ensure_module_on_path()

from liversam.errors import OutputError  # noqa: E402
from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge  # noqa: E402
from LiverSAMLib.SegmentationLogic import LIVER, SegmentationLogic  # noqa: E402

pytestmark = pytest.mark.slicer
SHAPE = (4, 12, 10)


@pytest.fixture
def exported(widgets):  # noqa: F811
    module, _train = widgets
    scene = fresh_scene()
    geometry = ImageGeometry((SHAPE[2], SHAPE[1], SHAPE[0]), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    volume = MRMLBridge.volume_node_from_ct(CTVolume(np.zeros(SHAPE, np.int16), geometry), "ct", scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    segmentation_logic = SegmentationLogic(scene=scene)
    segmentation_logic.prepare_segmentation(segmentation, volume)
    liver = np.zeros(SHAPE, bool)
    liver[1:3, 2:9, 2:8] = True
    segmentation_logic.write_mask(segmentation, segmentation_logic.ensure_segment(segmentation, LIVER), volume, liver)
    logic = module.LiverSAMLogic.__new__(module.LiverSAMLogic)
    logic.segmentation = segmentation_logic
    logic.connection = SimpleNamespace(settings=SimpleNamespace(python="", model="litemedsam"))
    return module, logic, segmentation, volume


@pytest.mark.parametrize(("chosen", "name", "said"), [
    ("labelmap .nii.gz", "liver.nrrd", "'liver.nrrd' does not end with .nii.gz or .nii, the format chosen \\(labelmap .nii.gz\\)"),
    ("labelmap .nrrd", "liver.nii.gz", "'liver.nii.gz' does not end with .nrrd, the format chosen \\(labelmap .nrrd\\)"),
    ("labelmap .nrrd", "liver.seg.nrrd", "'liver.seg.nrrd' is that of a Slicer segmentation .*choose the format .seg.nrrd, "
                                         "or name the file without .seg \\(for example 'liver.nrrd'\\)"),
    ("labelmap .nii.gz", "liver.seg.nrrd", "for example 'liver.nii.gz'"),
    ("labelmap .nrrd", "liver.NRRD", "'liver.NRRD' must end in lower case letters \\(.nrrd\\) for the format chosen"),
    ("labelmap .nii.gz", "liver.NII.GZ", "'liver.NII.GZ' must end in lower case letters \\(.nii.gz or .nii\\)"),
])  # fmt: skip
def test_a_file_name_of_another_format_is_refused_with_what_to_change(exported, tmp_path, chosen, name, said):
    """In plain words: a .seg.nrrd name does end with .nrrd, and .NRRD is .nrrd to the eye ("does not end with .nrrd"
    said neither what was wrong)."""
    _module, logic, segmentation, volume = exported
    with pytest.raises(OutputError, match=said):
        logic.export(segmentation, volume, str(tmp_path / name), chosen)
    assert list(tmp_path.iterdir()) == []  # nothing written in another format


@pytest.mark.parametrize(("chosen", "name", "gzipped"), [("labelmap .nii.gz", "liver.nii.gz", True),
                                                         ("labelmap .nii.gz", "liver.nii", False),
                                                         ("labelmap .nrrd", "liver.nrrd", False)])  # fmt: skip
def test_a_file_name_of_the_format_chosen_is_written(exported, tmp_path, chosen, name, gzipped):
    module, logic, segmentation, volume = exported
    assert module.exportFormatProblem(str(tmp_path / name), chosen) == ""
    written = logic.export(segmentation, volume, str(tmp_path / name), chosen)
    head = written.read_bytes()[:4]
    if name.endswith(".nrrd"):
        assert head == b"NRRD"
    else:
        assert (head[:2] == b"\x1f\x8b") == gzipped
        assert (gzip.decompress(written.read_bytes()) if gzipped else written.read_bytes())[344:348] == b"n+1\x00"
