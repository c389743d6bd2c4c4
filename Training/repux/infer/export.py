"""Export: probabilities on the model grid back to labels on the input's exact voxel grid.

The probabilities of the body crop are resampled (trilinear, full affine) at the centres of
the input's voxels, then argmax. Anywhere outside the crop the model saw nothing: it is
background (probability 1 for label 0). Finally the exact axis reorientation is undone, so
the labels have the input's shape, spacing, origin and direction.
"""

from __future__ import annotations

import numpy as np
import torch

from repux.infer.grid import resample_chunks
from repux.infer.preprocess import Preprocessed
from repux.progress import Progress


def label_dtype(channels: int) -> np.dtype:
    """The smallest unsigned type holding labels 0..channels-1."""
    return np.dtype(np.uint8) if channels <= 256 else np.dtype(np.uint16)


def to_input_grid(
    probabilities: torch.Tensor,
    preprocessed: Preprocessed,
    keep_probabilities: bool = False,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (I, J, K) and optionally probabilities (C, I, J, K) float32 on the input grid.

    Args:
        probabilities: softmax output on the padded crop, (C, X, Y, Z), any device.
        preprocessed: what :func:`repux.infer.preprocess.preprocess` recorded.
        keep_probabilities: also return the resampled probabilities (C times the input's memory).
        progress: gets a stage "export" counting the input grid's rows (first axis) done.

    Both results are indexed like the original input volume (reorientation undone).
    """
    crop = preprocessed.unpad(probabilities).float()
    target = preprocessed.input_grid
    channels = crop.shape[0]
    labels = np.empty(target.shape, dtype=label_dtype(channels))
    kept = np.empty((channels, *target.shape), dtype=np.float32) if keep_probabilities else None
    if progress is not None:
        progress.stage("export", total=target.shape[0])
    for rows, chunk in resample_chunks(crop, preprocessed.crop_grid, target, mode="linear", fill=0.0):
        # Outside the crop every channel reads 0: the missing mass is background.
        chunk[0] += 1.0 - chunk.sum(dim=0)
        labels[rows] = chunk.argmax(dim=0).cpu().numpy().astype(labels.dtype)
        if kept is not None:
            kept[:, rows] = chunk.cpu().numpy()
        if progress is not None:
            progress.update(rows.stop)
    labels = np.ascontiguousarray(preprocessed.reorientation.invert(labels))
    if kept is not None:
        kept = np.ascontiguousarray(preprocessed.reorientation.invert(kept))
    return labels, kept

