"""The oldest 3D Slicer LiverSAM supports, and the check the modules run before they build their GUI.

Slicer 5.10.0 is the minimum (checked against Slicer's source at tag v5.10.0):

- writes go through ``vtkSlicerSegmentEditorLogic`` (``Modules/Loadable/Segmentations/Logic``), which
  first appears in 5.10 (5.8.1 has no such class: its Segment Editor logic lives in the Qt widget);
- Slicer 5.10 ships Python 3.12.10 (``Slicer_REQUIRED_PYTHON_VERSION``); 5.8 ships 3.9, which the
  ``liversam`` package (``zip(strict=True)``, ``X | Y`` unions at run time) does not run on.

Standard library only: tested with pytest, used by ``LiverSAM.py`` and ``LiverSAMTrain.py``.
"""

from __future__ import annotations

import sys

MINIMUM_SLICER_VERSION: tuple[int, int] = (5, 10)
MINIMUM_PYTHON_VERSION: tuple[int, int] = (3, 10)


def version_problem(
    slicer_major: int, slicer_minor: int, python_version: tuple[int, int] | None = None
) -> str | None:
    """A message for the user when this Slicer (or its Python) is too old for LiverSAM, else None."""
    python_version = tuple(python_version or sys.version_info[:2])
    if (int(slicer_major), int(slicer_minor)) < MINIMUM_SLICER_VERSION:
        return (
            f"LiverSAM needs 3D Slicer {MINIMUM_SLICER_VERSION[0]}.{MINIMUM_SLICER_VERSION[1]} or newer; this is "
            f"Slicer {slicer_major}.{slicer_minor}. Install a current Slicer from https://download.slicer.org "
            "and add the LiverSAM extension there."
        )
    if python_version < MINIMUM_PYTHON_VERSION:
        return (
            f"LiverSAM needs Python {MINIMUM_PYTHON_VERSION[0]}.{MINIMUM_PYTHON_VERSION[1]} or newer inside Slicer; "
            f"this Slicer runs Python {python_version[0]}.{python_version[1]}."
        )
    return None


def add_missing_pack_members(parameter_node, packs) -> list[str]:
    """Write the defaults of parameter-pack members that a saved parameter node lacks; the names written.

    ``packs``: (name, parameterPack class) pairs, e.g. ``("propagation", PropagationParameters)``. Slicer's
    ``parameterNodeWrapper`` (v5.10.0, ``parameterPack.py`` ``ParameterPackSerializer.isIn``) asks only a pack's
    first member whether the pack is in the node, so a node saved by an earlier LiverSAM, before a member was
    added, is not given that member's default and reading the pack fails (``float("")``). A node without the
    pack at all is left to the wrapper, which writes every default. Duck-typed on Slicer's ``ParameterInfo``
    (``basename``, ``serializer.isIn`` / ``write``, ``default``): no Qt needed.
    """
    written = []
    for pack_name, pack_type in packs:
        members = list(pack_type.allParameters.values())
        if not members or not members[0].serializer.isIn(parameter_node, f"{pack_name}.{members[0].basename}"):
            continue
        for info in members[1:]:
            name = f"{pack_name}.{info.basename}"
            if not info.serializer.isIn(parameter_node, name):
                info.serializer.write(parameter_node, name, info.default)
                written.append(name)
    return written


class GuiConnection:
    """A parameter node wrapper's ``connectGui(gui)`` that :meth:`disconnect` undoes completely, on every Slicer.

    Slicer 5.10's ``connectGui`` adds a ModifiedEvent observer to the parameter node that ``disconnectGui`` does not
    remove (v5.10.0 ``Base/Python/slicer/parameterNodeWrapper/wrapper.py``: ``_connectParametersToGui`` calls
    ``self.AddObserver`` and drops the tag, ``_disconnectGui`` only clears the widgets' callbacks; fixed in 5.12 by
    Slicer 16069d367e). Its callback holds the wrapper, so the wrapper stays alive too, with the observers its cached
    parameters keep on the node (``_CachedParameterWrapper`` removes them only when it is deleted): every module
    entry and every reload added more, each run at every change of the parameter node. This records the tag of every
    observer ``connectGui`` adds (through the wrapper's ``AddObserver``, which the wrapper class defines and
    ``_connectParametersToGui`` calls on the instance) and removes them on :meth:`disconnect`; on a Slicer that
    removes its own, removing a tag again does nothing (VTK never reuses an object's observer tags)."""

    def __init__(self, wrapper, gui) -> None:
        self.wrapper = wrapper
        self.observer_tags: list[int] = []
        add_observer = type(wrapper).AddObserver

        def recorded(event, callback, priority=0.0):
            tag = add_observer(wrapper, event, callback, priority)
            self.observer_tags.append(tag)
            return tag

        wrapper.AddObserver = recorded  # an instance attribute: the class's own is used again right after
        try:
            self.tag = wrapper.connectGui(gui)
        finally:
            del wrapper.AddObserver

    def disconnect(self) -> None:
        self.wrapper.disconnectGui(self.tag)
        for tag in self.observer_tags:
            self.wrapper.RemoveObserver(tag)
        self.observer_tags = []
