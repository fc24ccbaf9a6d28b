"""Prompt markups on slicer-core's real MRML: a second box after clearing, the view a box was drawn in,
placement ending (issue 12 items 4 and 10)."""

from __future__ import annotations

import numpy as np
import pytest

from slicer_harness import ensure_module_on_path, fresh_scene

ensure_module_on_path()

import slicer  # noqa: E402

from liversam.errors import PromptError  # noqa: E402
from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge, PromptPlacement  # noqa: E402

pytestmark = pytest.mark.slicer


@pytest.fixture
def volume():
    scene = fresh_scene()
    geometry = ImageGeometry((64, 64, 20), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0))
    node = MRMLBridge.volume_node_from_ct(CTVolume(np.zeros(geometry.shape_kji, np.int16), geometry), "ct", scene)
    return scene, node, MRMLBridge.geometry_from_volume_node(node)


def place_box(roi, geometry, corner_a_ijk, corner_b_ijk):
    """What a user's two clicks in a slice view do: two control points, each defined in turn, with the
    widget's PointPositionDefinedEvent handler (remember_first_corner) running after the first."""
    a, b = geometry.ijk_to_ras(np.array([corner_a_ijk, corner_b_ijk], dtype=float))
    roi.AddControlPoint(*a)
    MRMLBridge.remember_first_corner(roi)
    roi.AddControlPoint(*b)
    MRMLBridge.remember_first_corner(roi)  # (a no-op now: the ROI has collapsed to its centre point)


def test_a_reused_roi_gives_a_zero_size_second_box_but_a_new_node_works(volume):
    scene, _node, geometry = volume
    roi = PromptPlacement.new_box_node(scene)
    place_box(roi, geometry, (10, 12, 5), (30, 40, 5))
    first = MRMLBridge.box_from_roi(geometry, roi)
    assert (first.k, first.i0, first.j0, first.i1, first.j1) == (5, 10, 12, 30, 40)
    # Slicer's behaviour the module must avoid: after RemoveAllControlPoints the ROI accepts one point only.
    roi.RemoveAllControlPoints()
    assert roi.GetRequiredNumberOfControlPoints() == 1 and roi.GetMaximumNumberOfControlPoints() == 1
    corner = geometry.ijk_to_ras(np.array([[20.0, 20.0, 8.0]]))[0]
    roi.AddControlPoint(*corner)
    assert roi.AddControlPoint(*corner) < 0 and not np.any(np.asarray(roi.GetSize()) > 0)  # no second corner
    # The module's way: a new node for the next box.
    scene.RemoveNode(roi)
    second = PromptPlacement.new_box_node(scene)
    assert second.GetRequiredNumberOfControlPoints() == 2
    place_box(second, geometry, (20, 20, 8), (50, 44, 8))
    box = MRMLBridge.box_from_roi(geometry, second)
    assert (box.k, box.i0, box.j0, box.i1, box.j1) == (8, 20, 20, 50, 44)
    assert second.GetAttribute(PromptPlacement.PROMPT_ATTRIBUTE) == PromptPlacement.BOX
    assert PromptPlacement.box_nodes(scene) == [second]


def test_boxes_accumulate_until_cleared_and_a_box_drawn_over_another_replaces_it(volume):
    """A liver box and a fix box on another slice, or one box per lesion, are all prompts of one propagation (a
    new box used to delete the previous one, so a fix box dropped the seed's slice and the next Propagate started
    again from the fix alone). A box drawn over an earlier one on the same slice replaces it."""
    scene, _node, geometry = volume
    liver = PromptPlacement.new_box_node(scene)
    place_box(liver, geometry, (10, 10, 7), (50, 50, 7))
    fix = PromptPlacement.new_box_node(scene)
    place_box(fix, geometry, (12, 12, 15), (40, 40, 15))
    beside = PromptPlacement.new_box_node(scene)
    place_box(beside, geometry, (52, 52, 7), (60, 60, 7))  # a second lesion on the seed's slice
    boxes = PromptPlacement.box_nodes(scene)
    assert boxes == [liver, fix, beside]
    assert MRMLBridge.boxes_redrawn_by(geometry, beside, boxes) == []
    prompts = MRMLBridge.prompts_from_markups(geometry, roi_nodes=boxes)
    assert prompts.slices == [7, 15] and len(prompts.boxes) == 3
    again = PromptPlacement.new_box_node(scene)
    place_box(again, geometry, (8, 9, 7), (45, 52, 7))  # the liver's box drawn again
    assert MRMLBridge.boxes_redrawn_by(geometry, again, PromptPlacement.box_nodes(scene)) == [liver]
    touching = PromptPlacement.new_box_node(scene)
    place_box(touching, geometry, (44, 44, 7), (54, 54, 7))  # overlaps both a little: a third lesion between them
    assert MRMLBridge.boxes_redrawn_by(geometry, touching, PromptPlacement.box_nodes(scene)) == []
    PromptPlacement.remove_box_nodes(scene)
    assert PromptPlacement.box_nodes(scene) == [] and scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == 0


def test_a_half_drawn_box_is_no_prompt(volume):
    """While the user draws, the second corner follows the mouse as a preview point and the ROI already has a
    size from both corners; it must not be segmented (live update) before the second click."""
    scene, _node, geometry = volume
    roi = PromptPlacement.new_box_node(scene)
    a, b = geometry.ijk_to_ras(np.array([(10, 10, 7), (30, 25, 7)], dtype=float))
    roi.AddControlPoint(*a)
    MRMLBridge.remember_first_corner(roi)
    preview = roi.AddControlPoint(*a)
    roi.SetNthControlPointPositionWorld(preview, *b, roi.PositionPreview)
    assert np.all(np.asarray(roi.GetSize()) > 0)  # Slicer sizes it from the preview point too
    assert MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi]).slices == []
    roi.SetNthControlPointPositionWorld(preview, *b)  # the second click
    assert MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi]).slices == [7]


@pytest.mark.parametrize("corners, axis", [(((5, 10, 3), (5, 40, 15)), 0), (((8, 20, 2), (40, 20, 12)), 1)])
def test_a_box_drawn_in_a_sagittal_or_coronal_view_is_refused(volume, corners, axis):
    scene, _node, geometry = volume
    roi = PromptPlacement.new_box_node(scene)
    place_box(roi, geometry, *corners)
    assert MRMLBridge.box_drawn_axis(geometry, roi) == axis
    with pytest.raises(PromptError, match="axial"):
        MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi])


def test_an_axial_box_and_a_box_set_by_code_are_accepted(volume):
    scene, _node, geometry = volume
    roi = PromptPlacement.new_box_node(scene)
    place_box(roi, geometry, (10, 10, 7), (30, 25, 7))
    assert MRMLBridge.box_drawn_axis(geometry, roi) == 2
    assert MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi]).slices == [7]
    coded = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")  # e.g. the self-test: no drawing, no refusal
    centre = geometry.ijk_to_ras(np.array([[20.0, 20.0, 4.0]]))[0]
    coded.SetCenterWorld(*centre)
    coded.SetSizeWorld(10.0, 10.0, 1.0)
    assert MRMLBridge.box_drawn_axis(geometry, coded) is None
    assert MRMLBridge.prompts_from_markups(geometry, roi_nodes=[coded]).slices == [4]


def test_placement_mode_starts_for_the_prompt_node_and_its_end_is_seen(volume):
    scene, _node, _geometry = volume
    interaction = scene.AddNewNodeByClass("vtkMRMLInteractionNode")
    selection = scene.AddNewNodeByClass("vtkMRMLSelectionNode")
    points = PromptPlacement.new_prompt_node(scene, PromptPlacement.POSITIVE)
    events = []
    interaction.AddObserver(interaction.InteractionModeChangedEvent, lambda *_: events.append(PromptPlacement.placing(interaction)))
    PromptPlacement.start_placing(selection, interaction, points, persistent=True)
    assert PromptPlacement.placing(interaction) and selection.GetActivePlaceNodeID() == points.GetID()
    assert interaction.GetPlaceModePersistence() == 1
    # Slicer ends a one-time placement by switching to ViewTransform (vtkSlicerMarkupsWidget::PlacePoint):
    interaction.SetCurrentInteractionMode(interaction.ViewTransform)
    assert events == [True, False]  # the widget unchecks its buttons on the second event
    assert not PromptPlacement.placing(interaction)
    display = points.GetMarkupsDisplayNode()
    assert tuple(display.GetSelectedColor()) == pytest.approx(PromptPlacement.COLORS[PromptPlacement.POSITIVE])
    assert slicer.vtkMRMLMarkupsFiducialNode.SafeDownCast(points) is not None


def test_prompts_belong_to_the_segment_they_were_placed_for(volume):
    """The liver's box stayed a prompt of every segment: going on to the tumour sent it again and wrote the liver's
    outline into the tumour. Each prompt node now carries its segment; untagged ones go to the first segment they
    were used for."""
    scene, _node, _geometry = volume
    early = PromptPlacement.new_box_node(scene)  # placed before any segment was chosen
    points = PromptPlacement.new_prompt_node(scene, PromptPlacement.POSITIVE)
    assert PromptPlacement.box_nodes(scene, "liver") == [early] == PromptPlacement.box_nodes(scene, "tumor")
    PromptPlacement.adopt(scene, "liver")  # the target changes from liver: the untagged prompts were the liver's
    lesion = PromptPlacement.new_box_node(scene, "tumor")
    assert PromptPlacement.box_nodes(scene, "liver") == [early]
    assert PromptPlacement.box_nodes(scene, "tumor") == [lesion]
    assert PromptPlacement.box_nodes(scene, every=True) == [early, lesion]
    assert PromptPlacement.point_node(scene, PromptPlacement.POSITIVE, "liver") is points
    assert PromptPlacement.point_node(scene, PromptPlacement.POSITIVE, "tumor") is None
    PromptPlacement.show_prompts_of(scene, "tumor")
    assert [n.GetDisplayNode().GetVisibility() for n in (early, points, lesion)] == [0, 0, 1]
    PromptPlacement.show_prompts_of(scene, "liver")
    assert [n.GetDisplayNode().GetVisibility() for n in (early, points, lesion)] == [1, 1, 0]
    PromptPlacement.remove_box_nodes(scene, "tumor")  # Clear prompts with the tumour as target
    assert PromptPlacement.box_nodes(scene, every=True) == [early]
