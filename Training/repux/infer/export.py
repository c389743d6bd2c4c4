"""Export: probabilities on the model grid back to labels on the input's exact voxel grid.

The probabilities of the body crop are resampled (trilinear, full affine) at the centres of
the input's voxels, then argmax. Anywhere outside the crop the model saw nothing: it is
background (probability 1 for label 0). Finally the exact axis reorientation is undone, so
the labels have the input's shape, spacing, origin and direction.

Only the input voxels whose value is not known beforehand are resampled (:func:`export_box`):

- for labels alone, the box of input voxels that read (trilinearly) a model voxel where an
  organ comes within :data:`TIE_MARGIN` of the background. Trilinear values are weighted
  means of their neighbours, and a mean of probability vectors that all favour the
  background favours it too, so everywhere else the label is background (as resampling
  would find, up to argmax ties: the margin covers the float rounding of interpolation);
- for the probabilities or the review maps, the box of input voxels that the crop reaches;
  everywhere else they are those of pure background: probabilities (1, 0, ...),
  confidence 255, entropy 0, exactly what resampling gives there.

The box is resampled in chunks on the device that holds the probabilities (the GPU that
stitched them, when it did), and labels are cast to bytes there.

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

from repux.infer.grid import Box, resample_chunks, whole_box
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


def review_bytes(chunk: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and normalised entropy of probabilities (C, ...) as uint8 0..255 (shape ...);
    ``top``: the largest probability per voxel (:func:`argmax_labels`)."""
    # Interpolation and the background fill may leave tiny negative values: clamped in the log.
    entropy = -(chunk * torch.log(chunk.clamp_min(1e-12))).sum(dim=0) / math.log(max(chunk.shape[0], 2))
    scale = float(REVIEW_SCALE)
    return (
        torch.round(top.clamp(0.0, 1.0) * scale).to(torch.uint8),
        torch.round(entropy.clamp(0.0, 1.0) * scale).to(torch.uint8),
    )


#: A model voxel counts as a possible organ voxel when an organ's probability comes within this
#: of the background's: interpolation in float32 and the background's fill move
#: probabilities by about 1e-6, so anywhere else the background wins exactly as it would
#: after resampling.
TIE_MARGIN = 1e-4
#: Model voxels added around the possible organs: the trilinear neighbours (1) plus a voxel
#: for ``grid_sample``'s float32 positions on oblique grids.
SUPPORT_VOXELS = 2
#: Voxels per channel that one step of :func:`organ_candidates` works on.
SLAB_VOXELS = 1 << 21


def organ_candidates(crop: torch.Tensor) -> torch.Tensor:
    """(X, Y, Z) bool: model voxels of ``crop`` (C, X, Y, Z) where a label other than
    background comes within :data:`TIE_MARGIN` of it."""
    found = torch.empty(crop.shape[1:], dtype=torch.bool, device=crop.device)
    step = max(1, SLAB_VOXELS // max(1, crop[0, 0].numel()))
    for start in range(0, crop.shape[1], step):
        slab = crop[:, start : start + step]
        found[start : start + step] = slab[1:].amax(dim=0) >= slab[0] - TIE_MARGIN
    return found


def export_box(preprocessed: Preprocessed, low: np.ndarray, high: np.ndarray) -> Box:
    """The input-grid voxels (reoriented; a range per axis) that read model voxels of the
    crop between ``low`` and ``high`` (crop indices, inclusive, may reach outside it)."""
    target = preprocessed.input_grid
    to_target = np.linalg.inv(target.affine) @ preprocessed.crop_grid.affine  # crop index -> input index
    corners = np.array([[i, j, k, 1.0] for i in (low[0], high[0]) for j in (low[1], high[1]) for k in (low[2], high[2])])
    reached = (to_target @ corners.T)[:3]
    first = np.floor(reached.min(axis=1)).astype(int) - 1
    last = np.ceil(reached.max(axis=1)).astype(int) + 1
    return tuple(range(max(a, 0), max(min(b + 1, n), max(a, 0))) for a, b, n in zip(first, last, target.shape))  # type: ignore[return-value]


def resampled_box(crop: torch.Tensor, preprocessed: Preprocessed, labels_only: bool) -> Box:
    """The input voxels to resample: those that may hold an organ (labels only), or all that the crop reaches."""
    if labels_only:
        candidates = organ_candidates(crop)
        if not bool(candidates.any()):
            return (range(0), range(0), range(0))
        present = [torch.nonzero(candidates.any(dim=tuple(a for a in range(3) if a != axis))).flatten() for axis in range(3)]
        low = np.array([int(p[0]) for p in present]) - SUPPORT_VOXELS
        high = np.array([int(p[-1]) for p in present]) + SUPPORT_VOXELS
    else:
        # Within half a voxel outside the crop an input voxel takes the edge's values.
        low = np.full(3, -SUPPORT_VOXELS)
        high = np.array(crop.shape[1:]) - 1 + SUPPORT_VOXELS
    return export_box(preprocessed, low, high)


def argmax_labels(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the largest of the C values (C, ...), the first one on ties (as ``argmax``), as
    uint8 (int32 beyond 256 labels), and that largest value; one channel at a time, several
    times faster than ``argmax`` over the first axis."""
    best = chunk[0].clone()
    labels = torch.zeros(chunk.shape[1:], dtype=torch.uint8 if chunk.shape[0] <= 256 else torch.int32, device=chunk.device)
    for channel in range(1, chunk.shape[0]):
        higher = chunk[channel] > best
        labels.masked_fill_(higher, channel)
        best = torch.where(higher, chunk[channel], best)
    return labels, best


def to_input_grid(
    probabilities: torch.Tensor,
    preprocessed: Preprocessed,
    keep_probabilities: bool = False,
    progress: Progress | None = None,
    review: bool = False,
    only_rows: range | None = None,
    everywhere: bool = False,
) -> Exported:
    """Labels (and what else is asked for) on the input grid.

    Args:
        probabilities: softmax output on the padded crop, (C, X, Y, Z), any device.
        preprocessed: what :func:`repux.infer.preprocess.preprocess` recorded.
        keep_probabilities: also return the resampled probabilities (C times the input's memory).
        progress: gets a stage "export" counting the rows (first axis) of the resampled box done.
        review: also return the confidence and entropy maps (a byte per voxel each).
        only_rows: compute only these rows of the *reoriented* input grid (first axis); the
            other rows keep pure background's values. Rows computed are bit-identical to a
            whole export's.
        everywhere: resample every input voxel (the export before :func:`export_box`; for comparison).
    """
    crop = preprocessed.unpad(probabilities).float()
    target = preprocessed.input_grid
    channels = crop.shape[0]
    labels = np.zeros(target.shape, dtype=label_dtype(channels))
    kept = None
    if keep_probabilities:
        kept = np.zeros((channels, *target.shape), dtype=np.float32)
        kept[0] = 1.0  # pure background where the box does not reach
    confidence = np.full(target.shape, REVIEW_SCALE, dtype=np.uint8) if review else None
    entropy = np.zeros(target.shape, dtype=np.uint8) if review else None
    box = whole_box(target.shape) if everywhere else resampled_box(crop, preprocessed, not (keep_probabilities or review))
    if only_rows is not None:
        box = (range(max(box[0].start, only_rows.start), min(box[0].stop, only_rows.stop)), box[1], box[2])
    if progress is not None:
        progress.stage("export", total=max(len(box[0]), 1))
    planes = (slice(box[1].start, box[1].stop), slice(box[2].start, box[2].stop))
    for rows, chunk in resample_chunks(crop, preprocessed.crop_grid, target, mode="linear", fill=0.0, box=box):
        place = (rows, *planes)
        # Outside the crop every channel reads 0: the missing mass is background.
        chunk[0] += 1.0 - chunk.sum(dim=0)
        chosen, top = argmax_labels(chunk)
        labels[place] = chosen.cpu().numpy()
        if kept is not None:
            kept[(slice(None), *place)] = chunk.cpu().numpy()
        if confidence is not None and entropy is not None:
            sure, spread = review_bytes(chunk, top)
            confidence[place] = sure.cpu().numpy()
            entropy[place] = spread.cpu().numpy()
        if progress is not None:
            progress.update(rows.stop - box[0].start)
    if progress is not None:
        progress.update(max(len(box[0]), 1))

    def back(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else np.ascontiguousarray(preprocessed.reorientation.invert(array))

    return Exported(back(labels), back(kept), back(confidence), back(entropy))  # type: ignore[arg-type]
