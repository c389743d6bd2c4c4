"""Inference: a bundle's network applied to a CT, labels on the CT's exact voxel grid.

Stages, one module each (nnU-Net-like): :mod:`.preprocess` (reorient, resample to the
model spacing, crop to the body, intensity window, pad), :mod:`.predict` (sliding windows,
softmax, out-of-memory fallbacks), :mod:`.export` (probabilities back to the input grid,
argmax). :mod:`.grid` holds the geometry, :mod:`.writers` the output files,
:mod:`.metrics` Dice and HD95, :mod:`.overlay` the demo's PNG. :class:`Segmenter` chains
the stages.
"""

from repux.infer.engine import DEVICE_CHOICES, Prediction, Segmenter, check_modality, resolve_device
from repux.infer.predict import ExecutionPlan, SlidingWindowConfig, WindowPredictor
from repux.infer.preprocess import PreprocessingConfig, check_image, preprocess

__all__ = [
    "DEVICE_CHOICES",
    "ExecutionPlan",
    "Prediction",
    "PreprocessingConfig",
    "Segmenter",
    "SlidingWindowConfig",
    "WindowPredictor",
    "check_image",
    "check_modality",
    "preprocess",
    "resolve_device",
]
