"""Export: probabilities on the model grid back to labels on the input's exact voxel grid.

The probabilities of the body crop are resampled (trilinear, full affine) at the centres of
the input's voxels, then argmax. Anywhere outside the crop the model saw nothing: it is
background (probability 1 for label 0). Finally the exact axis reorientation is undone, so
the labels have the input's shape, spacing, origin and direction.

The review maps are computed in the same pass, chunk by chunk, from the resampled
probabilities (no second C-channel copy is kept): per voxel the *confidence* (probability
of the chosen label) and the *entropy* of the softmax divided by log(C) (0: certain, 1: all
labels equally likely). Both are stored as uint8, value = round(255 x quantity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from repux.infer.grid import resample_chunks
from repux.infer.preprocess import Preprocessed
from repux.progress import Progress
from repux.review import REVIEW_SCALE


def label_dtype(channels: int) -> np.dtype:
    """The smallest unsigned type holding labels 0..channels-1."""
    return np.dtype(np.uint8) if channels <= 256 else np.dtype(np.uint16)


@dataclass
class Exported:
    """What :func:`to_input_grid` returns, every array indexed like the input volume.

    Attributes:
        labels: (I, J, K) label values.
        probabilities: (C, I, J, K) float32, or None when not asked for.
        confidence: (I, J, K) uint8, probability of the chosen label x 255; None when not asked for.
        entropy: (I, J, K) uint8, softmax entropy / log(C) x 255; None when not asked for.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    confidence: np.ndarray | None = None
    entropy: np.ndarray | None = None


def review_bytes(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and normalised entropy of probabilities (C, ...) as uint8 0..255 (shape ...)."""
    top = chunk.max(dim=0).values.clamp(0.0, 1.0)
    # Interpolation and the background fill may leave tiny negative values: clamped in the log.
    entropy = -(chunk * torch.log(chunk.clamp_min(1e-12))).sum(dim=0) / math.log(max(chunk.shape[0], 2))
    scale = float(REVIEW_SCALE)
    return (
        torch.round(top * scale).to(torch.uint8),
        torch.round(entropy.clamp(0.0, 1.0) * scale).to(torch.uint8),
    )


def to_input_grid(
    probabilities: torch.Tensor,
    preprocessed: Preprocessed,
    keep_probabilities: bool = False,
    progress: Progress | None = None,
    review: bool = False,
    only_rows: range | None = None,
) -> Exported:
    """Labels (and what else is asked for) on the input grid.

    Args:
        probabilities: softmax output on the padded crop, (C, X, Y, Z), any device.
        preprocessed: what :func:`repux.infer.preprocess.preprocess` recorded.
        keep_probabilities: also return the resampled probabilities (C times the input's memory).
        progress: gets a stage "export" counting the input grid's rows (first axis) done.
        review: also return the confidence and entropy maps (a byte per voxel each).
        only_rows: compute only these rows of the *reoriented* input grid (first axis); the
            other rows stay 0. Rows computed are bit-identical to a whole export's.
    """
    crop = preprocessed.unpad(probabilities).float()
    target = preprocessed.input_grid
    channels = crop.shape[0]
    labels = np.zeros(target.shape, dtype=label_dtype(channels))
    kept = np.zeros((channels, *target.shape), dtype=np.float32) if keep_probabilities else None
    confidence = np.zeros(target.shape, dtype=np.uint8) if review else None
    entropy = np.zeros(target.shape, dtype=np.uint8) if review else None
    if progress is not None:
        progress.stage("export", total=target.shape[0])
    chunks = resample_chunks(crop, preprocessed.crop_grid, target, mode="linear", fill=0.0, only_rows=only_rows)
    for rows, chunk in chunks:
        # Outside the crop every channel reads 0: the missing mass is background.
        chunk[0] += 1.0 - chunk.sum(dim=0)
        labels[rows] = chunk.argmax(dim=0).cpu().numpy().astype(labels.dtype)
        if kept is not None:
            kept[:, rows] = chunk.cpu().numpy()
        if confidence is not None and entropy is not None:
            top, spread = review_bytes(chunk)
            confidence[rows] = top.cpu().numpy()
            entropy[rows] = spread.cpu().numpy()
        if progress is not None:
            progress.update(rows.stop)

    def back(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else np.ascontiguousarray(preprocessed.reorientation.invert(array))

    return Exported(back(labels), back(kept), back(confidence), back(entropy))  # type: ignore[arg-type]
