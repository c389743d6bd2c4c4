"""Geometry of inference: axis reorientation, the model grid and affine resampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from repux.infer.grid import AxisReorientation, Grid, model_grid, orientation_matrix, resample
from infer_support import oblique_direction


def _grid(shape, spacing, direction_ras, origin=(5.0, -12.0, 30.0)) -> Grid:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction_ras) @ np.diag(spacing)
    affine[:3, 3] = origin
    return Grid(tuple(shape), affine)


def _centres(grid: Grid) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    return index @ grid.affine[:3, :3].T + grid.affine[:3, 3]


def test_orientation_codes():
    np.testing.assert_array_equal(orientation_matrix("RAS"), np.eye(3))
    np.testing.assert_array_equal(orientation_matrix("LPS"), np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_array_equal(orientation_matrix("PIR"), [[0, 0, 1], [-1, 0, 0], [0, -1, 0]])


@pytest.mark.parametrize("permutation", list(itertools.permutations(range(3))))
def test_reorientation_keeps_every_voxel_centre_and_value(permutation):
    flips = np.diag([-1.0, 1.0, -1.0])
    direction = (np.eye(3)[:, list(permutation)] @ flips) @ oblique_direction(8.0)
    grid = _grid((5, 4, 3), (1.5, 2.0, 3.0), direction)
    values = np.arange(60, dtype=np.float32).reshape(5, 4, 3)
    reorientation = AxisReorientation.towards(grid, "RAS")
    target = reorientation.grid(grid)
    moved = reorientation.apply(values)
    # Each axis now points mostly along R, A, S respectively (positive cosine).
    directions = target.affine[:3, :3] / target.spacing
    assert np.all(np.argmax(np.abs(directions), axis=0) == [0, 1, 2])
    assert np.all(np.diag(directions) > 0)
    # Same value at the same point in space, and the inverse restores the array.
    lookup = {tuple(np.round(p, 6)): v for p, v in zip(_centres(grid), values.ravel())}
    for point, value in zip(_centres(target), np.ascontiguousarray(moved).ravel()):
        assert lookup[tuple(np.round(point, 6))] == value
    np.testing.assert_array_equal(reorientation.invert(moved), values)
    as_tensor = torch.from_numpy(np.ascontiguousarray(moved))[None]
    np.testing.assert_array_equal(reorientation.invert(as_tensor)[0].numpy(), values)


def test_model_grid_is_the_input_grid_when_it_already_fits():
    source = _grid((30, 20, 10), (2.0, 2.0, 3.0), np.eye(3))
    assert model_grid(source, (2.0, 2.0, 3.0)).affine.tolist() == source.affine.tolist()
    assert model_grid(source, (2.0, 2.0, 3.0)).shape == source.shape


def test_model_grid_covers_an_oblique_input():
    source = _grid((30, 20, 10), (1.3, 1.7, 4.0), oblique_direction(25.0))
    grid = model_grid(source, (2.0, 2.5, 3.0))
    np.testing.assert_allclose(grid.affine[:3, :3], np.diag([2.0, 2.5, 3.0]))
    inside = (_centres(source) - grid.affine[:3, 3]) / np.array([2.0, 2.5, 3.0])
    assert inside.min() >= -1e-6 and np.all(inside.max(axis=0) <= np.array(grid.shape) - 1 + 1e-6)


def test_trilinear_resampling_reproduces_a_linear_field_across_an_oblique_affine():
    # A linear function of position is reproduced exactly by trilinear interpolation: any
    # mistake in the affine (axis order, flips, offsets) shows as a large error.
    def field(points: np.ndarray) -> np.ndarray:
        return points @ np.array([0.7, -1.3, 2.1]) + 5.0

    direction = oblique_direction(30.0) @ np.diag([1.0, -1.0, 1.0])
    source = _grid((40, 36, 30), (2.0, 2.2, 2.5), direction, (-40.0, 35.0, -30.0))
    target = _grid((20, 18, 15), (2.7, 2.9, 3.1), oblique_direction(-20.0, (0.2, 1.0, 0.3)), (-20.0, -5.0, -12.0))
    values = torch.from_numpy(field(_centres(source)).reshape(source.shape).astype(np.float64))[None]
    sampled = resample(values, source, target, mode="linear", fill=np.nan)[0].numpy().ravel()
    points = _centres(target)
    index = (points - source.affine[:3, 3]) @ np.linalg.inv(source.affine[:3, :3]).T
    size = np.array(source.shape)
    inside = np.all((index >= 0) & (index <= size - 1), axis=1)
    beyond = np.any((index < -0.5) | (index > size - 0.5), axis=1)
    assert inside.sum() > 1000 and beyond.sum() > 1000
    np.testing.assert_allclose(sampled[inside], field(points[inside]), atol=1e-6)
    # Farther than half a voxel outside: the fill value; within half a voxel: the edge's value.
    assert np.all(np.isnan(sampled[beyond])) and not np.any(np.isnan(sampled[~beyond]))


def test_whole_voxel_shift_is_copied_exactly_with_fill_outside():
    source = _grid((6, 5, 4), (1.0, 2.0, 3.0), np.eye(3))
    target = Grid((6, 5, 4), source.affine.copy())
    target.affine[:3, 3] += source.affine[:3, :3] @ np.array([2.0, -1.0, 0.0])
    values = torch.arange(120, dtype=torch.float32).reshape(1, 6, 5, 4)
    out = resample(values, source, target, fill=-7.0)[0]
    np.testing.assert_array_equal(out[:4, 1:], values[0, 2:, :4])
    assert torch.all(out[4:] == -7.0) and torch.all(out[:, 0] == -7.0)


@pytest.mark.parametrize(
    "source_shape, source_spacing, target_shape, target_spacing, target_origin",
    [
        ((12, 9, 7), (4.0, 4.0, 4.0), (50, 41, 20), (0.8, 0.9, 1.5), (-4.3, -5.1, -1.7)),  # export: up
        ((60, 45, 30), (0.8, 0.8, 1.5), (14, 11, 12), (3.0, 3.5, 4.0), (-4.3, -5.1, -1.7)),  # preprocess: down
        ((1, 9, 7), (2.0, 2.0, 2.0), (3, 20, 9), (1.0, 1.3, 1.6), (2.5, -3.0, 0.0)),  # a one-voxel axis
    ],
)
def test_parallel_axes_are_interpolated_separably_as_grid_sample_does(
    source_shape, source_spacing, target_shape, target_spacing, target_origin, monkeypatch
):
    # Same directions, other spacings and a sub-voxel offset (part of the target outside):
    # the separable path must give grid_sample's values, fill and border clamping included.
    source = _grid(source_shape, source_spacing, np.eye(3), (3.0, -2.0, 1.0))
    target = _grid(target_shape, target_spacing, np.eye(3), target_origin)
    torch.manual_seed(1)
    values = torch.rand((2, *source_shape))
    separable = resample(values, source, target, mode="linear", fill=-1.0)
    monkeypatch.setattr("repux.infer.grid._parallel_axes", lambda matrix: False)
    general = resample(values, source, target, mode="linear", fill=-1.0)
    assert (general == -1.0).sum() > 0 and (general != -1.0).sum() > 0
    torch.testing.assert_close(separable, general, rtol=0, atol=1e-4)
    assert torch.equal(separable == -1.0, general == -1.0)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(60, dtype=np.int16).reshape(5, 4, 3) - 30,  # what CTs hold: torch converts in place
        np.arange(60, dtype=np.float32).reshape(5, 4, 3),  # nothing to convert: still a copy
        np.arange(60, dtype=">i2").reshape(5, 4, 3),  # big-endian (some NIfTI files): numpy converts
        np.arange(60, dtype=np.uint16).reshape(5, 4, 3),  # a type torch does not read: numpy converts
        np.arange(120, dtype=np.int16).reshape(5, 4, 6)[:, :, ::2],  # a strided view
    ],
)
@pytest.mark.parametrize("permutation", [(0, 1, 2), (1, 0, 2), (2, 0, 1)])
def test_reoriented_float32_is_a_new_contiguous_copy_of_the_reoriented_values(array, permutation):
    from repux.infer.preprocess import reoriented_float32

    flips = np.eye(3) if permutation == (0, 1, 2) else np.diag([-1.0, 1.0, 1.0])  # RAS already: nothing to move
    direction = np.eye(3)[:, list(permutation)] @ flips
    reorientation = AxisReorientation.towards(_grid(array.shape, (1.0, 1.0, 1.0), direction), "RAS")
    got = reoriented_float32(array, reorientation)
    assert got.dtype == torch.float32 and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), reorientation.apply(array.astype(np.float64)))
    assert not np.shares_memory(got.numpy(), array)
