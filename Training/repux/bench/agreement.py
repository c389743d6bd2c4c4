"""Agreement between two segmentations of the same CT: per-label Dice, largest probability change."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["AGREEMENT_BAR", "label_dice", "max_probability_difference"]

#: Lowest per-label Dice with the reference's labels for a path to count as the same result.
AGREEMENT_BAR = 0.995

#: Voxels compared per step when reading probability files (bounds memory).
CHUNK_VOXELS = 1 << 22


def label_dice(reference: np.ndarray, other: np.ndarray, labels: int) -> list[float]:
    """Dice of each label 1..``labels``-1 between two label maps of the same shape.

    A label absent from both maps agrees perfectly (Dice 1.0): the two paths made the same
    decision, which is what agreement measures.
    """
    if reference.shape != other.shape:
        raise ValueError(f"label maps of shapes {reference.shape} and {other.shape}: expected the same shape")
    pairs = reference.astype(np.int64).ravel() * labels + other.astype(np.int64).ravel()
    confusion = np.bincount(pairs, minlength=labels * labels).reshape(labels, labels)
    dice = []
    for value in range(1, labels):
        both = 2 * confusion[value, value]
        total = confusion[value, :].sum() + confusion[:, value].sum()
        dice.append(1.0 if total == 0 else float(both / total))
    return dice


def max_probability_difference(reference: Path | str, other: Path | str) -> float:
    """Largest absolute difference between two saved probability arrays (``.npy``, same shape); NaN if any is NaN."""
    a = np.load(reference, mmap_mode="r")
    b = np.load(other, mmap_mode="r")
    if a.shape != b.shape:
        raise ValueError(f"probabilities of shapes {a.shape} and {b.shape}: expected the same shape")
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    largest = 0.0
    for start in range(0, flat_a.size, CHUNK_VOXELS):
        stop = start + CHUNK_VOXELS
        difference = float(np.abs(flat_a[start:stop].astype(np.float64) - flat_b[start:stop]).max())
        if math.isnan(difference):
            return math.nan
        largest = max(largest, difference)
    return largest
