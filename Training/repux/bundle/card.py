"""The model card: what a user is shown about a bundle before choosing it (no torch needed).

One function, used by the Slicer module's catalog and by ``repux serve``'s ``/v1/models``,
so a model looks the same wherever it is listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from repux.bundle.metadata import BundleMetadata


def model_card(name: str, path: str | Path, source: str, metadata: BundleMetadata) -> dict[str, Any]:
    """Labels (background left out), spacing (mm), patch size (voxels), HU window, provenance and
    Dice, and ``usage_warning`` (None, or e.g. that a demo model is not for real scans)."""
    provenance = dict(metadata.provenance)
    preprocessing = metadata.preprocessing
    return {
        "name": name,
        "model_name": metadata.name,
        "source": source,
        "path": str(path),
        "description": metadata.description,
        "usage_warning": metadata.usage_warning,
        "architecture": metadata.architecture,
        "labels": [
            {"value": label.value, "name": label.name, "color": list(label.color)}
            for label in metadata.labels
            if label.value != 0
        ],
        "spacing_mm": list(preprocessing["spacing"]),
        "patch_size": list(preprocessing["patch_size"]),
        "intensity_window_hu": [preprocessing["intensity"]["a_min"], preprocessing["intensity"]["a_max"]],
        "validation_dice": provenance.get("validation_dice", {}),
        "provenance": provenance,
    }
