"""LiverSAMTrain: fine-tune LiverSAM's Segment Anything model on your own segmented CT studies, in 3D Slicer.

Thin Qt layer: the widget collects the settings, exports loaded volume + segmentation pairs, and runs
``<LiverSAM python> -m liversam train ...`` -- the LiverSAM Python environment of LiverSAM's Server
section, which has torch; Slicer's own Python gets none -- in a background process
(``LiverSAMTrainLib.TrainingProcess``) whose log a ``QTimer`` polls, so Slicer stays responsive. The process
keeps running when Slicer closes (it has its own process group and log file); a widget made again (the module
reloaded, Slicer opened again) puts back the run folder of the last run started or followed (Slicer's settings) and
finds a ``liversam train`` that holds the run folder chosen and shows it, Stop included
(``LiverSAMTrainLib.AttachedProcess``), as does choosing another run folder. Curves go to a table and one plot
chart per quantity (validation Dice, training loss, validation loss: Slicer's plot chart has one y axis); the
"Curves" list chooses the chart shown in the layout's plot view, once per run unless chosen again; they are the run
folder chosen's (emptied when it has none, never the last run's left in place). The best
model is registered by ``liversam train --name`` so that the LiverSAM server offers it. The logic
(``LiverSAMTrainLib.TrainingLogic``) has no Qt and is tested on slicer-core's MRML. Minimum Slicer version: 5.10
(``LiverSAMLib.SlicerCompatibility``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from LiverSAMLib.SlicerCompatibility import version_problem
from LiverSAMTrainLib import TrainingLogic
from LiverSAMTrainLib.AttachedProcess import AttachedProcess, StopRefused
from LiverSAMTrainLib.TrainingProcess import PROCESS_RECORD_NAME, TrainingProcess

POLL_INTERVAL_MS = 500
#: the run folder typed or chosen is looked at (is a training process running there?) once it has not changed this long
#: (ctkPathLineEdit emits currentPathChanged at every keystroke)
RUN_FOLDER_SETTLE_MS = 500
#: Slicer's settings (qt.QSettings): the run folder of the last run started or followed, put back in the run folder field
#: when the widget is set up (Slicer opened again, the module reloaded: the new widget's field is empty), so that a run
#: still going on there is followed again
RUN_FOLDER_SETTING = "LiverSAMTrain/RunFolder"


class LiverSAMTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LiverSAM Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        # liversam core + LiverSAMLib come from the LiverSAM module; the curves use the Plots module.
        self.parent.dependencies = ["LiverSAM", "Plots"]
        self.parent.contributors = ["LiverSAM contributors"]
        self.parent.helpText = _(
            "Fine-tune LiverSAM's Segment Anything model on your own segmented CT studies (a data folder, or "
            "loaded volume + segmentation pairs). Training runs in a background process, can be stopped and "
            "resumed, shows its curves, and registers the best model so that the LiverSAM module offers it."
        )
        self.parent.acknowledgementText = _("Fine-tunes LiteMedSAM (Ma et al., Nature Communications 2024).")


class LiverSAMTrainLogic(ScriptedLoadableModuleLogic):
    """Module logic: the MRML-only functions of ``TrainingLogic`` plus one background training process."""

    def __init__(self, process=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.process = process or TrainingProcess()
        self.tableNode = None
        self.chartNodes: dict = {}  # TrainingLogic.CHARTS key -> vtkMRMLPlotChartNode
        # per run folder: the process followed there until another folder was chosen (it was still running then)
        self._detached: dict[str, AttachedProcess] = {}

    def start(self, settings: TrainingLogic.TrainingSettings, python: str) -> list:
        """Start ``liversam train`` in the LiverSAM environment ``python`` (checked once: raises with the reason).
        Blocks while a first check of ``python`` imports torch: the widget runs :meth:`checkEnvironment` first."""
        problem = TrainingLogic.environment_problem(python)
        if problem:
            raise RuntimeError(problem)
        command = TrainingLogic.build_train_command(settings, python=python)
        if self.attached:  # an attached process has ended (Start is disabled while it runs): this one is started here
            self.process = TrainingProcess()
        self.process.start(
            command, Path(settings.out) / TrainingLogic.CONSOLE_LOG_NAME, env=TrainingLogic.core_package_env(),
            record_path=Path(settings.out) / PROCESS_RECORD_NAME,
        )  # fmt: skip
        return command

    @property
    def attached(self) -> bool:
        """True when :attr:`process` is a ``liversam train`` this widget found holding a run folder (it did not start
        it, or lost track of it: the module reloaded, Slicer restarted)."""
        return isinstance(self.process, AttachedProcess)

    def attach(self, runDir: str) -> AttachedProcess | None:
        """The ``liversam train`` holding ``runDir``, which becomes :attr:`process`; None (:attr:`process` unchanged)
        when no process holds it. Call it only while :attr:`process` is not running (or is attached: then it is
        followed no longer, and keeps running)."""
        found = AttachedProcess.find(runDir)
        previous = self._detached.pop(_folderKey(found.run_dir), None) if found is not None else None
        if previous is not None and (found.pid, found.since, found.log_path) == (
            previous.pid, previous.since, previous.log_path
        ):  # fmt: skip
            found = previous  # followed before: its output is read on from where it was left (never shown twice)
        if found is not None:
            self.process = found
        return found

    def detach(self) -> None:
        """Follow an attached process no longer (it keeps running)."""
        if self.attached:
            self._detached[_folderKey(self.process.run_dir)] = self.process
            self.process = TrainingProcess()

    def checkEnvironment(self, python: str) -> TrainingLogic.EnvironmentCheck:
        """The check of ``python`` in a background process (already answered when ``python`` was checked before)."""
        return TrainingLogic.EnvironmentCheck(python)

    def stop(self) -> None:
        """Ask the training process to end (SIGTERM) and return at once; the widget's timer calls
        ``process.escalate_stop()``, which kills it after the grace period if it still runs. An attached process is
        signalled only while it still holds its run folder (``AttachedProcess.stop``: raises ``StopRefused`` when it
        cannot be stopped from here)."""
        self.process.stop()

    def updateCurves(self, runDir: str) -> None:
        self.tableNode, self.chartNodes = TrainingLogic.update_curves(
            Path(runDir) / "history.csv", table_node=self.tableNode, chart_nodes=self.chartNodes
        )

    def showRunFolderCurves(self, runDir: str) -> str:
        """The curves show ``runDir``'s own (its history.csv, read again), or none when it has no epoch yet or no run
        folder is chosen (the nodes emptied, not removed: ``TrainingLogic.run_folder_curves``); the layout is left
        alone. Returns "", or why its history.csv shows none (``liversam train`` did not write it:
        ``TrainingLogic.HistoryUnreadable``; the curves are emptied then)."""
        try:
            self.tableNode, self.chartNodes = TrainingLogic.run_folder_curves(
                runDir, slicer.mrmlScene, self.tableNode, self.chartNodes
            )
        except TrainingLogic.HistoryUnreadable as problem:
            self.tableNode, self.chartNodes = TrainingLogic.clear_curves(
                slicer.mrmlScene, self.tableNode, self.chartNodes
            )
            return str(problem)
        return ""

    def showChart(self, key: str):
        """Show the chart ``key`` (a :data:`TrainingLogic.CHARTS` key) in the layout's plot view (a layout with one is
        chosen when the current one has none); returns the chart node, or None when there are no curves yet. The curves
        already in the scene (the module reloaded) are adopted."""
        chart = self.chartNodes.get(key)
        if chart is None or chart.GetScene() is not slicer.mrmlScene:
            self.tableNode, self.chartNodes = TrainingLogic.curves_in_scene(
                slicer.mrmlScene, self.tableNode, self.chartNodes
            )
            chart = self.chartNodes.get(key)
        if chart is None:
            return None
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        return chart


def _folderKey(folder: str | Path) -> str:
    """One string for every path of one folder (a relative path, a trailing separator, a symbolic link)."""
    try:
        return str(Path(folder).resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python 3.12)
        return str(Path(folder).absolute())


def _sameFolder(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` name one folder (a relative path, a trailing separator, a symbolic link)."""
    return _folderKey(a) == _folderKey(b)


class LiverSAMTrainWidget(ScriptedLoadableModuleWidget):
    _segmentNamesHint = False  # the log advised liversam train's --liver-names / --tumor-names
    _stopProblem = ""  # why the last kill of a followed process was refused (said once in the log)

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self._timer = None
        self._runFolderTimer = None  # single-shot: the run folder field has settled (RUN_FOLDER_SETTLE_MS)
        self._pairs = []
        self._sceneObservation = None  # (scene, observer tag) of NodeRemovedEvent: pairs of removed nodes are dropped
        self._settings = None
        self._chartShown = None  # the chart node this module last showed in the layout
        self._historyStamp = None  # TrainingLogic.history_stamp of the curves shown
        self._check = None  # the environment check running before training starts (polled, never waited for)
        # the running process reported DONE: its run is complete, also when Stop was pressed after
        self._finished = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = version_problem(slicer.app.majorVersion, slicer.app.minorVersion)
        if problem:
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverSAMTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverSAMTrainLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.poll)
        self._runFolderTimer = qt.QTimer()
        self._runFolderTimer.setSingleShot(True)
        self._runFolderTimer.setInterval(RUN_FOLDER_SETTLE_MS)
        self._runFolderTimer.connect("timeout()", self._followRunInFolder)
        if not self.ui.outputPathLineEdit.currentPath:  # (a new widget's is empty: loadUI made it)
            self.ui.outputPathLineEdit.currentPath = str(qt.QSettings().value(RUN_FOLDER_SETTING, "") or "")
        self.ui.outputPathLineEdit.connect("currentPathChanged(QString)", self._onRunFolderEdited)
        self.ui.dataManifestButton.connect("clicked()", self.onChooseManifest)
        self.ui.addPairButton.connect("clicked()", self.onAddPair)
        self.ui.clearPairsButton.connect("clicked()", self.onClearPairs)
        self.ui.startButton.connect("clicked()", self.onStart)
        self.ui.resumeButton.connect("clicked()", self.onStart)
        self.ui.stopButton.connect("clicked()", self.onStop)
        self.ui.curvesComboBox.connect("currentIndexChanged(int)", self.onCurvesChosen)
        self._observeScene(slicer.mrmlScene)
        self._showRunFolderNote("")
        # a liversam train still running in the run folder (the module reloaded, Slicer opened again: the field holds
        # the run folder of the last run started or followed, RUN_FOLDER_SETTING) is shown again, with its Stop; with
        # none there, the curves in the scene are left as they are (a scene the user loaded: opening the module neither
        # empties them nor adds nodes to the scene)
        self._followRunInFolder(showCurves=False)
        self.updateButtons()

    def cleanup(self) -> None:
        if self._sceneObservation is not None:
            scene, tag = self._sceneObservation
            scene.RemoveObserver(tag)
            self._sceneObservation = None
        if self._timer is not None:
            self._timer.stop()
        if self._runFolderTimer is not None:
            self._runFolderTimer.stop()
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if self.logic is not None and self.logic.process.stopping:
            # Stop was pressed and the grace period is still running: no timer will escalate any more, so end it now.
            try:
                self.logic.process.kill()
            except (StopRefused, OSError) as refused:  # a followed process that can no longer be verified
                logging.warning("LiverSAMTrain: the training process was not killed: %s", refused)
        elif self.logic is not None and self.logic.process.is_running():
            # True: the process has its own process group / session and writes to a log file, not to Slicer.
            logging.info(
                "LiverSAMTrain: the training process (PID %s) keeps running after Slicer closes; it writes %s and "
                "registers its best model when it finishes. Open LiverSAMTrain again with the same run folder: it shows "
                "the run's progress again, and Stop stops it; after it ended, Resume continues from its last epoch.",
                self.logic.process.pid,
                self.logic.process.log_path,
            )

    def onChooseManifest(self) -> None:
        """A manifest file as the training data. The data field's own button chooses a folder: with files in its filters
        ctkPathLineEdit::browse opens QFileDialog::getOpenFileName, in which a folder cannot be chosen, and a data
        folder is what most studies come as."""
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Select a training manifest"), "", _("Manifests (*.json *.csv);;All files (*)")
        )
        if path:
            self.ui.dataPathLineEdit.currentPath = path

    # --- pairs of loaded nodes ---
    def _observeScene(self, scene) -> None:
        """A node removed from ``scene`` (deleted, or File > Close Scene) leaves the pairs list with its pair."""
        tag = scene.AddObserver(slicer.vtkMRMLScene.NodeRemovedEvent, lambda caller, event: self._dropRemovedPairs())
        self._sceneObservation = (scene, tag)

    def _dropRemovedPairs(self) -> None:
        """The pairs whose CT or segmentation is no longer in the scene leave the list (the log says which): their
        nodes still hold data, and Start exported them, training on data the user had closed."""
        kept, dropped = TrainingLogic.pairs_in_scene(self._pairs, slicer.mrmlScene)
        if not dropped:
            return
        self._pairs = kept
        self.ui.pairsList.clear()
        for volume, segmentation in kept:
            self.ui.pairsList.addItem(self._pairText(volume, segmentation))
        for volume, segmentation in dropped:
            self.ui.logTextEdit.appendPlainText(
                _("Pair '{pair}' removed from the list: its CT or segmentation is no longer in the scene.").format(
                    pair=self._pairText(volume, segmentation)
                )
            )

    @staticmethod
    def _pairText(volume, segmentation) -> str:
        return f"{volume.GetName()}  +  {segmentation.GetName()}"

    def onAddPair(self) -> None:
        self._dropRemovedPairs()
        volume = self.ui.volumeSelector.currentNode()
        segmentation = self.ui.segmentationSelector.currentNode()
        if volume is None or segmentation is None:
            slicer.util.errorDisplay(_("Choose a CT volume and its segmentation first."))
            return
        problem = TrainingLogic.not_a_ct(volume)
        if problem:
            slicer.util.errorDisplay(problem)
            return
        paired = TrainingLogic.paired_with(self._pairs, volume)
        if paired is segmentation:
            slicer.util.errorDisplay(
                _("The pair '{volume}' + '{segmentation}' is already in the list.").format(
                    volume=volume.GetName(), segmentation=segmentation.GetName()
                )
            )
            return
        if paired is not None:  # `liversam train` refuses the same CT twice (it would be trained and validated on)
            slicer.util.errorDisplay(
                _("The CT '{volume}' is already in the list, with '{segmentation}': each CT can be used once. Put all "
                  "its segments in one segmentation, or press Clear pairs and add the pairs again.").format(
                    volume=volume.GetName(), segmentation=paired.GetName()
                )
            )
            return
        self._pairs.append((volume, segmentation))
        self.ui.pairsList.addItem(self._pairText(volume, segmentation))

    def onClearPairs(self) -> None:
        self._pairs = []
        self.ui.pairsList.clear()

    # --- run ---
    def _collectSettings(self):
        out = self.ui.outputPathLineEdit.currentPath
        if not out:
            raise ValueError(_("Choose a run folder (checkpoints, curves and the split are written there)."))
        self._dropRemovedPairs()  # (the scene's NodeRemovedEvent drops them too)
        try:
            # the pairs are exported to RUN_DIR/exported-data, never over an earlier run's other data; without pairs
            # or a data folder, the run folder's earlier export (Resume after a Slicer restart)
            data, note = TrainingLogic.training_data(self._pairs, out, self.ui.dataPathLineEdit.currentPath)
        except TrainingLogic.NoTrainingData:
            raise ValueError(
                _("Choose a data folder or manifest, or add loaded volume + segmentation pairs.")
            ) from None
        if note:
            self.ui.logTextEdit.appendPlainText(note)
        maxSlices = self.ui.maxSlicesSpinBox.value
        return TrainingLogic.TrainingSettings(
            data=data,
            out=out,
            epochs=self.ui.epochsSpinBox.value,
            batch_size=self.ui.batchSizeSpinBox.value,
            lr=self.ui.lrSpinBox.value,
            augment_copies=self.ui.augmentCopiesSpinBox.value,
            max_slices=maxSlices if maxSlices >= 2 else 0,  # its minimum, 1, shows "all"
            seed=self.ui.seedSpinBox.value,
            train_encoder=self.ui.trainEncoderComboBox.currentText,
            device=self.ui.deviceComboBox.currentText,
            liver_labels=self.ui.liverLabelsLineEdit.text,
            tumor_labels=self.ui.tumorLabelsLineEdit.text,
            liver_names=self.ui.liverNamesLineEdit.text,
            tumor_names=self.ui.tumorNamesLineEdit.text,
            model_name=self.ui.modelNameLineEdit.text,
        )

    def onStart(self) -> None:
        if self._followRunInFolder():  # a liversam train started meanwhile (from a terminal, say) runs there: shown
            self.ui.logTextEdit.appendPlainText(
                _("Not started: a training process is already running in this run folder (shown now; Stop stops it).")
            )
            return
        # The LiverSAM environment is checked first (importing torch there takes seconds, minutes on a cold disk) in
        # a background process that poll() watches, so Slicer stays responsive; training starts when it answers.
        with slicer.util.tryWithErrorDisplay(_("Could not start training."), waitCursor=True):
            self._settings = self._collectSettings()
            self._check = self.logic.checkEnvironment(TrainingLogic.python_executable())
            if not self._check.done():
                self.ui.statusLabel.setText(_("Checking the LiverSAM Python environment..."))
                self._timer.start()
        self.updateButtons()
        if self._check is not None and self._check.done():
            self._startChecked()

    def _startChecked(self) -> None:
        """Start training once the environment check has answered (its answer is cached: start does not block)."""
        check, self._check = self._check, None
        # the error dialog below runs a nested event loop: the timer must not call poll() meanwhile (it is started
        # again once training runs)
        self._timer.stop()
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not start training."), waitCursor=True):
                if check.problem:
                    raise RuntimeError(check.problem)
                command = self.logic.start(self._settings, check.python)
                self._rememberRunFolder(self._settings.out)
                self.ui.logTextEdit.appendPlainText(" ".join(command))
                self.ui.progressBar.setMaximum(self._settings.epochs)
                self.ui.statusLabel.setText(_("Training..."))
                self._chartShown = None
                self._historyStamp = None  # a resumed run's earlier epochs are shown at once
                self._finished = False
                self._segmentNamesHint = False
                self._timer.start()
        except Exception:  # shown to the user by tryWithErrorDisplay; also called from the timer
            logging.info("LiverSAMTrain: training not started", exc_info=True)
            self.ui.statusLabel.setText(_("Not started: see the message."))
        finally:
            if not self.logic.process.is_running():
                self._timer.stop()
            self.updateButtons()

    def onStop(self) -> None:
        if self._check is not None:  # stopped while the environment was being checked: nothing was started
            self._check.cancel()
            self._check = None
            self._timer.stop()
            self.ui.statusLabel.setText(_("Stopped before training started."))
            self.updateButtons()
            return
        # Never waits: the process gets SIGTERM here; poll() (the timer) kills it if it is still running after the grace
        # period and reports the end. Start and Resume stay disabled until the process is gone. An attached process is
        # signalled only while it holds its run folder (AttachedProcess.stop).
        try:
            self.logic.stop()
        except (StopRefused, OSError) as refused:
            slicer.util.errorDisplay(str(refused))
            self.updateButtons()
            return
        process = self.logic.process
        if process.stopping:
            self.ui.statusLabel.setText(_("Stopping..."))
            self._timer.start()
            self.updateButtons()
        elif process.is_running():  # a followed process that released its run folder: it is ending by itself
            self.ui.statusLabel.setText(
                _("Not stopped: the training process (PID {pid}) no longer holds the run folder; it is ending by "
                  "itself.").format(pid=process.pid)
            )  # fmt: skip
            self.updateButtons()
        else:  # it ended by itself before this Stop (finished, or failed): say so, not "Stopped"
            self.poll()

    def _chosenChart(self) -> str:
        """The key of the chart chosen in the Curves list (its items are :data:`TrainingLogic.CHARTS`, in order)."""
        keys = list(TrainingLogic.CHARTS)
        index = self.ui.curvesComboBox.currentIndex
        return keys[index] if 0 <= index < len(keys) else keys[0]

    def onCurvesChosen(self, index: int = 0) -> None:
        """Another chart chosen in the Curves list: shown now, when the run has curves (else at its first epoch)."""
        chart = self.logic.showChart(self._chosenChart())
        if chart is not None:
            self._chartShown = chart

    def _updateCurves(self) -> None:
        """The curves read again when the run's history.csv changed, or when the table left the scene (File > Close
        Scene). Checked at every poll, not only at an EPOCH line (which ``liversam train`` prints after it wrote the
        file): a resumed run has its earlier epochs in the file before its next epoch. The chart chosen in the Curves
        list is shown once per run (and again when its node was replaced); later epochs update the charts in place and
        leave the user's layout alone, also when the plot view was switched to another chart."""
        stamp = TrainingLogic.history_stamp(self._settings.out)
        table = self.logic.tableNode
        if stamp is None or (stamp == self._historyStamp and table is not None and table.GetScene() is slicer.mrmlScene):
            return
        self._historyStamp = stamp
        self.logic.updateCurves(self._settings.out)
        chart = self.logic.chartNodes.get(self._chosenChart())
        if chart is not None and chart is not self._chartShown:
            self._chartShown = self.logic.showChart(self._chosenChart())
        attached = self._attachedProcess()
        if attached is not None and not attached.console:  # no LIVERSAM_EPOCH lines: the progress from the file
            self._showHistoryProgress()

    def _showHistoryProgress(self) -> None:
        """The last epoch of the run's history.csv on the bar and in the status (an attached run whose console this
        module does not know: a terminal's run prints no events into a file read here)."""
        history = TrainingLogic.read_history(Path(self._settings.out) / "history.csv")
        epochs = history.get("epoch")
        if epochs is None or not len(epochs):
            return
        epoch = int(epochs[-1])
        self.ui.progressBar.setMaximum(max(self._settings.epochs, epoch, 1))
        self.ui.progressBar.setValue(epoch)
        dice = history.get("val_dice_mean")
        self.ui.statusLabel.setText(
            _("Epoch {epoch}{of} done: validation Dice {dice:.3f} (from the run folder's history.csv).").format(
                epoch=epoch, of=f"/{self._settings.epochs}" if self._settings.epochs else "",
                dice=float(dice[-1]) if dice is not None else float("nan"),
            )
        )  # fmt: skip

    def _showStopped(self) -> None:
        self.ui.statusLabel.setText(_("Stopped. Resume continues from the last completed epoch."))

    def _showDone(self, payload: dict) -> None:
        """A finished run (its LIVERSAM_DONE line, or the result.json of an attached run): its best model, registered."""
        self._finished = True
        name = payload.get("registered_name")
        self.ui.statusLabel.setText(
            _("Done. Best model: {path}{registered}").format(
                path=payload.get("best_checkpoint"),
                registered=f" (registered as '{name}')" if name else "",
            )
        )

    # --- a training process found in the run folder ---
    def _attachedProcess(self) -> AttachedProcess | None:
        """The process followed, when this widget found it in the run folder (did not start it), else None."""
        process = self.logic.process if self.logic is not None else None
        return process if isinstance(process, AttachedProcess) else None

    def _showRunFolderNote(self, text: str) -> None:
        """The line under the settings that says which training process runs in the run folder ("" : hidden)."""
        self.ui.runFolderStatusLabel.setText(text)
        self.ui.runFolderStatusLabel.visible = bool(text)

    def _rememberRunFolder(self, runDir: str) -> None:
        """The run folder put back in the field when the widget is set up again (:data:`RUN_FOLDER_SETTING`)."""
        qt.QSettings().setValue(RUN_FOLDER_SETTING, str(runDir))

    def _onRunFolderEdited(self, *args) -> None:
        """The run folder field changed (a keystroke, or the browse dialog): looked at once it settles
        (:data:`RUN_FOLDER_SETTLE_MS`), not at each character."""
        self._runFolderTimer.start()

    def _followRunInFolder(self, showCurves: bool = True) -> bool:
        """Follow the ``liversam train`` that holds the run folder chosen, if one does (started before the module was
        reloaded or Slicer was restarted, or from a terminal): its output, progress and curves as for a run started
        here, and Stop. A process started here, or one being stopped, is kept; an attached process of another folder
        is followed no longer (it keeps running). With no process there, the curves are the folder's own, or none
        (``showCurves``; False: left as they are, when the module is set up). Returns True while a process is followed
        (Start is refused)."""
        if self._runFolderTimer is not None:
            self._runFolderTimer.stop()
        if self.logic is None or self._check is not None:
            return self._check is not None
        runDir = self.ui.outputPathLineEdit.currentPath
        process, attached = self.logic.process, self._attachedProcess()
        if process.is_running():
            if attached is None or process.stopping or (runDir and _sameFolder(attached.run_dir, runDir)):
                return True
            self._timer.stop()
            self.logic.detach()
            self.ui.logTextEdit.appendPlainText(
                _("No longer following the training process (PID {pid}) in '{folder}': it keeps running. Choose that "
                  "run folder again to follow it.").format(pid=attached.pid, folder=attached.run_dir)
            )  # fmt: skip
            self.ui.statusLabel.setText("")
            self.ui.progressBar.setMaximum(1)  # its progress is not this folder's
            self.ui.progressBar.setValue(0)
        attached = self.logic.attach(runDir) if runDir else None
        if attached is None:
            self._showRunFolderNote("")
            # the curves are the folder's own (a run that ended there), else none: never the last run's, as if they
            # were this folder's
            problem = self.logic.showRunFolderCurves(runDir) if showCurves else ""
            if problem:
                self.ui.logTextEdit.appendPlainText(_("No curves: {problem}.").format(problem=problem))
            self.updateButtons()
            return False
        self._settings = TrainingLogic.TrainingSettings(data="", out=runDir, epochs=attached.epochs or 0)
        self._chartShown = None
        self._historyStamp = None  # its curves shown at once
        self._finished = False
        self._segmentNamesHint = False
        self._stopProblem = ""
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(attached.since)) if attached.since else ""
        note = _("Training is running in this run folder: liversam train, PID {pid}{since}.").format(
            pid=attached.pid or _("unknown"), since=_(", since {time}").format(time=since) if since else ""
        ) + (" " + _("Stop stops it.") if attached.pid else "")
        self._showRunFolderNote(note)
        self._rememberRunFolder(runDir)
        if not TrainingLogic.read_history(Path(runDir) / "history.csv"):  # no epoch yet (its caches being built):
            self.logic.showRunFolderCurves(runDir)  # no curves meanwhile, not the last run's (its own: poll, at its first)
        self.ui.statusLabel.setText(note)
        self.ui.logTextEdit.appendPlainText(note)
        reattached = attached.shown
        if reattached:  # followed before, then another folder: its output from where it was left
            self.ui.logTextEdit.appendPlainText(
                _("Following it again: its output since it was last followed ({log}):").format(log=attached.log_path)
            )
        elif attached.console:
            self.ui.logTextEdit.appendPlainText(
                _("Its output since it started ({log}):").format(log=attached.log_path)
                if not attached.skipped else
                _("Its latest output ({log} holds all of it):").format(log=attached.log_path)
            )  # fmt: skip
        else:  # started from a terminal (or the module's record of it is lost): its own log, from its last lines
            self.ui.logTextEdit.appendPlainText(
                _("Not started by this module (or its console is not known here): the last lines of its own log, "
                  "{log}, and its new ones:").format(log=attached.log_path)
            )  # fmt: skip
            if attached.earlier:
                self.ui.logTextEdit.appendPlainText("\n".join(attached.earlier))
        attached.shown = True
        self.ui.progressBar.setMaximum(max(self._settings.epochs, 1))
        self.ui.progressBar.setValue(0)
        if reattached and attached.console:  # its events up to now are not read again: its progress from history.csv
            self._showHistoryProgress()
        self._timer.start()
        self.poll()  # its output so far, its curves: shown at once
        self.updateButtons()
        return True

    def _showAttachedEnd(self, attached: AttachedProcess) -> None:
        """An attached process has ended: how, as well as its run folder tells (its exit code went to the process
        that started it): finished (its result.json, best model registered), stopped, or its log's last line."""
        summary, lastLine = attached.outcome()
        if summary is not None and not self._finished:
            self._showDone(summary)
        if self._finished:
            self._showRunFolderNote(_("The training process (PID {pid}) in this run folder has finished.").format(
                pid=attached.pid))  # fmt: skip
            return
        ended = _("The training process (PID {pid}) in this run folder has ended.").format(pid=attached.pid)
        self._showRunFolderNote(ended)
        if attached.stop_requested:
            return  # "Stopped. Resume continues..." (poll)
        self.ui.statusLabel.setText(
            ended + " " + _("It did not finish (no result.json); its exit code is not known here. Its log's last "
                            "line: {line}. Resume continues from its last completed epoch.").format(
                line=lastLine or _("(none)"))
            + (_(" Segment names go in Settings: Liver segment names, Tumour segment names.")
               if self._segmentNamesHint else "")
        )  # fmt: skip

    def poll(self) -> None:
        if self._check is not None:
            if self._check.done():
                self._startChecked()
            return
        process = self.logic.process
        try:
            process.escalate_stop()  # after Stop: killed once the grace period has passed
        except (StopRefused, OSError) as refused:  # a followed process that can no longer be verified: said once
            if str(refused) != self._stopProblem:
                self._stopProblem = str(refused)
                self.ui.logTextEdit.appendPlainText(_("Not killed: {reason}").format(reason=refused))
        # asked before the lines are read: a process that has ended by now has written all its lines, and they are all
        # read below (asked after, a line written in between, its DONE or its error, was never shown)
        running = process.is_running()
        text = []  # appended at once (a followed process's earlier output: up to REPLAY_BYTES)
        for line in process.read_lines():
            event = TrainingLogic.parse_event(line)
            if event is None:
                text.append(line)
                if TrainingLogic.advises_segment_names(line):
                    self._segmentNamesHint = True  # the command's advice names its options, not this module's fields
                continue
            kind, payload = event
            if kind == "CACHE":
                self._showCacheProgress(payload)
            elif kind == "RESUME":
                self.ui.progressBar.setMaximum(self._settings.epochs)
                self.ui.progressBar.setValue(int(payload.get("epoch") or 0))
                if payload.get("finished"):
                    self.ui.statusLabel.setText(
                        _("The run in this folder is finished ({why}) after epoch {epoch}: nothing to train (the log "
                          "says which setting trains it on).").format(why=payload["finished"], epoch=payload.get("epoch"))
                    )
                else:
                    self.ui.statusLabel.setText(_("Resumed after epoch {epoch}.").format(epoch=payload.get("epoch")))
            elif kind == "EPOCH":  # (the curves: _updateCurves below, when history.csv changed)
                self.ui.progressBar.setMaximum(int(payload.get("epochs") or self._settings.epochs))
                self.ui.progressBar.setValue(int(payload.get("epoch", 0)))
                # the mean is the liver's alone when validation shows no tumour (the event's val_dice_mean_of says so)
                meanOf = str(payload.get("val_dice_mean_of") or "")
                self.ui.statusLabel.setText(
                    _("Epoch {epoch}/{epochs}: validation Dice {dice:.3f}{of} (best epoch {best})").format(
                        epoch=payload.get("epoch"),
                        epochs=payload.get("epochs"),
                        dice=float(payload.get("val_dice_mean") or 0.0),
                        of=f", {meanOf}" if meanOf.startswith("liver only") else "",
                        best=payload.get("best_epoch"),
                    )
                )
            elif kind == "DONE":
                self._showDone(payload)
        if text:
            self.ui.logTextEdit.appendPlainText("\n".join(text))
        self._updateCurves()
        if process.stopping and not self._finished:  # an epoch line read meanwhile hides no Stop
            self.ui.statusLabel.setText(_("Stopping..."))
        if not running:
            self._timer.stop()
            attached = self._attachedProcess()
            if attached is not None:
                self._showAttachedEnd(attached)
            if self.ui.progressBar.maximum == 0:  # the busy indicator of a study's cache (reused: nothing followed)
                self.ui.progressBar.setMaximum(1)
                self.ui.progressBar.setValue(1 if self._finished else 0)
            code = process.returncode
            if process.stop_requested and not self._finished:
                self.ui.logTextEdit.appendPlainText(
                    "training process stopped" + (f" (exit code {code})" if code is not None else "")
                )
                self._showStopped()
            elif code not in (0, None):
                self.ui.logTextEdit.appendPlainText(f"training process ended with code {code}")
                if not self._finished:  # the status said "Training..." (or the last epoch's) for a failed run
                    self.ui.statusLabel.setText(
                        _("Training ended with an error (code {code}): see the log below.").format(code=code)
                        + (_(" Segment names go in Settings: Liver segment names, Tumour segment names.")
                           if self._segmentNamesHint else "")
                    )  # fmt: skip
            self.updateButtons()

    def _showCacheProgress(self, payload: dict) -> None:
        """A LIVERSAM_CACHE line: the study whose training cache is being built (its slices encoded: minutes to hours
        on a CPU) and, while it is built, how many of its slices are done; the bar counts them."""
        where = _("Preparing the training data: study {study} of {studies} ('{case}')").format(
            study=payload.get("study"), studies=payload.get("studies"), case=payload.get("case")
        )
        total = payload.get("total")
        if total is None:  # the study starts (a cache built before is reused at once)
            self.ui.progressBar.setMaximum(0)  # Qt's busy indicator
            self.ui.statusLabel.setText(where + "...")
            return
        self.ui.progressBar.setMaximum(int(total))
        self.ui.progressBar.setValue(int(payload.get("done") or 0))
        self.ui.statusLabel.setText(
            where + _(": {done} of {total} slices encoded...").format(done=payload.get("done"), total=total)
        )

    def updateButtons(self) -> None:
        running = self.logic is not None and (self.logic.process.is_running() or self._check is not None)
        stopping = self.logic is not None and self.logic.process.stopping
        # a followed process whose PID is unknown, or that released its run folder (ending by itself), cannot be stopped
        stoppable = running and (self._check is not None or getattr(self.logic.process, "stoppable", True))
        self.ui.startButton.enabled = not running  # also while stopping: until the process is gone
        self.ui.resumeButton.enabled = not running
        self.ui.stopButton.enabled = running and not stopping and stoppable


class LiverSAMTrainTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: curves from a history file become a table and a chart per quantity, a series per curve."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_curves_from_history()
        self.test_command_line()

    def test_curves_from_history(self):
        folder = Path(tempfile.mkdtemp())
        (folder / "history.csv").write_text(
            "epoch,train_loss,val_loss,val_dice_liver,val_dice_tumor,val_dice_mean\n"
            "0,,0.34,0.89,0.81,0.85\n1,0.46,0.33,0.90,0.84,0.87\n"
        )
        table, charts = TrainingLogic.update_curves(folder / "history.csv")
        self.assertEqual(table.GetTable().GetNumberOfRows(), 2)
        self.assertEqual(list(charts), list(TrainingLogic.CHARTS))
        self.assertEqual(charts["dice"].GetNumberOfPlotSeriesNodes(), 3)  # liver, tumour, mean: 0-1 axis of its own
        self.assertEqual(charts["train_loss"].GetNumberOfPlotSeriesNodes(), 1)
        self.assertFalse(charts["dice"].GetYAxisRangeAuto())
        self.assertEqual(tuple(charts["dice"].GetYAxisRange()), (0.0, 1.0))
        self.assertAlmostEqual(table.GetTable().GetColumnByName("val_dice_liver").GetValue(1), 0.90)

    def test_command_line(self):
        settings = TrainingLogic.TrainingSettings(data="/d", out="/r", epochs=3, max_slices=20)
        command = TrainingLogic.build_train_command(settings, python="/venv/bin/python")
        self.assertEqual(command[:4], ["/venv/bin/python", "-m", "liversam", "train"])
        self.assertIn("--events", command)
        self.assertEqual(command[command.index("--max-slices") + 1], "20")
        allSlices = TrainingLogic.TrainingSettings(data="/d", out="/r", max_slices=1)  # the spin box's "all"
        self.assertNotIn("--max-slices", TrainingLogic.build_train_command(allSlices, python="/venv/bin/python"))
