"""The widget's slice-view helpers on Slicer's real slice nodes: which slice the Red view shows, jumping to a slice
(review table) and to a lesion (lesion table).

Slicer's layout manager and slice widgets need the application; the geometry they stand on does not: the Red, Yellow
and Green ``vtkMRMLSliceNode`` (made by slicer-core's ``vtkMRMLSliceLogic.AddSliceNode``, with Slicer's orientation
presets), their ``SliceToRAS`` and the markups logic's ``JumpSlicesToLocation`` (``vtkMRMLSliceNode::JumpAllSlices``)
are Slicer's own code. The layout manager is a stand-in that hands out the Red node, as
``slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()`` does. Checked on a real CT slab (lits117) stored
axially, as sagittal slices and as coronal slices.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from test_slicer_reoriented_ct import lits117_slab, stored_as
from test_slicer_widget_state import widgets  # noqa: F401  (the fixture)

from slicer_harness import ensure_module_on_path, fresh_scene

ensure_module_on_path()

from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge  # noqa: E402

pytestmark = pytest.mark.slicer


@pytest.fixture(scope="module")
def slab():
    return lits117_slab()[0]


@pytest.fixture
def views(widgets, monkeypatch):  # noqa: F811
    """(LiverSAM module, {"Red": node, "Yellow": node, "Green": node}) in a fresh scene; the layout manager stand-in
    gives the Red node."""
    import slicer

    module, _train = widgets
    scene = fresh_scene()
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(scene)
    nodes = {}
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        nodes[name] = logic.AddSliceNode(name)
        nodes[name].SetOrientation(orientation)
    widget_of = {name: SimpleNamespace(mrmlSliceNode=lambda node=node: node) for name, node in nodes.items()}
    layout = SimpleNamespace(sliceWidget=lambda name: widget_of.get(name))
    monkeypatch.setattr(module.slicer, "app", SimpleNamespace(layoutManager=lambda: layout), raising=False)
    yield module, nodes, scene
    for node in nodes.values():
        scene.RemoveNode(node)
    logic.SetMRMLScene(None)


def shown_position(node) -> np.ndarray:
    """The RAS point at the view's centre."""
    m = node.GetSliceToRAS()
    return np.array([m.GetElement(r, 3) for r in range(3)])


@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal"])
def test_jumping_to_a_slice_shows_it_in_the_red_view_and_the_red_view_says_which(views, slab, plane):
    module, nodes, scene = views
    ct = slab if plane == "axial" else stored_as(slab, plane)
    volume = MRMLBridge.volume_node_from_ct(ct, "ct", scene)
    geometry = MRMLBridge.geometry_from_volume_node(volume)  # the working (axial) grid
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    for k in range(geometry.size_ijk[2]):
        widget._jumpToSlice(volume, k)  # a review row clicked
        centre = geometry.ijk_to_ras(np.array([[0.0, 0.0, k]]))[0]
        assert shown_position(nodes["Red"])[2] == pytest.approx(centre[2]), "Red is not on the slice"
        assert widget._currentSliceK(volume) == k
        # the other views cross it in its middle (a centred jump; within a voxel)
        middle = MRMLBridge.slice_centre_ras(geometry, k)
        assert abs(shown_position(nodes["Yellow"])[0] - middle[0]) <= max(geometry.spacing_mm)
        assert abs(shown_position(nodes["Green"])[1] - middle[1]) <= max(geometry.spacing_mm)


def test_a_red_view_turned_across_the_slices_names_no_slice(views, slab):
    """Red turned to sagittal or coronal: its centre used to be taken for the slice the user works on, and the server
    pre-encoded the slices around it; now the last prompted slice is used (ServerSegmentation.predict_slices_work)."""
    module, nodes, scene = views
    volume = MRMLBridge.volume_node_from_ct(stored_as(slab, "sagittal"), "ct", scene)
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    widget._jumpToSlice(volume, 2)
    assert widget._currentSliceK(volume) == 2
    for orientation in ("Sagittal", "Coronal"):
        nodes["Red"].SetOrientation(orientation)
        assert widget._currentSliceK(volume) is None, orientation
    nodes["Red"].SetOrientation("Axial")
    assert widget._currentSliceK(volume) == 2
    nodes["Red"].JumpSlice(0.0, 0.0, 1e4)  # far above the CT
    assert widget._currentSliceK(volume) is None


def test_an_axial_view_is_not_taken_for_the_slices_of_an_oblique_ct(views):
    """A CT whose slices lean 40 degrees keeps its own slices (not reoriented): an axial view cuts across them."""
    module, nodes, scene = views
    angle = np.radians(40.0)
    rotation = np.array([[np.cos(angle), 0.0, np.sin(angle)], [0.0, 1.0, 0.0], [-np.sin(angle), 0.0, np.cos(angle)]])
    ct = CTVolume(np.zeros((6, 20, 20), np.int16), ImageGeometry((20, 20, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), rotation))
    volume = MRMLBridge.volume_node_from_ct(ct, "oblique", scene)
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    widget._jumpToSlice(volume, 3)
    assert widget._currentSliceK(volume) is None
    # the view turned onto the CT's slices (Slicer's "Rotate to volume plane"): its slice again
    slice_to_ras = np.eye(4)
    slice_to_ras[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation
    slice_to_ras[:3, 3] = MRMLBridge.slice_centre_ras(MRMLBridge.geometry_from_volume_node(volume), 3)
    assert MRMLBridge.slice_shown_in_view(MRMLBridge.geometry_from_volume_node(volume), slice_to_ras) == 3


def test_clicking_a_lesion_row_shows_the_lesions_centre(views, slab):
    module, nodes, scene = views
    volume = MRMLBridge.volume_node_from_ct(stored_as(slab, "coronal"), "ct", scene)
    geometry = MRMLBridge.geometry_from_volume_node(volume)
    centre_ijk = np.array([[40.0, 70.0, 5.0]])
    centre_lps = geometry.ijk_to_lps(centre_ijk)[0]
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    widget._lesions = [SimpleNamespace(centre_lps=tuple(centre_lps))]
    widget.onLesionRowClicked(0, 0)
    assert np.allclose(shown_position(nodes["Red"]), geometry.ijk_to_ras(centre_ijk)[0])
    assert widget._currentSliceK(volume) == 5


def review_of(volume) -> dict:
    """A review report with one row on working slices 2-3 of ``volume``."""
    return {"items": [{"segment": "liver", "first_slice": 2, "last_slice": 3, "slices": "2-3",
                       "reason": "check slices 2-3"}], "segments": []}  # fmt: skip


def test_a_review_row_jumps_to_the_slice_of_the_ct_the_review_was_made_on(views, slab, monkeypatch):
    """The review table is the propagated CT's: with another CT chosen as input since, a row clicked used to jump to
    that row's slice number on the other CT (its grid, elsewhere in the patient); and with the propagated CT removed,
    on whatever CT was the input."""
    module, nodes, scene = views
    monkeypatch.setattr(module.slicer, "mrmlScene", scene, raising=False)
    propagated = MRMLBridge.volume_node_from_ct(slab, "propagated", scene)
    geometry = slab.geometry
    other_ct = CTVolume(np.zeros((40, 20, 20), np.int16), ImageGeometry(
        (20, 20, 40), (1.0, 1.0, 1.0), tuple(np.asarray(geometry.origin_lps) + (0.0, 0.0, 200.0)), np.eye(3)))
    other = MRMLBridge.volume_node_from_ct(other_ct, "other", scene)
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    widget.ui = SimpleNamespace(reviewTable=SimpleNamespace(clear=lambda: None, setColumnCount=lambda n: None,
                                                            setHorizontalHeaderLabels=lambda labels: None,
                                                            horizontalHeaderItem=lambda c: SimpleNamespace(
                                                                setToolTip=lambda tip: None),
                                                            setRowCount=lambda n: None, setItem=lambda r, c, i: None),
                                reviewLabel=SimpleNamespace(text="", toolTip=""), statusLabel=SimpleNamespace(text=""),
                                reviewCollapsibleButton=SimpleNamespace(collapsed=True))  # fmt: skip
    monkeypatch.setattr(module.qt, "QTableWidgetItem", lambda text: SimpleNamespace(setToolTip=lambda tip: None),
                        raising=False)  # fmt: skip
    widget._fillReviewTable(review_of(propagated), MRMLBridge.slice_numbering(propagated), propagated)
    widget._parameterNode = SimpleNamespace(inputVolume=other)  # another CT chosen as input after the propagation
    widget.onReviewRowClicked(0, 0)
    assert widget._currentSliceK(propagated) == 2, "the Red view is not on the propagated CT's slice 2"
    nodes["Red"].JumpSlice(0.0, 0.0, 1e4)
    scene.RemoveNode(propagated)
    widget.onReviewRowClicked(0, 0)  # its CT is gone: no jump (onto the other CT's slice 2), and it says why
    assert shown_position(nodes["Red"])[2] == pytest.approx(1e4)
    assert "no longer in the scene" in widget.ui.statusLabel.text
