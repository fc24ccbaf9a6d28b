"""The markups nodes that hold LiverSAM's prompts, and placing them in the slice views (MRML only, no Qt).

- Every new box is a *new* ROI node, and the boxes placed before it stay (a liver box and a fix box on another
  slice, or one box per lesion, are prompts of the same propagation) until *Clear prompts* removes them all
  (:func:`box_nodes`, :func:`remove_box_nodes`). A ROI node that has been placed once could not take a second box
  anyway: it keeps ``RequiredNumberOfControlPoints = MaximumNumberOfControlPoints = 1`` after
  ``RemoveAllControlPoints()`` (``vtkMRMLMarkupsROINode::UpdateBoxROIFromControlPoints`` returns early for zero
  points, before it resets them to 2).
- Prompts belong to the segment they were placed for (:data:`SEGMENT_ATTRIBUTE`): the liver's box must not be sent
  again when the user goes on to the tumour (it wrote the liver's outline into the tumour). Switching the target
  segment shows that segment's prompts only (:func:`show_prompts_of`); prompts placed before any segment was chosen
  belong to the first one they were used for (:func:`adopt`).
- Placement ends when Slicer leaves place mode (``vtkSlicerMarkupsWidget::PlacePoint`` switches the
  interaction node to ViewTransform after a one-time placement); the widget observes the interaction
  node's ``InteractionModeChangedEvent`` and unchecks its prompt buttons when :func:`placing` is False.
"""

from __future__ import annotations

import slicer

PROMPT_ATTRIBUTE = "LiverSAM.Prompt"
SEGMENT_ATTRIBUTE = "LiverSAM.Segment"  # the ID of the segment a prompt node was placed for (none: not yet known)
POSITIVE, NEGATIVE, BOX = "positive", "negative", "box"
COLORS = {POSITIVE: (0.2, 0.9, 0.2), NEGATIVE: (0.95, 0.2, 0.2), BOX: (1.0, 0.85, 0.1)}
NODE_CLASSES = {POSITIVE: "vtkMRMLMarkupsFiducialNode", NEGATIVE: "vtkMRMLMarkupsFiducialNode",
                BOX: "vtkMRMLMarkupsROINode"}  # fmt: skip


def new_prompt_node(
    scene: slicer.vtkMRMLScene, kind: str, segment_id: str | None = None
) -> slicer.vtkMRMLMarkupsNode:
    """A new markups node for a prompt kind, marked with :data:`PROMPT_ATTRIBUTE` (and the segment it is placed for,
    when known) and coloured."""
    node: slicer.vtkMRMLMarkupsNode = scene.AddNewNodeByClass(NODE_CLASSES[kind], scene.GenerateUniqueName(f"LiverSAM {kind}"))
    node.SetAttribute(PROMPT_ATTRIBUTE, kind)
    if segment_id:
        node.SetAttribute(SEGMENT_ATTRIBUTE, segment_id)
    node.CreateDefaultDisplayNodes()
    display = node.GetMarkupsDisplayNode()
    display.SetSelectedColor(*COLORS[kind])
    display.SetPointLabelsVisibility(False)
    return node


def new_box_node(scene: slicer.vtkMRMLScene, segment_id: str | None = None) -> slicer.vtkMRMLMarkupsROINode:
    """A fresh ROI node for the next box (the boxes placed before it stay)."""
    return new_prompt_node(scene, BOX, segment_id)


def _prompt_nodes(scene: slicer.vtkMRMLScene, class_name: str) -> list[slicer.vtkMRMLMarkupsNode]:
    nodes = scene.GetNodesByClass(class_name)
    nodes.UnRegister(scene)  # the caller owns the collection (vtkMRMLScene.h), as slicer.util.getNodesByClass does
    found = [nodes.GetItemAsObject(n) for n in range(nodes.GetNumberOfItems())]
    return [node for node in found if node.GetAttribute(PROMPT_ATTRIBUTE) in (POSITIVE, NEGATIVE, BOX)]


def prompt_segment(node: slicer.vtkMRMLNode) -> str | None:
    """The ID of the segment ``node``'s prompts were placed for; None when not known (placed before any segment was
    chosen, or by an older LiverSAM)."""
    return node.GetAttribute(SEGMENT_ATTRIBUTE) or None


def belongs_to(node: slicer.vtkMRMLNode, segment_id: str | None) -> bool:
    """True when ``node`` holds prompts of ``segment_id`` (or of no known segment yet)."""
    return prompt_segment(node) in (None, segment_id or None)


def box_nodes(
    scene: slicer.vtkMRMLScene, segment_id: str | None = None, every: bool = False
) -> list[slicer.vtkMRMLMarkupsROINode]:
    """The LiverSAM boxes of segment ``segment_id`` (and those of no known segment), oldest first; with ``every``,
    all of them (ROI nodes marked with :data:`PROMPT_ATTRIBUTE` = box)."""
    boxes = [n for n in _prompt_nodes(scene, "vtkMRMLMarkupsROINode") if n.GetAttribute(PROMPT_ATTRIBUTE) == BOX]
    return boxes if every else [n for n in boxes if belongs_to(n, segment_id)]


def point_node(
    scene: slicer.vtkMRMLScene, kind: str, segment_id: str | None
) -> slicer.vtkMRMLMarkupsFiducialNode | None:
    """The point list of ``kind`` (positive / negative) placed for ``segment_id``, or None."""
    for node in _prompt_nodes(scene, "vtkMRMLMarkupsFiducialNode"):
        if node.GetAttribute(PROMPT_ATTRIBUTE) == kind and prompt_segment(node) == (segment_id or None):
            return node
    return None


def adopt(scene: slicer.vtkMRMLScene, segment_id: str) -> None:
    """Prompts of no known segment become ``segment_id``'s (the segment they were used for)."""
    for class_name in ("vtkMRMLMarkupsROINode", "vtkMRMLMarkupsFiducialNode"):
        for node in _prompt_nodes(scene, class_name):
            if prompt_segment(node) is None:
                node.SetAttribute(SEGMENT_ATTRIBUTE, segment_id)


def show_prompts_of(scene: slicer.vtkMRMLScene, segment_id: str | None) -> None:
    """Show the prompts of ``segment_id`` (and of no known segment) in the views; hide the other segments'."""
    for class_name in ("vtkMRMLMarkupsROINode", "vtkMRMLMarkupsFiducialNode"):
        for node in _prompt_nodes(scene, class_name):
            display = node.GetDisplayNode()
            if display is not None:
                display.SetVisibility(belongs_to(node, segment_id))


def remove_box_nodes(scene: slicer.vtkMRMLScene, segment_id: str | None = None, every: bool = False) -> None:
    """Remove the boxes of ``segment_id`` (*Clear prompts*), or with ``every`` all of LiverSAM's boxes."""
    for node in box_nodes(scene, segment_id, every):
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
