"""A PNG picture of a segmentation: axial, coronal and sagittal slices with coloured labels.

The CT and the labels are resampled onto an isotropic RAS display grid (so oblique and
anisotropic volumes look right), shown in a soft-tissue window (W 400, L 40), in 3D
Slicer's view orientations: patient right on the image's left, anterior at the top of the
axial view and on the left of the sagittal view, superior at the top.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from repux.atomic import atomic_path
from repux.bundle import Label
from repux.imageio import Volume
from repux.infer.grid import AxisReorientation, Grid, model_grid, resample

SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # HU: width 400, level 40
LABEL_OPACITY = 0.5
#: Longest side of the display grid in voxels (bounds memory and picture size).
DISPLAY_SIDE = 256
PANEL_HEIGHT = 256


def _display_grid(volume: Volume, spacing: float) -> Grid:
    """The isotropic RAS grid at ``spacing`` mm covering ``volume``."""
    source = Grid(volume.shape, volume.affine)
    return model_grid(AxisReorientation.towards(source, "RAS").grid(source), (spacing, spacing, spacing), "RAS")


def _planes(volume: Volume, display: Grid, centre: np.ndarray, mode: str, fill: float) -> list[np.ndarray]:
    """Axial, coronal and sagittal planes of ``volume`` through display voxel ``centre``.

    Only the three planes are resampled (not the whole display grid). Each comes in the
    view's orientation: rows top to bottom, columns left to right as Slicer shows them.
    """
    source = Grid(volume.shape, volume.affine)
    values = torch.from_numpy(np.asarray(volume.array, dtype=np.float32))[None]
    x, y, z = (int(c) for c in centre)
    nx, ny, nz = display.shape
    axial = resample(values, source, display.sub_grid((0, 0, z), (nx, ny, 1)), mode, fill)[0, :, :, 0]
    coronal = resample(values, source, display.sub_grid((0, y, 0), (nx, 1, nz)), mode, fill)[0, :, 0, :]
    sagittal = resample(values, source, display.sub_grid((x, 0, 0), (1, ny, nz)), mode, fill)[0, 0, :, :]
    # Axial: anterior on top, patient right on the left. Coronal: superior on top, right on
    # the left. Sagittal: superior on top, anterior on the left.
    return [plane.numpy().T[::-1, ::-1] for plane in (axial, coronal, sagittal)]


def _colour(ct: np.ndarray, labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    low, high = SOFT_TISSUE_WINDOW
    grey = np.clip((ct - low) / (high - low), 0, 1)[..., None] * 255.0
    rgb = np.repeat(grey, 3, axis=-1)
    mask = labels > 0
    rgb[mask] = (1 - LABEL_OPACITY) * rgb[mask] + LABEL_OPACITY * palette[labels[mask]]
    return rgb.astype(np.uint8)


def render_overlay(
    ct: Volume,
    labels: Volume,
    label_list: list[Label],
    path: str | os.PathLike,
    centre_ras: np.ndarray | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PNG with three orthogonal slices of ``ct`` (HU) and ``labels`` in the labels' colours.

    Args:
        centre_ras: the point (RAS mm) the slices go through; default: the labels' centroid
            (the volume's centre when there are none).
    """
    extent = np.array(ct.shape) * np.array(ct.spacing)
    spacing = max(float(min(ct.spacing)), float(extent.max()) / DISPLAY_SIDE)
    display = _display_grid(ct, spacing)
    if centre_ras is None:
        found = np.argwhere(labels.array > 0)
        index = found.mean(axis=0) if found.size else (np.array(ct.shape) - 1) / 2
        centre_ras = (labels.affine @ np.append(index, 1.0))[:3]
    centre = (np.linalg.inv(display.affine) @ np.append(centre_ras, 1.0))[:3]
    centre = np.clip(np.round(centre), 0, np.array(display.shape) - 1)
    ct_views = _planes(ct, display, centre, "linear", float(ct.array.min()))
    label_views = [v.astype(np.int64) for v in _planes(labels, display, centre, "nearest", 0.0)]
    top = max(int(max(v.max() for v in label_views)), max(label.value for label in label_list))
    palette = np.zeros((top + 1, 3))
    for label in label_list:
        palette[label.value] = label.color

    panels = []
    for name, ct_view, label_view in zip(("axial", "coronal", "sagittal"), ct_views, label_views):
        image = Image.fromarray(_colour(ct_view, label_view, palette))
        scale = PANEL_HEIGHT / image.height
        image = image.resize((max(1, round(image.width * scale)), PANEL_HEIGHT), Image.Resampling.NEAREST)
        panels.append((name, image))

    caption, legend_row = 14, 18
    foreground = [label for label in sorted(label_list, key=lambda l: l.value) if label.value > 0]
    width = max(sum(image.width for _, image in panels) + 10 * (len(panels) + 1), 10 + 4 * 160)
    height = caption + PANEL_HEIGHT + 10 + legend_row * max(1, -(-len(foreground) // 4)) + 10
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    left = 10
    for name, image in panels:
        draw.text((left, 1), name, fill=(255, 255, 255))
        canvas.paste(image, (left, caption))
        left += image.width + 10
    for index, label in enumerate(foreground):
        x = 10 + (index % 4) * 160
        y = caption + PANEL_HEIGHT + 10 + (index // 4) * legend_row
        draw.rectangle((x, y, x + 12, y + 12), fill=tuple(label.color))
        draw.text((x + 18, y), label.name, fill=(255, 255, 255))
    with atomic_path(path, overwrite=overwrite) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
