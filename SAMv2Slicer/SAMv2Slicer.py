"""SAMv2Slicer: find lesions and landmarks of a baseline scan on a follow-up scan with
self-supervised anatomical embeddings (SAM / SAMv2), and register the two volumes.

This file is the 3D Slicer scripted module (module, widget, logic, test). It only runs inside
the Slicer application. Everything that computes lives in the Qt-free ``SAMv2SlicerLib``
package, which also works in plain Python with the ``slicer-core`` package (see
``Scripts/samv2_batch.py`` and the tests under ``Testing/``).
"""
import logging
import os
import pathlib
from typing import Annotated, Optional

import slicer

try:  # the application-only parts of Slicer's Python API
    import qt
    import vtk
    from slicer import (vtkMRMLGridTransformNode, vtkMRMLLinearTransformNode, vtkMRMLMarkupsFiducialNode,
                        vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin
except ImportError as exc:  # pragma: no cover - plain Python
    raise ImportError("SAMv2Slicer.py is the 3D Slicer module and needs the Slicer application; "
                      "in plain Python use the SAMv2SlicerLib package (logic) instead") from exc

from SAMv2SlicerLib.constants import DEVICES, METHODS, REGISTRATION_FEATURES, REGISTRATION_MODES

SEGMENT_PARAMETERS = ("lesionSegmentation", "lesionSegmentID")  # synced by the widget (no GUI connector)


#
# SAMv2Slicer
#
class SAMv2Slicer(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAMv2 Lesion Tracking")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["SAMv2Slicer contributors"]
        self.parent.helpText = _("""
Click a lesion or landmark on the baseline scan and find it on the follow-up scan, propagate a
lesion (point + radius, or a segment) and register the two volumes, with self-supervised
anatomical embeddings (SAM / SAMv2). Matches that are not confident are labelled with a
trailing "(?)", drawn in grey and locked.
See the README of the extension for a step-by-step guide.
""")
        self.parent.acknowledgementText = _("""
Re-implementation of SAM / SAMv2 (Yan et al.; Bai et al.) and SAME++ (Tian et al.) style
registration. The bundled sample follow-up scan is simulated from a public CT (pyradiomics
test data, BSD-3-Clause).
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: a bundled CT and its simulated follow-up, one click in the Sample Data module
#
def registerSampleData():
    """Add the SAMv2 sample pair (bundled lung CT + simulated follow-up) to the Sample Data module."""
    import SampleData

    from SAMv2SlicerLib import slicer_sample_data

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    try:
        baseline = slicer_sample_data.bundled_baseline()
    except Exception as exc:  # no bundled CT in this build: nothing to offer
        logging.info(f"SAMv2Slicer: no sample data registered ({exc})")
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=slicer_sample_data.SAMPLE_CATEGORY,
        sampleName=slicer_sample_data.SAMPLE_NAME,
        uris=[baseline.as_uri()],
        fileNames=[baseline.name],
        nodeNames=[slicer_sample_data.BASELINE_NODE_NAME],
        thumbnailFileName=os.path.join(iconsPath, "SAMv2Slicer.png"),
        loadFileTypes=["VolumeFile"],
        # The follow-up is simulated on first use, so the Sample Data button loads through our own
        # function. SampleData.downloadSample() does not call custom downloaders (it would load the
        # baseline only): scripts call SAMv2Slicer.loadSamplePair() instead.
        customDownloader=loadSamplePair,
    )


def _sampleCacheDir():
    return pathlib.Path(slicer.app.cachePath) / "SAMv2Slicer"


def loadSamplePair(source=None):
    """Load the sample baseline CT, its tumour segment and the simulated follow-up. Returns the nodes."""
    from SAMv2SlicerLib import slicer_sample_data

    with slicer.util.tryWithErrorDisplay(_("Could not load the SAMv2 sample data."), waitCursor=True):
        pair = slicer_sample_data.sample_pair(_sampleCacheDir())
        baseline = slicer.util.loadVolume(str(pair.baseline), {"name": slicer_sample_data.BASELINE_NODE_NAME})
        followup = slicer.util.loadVolume(str(pair.followup), {"name": slicer_sample_data.FOLLOWUP_NODE_NAME})
        loaded = [baseline, followup]
        for node in loaded:
            node.SetAttribute("SAMv2.Modality", "CT")
        if pair.tumor_label is not None:
            tumour = slicer.util.loadSegmentation(str(pair.tumor_label), {"name": slicer_sample_data.TUMOR_NODE_NAME})
            tumour.SetReferenceImageGeometryParameterFromVolumeNode(baseline)
            loaded.append(tumour)
        slicer.util.setSliceViewerLayers(background=baseline, fit=True)
        return loaded


#
# SAMv2SlicerParameterNode
#
@parameterNodeWrapper
class SAMv2SlicerParameterNode:
    """Module state saved with the scene. Every parameter has a widget in the .ui file
    (dynamic property SlicerParameterName), checked by Testing/test_slicer_ui.py, except the
    lesion segment (SEGMENT_PARAMETERS): parameterNodeWrapper has no connector for
    qMRMLSegmentSelectorWidget, so the widget keeps those two in sync itself."""

    baselineVolume: vtkMRMLScalarVolumeNode
    followupVolume: vtkMRMLScalarVolumeNode
    useBundledModel: bool = True
    modelPath: pathlib.Path
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    sourcePoints: vtkMRMLMarkupsFiducialNode
    matchingMethod: Annotated[str, Choice(list(METHODS))] = "refined"
    matchedPoints: vtkMRMLMarkupsFiducialNode
    useLesionSegment: bool = False
    lesionSegmentation: vtkMRMLSegmentationNode
    lesionSegmentID: str = ""
    lesionRadius: Annotated[float, WithinRange(0.5, 200.0)] = 10.0
    registrationMode: Annotated[str, Choice(list(REGISTRATION_MODES))] = "affine"
    deformable: bool = False
    refineLinear: bool = True
    registrationFeatures: Annotated[str, Choice(list(REGISTRATION_FEATURES))] = "auto"
    outputLinearTransform: vtkMRMLLinearTransformNode
    outputGridTransform: vtkMRMLGridTransformNode


#
# SAMv2SlicerWidget
#
class SAMv2SlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: builds on Resources/UI/SAMv2Slicer.ui. Every heavy step runs in the worker process
    (SAMv2SlicerLib.worker), polled by a QTimer: the GUI never blocks and never runs a thread."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None  # the user's step running in the worker
        self._job = None
        self._onJobDone = None
        self._embedTask = None  # background embedding of the selected pair
        self._embeddedPair = None  # (baseline key, follow-up key) last sent for embedding
        self._observedPoints = None
        self._syncingSegment = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMv2Slicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SAMv2SlicerLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._pollWorker)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.ui.sourcePointsPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.resultsTable.horizontalHeader().setStretchLastSection(True)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.matchButton.connect("clicked(bool)", self.onMatchButton)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagateButton)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.jumpButton.connect("clicked(bool)", self.onJumpButton)
        self.ui.resultsTable.connect("cellDoubleClicked(int,int)", self.onResultDoubleClicked)
        self.ui.resultsTable.connect("itemSelectionChanged()", self._updateButtons)
        self.ui.sourcePointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSourcePointsChanged)
        self.ui.matchedPointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._fillResultsTable)
        self.ui.useLesionSegmentCheckBox.connect("toggled(bool)", self._updateLesionWidgets)
        self.ui.lesionSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._onSegmentSelected)
        self.ui.lesionSegmentSelector.connect("currentSegmentChanged(QString)", self._onSegmentSelected)
        self.ui.useBundledModelCheckBox.connect("toggled(bool)", self._updateModelWidgets)

        self.initializeParameterNode()
        self._updateLesionWidgets()
        self._updateModelWidgets()

    def cleanup(self) -> None:
        self._stopTasks()
        self._timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.closeWorker()  # the process ends with the module; its private folder is deleted

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        # Results of a closed scene must not land in the next one: stop the steps and wait until
        # they have ended (the worker is killed if it does not stop within its cancel timeout).
        self._stopTasks()
        self.setParameterNode(None)
        if self.logic is not None:
            self.logic.resetCore()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node --------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.baselineVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                p.baselineVolume = first
        if not p.followupVolume:
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            others = [v for v in volumes if v is not p.baselineVolume and not v.IsA("vtkMRMLLabelMapVolumeNode")]
            if others:
                p.followupVolume = others[0]

    def setParameterNode(self, inputParameterNode: Optional[SAMv2SlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # connectGui links every widget whose SlicerParameterName matches a parameter
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self.onSourcePointsChanged(self._parameterNode.sourcePoints)
            self._fillResultsTable()
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, *args) -> None:
        self._showSegmentFromParameters()
        self._updateButtons()
        self._embedInBackground()

    def _showSegmentFromParameters(self) -> None:
        p = self._parameterNode
        if p is None or self._syncingSegment:
            return
        self._syncingSegment = True
        try:
            selector = self.ui.lesionSegmentSelector
            if selector.currentNode() is not p.lesionSegmentation:
                selector.setCurrentNode(p.lesionSegmentation)
            if p.lesionSegmentID and selector.currentSegmentID() != p.lesionSegmentID:
                selector.setCurrentSegmentID(p.lesionSegmentID)
        finally:
            self._syncingSegment = False

    def _onSegmentSelected(self, *args) -> None:
        p = self._parameterNode
        if p is None or self._syncingSegment:
            return
        self._syncingSegment = True
        try:
            with slicer.util.NodeModify(p.parameterNode):  # one Modified event for both parameters
                p.lesionSegmentation = self.ui.lesionSegmentSelector.currentNode()
                p.lesionSegmentID = self.ui.lesionSegmentSelector.currentSegmentID() or ""
        finally:
            self._syncingSegment = False
        self._updateButtons()

    # --- widget state ------------------------------------------------------------------------
    def _updateButtons(self, *args) -> None:
        p = self._parameterNode
        idle = self._task is None
        volumes = bool(p and p.baselineVolume and p.followupVolume)
        points = bool(p and p.sourcePoints and p.sourcePoints.GetNumberOfControlPoints() > 0)
        self.ui.matchButton.enabled = idle and volumes and points
        if p and p.useLesionSegment:
            lesion = bool(p.lesionSegmentation and p.lesionSegmentID)
        else:
            lesion = points and self.ui.lesionPointComboBox.currentIndex >= 0
        self.ui.propagateButton.enabled = idle and volumes and lesion
        self.ui.registerButton.enabled = idle and volumes
        self.ui.jumpButton.enabled = bool(p and p.matchedPoints and self._selectedResultRow() is not None)
        if not volumes:
            tip = _("Select a baseline and a follow-up volume.")
        elif not idle:
            tip = _("Wait for the running step to finish (or press Cancel).")
        else:
            tip = _("Match every baseline point onto the follow-up.")
        self.ui.matchButton.toolTip = tip

    def _updateLesionWidgets(self, *args) -> None:
        useSegment = self.ui.useLesionSegmentCheckBox.checked
        for w in (self.ui.lesionPointComboBox, self.ui.lesionRadiusSpinBox, self.ui.lesionPointLabel,
                  self.ui.lesionRadiusLabel):
            w.setVisible(not useSegment)
        for w in (self.ui.lesionSegmentSelector, self.ui.lesionSegmentLabel):
            w.setVisible(useSegment)
        self._updateButtons()

    def _updateModelWidgets(self, *args) -> None:
        self.ui.modelPathLineEdit.enabled = not self.ui.useBundledModelCheckBox.checked

    def onSourcePointsChanged(self, node) -> None:
        self.ui.sourcePointsPlaceWidget.setCurrentNode(node)
        if self._observedPoints is not None:
            for event in self._pointEvents():
                self.removeObserver(self._observedPoints, event, self._refreshLesionPoints)
        self._observedPoints = node
        if node is not None:
            for event in self._pointEvents():
                self.addObserver(node, event, self._refreshLesionPoints)
        self._refreshLesionPoints()

    @staticmethod
    def _pointEvents():
        m = slicer.vtkMRMLMarkupsNode
        return (m.PointAddedEvent, m.PointRemovedEvent, m.PointModifiedEvent, m.PointPositionDefinedEvent,
                m.PointPositionUndefinedEvent)

    def _refreshLesionPoints(self, *args) -> None:
        """The placed control points; each item's data is its control-point index in the node
        (the logic takes that index, not a position in a filtered list)."""
        combo = self.ui.lesionPointComboBox
        current = combo.currentText
        combo.blockSignals(True)
        combo.clear()
        node = self._observedPoints
        if node is not None:
            placed = slicer.vtkMRMLMarkupsNode.PositionDefined
            for i in range(node.GetNumberOfControlPoints()):
                if node.GetNthControlPointPositionStatus(i) == placed:
                    combo.addItem(node.GetNthControlPointLabel(i) or f"P{i + 1}", i)
        index = combo.findText(current)
        combo.currentIndex = index if index >= 0 else combo.count - 1
        combo.blockSignals(False)
        self._updateButtons()

    def _status(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")
        slicer.util.showStatusMessage(text, 8000)
        (logging.warning if error else logging.info)(f"SAMv2Slicer: {text}")

    # --- the worker ----------------------------------------------------------------------------
    def _useModel(self) -> bool:
        """Validate the model choice here (device, file) and send it with the next requests."""
        from samv2core.errors import SAMv2Error

        p = self._parameterNode
        modelPath = str(p.modelPath) if p.modelPath and str(p.modelPath) not in ("", ".") else None
        try:
            if not p.useBundledModel and modelPath is None:
                raise SAMv2Error(_("select a weights file, or check 'Bundled model'"))
            path = None if p.useBundledModel else modelPath
            self.logic.core.set_model(path, p.device)  # DeviceError / CheckpointError now; loads nothing
            self.logic.worker.set_model(path, p.device)
        except SAMv2Error as exc:
            self._status(str(exc), error=True)
            return False
        return True

    def _embedInBackground(self) -> None:
        """As soon as both volumes are selected, embed them in the worker so that a click only matches."""
        p = self._parameterNode
        if p is None or not (p.baselineVolume and p.followupVolume) or self._embedTask is not None:
            return
        from samv2core.errors import SAMv2Error

        from SAMv2SlicerLib import dependencies

        if p.baselineVolume is p.followupVolume or not dependencies.torch_available() \
                or dependencies.missing_requirements():
            return  # never ask to install from a selection change; the buttons do that
        pair = (p.baselineVolume.GetID(), p.baselineVolume.GetImageData() and p.baselineVolume.GetImageData().GetMTime(),
                p.followupVolume.GetID(), p.followupVolume.GetImageData() and p.followupVolume.GetImageData().GetMTime(),
                p.useBundledModel, str(p.modelPath), p.device)
        if pair == self._embeddedPair:
            return
        self._embeddedPair = pair
        try:
            if not self._useModel():
                return
            job = self.logic.core.prepare_embed(p.baselineVolume, p.followupVolume)
            self._embedTask = self.logic.worker.submit_job(job)
        except SAMv2Error as exc:  # e.g. a 2D or RGB volume: said when a button is pressed
            logging.info(f"SAMv2Slicer: no background embedding ({exc})")
            return
        except Exception as exc:  # the worker could not start: the buttons will report it
            logging.warning(f"SAMv2Slicer: background embedding not started ({exc})")
            return
        self._timer.start()

    def _run(self, prepare, onDone) -> None:
        from samv2core.errors import SAMv2Error

        from SAMv2SlicerLib import dependencies

        if self._task is not None:
            return
        if not dependencies.ensure_all(slicer, report=lambda text: self._status(text, error=True)):
            return
        if not self._useModel():
            return
        try:
            job = prepare(self.logic.core)  # bad input: SAMv2Error here, nothing started, scene unchanged
            task = self.logic.worker.submit_job(job)
        except SAMv2Error as exc:
            self._status(str(exc), error=True)
            return
        except OSError as exc:
            self._status(_("The SAMv2 worker process could not start: {error}").format(error=exc), error=True)
            return
        self._task, self._job, self._onJobDone = task, job, onDone
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.cancelButton.show()
        self.ui.cancelButton.enabled = True
        self._status(_("{name}: started").format(name=job.name))
        self._updateButtons()
        self._timer.start()

    def _pollWorker(self) -> None:
        from samv2core.errors import SAMv2Error

        from SAMv2SlicerLib.worker import TaskState

        worker = self.logic.worker if self.logic is not None and self.logic.hasWorker else None
        if worker is None:
            self._timer.stop()
            return
        worker.poll()
        embed = self._embedTask
        if embed is not None and embed.finished:
            self._embedTask = None
            if embed.state == TaskState.FAILED:
                self._embeddedPair = None  # try again on the next selection change or click
                logging.warning(f"SAMv2Slicer: background embedding failed: {embed.error_message}")
        task, job = self._task, self._job
        if task is None:
            if embed is not None and not embed.finished:
                self.ui.statusLabel.text = _("Embedding the volumes in the background: {p:.0%}").format(
                    p=embed.progress.fraction)
            elif self._embedTask is None:
                self._timer.stop()
                if embed is not None and embed.state == TaskState.DONE:
                    self._status(_("Both volumes are embedded: a click now only matches."))
            return
        if not task.finished:
            self.ui.progressBar.value = int(round(100 * task.progress.fraction))
            if not task.cancel_requested:
                waiting = task.state == TaskState.QUEUED and embed is not None and not embed.finished
                self.ui.statusLabel.text = (_("{name}: waiting for the background embedding ({p:.0%})").format(
                    name=job.name, p=embed.progress.fraction) if waiting else f"{job.name}: {task.progress.message}")
            return
        self._task = self._job = None
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        if task.state == TaskState.DONE:
            try:
                with slicer.util.RenderBlocker():
                    outcome = self.logic.core.finish(job, task.result)  # main thread, scene transaction
                self._onJobDone(outcome)
                self._status(self.logic.core.status)
            except SAMv2Error as exc:
                self._status(f"{job.name} failed: {exc}", error=True)
            except Exception as exc:
                logging.exception("SAMv2Slicer: applying the result failed")
                self._status(f"{job.name} failed: {exc}", error=True)
        elif task.state == TaskState.CANCELLED:
            extra = f" ({task.error_message})" if task.error_message else ""
            self._status(_("{name}: cancelled; nothing was added to the scene.").format(name=job.name) + extra)
        else:
            if task.error_traceback:
                logging.error(task.error_traceback)
            detail = "" if task.error_kind in ("WorkerStopped",) or not task.error_traceback else \
                " (details in the Python console)"
            self._status(f"{job.name} failed: {task.error_message}{detail}; nothing was added to the scene.",
                         error=True)
        self._updateButtons()
        if self._embedTask is None:
            self._timer.stop()

    def onCancelButton(self) -> None:
        if self._task is not None:
            self.logic.worker.cancel(self._task)
            self.ui.cancelButton.enabled = False
            self._status(_("Cancelling... (the worker is stopped if it does not stop within 2 s)"))

    def _stopTasks(self) -> None:
        """Cancel every step and wait until each has ended (killing the worker after its cancel
        timeout), so that no result of the old state is applied and no old step still runs."""
        if self.logic is None or not self.logic.hasWorker:
            return
        worker = self.logic.worker
        for task in (self._task, self._embedTask):
            if task is not None and not task.finished:
                worker.cancel(task)
        for task in (self._task, self._embedTask):
            if task is not None and not task.finished:
                try:
                    worker.wait(task, timeout=worker.cancel_timeout + 5.0)  # killed after cancel_timeout
                except TimeoutError:
                    worker.kill("the worker was stopped")
        self._task = self._job = self._embedTask = None
        self._embeddedPair = None
        self._timer.stop()
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self._updateButtons()

    # --- actions -----------------------------------------------------------------------------
    def onMatchButton(self) -> None:
        p = self._parameterNode
        self._run(lambda core: core.prepare_match(p.baselineVolume, p.followupVolume, p.sourcePoints,
                                                  p.matchingMethod), self._onMatchDone)

    def _onMatchDone(self, outcome) -> None:
        p = self._parameterNode
        p.matchedPoints = outcome.node
        slicer.util.setSliceViewerLayers(background=p.followupVolume, fit=False)
        self._fillResultsTable()
        if outcome.node.GetNumberOfControlPoints():
            self.ui.resultsTable.selectRow(0)
            self._jumpTo(outcome.node, 0)

    def onPropagateButton(self) -> None:
        p = self._parameterNode
        if p.useLesionSegment:
            segNode, segId = p.lesionSegmentation, p.lesionSegmentID
            self._run(lambda core: core.prepare_propagate_lesion(
                p.baselineVolume, p.followupVolume, segmentation_node=segNode, segment_id=segId,
                method=p.matchingMethod), self._onLesionDone)
        else:
            combo = self.ui.lesionPointComboBox
            index = combo.itemData(combo.currentIndex)  # control-point index in the node
            self._run(lambda core: core.prepare_propagate_lesion(
                p.baselineVolume, p.followupVolume, p.sourcePoints, int(index if index is not None else 0),
                radius_mm=p.lesionRadius, method=p.matchingMethod), self._onLesionDone)

    def _onLesionDone(self, outcome) -> None:
        p = self._parameterNode
        slicer.util.setSliceViewerLayers(background=p.followupVolume, fit=False)
        outcome.segmentation_node.CreateClosedSurfaceRepresentation()
        self._jumpTo(outcome.points_node, 0)

    def onRegisterButton(self) -> None:
        p = self._parameterNode
        self._run(lambda core: core.prepare_register(p.baselineVolume, p.followupVolume, p.registrationMode,
                                                     p.deformable, refine=p.refineLinear,
                                                     features=p.registrationFeatures), self._onRegisterDone)

    def _onRegisterDone(self, outcome) -> None:
        p = self._parameterNode
        p.outputLinearTransform = outcome.linear_node
        p.outputGridTransform = outcome.grid_node
        slicer.util.setSliceViewerLayers(background=p.baselineVolume, foreground=p.followupVolume,
                                         foregroundOpacity=0.5, fit=True)

    # --- results table / jumping -------------------------------------------------------------
    def _fillResultsTable(self, *args) -> None:
        table = self.ui.resultsTable
        table.setRowCount(0)
        node = self._parameterNode.matchedPoints if self._parameterNode else None
        if node is None:
            self._updateButtons()
            return
        import json

        scores = json.loads(node.GetAttribute("SAMv2.Scores") or "[]")
        confident = json.loads(node.GetAttribute("SAMv2.Confident") or "[]")
        n = node.GetNumberOfControlPoints()
        table.setRowCount(n)
        for i in range(n):
            label = node.GetNthControlPointLabel(i)
            ok = confident[i] if i < len(confident) else node.GetNthControlPointSelected(i)
            cells = (label, f"{scores[i]:.2f}" if i < len(scores) else "", _("yes") if ok else _("NO"),
                     node.GetNthControlPointDescription(i))
            for c, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                if not ok:
                    item.setForeground(qt.QBrush(qt.QColor("#c0392b")))
                table.setItem(i, c, item)
        self._updateButtons()

    def _selectedResultRow(self):
        rows = {item.row() for item in self.ui.resultsTable.selectedItems()}
        return min(rows) if rows else None

    def onResultDoubleClicked(self, row, column) -> None:
        node = self._parameterNode.matchedPoints
        if node is not None and 0 <= row < node.GetNumberOfControlPoints():
            self._jumpTo(node, row)

    def onJumpButton(self) -> None:
        row = self._selectedResultRow()
        if row is not None:
            self.onResultDoubleClicked(row, 0)

    @staticmethod
    def _jumpTo(pointsNode, index: int) -> None:
        slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(pointsNode.GetID(), index, True)


#
# SAMv2SlicerLogic
#
class SAMv2SlicerLogic(ScriptedLoadableModuleLogic):
    """Slicer-facing logic: owns the parameter node, the Qt-free core logic (SAMv2SlicerLib.logic),
    which prepares steps and applies their results to the scene, and the worker process that
    computes them.

    Both are created on first use, after the dependencies have been installed, so that the
    module loads even when torch is missing.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None
        self._worker = None

    def getParameterNode(self):
        return SAMv2SlicerParameterNode(super().getParameterNode())

    def _cacheDir(self) -> str:
        return os.path.join(slicer.app.cachePath, "SAMv2Slicer", "embeddings")

    @property
    def core(self):
        if self._core is None:
            from SAMv2SlicerLib.logic import SAMv2Logic

            self._core = SAMv2Logic(slicer.mrmlScene, cache_dir=self._cacheDir())
        return self._core

    @property
    def worker(self):
        """The worker process client; the process itself starts with the first request, with
        the PythonSlicer next to the Slicer executable."""
        if self._worker is None:
            from SAMv2SlicerLib.worker import WorkerProcess, find_python

            self._worker = WorkerProcess(python=find_python(slicer.app.applicationDirPath()),
                                         cache_dir=self._cacheDir())
        return self._worker

    @property
    def hasWorker(self) -> bool:
        return self._worker is not None

    def closeWorker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def resetCore(self) -> None:
        if self._core is not None:
            self._core.clear_caches()


#
# SAMv2SlicerTest
#
class SAMv2SlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest via slicer_add_python_unittest, or the Reload & Test button).

    Uses a small synthetic pair and the untrained lite network: it checks plumbing and
    geometry in the real application, not model accuracy.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        try:
            import torch  # noqa: F401
        except ImportError:  # the module loads without torch; its tests need it
            self.delayDisplay("SAMv2Slicer tests skipped: PyTorch is not installed (install the PyTorch extension)")
            return
        self.setUp()
        self.test_match_and_register()
        self.setUp()
        self.test_bad_input_leaves_scene_unchanged()
        self.setUp()
        self.test_match_through_the_worker()

    def _pair(self):
        import numpy as np

        from samv2core.simulate import simulate_followup
        from samv2core.volume import Volume
        from SAMv2SlicerLib import nodes

        rng = np.random.default_rng(0)
        z, y, x = np.mgrid[0:24, 0:48, 0:48].astype(np.float32)
        body = ((x - 24) ** 2 / 400 + (y - 24) ** 2 / 300 < 1) * 1000.0 - 1000.0
        blobs = sum(300.0 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / 20.0)
                    for cx, cy, cz in rng.uniform(10, 38, (6, 3)))
        base = Volume(body + blobs, (3.0, 3.0, 4.0), (0.0, 0.0, 0.0), np.eye(3), "CT", "baseline")
        follow = simulate_followup(base, seed=1, deformation_mm=0.0).followup
        return (nodes.volume_to_node(base, slicer.mrmlScene, "baseline"),
                nodes.volume_to_node(follow, slicer.mrmlScene, "followup"))

    def _logic(self):
        from samv2core.network import NetConfig, build_network
        from SAMv2SlicerLib.logic import SAMv2Logic

        logic = SAMv2Logic(slicer.mrmlScene)
        logic.set_model(model=build_network(NetConfig.lite()), device="cpu")
        return logic

    def test_match_and_register(self):
        self.delayDisplay("Matching points with the lite network")
        base, follow = self._pair()
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "lesions")
        points.AddControlPoint(vtk.vtkVector3d(-70.0, -70.0, 40.0), "L1")
        logic = self._logic()
        outcome = logic.match_points(base, follow, points, method="nn")
        self.assertEqual(outcome.node.GetNumberOfControlPoints(), 1)
        self.assertTrue(outcome.node.GetNthControlPointLabel(0).startswith("L1"))
        self.assertIn("score", outcome.node.GetNthControlPointDescription(0))
        self.delayDisplay("Test passed")

    def test_bad_input_leaves_scene_unchanged(self):
        from samv2core.errors import InputError

        base, follow = self._pair()
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "lesions")
        points.AddControlPoint(vtk.vtkVector3d(5000.0, 0.0, 0.0), "far")
        logic = self._logic()
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(InputError):
            logic.match_points(base, follow, points)
        with self.assertRaises(InputError):
            logic.match_points(base, base, points)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Test passed")

    def test_match_through_the_worker(self):
        """The GUI's path: the step runs in the worker process (PythonSlicer inside Slicer) and
        the main thread applies its result."""
        import tempfile

        from samv2core.model_io import ModelCard, save_model
        from samv2core.network import NetConfig, build_network
        from SAMv2SlicerLib.logic import SAMv2Logic
        from SAMv2SlicerLib.worker import TaskState, WorkerProcess, find_python

        self.delayDisplay("Matching points in the worker process")
        base, follow = self._pair()
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "lesions")
        points.AddControlPoint(vtk.vtkVector3d(-70.0, -70.0, 40.0), "L1")
        app = getattr(slicer, "app", None)
        worker = WorkerProcess(python=find_python(app.applicationDirPath() if app is not None else None))
        with tempfile.TemporaryDirectory() as folder:
            cfg = NetConfig.lite()
            card = ModelCard(name="lite-untrained-selftest", architecture=cfg.to_dict(), heads=list(cfg.heads))
            weights = save_model(build_network(cfg).eval(), card, pathlib.Path(folder) / "lite.safetensors")
            try:
                logic = SAMv2Logic(slicer.mrmlScene)
                logic.set_model(str(weights), "cpu")
                worker.set_model(str(weights), "cpu")
                job = logic.prepare_match(base, follow, points, method="nn")
                nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
                task = worker.submit_job(job)
                self.assertEqual(worker.wait(task, 300), TaskState.DONE, task.error_message)
                self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)  # the worker adds no node
                outcome = logic.finish(job, task.result)
                self.assertEqual(outcome.node.GetNumberOfControlPoints(), 1)
                self.assertTrue(outcome.node.GetNthControlPointLabel(0).startswith("L1"))
            finally:
                worker.close()
        self.delayDisplay("Test passed")

