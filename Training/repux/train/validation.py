"""Validation during training: sliding-window segmentation of held-out cases and Dice per label.

Cases are segmented on the model grid (as the paper's validation does), with windows of
the patch size, overlap 0.25 and constant blending, and scored inside the case's own box
(the padding is left out). Dice of a label absent from both prediction and truth is
undefined (NaN) and left out of means.

Two means are reported: the mean over the organs (background excluded), which selects the
best model because background Dice is close to 1 whatever the model does, and the mean
with background included, the number the paper reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from repux.train.dataset import VolumeCache

#: Overlap of the validation windows (the paper's).
VALIDATION_OVERLAP = 0.25


def dice_per_label(prediction: torch.Tensor, truth: torch.Tensor, n_labels: int) -> np.ndarray:
    """Dice 2|P & T| / (|P| + |T|) of each label 0..n_labels-1; NaN where both are empty.

    Args:
        prediction, truth: integer label maps of the same shape.
    """
    pairs = truth.reshape(-1).to(torch.int64) * n_labels + prediction.reshape(-1).to(torch.int64)
    confusion = torch.bincount(pairs, minlength=n_labels * n_labels).reshape(n_labels, n_labels).double()
    overlap = confusion.diagonal()
    sizes = confusion.sum(dim=0) + confusion.sum(dim=1)
    dice = torch.where(sizes > 0, 2 * overlap / sizes.clamp(min=1), torch.full_like(sizes, math.nan))
    return dice.cpu().numpy()


@dataclass
class ValidationResult:
    """Dice of every validation case and label.

    Attributes:
        case_ids: validated cases.
        dice: (cases, labels) Dice, label 0 the background; NaN where a label is in neither map.
        label_names: name of each label (column).
    """

    case_ids: list[str]
    dice: np.ndarray
    label_names: list[str]

    @property
    def per_label(self) -> np.ndarray:
        """Mean over cases of each label's Dice (NaN for a label absent from every case)."""
        return _nanmean(self.dice, axis=0)

    @property
    def mean(self) -> float:
        """Mean Dice over the organs, background excluded: what selects the best model."""
        return float(_nanmean(self.per_label[1:]))

    @property
    def mean_with_background(self) -> float:
        """Mean Dice over every label including background, as the paper reports it."""
        return float(_nanmean(self.per_label))

    def by_name(self, include_background: bool = False) -> dict[str, float]:
        """Label name -> mean Dice, labels with a defined Dice only."""
        start = 0 if include_background else 1
        return {
            name: float(value)
            for name, value in zip(self.label_names[start:], self.per_label[start:])
            if math.isfinite(value)
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": _finite_or_none(self.mean),
            "mean_with_background": _finite_or_none(self.mean_with_background),
            "per_label": self.by_name(),
        }


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    count = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def validate(
    network: nn.Module,
    cases: Sequence[Any],
    cache: VolumeCache,
    label_names: Sequence[str],
    patch_size: Sequence[int],
    device: torch.device,
    sw_batch_size: int = 4,
    autocast: bool = False,
    stitch_device: Callable[[tuple[int, ...]], torch.device] | None = None,
) -> ValidationResult:
    """Segment ``cases`` with ``network`` by sliding windows and score them.

    The network is put in eval mode and back in train mode afterwards.

    Args:
        stitch_device: where to blend the windows of an image of a given shape (default
            ``device``); the CPU keeps big volumes off a small GPU.
    """
    n_labels = len(label_names)
    rows = []
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            for case in cases:
                prepared = cache.get(case)
                image = prepared.image[None]
                output_device = stitch_device(tuple(image.shape[2:])) if stitch_device else device

                def predict(windows: torch.Tensor) -> torch.Tensor:
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                        return network(windows).float()

                logits = sliding_window_inference(
                    image,
                    roi_size=tuple(int(p) for p in patch_size),
                    sw_batch_size=sw_batch_size,
                    predictor=predict,
                    overlap=VALIDATION_OVERLAP,
                    mode="constant",
                    sw_device=device,
                    device=output_device,
                )
                prediction = logits[0].argmax(dim=0)[prepared.box]
                truth = prepared.label[0][prepared.box].to(prediction.device)
                rows.append(dice_per_label(prediction, truth, n_labels))
    finally:
        network.train(was_training)
    dice = np.stack(rows) if rows else np.zeros((0, n_labels))
    return ValidationResult([case.case_id for case in cases], dice, list(label_names))
