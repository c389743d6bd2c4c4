"""Per-label overlap and surface distance of a label map against a reference (MONAI metrics).

Dice = 2|P & T| / (|P| + |T|). HD95 = the 95th percentile Hausdorff distance between the
surfaces of P and T in mm (MONAI's, with the voxel spacing). A label absent from both maps
scores NaN for both (nothing to compare); a label absent from only one has Dice 0 and an
undefined (NaN) HD95.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

from repux.errors import InputError
from repux.imageio import Volume


@dataclass(frozen=True)
class LabelScore:
    """Scores of one label: ``dice`` (0..1), ``hd95_mm``, voxel counts in prediction and truth."""

    label: int
    name: str
    dice: float
    hd95_mm: float
    pred_voxels: int
    truth_voxels: int

    def as_row(self, case: str = "") -> dict:
        return {"case": case, **asdict(self)}


def check_label_map(volume: Volume, source: str) -> np.ndarray:
    """The voxels of a label map as int64; ``InputError`` for non-integer or negative values."""
    array = volume.array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise InputError(f"{source}: holds non-integer values; expected a label map (integers 0, 1, 2, ...)")
    elif not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{source}: voxel type {array.dtype}; expected a label map (integers 0, 1, 2, ...)")
    labels = array.astype(np.int64)
    if labels.min() < 0:
        raise InputError(f"{source}: holds negative values (minimum {labels.min()}); expected labels 0, 1, 2, ...")
    return labels


def check_same_geometry(pred: Volume, truth: Volume, pred_source: str, truth_source: str) -> None:
    """``InputError`` naming both files and every difference when their voxel grids differ."""
    if pred.same_geometry(truth):
        return
    differences = []
    if pred.shape != truth.shape:
        differences.append(f"shape {pred.shape} vs {truth.shape}")
    for what in ("spacing", "origin", "direction"):
        a, b = np.asarray(getattr(pred, what), dtype=float), np.asarray(getattr(truth, what), dtype=float)
        if a.shape != b.shape or not np.allclose(a, b, atol=1e-4):
            differences.append(f"{what} {np.round(a, 4).tolist()} vs {np.round(b, 4).tolist()}")
    raise InputError(
        f"{pred_source} and {truth_source}: different voxel grids ({'; '.join(differences)}); "
        "expected a prediction on the reference's exact grid"
    )


def _hd95(pred: torch.Tensor, truth: torch.Tensor, spacing: tuple[float, float, float]) -> float:
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks, handled by the caller
        value = compute_hausdorff_distance(
            pred[None, None], truth[None, None], include_background=True, percentile=95, spacing=list(spacing)
        )
    return float(value.item())


def score_labels(
    pred: Volume,
    truth: Volume,
    labels: list[tuple[int, str]],
    pred_source: str = "PRED",
    truth_source: str = "GT",
    hausdorff: bool = True,
) -> list[LabelScore]:
    """Dice and HD95 (mm) per ``(value, name)`` in ``labels`` (background excluded by the caller).

    ``hausdorff=False`` skips HD95 (NaN), the slow part on large volumes.

    Raises:
        InputError: different voxel grids, non-integer maps, or label values in either map
            that ``labels`` does not name.
    """
    from monai.metrics import compute_dice

    check_same_geometry(pred, truth, pred_source, truth_source)
    pred_labels = check_label_map(pred, pred_source)
    truth_labels = check_label_map(truth, truth_source)
    named = {value for value, _ in labels} | {0}
    for source, array in ((pred_source, pred_labels), (truth_source, truth_labels)):
        unknown = sorted(int(v) for v in np.unique(array) if int(v) not in named)
        if unknown:
            raise InputError(f"{source}: label values {unknown} are not among the labels {sorted(named)}")
    scores = []
    for value, name in labels:
        p = torch.from_numpy(pred_labels == value)
        t = torch.from_numpy(truth_labels == value)
        p_count, t_count = int(p.sum()), int(t.sum())
        if p_count == 0 and t_count == 0:
            dice = hd95 = math.nan
        else:
            dice = float(compute_dice(p[None, None].float(), t[None, None].float(), ignore_empty=False).item())
            hd95 = _hd95(p, t, pred.spacing) if hausdorff and p_count and t_count else math.nan
        scores.append(LabelScore(int(value), name, dice, hd95, p_count, t_count))
    return scores


def mean_dice(scores: list[LabelScore]) -> float:
    """Mean Dice over the labels present in either map (NaN when none is)."""
    values = [s.dice for s in scores if not math.isnan(s.dice)]
    return float(np.mean(values)) if values else math.nan
