"""The two icon buttons at the top left of each view, and the slice slider along a slice view's bottom.

trame-slicer's own gutter (``trame_slicer.app.ui.view_gutter``) names the buttons only in hover tooltips, "Reset
Camera" and "Show in 3D", with no accessible name; "Show in 3D" is a toggle, and the page shows every slice in the
3D view from the start, so a press hid it. Here each button says what it does, as a tooltip and as its
``aria-label``; the slider is trame-slicer's.
"""

from __future__ import annotations

from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer.app.logic.slice_view_logic import connect_slice_view_slider_to_state
from trame_slicer.app.ui.slider import Slider

RESET_SLICE = "Reset this view: the whole slice, fitted to the view"
RESET_3D = "Reset the 3D view's camera"
SLICE_IN_3D = "Show or hide this slice in the 3D view"
PROBE_VIEW = "data-probe-view"  # marks the view whose voxel the probe line names (the axial view)


def _button(icon: str, tip: str, click, testid: str) -> None:
    with v3.VBtn(size="medium", variant="text", click=click,
                 raw_attrs=[f'aria-label="{tip}"', f'data-testid="{testid}"']):
        v3.VIcon(icon=icon, size="medium", color="white")
        v3.VTooltip(tip, activator="parent", location="right", transition="slide-x-transition")


def _gutter(probe_view: bool = False):
    return html.Div(classes="view-gutter", style="position: absolute; top: 0; left: 0; background-color: transparent;",
                    raw_attrs=[PROBE_VIEW] if probe_view else [])


def threed_view_gutter(_server, _view_id: str, view) -> None:
    with _gutter(), html.Div(classes="view-gutter-content d-flex flex-column fill-height pa-2"):
        _button("mdi-camera-flip-outline", RESET_3D, view.reset_view, "view-reset")


def slice_view_gutter(server, _view_id: str, view) -> None:
    # the axial view, whose voxel probe the page clears when the mouse leaves it (app.py), is marked
    axial = getattr(getattr(view, "_view_properties", None), "orientation", None) == "Axial"
    with _gutter(axial), html.Div(classes="view-gutter-content d-flex flex-column fill-height pa-2"):
        _button("mdi-camera-flip-outline", RESET_SLICE, view.reset_view, "view-reset")
        _button("mdi-video-3d", SLICE_IN_3D, view.toggle_visible_in_3d, "view-in-3d")
    with html.Div(classes="slice-slider-gutter",
                  style="position: absolute; bottom: 0; left: 0; background-color: transparent; width: 100%;"):
        Slider(classes="slice-slider", typed_state=connect_slice_view_slider_to_state(server, view), theme="dark",
               dense=True)
