"""Mouse prompting in a trame-slicer slice view: drag a box, click points, probe the voxel under the mouse.

Slicer's own ROI placement is click, move, click; a press-drag-release there gives a zero-size ROI. Here a
prompt mode takes the view's mouse over: Slicer's slice interactor style is detached (so a drag does not
change the window/level) and this class turns press / move / release into a rubber-band box drawn on the
view's overlay, then hands the two RAS corners to ``on_box``. A press-release without movement is a click
(``on_point``). A gesture that makes no prompt (a click or a drag of at most ``CLICK_TOLERANCE_PX`` in the box
mode, a point click whose mouse moved further) goes to ``on_ignored`` with what it was and how far the mouse moved.
The mouse wheel still scrolls slices. ``navigate`` mode gives the view back to Slicer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
from vtkmodules.vtkCommonCore import vtkCommand, vtkPoints
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData
from vtkmodules.vtkRenderingCore import vtkActor2D, vtkCoordinate, vtkPolyDataMapper2D

Mode = Literal["navigate", "box", "point+", "point-"]
MODES: tuple[Mode, ...] = ("navigate", "box", "point+", "point-")
CLICK_TOLERANCE_PX = 3
LEFT_GRACE_S = 0.25  # mouse moves arriving this soon after the mouse left the view were sent before it left
logger = logging.getLogger("liversam_web.prompting")


class SlicePrompting:
    """Attach to one ``trame_slicer.views.SliceView`` (the axial view)."""

    def __init__(
        self,
        view,
        on_box: Callable[[np.ndarray, np.ndarray], None],
        on_point: Callable[[np.ndarray, bool], None],
        on_probe: Callable[[np.ndarray], None] | None = None,
        on_ignored: Callable[[str, int], None] | None = None,
    ) -> None:
        self.view = view
        self.on_box = on_box
        self.on_point = on_point
        self.on_probe = on_probe
        self.on_ignored = on_ignored  # ("box-click" | "point-moved", pixels the mouse moved)
        self.mode: Mode = "navigate"
        self._press_xy: tuple[int, int] | None = None
        self._current_xy: tuple[int, int] | None = None
        self._probe_xy: tuple[int, int] | None = None  # where the mouse last moved in the view
        self._left_at = -math.inf  # when the page said the mouse left the view (time.monotonic)
        self._observer_ids: list[int] = []
        self._band = _RubberBand()
        view.first_renderer().AddViewProp(self._band.actor)
        interactor = view.interactor()
        self._probe_id = interactor.AddObserver(vtkCommand.MouseMoveEvent, self._on_probe_move, 10.0)

    # --- mode ------------------------------------------------------------------------------------------
    def set_mode(self, mode: Mode) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown prompt mode {mode!r}; one of {MODES}")
        if mode == self.mode:
            return
        prompting_before = self.mode != "navigate"
        self.mode = mode
        self._cancel_drag()
        if mode != "navigate" and not prompting_before:
            self._take_mouse()
        elif mode == "navigate" and prompting_before:
            self._give_back_mouse()

    def _style(self):
        return self.view._interactor_observer  # trame-slicer's vtkMRMLSliceViewInteractorStyle of the view

    def _take_mouse(self) -> None:
        logger.debug("prompting takes the mouse of the view (mode %s)", self.mode)
        interactor = self.view.interactor()
        self._style().SetInteractor(None)
        for event, handler in (
            (vtkCommand.LeftButtonPressEvent, self._on_press),
            (vtkCommand.MouseMoveEvent, self._on_move),
            (vtkCommand.LeftButtonReleaseEvent, self._on_release),
            (vtkCommand.MouseWheelForwardEvent, self._on_wheel_forward),
            (vtkCommand.MouseWheelBackwardEvent, self._on_wheel_backward),
        ):
            self._observer_ids.append(interactor.AddObserver(event, handler))

    def _give_back_mouse(self) -> None:
        logger.debug("prompting gives the mouse back to Slicer's interactor style")
        interactor = self.view.interactor()
        for observer_id in self._observer_ids:
            interactor.RemoveObserver(observer_id)
        self._observer_ids = []
        self._style().SetInteractor(interactor)

    # --- geometry --------------------------------------------------------------------------------------
    def display_to_ras(self, xy: tuple[int, int]) -> np.ndarray:
        """RAS of a display position (pixels, origin bottom-left) in this slice view."""
        xy_to_ras = self.view.get_view_node().GetXYToRAS()
        return np.array(xy_to_ras.MultiplyPoint((float(xy[0]), float(xy[1]), 0.0, 1.0))[:3])

    def _event_xy(self) -> tuple[int, int]:
        x, y = self.view.interactor().GetEventPosition()
        return int(x), int(y)

    # --- events ----------------------------------------------------------------------------------------
    def _on_probe_move(self, *_args) -> None:
        if time.monotonic() - self._left_at < LEFT_GRACE_S:
            return  # a move the page sent before the mouse left (its events are throttled)
        self._probe_xy = self._event_xy()
        if self.on_probe is not None:
            self.on_probe(self.display_to_ras(self._probe_xy))

    def probe_again(self) -> None:
        """The probe at the mouse's last place in the view, on the slice the view shows now: a wheel scroll (or a
        jump to a slice) moves no mouse, and the probe kept naming the slice before until the mouse moved."""
        if self.on_probe is not None and self._probe_xy is not None:
            self.on_probe(self.display_to_ras(self._probe_xy))

    def forget_probe(self) -> None:
        """No probe until the mouse moves in the view again (another CT is shown)."""
        self._probe_xy = None

    def mouse_left(self) -> None:
        """The mouse left the view: no probe until it moves in the view again, and none from a move that was sent
        before it left and arrives in the next ``LEFT_GRACE_S``."""
        self._probe_xy = None
        self._left_at = time.monotonic()

    def _on_press(self, *_args) -> None:
        self._press_xy = self._current_xy = self._event_xy()
        logger.debug("press at %s (mode %s)", self._press_xy, self.mode)

    def _on_move(self, *_args) -> None:
        if self._press_xy is None or self.mode != "box":
            return
        self._current_xy = self._event_xy()
        self._band.show(self._press_xy, self._current_xy)
        self.view.schedule_render()

    def _on_release(self, *_args) -> None:
        if self._press_xy is None:
            logger.debug("release at %s without a press (mode %s): ignored", self._event_xy(), self.mode)
            return
        start, end = self._press_xy, self._event_xy()
        logger.debug("release at %s after a press at %s (mode %s)", end, start, self.mode)
        self._cancel_drag()
        distance = max(abs(start[0] - end[0]), abs(start[1] - end[1]))
        moved = distance > CLICK_TOLERANCE_PX
        if self.mode == "box":
            if moved:
                self.on_box(self.display_to_ras(start), self.display_to_ras(end))
            else:
                self._ignored("box-click", distance)
        elif self.mode in ("point+", "point-"):
            if not moved:
                self.on_point(self.display_to_ras(end), self.mode == "point+")
            else:
                self._ignored("point-moved", distance)

    def _ignored(self, what: str, distance: int) -> None:
        logger.debug("%s: the mouse moved %d px (mode %s): no prompt", what, distance, self.mode)
        if self.on_ignored is not None:
            self.on_ignored(what, distance)

    def _cancel_drag(self) -> None:
        self._press_xy = self._current_xy = None
        if self._band.visible():
            self._band.hide()
            self.view.schedule_render()

    def _on_wheel_forward(self, *_args) -> None:
        self._scroll(+1)

    def _on_wheel_backward(self, *_args) -> None:
        self._scroll(-1)

    def _scroll(self, steps: int) -> None:
        low, high = self.view.get_slice_range()
        value = self.view.get_slice_value() + steps * self.view.get_slice_step()
        self.view.set_slice_value(float(np.clip(value, low, high)))


class _RubberBand:
    """A yellow rectangle in display coordinates, drawn while a box is dragged."""

    def __init__(self) -> None:
        self.points = vtkPoints()
        self.points.SetNumberOfPoints(4)
        lines = vtkCellArray()
        lines.InsertNextCell(5)
        for index in (0, 1, 2, 3, 0):
            lines.InsertCellPoint(index)
        self.polydata = vtkPolyData()
        self.polydata.SetPoints(self.points)
        self.polydata.SetLines(lines)
        mapper = vtkPolyDataMapper2D()
        mapper.SetInputData(self.polydata)
        coordinate = vtkCoordinate()
        coordinate.SetCoordinateSystemToDisplay()
        mapper.SetTransformCoordinate(coordinate)
        self.actor = vtkActor2D()
        self.actor.SetMapper(mapper)
        self.actor.GetProperty().SetColor(1.0, 0.85, 0.1)
        self.actor.GetProperty().SetLineWidth(2)
        self.actor.VisibilityOff()

    def show(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        for index, (x, y) in enumerate(((a[0], a[1]), (b[0], a[1]), (b[0], b[1]), (a[0], b[1]))):
            self.points.SetPoint(index, float(x), float(y), 0.0)
        self.points.Modified()
        self.actor.VisibilityOn()

    def hide(self) -> None:
        self.actor.VisibilityOff()

    def visible(self) -> bool:
        return bool(self.actor.GetVisibility())
