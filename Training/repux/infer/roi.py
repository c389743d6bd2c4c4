"""Region of interest: a box in RAS millimetres and the voxels of a volume it holds (torch-free).

``repux segment --roi R0,A0,S0,R1,A1,S1`` and the Slicer module's markups ROI give two
opposite corners of an axis-aligned box in patient RAS coordinates (mm). A voxel belongs to
the region when its centre lies in the box (edges included): for an axis-aligned scan that
is an index box; for an oblique one, the voxels of the index box whose centres are inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from repux.errors import InputError

_AXES = "RAS"


@dataclass(frozen=True)
class RasBox:
    """An axis-aligned box in RAS mm: ``low`` <= ``high`` along R, A, S (arrays of 3)."""

    low: np.ndarray
    high: np.ndarray

    @classmethod
    def from_corners(cls, first: "np.ndarray | list[float]", second: "np.ndarray | list[float]", what: str = "--roi") -> "RasBox":
        """The box with opposite corners ``first`` and ``second`` (RAS mm).

        Raises:
            InputError: a non-finite coordinate, or the box has zero size along an axis.
        """
        a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
        if a.shape != (3,) or b.shape != (3,) or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            raise InputError(f"{what}: corners {a.tolist()} and {b.tolist()}; expected two finite RAS points (mm)")
        for axis in range(3):
            if a[axis] == b[axis]:
                raise InputError(
                    f"{what}: the box has zero size along {_AXES[axis]} ({_AXES[axis]}0 = {_AXES[axis]}1 = {a[axis]:g} mm); "
                    "expected two opposite corners of a box"
                )
        return cls(np.minimum(a, b), np.maximum(a, b))

    @classmethod
    def parse(cls, text: str, what: str = "--roi") -> "RasBox":
        """``"R0,A0,S0,R1,A1,S1"`` (mm) as a box."""
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            values = []
        if len(values) != 6:
            raise InputError(f"{what} {text}: expected six numbers R0,A0,S0,R1,A1,S1 (two opposite corners, RAS mm)")
        return cls.from_corners(values[:3], values[3:], f"{what} {text}")

    def describe(self) -> str:
        return " x ".join(f"{_AXES[a]} {self.low[a]:g}..{self.high[a]:g}" for a in range(3)) + " mm"


@dataclass(frozen=True)
class RoiVoxels:
    """The voxels of a volume inside a box: ``inside`` (bool) over the index box ``start`` .. ``stop``."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    inside: np.ndarray

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """The region as a bool array of the whole volume's ``shape``."""
        full = np.zeros(shape, dtype=bool)
        full[self.slices] = self.inside
        return full

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.inside))


def roi_voxels(shape: tuple[int, int, int], affine: np.ndarray, box: RasBox, source: str = "image") -> RoiVoxels:
    """The voxels of a volume (``shape``, voxel-to-RAS ``affine``) whose centres lie in ``box``.

    Raises:
        InputError: no voxel centre of the volume lies in the box (naming both extents).
    """
    corners = np.array([[x, y, z, 1.0] for x in (box.low[0], box.high[0]) for y in (box.low[1], box.high[1])
                        for z in (box.low[2], box.high[2])])
    indices = (np.linalg.inv(affine) @ corners.T)[:3]
    # Voxel centres are integer indices; a hair of tolerance keeps a centre on the edge.
    start = np.maximum(np.ceil(indices.min(axis=1) - 1e-6), 0).astype(int)
    stop = np.minimum(np.floor(indices.max(axis=1) + 1e-6) + 1, shape).astype(int)
    inside = np.zeros(0, dtype=bool)
    linear = affine[:3, :3]
    if np.all(stop > start) and np.allclose(linear, np.diag(np.diag(linear)), atol=1e-9):
        inside = np.ones(tuple(stop - start), dtype=bool)  # axis-aligned: the index box is the region
    elif np.all(stop > start):
        grid = np.meshgrid(*(np.arange(a, b) for a, b in zip(start, stop)), indexing="ij")
        points = affine[:3, :3] @ np.stack([g.ravel() for g in grid]) + affine[:3, 3:4]
        tol = 1e-6 * max(1.0, float(np.abs(affine[:3]).max()))
        inside = np.all((points >= box.low[:, None] - tol) & (points <= box.high[:, None] + tol), axis=0)
        inside = inside.reshape(tuple(stop - start))
    if not inside.any():
        last = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
        ras = (affine @ last.T)[:3]
        extent = " x ".join(f"{_AXES[a]} {ras[a].min():g}..{ras[a].max():g}" for a in range(3))
        raise InputError(
            f"{source}: the box {box.describe()} holds no voxel of the image, whose voxel centres span "
            f"{extent} mm; expected a box inside the image"
        )
    return RoiVoxels(tuple(int(v) for v in start), tuple(int(v) for v in stop), inside)  # type: ignore[arg-type]
