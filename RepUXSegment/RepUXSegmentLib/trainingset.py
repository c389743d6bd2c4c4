"""The curated training set: corrected cases saved for ``repux train``.

Layout (Medical Segmentation Decathlon style, what ``repux.data.cases.load_cases`` reads)::

    TRAINING_SET/
      dataset.json        {"name", "description", "modality": {"0": "CT"},
                           "labels": {"0": "background", "1": "spleen", ...},
                           "numTraining": N,
                           "training": [{"image": "./imagesTr/ID.nii.gz",
                                         "label": "./labelsTr/ID.nii.gz"}, ...]}
      imagesTr/ID.nii.gz  the CT as loaded in Slicer (voxels and geometry unchanged)
      labelsTr/ID.nii.gz  the segmentation on the CT's grid, values from the model's labels

Files are written first, each atomically; the manifest last, atomically. An interruption
in between leaves files that no manifest entry names (harmless, never overwritten: the next
case gets a new id) and a manifest that is valid.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from repux.atomic import write_json
from repux.bundle.labels import Label
from repux.errors import InputError

from . import segmentations
from .volumes import ijk_to_ras, labelmap_node_from_array, write_volume_node

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
CASE_ENDING = ".nii.gz"


def labels_table(labels: Sequence[Label]) -> dict[str, str]:
    """``{"0": "background", "1": "spleen", ...}`` as dataset.json stores the label names."""
    return {str(label.value): label.name for label in sorted(labels, key=lambda item: item.value)}


def read_manifest(training_set_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed ``dataset.json`` of a training set, or None when there is none yet.

    Raises:
        InputError: the file exists but is not a dataset manifest.
    """
    path = Path(training_set_dir) / DATASET_JSON
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: cannot be read as JSON ({error}); expected a dataset manifest") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("training"), list):
        raise InputError(f"{path}: expected a JSON object with a 'training' list of cases")
    return manifest


def _new_manifest(labels: Sequence[Label], model_name: str) -> dict[str, Any]:
    return {
        "name": "RepUXSegment curated cases",
        "description": f"CT cases corrected in 3D Slicer; labels of model {model_name}",
        "modality": {"0": "CT"},
        "labels": labels_table(labels),
        "numTraining": 0,
        "training": [],
    }


def _case_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "case"
    return stem[:60]


def _used_ids(training_set_dir: Path, manifest: dict[str, Any]) -> set[str]:
    used = set()
    for entry in manifest["training"]:
        for key in ("image", "label"):
            if isinstance(entry, dict) and isinstance(entry.get(key), str):
                used.add(Path(entry[key]).name.split(".")[0])
    for folder in (IMAGES_DIR, LABELS_DIR):
        if (training_set_dir / folder).is_dir():
            used.update(path.name.split(".")[0] for path in (training_set_dir / folder).iterdir())
    return used


def add_case(
    volume_node: "slicer.vtkMRMLVolumeNode",  # noqa: F821
    segmentation_node: "slicer.vtkMRMLSegmentationNode",  # noqa: F821
    training_set_dir: str | os.PathLike,
    labels: Sequence[Label],
    model_name: str,
    case_id: str | None = None,
) -> str:
    """Save the volume and its segmentation as a new case; return the case id.

    The label map is on the volume's grid with the model's value for each segment name.

    Raises:
        InputError: a segment name the model does not know; a manifest whose labels differ
            from the model's; a broken manifest.
        FileExistsError: ``case_id`` given and already used.
    """
    training_set_dir = Path(training_set_dir)
    manifest = read_manifest(training_set_dir) or _new_manifest(labels, model_name)
    expected = labels_table(labels)
    if manifest.get("labels") != expected:
        raise InputError(
            f"{training_set_dir / DATASET_JSON}: its labels {manifest.get('labels')} differ from model "
            f"{model_name}'s {expected}; use a training-set folder made for this model"
        )
    geometry = segmentations.reference_geometry(segmentation_node, volume_node)
    label_array = segmentations.labelmap_array(segmentation_node, labels, geometry)

    used = _used_ids(training_set_dir, manifest)
    if case_id is not None:
        if case_id in used:
            raise FileExistsError(f"{training_set_dir}: case {case_id!r} already exists; cases are never overwritten")
    else:
        stem = _case_stem(volume_node.GetName())
        case_id, number = stem, 2
        while case_id in used:
            case_id, number = f"{stem}_{number}", number + 1

    image_rel = f"{IMAGES_DIR}/{case_id}{CASE_ENDING}"
    label_rel = f"{LABELS_DIR}/{case_id}{CASE_ENDING}"
    write_volume_node(volume_node, training_set_dir / image_rel)
    labelmap = labelmap_node_from_array(label_array, ijk_to_ras(volume_node), case_id)
    write_volume_node(labelmap, training_set_dir / label_rel)

    manifest["training"].append({"image": f"./{image_rel}", "label": f"./{label_rel}"})
    manifest["numTraining"] = len(manifest["training"])
    write_json(manifest, training_set_dir / DATASET_JSON, overwrite=True)
    return case_id
