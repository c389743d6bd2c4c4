"""Inference: a bundle's network applied to a CT, labels on the CT's exact voxel grid.

Stages, one module each (nnU-Net-like): :mod:`.preprocess` (reorient, resample to the
model spacing, crop to the body, intensity window, pad), :mod:`.predict` (sliding windows,
softmax, out-of-memory fallbacks; :mod:`.guided`: only the windows near the organs),
:mod:`.export` (probabilities back to the input grid, argmax). :mod:`.grid` holds the geometry, :mod:`.writers` the output files,
:mod:`.metrics` Dice and HD95, :mod:`.overlay` the demo's PNG, :mod:`.scan_check` the
warnings about scans unlike the training data, :mod:`.memory` the memory a case needs.
:class:`Segmenter` chains the stages.

The names below are imported on first use, so that the torch-free modules (writers,
metrics, memory) can be imported without torch: the command line checks its outputs with
them before it loads torch. The preprocessing function is ``repux.infer.preprocess.preprocess``.
"""

from __future__ import annotations

import importlib
from typing import Any

_PARTS = {
    "DEVICE_CHOICES": "engine",
    "Prediction": "engine",
    "Segmenter": "engine",
    "check_modality": "engine",
    "resolve_device": "engine",
    "ExecutionPlan": "predict",
    "SlidingWindowConfig": "predict",
    "WindowPredictor": "predict",
    "PreprocessingConfig": "preprocess",
    "check_image": "preprocess",
}

__all__ = sorted(_PARTS)


def __getattr__(name: str) -> Any:
    if name in _PARTS:
        return getattr(importlib.import_module(f"repux.infer.{_PARTS[name]}"), name)
    raise AttributeError(f"module 'repux.infer' has no attribute {name!r}")
