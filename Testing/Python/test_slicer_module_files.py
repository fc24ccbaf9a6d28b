"""The Slicer module's files, checked without the Slicer application (desktop Slicer cannot run in CI).

- the .ui file parses; every ``self.ui.<name>`` used by LiverSAM.py exists with the expected class;
- every ``SlicerParameterName`` maps to a parameter of the parameter node, with a widget class that
  parameterNodeWrapper can connect to that parameter's type;
- every Python file under LiverSAM/ is installed by LiverSAM/CMakeLists.txt (its globs);
- the MRML-only helpers import under slicer-core, and the Qt-boundary files fail only on Qt modules;
- the extension CMakeLists carries the required metadata; resources exist; requirements cover the core.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from slicer_harness import MODULE_DIR, REPO_ROOT, ensure_module_on_path

ensure_module_on_path()

UI_FILE = MODULE_DIR / "Resources" / "UI" / "LiverSAM.ui"
MODULE_FILE = MODULE_DIR / "LiverSAM.py"
PARAMETERS_FILE = MODULE_DIR / "LiverSAMLib" / "Parameters.py"
QT_BOUNDARY = {"qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "slicer.i18n"}

# Widget classes parameterNodeWrapper's GUI connectors accept, by parameter type.
CONNECTABLE = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "float": {
        "QDoubleSpinBox",
        "ctkSliderWidget",
        "qMRMLSliderWidget",
        "ctkDoubleSpinBox",
        "qMRMLSpinBox",
        "ctkDoubleSlider",
    },
    "int": {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QComboBox", "ctkComboBox", "QLineEdit", "QLabel", "QTextEdit"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}


def ui_widgets() -> dict[str, tuple[str, str | None]]:
    """name -> (class, SlicerParameterName or None) for every widget of the .ui file."""
    root = ET.parse(UI_FILE).getroot()
    widgets = {}
    for widget in root.iter("widget"):
        parameter = None
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.findtext("string")
        widgets[widget.get("name")] = (widget.get("class"), parameter)
    return widgets


def parameter_types() -> dict[str, str]:
    """Dotted parameter name -> type kind (bool/float/int/str/Path/node/pack), read from Parameters.py."""
    tree = ast.parse(PARAMETERS_FILE.read_text(encoding="utf-8"))
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            decorators = {
                d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list
            }
            fields = {}
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    annotation = statement.annotation
                    if (
                        isinstance(annotation, ast.Subscript)
                        and getattr(annotation.value, "id", "") == "Annotated"
                    ):
                        annotation = annotation.slice.elts[0]
                    fields[statement.target.id] = ast.unparse(annotation)
            classes[node.name] = (decorators, fields)

    def kind(type_name: str) -> str:
        if type_name.startswith("vtkMRML"):
            return "node"
        if type_name in classes:
            return "pack"
        return type_name

    wrappers = [fields for decorators, fields in classes.values() if "parameterNodeWrapper" in decorators]
    assert len(wrappers) == 1, "Parameters.py must define exactly one @parameterNodeWrapper class"
    result = {}
    for name, type_name in wrappers[0].items():
        result[name] = kind(type_name)
        if type_name in classes:
            assert "parameterPack" in classes[type_name][0], f"{type_name} must be a @parameterPack"
            for member, member_type in classes[type_name][1].items():
                result[f"{name}.{member}"] = kind(member_type)
    return result


def test_ui_file_parses_and_has_the_issue_widgets():
    widgets = ui_widgets()
    root_class, _ = widgets["LiverSAM"]
    assert root_class == "qMRMLWidget"
    expected = {
        "inputVolumeSelector": "qMRMLNodeComboBox",
        "outputSegmentationSelector": "qMRMLNodeComboBox",
        "targetSegmentSelector": "qMRMLSegmentSelectorWidget",
        "modelComboBox": "QComboBox",
        "deviceComboBox": "QComboBox",
        "positivePointButton": "QPushButton",
        "negativePointButton": "QPushButton",
        "boxButton": "QPushButton",
        "liveUpdateCheckBox": "QCheckBox",
        "propagateButton": "QPushButton",
        "cancelButton": "QPushButton",
        "progressBar": "QProgressBar",
        "reviewTable": "QTableWidget",
        "lesionTable": "QTableWidget",
        "exportFormatComboBox": "QComboBox",
        "exportPathLineEdit": "ctkPathLineEdit",
        "exportButton": "QPushButton",
    }
    for name, cls in expected.items():
        assert widgets.get(name, (None,))[0] == cls, f"{name} should be a {cls} in {UI_FILE.name}"
    # Every custom class used is declared, and MRML widgets get the scene.
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {cls for cls, _ in widgets.values()}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= declared
    receivers = {
        c.findtext("receiver") for c in root.iter("connection") if "setMRMLScene" in c.findtext("slot")
    }
    assert {n for n, (cls, _) in widgets.items() if cls.startswith("qMRML") and n != "LiverSAM"} <= receivers


def test_every_ui_name_the_module_uses_exists_with_a_compatible_class():
    widgets = ui_widgets()
    source = MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", source))
    assert len(used) > 20
    missing = sorted(n for n in used if n not in widgets)
    assert not missing, f"LiverSAM.py uses widgets missing from {UI_FILE.name}: {missing}"
    # Methods called on widgets must fit their class.
    calls = {
        "setSegmentationNode": {"qMRMLSegmentSelectorWidget"},
        "setCurrentSegmentID": {"qMRMLSegmentSelectorWidget"},
        "currentSegmentID": {"qMRMLSegmentSelectorWidget"},
        "findData": {"QComboBox"},
        "addItem": {"QComboBox"},
        "setHorizontalHeaderLabels": {"QTableWidget"},
        "setItem": {"QTableWidget"},
    }
    for name, method in re.findall(r"self\.ui\.([A-Za-z_]\w*)\.(\w+)\(", source):
        if method in calls:
            assert widgets[name][0] in calls[method], f"self.ui.{name}.{method}() on a {widgets[name][0]}"


def test_every_slicer_parameter_name_maps_to_a_parameter_of_a_connectable_type():
    parameters = parameter_types()
    connected = {name: (cls, p) for name, (cls, p) in ui_widgets().items() if p}
    assert len(connected) >= 12
    for widget, (cls, parameter) in connected.items():
        assert parameter in parameters, f"{widget}: SlicerParameterName '{parameter}' is not a parameter"
        kind = parameters[parameter]
        assert kind != "pack", f"{widget}: connect the pack's members ('{parameter}.x'), not the pack"
        assert cls in CONNECTABLE[kind], f"{widget} ({cls}) cannot edit '{parameter}' of type {kind}"
    # The parameters the widget reads exist too.
    source = MODULE_FILE.read_text(encoding="utf-8")
    for name in set(re.findall(r"\bp\.([a-z][A-Za-z]+)\b", source)):
        assert name in parameters, f"LiverSAM.py reads parameter '{name}' that Parameters.py does not define"


def _cmake_glob_patterns() -> list[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    patterns = re.findall(r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/([^\s)]+\.py)", text)
    patterns += [
        p.replace("${MODULE_NAME}", "LiverSAM")
        for p in re.findall(r"^\s*(\$\{MODULE_NAME\}\.py)\s*$", text, re.M)
    ]
    return patterns


def test_every_python_file_of_the_module_is_installed_by_cmake():
    patterns = _cmake_glob_patterns()
    assert "LiverSAM.py" in patterns and "liversam/*.py" in patterns and "LiverSAMLib/*.py" in patterns
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "GLOB_RECURSE" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    # GLOB_RECURSE 'dir/*.py' matches every .py below dir; fnmatch's '*' crosses '/' the same way.
    unlisted = []
    for path in MODULE_DIR.rglob("*.py"):
        relative = path.relative_to(MODULE_DIR).as_posix()
        if relative.startswith("Testing/") or "__pycache__" in relative:
            continue
        if not any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
            unlisted.append(relative)
    assert not unlisted, f"not installed by LiverSAM/CMakeLists.txt: {unlisted}"
    for resource in re.findall(r"^\s*(Resources/\S+)\s*$", text, re.M):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "LiverSAM")).is_file(), resource


def test_extension_cmakelists_has_the_metadata_and_both_modules():
    text = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):  # fmt: skip
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(LiverSAM)",
                 "add_subdirectory(LiverSAMTrain)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):  # fmt: skip
        assert line in text, line
    assert (REPO_ROOT / "LiverSAMTrain" / "CMakeLists.txt").is_file()


def test_icons_are_pngs_of_the_right_size():
    from PIL import Image

    for path in (
        REPO_ROOT / "Resources" / "LiverSAM.png",
        MODULE_DIR / "Resources" / "Icons" / "LiverSAM.png",
    ):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128), path


def test_mrml_helpers_import_under_slicer_core_without_qt():
    for name in ("MRMLBridge", "SegmentationLogic", "InferenceWorker", "ModelSession", "DependencyInstaller"):
        module = importlib.import_module(f"LiverSAMLib.{name}")
        assert module.__doc__
    assert "qt" not in sys.modules and "ctk" not in sys.modules


@pytest.mark.parametrize(
    "path", [MODULE_FILE, PARAMETERS_FILE, REPO_ROOT / "LiverSAMTrain" / "LiverSAMTrain.py"]
)
def test_qt_boundary_files_fail_only_on_qt_modules(path):
    """Compile, then import: the first missing module must be a Qt / Slicer-application one."""
    source = path.read_text(encoding="utf-8")
    compile(source, str(path), "exec")
    sys.path.insert(0, str(path.parent))
    try:
        with pytest.raises(ModuleNotFoundError) as error:
            spec = importlib.util.spec_from_file_location(f"_boundary_{path.stem}", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        sys.path.remove(str(path.parent))
    assert error.value.name in QT_BOUNDARY, f"{path.name} failed on '{error.value.name}', not on a Qt module"
    # Nothing heavy at import: the module file imports neither torch nor the model.
    imports = {n.names[0].name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import)}
    assert "torch" not in imports


def test_requirements_cover_the_core_dependencies_except_torch():
    from LiverSAMLib.DependencyInstaller import TORCH_PACKAGES, read_requirements, requirement_name

    requirements = {
        requirement_name(r) for r in read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    }
    assert not requirements & set(TORCH_PACKAGES)  # torch comes from the PyTorch extension
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    core = {requirement_name(d) for d in re.findall(r'"([^"]+)"', block)}
    missing = core - requirements - set(TORCH_PACKAGES)
    assert not missing, f"add to LiverSAM/Resources/requirements.txt: {sorted(missing)}"


def test_self_test_is_a_real_test():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LiverSAMTest")
    assert [b.id for b in test_class.bases if isinstance(b, ast.Name)] == ["ScriptedLoadableModuleTest"]
    source = ast.unparse(test_class)
    assert "_dice" in source and "assertGreater" in source and "runTest" in source
    assert Path(MODULE_DIR / "CMakeLists.txt").read_text().count("slicer_add_python_unittest") == 1


def _pack_defaults(class_name: str) -> dict[str, object]:
    """Member -> default value of a @parameterPack class in Parameters.py (read without Qt)."""
    tree = ast.parse(PARAMETERS_FILE.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {
        s.target.id: ast.literal_eval(s.value)
        for s in cls.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None
    }


def test_propagation_and_review_parameters_map_onto_the_core_settings_with_its_defaults():
    import dataclasses
    import types

    from liversam.propagation import PropagationSettings
    from liversam.review import ReviewSettings
    from LiverSAMLib.ModelSession import (
        PROPAGATION_PARAMETERS,
        REVIEW_PARAMETERS,
        core_postprocess_settings,
        propagation_settings_from_parameters,
        review_settings_from_parameters,
    )

    propagation = _pack_defaults("PropagationParameters")
    # Every core propagation setting has exactly one parameter, and every parameter maps to one.
    assert set(propagation) == set(PROPAGATION_PARAMETERS)
    assert set(PROPAGATION_PARAMETERS.values()) == {f.name for f in dataclasses.fields(PropagationSettings)}
    # The parameter node's defaults are the core's defaults (maxSlices 0 = no limit = None).
    assert propagation_settings_from_parameters(types.SimpleNamespace(**propagation)) == PropagationSettings()
    changed = dict(propagation, minScore=0.7, maxSlices=12, useMaskPrompt=True, boxMarginMm=6.5)
    settings = propagation_settings_from_parameters(types.SimpleNamespace(**changed))
    assert (settings.min_score, settings.max_slices, settings.use_mask_prompt, settings.box_margin_mm) == (
        0.7, 12, True, 6.5,
    )  # fmt: skip
    assert core_postprocess_settings(propagation=settings).propagation is settings
    review = _pack_defaults("ReviewParameters")
    assert set(review) == set(REVIEW_PARAMETERS)
    assert review_settings_from_parameters(types.SimpleNamespace(**review)) == ReviewSettings()
    # Each propagation / review parameter has a widget in the .ui file.
    connected = {p for _cls, p in ui_widgets().values() if p}
    assert {f"propagation.{m}" for m in propagation} <= connected
    assert {f"review.{m}" for m in review} <= connected
    assert "prefetchRadius" in connected


def _class_source(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _method(cls: ast.ClassDef, name: str) -> str:
    return ast.unparse(next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name))


def test_widget_hands_the_segment_editor_undo_to_the_segmentation_logic():
    """Static check of the Qt wiring (desktop Slicer cannot run here): undo is shared with manual edits."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    widget, logic, history = (
        _class_source(tree, n) for n in ("LiverSAMWidget", "LiverSAMLogic", "SegmentEditorHistory")
    )
    # The widget builds its logic with the Segment Editor's history ...
    assert "LiverSAMLogic(segmentEditorHistory=SegmentEditorHistory.create())" in _method(widget, "setup")
    # ... and the logic hands its slots to SegmentationLogic(save_state_for_undo=..., undo_shared=..., redo_shared=...).
    init = next(n for n in logic.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    call = next(
        n
        for n in ast.walk(init)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "SegmentationLogic"
    )
    keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
    assert keywords["save_state_for_undo"].startswith("history.saveStateForUndo")
    assert keywords["undo_shared"].startswith("history.undo")
    assert keywords["redo_shared"].startswith("history.redo")
    assert "history.editorNodeProvider = self.segmentation.editor_node" in ast.unparse(init)
    # The history is the Segment Editor module's qMRMLSegmentEditorWidget, on the shared editor node.
    editor_widget = _method(history, "editorWidget")
    assert "slicer.modules.segmenteditor.widgetRepresentation().self().editor" in editor_widget
    assert "setMRMLSegmentEditorNode" in editor_widget
    for method, slot in (("saveStateForUndo", "saveStateForUndo"), ("undo", "undo"), ("redo", "redo")):
        assert f"self.editorWidget().{slot}()" in _method(history, method)
    # Undo / redo buttons and Ctrl+Z / Ctrl+Y go through the logic (hence the shared history).
    assert "self.logic.segmentation.undo()" in _method(widget, "onUndo")
    assert "self.logic.segmentation.redo()" in _method(widget, "onRedo")
    shortcuts = _method(widget, "_installShortcuts")
    assert "qt.QKeySequence.Undo" in shortcuts and "self.onUndo" in shortcuts
    assert "self._installShortcuts()" in _method(widget, "enter")
    assert "self._uninstallShortcuts()" in _method(widget, "exit")


def test_widget_uses_the_core_for_models_review_lesions_fixes_and_dicom_seg():
    """The widget calls the LiverSAMLib/core entry points (no logic of its own)."""
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    widget, logic = _class_source(tree, "LiverSAMWidget"), _class_source(tree, "LiverSAMLogic")
    assert "model_choices(" in _method(widget, "_populateModels")
    assert "self._populateModels()" in _method(widget, "enter")
    propagate = _method(widget, "onPropagate")
    assert "self.logic.planRepropagation(" in propagate and "self.logic.repropagate(" in propagate
    assert "k_range=fix.k_range" in propagate and "rememberPropagation" in propagate
    assert "session.prefetch_around(" in _method(widget, "onSegmentSlices")
    assert "review_rows(" in _method(logic, "reviewRows")
    assert "self.segmentation.lesion_table(" in _method(logic, "lesionTable")
    export = _method(logic, "export")
    assert "dicom_reference_of_volume(" in export and "self.segmentation.export_dicom_seg(" in export
    session_source = (MODULE_DIR / "LiverSAMLib" / "ModelSession.py").read_text(encoding="utf-8")
    for core_call in ("build_review_report(", "repropagate(", "available_models(", "BackgroundPrefetcher("):
        assert core_call in session_source, core_call
    assert "regionprops" not in session_source and "ndimage.label" not in session_source  # no own lesion code
    logic_source = (MODULE_DIR / "LiverSAMLib" / "SegmentationLogic.py").read_text(encoding="utf-8")
    assert "lesion_table_from_mask(" in logic_source and "write_dicom_seg(" in logic_source
