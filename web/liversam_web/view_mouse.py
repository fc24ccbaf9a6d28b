"""The mouse in the slice views outside the axial view's prompting (``slice_prompting``).

- Window/level drag: Slicer's slice views change the window/level on a left drag only in its "Adjust window/level"
  mouse mode (``vtkMRMLWindowLevelWidget`` takes the drag there; in "View transform", the default, a left drag
  does nothing). Browse mode turns that mouse mode on, the prompt modes turn it off (``set_window_level_drag``).
- The coronal and sagittal views take no prompts: a drag or click there in a prompt mode is reported
  (``OffAxialGestures``), so that it is not dropped without a word.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from slicer import vtkMRMLInteractionNode
from vtkmodules.vtkCommonCore import vtkCommand

logger = logging.getLogger("liversam_web.prompting")

INTERACTION_NODE_ID = "vtkMRMLInteractionNodeSingleton"
VIEW_LABELS = {"Red": "axial (red)", "Green": "coronal (green)", "Yellow": "sagittal (yellow)"}


def set_window_level_drag(scene, on: bool) -> None:
    """A left drag in the slice views adjusts the window/level (on) or does nothing (off)."""
    node = scene.GetNodeByID(INTERACTION_NODE_ID)
    if node is None:
        return
    mode = vtkMRMLInteractionNode.AdjustWindowLevel if on else vtkMRMLInteractionNode.ViewTransform
    if node.GetCurrentInteractionMode() != mode:
        node.SetCurrentInteractionMode(mode)


class OffAxialGestures:
    """A left press and release in a slice view that takes no prompts (coronal, sagittal): in a prompt mode
    (``mode`` other than "navigate"), ``on_gesture(view_label)`` is called once per release."""

    def __init__(self, view, on_gesture: Callable[[str], None]) -> None:
        self.view = view
        self.label = VIEW_LABELS.get(getattr(view, "name", ""), f"{getattr(view, 'name', 'this')} view")
        self.on_gesture = on_gesture
        self.mode = "navigate"
        self._pressed = False
        interactor = view.interactor()
        self._ids = [interactor.AddObserver(vtkCommand.LeftButtonPressEvent, self._on_press),
                     interactor.AddObserver(vtkCommand.LeftButtonReleaseEvent, self._on_release)]

    def _on_press(self, *_args) -> None:
        self._pressed = True

    def _on_release(self, *_args) -> None:
        if not self._pressed:
            return
        self._pressed = False
        if self.mode != "navigate":
            logger.debug("press and release in the %s view (mode %s): no prompt there", self.label, self.mode)
            self.on_gesture(self.label)
