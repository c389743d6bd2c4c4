"""Preprocessing: from an input volume to the network's input on the model grid.

Steps, in order (each recorded in :class:`Preprocessed` so that :mod:`repux.infer.export`
can undo them): check the image; reorient its axes towards the bundle's orientation
(exact transpose/flip); resample (trilinear, full affine) onto the axis-aligned model grid
at the bundle's spacing; crop to the body's bounding box (a HU threshold plus a margin);
scale the intensity window; pad to the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repux.errors import InputError
from repux.imageio import Volume
from repux.infer.grid import AxisReorientation, Grid, model_grid, resample

#: Every network input side must be a multiple of this (the encoder halves four times).
SIDE_MULTIPLE = 16
#: Voxels above this many HU belong to the body (air is about -1000, fat about -100).
BODY_THRESHOLD_HU = -500.0
#: Margin kept around the body's bounding box, in mm: context for organs at the skin.
BODY_MARGIN_MM = 10.0


@dataclass(frozen=True)
class PreprocessingConfig:
    """A bundle's preprocessing (``model.json`` "preprocessing") plus the body crop.

    Attributes:
        spacing: model voxel size in mm along RAS x, y, z.
        orientation: axis code of the model grid, e.g. "RAS".
        a_min, a_max, b_min, b_max, clip: intensity window a_min..a_max (HU) -> b_min..b_max.
        patch_size: sliding-window size in voxels (multiples of 16).
        body_threshold: HU above which a voxel counts as body for the crop.
        body_margin_mm: margin around the body's bounding box.
    """

    spacing: tuple[float, float, float]
    orientation: str
    a_min: float
    a_max: float
    b_min: float
    b_max: float
    clip: bool
    patch_size: tuple[int, int, int]
    body_threshold: float = BODY_THRESHOLD_HU
    body_margin_mm: float = BODY_MARGIN_MM

    @classmethod
    def from_metadata(cls, preprocessing: dict[str, Any]) -> "PreprocessingConfig":
        intensity = preprocessing["intensity"]
        return cls(
            spacing=tuple(float(s) for s in preprocessing["spacing"]),  # type: ignore[arg-type]
            orientation=str(preprocessing.get("orientation", "RAS")),
            a_min=float(intensity["a_min"]),
            a_max=float(intensity["a_max"]),
            b_min=float(intensity["b_min"]),
            b_max=float(intensity["b_max"]),
            clip=bool(intensity["clip"]),
            patch_size=tuple(int(p) for p in preprocessing["patch_size"]),  # type: ignore[arg-type]
        )

    def window(self, hu: torch.Tensor) -> torch.Tensor:
        """Scale a_min..a_max to b_min..b_max (linear), clipped to b_min..b_max if ``clip``."""
        scaled = (hu - self.a_min) / (self.a_max - self.a_min) * (self.b_max - self.b_min) + self.b_min
        if self.clip:
            scaled = scaled.clamp(min(self.b_min, self.b_max), max(self.b_min, self.b_max))
        return scaled


@dataclass
class Preprocessed:
    """The network input and everything needed to map predictions back.

    Attributes:
        image: network input (1, 1, X, Y, Z) float32: the padded crop of the model grid.
        reorientation: the exact axis reorientation of the input volume.
        input_grid: the reoriented input's grid (same voxel centres as the input).
        model_grid: the whole model grid (aligned, at the bundle's spacing).
        crop_start, crop_shape: the body box inside ``model_grid`` (voxels).
        pad_before: voxels of padding before the crop along each axis (after = the rest).
    """

    image: torch.Tensor
    reorientation: AxisReorientation
    input_grid: Grid
    model_grid: Grid
    crop_start: tuple[int, int, int]
    crop_shape: tuple[int, int, int]
    pad_before: tuple[int, int, int]

    @property
    def crop_grid(self) -> Grid:
        """Grid of the unpadded crop (where predictions are kept)."""
        return self.model_grid.sub_grid(self.crop_start, self.crop_shape)

    def unpad(self, values: torch.Tensor) -> torch.Tensor:
        """The crop part of a padded (C, X, Y, Z) tensor."""
        box = tuple(slice(b, b + n) for b, n in zip(self.pad_before, self.crop_shape))
        return values[(slice(None), *box)]


def check_image(volume: Volume, source: str = "image") -> None:
    """Refuse images that cannot be segmented: non-finite or constant voxel values.

    Raises:
        InputError: naming ``source``, the offending values and what was expected.
    """
    array = volume.array
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{source}: voxel type {array.dtype} is not a real scalar; expected CT intensities (HU)")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(
                f"{source}: {bad} of {array.size} voxels are NaN or infinite; expected finite intensities (HU)"
            )
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(f"{source}: every voxel has the value {low}; expected an image with contrast (a CT in HU)")


def _body_box(hu: torch.Tensor, threshold: float, margin: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Start and shape of the bounding box of voxels above ``threshold``, grown by ``margin``.

    The whole grid when nothing is above the threshold (an image that is not a CT in HU):
    a crop must never remove what the model should see.
    """
    body = hu > threshold
    shape = tuple(body.shape)
    if not bool(body.any()):
        return (0, 0, 0), shape
    starts, stops = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = torch.nonzero(body.any(dim=others)).flatten()
        start = max(int(present[0]) - int(margin[axis]), 0)
        stop = min(int(present[-1]) + 1 + int(margin[axis]), shape[axis])
        starts.append(start)
        stops.append(stop)
    return tuple(starts), tuple(b - a for a, b in zip(starts, stops))


def padded_shape(shape: tuple[int, ...], patch_size: tuple[int, ...]) -> tuple[int, ...]:
    """Each side raised to a multiple of 16 and to at least the patch size."""
    return tuple(max(p, -(-s // SIDE_MULTIPLE) * SIDE_MULTIPLE) for s, p in zip(shape, patch_size))


def plan_grids(volume: Volume, config: PreprocessingConfig) -> tuple[AxisReorientation, Grid, Grid]:
    """The exact reorientation of ``volume``, its reoriented grid and the whole model grid (no voxels touched)."""
    source = Grid(volume.shape, volume.affine)
    reorientation = AxisReorientation.towards(source, config.orientation)
    input_grid = reorientation.grid(source)
    return reorientation, input_grid, model_grid(input_grid, config.spacing, config.orientation)


def reoriented_float32(array: np.ndarray, reorientation: AxisReorientation) -> torch.Tensor:
    """``array`` (I, J, K) reoriented, as a new contiguous float32 tensor on the CPU.

    Converted by torch where it can read the array in place: its copy runs on every core,
    2.5x faster than numpy's on a 512 x 512 x 200 CT with swapped axes (2 cores).
    """
    readable = array.flags.c_contiguous and array.flags.writeable and array.dtype.isnative
    if readable and array.dtype in (np.int16, np.uint8, np.int8, np.int32, np.float32, np.float64):
        tensor = reorientation.apply(torch.from_numpy(array))
        # A float32 array with nothing to reorient would come back as itself: never alias the caller's data.
        return tensor.to(torch.float32, memory_format=torch.contiguous_format, copy=tensor.dtype == torch.float32)
    return torch.from_numpy(np.ascontiguousarray(reorientation.apply(array), dtype=np.float32))


def preprocess(volume: Volume, config: PreprocessingConfig, device: torch.device | str = "cpu") -> Preprocessed:
    """Turn ``volume`` (HU) into the network input; resampling runs on ``device``.

    The returned image lives on the CPU (sliding-window inference moves windows).
    """
    reorientation, input_grid, grid = plan_grids(volume, config)
    hu = reoriented_float32(volume.array, reorientation).to(device)[None]
    air = float(hu.min())  # outside the input's field of view is air: the image's own minimum
    hu = resample(hu, input_grid, grid, mode="linear", fill=air)[0]
    margin = np.ceil(config.body_margin_mm / grid.spacing).astype(int)
    crop_start, crop_shape = _body_box(hu, config.body_threshold, margin)
    box = tuple(slice(a, a + n) for a, n in zip(crop_start, crop_shape))
    image = config.window(hu[box])
    target = padded_shape(crop_shape, config.patch_size)
    pad_before = tuple((t - n) // 2 for t, n in zip(target, crop_shape))
    padded = torch.full(target, float(config.window(torch.tensor(air))), dtype=torch.float32)
    padded[tuple(slice(b, b + n) for b, n in zip(pad_before, crop_shape))] = image.float().cpu()
    return Preprocessed(
        image=padded[None, None],
        reorientation=reorientation,
        input_grid=input_grid,
        model_grid=grid,
        crop_start=crop_start,  # type: ignore[arg-type]
        crop_shape=crop_shape,  # type: ignore[arg-type]
        pad_before=pad_before,  # type: ignore[arg-type]
    )
