"""Reviewing a result by the model's own uncertainty (torch-free: numpy and scipy only).

The inference export gives two review maps per voxel (:mod:`repux.infer.export`), stored
as bytes, quantity = value / 255:

- *confidence*: the probability of the chosen label;
- *entropy*: the softmax entropy divided by log(C), 0 (certain) .. 1 (all labels equal).

A voxel is *low-confidence* when its confidence is below a threshold
(:data:`LOW_CONFIDENCE`, settable). From these maps and the label map:

- :func:`organ_review`: per organ, volume (mL), connected pieces (26-connected) and the
  volume outside the largest one, mean confidence, low-confidence volume;
- :func:`uncertain_regions`: the connected low-confidence regions, largest first, each with
  a voxel to centre the views on and the labels it touches;
- :func:`uncertainty_score`: one figure per case to rank cases for curation (mean entropy
  inside the predicted organs plus the share of low-confidence organ voxels).

The Slicer module imports this module too; it must stay free of torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from repux.bundle.labels import Label
from repux.options import LOW_CONFIDENCE

#: Largest value of a stored review map (a byte): quantity = value / 255.
REVIEW_SCALE = 255
#: Columns of the review table, in order.
REVIEW_COLUMNS = (
    "case", "label", "name", "volume_ml", "components", "outside_largest_ml", "mean_confidence", "low_confidence_ml",
)
#: 26-connectivity: voxels touching by a face, an edge or a corner are one piece.
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def as_fraction(review_map: np.ndarray) -> np.ndarray:
    """A review map as float32 in [0, 1]: stored bytes are divided by 255, floats kept."""
    if review_map.dtype == np.uint8:
        return review_map.astype(np.float32) / REVIEW_SCALE
    return np.asarray(review_map, dtype=np.float32)


def low_confidence_mask(confidence: np.ndarray, threshold: float = LOW_CONFIDENCE) -> np.ndarray:
    """Voxels whose confidence (bytes or [0, 1] floats) is below ``threshold`` (0..1)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"low-confidence threshold {threshold}: expected a number in (0, 1]")
    if confidence.dtype == np.uint8:
        # Compare bytes with bytes: no float copy of the whole map.
        return confidence < np.ceil(threshold * REVIEW_SCALE - 1e-9)
    return confidence < threshold


def organ_review(
    labels: np.ndarray,
    confidence: np.ndarray,
    spacing: Sequence[float],
    label_list: Sequence[Label],
    threshold: float = LOW_CONFIDENCE,
    case: str = "",
) -> list[dict[str, Any]]:
    """One row per foreground label of ``label_list`` (columns :data:`REVIEW_COLUMNS`).

    Args:
        labels: (I, J, K) label values; confidence: the same shape (bytes or [0, 1] floats).
        spacing: voxel size (mm) along I, J, K.
        threshold: confidence below which a voxel counts as low-confidence.

    Volumes are voxel counts x voxel volume; an absent organ has 0 pieces and an empty mean.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    low = low_confidence_mask(confidence, threshold)
    boxes = ndimage.find_objects(labels)
    rows = []
    for label in sorted(label_list, key=lambda item: item.value):
        if label.value == 0:
            continue
        box = boxes[label.value - 1] if label.value - 1 < len(boxes) else None
        row: dict[str, Any] = {"case": case, "label": label.value, "name": label.name}
        if box is None:
            row.update(volume_ml=0.0, components=0, outside_largest_ml=0.0, mean_confidence="", low_confidence_ml=0.0)
            rows.append(row)
            continue
        organ = labels[box] == label.value
        pieces, count = ndimage.label(organ, structure=CONNECTIVITY)
        sizes = np.bincount(pieces.ravel())[1:]
        voxels = int(sizes.sum())
        row.update(
            volume_ml=round(voxels * voxel_ml, 4),
            components=int(count),
            outside_largest_ml=round(int(voxels - sizes.max()) * voxel_ml, 4),
            mean_confidence=round(float(as_fraction(confidence[box][organ]).mean()), 4),
            low_confidence_ml=round(int(np.count_nonzero(low[box] & organ)) * voxel_ml, 4),
        )
        rows.append(row)
    return rows


@dataclass(frozen=True)
class UncertainRegion:
    """A connected low-confidence region.

    Attributes:
        voxels: its size in voxels; volume_ml: in mL.
        centre: (3,) voxel index (I, J, K) inside the region nearest to its centre of mass.
        labels: the label values the model chose in the region, most voxels first.
        start, stop: its bounding index box (stop exclusive).
    """

    voxels: int
    volume_ml: float
    centre: tuple[int, int, int]
    labels: tuple[int, ...]
    start: tuple[int, int, int]
    stop: tuple[int, int, int]


def uncertain_regions(
    confidence: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    threshold: float = LOW_CONFIDENCE,
    min_voxels: int = 1,
) -> list[UncertainRegion]:
    """The 26-connected low-confidence regions of at least ``min_voxels``, largest first
    (equal sizes: in index order, so the order is always the same)."""
    regions, count = ndimage.label(low_confidence_mask(confidence, threshold), structure=CONNECTIVITY)
    if count == 0:
        return []
    sizes = np.bincount(regions.ravel())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    found = []
    for number, box in enumerate(ndimage.find_objects(regions), start=1):
        if box is None or sizes[number] < min_voxels:
            continue
        inside = regions[box] == number
        points = np.argwhere(inside)
        nearest = points[np.argmin(((points - points.mean(axis=0)) ** 2).sum(axis=1))]
        centre = tuple(int(n + s.start) for n, s in zip(nearest, box))
        values, counts = np.unique(labels[box][inside], return_counts=True)
        chosen = tuple(int(v) for v, _ in sorted(zip(values, counts), key=lambda pair: (-pair[1], pair[0])))
        found.append(
            UncertainRegion(
                voxels=int(sizes[number]),
                volume_ml=round(int(sizes[number]) * voxel_ml, 4),
                centre=centre,  # type: ignore[arg-type]
                labels=chosen,
                start=tuple(s.start for s in box),  # type: ignore[arg-type]
                stop=tuple(s.stop for s in box),  # type: ignore[arg-type]
            )
        )
    return sorted(found, key=lambda region: (-region.voxels, region.start))


def uncertainty_score(
    labels: np.ndarray, confidence: np.ndarray, entropy: np.ndarray, threshold: float = LOW_CONFIDENCE
) -> dict[str, float | int]:
    """How unsure the model is about a case's organs (higher: curate sooner).

    ``mean_entropy``: the mean normalised entropy over the voxels given a foreground label;
    ``low_confidence_share``: the share of those voxels that are low-confidence;
    ``score``: their sum. A case where no organ was found scores 1 + 1 (the model found
    nothing it expected: the most worth a look).
    """
    organs = labels != 0
    count = int(np.count_nonzero(organs))
    if count == 0:
        return {"score": 2.0, "mean_entropy": 1.0, "low_confidence_share": 1.0, "organ_voxels": 0}
    mean_entropy = float(as_fraction(entropy[organs]).mean())
    share = float(np.count_nonzero(low_confidence_mask(confidence, threshold)[organs])) / count
    return {
        "score": round(mean_entropy + share, 6),
        "mean_entropy": round(mean_entropy, 6),
        "low_confidence_share": round(share, 6),
        "organ_voxels": count,
    }
