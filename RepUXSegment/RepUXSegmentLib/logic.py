"""``RepUXLogic``: the module's scripting API, GUI-free and usable with the ``slicer-core`` wheel.

Every method works on the scene and nodes it is given (no ``slicer.mrmlScene``, no
``slicer.app``). Model work runs in a separate ``repux`` process (see :mod:`.runner`); the
scene is changed only after that process has succeeded and its result has been read and
checked, so a failure or a Cancel leaves the scene exactly as it was.

Example::

    logic = RepUXLogic(scene)
    segmentation = logic.segment(volume_node, "demo")          # blocks, returns the node
    job = logic.segment(volume_node, "demo", wait=False)        # returns a RepuxJob
    while job.poll(): ...                                       # progress: job.latest
    logic.export_labelmap(segmentation, "/tmp/labels.nii.gz")
    result = logic.segment_for_review(volume_node, "demo")     # segmentation + confidence node
    rows = review.review_rows(result.segmentation, result.confidence, result.labels)
    tour = review.UncertainRegionTour(result.segmentation, result.confidence, result.labels)
    tour.next_region()                                          # {"ras": ..., "organs": [...], ...}
    logic.resegment_roi(volume_node, result.segmentation, roi_node, "demo", confidence_node=result.confidence)
    ranking = logic.rank_cases(["/data/unlabeled"], "demo", "/data/ranking.csv")
    volume = logic.load_next_ranked_case("/data/ranking.csv", seen=[...])
    case = logic.add_case(volume_node, segmentation, "/data/curated", "demo")
    entry = logic.retrain("/data/curated", "demo", None, iterations=200)
    [m.name for m in logic.catalog.available()]                 # published, not installed
    job = logic.download_model("uxnet-flare", wait=False)       # a background download
    entry = logic.import_model_file("uxnet-flare", "/media/usb/uxnet_flare.pth")  # offline
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataclasses import dataclass

import numpy as np

import slicer
from repux.errors import InputError

from . import review, segmentations, trainingset
from .catalog import ModelCatalog, ModelEntry
from .remote import RemoteJob, ServerSettings, model_entry, test_connection
from .runner import RepuxJob
from .volumes import (
    dimensions,
    ijk_to_ras,
    labelmap_node_from_array,
    read_volume_node,
    same_grid,
    voxel_array,
    write_volume_node,
)

DEVICES = ("auto", "cpu", "cuda")
#: Largest difference (mm) between the input's and the result's voxel-to-RAS matrices.
GRID_TOLERANCE_MM = 1e-3

Progress = Callable[[dict[str, Any]], None]


def option_arguments(options: dict[str, Any]) -> list[str]:
    """Command-line words for keyword options: ``fast=True`` -> ``--fast``,
    ``overlap=0.25`` -> ``--overlap 0.25``, ``patch_size=(96, 96, 96)`` -> ``--patch-size 96 96 96``;
    False and None are left out."""
    words: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, *(str(item) for item in value)]
        else:
            words += [flag, str(value)]
    return words


@dataclass
class ReviewResult:
    """What :meth:`RepUXLogic.segment_for_review` returns.

    Attributes:
        segmentation: the segmentation node (one segment per label).
        confidence: the confidence volume node (0..1 on the CT's grid, confidence colours).
        labels: the model's labels (for :mod:`.review`'s functions).
    """

    segmentation: Any
    confidence: Any
    labels: list


class RepUXLogic:
    """Segment, export, curate and retrain on one MRML scene.

    Args:
        scene: the vtkMRMLScene nodes are added to.
        catalog: the models to choose from (default: :class:`ModelCatalog` with its defaults).
        python: the interpreter for ``repux`` jobs (default: :func:`.runner.python_executable`).
        temp_dir: parent folder for the jobs' temporary files (default: the system's).
    """

    def __init__(
        self,
        scene: "slicer.vtkMRMLScene",
        catalog: ModelCatalog | None = None,
        python: str | None = None,
        temp_dir: str | os.PathLike | None = None,
    ) -> None:
        self.scene = scene
        self.catalog = catalog if catalog is not None else ModelCatalog()
        self.python = python
        self.temp_dir = str(temp_dir) if temp_dir is not None else None

    # -- segmentation -------------------------------------------------------------------
    def segment(
        self,
        volume_node: "slicer.vtkMRMLScalarVolumeNode",
        model: "str | os.PathLike | ModelEntry",
        device: str = "auto",
        wait: bool = True,
        progress: Progress | None = None,
        segmentation_node: "slicer.vtkMRMLSegmentationNode | None" = None,
        server: ServerSettings | None = None,
        **options: Any,
    ) -> "slicer.vtkMRMLSegmentationNode | RepuxJob":
        """Segment ``volume_node`` with ``model`` in a ``repux segment`` process, or on ``server``.

        With ``server``, ``model`` is a name the server serves, the server picks the device,
        and the job is a :class:`.remote.RemoteJob` (same interface, same result).

        Result: ``segmentation_node`` (its segments replaced) or a new segmentation node in
        the scene, with one segment per label (name, colour, terminology), the volume as
        reference geometry and the volume's parent transform. ``options`` become
        ``repux segment`` flags (e.g. ``fast=True``, ``overlap=0.25``).

        Returns the node (``wait=True``; raises :class:`.runner.JobError` on failure) or the
        running :class:`.runner.RepuxJob` (``wait=False``), whose ``result`` is the node.
        """
        return self._segment_job(
            volume_node, model, device, wait, progress, segmentation_node, options,
            prepare=lambda work: [],
            finish=lambda label_path, entry, commit: commit(),
            server=server,
        )

    def segment_for_review(
        self,
        volume_node: "slicer.vtkMRMLScalarVolumeNode",
        model: "str | os.PathLike | ModelEntry",
        device: str = "auto",
        wait: bool = True,
        progress: Progress | None = None,
        segmentation_node: "slicer.vtkMRMLSegmentationNode | None" = None,
        confidence_node: "slicer.vtkMRMLScalarVolumeNode | None" = None,
        **options: Any,
    ) -> "ReviewResult | RepuxJob":
        """:meth:`segment` plus the confidence map of the same pass, as a :class:`ReviewResult`.

        The confidence becomes ``confidence_node`` (its voxels replaced) or a new scalar
        volume node (values 0..1, :func:`.review.confidence_color_node` colours). ``options``
        as in :meth:`segment` (e.g. ``tta="flips"``). Both nodes change only after the job
        succeeded and both results were read and checked.
        """
        work_files: dict[str, Path] = {}

        def prepare(work: Path) -> list[str]:
            work_files["confidence"] = work / "confidence.nrrd"
            return [f"--confidence={work_files['confidence']}"]

        def finish(labels_node_or_path, entry: ModelEntry, commit) -> ReviewResult:
            # Read the confidence first: a bad file leaves the segmentation untouched too.
            confidence = read_volume_node(work_files["confidence"])
            if not same_grid(confidence, volume_node, GRID_TOLERANCE_MM):
                raise InputError(f"{work_files['confidence']}: not on the grid of volume {volume_node.GetName()!r}")
            segmentation = commit()
            node = review.import_confidence(self.scene, work_files["confidence"], volume_node, segmentation, confidence_node)
            return ReviewResult(segmentation, node, list(entry.labels))

        return self._segment_job(volume_node, model, device, wait, progress, segmentation_node, options, prepare, finish)

    def _segment_job(self, volume_node, model, device, wait, progress, segmentation_node, options, prepare, finish, server=None):
        """A ``repux segment`` job whose extra arguments come from ``prepare(work)`` and whose
        result is ``finish(label_path, entry, commit)``; ``commit()`` imports the labels.
        With ``server`` (plain segmentation only: no extra arguments), a :class:`.remote.RemoteJob`."""
        if device not in DEVICES:
            raise InputError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
        if volume_node is None or volume_node.GetImageData() is None:
            raise InputError("input volume: none selected, or it has no voxel data")
        if segmentation_node is not None and segmentation_node.GetScene() is not self.scene:
            raise InputError(f"segmentation {segmentation_node.GetName()!r}: is not in this logic's scene")
        entry = self.catalog.get(model) if server is None else None
        work = Path(tempfile.mkdtemp(prefix="repux-segment-", dir=self.temp_dir))
        input_path, output_path = work / "input.nrrd", work / "labels.nrrd"
        try:
            write_volume_node(volume_node, input_path, compress=False)
            extra = prepare(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if server is not None:
            job = RemoteJob(
                server,
                input_path,
                output_path,
                model.name if isinstance(model, ModelEntry) else str(model),
                options,
                finish=lambda: self._import_result(output_path, volume_node, job.entry, segmentation_node),
                cleanup=lambda: shutil.rmtree(work, ignore_errors=True),
                progress=progress,
                description=f"repux segment ({volume_node.GetName()}, model {model} on {server.url})",
            )
            return job.wait() if wait else job
        args = ["segment", str(input_path), "-o", str(output_path), "--model", str(entry.path), "--device", device]
        args += ["--progress", "jsonl", *extra, *option_arguments(options)]
        job = RepuxJob(
            args,
            python=self.python,
            finish=lambda: finish(
                output_path, entry, lambda: self._import_result(output_path, volume_node, entry, segmentation_node)
            ),
            cleanup=lambda: shutil.rmtree(work, ignore_errors=True),
            progress=progress,
            description=f"repux segment ({volume_node.GetName()}, model {entry.name})",
        )
        return job.wait() if wait else job

    def resegment_roi(
        self,
        volume_node: "slicer.vtkMRMLScalarVolumeNode",
        segmentation_node: "slicer.vtkMRMLSegmentationNode",
        roi_node: "slicer.vtkMRMLMarkupsROINode",
        model: "str | os.PathLike | ModelEntry | None" = None,
        device: str = "auto",
        wait: bool = True,
        progress: Progress | None = None,
        confidence_node: "slicer.vtkMRMLScalarVolumeNode | None" = None,
        **options: Any,
    ) -> "int | RepuxJob":
        """Segment again only inside ``roi_node``'s box and write the result into the segments.

        The job runs only the sliding windows that reach the box (``repux segment --roi
        --update``); inside the box its labels equal a whole-CT run's. Only voxels whose label
        changes are written (:func:`.review.merge_region_result`): outside the box nothing
        changes, whatever the user edited. ``confidence_node``: its voxels inside the box are
        replaced by the new confidence. ``model``: default the one that made the segmentation.
        Returns the number of voxels changed (``wait=True``) or the job.
        """
        box = review.roi_box(roi_node, volume_node)
        labels = self._labels_for(segmentation_node, model)
        entry = self.catalog.get(model if model is not None else segmentation_node.GetAttribute(segmentations.MODEL_ATTRIBUTE))
        geometry = segmentations.reference_geometry(segmentation_node, volume_node)
        before = segmentations.labelmap_array(segmentation_node, labels, geometry, ignore_unknown=True)
        matrix = ijk_to_ras(volume_node)
        work_files: dict[str, Path] = {}

        def prepare(work: Path) -> list[str]:
            work_files["update"] = work / "current.nrrd"
            work_files["confidence"] = work / "confidence.nrrd"
            write_volume_node(labelmap_node_from_array(before, matrix), work_files["update"], compress=False)
            return [review.roi_argument(box), f"--update={work_files['update']}", f"--confidence={work_files['confidence']}"]

        def finish(label_path: Path, entry: ModelEntry, commit) -> int:
            result_node = read_volume_node(label_path, labelmap=True)
            confidence = read_volume_node(work_files["confidence"])
            for node, what in ((result_node, "labels"), (confidence, "confidence")):
                if not same_grid(node, volume_node, GRID_TOLERANCE_MM):
                    raise InputError(f"{what} of the region: not on the grid of volume {volume_node.GetName()!r}")
            result = voxel_array(result_node)
            segmentations.check_label_values(result, labels, str(label_path))
            changed = review.merge_region_result(segmentation_node, result, before, matrix, labels)
            if confidence_node is not None:
                review.merge_region_confidence(confidence_node, voxel_array(confidence))
            return changed

        return self._segment_job(volume_node, entry, device, wait, progress, None, options, prepare, finish)

    def rank_cases(
        self,
        cases: "list[str | os.PathLike]",
        model: "str | os.PathLike | ModelEntry",
        output: str | os.PathLike,
        device: str = "auto",
        wait: bool = True,
        progress: Progress | None = None,
        **options: Any,
    ) -> "list[Path] | RepuxJob":
        """Rank CT files or folders of them by the model's uncertainty (``repux rank``) into the
        table ``output``; the result is the case paths, most uncertain first."""
        if device not in DEVICES:
            raise InputError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
        entry = self.catalog.get(model)
        args = ["rank", *(str(Path(c).expanduser().resolve()) for c in cases), "-o", str(Path(output).resolve())]
        args += ["--model", str(entry.path), "--device", device, "--progress", "jsonl", *option_arguments(options)]
        job = RepuxJob(
            args,
            python=self.python,
            finish=lambda: review.ranked_cases(output),
            progress=progress,
            description=f"repux rank ({len(cases)} input(s), model {entry.name})",
        )
        return job.wait() if wait else job

    def load_next_ranked_case(
        self, ranking_path: str | os.PathLike, seen: "list[str | os.PathLike]"
    ) -> "slicer.vtkMRMLScalarVolumeNode | None":
        """Load the most uncertain case of a ranking not in ``seen`` as a volume node; None when all were seen."""
        path = review.next_ranked_case(ranking_path, seen)
        if path is None:
            return None
        node = read_volume_node(path)
        node.SetName(self.scene.GenerateUniqueName(node.GetName()))
        self.scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
        node.SetAttribute(review.CASE_PATH_ATTRIBUTE, str(path))
        return node

    def test_connection(self, url: str, token: str, cafile: str | None = None) -> dict[str, Any]:
        """The server's version, devices, limits and models (catalog cards); raises InputError with the reason."""
        return test_connection(ServerSettings(url, token, cafile))

    def server_model(self, server: ServerSettings, name: str) -> ModelEntry:
        """The entry of a model on ``server`` (for its card and labels), as :meth:`ModelCatalog.get` gives local ones."""
        return model_entry(server, name)

    def _import_result(self, label_path: Path, volume_node, entry: ModelEntry, segmentation_node):
        # Everything that can fail happens before the scene is touched.
        result = read_volume_node(label_path, labelmap=True)
        if not same_grid(result, volume_node, GRID_TOLERANCE_MM):
            raise InputError(
                f"{label_path}: the label map's grid {dimensions(result)} / {ijk_to_ras(result).round(4).tolist()} "
                f"differs from the input's {dimensions(volume_node)} / {ijk_to_ras(volume_node).round(4).tolist()}"
            )
        labels = voxel_array(result)
        segmentations.check_label_values(labels, entry.labels, str(label_path))
        # The volume's own matrix, so the segmentation's grid is the input's exactly.
        return self._store_segmentation(labels, ijk_to_ras(volume_node), entry, segmentation_node, volume_node)

    def _store_segmentation(self, labels: np.ndarray, grid, entry: ModelEntry, segmentation_node, reference_volume_node):
        """Fill (or create and add) the segmentation; ``grid`` is the voxel-to-RAS matrix of ``labels``."""
        new = segmentation_node is None
        node = slicer.vtkMRMLSegmentationNode() if new else segmentation_node
        segmentations.fill_segmentation(node, labels, grid, entry.labels, entry.name)
        if new:
            base = reference_volume_node.GetName() if reference_volume_node is not None else entry.name
            node.SetName(self.scene.GenerateUniqueName(f"{base} segmentation"))
            self.scene.AddNode(node)
            node.CreateDefaultDisplayNodes()
        if reference_volume_node is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
            node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        else:
            converter = slicer.vtkSegmentationConverter
            node.GetSegmentation().SetConversionParameter(
                converter.GetReferenceImageGeometryParameterName(),
                converter.SerializeImageGeometry(segmentations.oriented_image(labels, grid)),
            )
        return node

    def import_labelmap(
        self,
        path: str | os.PathLike,
        model: "str | os.PathLike | ModelEntry",
        reference_volume_node=None,
        segmentation_node=None,
    ) -> "slicer.vtkMRMLSegmentationNode":
        """Load a label map file (values of ``model``) as a segmentation, as :meth:`segment` does.

        With ``reference_volume_node`` the file must be on that volume's grid, which then
        becomes the segmentation's reference geometry; without, the file's grid does.
        """
        entry = self.catalog.get(model)
        result = read_volume_node(path, labelmap=True)
        labels = voxel_array(result)
        segmentations.check_label_values(labels, entry.labels, str(path))
        if reference_volume_node is not None and not same_grid(result, reference_volume_node, GRID_TOLERANCE_MM):
            raise InputError(f"{path}: not on the grid of volume {reference_volume_node.GetName()!r}")
        grid = ijk_to_ras(reference_volume_node if reference_volume_node is not None else result)
        return self._store_segmentation(labels, grid, entry, segmentation_node, reference_volume_node)

    def export_labelmap(
        self,
        segmentation_node: "slicer.vtkMRMLSegmentationNode",
        path: str | os.PathLike,
        reference_volume_node=None,
        model: "str | os.PathLike | ModelEntry | None" = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the segmentation as .nii.gz, .nrrd or .seg.nrrd with the model's label values.

        Values come from each segment's *name* in ``model``'s labels (default: the model that
        made the segmentation); the grid is ``reference_volume_node``'s (default: the
        segmentation's reference geometry). Refuses to overwrite unless ``overwrite``.
        """
        return segmentations.export_labelmap(
            segmentation_node, path, self._labels_for(segmentation_node, model), reference_volume_node, overwrite
        )

    def _labels_for(self, segmentation_node, model):
        if model is not None:
            return self.catalog.get(model).labels
        labels = segmentations.model_labels(segmentation_node)
        if labels is None:
            raise InputError(
                f"segmentation {segmentation_node.GetName()!r}: was not made by a RepUX model; "
                "choose the model whose label values to use"
            )
        return labels

    # -- curation and training ----------------------------------------------------------
    def add_case(
        self,
        volume_node: "slicer.vtkMRMLScalarVolumeNode | None",
        segmentation_node: "slicer.vtkMRMLSegmentationNode",
        training_set_dir: str | os.PathLike,
        model: "str | os.PathLike | ModelEntry",
    ) -> str:
        """Add the segmentation and the CT it was made on to a training set; return the case id.

        ``volume_node``: None for the segmentation's own reference volume; a volume given
        must be that one (see :func:`.segmentations.source_volume`). See :mod:`.trainingset`
        for the layout. Refuses segments whose names ``model`` does not know; never
        overwrites a case.
        """
        entry = self.catalog.get(model)
        volume_node = segmentations.source_volume(segmentation_node, volume_node)
        return trainingset.add_case(volume_node, segmentation_node, training_set_dir, entry.labels, entry.name)

    def retrain(
        self,
        training_set_dir: str | os.PathLike,
        base_model: "str | os.PathLike | ModelEntry",
        output_dir: str | os.PathLike | None = None,
        wait: bool = True,
        progress: Progress | None = None,
        **options: Any,
    ) -> "ModelEntry | RepuxJob":
        """Fine-tune ``base_model`` on a training set with ``repux train``; register the result.

        ``output_dir`` defaults to a new version folder in the user's model folder
        (``demo`` -> ``demo-v2``); a bundle written elsewhere is copied into the catalog.
        ``options`` become ``repux train`` flags (``iterations=200``, ``val_every=50``,
        ``resume=True`` to continue a cancelled run of the same version, ...).
        Returns the new :class:`.catalog.ModelEntry` (``wait=True``) or the running job.
        """
        entry = self.catalog.get(base_model)
        manifest = trainingset.read_manifest(training_set_dir)
        if manifest is None or not manifest["training"]:
            raise InputError(f"{training_set_dir}: has no cases yet ({trainingset.DATASET_JSON} missing or empty)")
        if output_dir is None:
            # The next free version; a cancelled run of it left no bundle, so the same name
            # comes back and its checkpoints (in NAME.work) are found by resume=True.
            output_dir = self.catalog.user_dir / self.catalog.next_version_name(entry.name)
            if not options.get("resume"):
                options["force"] = True  # a fresh run: discard a cancelled run's checkpoints
        output_dir = Path(output_dir).expanduser().resolve()
        args = ["train", str(Path(training_set_dir).resolve()), "-o", str(output_dir), "--model", str(entry.path)]
        args += ["--progress", "jsonl", *option_arguments(options)]
        job = RepuxJob(
            args,
            python=self.python,
            finish=lambda: self.catalog.add(output_dir),
            progress=progress,
            description=f"repux train (base model {entry.name})",
        )
        return job.wait() if wait else job

    def import_checkpoint(
        self,
        checkpoint: str | os.PathLike,
        name: str,
        arch: str,
        labels: str,
        wait: bool = True,
        **options: Any,
    ) -> "ModelEntry | RepuxJob":
        """Import a published ``.pth`` into the user's model folder with ``repux import-checkpoint``.

        ``labels``: a preset name (flare, flare21, amos) or a JSON label file; ``options``
        become flags (``spacing=(1.0, 1.0, 1.2)``, ``patch_size=96``, ``description=...``).
        """
        self.catalog.check_new_name(name)
        target = self.catalog.user_dir / name
        args = ["import-checkpoint", str(Path(checkpoint).expanduser()), "--arch", arch, "--labels", labels]
        args += ["-o", str(target), "--name", name, *option_arguments(options)]
        job = RepuxJob(
            args,
            python=self.python,
            finish=lambda: self.catalog.add(target),
            description=f"repux import-checkpoint ({Path(checkpoint).name})",
        )
        return job.wait() if wait else job

    # -- published models -----------------------------------------------------------------
    def download_model(
        self,
        name: str,
        wait: bool = True,
        progress: Progress | None = None,
        timeout: float | None = None,
        labels: str | None = None,
    ) -> "ModelEntry | RepuxJob":
        """Download the published model ``name`` into the user's model folder (``repux models pull``).

        Nothing is downloaded unless this is called (the user's click). Progress records carry
        bytes (``done``/``total``); Cancel keeps the partial download for the next attempt and
        installs nothing. ``labels``: a label preset instead of the registry's ("flare21").
        Returns the new :class:`.catalog.ModelEntry` (``wait=True``) or the job.
        """
        model = self.catalog.published(name)
        words = ["pull", model.name, *option_arguments({"timeout": timeout, "labels": labels})]
        return self._models_job(words, model.name, wait, progress, f"repux models pull {model.name}")

    def import_model_file(
        self,
        name: str,
        path: str | os.PathLike,
        wait: bool = True,
        progress: Progress | None = None,
        labels: str | None = None,
    ) -> "ModelEntry | RepuxJob":
        """Install a checkpoint of the published model ``name`` downloaded by hand (``repux models import``).

        The file gets the same checks as a download (web page, size, SHA-256, weights-only
        loading, the registry's network) and is left where it is. ``labels`` as in
        :meth:`download_model`.
        """
        model = self.catalog.published(name)
        words = ["import", model.name, str(Path(path).expanduser().resolve()), *option_arguments({"labels": labels})]
        description = f"repux models import {model.name} ({Path(path).name})"
        return self._models_job(words, model.name, wait, progress, description)

    def _models_job(
        self, words: list[str], name: str, wait: bool, progress: Progress | None, description: str
    ) -> "ModelEntry | RepuxJob":
        """``repux models WORDS`` on the catalog's folder; its result is the catalog entry ``name``."""
        args = ["models", *words, "--models-dir", str(self.catalog.user_dir), "--progress", "jsonl"]
        job = RepuxJob(
            args, python=self.python, finish=lambda: self.catalog.get(name), progress=progress, description=description
        )
        return job.wait() if wait else job

    def import_bundle(self, folder: str | os.PathLike, name: str | None = None) -> ModelEntry:
        """Copy a bundle folder into the user's model folder (see :meth:`.catalog.ModelCatalog.add`)."""
        return self.catalog.add(folder, name)
