"""The widget's GUI is connected to its parameter node in balance, and leaves nothing behind on Slicer 5.10.

Slicer 5.10's ``connectGui`` adds a ModifiedEvent observer to the parameter node that ``disconnectGui`` leaves
(``Base/Python/slicer/parameterNodeWrapper/wrapper.py`` at v5.10.0: ``_connectParametersToGui`` drops the tag of its
``self.AddObserver``, ``_disconnectGui`` only clears the widgets' callbacks; fixed in 5.12, Slicer 16069d367e). The
observer's callback holds its wrapper, so each module entry, scene close and reload left an observer and a wrapper
(with its cached parameters' own observers) running at every change of the parameter node; and ``cleanup()`` did not
disconnect the GUI at all, so a reloaded module's old, hidden GUI stayed connected.

The parameterNodeWrapper is Slicer's own code, read from Slicer's source at the tags v5.10.0 (the minimum) and
v5.12.0 (the fix) in the Slicer git mirror (``LIVERSAM_SLICER_SOURCE``, default ``/work/.mirror/Slicer+Slicer/repo``;
skipped without it). It needs Qt only for its widget connectors, which these tests do not use: ``qt`` and ``ctk`` are
empty stand-ins, the qMRML widget classes named in its annotations placeholders. The parameter node, its observers and
LiverSAM's own ``Parameters.py`` are the real ones.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import types
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_slicer_widget_state import widgets  # noqa: F401  (the fixture)

from slicer_harness import MODULE_DIR, ensure_module_on_path, fresh_scene

ensure_module_on_path()

import vtk  # noqa: E402

from LiverSAMLib.SlicerCompatibility import GuiConnection  # noqa: E402

pytestmark = pytest.mark.slicer
SLICER_SOURCE = Path(os.environ.get("LIVERSAM_SLICER_SOURCE", "/work/.mirror/Slicer+Slicer/repo"))
WRAPPER_DIR = "Base/Python/slicer/parameterNodeWrapper"


def _stub(name: str) -> types.ModuleType:
    """A module whose every attribute is a placeholder class (Qt and CTK: only named, never used here)."""
    module = types.ModuleType(name)
    classes: dict[str, type] = {}

    def attribute(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return classes.setdefault(attr, type(attr, (), {}))

    module.__getattr__ = attribute
    return module


def slicer_wrapper(tag: str, tmp_path: Path, monkeypatch) -> types.ModuleType:
    """Slicer's ``slicer.parameterNodeWrapper`` package at ``tag``, imported under a name of its own."""
    try:
        names = subprocess.run(["git", "-C", str(SLICER_SOURCE), "ls-tree", "--name-only", tag, WRAPPER_DIR + "/"],
                               check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no Slicer source at {SLICER_SOURCE} (set LIVERSAM_SLICER_SOURCE to a Slicer git checkout)")
    package = f"slicer_parameter_node_wrapper_{tag.replace('.', '_')}"
    folder = tmp_path / package
    folder.mkdir()
    import slicer

    for name in names:
        text = subprocess.run(["git", "-C", str(SLICER_SOURCE), "show", f"{tag}:{name}"], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
        (folder / Path(name).name).write_text(text)
        for widget_class in set(re.findall(r"slicer\.(q\w+)", text)):  # annotations of the widget connectors
            if not hasattr(slicer, widget_class):
                monkeypatch.setattr(slicer, widget_class, type(widget_class, (), {}), raising=False)
    monkeypatch.setitem(sys.modules, "qt", _stub("qt"))
    monkeypatch.setitem(sys.modules, "ctk", _stub("ctk"))
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(package)


def stale_updates(wrapper_package, node, connected=()) -> int:
    """How many GUI updates a change of ``node`` runs for wrappers that are not ``connected`` (left-over observers)."""
    updates: list = []
    module = wrapper_package.wrapper
    original = module._updateGUIFromParameterNode
    module._updateGUIFromParameterNode = lambda self: updates.append(self) or original(self)
    try:
        node.Modified()
    finally:
        module._updateGUIFromParameterNode = original
    return sum(1 for wrapper in updates if not any(wrapper is c for c in connected))


def liversam_parameters(wrapper_package, monkeypatch):
    """LiverSAM's own Parameters.py on that wrapper."""
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper_package)
    spec = importlib.util.spec_from_file_location("LiverSAMParameters_under_test", MODULE_DIR / "LiverSAMLib" / "Parameters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NO_WIDGETS = SimpleNamespace()  # a GUI without parameter widgets: connectGui still observes the node


@pytest.mark.parametrize("tag, leaked", [("v5.10.0", 5), ("v5.12.0", 0)])
def test_slicers_own_connect_and_disconnect_leave_an_observer_in_5_10(tmp_path, monkeypatch, tag, leaked):
    """The defect itself, on Slicer's code: five connect / disconnect cycles leave five observers in 5.10, none in 5.12."""
    package = slicer_wrapper(tag, tmp_path, monkeypatch)
    parameters = liversam_parameters(package, monkeypatch)
    node = fresh_scene().AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    for _ in range(5):
        wrapper = parameters.LiverSAMParameterNode(node)
        wrapper.disconnectGui(wrapper.connectGui(NO_WIDGETS))
    assert stale_updates(package, node) == leaked


@pytest.mark.parametrize("tag", ["v5.10.0", "v5.12.0"])
def test_a_gui_connection_is_undone_completely_and_its_wrapper_freed(tmp_path, monkeypatch, tag):
    package = slicer_wrapper(tag, tmp_path, monkeypatch)
    parameters = liversam_parameters(package, monkeypatch)
    node = fresh_scene().AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    freed = []
    for _ in range(5):
        wrapper = parameters.LiverSAMParameterNode(node)
        connection = GuiConnection(wrapper, NO_WIDGETS)
        assert connection.observer_tags and stale_updates(package, node, [wrapper]) == 0
        connection.disconnect()
        freed.append(weakref.ref(wrapper))
        del wrapper, connection
    gc.collect()
    assert stale_updates(package, node) == 0
    assert all(ref() is None for ref in freed), "a disconnected wrapper is still alive (an observer holds it)"
    assert "AddObserver" not in vars(parameters.LiverSAMParameterNode(node))  # only connectGui's were recorded


class UI(SimpleNamespace):
    """The widget's ``self.ui`` as connectGui reads it: no widget names a parameter."""


def lifecycle_widget(module, parameters, node):
    """The LiverSAM widget with a logic that hands out a new wrapper of ``node`` each time, as Slicer's does."""
    widget = module.LiverSAMWidget.__new__(module.LiverSAMWidget)
    module.VTKObservationMixin.__init__(widget)
    widget.ui = UI()
    widget.logic = SimpleNamespace(getParameterNode=lambda: parameters.LiverSAMParameterNode(node))
    widget._parameterNode, widget._guiConnection, widget._shortcuts = None, None, []
    widget._interactionNode, widget._observedPromptNodes = None, []
    widget._updateGUIState = lambda *args: None  # (Qt widgets)
    widget._installShortcuts = lambda: None
    widget.parent = SimpleNamespace(isEntered=True)
    return widget


@pytest.mark.parametrize("tag", ["v5.10.0", "v5.12.0"])
def test_the_module_connects_its_gui_in_balance(widgets, tmp_path, monkeypatch, tag):  # noqa: F811
    """Setup, five module entries and exits, a scene close and a reload (cleanup) on Slicer's wrapper: at each moment
    exactly the connected GUI observes the parameter node, and none once the module is cleaned up."""
    module, _train = widgets
    package = slicer_wrapper(tag, tmp_path, monkeypatch)
    parameters = liversam_parameters(package, monkeypatch)
    scene = fresh_scene()
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    widget = lifecycle_widget(module, parameters, node)
    connects, disconnects = [], []
    wrapper_class = parameters.LiverSAMParameterNode
    connect, disconnect = wrapper_class.connectGui, wrapper_class.disconnectGui
    monkeypatch.setattr(wrapper_class, "connectGui", lambda self, gui: connects.append(self) or connect(self, gui))
    monkeypatch.setattr(wrapper_class, "disconnectGui", lambda self, tag: disconnects.append(self) or disconnect(self, tag))

    def connected_only(expected: int = 1) -> None:
        """``expected`` wrappers connected (connectGui not yet undone), and only they observe the node."""
        live = [w for w in connects if not any(w is d for d in disconnects)]
        assert len(live) == expected
        assert stale_updates(package, node, live) == 0, "a disconnected GUI's observer still runs"

    widget.initializeParameterNode()  # setup()
    connected_only()
    for _ in range(5):
        widget.exit()
        connected_only(0)
        widget.enter()
        connected_only()
    widget.setParameterNode(None)  # a scene closing (onSceneStartClose)
    connected_only(0)
    widget.initializeParameterNode()  # and the next one (onSceneEndClose, the module shown)
    connected_only()
    widget._calls = None
    widget._pollTimer = widget._jobTimer = widget._liveTimer = widget._serverPathTimer = None
    widget._stopServerAtQuit, widget._job = None, None
    widget.logic.connection = SimpleNamespace(abort_requests=lambda: 0)
    widget.logic.releaseServer = lambda plan, timeout: True
    widget.logic.stopServer = widget.logic.stopServerSafely = lambda wait_s=0: None
    widget.cleanup()  # reload: the old GUI is disconnected
    connected_only(0)
    assert len(connects) == 7
    gc.collect()
    assert stale_updates(package, node) == 0


class LeakingWrapper:
    """A wrapper that connects and disconnects its GUI as Slicer 5.10's does (the tests above show it on Slicer's own
    code where the Slicer source is at hand): ``connectGui`` observes the node through the instance's ``AddObserver``
    and drops the tag, ``disconnectGui`` leaves that observer. It runs where the Slicer source is not."""

    def __init__(self, node) -> None:
        self.parameterNode = node
        self.updates = 0

    def AddObserver(self, event, callback, priority=0.0):  # noqa: N802 - VTK's name, as the wrapper class has it
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag):  # noqa: N802
        self.parameterNode.RemoveObserver(tag)

    def connectGui(self, gui):  # noqa: N802
        self.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *args: setattr(self, "updates", self.updates + 1))
        return "tag"

    def disconnectGui(self, tag):  # noqa: N802
        pass


def test_a_gui_connection_removes_what_a_5_10_style_connect_leaves_on_the_node():
    node = fresh_scene().AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    wrappers = [LeakingWrapper(node) for _ in range(3)]
    for wrapper in wrappers:
        GuiConnection(wrapper, NO_WIDGETS).disconnect()
    node.Modified()
    assert [w.updates for w in wrappers] == [0, 0, 0]  # each connection's observer is gone
    leaked = LeakingWrapper(node)
    leaked.disconnectGui(leaked.connectGui(NO_WIDGETS))  # the same cycle without GuiConnection leaves it
    node.Modified()
    assert leaked.updates == 1
