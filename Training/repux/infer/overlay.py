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
#: Pixels above the panels for their names, and per legend row.
CAPTION, LEGEND_ROW = 14, 18


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


def _view_centre(ct: Volume, labels: Volume, centre_ras: np.ndarray | None) -> tuple[Grid, np.ndarray]:
    """The display grid of ``ct`` and the display voxel the slices go through: ``centre_ras``,
    default the labels' centroid (the volume's centre when there are none)."""
    extent = np.array(ct.shape) * np.array(ct.spacing)
    spacing = max(float(min(ct.spacing)), float(extent.max()) / DISPLAY_SIDE)
    display = _display_grid(ct, spacing)
    if centre_ras is None:
        found = np.argwhere(labels.array > 0)
        index = found.mean(axis=0) if found.size else (np.array(ct.shape) - 1) / 2
        centre_ras = (labels.affine @ np.append(index, 1.0))[:3]
    centre = (np.linalg.inv(display.affine) @ np.append(centre_ras, 1.0))[:3]
    return display, np.clip(np.round(centre), 0, np.array(display.shape) - 1)


def _canvas(panels: list[tuple[str, Image.Image]], legend_rows: int) -> tuple[Image.Image, int]:
    """A black canvas with the named panels side by side and room for ``legend_rows`` rows
    of legend below; returns it and the y of the legend's first row."""
    width = max(sum(image.width for _, image in panels) + 10 * (len(panels) + 1), 10 + 4 * 160)
    canvas = Image.new("RGB", (width, CAPTION + PANEL_HEIGHT + 10 + LEGEND_ROW * legend_rows + 10), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    left = 10
    for name, image in panels:
        draw.text((left, 1), name, fill=(255, 255, 255))
        canvas.paste(image, (left, CAPTION))
        left += image.width + 10
    return canvas, CAPTION + PANEL_HEIGHT + 10


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
    display, centre = _view_centre(ct, labels, centre_ras)
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

    foreground = [label for label in sorted(label_list, key=lambda l: l.value) if label.value > 0]
    canvas, top = _canvas(panels, max(1, -(-len(foreground) // 4)))
    draw = ImageDraw.Draw(canvas)
    for index, label in enumerate(foreground):
        x = 10 + (index % 4) * 160
        y = top + (index // 4) * LEGEND_ROW
        draw.rectangle((x, y, x + 12, y + 12), fill=tuple(label.color))
        draw.text((x + 18, y), label.name, fill=(255, 255, 255))
    with atomic_path(path, overwrite=overwrite) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def confidence_colours(confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB (..., 3) 0..255 and opacity (...) 0..1 of confidence values 0..1: opaque red at 0,
    yellow at 0.5, transparent green at 1 (the Slicer module's "RepUX confidence" table)."""
    value = np.clip(confidence, 0.0, 1.0)
    red = np.where(value < 0.5, 1.0, 2 * (1 - value))
    green = np.where(value < 0.5, 2 * value, 1.0)
    rgb = np.stack([red, green, np.zeros_like(value)], axis=-1) * 255.0
    return rgb, 1.0 - value


def _outlines(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label image whose right or lower neighbour has another label (0 excluded)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    return edge & (labels > 0)


def render_review(
    ct: Volume,
    labels: Volume,
    confidence: Volume,
    label_list: list[Label],
    path: str | os.PathLike,
    centre_ras: np.ndarray | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PNG of the three orthogonal slices of ``ct`` with the confidence overlay
    (:func:`confidence_colours`; ``confidence`` 0..1, or bytes 0..255) and the organs' outlines
    in their colours, plus a legend of both. Slices as :func:`render_overlay` places them."""
    display, centre = _view_centre(ct, labels, centre_ras)
    scale = 255.0 if confidence.array.dtype == np.uint8 else 1.0
    confidence = confidence.with_array(np.asarray(confidence.array, dtype=np.float32) / scale)
    ct_views = _planes(ct, display, centre, "linear", float(ct.array.min()))
    confidence_views = _planes(confidence, display, centre, "linear", 1.0)
    label_views = [v.astype(np.int64) for v in _planes(labels, display, centre, "nearest", 0.0)]
    palette = np.zeros((max(int(max(v.max() for v in label_views)), max(l.value for l in label_list)) + 1, 3))
    for label in label_list:
        palette[label.value] = label.color

    low, high = SOFT_TISSUE_WINDOW
    panels = []
    for name, ct_view, confidence_view, label_view in zip(("axial", "coronal", "sagittal"), ct_views, confidence_views, label_views):
        grey = np.repeat(np.clip((ct_view - low) / (high - low), 0, 1)[..., None] * 255.0, 3, axis=-1)
        colour, alpha = confidence_colours(confidence_view)
        rgb = grey * (1 - alpha[..., None]) + colour * alpha[..., None]
        image = Image.fromarray(rgb.astype(np.uint8))
        factor = PANEL_HEIGHT / image.height
        size = (max(1, round(image.width * factor)), PANEL_HEIGHT)
        image = image.resize(size, Image.Resampling.BILINEAR)
        # Outlines drawn at the panel's resolution, so they stay one pixel wide.
        big_labels = np.asarray(Image.fromarray(label_view.astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
        pixels = np.asarray(image).copy()
        edge = _outlines(big_labels.astype(np.int64))
        pixels[edge] = palette[big_labels[edge]]
        panels.append((name, Image.fromarray(pixels)))

    bar = 200
    foreground = [label for label in sorted(label_list, key=lambda l: l.value) if label.value > 0]
    canvas, top = _canvas(panels, 1 + max(1, -(-len(foreground) // 4)))
    draw = ImageDraw.Draw(canvas)
    draw.text((10, top), "confidence 0", fill=(255, 255, 255))
    ramp, ramp_alpha = confidence_colours(np.linspace(0.0, 1.0, bar))
    for x in range(bar):
        shade = tuple(int(c * a) for c, a in zip(ramp[x], [ramp_alpha[x]] * 3))
        draw.line((100 + x, top, 100 + x, top + 12), fill=shade)
    draw.text((100 + bar + 6, top), "1 (clear)", fill=(255, 255, 255))
    for index, label in enumerate(foreground):
        x = 10 + (index % 4) * 160
        y = top + LEGEND_ROW * (1 + index // 4)
        draw.rectangle((x, y, x + 12, y + 12), outline=tuple(label.color), width=2)
        draw.text((x + 18, y), f"{label.name} (outline)", fill=(255, 255, 255))
    with atomic_path(path, overwrite=overwrite) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
