"""Voxel grids in patient space and resampling between them with the full affine.

A :class:`Grid` is a shape plus the RAS voxel-to-mm affine (MONAI's and nibabel's
convention). Every geometric step of inference is expressed with grids:

- :class:`AxisReorientation`: an exact transpose/flip of the voxel axes that brings a
  volume's axes closest to a target orientation ("RAS"); no interpolation, so permuted or
  flipped inputs give bit-identical arrays.
- :func:`model_grid`: the axis-aligned grid at the model's spacing that covers a volume.
- :func:`resample_chunks` / :func:`resample`: values of one grid sampled at the voxel
  centres of another, through the full 4x4 affine (oblique directions included), with
  ``torch.nn.functional.grid_sample`` on any device, chunk by chunk to bound memory. When
  the two grids differ only by a whole-voxel shift the values are copied, not interpolated;
  when their axes are parallel (no obliquity: most CTs, once reoriented) trilinear
  interpolation runs as three 1-D interpolations, one axis after the other, about ten
  times faster than ``grid_sample`` and equal to it up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

#: RAS direction of each orientation letter (the model's axis points towards the letter).
_LETTER_DIRECTIONS = {
    "R": (0, 1.0),
    "L": (0, -1.0),
    "A": (1, 1.0),
    "P": (1, -1.0),
    "S": (2, 1.0),
    "I": (2, -1.0),
}

#: Points per resampling chunk: bounds the memory of the sampling grid and of its output.
CHUNK_POINTS = 1 << 21


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (I, J, K) and ``affine`` (4x4, voxel index -> RAS mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each axis in mm, shape (3,)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def sub_grid(self, start: tuple[int, int, int], shape: tuple[int, int, int]) -> "Grid":
        """The grid of the box starting at voxel ``start`` (may be negative) with ``shape``."""
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ np.asarray(start, dtype=float) + self.affine[:3, 3]
        return Grid(tuple(int(s) for s in shape), affine)


def orientation_matrix(code: str) -> np.ndarray:
    """3x3 signed permutation whose column d is the RAS unit direction of axis d for ``code``.

    ``"RAS"`` gives the identity; ``"LPS"`` gives diag(-1, -1, 1).
    """
    matrix = np.zeros((3, 3))
    for axis, letter in enumerate(code.upper()):
        world, sign = _LETTER_DIRECTIONS[letter]
        matrix[world, axis] = sign
    return matrix


@dataclass(frozen=True)
class AxisReorientation:
    """Transpose and flip of the last three array axes; exact and invertible.

    Output axis ``t`` is input axis ``permutation[t]``, reversed where ``flips[t]``.
    """

    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    source_shape: tuple[int, int, int]

    @classmethod
    def towards(cls, grid: Grid, code: str = "RAS") -> "AxisReorientation":
        """The reorientation that makes ``grid``'s axes closest to the orientation ``code``.

        Each target axis takes the voxel axis with the largest cosine to it (one-to-one,
        solved as an assignment so that 45-degree obliques still give a permutation).
        """
        directions = grid.affine[:3, :3] / grid.spacing
        target = orientation_matrix(code)
        cosines = target.T @ directions  # [target axis, voxel axis]
        rows, columns = linear_sum_assignment(-np.abs(cosines))
        permutation = tuple(int(c) for _, c in sorted(zip(rows, columns)))
        flips = tuple(bool(cosines[t, permutation[t]] < 0) for t in range(3))
        return cls(permutation, flips, grid.shape)  # type: ignore[arg-type]

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flips)

    @property
    def target_shape(self) -> tuple[int, int, int]:
        return tuple(self.source_shape[p] for p in self.permutation)  # type: ignore[return-value]

    def index_matrix(self) -> np.ndarray:
        """4x4 matrix taking a reoriented voxel index to the original voxel index."""
        matrix = np.zeros((4, 4))
        matrix[3, 3] = 1.0
        for t, p in enumerate(self.permutation):
            if self.flips[t]:
                matrix[p, t] = -1.0
                matrix[p, 3] = self.source_shape[p] - 1
            else:
                matrix[p, t] = 1.0
        return matrix

    def grid(self, grid: Grid) -> Grid:
        """The reoriented grid (same voxel centres, reordered axes)."""
        return Grid(self.target_shape, grid.affine @ self.index_matrix())

    def apply(self, array: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Reorient the last three axes of ``array`` (leading axes, e.g. channels, are kept)."""
        lead = array.ndim - 3
        order = list(range(lead)) + [lead + p for p in self.permutation]
        out = array.permute(order) if isinstance(array, torch.Tensor) else np.transpose(array, order)
        return _flip(out, [lead + t for t in range(3) if self.flips[t]])

    def invert(self, array: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Undo :meth:`apply` on the last three axes of ``array``."""
        lead = array.ndim - 3
        out = _flip(array, [lead + t for t in range(3) if self.flips[t]])
        inverse = np.argsort(self.permutation)
        order = list(range(lead)) + [lead + int(i) for i in inverse]
        return out.permute(order) if isinstance(out, torch.Tensor) else np.transpose(out, order)


def _flip(array: np.ndarray | torch.Tensor, axes: list[int]) -> np.ndarray | torch.Tensor:
    if not axes:
        return array
    if isinstance(array, torch.Tensor):
        return torch.flip(array, axes)
    return np.flip(array, axes)


def model_grid(source: Grid, spacing: tuple[float, float, float], code: str = "RAS") -> Grid:
    """The grid at ``spacing`` (mm, along RAS x, y, z), axes along ``code``, covering ``source``.

    ``source`` should already be reoriented towards ``code``. When it has the model's
    spacing and directions, the model grid is ``source`` itself (no resampling at all);
    otherwise it is the smallest aligned grid whose voxel centres span all of ``source``'s
    (for oblique sources: their bounding box), starting at its first corner.
    """
    target = orientation_matrix(code)
    spacing_per_axis = np.array([spacing[int(np.argmax(np.abs(target[:, d])))] for d in range(3)], dtype=float)
    linear = target * spacing_per_axis
    if np.allclose(source.affine[:3, :3], linear, atol=1e-5 * spacing_per_axis.max()):
        return Grid(source.shape, source.affine.copy())
    last = [n - 1 for n in source.shape]
    corners = np.array([[i, j, k, 1.0] for i in (0, last[0]) for j in (0, last[1]) for k in (0, last[2])])
    # Corner positions in mm along the model's axes (signed), then their bounding box.
    along = (target.T @ (source.affine @ corners.T)[:3]).T
    low, high = along.min(axis=0), along.max(axis=0)
    # The tolerance keeps an extent that is a whole number of voxels from gaining a voxel.
    shape = tuple(int(np.ceil((h - l) / s - 1e-3)) + 1 for l, h, s in zip(low, high, spacing_per_axis))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = target @ low
    return Grid(shape, affine)  # type: ignore[arg-type]


def _integer_shift(matrix: np.ndarray) -> np.ndarray | None:
    """The whole-voxel shift if ``matrix`` (target index -> source index) is a pure translation."""
    shift = matrix[:3, 3]
    if np.allclose(matrix[:3, :3], np.eye(3), atol=1e-6) and np.allclose(shift, np.round(shift), atol=1e-4):
        return np.round(shift).astype(int)
    return None


#: A box of voxel indices: a range per axis.
Box = tuple[range, range, range]


def whole_box(shape: tuple[int, ...]) -> Box:
    """Every voxel of a grid of ``shape``."""
    return tuple(range(n) for n in shape)  # type: ignore[return-value]


def _copy_shifted(source: torch.Tensor, shift: np.ndarray, part: Box, fill: float) -> torch.Tensor:
    """Target voxels ``part`` of ``source[c, t + shift]``, ``fill`` outside ``source``."""
    channels = source.shape[0]
    out = torch.full((channels, *(len(r) for r in part)), fill, dtype=source.dtype, device=source.device)
    target_ranges, source_ranges = [], []
    for axis, wanted in enumerate(part):
        low = max(wanted.start, -shift[axis])
        high = min(wanted.stop, source.shape[axis + 1] - shift[axis])
        if high <= low:
            return out
        target_ranges.append(slice(low - wanted.start, high - wanted.start))
        source_ranges.append(slice(low + shift[axis], high + shift[axis]))
    out[(slice(None), *target_ranges)] = source[(slice(None), *source_ranges)]
    return out


def resample_chunks(
    values: torch.Tensor,
    source: Grid,
    target: Grid,
    mode: str = "linear",
    fill: float = 0.0,
    chunk_points: int = CHUNK_POINTS,
    box: Box | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Sample ``values`` (C, I, J, K) on ``source`` at the voxel centres of ``target``.

    Yields ``(rows, chunk)`` pairs: ``chunk`` (C, len(rows), J', K') holds the target voxels
    of ``box`` (None: all of ``target``; J', K' its sizes along the other axes) whose first
    index is in ``rows``, on ``values``' device and dtype. ``mode`` is "linear" (trilinear)
    or "nearest". Target voxels farther than half a voxel outside ``source`` get ``fill``;
    those within half a voxel take the nearest edge value.

    Each voxel's value is computed alone (the same bits whatever the box and the chunks), so
    a box of the target gets exactly what the whole target's run gives it.
    """
    matrix = np.linalg.inv(source.affine) @ target.affine  # target index -> source index
    shift = _integer_shift(matrix)
    parallel = mode == "linear" and _parallel_axes(matrix)
    box = whole_box(target.shape) if box is None else box
    if any(len(r) == 0 for r in box):
        return
    plane = max(len(box[1]) * len(box[2]), 1)
    step = max(1, chunk_points // plane)
    for start in range(box[0].start, box[0].stop, step):
        rows = slice(start, min(start + step, box[0].stop))
        part: Box = (range(rows.start, rows.stop), box[1], box[2])
        if shift is not None:
            yield rows, _copy_shifted(values, shift, part, fill)
        elif parallel:
            yield rows, _interpolate_separably(values, matrix, part, fill)
        else:
            yield rows, _sample(values, matrix, part, mode, fill)


def _parallel_axes(matrix: np.ndarray) -> bool:
    """Whether target axis a runs along source axis a (``matrix``: target index -> source index)."""
    linear = matrix[:3, :3]
    return bool(np.allclose(linear - np.diag(np.diag(linear)), 0.0, atol=1e-9) and np.all(np.diag(linear) > 0))


def _interpolate_separably(values: torch.Tensor, matrix: np.ndarray, part: Box, fill: float) -> torch.Tensor:
    """:func:`_sample` in "linear" mode for a diagonal ``matrix``, one axis at a time.

    Along each axis the source position ``p = scale * t + offset`` of every target index
    ``t`` is clamped to the source (as ``grid_sample``'s border padding does) and the two
    neighbouring source planes are blended; positions more than half a voxel outside get
    ``fill``. Only the source planes that the first axis's targets reach are read.
    """
    device = values.device
    targets = tuple(torch.arange(r.start, r.stop) for r in part)
    lowers, uppers, weights, outside = [], [], [], []
    for axis in range(3):
        size = values.shape[axis + 1]
        # Positions in float64, as in _sample: float32 would drift by ~1e-4 voxel in large volumes.
        position = targets[axis].to(device, torch.float64) * float(matrix[axis, axis]) + float(matrix[axis, 3])
        outside.append((position < -0.5) | (position > size - 0.5))
        clamped = position.clamp(0, size - 1)
        lower = clamped.floor().long().clamp(max=max(size - 2, 0))
        lowers.append(lower)
        uppers.append((lower + 1).clamp(max=size - 1))
        weights.append(clamped - lower)
    first, last = int(lowers[0].min()), int(uppers[0].max())
    work = values[:, first : last + 1]
    work = work if work.dtype == torch.float64 else work.float()
    lowers[0], uppers[0] = lowers[0] - first, uppers[0] - first
    # Axes that shrink the volume (more source voxels per target step) first, those that grow
    # it last: the work is the size of the intermediate volumes. The order depends on the
    # grids only, never on the box, so every voxel gets the same bits in any box.
    for axis in sorted(range(3), key=lambda a: -float(matrix[a, a])):
        view = [1, 1, 1, 1]
        view[axis + 1] = -1
        weight = weights[axis].to(work.dtype).view(view)
        work = torch.lerp(work.index_select(axis + 1, lowers[axis]), work.index_select(axis + 1, uppers[axis]), weight)
    for axis in range(3):
        if bool(outside[axis].any()):
            index: list[slice | torch.Tensor] = [slice(None)] * 4
            index[axis + 1] = outside[axis]
            work[tuple(index)] = fill
    return work.to(values.dtype)


def _sample(values: torch.Tensor, matrix: np.ndarray, part: Box, mode: str, fill: float) -> torch.Tensor:
    device = values.device
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    # grid_sample wants (x, y, z) = (k, j, i): the source axes are laid out reversed from the start.
    linear = torch.as_tensor(matrix[2::-1, :3].T.copy(), dtype=torch.float64, device=device)  # row a: step along target axis a
    offset = torch.as_tensor(matrix[2::-1, 3].copy(), dtype=torch.float64, device=device)
    size = torch.as_tensor(values.shape[:0:-1], dtype=torch.float64, device=device)
    # Source positions normalised to [-1, 1] (align_corners=True). Each target axis's share is
    # computed in float64 (float32 index arithmetic would drift by ~1e-4 voxel in large
    # volumes) and only then rounded to the float32 that grid_sample computes in; the three
    # shares are summed broadcast, axis by axis, without a float64 (n, J, K, 3) array (4x faster).
    scale = 2.0 / torch.clamp(size - 1, min=1)
    steps = [torch.arange(r.start, r.stop, dtype=torch.float64, device=device) for r in part]
    grid = (
        ((steps[0][:, None] * linear[0] + offset) * scale - 1.0).to(dtype)[:, None, None, :]
        + (steps[1][:, None] * linear[1] * scale).to(dtype)[None, :, None, :]
        + (steps[2][:, None] * linear[2] * scale).to(dtype)[None, None, :, :]
    )
    # More than half a voxel outside the source gets ``fill``; a float32 rounding's worth of
    # slack keeps a voxel exactly half a voxel out (a common grid relation) inside.
    slack = 8 * torch.finfo(dtype).eps
    low = (-0.5 * scale - 1.0 - slack).to(dtype)
    high = ((size - 0.5) * scale - 1.0 + slack).to(dtype)
    outside = ((grid < low) | (grid > high)).any(dim=-1)
    sampled = F.grid_sample(
        values.unsqueeze(0).to(dtype),
        grid.unsqueeze(0),
        mode="bilinear" if mode == "linear" else "nearest",
        padding_mode="border",
        align_corners=True,
    )[0].to(values.dtype)
    sampled[:, outside] = fill
    return sampled


def resample(
    values: torch.Tensor, source: Grid, target: Grid, mode: str = "linear", fill: float = 0.0
) -> torch.Tensor:
    """:func:`resample_chunks` gathered into one tensor (C, *target.shape)."""
    out = torch.empty((values.shape[0], *target.shape), dtype=values.dtype, device=values.device)
    for rows, chunk in resample_chunks(values, source, target, mode, fill):
        out[:, rows] = chunk
    return out
