"""Every Qt / CTK / qMRML / MRML call of the Slicer modules exists in Slicer 5.10 (the minimum version).

The listing (``slicer_api/slicer_api_v5.10.0.json``) was read from Slicer's headers at tag v5.10.0, the CTK
commit that release builds and Qt 5.15 by ``slicer_api/extract_api.py``; ``slicer_api/conformance.py``
infers the receivers' classes from the code and checks each call, attribute and signal against it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from slicer_harness import MODULE_DIR, REPO_ROOT

sys.path.insert(0, str(Path(__file__).resolve().parent / "slicer_api"))

from conformance import check_source, load_listing, parameter_node_members, ui_classes  # noqa: E402

TRAIN_DIR = REPO_ROOT / "LiverSAMTrain"
LISTING = load_listing()
UI = ui_classes(MODULE_DIR / "Resources" / "UI" / "LiverSAM.ui")
TRAIN_UI = ui_classes(TRAIN_DIR / "Resources" / "UI" / "LiverSAMTrain.ui")
NODE_MEMBERS = parameter_node_members(MODULE_DIR / "LiverSAMLib" / "Parameters.py", LISTING)

SOURCES = [
    (MODULE_DIR / "LiverSAM.py", UI),
    *[(path, UI) for path in sorted((MODULE_DIR / "LiverSAMLib").glob("*.py")) if path.name != "ServerClient.py"],
    (TRAIN_DIR / "LiverSAMTrain.py", TRAIN_UI),
    *[(path, TRAIN_UI) for path in sorted((TRAIN_DIR / "LiverSAMTrainLib").glob("*.py"))],
]


def test_listing_comes_from_the_minimum_release():
    data = json.loads((Path(__file__).parent / "slicer_api" / "slicer_api_v5.10.0.json").read_text())
    assert data["slicer_tag"] == "v5.10.0" and len(data["ctk_commit"]) == 40 and data["qt_version"].startswith("5.15")
    selector = LISTING.classes["qMRMLSegmentSelectorWidget"]
    assert "setCurrentNode" in selector["slots"] and "setSegmentationNode" not in LISTING.members("qMRMLSegmentSelectorWidget")
    assert "saveStateForUndo" in LISTING.members("qMRMLSegmentEditorWidget")
    assert "ModifySegmentByLabelmap" in LISTING.members("vtkSlicerSegmentEditorLogic")
    # slicer.app.testingEnabled() is a PythonQt decorator (qSlicerBaseQTCorePythonQtDecorators.h), not a slot
    application = LISTING.classes["qSlicerCoreApplication"]
    assert "testingEnabled" in application["decorators"]
    assert "testingEnabled" not in application["slots"] + application["invokables"] + list(application["properties"])
    assert "testingEnabled" in LISTING.members("qSlicerApplication")


def test_pythonqt_decorators_are_read_from_the_headers():
    from extract_api import decorator_members

    header = '''
    class qSlicerBaseQTBasePythonQtDecorators : public QObject
    {
      Q_OBJECT
    public:
      qSlicerBaseQTBasePythonQtDecorators() { PythonQt::self()->registerClass(&qSlicerCoreApplication::staticMetaObject); }
    public slots:
      bool static_qSlicerCoreApplication_testingEnabled() { return true; }
      void processEvents(qSlicerCoreApplication* app) { app->processEvents(); }
      qSlicerFoo* new_qSlicerFoo() { return new qSlicerFoo; }
      void delete_qSlicerFoo(qSlicerFoo* foo) { delete foo; }
    private:
      void helper(qSlicerCoreApplication* app) {}
    };
    '''
    assert decorator_members(header) == {"qSlicerCoreApplication": {"testingEnabled", "processEvents"}}


@pytest.mark.parametrize("path, ui", SOURCES, ids=[p.name for p, _ in SOURCES])
def test_every_call_on_a_slicer_class_exists_in_slicer_5_10(path, ui):
    checker = check_source(path.read_text(encoding="utf-8"), path.name, LISTING, ui, NODE_MEMBERS)
    assert not checker.violations, "\n".join(map(str, checker.violations))


def test_the_checker_sees_most_calls():
    """The inference must reach the calls (a checker that types nothing passes everything)."""
    checked = sum(
        check_source(p.read_text(encoding="utf-8"), p.name, LISTING, ui, NODE_MEMBERS).checked for p, ui in SOURCES
    )
    assert checked > 250, checked
    module = check_source((MODULE_DIR / "LiverSAM.py").read_text(encoding="utf-8"), "LiverSAM.py", LISTING, UI, NODE_MEMBERS)
    assert module.checked > 120, module.checked


@pytest.mark.parametrize(
    "snippet, member",
    [
        # The defect of issue 12 item 1: qMRMLSegmentSelectorWidget has setCurrentNode, not setSegmentationNode.
        ("class W:\n    def f(self, node):\n        self.ui.targetSegmentSelector.setSegmentationNode(node)\n",
         "setSegmentationNode"),
        # A CTK widget's plain C++ method that is neither a slot nor invokable is not callable from Python.
        ("class W:\n    def f(self):\n        self.ui.exportPathLineEdit.setNameFilters([])\n", "setNameFilters"),
        # Wrong signal signature.
        ("class W:\n    def f(self):\n        self.ui.outputSegmentationSelector.connect('currentNodeChanged(vtkMRMLSegmentationNode*)', f)\n",
         "currentNodeChanged(vtkMRMLSegmentationNode*)"),
        # MRML: a misspelt method on a node typed by its factory, and on a chained return value.
        ("def f(scene):\n    roi = scene.AddNewNodeByClass('vtkMRMLMarkupsROINode')\n    roi.SetSizeWorldd(1, 2, 3)\n",
         "SetSizeWorldd"),
        ("def f(segmentation_node):\n    segmentation_node.GetSegmentation().GetSegment('a').SetTerminologyEntry('x')\n",
         "SetTerminologyEntry"),
        # A property that does not exist.
        ("class W:\n    def f(self):\n        self.ui.progressBar.maxValue = 3\n", "maxValue"),
        # A PythonQt decorator misspelt (slicer.app.testingEnabled() is one).
        ("def f():\n    return slicer.app.testingEnable()\n", "testingEnable"),
    ],
)
def test_a_wrong_name_is_rejected(snippet, member):
    checker = check_source(snippet, "snippet.py", LISTING, UI, NODE_MEMBERS)
    assert [v.member for v in checker.violations] == [member], checker.violations


def test_the_right_names_pass():
    snippet = (
        "class W:\n"
        "    def f(self, node):\n"
        "        self.ui.targetSegmentSelector.setCurrentNode(node)\n"
        "        self.ui.outputSegmentationSelector.connect('currentNodeChanged(vtkMRMLNode*)', print)\n"
        "        self.ui.progressBar.maximum = 3\n"
        "        return slicer.app.testingEnabled()\n"
    )
    assert not check_source(snippet, "snippet.py", LISTING, UI, NODE_MEMBERS).violations


@pytest.mark.parametrize(
    "snippet, member",
    [
        # LiverSAMTrain follows a run found in its run folder (LiverSAMTrainLib.AttachedProcess): the run folder field's
        # signal, the settle timer, the note under the settings.
        ("class W:\n    def f(self):\n        self.ui.outputPathLineEdit.connect('currentPathChanged(QVariant)', print)\n",
         "currentPathChanged(QVariant)"),
        ("class W:\n    def f(self):\n        self.ui.outputPathLineEdit.connect('pathChanged(QString)', print)\n",
         "pathChanged(QString)"),
        ("class W:\n    def f(self):\n        self.t = qt.QTimer()\n        self.t.setSingleShoot(True)\n", "setSingleShoot"),
        ("class W:\n    def f(self):\n        self.ui.runFolderStatusLabel.shown = False\n", "shown"),
        ("class W:\n    def f(self):\n        self.ui.runFolderStatusLabel.setTxt('x')\n", "setTxt"),
        # the run folder kept in Slicer's settings (session 40): put back in the field when the widget is set up
        ("class W:\n    def f(self):\n        qt.QSettings().setValu('k', 'x')\n", "setValu"),
        ("class W:\n    def f(self):\n        return qt.QSettings().values('k', '')\n", "values"),
        ("class W:\n    def f(self):\n        self.ui.outputPathLineEdit.path = 'x'\n", "path"),
    ],
)
def test_the_train_modules_run_folder_calls_are_checked(snippet, member):
    checker = check_source(snippet, "snippet.py", LISTING, TRAIN_UI, NODE_MEMBERS)
    assert [v.member for v in checker.violations] == [member], checker.violations


def test_the_train_modules_run_folder_calls_pass():
    snippet = (
        "class W:\n"
        "    def f(self):\n"
        "        self.t = qt.QTimer()\n"
        "        self.t.setSingleShot(True)\n"
        "        self.t.setInterval(500)\n"
        "        self.t.connect('timeout()', print)\n"
        "        self.ui.outputPathLineEdit.connect('currentPathChanged(QString)', print)\n"
        "        self.ui.runFolderStatusLabel.setText('x')\n"
        "        self.ui.runFolderStatusLabel.visible = False\n"
        "        qt.QSettings().setValue('LiverSAMTrain/RunFolder', 'x')\n"
        "        self.ui.outputPathLineEdit.currentPath = str(qt.QSettings().value('LiverSAMTrain/RunFolder', ''))\n"
    )
    checker = check_source(snippet, "snippet.py", LISTING, TRAIN_UI, NODE_MEMBERS)
    assert not checker.violations and checker.checked == 9, (checker.violations, checker.checked)  # every call above
