"""LiverSAM: liver and liver-tumour segmentation in CT with a Segment Anything model, in 3D Slicer.

This file is the thin Qt layer: the module description, the widget (prompts, buttons, tables) and the
self-test. The work is done by ``LiverSAMLib`` (MRML-only logic, tested with pytest on slicer-core) and
the plain-Python core package ``liversam``.
"""

import logging
import os
from pathlib import Path

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LiverSAMLib import DependencyInstaller, MRMLBridge
from LiverSAMLib.InferenceWorker import InferenceWorker
from LiverSAMLib.ModelSession import ModelSession, SessionSettings
from LiverSAMLib.Parameters import LiverSAMParameterNode
from LiverSAMLib.SegmentationLogic import LIVER, SegmentationLogic

# Prompt markups: attribute that marks LiverSAM's prompt nodes, and their colours (RGB 0..1).
PROMPT_ATTRIBUTE = "LiverSAM.Prompt"
POSITIVE_COLOR = (0.2, 0.9, 0.2)
NEGATIVE_COLOR = (0.95, 0.2, 0.2)
BOX_COLOR = (1.0, 0.85, 0.1)
POLL_INTERVAL_MS = 50


class LiverSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LiverSAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["LiverSAM contributors"]
        self.parent.helpText = _(
            "Segment the liver and liver tumours in CT with a Segment Anything model (LiteMedSAM by default): "
            "draw a box or click points on a slice, propagate through the volume, review flagged slices, "
            "export as .seg.nrrd, labelmap or DICOM SEG. "
            'See <a href="https://github.com/liversam/LiverSAM#using-liversam-in-slicer">the documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "Uses LiteMedSAM (Ma et al., MedSAM, Nature Communications 2024) and Segment Anything (Kirillov et al. 2023)."
        )


# ---------------------------------------------------------------------------------------------------
# Widget
# ---------------------------------------------------------------------------------------------------
class LiverSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._worker = None
        self._session = None
        self._pollTimer = None
        self._liveTimer = None
        self._observedPromptNodes = []
        self._runningJob = None
        self._shortcuts = []
        self._lesions = []

    # --- setup / teardown -----------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LiverSAMLogic(segmentEditorHistory=SegmentEditorHistory.create())
        self._worker = InferenceWorker()
        self._session = ModelSession()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._worker.poll)
        self._pollTimer.start()
        self._liveTimer = qt.QTimer()
        self._liveTimer.setSingleShot(True)
        self._liveTimer.setInterval(150)  # coalesce a burst of markup events into one update
        self._liveTimer.connect("timeout()", self.onLiveUpdate)

        self._populateModels()
        for table in (self.ui.reviewTable, self.ui.lesionTable):
            table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
            table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.outputSegmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.onOutputSegmentationChanged
        )
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.targetSegmentSelector.connect("currentSegmentChanged(QString)", self.onTargetSegmentChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.addCheckpointButton.connect("clicked(bool)", self.onAddCheckpoint)
        self.ui.createStandardSegmentsButton.connect("clicked(bool)", self.onCreateStandardSegments)
        self.ui.positivePointButton.connect("toggled(bool)", lambda on: self.onPlacePrompt("positive", on))
        self.ui.negativePointButton.connect("toggled(bool)", lambda on: self.onPlacePrompt("negative", on))
        self.ui.boxButton.connect("toggled(bool)", lambda on: self.onPlacePrompt("box", on))
        self.ui.segmentSliceButton.connect("clicked(bool)", self.onSegmentSlices)
        self.ui.clearPromptsButton.connect("clicked(bool)", self.onClearPrompts)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.reviewTable.connect("cellClicked(int,int)", self.onReviewRowClicked)
        self.ui.lesionTable.connect("cellClicked(int,int)", self.onLesionRowClicked)
        self.ui.updateLesionsButton.connect("clicked(bool)", self.onUpdateLesions)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._uninstallShortcuts()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._worker is not None:
            self._worker.shutdown()
        if self._session is not None:
            self._session.release()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._populateModels()  # LiverSAMTrain may have registered a model meanwhile
        self._installShortcuts()

    def _installShortcuts(self) -> None:
        """Ctrl+Z / Ctrl+Y (platform undo / redo keys) undo and redo like manual edits while LiverSAM is shown."""
        self._uninstallShortcuts()
        for keys, slot in ((qt.QKeySequence.Undo, self.onUndo), (qt.QKeySequence.Redo, self.onRedo)):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

    def _uninstallShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.activated.disconnect()
            shortcut.setParent(None)
        self._shortcuts = []

    def exit(self) -> None:
        self._uninstallShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIState)
        self._stopPlacing()

    def onSceneStartClose(self, caller, event) -> None:
        if self._worker is not None:
            self._worker.cancel_all()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node ---------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIState)
            self._observePromptNodes()
            self._updateGUIState()

    def _updateGUIState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        ready = bool(p.inputVolume and p.outputSegmentation)
        busy = self._runningJob is not None
        for button in (self.ui.segmentSliceButton, self.ui.propagateButton):
            button.enabled = ready and not busy
        self.ui.cancelButton.enabled = busy
        self.ui.exportButton.enabled = bool(p.outputSegmentation and p.inputVolume) and not busy
        self.ui.targetSegmentSelector.setSegmentationNode(p.outputSegmentation)
        if p.targetSegmentID and self.ui.targetSegmentSelector.currentSegmentID() != p.targetSegmentID:
            self.ui.targetSegmentSelector.setCurrentSegmentID(p.targetSegmentID)
        index = self.ui.modelComboBox.findData(p.model)
        if index >= 0 and index != self.ui.modelComboBox.currentIndex:
            self.ui.modelComboBox.currentIndex = index

    # --- inputs ---------------------------------------------------------------------------------------------
    def _populateModels(self) -> None:
        """Fill the model selector from ``liversam.models.available_models()`` (built-in + LiverSAMTrain)."""
        from LiverSAMLib.ModelSession import model_choices

        current = self._parameterNode.model if self._parameterNode else ""
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        try:
            combo.clear()
            for choice in model_choices(extra=[current] if current else []):
                combo.addItem(choice.label, choice.name)
                combo.setItemData(combo.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
            index = combo.findData(current) if current else 0
            combo.currentIndex = max(index, 0)
        finally:
            combo.blockSignals(False)

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def onAddCheckpoint(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent,
            _("Select a SAM / MedSAM / LiverSAMTrain checkpoint"),
            "",
            _("Checkpoints (*.pth *.pt)"),
        )
        if path:
            self.ui.modelComboBox.addItem(Path(path).name, path)
            self.ui.modelComboBox.currentIndex = self.ui.modelComboBox.count - 1

    def onInputVolumeChanged(self, node) -> None:
        self._updateGUIState()

    def onOutputSegmentationChanged(self, node) -> None:
        if node is not None and self._parameterNode and self._parameterNode.inputVolume:
            self.logic.segmentation.prepare_segmentation(node, self._parameterNode.inputVolume)
            ids = self.logic.segmentation.ensure_standard_segments(node)
            if not self._parameterNode.targetSegmentID:
                self._parameterNode.targetSegmentID = ids[LIVER]
        self._updateGUIState()

    def onTargetSegmentChanged(self, segmentID: str) -> None:
        if self._parameterNode and segmentID != self._parameterNode.targetSegmentID:
            self._parameterNode.targetSegmentID = segmentID

    def onCreateStandardSegments(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not create the segments."), waitCursor=True):
            if not p.outputSegmentation:
                p.outputSegmentation = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", "LiverSAM"
                )
            self.logic.segmentation.prepare_segmentation(p.outputSegmentation, p.inputVolume)
            ids = self.logic.segmentation.ensure_standard_segments(p.outputSegmentation)
            p.targetSegmentID = p.targetSegmentID or ids[LIVER]

    # --- prompts ----------------------------------------------------------------------------------------------
    def _promptNode(self, kind: str):
        """The markups node of a prompt kind (created and referenced in the parameter node on first use)."""
        p = self._parameterNode
        attribute = {"positive": "positivePoints", "negative": "negativePoints", "box": "boxROI"}[kind]
        node = getattr(p, attribute)
        if node is None:
            className = "vtkMRMLMarkupsROINode" if kind == "box" else "vtkMRMLMarkupsFiducialNode"
            node = slicer.mrmlScene.AddNewNodeByClass(
                className, slicer.mrmlScene.GenerateUniqueName(f"LiverSAM {kind}")
            )
            node.SetAttribute(PROMPT_ATTRIBUTE, kind)
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            display.SetSelectedColor(
                {"positive": POSITIVE_COLOR, "negative": NEGATIVE_COLOR, "box": BOX_COLOR}[kind]
            )
            display.SetPointLabelsVisibility(False)
            setattr(p, attribute, node)
            self._observePromptNodes()
        return node

    def _observePromptNodes(self) -> None:
        for node in self._observedPromptNodes:
            self.removeObserver(
                node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onPromptsChanged
            )
            self.removeObserver(
                node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self._onPromptsChanged
            )
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointRemovedEvent, self._onPromptsChanged)
        self._observedPromptNodes = []
        p = self._parameterNode
        if p is None:
            return
        for node in (p.positivePoints, p.negativePoints, p.boxROI):
            if node is not None:
                self.addObserver(
                    node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onPromptsChanged
                )
                self.addObserver(
                    node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self._onPromptsChanged
                )
                self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointRemovedEvent, self._onPromptsChanged)
                self._observedPromptNodes.append(node)

    def onPlacePrompt(self, kind: str, on: bool) -> None:
        buttons = {
            "positive": self.ui.positivePointButton,
            "negative": self.ui.negativePointButton,
            "box": self.ui.boxButton,
        }
        if not on:
            if not any(b.checked for b in buttons.values()):
                self._stopPlacing()
            return
        for other, button in buttons.items():
            if other != kind and button.checked:
                button.blockSignals(True)
                button.checked = False
                button.blockSignals(False)
        node = self._promptNode(kind)
        if kind == "box" and node.GetNumberOfControlPoints() > 0:
            node.RemoveAllControlPoints()  # a new box replaces the previous one
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selectionNode.SetActivePlaceNodeID(node.GetID())
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetPlaceModePersistence(kind != "box")
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def _stopPlacing(self) -> None:
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        if interactionNode.GetCurrentInteractionMode() == interactionNode.Place:
            interactionNode.SetCurrentInteractionMode(interactionNode.ViewTransform)

    def _onPromptsChanged(self, caller=None, event=None) -> None:
        if self._parameterNode and self._parameterNode.liveUpdate:
            self._liveTimer.start()

    def onClearPrompts(self) -> None:
        p = self._parameterNode
        for node in (p.positivePoints, p.negativePoints, p.boxROI):
            if node is not None:
                node.RemoveAllControlPoints()
        if p.outputSegmentation and p.targetSegmentID:
            # New prompts start a new propagation (not a fix of the previous one).
            self.logic.forgetPropagation(p.outputSegmentation, p.targetSegmentID)

    def _markupsPrompts(self):
        p = self._parameterNode
        geometry = MRMLBridge.geometry_from_volume_node(p.inputVolume)
        return MRMLBridge.prompts_from_markups(geometry, [p.positivePoints], [p.negativePoints], [p.boxROI])

    # --- running the model --------------------------------------------------------------------------------
    def _sessionSettings(self) -> SessionSettings:
        p = self._parameterNode
        return SessionSettings(
            model=p.model,
            device=p.device,
            window_level_hu=p.windowLevel,
            window_width_hu=p.windowWidth,
            cache_mb=p.cacheMB,
        )

    def _ensureDependencies(self) -> bool:
        return DependencyInstaller.ensure_dependencies(self.logic.requirementsPath(), requester="LiverSAM")

    def _targetSegment(self):
        """(segment ID, clip-to segment ID or None) for the current target."""
        p = self._parameterNode
        segmentation = p.outputSegmentation.GetSegmentation()
        targetID = p.targetSegmentID or segmentation.GetSegmentIdBySegmentName(LIVER)
        if not targetID or segmentation.GetSegment(targetID) is None:
            targetID = self.logic.segmentation.ensure_segment(p.outputSegmentation, LIVER)
            p.targetSegmentID = targetID
        clipID = None
        if p.postprocess.clipTumorToLiver and segmentation.GetSegment(targetID).GetName().lower() != LIVER:
            liverID = segmentation.GetSegmentIdBySegmentName(LIVER)
            if liverID and not self.logic.segmentation.segment_is_empty(p.outputSegmentation, liverID):
                clipID = liverID
        return targetID, clipID

    def _currentSliceK(self, volumeNode):
        """The slice index k shown in the Red slice view (where the user works), or None."""
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager else None
        if sliceWidget is None:
            return None
        sliceToRAS = sliceWidget.mrmlSliceNode().GetSliceToRAS()
        centerRAS = [sliceToRAS.GetElement(r, 3) for r in range(3)]
        geometry = MRMLBridge.geometry_from_volume_node(volumeNode)
        k = int(round(float(geometry.ras_to_ijk([centerRAS])[0][2])))
        return k if 0 <= k < geometry.size_ijk[2] else None

    def onLiveUpdate(self) -> None:
        p = self._parameterNode
        if p is None or not (p.inputVolume and p.outputSegmentation) or self._runningJob is not None:
            return
        self.onSegmentSlices(live=True)

    def onSegmentSlices(self, checked=False, live: bool = False) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(
            _("Segmentation of the prompted slices failed."), waitCursor=not live
        ):
            if not self._ensureDependencies():
                return
            prompts = self._markupsPrompts()
            if prompts.is_empty():
                self.ui.statusLabel.text = _("Place a box or a positive point on a slice first.")
                return
            ctVolume, volumeKey = self.logic.segmentation.volume_copy(p.inputVolume)
            settings = self._sessionSettings()
            targetID, clipID = self._targetSegment()
            segmentationNode, volumeNode = p.outputSegmentation, p.inputVolume
            session = self._session
            focusK = self._currentSliceK(volumeNode)
            if focusK is None:
                focusK = prompts.slices[-1]
            prefetchRadius = int(p.prefetchRadius)

            def compute(context):
                predictions = SegmentationLogic.predict_prompted_slices(
                    session, settings, ctVolume, volumeKey, prompts, cancel=context.cancelled
                )
                # Encode the neighbours of the slice the user works on while they look at the result.
                session.prefetch_around(focusK, prefetchRadius)
                return predictions

            def done(predictions):
                with slicer.util.tryWithErrorDisplay(_("Could not write the result into the segment.")):
                    self.logic.segmentation.apply_slice_predictions(
                        predictions, segmentationNode, targetID, volumeNode, clipID
                    )
                    scores = ", ".join(f"slice {pr.k}: {pr.score:.2f}" for pr in predictions)
                    self.ui.statusLabel.text = _("Model score (predicted IoU): {scores}").format(
                        scores=scores
                    )

            self.ui.statusLabel.text = _("Segmenting {n} slice(s)...").format(n=len(prompts.slices))
            self._worker.run(
                compute,
                on_done=done,
                on_error=self._onJobError,
                coalesce_key="live",
                name="slice segmentation",
            )

    def onPropagate(self) -> None:
        """Propagate the target segment; after a propagation, changed prompts only fix their part.

        When the segment was propagated before (same CT, same settings) and the prompts only gained or
        changed slices (e.g. points placed on a flagged slice), only the slices between the neighbouring
        prompted slices are recomputed and written; otherwise the whole segment is propagated again.
        """
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Propagation failed to start."), waitCursor=True):
            if not self._ensureDependencies():
                return
            prompts = self._markupsPrompts()
            if prompts.is_empty():
                raise ValueError(_("Place a box or a positive point on at least one slice first."))
            ctVolume, volumeKey = self.logic.segmentation.volume_copy(p.inputVolume)
            settings = self._sessionSettings()
            targetID, clipID = self._targetSegment()
            segmentationNode, volumeNode = p.outputSegmentation, p.inputVolume
            segment = segmentationNode.GetSegmentation().GetSegment(targetID)
            name, color = segment.GetName(), tuple(segment.GetColor())
            inside = LIVER if clipID else None
            segmentPrompts = SegmentationLogic.segment_prompts(
                name, 2 if inside else 1, prompts, inside=inside, color=color
            )
            pipelineSettings = self.logic.pipelineSettings(p)
            reviewSettings = self.logic.reviewSettings(p)
            given = prompts.to_slice_prompts()
            session = self._session
            liverMask = MRMLBridge.segment_mask(segmentationNode, clipID, volumeNode) if clipID else None
            protect = {name: [LIVER]} if clipID else None
            record = self.logic.propagationRecord(segmentationNode, targetID)
            fixSlices = self.logic.planRepropagation(record, given, volumeKey, pipelineSettings)

            if fixSlices:
                existing = MRMLBridge.segment_mask(segmentationNode, targetID, volumeNode)

                def compute(context):
                    return self.logic.repropagate(session, settings, ctVolume, volumeKey, record, given, fixSlices,
                                                  existing, name, segmentPrompts.label, color, liverMask,
                                                  progress=context.progress, cancel=context.cancelled)  # fmt: skip

                def done(fix):
                    self._setRunning(None)
                    with slicer.util.tryWithErrorDisplay(_("Could not write the re-propagated slices.")):
                        if fix.k_range is not None:
                            self.logic.segmentation.apply_result(
                                fix.result, segmentationNode, volumeNode, k_range=fix.k_range, protect=protect
                            )
                        self.logic.rememberPropagation(segmentationNode, targetID, fix.record)
                        self._fillReviewTable(fix.result, reviewSettings)
                        self.ui.statusLabel.text = (
                            _("Fixed slice(s) {fixed}; slices {first}-{last} re-propagated.").format(
                                fixed=", ".join(str(k) for k in fixSlices),
                                first=fix.k_range[0],
                                last=fix.k_range[1],
                            )
                            if fix.k_range
                            else _("The fix changed nothing.")
                        )

                name_of_job = "re-propagation"
            else:

                def compute(context):
                    return self.logic.propagate(session, settings, ctVolume, volumeKey, segmentPrompts, pipelineSettings,
                                                liverMask, progress=context.progress, cancel=context.cancelled)  # fmt: skip

                def done(result):
                    self._setRunning(None)
                    with slicer.util.tryWithErrorDisplay(_("Could not write the propagated result.")):
                        self.logic.segmentation.apply_result(
                            result, segmentationNode, volumeNode, protect=protect
                        )
                        self.logic.rememberPropagation(
                            segmentationNode,
                            targetID,
                            self.logic.recordFromResult(
                                result, segmentPrompts, given, volumeKey, pipelineSettings
                            ),
                        )
                        self._fillReviewTable(result, reviewSettings)
                        self.ui.statusLabel.text = _("Propagation done.")

                name_of_job = "propagation"

            def cancelled():
                self._setRunning(None)
                self.ui.statusLabel.text = _("Propagation cancelled; the segmentation was not changed.")

            job = self._worker.run(
                compute, on_done=done, on_error=self._onJobError, on_progress=self._onProgress, on_cancelled=cancelled,
                name=name_of_job,
            )  # fmt: skip
            self._setRunning(job)

    def onCancel(self) -> None:
        self._worker.cancel_all()

    def _setRunning(self, job) -> None:
        self._runningJob = job
        self.ui.progressBar.visible = job is not None
        self.ui.progressBar.value = 0
        self._updateGUIState()

    def _onProgress(self, done: int, total: int, message: str = "") -> None:
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = done
        if message:
            self.ui.statusLabel.text = message

    def _onJobError(self, error: BaseException) -> None:
        self._setRunning(None)
        logging.error("LiverSAM: %s", error)
        slicer.util.errorDisplay(_("LiverSAM failed: {error}").format(error=error))

    def onUndo(self) -> None:
        """Undo the last change of the segmentation (LiverSAM's or a manual Segment Editor edit)."""
        self.logic.segmentation.undo()

    def onRedo(self) -> None:
        self.logic.segmentation.redo()

    # --- review and lesions ----------------------------------------------------------------------------------
    def _fillReviewTable(self, result, reviewSettings=None) -> None:
        rows = self.logic.reviewRows(result, reviewSettings)
        table = self.ui.reviewTable
        table.clear()
        table.setColumnCount(5)
        table.setHorizontalHeaderLabels([_("Slice"), _("Segment"), _("Why"), _("Area (mm²)"), _("Score")])
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            score = "" if row.score is None else f"{row.score:.2f}"
            for c, value in enumerate((str(row.k), row.segment, row.reason, f"{row.area_mm2:.0f}", score)):
                table.setItem(r, c, qt.QTableWidgetItem(value))
        self.ui.reviewCollapsibleButton.collapsed = False
        tracks = self.logic.trackSummary(result)
        if tracks:
            self.ui.reviewLabel.toolTip = "\n".join(tracks)
        self.ui.reviewLabel.text = (
            _("{n} slice(s) to check (click to jump, fix with points, press Propagate):").format(n=len(rows))
            if rows
            else _("No slice flagged.")
        )

    def onReviewRowClicked(self, row: int, column: int) -> None:
        k = int(self.ui.reviewTable.item(row, 0).text())
        self._jumpToIJK(self._parameterNode.inputVolume, None, None, k)

    def onUpdateLesions(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not compute the lesion table."), waitCursor=True):
            self._lesions = self.logic.lesionTable(p.outputSegmentation, p.inputVolume)
            table = self.ui.lesionTable
            table.clear()
            table.setColumnCount(4)
            table.setHorizontalHeaderLabels(
                [_("Lesion"), _("Volume (mL)"), _("Longest axial diameter (mm)"), _("Slices")]
            )
            table.setRowCount(len(self._lesions))
            for r, lesion in enumerate(self._lesions):
                values = (
                    str(lesion.lesion_id),
                    f"{lesion.volume_ml:.2f}",
                    f"{lesion.longest_axial_diameter_mm:.1f}",
                    f"{lesion.slice_first}-{lesion.slice_last}",
                )
                for c, value in enumerate(values):
                    table.setItem(r, c, qt.QTableWidgetItem(value))

    def onLesionRowClicked(self, row: int, column: int) -> None:
        if 0 <= row < len(self._lesions):
            x, y, z = self._lesions[row].centre_lps
            slicer.modules.markups.logic().JumpSlicesToLocation(-x, -y, z, True)  # LPS -> RAS

    @staticmethod
    def _jumpToIJK(volumeNode, i, j, k) -> None:
        geometry = MRMLBridge.geometry_from_volume_node(volumeNode)
        ni, nj, _nk = geometry.size_ijk
        point_ras = geometry.ijk_to_ras([i if i is not None else ni / 2, j if j is not None else nj / 2, k])
        slicer.modules.markups.logic().JumpSlicesToLocation(*point_ras, True)

    # --- export ------------------------------------------------------------------------------------------------
    def onExport(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            path = self.logic.export(
                p.outputSegmentation, p.inputVolume, str(p.exportPath), p.exportFormat, modelName=p.model
            )
            self.ui.statusLabel.text = _("Written {path}").format(path=path)


# ---------------------------------------------------------------------------------------------------
# Undo shared with the Segment Editor
# ---------------------------------------------------------------------------------------------------
class SegmentEditorHistory:
    """The Segment Editor module's undo history, so LiverSAM's writes and manual edits undo together.

    ``qMRMLSegmentEditorWidget.saveStateForUndo()`` / ``undo()`` / ``redo()`` (Slicer >= 5.10) act on the
    widget's ``vtkSlicerSegmentEditorLogic``, whose history follows the segmentation named by its
    ``vtkMRMLSegmentEditorNode``. LiverSAM's ``SegmentationLogic`` uses the same singleton editor node and
    sets its segmentation before every write, so once the Segment Editor widget uses that node too, one
    history holds both. Ctrl+Z in the Segment Editor or in LiverSAM undoes them in order.
    """

    def __init__(self, editorNodeProvider=None) -> None:
        self.editorNodeProvider = editorNodeProvider  # () -> the shared vtkMRMLSegmentEditorNode

    @staticmethod
    def create():
        """A history bound to the Segment Editor module, or None when that module is not available."""
        if not hasattr(slicer.modules, "segmenteditor"):
            return None
        return SegmentEditorHistory()

    def editorWidget(self):
        """The Segment Editor module's ``qMRMLSegmentEditorWidget``, using the shared editor node."""
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        node = self.editorNodeProvider() if self.editorNodeProvider else None
        if node is not None:
            current = editor.mrmlSegmentEditorNode()
            if current is None or current.GetID() != node.GetID():
                editor.setMRMLSegmentEditorNode(node)
        return editor

    def saveStateForUndo(self) -> None:
        self.editorWidget().saveStateForUndo()

    def undo(self) -> None:
        self.editorWidget().undo()

    def redo(self) -> None:
        self.editorWidget().redo()


# ---------------------------------------------------------------------------------------------------
# Logic
# ---------------------------------------------------------------------------------------------------
class LiverSAMLogic(ScriptedLoadableModuleLogic):
    """Module logic: the parameter node plus :class:`LiverSAMLib.SegmentationLogic.SegmentationLogic`.

    ``segmentEditorHistory`` (a :class:`SegmentEditorHistory`) makes undo shared with the Segment Editor;
    without it the logic keeps its own undo history. Usable without the widget, e.g. from the console::

        logic = slicer.modules.liversam.widgetRepresentation().self().logic
    """

    def __init__(self, segmentEditorHistory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        history = segmentEditorHistory
        self.segmentation = SegmentationLogic(
            save_state_for_undo=history.saveStateForUndo if history else None,
            undo_shared=history.undo if history else None,
            redo_shared=history.redo if history else None,
        )
        if history is not None:
            history.editorNodeProvider = self.segmentation.editor_node
        # (segmentation node ID, segment ID) -> PropagationRecord of the last propagation / fix.
        self._propagationRecords = {}

    def getParameterNode(self):
        return LiverSAMParameterNode(super().getParameterNode())

    @staticmethod
    def requirementsPath() -> str:
        return os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt")

    # --- settings from the parameter node -----------------------------------------------------------
    @staticmethod
    def pipelineSettings(parameterNode):
        """The core's ``PipelineSettings``: the ``postprocess`` pack and the ``propagation`` pack."""
        from LiverSAMLib.ModelSession import core_postprocess_settings, propagation_settings_from_parameters

        pp = parameterNode.postprocess
        return core_postprocess_settings(
            fill_holes=pp.fillHoles,
            min_island_mm3=pp.minIslandVolumeMm3,
            keep_largest=pp.keepLargestComponent,
            closing_mm=pp.closingRadiusMm,
            propagation=propagation_settings_from_parameters(parameterNode.propagation),
        )

    @staticmethod
    def reviewSettings(parameterNode):
        from LiverSAMLib.ModelSession import review_settings_from_parameters

        return review_settings_from_parameters(parameterNode.review)

    # --- propagation and fixes (compute parts run on the worker thread; no MRML) --------------------------
    @staticmethod
    def propagate(
        session,
        settings,
        ctVolume,
        volumeKey,
        segmentPrompts,
        pipelineSettings,
        liverMask=None,
        progress=None,
        cancel=None,
    ):
        """Propagate one segment through the volume (worker thread; no MRML)."""
        from LiverSAMLib.ModelSession import propagate_segment

        return propagate_segment(
            session,
            settings,
            ctVolume,
            volumeKey,
            segmentPrompts,
            pipelineSettings,
            liverMask,
            progress,
            cancel,
        )

    @staticmethod
    def repropagate(session, settings, ctVolume, volumeKey, record, given, fixSlices, existing, name, label, color,
                    liverMask=None, progress=None, cancel=None):  # fmt: skip
        """Fix slices and re-propagate only the part they affect (worker thread; no MRML)."""
        from LiverSAMLib.ModelSession import repropagate_segment

        return repropagate_segment(
            session, settings, ctVolume, volumeKey, record, given, fixSlices, existing, name, label, color,
            container_kji=liverMask, progress=progress, cancel=cancel,
        )  # fmt: skip

    @staticmethod
    def planRepropagation(record, given, volumeKey, pipelineSettings):
        from LiverSAMLib.ModelSession import plan_repropagation

        return plan_repropagation(record, given, volumeKey, pipelineSettings)

    @staticmethod
    def recordFromResult(result, segmentPrompts, given, volumeKey, pipelineSettings):
        from LiverSAMLib.ModelSession import record_from_result

        return record_from_result(result, segmentPrompts, given, volumeKey, pipelineSettings)

    def propagationRecord(self, segmentationNode, segmentID):
        return self._propagationRecords.get((segmentationNode.GetID(), segmentID))

    def rememberPropagation(self, segmentationNode, segmentID, record) -> None:
        self._propagationRecords[(segmentationNode.GetID(), segmentID)] = record

    def forgetPropagation(self, segmentationNode, segmentID) -> None:
        self._propagationRecords.pop((segmentationNode.GetID(), segmentID), None)

    # --- review, lesions, export ------------------------------------------------------------------------
    @staticmethod
    def reviewRows(result, reviewSettings=None) -> list:
        from LiverSAMLib.ModelSession import review_rows

        return review_rows(result, reviewSettings)

    @staticmethod
    def trackSummary(result) -> list:
        from LiverSAMLib.ModelSession import track_summary

        return track_summary(result)

    def lesionTable(self, segmentationNode, volumeNode) -> list:
        """``liversam.lesions.Lesion`` rows of the ``tumor`` segment (largest first)."""
        return self.segmentation.lesion_table(segmentationNode, volumeNode)

    def export(self, segmentationNode, volumeNode, path: str, exportFormat: str, modelName: str = "") -> Path:
        from LiverSAMLib.SegmentationLogic import dicom_reference_of_volume

        if not path or path == ".":
            raise ValueError(_("Choose an output file first."))
        if exportFormat == ".seg.nrrd":
            return self.segmentation.export_seg_nrrd(segmentationNode, path)
        if exportFormat.startswith("labelmap"):
            return self.segmentation.export_labelmap(segmentationNode, volumeNode, path)
        files, seriesUID = dicom_reference_of_volume(volumeNode)
        return self.segmentation.export_dicom_seg(
            segmentationNode, volumeNode, path, files, model_name=Path(modelName).name, series_uid=seriesUID
        )


# ---------------------------------------------------------------------------------------------------
# Self-test (runs in the Slicer application: ctest or the "Reload and Test" button)
# ---------------------------------------------------------------------------------------------------
class LiverSAMTest(ScriptedLoadableModuleTest):
    """Loads the example CT, places a box and points, runs LiteMedSAM, checks Dice against the reference."""

    # Minimum Dice of the liver on the prompted slice and after propagation (LiteMedSAM, example CT).
    MIN_SLICE_DICE = 0.85
    MIN_VOLUME_DICE = 0.80

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LiverSAM_box_and_points()
        self.setUp()
        self.test_LiverSAM_ct_unchanged_and_undo()
        self.setUp()
        self.test_LiverSAM_undo_shared_with_segment_editor()

    def _exampleFiles(self):
        """The example CT and its reference labels (liver=1, tumour=2) shipped with the repository."""
        moduleDir = Path(__file__).resolve().parent
        for base in (
            moduleDir.parent / "examples" / "lits117",
            Path(os.environ.get("LIVERSAM_TEST_DATA", "")) / "lits117",
        ):
            ct, label = base / "ct.nii.gz", base / "label.nii.gz"
            if ct.is_file() and label.is_file():
                return ct, label
        raise FileNotFoundError(
            "LiverSAM self-test: examples/lits117/ct.nii.gz not found (set LIVERSAM_TEST_DATA)."
        )

    def _loadCase(self):
        import numpy as np

        ctPath, labelPath = self._exampleFiles()
        volumeNode = slicer.util.loadVolume(str(ctPath))
        labelNode = slicer.util.loadLabelVolume(str(labelPath))
        reference = slicer.util.arrayFromVolume(labelNode) == 1
        return volumeNode, np.asarray(reference)

    @staticmethod
    def _dice(a, b) -> float:
        import numpy as np

        a, b = np.asarray(a, bool), np.asarray(b, bool)
        total = a.sum() + b.sum()
        return 1.0 if total == 0 else float(2 * (a & b).sum() / total)

    def _placeBoxAndPoint(self, volumeNode, referenceLiver, k):
        import numpy as np

        geometry = MRMLBridge.geometry_from_volume_node(volumeNode)
        js, is_ = np.nonzero(referenceLiver[k])
        corners_ijk = np.array([[is_.min(), js.min(), k], [is_.max(), js.max(), k]], dtype=float)
        corners_ras = geometry.ijk_to_ras(corners_ijk)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        roi.SetCenterWorld(*corners_ras.mean(axis=0))
        roi.SetSizeWorld(*np.maximum(np.abs(corners_ras[1] - corners_ras[0]), geometry.spacing_mm))
        inside = np.argwhere(referenceLiver[k])
        j, i = inside[len(inside) // 2]
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
        points.AddControlPoint(*geometry.ijk_to_ras([float(i), float(j), float(k)]))
        return roi, points

    def test_LiverSAM_box_and_points(self):
        import numpy as np

        self.delayDisplay("Loading the example CT")
        volumeNode, referenceLiver = self._loadCase()
        k = int(np.argmax(referenceLiver.sum(axis=(1, 2))))
        roi, points = self._placeBoxAndPoint(volumeNode, referenceLiver, k)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
        logic = LiverSAMLogic()
        logic.segmentation.prepare_segmentation(segmentationNode, volumeNode)
        ids = logic.segmentation.ensure_standard_segments(segmentationNode)

        self.delayDisplay("Segmenting the prompted slice")
        session = ModelSession()
        settings = SessionSettings(model="litemedsam", device="cpu")
        ctVolume, key = logic.segmentation.volume_copy(volumeNode)
        geometry = MRMLBridge.geometry_from_volume_node(volumeNode)
        prompts = MRMLBridge.prompts_from_markups(geometry, [points], [], [roi])
        self.assertEqual(prompts.slices, [k])
        predictions = SegmentationLogic.predict_prompted_slices(session, settings, ctVolume, key, prompts)
        logic.segmentation.apply_slice_predictions(predictions, segmentationNode, ids[LIVER], volumeNode)
        liver = MRMLBridge.segment_mask(segmentationNode, ids[LIVER], volumeNode)
        sliceDice = self._dice(liver[k], referenceLiver[k])
        self.delayDisplay(f"Slice {k} Dice {sliceDice:.3f}")
        self.assertGreater(sliceDice, self.MIN_SLICE_DICE)

        self.delayDisplay("Propagating")
        segmentPrompts = SegmentationLogic.segment_prompts(LIVER, 1, prompts)
        postprocess = logic.pipelineSettings(logic.getParameterNode())
        result = logic.propagate(session, settings, ctVolume, key, segmentPrompts, postprocess)
        logic.segmentation.apply_result(result, segmentationNode, volumeNode)
        liver = MRMLBridge.segment_mask(segmentationNode, ids[LIVER], volumeNode)
        volumeDice = self._dice(liver, referenceLiver)
        self.delayDisplay(f"Liver Dice after propagation {volumeDice:.3f}")
        self.assertGreater(volumeDice, self.MIN_VOLUME_DICE)
        self.delayDisplay("Test passed")

    def test_LiverSAM_ct_unchanged_and_undo(self):
        import numpy as np

        volumeNode, referenceLiver = self._loadCase()
        before = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        logic = LiverSAMLogic()
        logic.segmentation.prepare_segmentation(segmentationNode, volumeNode)
        liverID = logic.segmentation.ensure_segment(segmentationNode, LIVER)
        logic.segmentation.write_mask(segmentationNode, liverID, volumeNode, referenceLiver)
        self.assertEqual(
            self._dice(MRMLBridge.segment_mask(segmentationNode, liverID, volumeNode), referenceLiver), 1.0
        )
        logic.segmentation.undo()
        self.assertFalse(MRMLBridge.segment_mask(segmentationNode, liverID, volumeNode).any())
        self.assertTrue(np.array_equal(before, slicer.util.arrayFromVolume(volumeNode)))
        self.delayDisplay("Test passed")

    def test_LiverSAM_undo_shared_with_segment_editor(self):
        """A LiverSAM write and a manual edit go into the Segment Editor's one history: undo reverts both."""
        import numpy as np

        volumeNode, referenceLiver = self._loadCase()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        history = SegmentEditorHistory.create()
        self.assertIsNotNone(history, "the Segment Editor module is needed for shared undo")
        logic = LiverSAMLogic(segmentEditorHistory=history)
        logic.segmentation.prepare_segmentation(segmentationNode, volumeNode)
        liverID = logic.segmentation.ensure_segment(segmentationNode, LIVER)
        logic.segmentation.write_mask(segmentationNode, liverID, volumeNode, referenceLiver)
        editor = history.editorWidget()
        self.assertEqual(editor.segmentationNode(), segmentationNode)
        # A "manual edit": the Segment Editor saves its state, then a segment is changed.
        editor.saveStateForUndo()
        k = int(np.argmax(referenceLiver.sum(axis=(1, 2))))
        edited = referenceLiver.copy()
        edited[k] = False
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            edited.astype(np.uint8), segmentationNode, liverID, volumeNode
        )
        editor.undo()  # reverts the manual edit
        self.assertEqual(
            self._dice(MRMLBridge.segment_mask(segmentationNode, liverID, volumeNode), referenceLiver), 1.0
        )
        logic.segmentation.undo()  # reverts LiverSAM's write, through the same history
        self.assertFalse(MRMLBridge.segment_mask(segmentationNode, liverID, volumeNode).any())
        self.delayDisplay("Test passed")
