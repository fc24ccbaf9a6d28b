"""Set up slicer-core's real MRML for tests that run outside the Slicer application.

The PyPI package ``slicer-core`` provides the real ``vtkMRMLScene``, volume / segmentation / markups nodes,
their storage nodes, the module logics (``vtkSlicerSegmentationsModuleLogic``, ``vtkSlicerVolumesLogic``,
``vtkSlicerSegmentEditorLogic``, ...) and Slicer's own ``slicer/util.py``. What the application normally
does at startup is missing: ``slicer.mrmlScene`` is not set and ``slicer.modules.<name>.logic()`` does not
exist, yet ``slicer.util`` helpers (``arrayFromSegmentBinaryLabelmap``, ``updateSegmentBinaryLabelmapFromArray``,
``addVolumeFromArray``) rely on both. :func:`slicer_environment` creates them once per process;
:func:`fresh_scene` clears the scene between tests.

Usage in a test module::

    from slicer_harness import fresh_scene

    @pytest.fixture
    def scene():
        return fresh_scene()
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "LiverSAM"


def shared_data_dir() -> Path:
    """The shared real-CT folder: ``$LIVERSAM_TEST_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("LIVERSAM_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


def ensure_module_on_path() -> None:
    """Make ``import liversam`` and ``import LiverSAMLib`` work (the module folder holds both)."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))


@dataclass
class SlicerEnvironment:
    """The objects the Slicer application would own: one scene and the module logics bound to it."""

    scene: object  # slicer.vtkMRMLScene
    application_logic: object
    segmentations_logic: object
    volumes_logic: object
    markups_logic: object
    color_logic: object


_ENVIRONMENT: SlicerEnvironment | None = None


def slicer_environment() -> SlicerEnvironment:
    """Create (once per process) the scene, the module logics, ``slicer.mrmlScene`` and ``slicer.modules``."""
    global _ENVIRONMENT
    if _ENVIRONMENT is not None:
        return _ENVIRONMENT
    ensure_module_on_path()
    import slicer

    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    application_logic.SetColorLogic(color_logic)
    application_logic.SetModuleLogic("Colors", color_logic)

    def module_logic(cls, name: str):
        logic = cls()
        logic.SetMRMLApplicationLogic(application_logic)
        logic.SetMRMLScene(scene)
        application_logic.SetModuleLogic(name, logic)
        return logic

    segmentations_logic = module_logic(slicer.vtkSlicerSegmentationsModuleLogic, "Segmentations")
    volumes_logic = module_logic(slicer.vtkSlicerVolumesLogic, "Volumes")
    markups_logic = module_logic(slicer.vtkSlicerMarkupsLogic, "Markups")

    slicer.mrmlScene = scene
    modules = getattr(slicer, "modules", None)
    if modules is None or not isinstance(modules, types.SimpleNamespace):
        modules = types.SimpleNamespace()
        slicer.modules = modules
    for attribute, logic in (
        ("segmentations", segmentations_logic),
        ("volumes", volumes_logic),
        ("markups", markups_logic),
    ):
        setattr(modules, attribute, types.SimpleNamespace(logic=lambda logic=logic: logic))

    _ENVIRONMENT = SlicerEnvironment(
        scene=scene,
        application_logic=application_logic,
        segmentations_logic=segmentations_logic,
        volumes_logic=volumes_logic,
        markups_logic=markups_logic,
        color_logic=color_logic,
    )
    return _ENVIRONMENT


def fresh_scene():
    """The shared scene, emptied of every node a previous test added (the default colour nodes stay)."""
    environment = slicer_environment()
    environment.scene.Clear(0)
    return environment.scene
