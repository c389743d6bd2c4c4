"""Shared helpers of the inference tests (no tests here): tiny bundles, analytic volumes.

- :func:`save_tiny_bundle`: a real RepUX-Net bundle (tiny widths, random weights) on disk.
- :class:`IntensityClassifier`: a real per-voxel network whose labels are intensity bands,
  so that geometric tests can demand labels that follow the physical content.
- :func:`analytic_volume`: CT-like content defined in patient space (mm), sampled on any grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from repux.bundle import BundleMetadata, default_preprocessing, label_preset, save_bundle
from repux.imageio import Volume
from repux.network import RepUXNet

TINY_NETWORK = {"feat_size": (4, 8, 16, 32), "hidden_size": 32, "ks": 3}
#: HU of the analytic phantom's tissues: air, body, then organs 1..4 (FLARE order).
AIR, BODY = -1000.0, -100.0
ORGAN_HU = {1: 40.0, 2: 120.0, 3: 200.0, 4: 320.0}


def tiny_network(out_chans: int = 5, seed: int = 0) -> RepUXNet:
    torch.manual_seed(seed)
    return RepUXNet(in_chans=1, out_chans=out_chans, **TINY_NETWORK).eval()


def save_tiny_bundle(
    folder: Path,
    spacing: tuple[float, float, float] = (8.0, 8.0, 8.0),
    patch: tuple[int, int, int] = (32, 32, 32),
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    seed: int = 0,
    modality: str = "CT",
) -> Path:
    """A FLARE-labelled (5 outputs) tiny RepUX-Net bundle with random weights."""
    network = tiny_network(5, seed)
    config = dict(network.config)
    arch = config.pop("arch")
    metadata = BundleMetadata(
        name="tiny-test",
        architecture=arch,
        network=config,
        labels=label_preset("flare"),
        modality=modality,
        preprocessing=default_preprocessing(spacing=spacing, patch_size=patch),
        inference={"overlap": overlap, "sw_batch_size": sw_batch_size, "blend": "constant"},
    )
    return save_bundle(network, metadata, folder)


class IntensityClassifier(nn.Module):
    """Per-voxel logits -(x - centre_c)^2 * sharpness of the windowed intensity x.

    With the default window (-125..275 HU -> 0..1) the centres are the analytic phantom's
    tissues, so its labels follow the phantom's organs; a 1x1x1 operation, it needs no
    context and runs fast in any window layout. With ``organ``, only background and that
    organ compete: partial-volume voxels between body and a bright organ then cannot take
    the label of an organ of intermediate brightness.
    """

    def __init__(self, organ: int | None = None, sharpness: float = 400.0) -> None:
        super().__init__()
        hu = [BODY] + [ORGAN_HU[v] for v in sorted(ORGAN_HU)]
        centres = [min(max((h + 125.0) / 400.0, 0.0), 1.0) for h in hu]
        self.register_buffer("centres", torch.tensor(centres).view(1, -1, 1, 1, 1))
        excluded = torch.zeros(len(centres))
        if organ is not None:
            excluded[[c for c in range(1, len(centres)) if c != organ]] = -1e4
        self.register_buffer("excluded", excluded.view(1, -1, 1, 1, 1))
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.centres) ** 2) * self.sharpness + self.excluded


def oblique_direction(degrees: float, axis: tuple[float, float, float] = (1.0, 2.0, 0.5)) -> np.ndarray:
    """LPS direction matrix: a rotation by ``degrees`` about ``axis`` (Rodrigues' formula)."""
    x, y, z = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    angle = np.deg2rad(degrees)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def analytic_labels(points_ras: np.ndarray, organs: tuple[int, ...] = (1, 2, 3, 4)) -> np.ndarray:
    """Organ label (0..4) at RAS points (..., 3): ellipsoids (those in ``organs``) inside the body."""
    x, y, z = points_ras[..., 0], points_ras[..., 1], points_ras[..., 2]
    labels = np.zeros(points_ras.shape[:-1], dtype=np.uint8)
    shapes = {  # centre (mm) and semi-axes (mm)
        1: ((-35.0, 5.0, 10.0), (18.0, 22.0, 26.0)),
        2: ((35.0, 10.0, -5.0), (16.0, 16.0, 28.0)),
        3: ((5.0, -20.0, 20.0), (30.0, 18.0, 20.0)),
        4: ((0.0, 25.0, -25.0), (26.0, 14.0, 14.0)),
    }
    for value in organs:
        centre, axes = shapes[value]
        inside = sum(((c - m) / a) ** 2 for c, m, a in zip((x, y, z), centre, axes)) <= 1.0
        labels[inside] = value
    return labels


def analytic_volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    direction_lps: np.ndarray = np.eye(3),
    centre_lps: tuple[float, float, float] = (0.0, 0.0, 0.0),
    organs: tuple[int, ...] = (1, 2, 3, 4),
) -> tuple[Volume, Volume]:
    """(image int16 HU, truth uint8) of the analytic phantom on a grid centred at ``centre_lps``."""
    direction_lps = np.asarray(direction_lps, dtype=float)
    half = (np.array(shape) - 1) / 2 * np.array(spacing)
    origin = np.asarray(centre_lps) - direction_lps @ half
    geometry = Volume(np.zeros(shape, dtype=np.int16), tuple(spacing), tuple(origin), direction_lps)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    points = index @ geometry.affine[:3, :3].T + geometry.affine[:3, 3]
    truth = analytic_labels(points, organs)
    body = ((points[..., 0] / 75.0) ** 2 + (points[..., 1] / 55.0) ** 2) <= 1.0
    image = np.where(body, BODY, AIR)
    for value, hu in ORGAN_HU.items():
        image[truth == value] = hu
    return geometry.with_array(image.astype(np.int16)), geometry.with_array(truth)


def reorient_volume(volume: Volume, permutation: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Volume:
    """The same voxels (same physical centres) stored with axes permuted then flipped.

    New axis t is old axis ``permutation[t]``, reversed where ``flips[t]``.
    """
    array = np.transpose(volume.array, permutation)
    for t in range(3):
        if flips[t]:
            array = np.flip(array, t)
    affine = volume.affine_lps
    origin = affine[:3, 3].copy()
    columns = []
    for t, old in enumerate(permutation):
        column = affine[:3, old]
        if flips[t]:
            origin += column * (volume.shape[old] - 1)
            column = -column
        columns.append(column)
    linear = np.stack(columns, axis=1)
    spacing = tuple(float(volume.spacing[old]) for old in permutation)
    return Volume(np.ascontiguousarray(array), spacing, tuple(origin), linear / np.array(spacing))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def write_dicom_series(
    volume: Volume, folder: Path, series: str = "1.2.826.0.1.3680043.2.1125.1.777", description: str = "",
    prefix: str = "slice",
) -> None:
    """One CT slice per file, with the tags a series reader needs for the geometry (and a
    series description when given)."""
    import SimpleITK as sitk

    from repux.imageio import to_sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = to_sitk(volume)
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.776",
            "0020|000e": series,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.8f}" for v in (*direction[0::3], *direction[1::3])),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0008|0018": f"{series}.{k + 1}",
        }
        if description:
            tags["0008|103e"] = description
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(plane)

