"""LiverSAMTrain: fine-tune LiverSAM's model on your own segmented CT cases (placeholder module).

The training engineer replaces this file with the full module (a training process started with
``PythonSlicer -m liversam train``, its progress polled, the best checkpoint registered so that the
LiverSAM module lists it).
"""

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class LiverSAMTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LiverSAM Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LiverSAM contributors"]
        self.parent.helpText = _(
            "Fine-tune LiverSAM's Segment Anything model on your own segmented CT cases."
        )
        self.parent.acknowledgementText = ""


class LiverSAMTrainWidget(ScriptedLoadableModuleWidget):
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)


class LiverSAMTrainLogic(ScriptedLoadableModuleLogic):
    pass


class LiverSAMTrainTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
        self.assertIsNotNone(LiverSAMTrainLogic())
