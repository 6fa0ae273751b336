"""SAMv2Slicer, the 3D Slicer scripted module (module, widget, logic, test; Slicer application only):
find baseline lesions and landmarks on a follow-up scan with self-supervised anatomical embeddings,
and register the two volumes. The widget binds controls to the parameter node and calls the Qt-free
``SAMv2SlicerLib.controller``; heavy work runs in a worker process, so this process never imports torch.
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

from SAMv2SlicerLib.corepath import ensure_core_importable

ensure_core_importable()  # a source checkout: ../SAMv2Core when samv2core is not installed

from SAMv2SlicerLib.constants import DEVICES, METHODS, MODALITIES, REGISTRATION_FEATURES, REGISTRATION_MODES  # noqa: E402

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
        self.parent.contributors = ["SAMv2Slicer maintainers"]
        self.parent.helpText = _("""
Click a lesion or landmark on the baseline scan and find it on the follow-up scan, propagate a
lesion (point + radius, or a segment) and register the two volumes, with self-supervised
anatomical embeddings (SAM / SAMv2). Matches that are not confident are labelled with a
trailing "(?)" and drawn in grey; drag them into place if needed.
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
    except Exception as exc:  # no bundled CT in this build (or no core): said in the log
        logging.warning(f"SAMv2Slicer: no sample data registered ({exc})")
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


def loadSamplePair(source=None):
    """Load the sample baseline CT, its tumour segment and the simulated follow-up. Returns the nodes."""
    from SAMv2SlicerLib import slicer_sample_data

    with slicer.util.tryWithErrorDisplay(_("Could not load the SAMv2 sample data."), waitCursor=True):
        pair = slicer_sample_data.sample_pair(pathlib.Path(slicer.app.cachePath) / "SAMv2Slicer")
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
    qMRMLSegmentSelectorWidget, so the widget keeps those two in sync itself. The same names
    and defaults: SAMv2SlicerLib.controller.Parameters."""

    baselineVolume: vtkMRMLScalarVolumeNode
    followupVolume: vtkMRMLScalarVolumeNode
    useBundledModel: bool = True
    modelPath: pathlib.Path
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    modality: Annotated[str, Choice(list(MODALITIES))] = "auto"
    keepEmbeddingsOnDisk: bool = False
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
    """GUI on Resources/UI/SAMv2Slicer.ui: binds controls to the parameter node and calls the
    controller; a QTimer calls the controller's poll while it has work."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPoints = None
        self._syncingSegment = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMv2Slicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAMv2SlicerLogic()
        self.controller = self.logic.createController()

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._onTimer)
        self.ui.progressBar.setRange(0, 100)
        self.ui.sourcePointsPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.resultsTable.horizontalHeader().setStretchLastSection(True)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.matchButton.connect("clicked(bool)", lambda: self._start("match", self._onMatchDone))
        self.ui.propagateButton.connect("clicked(bool)", lambda: self._start("propagate", self._onLesionDone))
        self.ui.registerButton.connect("clicked(bool)", lambda: self._start("register", self._onRegisterDone))
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCacheButton)
        self.ui.jumpButton.connect("clicked(bool)", self.onJumpButton)
        self.ui.resultsTable.connect("cellDoubleClicked(int,int)", self.onResultDoubleClicked)
        self.ui.resultsTable.connect("itemSelectionChanged()", self._updateButtons)
        self.ui.sourcePointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSourcePointsChanged)
        self.ui.useLesionSegmentCheckBox.connect("toggled(bool)", self._updateLesionWidgets)
        self.ui.lesionSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._onSegmentSelected)
        self.ui.lesionSegmentSelector.connect("currentSegmentChanged(QString)", self._onSegmentSelected)
        self.ui.useBundledModelCheckBox.connect("toggled(bool)", self._updateModelWidgets)

        self.initializeParameterNode()
        self._updateLesionWidgets()
        self._updateModelWidgets()
        self._showState()

    def cleanup(self) -> None:
        self._timer.stop()
        self.removeObservers()
        if self.controller is not None:
            self.controller.close()  # the worker ends with the module; its private folder is deleted

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.controller.scene_closing()  # no result of the closed scene lands in the next one
        self.setParameterNode(None)
        self._showState()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node --------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        from SAMv2SlicerLib.controller import default_pair

        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        baseline, followup = default_pair(slicer.mrmlScene, p.baselineVolume, p.followupVolume)
        if baseline is not p.baselineVolume:
            p.baselineVolume = baseline
        if followup is not p.followupVolume:
            p.followupVolume = followup

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
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, *args) -> None:
        # the results table is filled from the parameter node (after connectGui updated it), so
        # it always shows the selected matched-points node
        self._showSegmentFromParameters()
        self._fillResultsTable()
        if self._parameterNode is not None:
            self.controller.selection_changed(self._parameterNode)
            self._ensureTimer()

    def _showSegmentFromParameters(self) -> None:
        p, selector = self._parameterNode, self.ui.lesionSegmentSelector
        if p is None or self._syncingSegment:
            return
        self._syncingSegment = True
        try:
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
        idle = self.controller is not None and not self.controller.busy
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
        tip = (_("Select a baseline and a follow-up volume.") if not volumes else
               _("Wait for the running step to finish (or press Cancel).") if not idle else
               _("Match every baseline point onto the follow-up."))
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
        m = slicer.vtkMRMLMarkupsNode
        for event in (m.PointAddedEvent, m.PointRemovedEvent, m.PointModifiedEvent, m.PointPositionDefinedEvent,
                      m.PointPositionUndefinedEvent):
            if self._observedPoints is not None:
                self.removeObserver(self._observedPoints, event, self._refreshLesionPoints)
            if node is not None:
                self.addObserver(node, event, self._refreshLesionPoints)
        self._observedPoints = node
        self._refreshLesionPoints()

    def _refreshLesionPoints(self, *args) -> None:
        """The placed control points; each item's data is its control-point index in the node."""
        from SAMv2SlicerLib.nodes import read_points

        combo = self.ui.lesionPointComboBox
        current = combo.currentText
        combo.blockSignals(True)
        combo.clear()
        if self._observedPoints is not None:
            placed = read_points(self._observedPoints, world=False)
            for label, i in zip(placed.labels, placed.indices):
                combo.addItem(label, i)
        index = combo.findText(current)
        combo.currentIndex = index if index >= 0 else combo.count - 1
        combo.blockSignals(False)
        self._updateButtons()

    # --- the controller ----------------------------------------------------------------------
    def _ensureTimer(self) -> None:
        if self.controller.active and not self._timer.isActive():
            self._timer.start()

    def _onTimer(self) -> None:
        self.controller.poll()  # applies a finished result (and calls its on-done) on this thread
        self._showState()
        if not self.controller.active:
            self._timer.stop()

    def _showState(self) -> None:
        state = self.controller.state()
        self.ui.progressBar.setVisible(state.busy)
        self.ui.progressBar.value = int(round(100 * state.fraction))
        self.ui.cancelButton.setVisible(state.busy)
        self.ui.cancelButton.enabled = state.busy and not state.cancelling
        self.ui.statusLabel.text = state.status
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if state.error else "")
        if state.status:
            slicer.util.showStatusMessage(state.status, 8000)
        self._updateButtons()

    def _start(self, action: str, onDone) -> None:
        combo = self.ui.lesionPointComboBox
        index = combo.itemData(combo.currentIndex) if combo.currentIndex >= 0 else 0
        self.controller.start(action, self._parameterNode, onDone, point_index=int(index or 0))
        self._showState()
        self._ensureTimer()

    def onCancelButton(self) -> None:
        self.controller.cancel()
        self._showState()

    def onClearCacheButton(self) -> None:
        self.controller.clear_disk_cache()
        self._showState()

    def _onMatchDone(self, outcome) -> None:
        p = self._parameterNode
        p.matchedPoints = outcome.node  # the table refills from the parameter node
        slicer.util.setSliceViewerLayers(background=p.followupVolume, fit=False)
        if outcome.node.GetNumberOfControlPoints():
            self.ui.resultsTable.selectRow(0)
            self._jumpTo(outcome.node, 0)

    def _onLesionDone(self, outcome) -> None:
        slicer.util.setSliceViewerLayers(background=self._parameterNode.followupVolume, fit=False)
        outcome.segmentation_node.CreateClosedSurfaceRepresentation()
        self._jumpTo(outcome.points_node, 0)

    def _onRegisterDone(self, outcome) -> None:
        p = self._parameterNode
        p.outputLinearTransform = outcome.linear_node
        p.outputGridTransform = outcome.grid_node
        slicer.util.setSliceViewerLayers(background=p.baselineVolume, foreground=p.followupVolume,
                                         foregroundOpacity=0.5, fit=True)

    # --- results table / jumping -------------------------------------------------------------
    def _fillResultsTable(self, *args) -> None:
        from SAMv2SlicerLib.controller import result_rows

        table = self.ui.resultsTable
        rows = result_rows(self._parameterNode.matchedPoints if self._parameterNode else None)
        table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            cells = (row.label, row.score, _("yes") if row.confident else _("NO"), row.description)
            for c, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                if not row.confident:
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
    """Slicer-facing logic: the parameter node, and the Qt-free controller wired to the
    application (PythonSlicer for the worker, Slicer's temporary and cache folders)."""

    def getParameterNode(self):
        return SAMv2SlicerParameterNode(super().getParameterNode())

    def createController(self):
        from SAMv2SlicerLib import dependencies
        from SAMv2SlicerLib.controller import Controller
        from SAMv2SlicerLib.worker import find_python

        report = lambda text: slicer.util.errorDisplay(text, windowTitle="SAMv2Slicer")  # noqa: E731
        return Controller(
            slicer.mrmlScene, python=lambda: find_python(slicer.app.applicationDirPath()),
            cache_dir=os.path.join(slicer.app.cachePath, "SAMv2Slicer", "embeddings"),
            temp_root=slicer.app.temporaryPath,
            dependencies_ready=lambda: dependencies.torch_available() and not dependencies.missing_requirements(),
            ensure_dependencies=lambda: dependencies.ensure_all(slicer, report=report))


#
# SAMv2SlicerTest
#
class SAMv2SlicerTest(ScriptedLoadableModuleTest):
    """The check to run in a real Slicer (ctest via slicer_add_python_unittest, or the module's
    Reload & Test button): drives the module widget on the sample pair, as a user would, with the
    bundled model, and checks the results against the simulated motion."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from SAMv2SlicerLib import dependencies

        problem = dependencies.torch_problem()
        if problem:  # the module loads without torch; its computations need it
            self.delayDisplay(f"SAMv2Slicer tests skipped: {problem} (install the PyTorch extension)")
            return
        self.setUp()
        self.test_widget_finds_points_and_registers()

    def _waitFor(self, widget, timeout_s=900):
        import time

        end = time.monotonic() + timeout_s
        while widget.controller.active:
            self.assertLess(time.monotonic(), end, "the step did not finish in time")
            slicer.app.processEvents()  # the widget's QTimer polls the worker
            time.sleep(0.05)
        state = widget.controller.state()
        self.assertFalse(state.error, state.status)

    def test_widget_finds_points_and_registers(self):
        import json

        import numpy as np

        from samv2core.coords import lps_to_ras, ras_to_lps
        from samv2core.simulate import simulate_followup
        from samv2core.volume import load_volume
        from SAMv2SlicerLib import nodes, slicer_sample_data

        baseline, followup = loadSamplePair()[:2]
        slicer.util.selectModule("SAMv2Slicer")
        widget = slicer.modules.samv2slicer.widgetRepresentation().self()
        p = widget._parameterNode
        p.baselineVolume, p.followupVolume = baseline, followup
        # the simulated motion, recomputed from the same seed as the sample's follow-up
        truth = simulate_followup(load_volume(slicer_sample_data.sample_pair(
            pathlib.Path(slicer.app.cachePath) / "SAMv2Slicer").baseline, "CT"), seed=slicer_sample_data.SIMULATION_SEED)
        centre = nodes.volume_geometry(baseline).index_to_lps @ np.r_[(np.asarray(baseline.GetImageData()
                                                                             .GetDimensions()) - 1) / 2, 1.0]
        points_lps = centre[:3] + np.array([[0.0, 0.0, 0.0], [20.0, 15.0, 5.0], [-25.0, 10.0, -5.0]])
        p.sourcePoints = nodes.new_point_list(slicer.mrmlScene, "landmarks", lps_to_ras(points_lps), ["A", "B", "C"])

        self.delayDisplay("Find points on the follow-up")
        widget.ui.matchButton.click()
        self._waitFor(widget)
        matched = p.matchedPoints
        self.assertIsNotNone(matched)
        self.assertEqual(widget.ui.resultsTable.rowCount, 3)
        expected = truth.map_points(points_lps)
        confident = json.loads(matched.GetAttribute("SAMv2.Confident"))
        self.assertTrue(any(confident), "no confident match on the sample pair")
        for i in np.flatnonzero(confident):
            q = [0.0, 0.0, 0.0]
            matched.GetNthControlPointPositionWorld(int(i), q)
            self.assertLess(np.linalg.norm(ras_to_lps(np.array(q)) - expected[i]), 10.0)

        self.delayDisplay("Register volumes")
        p.deformable = False
        widget.ui.registerButton.click()
        self._waitFor(widget)
        linear = p.outputLinearTransform
        self.assertIsNotNone(linear)
        self.assertEqual(followup.GetTransformNodeID(), linear.GetID())
        # baseline points through the registration (fixed -> moving) land where the simulation put them
        moved = ras_to_lps(nodes.node_from_parent_point(linear, lps_to_ras(points_lps)))
        self.assertLess(float(np.median(np.linalg.norm(moved - expected, axis=1))), 5.0)
        self.delayDisplay("Test passed")

