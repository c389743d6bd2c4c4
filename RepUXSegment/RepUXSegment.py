"""RepUX Segment: abdominal organ segmentation with RepUX-Net in 3D Slicer.

Module, parameter node, Widget (thin: it only connects the .ui to the Logic), Logic (wraps
``RepUXSegmentLib.logic.RepUXLogic``, never touches widgets) and the self-test. Model work
runs in separate ``repux`` processes; this process never imports torch for segmenting or
training. Python dependencies are installed on first use, after the user confirms.
"""

import importlib.util
import concurrent.futures
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


#: The oldest Slicer the module supports: 5.10 is the first with Python 3.12, which the
#: package and its dependencies are built and tested for (5.6 and 5.8 ship Python 3.9).
MINIMUM_SLICER_VERSION = (5, 10)
MINIMUM_PYTHON_VERSION = (3, 12)


def unsupportedReason() -> Optional[str]:
    """Why this Slicer cannot run the module (too old), or None."""
    slicerVersion = (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    if slicerVersion >= MINIMUM_SLICER_VERSION and sys.version_info[:2] >= MINIMUM_PYTHON_VERSION:
        return None
    return (
        "RepUX Segment needs 3D Slicer {minimum} or later (with Python {python}). This is Slicer {version} "
        "with Python {found}. Download a current Slicer from https://download.slicer.org."
    ).format(
        minimum=".".join(map(str, MINIMUM_SLICER_VERSION)),
        python=".".join(map(str, MINIMUM_PYTHON_VERSION)),
        version=slicer.app.applicationVersion,
        found=".".join(map(str, sys.version_info[:3])),
    )


def _useSourceTreePackage() -> None:
    """From a source checkout (Extension Wizard / "Add module path") the repux package is in
    ../Training, not next to the module as in a built extension: put it on the path."""
    training = Path(__file__).resolve().parent.parent / "Training"
    if importlib.util.find_spec("repux") is None and (training / "repux" / "__init__.py").is_file():
        sys.path.insert(0, str(training))


UNSUPPORTED = unsupportedReason()
if UNSUPPORTED is None:  # the helpers below need the Python of a supported Slicer
    _useSourceTreePackage()
    from RepUXSegmentLib import review, runner
    from RepUXSegmentLib.catalog import DEFAULT_USER_MODELS_DIR, MODELS_DIR_ENV, ModelCatalog
    from RepUXSegmentLib.dependencies import (
        TORCH_REQUIREMENT,
        install_failure_message,
        missing_requirements,
        read_requirements,
    )
    from RepUXSegmentLib.logic import RepUXLogic
    from RepUXSegmentLib.remote import ServerSettings
    from RepUXSegmentLib.runner import CANCELLED, FAILED, SUCCEEDED, ProcessJob, RepuxJob, describe_progress, python_executable
    from RepUXSegmentLib.segmentations import MODEL_ATTRIBUTE, reference_volume, segment_tag

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4 has no translation helpers

    def _(text: str) -> str:
        return text


#: Device choices in the order of the device combo box.
DEVICES = ("auto", "cuda", "cpu")
POLL_INTERVAL_MS = 200
#: Sliding-window overlap of the "Fast" choice (bundles default to 0.5, about 3x as many windows).
FAST_OVERLAP = 0.25
#: Milliseconds a folder field must stay unchanged before the module uses the folder.
FOLDER_EDIT_SETTLE_MS = 800
#: Background jobs, polled in this order: an install first, since the others may wait for it.
#: Only "segment" belongs to the scene; the others belong to the model catalog, go on when the
#: scene closes or the module is reloaded, and are shown again when the module is entered.
JOB_KINDS = ("install", "model", "segment", "rank", "retrain")
#: Columns of the review table: (row key, header, format).
REVIEW_COLUMNS = (
    ("name", "Organ", "{}"),
    ("volume_ml", "Volume (ml)", "{:.1f}"),
    ("components", "Pieces", "{}"),
    ("outside_largest_ml", "Outside largest (ml)", "{:.1f}"),
    ("mean_confidence", "Mean confidence", "{:.3f}"),
    ("low_confidence_ml", "Unsure (ml)", "{:.1f}"),
)
#: Choices of the "Run on" combo box, in its order.
RUN_ON = ("local", "server")


#
# RepUXSegment
#


class RepUXSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RepUX Segment")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["RepUXSegment developers"]
        self.parent.helpText = _(
            "Segments abdominal organs in CT with RepUX-Net models. Pick a CT and a model, click Segment; "
            "correct the result in the Segment Editor, export it as a label map, add it to a training set "
            "and retrain the model on your cases. Everything also runs from the command line with the "
            "<tt>repux</tt> program."
        )
        self.parent.acknowledgementText = _(
            "RepUX-Net and its Bayesian frequency re-parameterization were published by Lee et al. "
            "(\"Scaling Up 3D Kernels with Bayesian Frequency Re-parameterization for Medical Image "
            "Segmentation\", MICCAI 2023); this extension is an independent implementation."
        )


#
# Parameter node
#


@parameterNodeWrapper
class RepUXSegmentParameterNode:
    """The module's state in the scene.

    inputVolume: the CT to segment. outputSegmentation: the segmentation to fill (None: a new
    one). model: catalog name. device: "auto", "cuda" or "cpu". fast: fewer sliding windows.
    iterations: fine-tuning steps for Retrain.
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = "demo"
    device: str = "auto"
    fast: bool = False
    iterations: Annotated[int, WithinRange(1, 1000000)] = 200


#
# RepUXSegmentWidget
#


class RepUXSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Connects the .ui to the Logic; holds no state beyond what the GUI shows."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._folderTimer = None
        self._logShown = {}
        self._afterInstall = None
        self._installed = {}  # name -> installed model entry (from refreshModels)
        self._published = {}  # name -> published model not installed yet (from refreshModels)
        self._review = None  # the last ReviewResult (segmentation, confidence node, labels)
        self._tour = None  # its UncertainRegionTour
        self._visited = set()  # points of the regions visited (kept when the tour is rebuilt)
        self._reviewRows = []
        self._ranking = None  # path of the last ranking table
        self._rankingOutput = None  # the table the running rank job writes
        self._seenCases = []  # cases of the ranking loaded so far
        self._serverModels = None  # name -> model entry on the connected server; None: not connected
        self._connection = None  # a Test connection running in a background thread (a Future)
        self._installing = False  # guards the (modal, event-processing) install dialogs against re-entry

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED is not None:
            message = qt.QLabel(UNSUPPORTED)
            message.wordWrap = True
            self.layout.addWidget(message)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RepUXSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RepUXSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelsFolderPathLineEdit.currentPath = self.logic.modelsFolder()
        self.ui.trainingSetPathLineEdit.currentPath = self.logic.trainingSetFolder()
        # currentPathChanged fires for every key typed: use a folder once the field has settled.
        self._folderTimer = qt.QTimer()
        self._folderTimer.singleShot = True
        self._folderTimer.setInterval(FOLDER_EDIT_SETTLE_MS)
        self._folderTimer.connect("timeout()", self.onFoldersSettled)
        self.ui.modelsFolderPathLineEdit.connect("currentPathChanged(QString)", lambda path: self._folderTimer.start())
        self.ui.trainingSetPathLineEdit.connect("currentPathChanged(QString)", lambda path: self._folderTimer.start())
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.editButton.connect("clicked(bool)", self.onEdit)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.retrainButton.connect("clicked(bool)", self.onRetrainButton)
        self.ui.showConfidenceCheckBox.connect("toggled(bool)", self.onShowConfidence)
        self.ui.lowConfidenceSpinBox.connect("valueChanged(double)", lambda value: self.updateReview())
        self.ui.reviewTableWidget.connect("cellClicked(int,int)", self.onReviewRowClicked)
        self.ui.nextRegionButton.connect("clicked(bool)", self.onNextRegion)
        self.ui.resegmentRoiButton.connect("clicked(bool)", self.onResegmentRoi)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self.updateButtons())
        self.ui.rankFolderButton.connect("clicked(bool)", self.onRankFolder)
        self.ui.loadNextCaseButton.connect("clicked(bool)", self.onLoadNextCase)
        self.ui.reviewTableWidget.setColumnCount(len(REVIEW_COLUMNS))
        self.ui.reviewTableWidget.setHorizontalHeaderLabels([_(header) for _key, header, _format in REVIEW_COLUMNS])
        self.ui.runOnComboBox.currentIndex = RUN_ON.index(self.logic.runOn())
        self.ui.serverUrlLineEdit.text = self.logic.serverUrl()
        self.ui.serverTokenFileLineEdit.currentPath = self.logic.serverTokenFile()
        self.ui.serverTokenLineEdit.text = self.logic.rememberedServerToken()
        self.ui.rememberTokenCheckBox.checked = bool(self.ui.serverTokenLineEdit.text)
        self.ui.runOnComboBox.connect("currentIndexChanged(int)", self.onRunOnChanged)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onServerFieldsChanged)
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.onServerFieldsChanged)
        self.ui.serverTokenFileLineEdit.connect("currentPathChanged(QString)", lambda path: self.onServerFieldsChanged())
        self.ui.rememberTokenCheckBox.connect("toggled(bool)", lambda checked: self.onServerFieldsChanged())

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)

        self.onRunOnChanged()
        self.initializeParameterNode()
        if any(runner.background_jobs.get(kind) for kind in JOB_KINDS):
            self._pollTimer.start()  # jobs started before the module was reloaded: show them again

    def cleanup(self) -> None:
        # Module reload or application exit. A segmentation belongs to this widget's scene;
        # other jobs go on (after a reload the new widget shows them; at exit they notice
        # that Slicer is gone and stop, a retrain keeping its checkpoint for Resume).
        self.cancelJob("segment")
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        if UNSUPPORTED is None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        # A result must never land in the next scene; a retrain or a download is not the scene's.
        self.cancelJob("segment")
        self.setReview(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node -----------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property follow the node by themselves.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        if node.model != self.ui.modelComboBox.currentData:
            self.refreshModels()  # e.g. a loaded scene names another model, or one not installed
        if node.device in DEVICES:
            self.ui.deviceComboBox.currentIndex = DEVICES.index(node.device)
        self.ui.show3DButton.setSegmentationNode(node.outputSegmentation)
        self.updateButtons()

    def job(self, kind: str):
        return runner.background_jobs.get(kind)

    def selectedModelEntry(self):
        return self._installed.get(self.ui.modelComboBox.currentData)

    def selectedPublishedModel(self):
        """The selected model if it is a published one that is not installed yet, else None."""
        return self._published.get(self.ui.modelComboBox.currentData)

    def updateButtons(self) -> None:
        node = self._parameterNode
        installing = self._installing or self.job("install") is not None
        segmenting, retraining, modelJob = self.job("segment"), self.job("retrain"), self.job("model")
        hasModel = self.selectedModelEntry() is not None
        hasResult = node is not None and node.outputSegmentation is not None and segmenting is None
        self.ui.segmentButton.text = _("Cancel") if segmenting else _("Segment")
        self.ui.segmentButton.enabled = (segmenting is not None and not segmenting.cancelling) or (
            not installing and node is not None and node.inputVolume is not None and hasModel
        )
        self.ui.importModelButton.enabled = not installing and modelJob is None
        self.ui.downloadModelButton.visible = self.selectedPublishedModel() is not None
        self.ui.downloadModelButton.enabled = not installing and modelJob is None
        self.ui.editButton.enabled = hasResult
        self.ui.exportButton.enabled = hasResult
        sourceVolume = hasResult and (reference_volume(node.outputSegmentation) or node.inputVolume) is not None
        self.ui.addCaseButton.enabled = bool(sourceVolume) and bool(self.trainingSetPath())
        self.ui.retrainButton.text = _("Cancel") if retraining else _("Retrain")
        self.ui.retrainButton.enabled = (retraining is not None and not retraining.cancelling) or (
            not installing and hasModel and bool(self.trainingSetPath())
        )
        self.ui.modelProgressBar.visible = modelJob is not None
        server = self.runsOnServer()
        reviewing = self._review is not None and segmenting is None
        self.ui.confidenceCheckBox.enabled = not server  # the server returns labels only
        self.ui.showConfidenceCheckBox.enabled = reviewing
        self.ui.nextRegionButton.enabled = reviewing
        self.ui.resegmentRoiButton.enabled = (
            hasResult and not server and not installing and self.ui.roiSelector.currentNode() is not None and hasModel
        )
        self.ui.rankFolderButton.enabled = not server and not installing and hasModel and self.job("rank") is None
        self.ui.loadNextCaseButton.enabled = self._ranking is not None
        self.ui.rankProgressBar.visible = self.job("rank") is not None
        self.ui.serverGroupBox.visible = server
        self.ui.deviceComboBox.enabled = not server  # the server chooses its device
        self.ui.importModelButton.enabled = self.ui.importModelButton.enabled and not server
        self.ui.testConnectionButton.enabled = self._connection is None

    # -- models -------------------------------------------------------------------------
    def refreshModels(self, select: Optional[str] = None) -> None:
        """Fill the model list; a model the parameter node names but the catalog lacks is
        listed as missing (and cannot segment) instead of silently showing another one."""
        combo = self.ui.modelComboBox
        current = select or (self._parameterNode.model if self._parameterNode else combo.currentData)
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        # Kept for the buttons and the card, which are updated on every poll of a job.
        if self.runsOnServer():
            self._installed, self._published = dict(self._serverModels or {}), {}
            for name in self._installed:
                combo.addItem(_("{name} (server)").format(name=name), name)
        else:
            self._installed = {entry.name: entry for entry in self.logic.models()}
            for entry in self._installed.values():
                combo.addItem(entry.name if entry.source == "shipped" else f"{entry.name} (yours)", entry.name)
            self._published = {model.name: model for model in self.logic.availableModels()}
        for published in self._published.values():
            combo.addItem(_("{name} (download, {size})").format(name=published.name, size=published.size_text), published.name)
        if current and combo.findData(current) < 0:
            combo.addItem(_("{name} (not installed)").format(name=current), current)
        index = combo.findData(current)
        combo.currentIndex = index if index >= 0 else (0 if combo.count else -1)
        combo.blockSignals(wasBlocked)
        for problem in self.logic.catalogProblems():
            self.appendLog(problem)
        self.onModelChanged()

    def onModelChanged(self, index: Optional[int] = None) -> None:
        name = self.ui.modelComboBox.currentData
        entry = self.selectedModelEntry()
        published = self.selectedPublishedModel()
        if entry is not None:
            self.ui.modelCardLabel.text = entry.card_text()
        elif published is not None:
            self.ui.modelCardLabel.text = published.card_text() + "\n\n" + _(
                "Not installed yet: click Download, or, on a computer without internet access, download the file "
                "in a web browser elsewhere and use Import... > Downloaded file."
            )
        elif self.runsOnServer():
            self.ui.modelCardLabel.text = _(
                "Click Test connection to list the server's models." if self._serverModels is None
                else "The server does not serve model {name}: choose one of its models."
            ).format(name=name)
        elif name:
            self.ui.modelCardLabel.text = _(
                "Model {name} is not in the model folder {folder}. Choose another model, or import it with Import..."
            ).format(name=name, folder=self.logic.modelsFolder())
        else:
            self.ui.modelCardLabel.text = _("No model selected.")
        if self._parameterNode and name and self._parameterNode.model != name:
            self._parameterNode.model = name
        self.updateButtons()

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and 0 <= index < len(DEVICES):
            self._parameterNode.device = DEVICES[index]

    def onFoldersSettled(self) -> None:
        modelsFolder = self.ui.modelsFolderPathLineEdit.currentPath.strip()
        if modelsFolder and os.path.isdir(modelsFolder) and modelsFolder != self.logic.modelsFolder():
            self.logic.setModelsFolder(modelsFolder)
            self.refreshModels()
        trainingSet = self.trainingSetPath()
        # The training set is created when the first case is added: its parent must exist.
        if trainingSet != self.logic.trainingSetFolder() and (not trainingSet or os.path.isdir(os.path.dirname(trainingSet))):
            self.logic.setTrainingSetFolder(trainingSet)
        self.updateButtons()

    def trainingSetPath(self) -> str:
        return self.ui.trainingSetPathLineEdit.currentPath.strip()

    def onImportModel(self) -> None:
        choice = qt.QMessageBox(slicer.util.mainWindow())
        choice.setWindowTitle(_("Import model"))
        choice.setText(_("Import a model bundle folder (model.json + model.safetensors) or a published .pth checkpoint?"))
        bundleButton = choice.addButton(_("Bundle folder..."), qt.QMessageBox.AcceptRole)
        checkpointButton = choice.addButton(_("Checkpoint (.pth)..."), qt.QMessageBox.AcceptRole)
        published = self.selectedPublishedModel()
        downloadedButton = None
        if published is not None:
            downloadedButton = choice.addButton(
                _("Downloaded file of {name}...").format(name=published.name), qt.QMessageBox.AcceptRole
            )
        choice.addButton(qt.QMessageBox.Cancel)
        choice.exec_()
        if downloadedButton is not None and choice.clickedButton() == downloadedButton:
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("The file you downloaded for {name}").format(name=published.name)
            )
            if path:
                self.whenDependenciesReady(
                    lambda: self.startJob("model", lambda: self.logic.importModelFile(published.name, path))
                )
        elif choice.clickedButton() == bundleButton:
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model bundle folder"))
            if folder:
                with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
                    entry = self.logic.importBundle(folder)
                    self.refreshModels(select=entry.name)
        elif choice.clickedButton() == checkpointButton:
            self.importCheckpoint()

    def onDownloadModel(self) -> None:
        published = self.selectedPublishedModel()
        if published is None or not slicer.util.confirmOkCancelDisplay(
            _("Download {name} ({size}) from\n{url}\ninto {folder}?\n\nThe file is checked and converted once; "
              "the model then works offline.").format(
                name=published.name, size=published.size_text, url=published.url, folder=self.logic.modelsFolder()
            ),
            windowTitle=_("Download model"),
        ):
            return
        self.whenDependenciesReady(lambda: self.startJob("model", lambda: self.logic.downloadModel(published.name)))

    def chooseItem(self, title: str, label: str, items: list) -> Optional[str]:
        """The item the user picks, or None on Cancel (QInputDialog.getItem returns the
        current item on Cancel in Python, with no way to tell)."""
        dialog = qt.QInputDialog(slicer.util.mainWindow())
        dialog.setWindowTitle(title)
        dialog.setLabelText(label)
        dialog.setComboBoxItems(items)
        dialog.setComboBoxEditable(False)
        return dialog.textValue() if dialog.exec_() == qt.QDialog.Accepted else None

    def askText(self, title: str, label: str, text: str) -> Optional[str]:
        dialog = qt.QInputDialog(slicer.util.mainWindow())
        dialog.setWindowTitle(title)
        dialog.setLabelText(label)
        dialog.setTextValue(text)
        return dialog.textValue().strip() if dialog.exec_() == qt.QDialog.Accepted else None

    def importCheckpoint(self) -> None:
        window = slicer.util.mainWindow()
        path = qt.QFileDialog.getOpenFileName(window, _("Published checkpoint"), "", _("PyTorch checkpoint (*.pth *.pt)"))
        if not path:
            return
        arch = self.chooseItem(_("Architecture"), _("Network:"), ["repuxnet", "uxnet"])
        labels = arch and self.chooseItem(_("Labels"), _("Label order of the checkpoint:"), ["flare", "flare21", "amos"])
        name = labels and self.askText(_("Model name"), _("Name in your model folder:"), Path(path).stem)
        if not name:
            return
        self.whenDependenciesReady(lambda: self.startJob("model", lambda: self.logic.importCheckpoint(path, name, arch, labels, wait=False)))

    # -- background jobs ----------------------------------------------------------------
    def startJob(self, kind: str, start) -> None:
        """Run ``start()`` (which returns a running job) as the job of ``kind``; errors in
        starting it are shown, not raised."""
        if self.job(kind) is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the job."), waitCursor=True):
            job = start()
            runner.background_jobs[kind] = job
            self._logShown[kind] = 0
            bar, label = self.jobWidgets(kind)
            bar.value = 0
            label.text = _("Starting...")
            self.appendLog(" ".join(job.command))
            self._pollTimer.start()
        self.updateButtons()

    def cancelJob(self, kind: str) -> None:
        job = self.job(kind)
        if job is not None:
            job.cancel()  # returns at once; onPoll reports the end
            self.jobWidgets(kind)[1].text = _("Cancelling...")
        self.updateButtons()

    def jobWidgets(self, kind: str):
        if kind == "retrain":
            return self.ui.retrainProgressBar, self.ui.retrainStatusLabel
        if kind == "model":
            return self.ui.modelProgressBar, self.ui.modelProgressBar
        if kind == "rank":
            return self.ui.rankProgressBar, self.ui.rankProgressBar
        return self.ui.progressBar, self.ui.statusLabel

    def onPoll(self) -> None:
        if self._connection is not None and self._connection.done():
            self.connectionFinished()
        for kind in JOB_KINDS:
            job = self.job(kind)
            if job is None:
                continue
            running = job.poll()
            self.showProgress(kind, job)
            if not running:
                runner.background_jobs.pop(kind, None)
                self.jobFinished(kind, job)
        if not any(self.job(kind) for kind in JOB_KINDS) and self._connection is None:
            self._pollTimer.stop()
        self.updateButtons()

    def showProgress(self, kind: str, job) -> None:
        bar, label = self.jobWidgets(kind)
        fraction = job.fraction
        bar.maximum = 1000 if fraction is not None else 0  # 0: busy indicator while unknown
        bar.value = int(1000 * fraction) if fraction is not None else 0
        if job.cancelling:
            text = _("Cancelling...")
        elif kind == "install":
            text = _("Installing Python packages: {line}").format(line=job.log[-1] if job.log else "")
        else:
            text = describe_progress(job.latest) if job.latest else _("Starting...")
        if label is bar:
            bar.textVisible = True
            bar.format = text
        else:
            label.text = text
        lines = list(job.log)
        for line in lines[self._logShown.get(kind, 0):]:
            self.appendLog(line)
        self._logShown[kind] = len(lines)

    def jobFinished(self, kind: str, job) -> None:
        self._logShown[kind] = 0
        bar, label = self.jobWidgets(kind)
        bar.maximum = 1000
        bar.value = 1000 if job.state == SUCCEEDED else 0
        text = {SUCCEEDED: _("Done."), CANCELLED: _("Cancelled."), FAILED: _("Failed.")}.get(job.state, "")
        if kind == "install":
            self.installFinished(job)
            text = _("Python packages installed.") if job.state == SUCCEEDED else text
        elif job.state == SUCCEEDED and kind == "segment" and isinstance(job.result, int):
            text = _("Done: {count} voxels changed inside the box.").format(count=job.result)
            self.updateReview()
        elif job.state == SUCCEEDED and kind == "segment":
            segmentation = job.result.segmentation if hasattr(job.result, "confidence") else job.result
            if self._parameterNode is not None:
                self._parameterNode.outputSegmentation = segmentation
            self.setReview(job.result if hasattr(job.result, "confidence") else None)
            text = _("Done: {count} segments.").format(count=segmentation.GetSegmentation().GetNumberOfSegments())
        elif job.state == SUCCEEDED and kind == "rank":
            self._ranking, self._seenCases = self._rankingOutput, []
            text = _("Ranked {count} cases; Load next case opens the most uncertain.").format(count=len(job.result))
        elif job.state == SUCCEEDED:  # retrain, model import or download: a new catalog entry
            text = _("Done: model {name}.").format(name=job.result.name)
            self.refreshModels(select=job.result.name)
        if job.warnings:
            text += " " + _("Warning: {warnings}").format(warnings=" ".join(job.warnings))
            slicer.util.warningDisplay("\n\n".join(job.warnings), windowTitle=_("RepUX Segment"))
        if label is bar:
            bar.format = text
        else:
            label.text = text
        if job.state == FAILED and kind != "install":
            self.appendLog(job.error or "")
            slicer.util.errorDisplay(job.error or _("The job failed."), detailedText="\n".join(job.log))

    def appendLog(self, text: str) -> None:
        if text:
            self.ui.logTextEdit.appendPlainText(text)

    # -- Python dependencies --------------------------------------------------------------
    def whenDependenciesReady(self, action) -> None:
        """Run ``action`` now if the jobs' Python packages are installed; else install them
        (after the user agrees) in the background and run it when that has succeeded."""
        if self._installing or self.job("install") is not None:
            return  # an install is running; the buttons wait for it
        missing = self.logic.missingRequirements()
        if not missing:
            action()
            return
        self._installing = True
        self.updateButtons()
        try:
            self.installDependencies(missing, action)
        finally:
            self._installing = False
            self.updateButtons()

    def installDependencies(self, missing: list, action) -> None:
        if not slicer.util.confirmOkCancelDisplay(
            _("RepUX Segment needs these Python packages, which will be downloaded and installed now "
              "(this can take several minutes):\n\n{packages}").format(packages="\n".join(missing)),
            windowTitle=_("Install Python packages"),
        ):
            return
        try:
            if any(requirement.startswith("torch") for requirement in missing):
                self.logic.installTorch()  # the PyTorch extension's own installer and dialogs
        except Exception as error:  # noqa: BLE001 - any failure is shown with what to do next
            self.showInstallFailure(missing, str(error))
            return
        if not self.logic.missingRequirements():
            action()
            return
        self._afterInstall = action
        self.startJob("install", self.logic.installRequirementsJob)

    def installFinished(self, job) -> None:
        action, self._afterInstall = self._afterInstall, None
        missing = self.logic.missingRequirements()
        if job.state == SUCCEEDED and not missing:
            if action is not None:
                action()
        elif job.state != CANCELLED:
            self.showInstallFailure(missing, job.error or "")

    def showInstallFailure(self, missing: list, error: str) -> None:
        message = install_failure_message(missing, error, self.logic.requirementsPath())
        self.appendLog(message)
        slicer.util.errorDisplay(message, windowTitle=_("Install Python packages"))

    # -- segmentation -------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        if self.job("segment") is not None:
            self.cancelJob("segment")
            return
        if self.runsOnServer():
            self.startSegmentation()  # the server does the work: nothing to install here
        else:
            self.whenDependenciesReady(self.startSegmentation)

    def startSegmentation(self) -> None:
        node = self._parameterNode
        if node is None or node.inputVolume is None:
            return
        server = self.serverSettings() if self.runsOnServer() else None
        common = dict(device=node.device, segmentationNode=node.outputSegmentation, **self.logic.speedOptions(node.fast))
        if server is None and self.ui.confidenceCheckBox.checked:
            confidence = self._review.confidence if self._review is not None else None
            self.startJob(
                "segment", lambda: self.logic.segmentForReview(node.inputVolume, node.model, confidenceNode=confidence, **common)
            )
        else:
            self.startJob("segment", lambda: self.logic.segment(node.inputVolume, node.model, wait=False, server=server, **common))

    # -- review ---------------------------------------------------------------------------
    def setReview(self, result) -> None:
        """Show a new review result (None: none): overlay, table, a fresh tour of its regions."""
        self._review = result
        self._tour = None
        self._visited = set()
        self.ui.regionLabel.text = ""
        if result is not None:
            self.ui.showConfidenceCheckBox.checked = True
            self.onShowConfidence(True)
        self.updateReview()

    def updateReview(self) -> None:
        """Recompute the table (after edits, a re-segmentation or a new threshold)."""
        table = self.ui.reviewTableWidget
        table.setRowCount(0)
        self._reviewRows = []
        if self._review is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot compute the review table."), waitCursor=True):
            self._reviewRows = review.review_rows(
                self._review.segmentation, self._review.confidence, self._review.labels, self.ui.lowConfidenceSpinBox.value
            )
            table.setRowCount(len(self._reviewRows))
            for row, values in enumerate(self._reviewRows):
                for column, (key, _header, pattern) in enumerate(REVIEW_COLUMNS):
                    value = values.get(key)
                    table.setItem(row, column, qt.QTableWidgetItem("" if value is None else pattern.format(value)))
        self._tour = None  # regions follow the threshold and the edits: start a new tour (visits kept)

    def onShowConfidence(self, show: bool) -> None:
        if self._review is None:
            return
        confidence = self._review.confidence
        slicer.util.setSliceViewerLayers(foreground=confidence if show else None, foregroundOpacity=0.5)
        if show and confidence.GetDisplayNode() is not None and not slicer.util.getNodesByClass("vtkMRMLColorLegendDisplayNode"):
            slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(confidence)

    def onReviewRowClicked(self, row: int, column: int) -> None:
        segmentId = self._reviewRows[row].get("segment_id") if 0 <= row < len(self._reviewRows) else None
        if segmentId is None:
            return
        centre = self._review.segmentation.GetSegmentCenterRAS(segmentId)
        if centre is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*centre, True)

    def onNextRegion(self) -> None:
        if self._review is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot find the uncertain regions."), waitCursor=True):
            if self._tour is None:
                self._tour = review.UncertainRegionTour(
                    self._review.segmentation, self._review.confidence, self._review.labels,
                    self.ui.lowConfidenceSpinBox.value, visited=self._visited,
                )
            region = self._tour.next_region()
            self._visited = self._tour.visited
            if region is None:
                self.ui.regionLabel.text = _("Every uncertain region has been visited.")
                return
            slicer.modules.markups.logic().JumpSlicesToLocation(*region["ras"], True)
            self.ui.regionLabel.text = _("Region {number} ({left} left): {volume:.1f} ml, {organs}").format(
                number=region["number"], left=region["left"], volume=region["volume_ml"], organs=", ".join(region["organs"])
            )

    def onResegmentRoi(self) -> None:
        node = self._parameterNode
        segmentation = node.outputSegmentation
        volume = reference_volume(segmentation) or node.inputVolume
        roi = self.ui.roiSelector.currentNode()
        self.whenDependenciesReady(
            lambda: self.startJob(
                "segment",
                lambda: self.logic.resegmentRoi(
                    volume, segmentation, roi, device=node.device,
                    confidenceNode=self._review.confidence if self._review is not None else None,
                ),
            )
        )

    def onRankFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder of CTs to rank"))
        if not folder:
            return
        output = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Save the ranking as"), os.path.join(folder, "ranking.csv"), _("CSV (*.csv)")
        )
        if not output:
            return
        node = self._parameterNode
        self._rankingOutput = output
        self.whenDependenciesReady(
            lambda: self.startJob("rank", lambda: self.logic.rankCases([folder], node.model, output, device=node.device))
        )

    def onLoadNextCase(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot load the next case."), waitCursor=True):
            volume = self.logic.loadNextRankedCase(self._ranking, self._seenCases)
            if volume is None:
                slicer.util.infoDisplay(_("Every case of the ranking has been loaded."))
                return
            self._seenCases.append(volume.GetAttribute(review.CASE_PATH_ATTRIBUTE))
            self._parameterNode.inputVolume = volume
            slicer.util.setSliceViewerLayers(background=volume, fit=True)

    # -- server ---------------------------------------------------------------------------
    def runsOnServer(self) -> bool:
        return RUN_ON[max(0, self.ui.runOnComboBox.currentIndex)] == "server"

    def onRunOnChanged(self, index: Optional[int] = None) -> None:
        self.logic.setRunOn(RUN_ON[max(0, self.ui.runOnComboBox.currentIndex)])
        self.refreshModels()

    def onServerFieldsChanged(self) -> None:
        remember = self.ui.rememberTokenCheckBox.checked
        self.logic.setServer(
            self.ui.serverUrlLineEdit.text.strip(),
            self.ui.serverTokenFileLineEdit.currentPath.strip(),
            self.ui.serverTokenLineEdit.text.strip() if remember else "",
        )
        if self._serverModels is not None:  # another server or token: its models must be listed anew
            self._serverModels = None
            self.ui.serverStatusLabel.text = _("Not connected.")
            self.refreshModels()

    def serverSettings(self) -> "ServerSettings":
        """The server of the fields: the token from the token file, else from the token field."""
        return self.logic.serverSettings(
            self.ui.serverUrlLineEdit.text.strip(),
            self.ui.serverTokenFileLineEdit.currentPath.strip(),
            self.ui.serverTokenLineEdit.text.strip(),
        )

    def onTestConnection(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot test the connection.")):
            settings = self.serverSettings()
            # Network calls can take seconds: in a thread, collected by onPoll.
            self._connection = concurrent.futures.ThreadPoolExecutor(max_workers=1).submit(self.logic.connect, settings)
            self.ui.serverStatusLabel.text = _("Connecting to {url}...").format(url=settings.url)
            self._pollTimer.start()
        self.updateButtons()

    def connectionFinished(self) -> None:
        future, self._connection = self._connection, None
        try:
            info, models = future.result()
        except Exception as error:  # noqa: BLE001 - any failure is the connection's answer
            self._serverModels = None
            self.ui.serverStatusLabel.text = _("Failed: {error}").format(error=error)
        else:
            self._serverModels = models
            self.ui.serverStatusLabel.text = _("Connected: repux {version} on {devices}; models: {models}").format(
                version=info.get("version", "?"),
                devices=", ".join(str(device) for device in info.get("devices", [])) or "?",
                models=", ".join(models) or _("none"),
            )
        self.refreshModels()

    # -- correction, export, curation ---------------------------------------------------
    def onEdit(self) -> None:
        node = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(node.outputSegmentation)
        sourceVolume = reference_volume(node.outputSegmentation) or node.inputVolume
        if sourceVolume is not None:
            editor.setSourceVolumeNode(sourceVolume)

    def onExport(self) -> None:
        node = self._parameterNode
        suggested = os.path.join(self.logic.exportFolder(), f"{node.outputSegmentation.GetName()}.nii.gz")
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(),
            _("Export labelmap"),
            suggested,
            _("NIfTI (*.nii.gz);;NRRD (*.nrrd);;Slicer segmentation (*.seg.nrrd)"),
        )
        if not path:
            return
        # The file dialog has asked before replacing the file it returns, and only that one.
        confirmedOverwrite = os.path.exists(path)
        if not path.lower().endswith((".nii.gz", ".nii", ".nrrd")):
            path += ".nii.gz"
            confirmedOverwrite = False
        with slicer.util.tryWithErrorDisplay(_("Failed to export the labelmap."), waitCursor=True):
            # On the grid of the CT the segmentation was made on, whatever is selected now.
            self.logic.exportLabelmap(node.outputSegmentation, path, overwrite=confirmedOverwrite)
            self.logic.setExportFolder(os.path.dirname(path))
            self.ui.statusLabel.text = _("Exported {path}").format(path=path)

    def onAddCase(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to add the case."), waitCursor=True):
            # The labels of the model that made the segmentation, whatever is selected now; the
            # CT it was made on (the selected one only for a segmentation that names none).
            model = node.outputSegmentation.GetAttribute(MODEL_ATTRIBUTE) or node.model
            volume = reference_volume(node.outputSegmentation) or node.inputVolume
            caseId = self.logic.addCase(volume, node.outputSegmentation, self.trainingSetPath(), model)
            self.ui.retrainStatusLabel.text = _("Added case {case} to {folder}.").format(
                case=caseId, folder=self.trainingSetPath()
            )

    def onRetrainButton(self) -> None:
        if self.job("retrain") is not None:
            self.cancelJob("retrain")
            return
        self.whenDependenciesReady(self.startRetraining)

    def startRetraining(self) -> None:
        node = self._parameterNode
        self.startJob(
            "retrain",
            lambda: self.logic.retrain(
                self.trainingSetPath(),
                node.model,
                wait=False,
                iterations=node.iterations,
                resume=self.ui.resumeCheckBox.checked,
            ),
        )


#
# RepUXSegmentLogic
#


class RepUXSegmentLogic(ScriptedLoadableModuleLogic):
    """The module's logic on ``slicer.mrmlScene``: RepUXLogic plus settings and dependencies.
    It shows no dialogs; the Widget does.

    Use it from the Python console, e.g.::

        logic = slicer.util.getModuleLogic("RepUXSegment")
        segmentation = logic.segment(getNode("CT"), "demo")
    """

    MODELS_FOLDER_SETTING = "RepUXSegment/ModelsFolder"
    TRAINING_SET_SETTING = "RepUXSegment/TrainingSetFolder"
    EXPORT_FOLDER_SETTING = "RepUXSegment/ExportFolder"
    RUN_ON_SETTING = "RepUXSegment/RunOn"
    SERVER_URL_SETTING = "RepUXSegment/ServerURL"
    SERVER_TOKEN_FILE_SETTING = "RepUXSegment/ServerTokenFile"
    #: Only when the user ticks "Remember": Slicer's settings file holds it in plain text.
    SERVER_TOKEN_SETTING = "RepUXSegment/ServerToken"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return RepUXSegmentParameterNode(super().getParameterNode())

    # -- settings -----------------------------------------------------------------------
    @staticmethod
    def _setting(key: str, default: str = "") -> str:
        value = qt.QSettings().value(key)
        return str(value) if value else default

    def modelsFolder(self) -> str:
        return os.environ.get(MODELS_DIR_ENV) or self._setting(
            self.MODELS_FOLDER_SETTING, str(DEFAULT_USER_MODELS_DIR.expanduser())
        )

    def setModelsFolder(self, path: str) -> None:
        qt.QSettings().setValue(self.MODELS_FOLDER_SETTING, path)

    def trainingSetFolder(self) -> str:
        return self._setting(self.TRAINING_SET_SETTING)

    def setTrainingSetFolder(self, path: str) -> None:
        qt.QSettings().setValue(self.TRAINING_SET_SETTING, path)

    def exportFolder(self) -> str:
        return self._setting(self.EXPORT_FOLDER_SETTING, str(Path.home()))

    def setExportFolder(self, path: str) -> None:
        qt.QSettings().setValue(self.EXPORT_FOLDER_SETTING, path)

    def runOn(self) -> str:
        value = self._setting(self.RUN_ON_SETTING, "local")
        return value if value in RUN_ON else "local"

    def setRunOn(self, value: str) -> None:
        qt.QSettings().setValue(self.RUN_ON_SETTING, value)

    def serverUrl(self) -> str:
        return self._setting(self.SERVER_URL_SETTING)

    def serverTokenFile(self) -> str:
        return self._setting(self.SERVER_TOKEN_FILE_SETTING)

    def rememberedServerToken(self) -> str:
        return self._setting(self.SERVER_TOKEN_SETTING)

    def setServer(self, url: str, tokenFile: str, rememberedToken: str) -> None:
        """Store the server's URL and token file; the token itself only when the user asked
        (``rememberedToken`` empty removes a stored one)."""
        settings = qt.QSettings()
        settings.setValue(self.SERVER_URL_SETTING, url)
        settings.setValue(self.SERVER_TOKEN_FILE_SETTING, tokenFile)
        if rememberedToken:
            settings.setValue(self.SERVER_TOKEN_SETTING, rememberedToken)
        else:
            settings.remove(self.SERVER_TOKEN_SETTING)

    @staticmethod
    def serverSettings(url: str, tokenFile: str = "", token: str = "") -> "ServerSettings":
        """The server to use: the token from ``tokenFile`` when given, else ``token``.

        Raises:
            ValueError: no URL, or no token.
        """
        if not url:
            raise ValueError("enter the server's URL, e.g. http://127.0.0.1:8765")
        if tokenFile:
            return ServerSettings.from_token_file(url, tokenFile)
        if not token:
            raise ValueError("choose a token file, or enter the token the server printed")
        return ServerSettings(url, token)

    def connect(self, settings: "ServerSettings") -> tuple:
        """The server's information and its models as catalog entries (network calls: seconds)."""
        repux = self.repux()
        info = repux.test_connection(settings.url, settings.token, settings.cafile)
        models = {card["name"]: repux.server_model(settings, card["name"]) for card in info.get("models", [])}
        return info, models

    @staticmethod
    def speedOptions(fast: bool) -> dict:
        """``repux segment`` options of the speed/quality choice: fewer overlapping windows and
        bfloat16 where the device computes it natively (CUDA, CPUs with AVX-512 BF16 or AMX)
        when ``fast``, the bundle's own settings otherwise."""
        return {"fast": True, "overlap": FAST_OVERLAP} if fast else {}

    # -- the GUI-free logic -------------------------------------------------------------
    def repux(self) -> RepUXLogic:
        """RepUXLogic on the application's scene, the configured model folder and PythonSlicer."""
        return RepUXLogic(slicer.mrmlScene, ModelCatalog(self.modelsFolder()), python=python_executable())

    def models(self) -> list:
        return self.repux().catalog.models()

    def catalogProblems(self) -> list:
        catalog = ModelCatalog(self.modelsFolder())
        catalog.models()
        return catalog.problems

    def modelEntry(self, name: str):
        """The catalog's entry for ``name``, or None when the catalog has no such model."""
        try:
            return self.repux().catalog.get(name)
        except ValueError as error:
            logging.warning(str(error))
            return None

    def segment(self, volumeNode, model, device="auto", wait=True, progress=None, segmentationNode=None, server=None, **options):
        """See ``RepUXLogic.segment``: a segmentation node (``wait=True``) or a running job;
        with ``server`` (a ``ServerSettings``) the job runs there."""
        return self.repux().segment(volumeNode, model, device, wait, progress, segmentationNode, server=server, **options)

    def segmentForReview(self, volumeNode, model, device="auto", segmentationNode=None, confidenceNode=None, **options):
        """See ``RepUXLogic.segment_for_review``: a running job whose result is a ReviewResult."""
        return self.repux().segment_for_review(
            volumeNode, model, device, wait=False, segmentation_node=segmentationNode, confidence_node=confidenceNode, **options
        )

    def resegmentRoi(self, volumeNode, segmentationNode, roiNode, device="auto", confidenceNode=None, **options):
        """See ``RepUXLogic.resegment_roi``: a running job whose result is the number of voxels changed."""
        return self.repux().resegment_roi(
            volumeNode, segmentationNode, roiNode, device=device, wait=False, confidence_node=confidenceNode, **options
        )

    def rankCases(self, cases, model, output, device="auto", **options):
        """See ``RepUXLogic.rank_cases``: a running job whose result is the case paths, most uncertain first."""
        return self.repux().rank_cases(cases, model, output, device=device, wait=False, **options)

    def loadNextRankedCase(self, ranking, seen):
        return self.repux().load_next_ranked_case(ranking, seen)

    def exportLabelmap(self, segmentationNode, path, referenceVolumeNode=None, model=None, overwrite=False):
        return self.repux().export_labelmap(segmentationNode, path, referenceVolumeNode, model, overwrite)

    def addCase(self, volumeNode, segmentationNode, trainingSetFolder, model) -> str:
        return self.repux().add_case(volumeNode, segmentationNode, trainingSetFolder, model)

    def retrain(self, trainingSetFolder, baseModel, outputFolder=None, wait=True, progress=None, **options):
        return self.repux().retrain(trainingSetFolder, baseModel, outputFolder, wait, progress, **options)

    def importBundle(self, folder, name=None):
        return self.repux().import_bundle(folder, name)

    def availableModels(self) -> list:
        """Published models that can be downloaded and are not installed yet (the registry's)."""
        return self.repux().catalog.available()

    def downloadModel(self, name, wait=False, **options):
        """See ``RepUXLogic.download_model``: the running job (``wait=False``) or the new entry."""
        return self.repux().download_model(name, wait=wait, **options)

    def importModelFile(self, name, path, wait=False, **options):
        """See ``RepUXLogic.import_model_file``: install a file of a published model downloaded by hand."""
        return self.repux().import_model_file(name, path, wait=wait, **options)

    def importCheckpoint(self, path, name, arch, labels, wait=True, **options):
        """See ``RepUXLogic.import_checkpoint``: the new catalog entry, or the running job."""
        return self.repux().import_checkpoint(path, name, arch, labels, wait=wait, **options)

    # -- Python dependencies ------------------------------------------------------------
    def requirementsPath(self) -> str:
        return os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt")

    def missingRequirements(self) -> list:
        """Lines of requirements.txt that are not installed (or in another version), plus torch."""
        return missing_requirements([*read_requirements(self.requirementsPath()), TORCH_REQUIREMENT])

    def installTorch(self) -> None:
        """Install torch with the PyTorch extension, which picks the build that fits the GPU
        driver; it imports torch once, after installing it (segmenting never does).

        Raises:
            RuntimeError: the PyTorch extension is missing, or it installed nothing.
        """
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("the PyTorch extension is not installed; install it from the Extensions Manager") from None
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):]
        ) is None:
            raise RuntimeError("the PyTorch extension could not install torch (see the Python console)")

    def installRequirementsJob(self) -> "ProcessJob":
        """``pip install -r requirements.txt`` as a background job (Cancel, log, no frozen GUI)."""
        return runner.pip_install_job(self.requirementsPath(), python=python_executable())


#
# RepUXSegmentTest
#


class RepUXSegmentTest(ScriptedLoadableModuleTest):
    """The module in the Slicer application, offline: what needs no torch always runs; the
    segmentation of a phantom runs when the jobs' Python packages are installed, and is
    skipped with the reason otherwise (the test never installs anything)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        if UNSUPPORTED is not None:
            self.skipTest(UNSUPPORTED)
        self.setUp()
        self.test_CatalogAndLabelmapRoundTrip()
        self.setUp()
        self.test_SegmentPhantomWithDemoModel()

    def test_CatalogAndLabelmapRoundTrip(self) -> None:
        """Needs no torch: the shipped demo's card, a label map imported as segments with the
        model's names and terminology, exported back to the same values on the same grid."""
        import numpy as np

        logic = RepUXSegmentLogic()
        demo = logic.modelEntry("demo")
        self.assertIsNotNone(demo, "the shipped demo model is missing from the catalog")
        organs = [label for label in demo.labels if label.value != 0]
        work = Path(tempfile.mkdtemp(prefix="RepUXSegmentTest-"))
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
        labels = np.zeros((12, 16, 20), dtype=np.uint8)
        for index, label in enumerate(organs):
            labels[2 + 2 * index, 3:9, 4:12] = label.value
        slicer.util.updateVolumeFromArray(volume, labels.astype(np.int16))
        volume.SetSpacing(1.5, 1.5, 2.0)
        labelFile = work / "labels.nrrd"
        labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        slicer.util.updateVolumeFromArray(labelNode, labels)
        labelNode.CopyOrientation(volume)
        self.assertTrue(slicer.util.saveNode(labelNode, str(labelFile)))

        segmentation = logic.repux().import_labelmap(labelFile, "demo", reference_volume_node=volume)
        segments = [segmentation.GetSegmentation().GetNthSegment(i) for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual([segment.GetName() for segment in segments], [label.name for label in organs])
        for segment, label in zip(segments, organs):
            self.assertEqual(segment_tag(segment, segment.GetTerminologyEntryTagName()), label.terminology_entry())
        exported = logic.exportLabelmap(segmentation, str(work / "exported.nrrd"))
        roundTrip = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(exported)))
        self.assertTrue(np.array_equal(roundTrip, labels))
        self.delayDisplay("Catalog and label map round trip passed")

    def test_SegmentPhantomWithDemoModel(self) -> None:
        logic = RepUXSegmentLogic()
        missing = logic.missingRequirements()
        if missing:
            self.skipTest("segmentation not tested: the jobs' Python packages are not installed ({}); "
                          "click Segment once in the module to install them".format(", ".join(missing)))
        work = Path(tempfile.mkdtemp(prefix="RepUXSegmentTest-"))

        # A phantom made by the repux program (in its own process, like every model job).
        RepuxJob(["make-phantoms", "1", str(work / "phantoms")], python=python_executable()).wait()
        case = json.loads((work / "phantoms" / "dataset.json").read_text(encoding="utf-8"))["training"][0]
        volume = slicer.util.loadVolume(str(work / "phantoms" / case["image"]))
        truth = slicer.util.loadLabelVolume(str(work / "phantoms" / case["label"]))
        self.delayDisplay("Phantom loaded")

        segmentation = logic.segment(volume, "demo", device="auto")
        demo = logic.modelEntry("demo")
        segments = [segmentation.GetSegmentation().GetNthSegment(i) for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual([s.GetName() for s in segments], [label.name for label in demo.labels if label.value != 0])
        referenceRole = segmentation.GetReferenceImageGeometryReferenceRole()
        self.assertEqual(segmentation.GetNodeReference(referenceRole).GetID(), volume.GetID())
        self.delayDisplay("Segmented")

        exported = logic.exportLabelmap(segmentation, str(work / "result.nii.gz"))
        result = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(exported)))
        expected = slicer.util.arrayFromVolume(truth)
        self.assertEqual(result.shape, expected.shape)
        overlap = ((result > 0) & (expected > 0)).sum()
        dice = 2.0 * overlap / max(1, (result > 0).sum() + (expected > 0).sum())
        logging.info(f"RepUXSegmentTest: foreground Dice against the phantom's labels: {dice:.3f}")
        self.assertGreater(dice, 0.5)
        self.delayDisplay("Test passed")
