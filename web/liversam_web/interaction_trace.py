"""Tracing of the mouse events the page sends to the views (``LIVERSAM_WEB_TRACE=1``; for finding lost clicks).

trame-rca hands each event from the browser to ``RcaViewAdapter.on_interaction``; a release without a press is
dropped there. This wraps that method to log every event except mouse moves (area, type, and whether it was
dropped), and the clients that connect and leave.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("liversam_web.events")


def trace_interaction_events() -> None:
    from trame_rca.view_adapter import RcaViewAdapter

    if getattr(RcaViewAdapter.on_interaction, "_liversam_traced", False):
        return
    original = RcaViewAdapter.on_interaction

    def on_interaction(self, origin, event):
        kind = event.get("type", "?")
        if kind != "MouseMove":
            dropped = kind.endswith("Release") and kind.replace("Release", "Press") not in self._press_set
            logger.debug("view %s: %s at (%s, %s)%s", getattr(self, "area_name", "?"), kind, event.get("x"),
                         event.get("y"), " (dropped: no press)" if dropped else "")
        return original(self, origin, event)

    on_interaction._liversam_traced = True
    RcaViewAdapter.on_interaction = on_interaction


def trace_clients(ctrl) -> None:
    """Log the pages that connect to the app and leave it."""
    ctrl.on_client_connected.add(lambda *args, **kwargs: logger.debug("a page connected"))
    ctrl.on_client_exited.add(lambda *args, **kwargs: logger.debug("a page left"))
