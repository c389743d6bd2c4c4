"""RepUX Segment: abdominal organ segmentation with RepUX-Net in 3D Slicer.

Module, parameter node, Widget (thin: it only connects the .ui to the Logic), Logic (wraps
``RepUXSegmentLib.logic.RepUXLogic``, never touches widgets) and the self-test. Model work
runs in separate ``repux`` processes; this process never imports torch for segmenting or
training. Python dependencies are installed on first use, after the user confirms.
"""

import importlib.util
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


def _useSourceTreePackage() -> None:
    """From a source checkout (Extension Wizard / "Add module path") the repux package is in
    ../Training, not next to the module as in a built extension: put it on the path."""
    training = Path(__file__).resolve().parent.parent / "Training"
    if importlib.util.find_spec("repux") is None and (training / "repux" / "__init__.py").is_file():
        sys.path.insert(0, str(training))


_useSourceTreePackage()

from RepUXSegmentLib.catalog import DEFAULT_USER_MODELS_DIR, MODELS_DIR_ENV, ModelCatalog, ModelEntry  # noqa: E402
from RepUXSegmentLib.dependencies import TORCH_REQUIREMENT, missing_requirements, read_requirements  # noqa: E402
from RepUXSegmentLib.logic import RepUXLogic  # noqa: E402
from RepUXSegmentLib.runner import (  # noqa: E402
    CANCELLED,
    FAILED,
    SUCCEEDED,
    RepuxJob,
    describe_progress,
    python_executable,
)
from RepUXSegmentLib.segmentations import MODEL_ATTRIBUTE, segment_tag  # noqa: E402

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
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._segmentJob = None
        self._retrainJob = None
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RepUXSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RepUXSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelsFolderPathLineEdit.currentPath = self.logic.modelsFolder()
        self.ui.trainingSetPathLineEdit.currentPath = self.logic.trainingSetFolder()
        self.ui.modelsFolderPathLineEdit.connect("currentPathChanged(QString)", self.onModelsFolderChanged)
        self.ui.trainingSetPathLineEdit.connect("currentPathChanged(QString)", self.onTrainingSetChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.editButton.connect("clicked(bool)", self.onEdit)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.retrainButton.connect("clicked(bool)", self.onRetrainButton)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)

        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelJobs()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        # A result must never land in the next scene.
        self.cancelJobs()
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
        modelIndex = self.ui.modelComboBox.findData(node.model)
        if modelIndex >= 0 and modelIndex != self.ui.modelComboBox.currentIndex:
            self.ui.modelComboBox.currentIndex = modelIndex
        if node.device in DEVICES:
            self.ui.deviceComboBox.currentIndex = DEVICES.index(node.device)
        self.ui.show3DButton.setSegmentationNode(node.outputSegmentation)
        self.updateButtons()

    def updateButtons(self) -> None:
        node = self._parameterNode
        segmenting = self._segmentJob is not None
        retraining = self._retrainJob is not None
        hasModel = self.ui.modelComboBox.currentIndex >= 0
        hasResult = node is not None and node.outputSegmentation is not None and not segmenting
        self.ui.segmentButton.text = _("Cancel") if segmenting else _("Segment")
        self.ui.segmentButton.enabled = segmenting or (node is not None and node.inputVolume is not None and hasModel)
        self.ui.editButton.enabled = hasResult
        self.ui.exportButton.enabled = hasResult
        self.ui.addCaseButton.enabled = hasResult and node.inputVolume is not None and bool(self.trainingSetPath())
        self.ui.retrainButton.text = _("Cancel") if retraining else _("Retrain")
        self.ui.retrainButton.enabled = retraining or (hasModel and bool(self.trainingSetPath()))

    # -- models -------------------------------------------------------------------------
    def refreshModels(self, select: Optional[str] = None) -> None:
        combo = self.ui.modelComboBox
        current = select or (self._parameterNode.model if self._parameterNode else combo.currentData)
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for entry in self.logic.models():
            combo.addItem(entry.name if entry.source == "shipped" else f"{entry.name} (yours)", entry.name)
        index = combo.findData(current)
        combo.currentIndex = index if index >= 0 else (0 if combo.count else -1)
        combo.blockSignals(wasBlocked)
        for problem in self.logic.catalogProblems():
            self.appendLog(problem)
        self.onModelChanged()

    def onModelChanged(self, index: Optional[int] = None) -> None:
        name = self.ui.modelComboBox.currentData
        entry = self.logic.modelEntry(name) if name else None
        self.ui.modelCardLabel.text = entry.card_text() if entry else _("No model selected.")
        if self._parameterNode and name and self._parameterNode.model != name:
            self._parameterNode.model = name
        self.updateButtons()

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and 0 <= index < len(DEVICES):
            self._parameterNode.device = DEVICES[index]

    def onModelsFolderChanged(self, path: str) -> None:
        self.logic.setModelsFolder(path)
        self.refreshModels()

    def onTrainingSetChanged(self, path: str) -> None:
        self.logic.setTrainingSetFolder(path)
        self.updateButtons()

    def trainingSetPath(self) -> str:
        return self.ui.trainingSetPathLineEdit.currentPath.strip()

    def onImportModel(self) -> None:
        choice = qt.QMessageBox(slicer.util.mainWindow())
        choice.setWindowTitle(_("Import model"))
        choice.setText(_("Import a model bundle folder (model.json + model.safetensors) or a published .pth checkpoint?"))
        bundleButton = choice.addButton(_("Bundle folder..."), qt.QMessageBox.AcceptRole)
        checkpointButton = choice.addButton(_("Checkpoint (.pth)..."), qt.QMessageBox.AcceptRole)
        choice.addButton(qt.QMessageBox.Cancel)
        choice.exec_()
        if choice.clickedButton() == bundleButton:
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model bundle folder"))
            if folder:
                with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
                    entry = self.logic.importBundle(folder)
                    self.refreshModels(select=entry.name)
        elif choice.clickedButton() == checkpointButton:
            self.importCheckpoint()

    def importCheckpoint(self) -> None:
        window = slicer.util.mainWindow()
        path = qt.QFileDialog.getOpenFileName(window, _("Published checkpoint"), "", _("PyTorch checkpoint (*.pth *.pt)"))
        if not path:
            return
        arch = qt.QInputDialog.getItem(window, _("Architecture"), _("Network:"), ["repuxnet", "uxnet"], 0, False)
        if not arch:
            return
        labels = qt.QInputDialog.getItem(
            window, _("Labels"), _("Label order of the checkpoint:"), ["flare", "flare21", "amos"], 0, False
        )
        if not labels:
            return
        name = qt.QInputDialog.getText(window, _("Model name"), _("Name in your model folder:"), qt.QLineEdit.Normal, Path(path).stem)
        if not name or not self.logic.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the checkpoint."), waitCursor=True):
            entry = self.logic.importCheckpoint(path, name, arch, labels)
            self.refreshModels(select=entry.name)

    # -- segmentation -------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        if self._segmentJob is not None:
            with slicer.util.WaitCursor():
                self._segmentJob.cancel()
            self.onPoll()
            return
        node = self._parameterNode
        if not self.logic.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            self._segmentJob = self.logic.segment(
                node.inputVolume,
                node.model,
                device=node.device,
                wait=False,
                segmentationNode=node.outputSegmentation,
                **self.logic.speedOptions(node.fast),
            )
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self.appendLog(" ".join(self._segmentJob.command))
            self._pollTimer.start()
        self.updateButtons()

    def onPoll(self) -> None:
        for kind in ("segment", "retrain"):
            job = getattr(self, f"_{kind}Job")
            if job is None:
                continue
            running = job.poll()
            self.showProgress(kind, job)
            if not running:
                setattr(self, f"_{kind}Job", None)
                self.jobFinished(kind, job)
        if self._segmentJob is None and self._retrainJob is None:
            self._pollTimer.stop()
        self.updateButtons()

    def showProgress(self, kind: str, job: RepuxJob) -> None:
        bar, label = (
            (self.ui.progressBar, self.ui.statusLabel)
            if kind == "segment"
            else (self.ui.retrainProgressBar, self.ui.retrainStatusLabel)
        )
        fraction = job.fraction
        bar.maximum = 1000 if fraction is not None else 0  # 0: busy indicator while unknown
        bar.value = int(1000 * fraction) if fraction is not None else 0
        label.text = describe_progress(job.latest) if job.latest else _("Starting...")
        shown = getattr(self, f"_{kind}LogShown", 0)
        lines = list(job.log)
        for line in lines[shown:]:
            self.appendLog(line)
        setattr(self, f"_{kind}LogShown", len(lines))

    def jobFinished(self, kind: str, job: RepuxJob) -> None:
        setattr(self, f"_{kind}LogShown", 0)
        bar = self.ui.progressBar if kind == "segment" else self.ui.retrainProgressBar
        label = self.ui.statusLabel if kind == "segment" else self.ui.retrainStatusLabel
        bar.maximum = 1000
        if job.state == SUCCEEDED:
            bar.value = 1000
            if kind == "segment":
                self._parameterNode.outputSegmentation = job.result
                label.text = _("Done: {count} segments.").format(count=job.result.GetSegmentation().GetNumberOfSegments())
            else:
                label.text = _("Done: new model version {name}.").format(name=job.result.name)
                self.refreshModels(select=job.result.name)
        elif job.state == CANCELLED:
            bar.value = 0
            label.text = _("Cancelled.")
        elif job.state == FAILED:
            bar.value = 0
            label.text = _("Failed.")
            self.appendLog(job.error or "")
            slicer.util.errorDisplay(job.error or _("The job failed."), detailedText="\n".join(job.log))

    def cancelJobs(self) -> None:
        for kind in ("segment", "retrain"):
            job = getattr(self, f"_{kind}Job")
            if job is not None:
                job.cancel()
                setattr(self, f"_{kind}Job", None)
        if self._pollTimer is not None:
            self._pollTimer.stop()

    def appendLog(self, text: str) -> None:
        if text:
            self.ui.logTextEdit.appendPlainText(text)

    # -- correction, export, curation ---------------------------------------------------
    def onEdit(self) -> None:
        node = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(node.outputSegmentation)
        if node.inputVolume is not None:
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(node.inputVolume)
            else:  # Slicer before 5.2
                editor.setMasterVolumeNode(node.inputVolume)

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
            self.logic.exportLabelmap(
                node.outputSegmentation, path, referenceVolumeNode=node.inputVolume, overwrite=confirmedOverwrite
            )
            self.logic.setExportFolder(os.path.dirname(path))
            self.ui.statusLabel.text = _("Exported {path}").format(path=path)

    def onAddCase(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to add the case."), waitCursor=True):
            # The labels of the model that made the segmentation, whatever is selected now.
            model = node.outputSegmentation.GetAttribute(MODEL_ATTRIBUTE) or node.model
            caseId = self.logic.addCase(node.inputVolume, node.outputSegmentation, self.trainingSetPath(), model)
            self.ui.retrainStatusLabel.text = _("Added case {case} to {folder}.").format(
                case=caseId, folder=self.trainingSetPath()
            )

    def onRetrainButton(self) -> None:
        if self._retrainJob is not None:
            with slicer.util.WaitCursor():
                self._retrainJob.cancel()
            self.onPoll()
            return
        if not self.logic.ensureDependencies():
            return
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start retraining."), waitCursor=True):
            self._retrainJob = self.logic.retrain(
                self.trainingSetPath(),
                node.model,
                wait=False,
                iterations=node.iterations,
                resume=self.ui.resumeCheckBox.checked,
            )
            self.ui.retrainProgressBar.value = 0
            self.ui.retrainStatusLabel.text = _("Starting...")
            self.appendLog(" ".join(self._retrainJob.command))
            self._pollTimer.start()
        self.updateButtons()


#
# RepUXSegmentLogic
#


class RepUXSegmentLogic(ScriptedLoadableModuleLogic):
    """The module's logic on ``slicer.mrmlScene``: RepUXLogic plus settings and dependencies.

    Use it from the Python console, e.g.::

        logic = slicer.util.getModuleLogic("RepUXSegment")
        segmentation = logic.segment(getNode("CT"), "demo")
    """

    MODELS_FOLDER_SETTING = "RepUXSegment/ModelsFolder"
    TRAINING_SET_SETTING = "RepUXSegment/TrainingSetFolder"
    EXPORT_FOLDER_SETTING = "RepUXSegment/ExportFolder"

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

    @staticmethod
    def speedOptions(fast: bool) -> dict:
        """``repux segment`` options of the speed/quality choice: fewer overlapping windows and
        bfloat16 on CUDA when ``fast``, the bundle's own settings otherwise."""
        return {"fast": True, "overlap": FAST_OVERLAP} if fast else {}

    # -- the GUI-free logic -------------------------------------------------------------
    def repux(self) -> RepUXLogic:
        """RepUXLogic on the application's scene, the configured model folder and PythonSlicer."""
        return RepUXLogic(slicer.mrmlScene, ModelCatalog(self.modelsFolder()), python=python_executable())

    def models(self) -> list[ModelEntry]:
        return self.repux().catalog.models()

    def catalogProblems(self) -> list[str]:
        catalog = ModelCatalog(self.modelsFolder())
        catalog.models()
        return catalog.problems

    def modelEntry(self, name: str) -> Optional[ModelEntry]:
        try:
            return self.repux().catalog.get(name)
        except ValueError as error:
            logging.warning(str(error))
            return None

    def segment(self, volumeNode, model, device="auto", wait=True, progress=None, segmentationNode=None, **options):
        """See ``RepUXLogic.segment``: a segmentation node (``wait=True``) or a running job."""
        return self.repux().segment(volumeNode, model, device, wait, progress, segmentationNode, **options)

    def exportLabelmap(self, segmentationNode, path, referenceVolumeNode=None, model=None, overwrite=False):
        return self.repux().export_labelmap(segmentationNode, path, referenceVolumeNode, model, overwrite)

    def addCase(self, volumeNode, segmentationNode, trainingSetFolder, model) -> str:
        return self.repux().add_case(volumeNode, segmentationNode, trainingSetFolder, model)

    def retrain(self, trainingSetFolder, baseModel, outputFolder=None, wait=True, progress=None, **options):
        return self.repux().retrain(trainingSetFolder, baseModel, outputFolder, wait, progress, **options)

    def importBundle(self, folder, name=None) -> ModelEntry:
        return self.repux().import_bundle(folder, name)

    def importCheckpoint(self, path, name, arch, labels, **options) -> ModelEntry:
        return self.repux().import_checkpoint(path, name, arch, labels, wait=True, **options)

    # -- Python dependencies ------------------------------------------------------------
    def requirementsPath(self) -> str:
        return os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt")

    def missingRequirements(self) -> list[str]:
        """Lines of requirements.txt that are not installed (or in another version), plus torch."""
        return missing_requirements([*read_requirements(self.requirementsPath()), TORCH_REQUIREMENT])

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install missing Python packages after the user agrees; True when everything is there.

        torch comes from the PyTorch extension's installer (which picks the CUDA build that
        fits the driver); the rest from requirements.txt with pip.
        """
        missing = self.missingRequirements()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("RepUX Segment needs these Python packages, which will be downloaded and installed now "
              "(this can take several minutes):\n\n{packages}").format(packages="\n".join(missing)),
            windowTitle=_("Install Python packages"),
        ):
            return False
        with slicer.util.WaitCursor():
            if any(requirement.startswith("torch") for requirement in missing):
                try:
                    import PyTorchUtils
                except ImportError:
                    slicer.util.errorDisplay(_("Install the PyTorch extension from the Extensions Manager first."))
                    return False
                # installTorch imports torch once, after installing it; segmenting never does.
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):]
                ) is None:
                    return False
            if any(not requirement.startswith("torch") for requirement in missing):
                slicer.util.pip_install(["-r", self.requirementsPath()])
        stillMissing = self.missingRequirements()
        if stillMissing:
            slicer.util.errorDisplay(_("Could not install: {packages}").format(packages=", ".join(stillMissing)))
        return not stillMissing


#
# RepUXSegmentTest
#


class RepUXSegmentTest(ScriptedLoadableModuleTest):
    """Segments a synthetic phantom with the shipped demo model and checks the result."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SegmentPhantomWithDemoModel()

    def test_SegmentPhantomWithDemoModel(self) -> None:
        self.delayDisplay("Starting the test")
        logic = RepUXSegmentLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False), "Python dependencies are missing")
        work = Path(tempfile.mkdtemp(prefix="RepUXSegmentTest-"))

        # A phantom made by the repux program (in its own process, like every model job).
        RepuxJob(["make-phantoms", "1", str(work / "phantoms")], python=python_executable()).wait()
        case = json.loads((work / "phantoms" / "dataset.json").read_text())["training"][0]
        volume = slicer.util.loadVolume(str(work / "phantoms" / case["image"]))
        truth = slicer.util.loadLabelVolume(str(work / "phantoms" / case["label"]))
        self.delayDisplay("Phantom loaded")

        segmentation = logic.segment(volume, "demo", device="auto")
        demo = logic.modelEntry("demo")
        segments = [segmentation.GetSegmentation().GetNthSegment(i) for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual([s.GetName() for s in segments], [label.name for label in demo.labels if label.value != 0])
        for segment, label in zip(segments, [label for label in demo.labels if label.value != 0]):
            self.assertEqual(segment_tag(segment, segment.GetTerminologyEntryTagName()), label.terminology_entry())
        referenceRole = segmentation.GetReferenceImageGeometryReferenceRole()
        self.assertEqual(segmentation.GetNodeReference(referenceRole).GetID(), volume.GetID())
        self.delayDisplay("Segmented")

        exported = logic.exportLabelmap(segmentation, str(work / "result.nii.gz"), referenceVolumeNode=volume)
        result = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(exported)))
        expected = slicer.util.arrayFromVolume(truth)
        self.assertEqual(result.shape, expected.shape)
        overlap = ((result > 0) & (expected > 0)).sum()
        dice = 2.0 * overlap / max(1, (result > 0).sum() + (expected > 0).sum())
        logging.info(f"RepUXSegmentTest: foreground Dice against the phantom's labels: {dice:.3f}")
        self.assertGreater(dice, 0.5)
        self.delayDisplay("Test passed")
