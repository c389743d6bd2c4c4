"""Organ-guided windows: the full path's window grid, run only where the organs are.

Pass 1 runs the sparsest windows of the grid (:func:`~repux.infer.predict.window_grid`)
that still cover the image along every axis (:func:`covering_windows`: at overlap 0.5
every second window, and always the last). Its argmax finds the organs (any label > 0);
pass 2 runs the other windows that reach the organs grown by half a window plus
:data:`GROWTH_MM`. When pass 1 finds no organ, pass 2 runs all the other windows: the
full grid.

Why the grown organs get exactly the full grid's values. The windows run in one fixed
schedule (:class:`WindowSchedule`): pass 1's windows first, then the other windows in
blocks of the windows per pass, each block run whole or not at all. A block holds the same
windows whichever blocks run, so each window's logits are the same bit for bit (a
convolution's rounding can depend on the other windows of its batch), and both passes add
into the same logit and weight buffers (:class:`Blend`, MONAI's arithmetic: logits times
the blending weights, summed, divided by the summed weights), so every voxel adds its
windows in the same order. A voxel all of whose covering windows ran (the grown organs and
more: :attr:`GuidedRun.exact`) therefore gets exactly what the schedule run in full gives
it; elsewhere the windows that ran decide (background, far from the organs). MONAI's
``sliding_window_inference`` (``--windows all``) batches the windows in grid order instead,
so its values differ from these by float rounding only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import compute_importance_map

from repux.infer.predict import (
    ExecutionPlan,
    SlidingWindowConfig,
    Window,
    WindowCounter,
    WindowPredictor,
    softmax_in_place,
    window_grid,
    with_memory_fallbacks,
)
from repux.progress import Progress

#: Margin (mm) added to half a window when growing pass 1's organs: context for organ edges
#: that pass 1 placed a little short of where all windows place them.
GROWTH_MM = 10.0
#: Voxels per channel that one step of the organ search (argmax) works on.
SLAB_VOXELS = 1 << 21


def covering_windows(grid: Sequence[Window]) -> list[int]:
    """Indices of the sparsest windows of ``grid`` that still cover it along every axis.

    Along each axis, from the first window, the next one kept is the farthest that starts
    inside the last kept one, until the last window is reached; the windows kept are those
    whose start is kept along all three axes. At overlap 0.5 these are every second window
    (even indices) and the last one.
    """
    kept_starts = []
    for axis in range(3):
        starts = sorted({window[axis].start for window in grid})
        length = grid[0][axis].stop - grid[0][axis].start
        kept = [starts[0]]
        while kept[-1] != starts[-1]:
            # MONAI's steps never exceed the window, so a later start always lies inside.
            kept.append(max(s for s in starts if s <= kept[-1] + length))
        kept_starts.append(set(kept))
    return [i for i, window in enumerate(grid) if all(window[a].start in kept_starts[a] for a in range(3))]


@dataclass(frozen=True)
class WindowSchedule:
    """The order windows run in: ``first`` (pass 1), then ``blocks`` of the others, grid order.

    Attributes:
        grid: every window of the full path (:func:`~repux.infer.predict.window_grid`).
        first: pass 1's windows (:func:`covering_windows`), run in passes of ``per_pass``.
        blocks: the other windows in grid order, ``per_pass`` to a block (the last may hold
            fewer); pass 2 runs a block whole or not at all.
    """

    grid: list[Window]
    first: list[int]
    blocks: list[list[int]]

    @classmethod
    def of(cls, shape: tuple[int, ...], config: SlidingWindowConfig, per_pass: int) -> "WindowSchedule":
        grid = window_grid(shape, config)
        first = covering_windows(grid)
        chosen = set(first)
        rest = [i for i in range(len(grid)) if i not in chosen]
        return cls(grid, first, [rest[a : a + per_pass] for a in range(0, len(rest), per_pass)])


class Blend:
    """Sums of blended window logits (C, X, Y, Z) and of their weights (X, Y, Z), as MONAI forms them.

    Each window adds ``logits * weight`` and ``weight`` (the importance map of the
    configured blending: ones for constant) at its place; :meth:`average` divides.
    """

    def __init__(self, shape: tuple[int, ...], config: SlidingWindowConfig, plan: ExecutionPlan) -> None:
        patch = tuple(min(p, s) for p, s in zip(config.patch_size, shape))
        self.weight = compute_importance_map(patch, mode=config.blend, device=plan.device, dtype=torch.float32)
        self.placed_weight = self.weight.to(plan.stitch_device)
        self.shape = shape
        self.device = plan.stitch_device
        self.logits: torch.Tensor | None = None
        self.weights = torch.zeros(shape, dtype=torch.float32, device=plan.stitch_device)

    def add(self, windows: Sequence[Window], logits: torch.Tensor) -> None:
        """Add the logits (B, C, *patch) of ``windows`` (B of them)."""
        if self.logits is None:
            self.logits = torch.zeros((logits.shape[1], *self.shape), dtype=torch.float32, device=self.device)
        weighted = (logits * self.weight).to(self.device)
        for window, values in zip(windows, weighted):
            self.logits[(slice(None), *window)] += values
            self.weights[window] += self.placed_weight

    def organs(self) -> torch.Tensor:
        """(X, Y, Z) bool: where the blended logits' argmax is a label other than background.

        The weights are positive wherever a window ran, so the argmax of the sums is that of
        the averages; slab by slab along X, so no (C, X, Y, Z) temporary is made.
        """
        assert self.logits is not None
        found = torch.empty(self.shape, dtype=torch.bool, device=self.device)
        step = max(1, SLAB_VOXELS // max(1, self.logits[0, 0].numel()))
        for start in range(0, self.shape[0], step):
            found[start : start + step] = self.logits[:, start : start + step].argmax(dim=0) > 0
        return found

    def average(self) -> torch.Tensor:
        """The blended logits (C, X, Y, Z): the sums divided by the weights, in place."""
        assert self.logits is not None
        self.logits /= self.weights
        return self.logits


@dataclass(frozen=True)
class GuidedRun:
    """What the organ-guided windows did.

    Attributes:
        windows_run: windows run, both passes.
        windows_total: windows of the full grid.
        organs_found: whether pass 1 found any organ (else the full grid ran).
        exact: (X, Y, Z) bool on the network input: voxels all of whose covering windows
            ran, whose values are exactly those of the whole schedule.
    """

    windows_run: int
    windows_total: int
    organs_found: bool
    exact: torch.Tensor


def growth_voxels(config: SlidingWindowConfig, spacing: Sequence[float], margin_mm: float = GROWTH_MM) -> tuple[int, ...]:
    """How far (voxels per axis) pass 1's organs are grown: half a window plus ``margin_mm``."""
    return tuple(p // 2 + math.ceil(margin_mm / s) for p, s in zip(config.patch_size, spacing))


def reaches(window: Window, organs: np.ndarray, growth: Sequence[int]) -> bool:
    """Whether ``window`` holds a voxel of ``organs`` grown by ``growth`` voxels (a box per voxel)."""
    box = tuple(slice(max(w.start - g, 0), w.stop + g) for w, g in zip(window, growth))
    return bool(organs[box].any())


def guided_probabilities(
    image: torch.Tensor,
    predictor: WindowPredictor,
    config: SlidingWindowConfig,
    plan: ExecutionPlan,
    growth: Sequence[int],
    progress: Progress | None = None,
    on_retry: Callable[[str], None] | None = None,
    everywhere: bool = False,
) -> tuple[torch.Tensor, ExecutionPlan, GuidedRun]:
    """Softmax probabilities (C, X, Y, Z) of ``image`` (1, 1, X, Y, Z) from organ-guided windows.

    ``growth``: voxels per axis by which pass 1's organs are grown (:func:`growth_voxels`).
    ``everywhere``: run every block (the whole schedule: what the grown organs equal).
    ``progress`` gets a stage "infer" counting windows (its total shrinks to the windows
    that will run once pass 1 is done) and a message with the windows run of the full grid.
    Out-of-memory errors are retried as :func:`~repux.infer.predict.predict_probabilities` does.
    """

    def attempt(predictor: WindowPredictor, plan: ExecutionPlan) -> tuple[torch.Tensor, GuidedRun]:
        return _two_passes(image, predictor, config, plan, growth, progress, everywhere)

    (logits, run), plan = with_memory_fallbacks(attempt, predictor, plan, on_retry)
    return softmax_in_place(logits), plan, run


def _two_passes(
    image: torch.Tensor,
    predictor: WindowPredictor,
    config: SlidingWindowConfig,
    plan: ExecutionPlan,
    growth: Sequence[int],
    progress: Progress | None,
    everywhere: bool,
) -> tuple[torch.Tensor, GuidedRun]:
    shape = tuple(image.shape[2:])
    schedule = WindowSchedule.of(shape, config, plan.sw_batch_size)
    grid = schedule.grid
    counter = WindowCounter(progress, len(grid))

    def run(indices: list[int]) -> None:
        windows = [grid[i] for i in indices]
        batch = torch.cat([image[(slice(None), slice(None), *window)] for window in windows])
        blend.add(windows, predictor(batch))
        counter.add(len(indices))

    with torch.inference_mode():
        blend = Blend(shape, config, plan)
        for start in range(0, len(schedule.first), plan.sw_batch_size):
            run(schedule.first[start : start + plan.sw_batch_size])
        organs = blend.organs().cpu().numpy()
        found = bool(organs.any())
        blocks = schedule.blocks
        if found and not everywhere:
            blocks = [block for block in blocks if any(reaches(grid[i], organs, growth) for i in block)]
        ran = len(schedule.first) + sum(len(block) for block in blocks)
        if progress is not None:
            progress.message(
                f"organ-guided windows: {ran} of {len(grid)} windows of the full grid"
                + ("" if found else " (no organ found in the first pass: all windows)"),
                windows=ran,
                windows_total=len(grid),
            )
        counter = WindowCounter(progress, ran, done=counter.done)
        for block in blocks:
            run(block)
        exact = torch.ones(shape, dtype=torch.bool)
        skipped = {i for block in schedule.blocks for i in block} - {i for block in blocks for i in block}
        for index in skipped:
            exact[grid[index]] = False
        return blend.average(), GuidedRun(ran, len(grid), found, exact)
