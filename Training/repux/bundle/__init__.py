"""Model bundles: a folder with ``model.safetensors`` (weights) and ``model.json`` (everything else).

- labels, presets: :class:`Label`, :class:`Code`, :func:`label_preset`, :func:`labels_from_json`.
- metadata: :class:`BundleMetadata` (the ``model.json`` format), :data:`FORMAT_VERSION`.
- store: :class:`Bundle`, :func:`load_bundle`, :func:`save_bundle`.
- checkpoint: :func:`read_checkpoint`, :func:`import_checkpoint` (published ``.pth`` files).

Labels and metadata need no torch, so the Slicer GUI process can read a bundle's labels
without loading it; the torch-based parts are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from repux.bundle.errors import BundleError
from repux.bundle.labels import (
    ANATOMIC_REGION_CONTEXT,
    DICOM_MASTER_CONTEXT,
    GENERAL_ANATOMY_CONTEXT,
    Code,
    Label,
    labels_from_json,
)
from repux.bundle.metadata import FORMAT_VERSION, BundleMetadata, default_inference, default_preprocessing
from repux.bundle.presets import LABEL_PRESETS, PRESET_SPACING, label_preset

_TORCH_PARTS = {
    "Bundle": "store",
    "load_bundle": "store",
    "save_bundle": "store",
    "resolve_bundle_path": "store",
    "MODEL_JSON": "store",
    "WEIGHTS_FILE": "store",
    "SHIPPED_MODELS_DIR": "store",
    "read_checkpoint": "checkpoint",
    "import_checkpoint": "checkpoint",
}

__all__ = [
    "ANATOMIC_REGION_CONTEXT",
    "DICOM_MASTER_CONTEXT",
    "FORMAT_VERSION",
    "GENERAL_ANATOMY_CONTEXT",
    "LABEL_PRESETS",
    "PRESET_SPACING",
    "BundleError",
    "BundleMetadata",
    "Code",
    "Label",
    "default_inference",
    "default_preprocessing",
    "label_preset",
    "labels_from_json",
    *_TORCH_PARTS,
]


def __getattr__(name: str) -> Any:
    if name in _TORCH_PARTS:
        return getattr(importlib.import_module(f"repux.bundle.{_TORCH_PARTS[name]}"), name)
    raise AttributeError(f"module 'repux.bundle' has no attribute {name!r}")
