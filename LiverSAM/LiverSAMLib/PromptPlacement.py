"""The markups nodes that hold LiverSAM's prompts, and placing them in the slice views (MRML only, no Qt).

- Every new box is a *new* ROI node, and the boxes placed before it stay (a liver box and a fix box on another
  slice, or one box per lesion, are prompts of the same propagation) until *Clear prompts* removes them all
  (:func:`box_nodes`, :func:`remove_box_nodes`). A ROI node that has been placed once could not take a second box
  anyway: it keeps ``RequiredNumberOfControlPoints = MaximumNumberOfControlPoints = 1`` after
  ``RemoveAllControlPoints()`` (``vtkMRMLMarkupsROINode::UpdateBoxROIFromControlPoints`` returns early for zero
  points, before it resets them to 2).
- Placement ends when Slicer leaves place mode (``vtkSlicerMarkupsWidget::PlacePoint`` switches the
  interaction node to ViewTransform after a one-time placement); the widget observes the interaction
  node's ``InteractionModeChangedEvent`` and unchecks its prompt buttons when :func:`placing` is False.
"""

from __future__ import annotations

import slicer

PROMPT_ATTRIBUTE = "LiverSAM.Prompt"
POSITIVE, NEGATIVE, BOX = "positive", "negative", "box"
COLORS = {POSITIVE: (0.2, 0.9, 0.2), NEGATIVE: (0.95, 0.2, 0.2), BOX: (1.0, 0.85, 0.1)}
NODE_CLASSES = {POSITIVE: "vtkMRMLMarkupsFiducialNode", NEGATIVE: "vtkMRMLMarkupsFiducialNode",
                BOX: "vtkMRMLMarkupsROINode"}  # fmt: skip


def new_prompt_node(scene: slicer.vtkMRMLScene, kind: str) -> slicer.vtkMRMLMarkupsNode:
    """A new markups node for a prompt kind, marked with :data:`PROMPT_ATTRIBUTE` and coloured."""
    node: slicer.vtkMRMLMarkupsNode = scene.AddNewNodeByClass(NODE_CLASSES[kind], scene.GenerateUniqueName(f"LiverSAM {kind}"))
    node.SetAttribute(PROMPT_ATTRIBUTE, kind)
    node.CreateDefaultDisplayNodes()
    display = node.GetMarkupsDisplayNode()
    display.SetSelectedColor(*COLORS[kind])
    display.SetPointLabelsVisibility(False)
    return node


def new_box_node(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLMarkupsROINode:
    """A fresh ROI node for the next box (the boxes placed before it stay)."""
    return new_prompt_node(scene, BOX)


def box_nodes(scene: slicer.vtkMRMLScene) -> list[slicer.vtkMRMLMarkupsROINode]:
    """Every LiverSAM box in the scene (ROI nodes marked with :data:`PROMPT_ATTRIBUTE` = box), oldest first."""
    nodes = scene.GetNodesByClass("vtkMRMLMarkupsROINode")
    nodes.UnRegister(scene)  # the caller owns the collection (vtkMRMLScene.h), as slicer.util.getNodesByClass does
    found = [nodes.GetItemAsObject(n) for n in range(nodes.GetNumberOfItems())]
    return [node for node in found if node.GetAttribute(PROMPT_ATTRIBUTE) == BOX]


def remove_box_nodes(scene: slicer.vtkMRMLScene) -> None:
    """Remove every LiverSAM box from the scene (*Clear prompts*)."""
    for node in box_nodes(scene):
        scene.RemoveNode(node)


def start_placing(
    selection_node: slicer.vtkMRMLSelectionNode,
    interaction_node: slicer.vtkMRMLInteractionNode,
    node: slicer.vtkMRMLMarkupsNode,
    persistent: bool,
) -> None:
    """Put the views in place mode for ``node`` (points: many clicks; a box: one placement)."""
    selection_node.SetReferenceActivePlaceNodeClassName(node.GetClassName())
    selection_node.SetActivePlaceNodeID(node.GetID())
    interaction_node.SetPlaceModePersistence(1 if persistent else 0)
    interaction_node.SetCurrentInteractionMode(interaction_node.Place)


def stop_placing(interaction_node: slicer.vtkMRMLInteractionNode) -> None:
    if placing(interaction_node):
        interaction_node.SetCurrentInteractionMode(interaction_node.ViewTransform)


def placing(interaction_node: slicer.vtkMRMLInteractionNode | None) -> bool:
    """True while the views are in place mode."""
    return interaction_node is not None and interaction_node.GetCurrentInteractionMode() == interaction_node.Place
