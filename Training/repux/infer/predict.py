"""Prediction: sliding-window inference of the network over the preprocessed image.

- :class:`SlidingWindowConfig`: every sliding-window parameter in one place.
- :class:`WindowPredictor`: the one place where a batch of windows becomes logits
  (device, bf16 autocast); faster window predictors (re-parameterised kernels, FFT
  convolutions, channels-last) replace it without touching the rest.
- :class:`ExecutionPlan` and :func:`predict_probabilities`: MONAI's
  ``sliding_window_inference`` with constant (or Gaussian) blending, then softmax; a CUDA
  out-of-memory is retried with fewer windows per pass, then with stitching on the CPU,
  then on the CPU altogether, instead of failing.
- A subset of the window grid: :func:`window_grid` lists the windows of the whole image in
  MONAI's order, :func:`windows_overlapping` picks those touching a box, and
  ``predict_probabilities(..., windows=...)`` runs only the batches of windows that hold one
  of them. The grid, the batches and the blending are those of the whole-image run, so every
  voxel that only chosen windows cover gets exactly (bit for bit) the whole-image value.
- Test-time mirroring (``WindowPredictor(..., mirror=True)``): the logits of each window are
  the mean over the window and its seven mirror images (flips along every combination of the
  three axes), each flipped back, as nnU-Net does; eight forward passes per window.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import nn

from repux.accel import native_bfloat16
from repux.progress import Progress

#: Seconds between two progress reports of the window count (the last window always reports).
PROGRESS_INTERVAL = 0.25
#: Stitch on the GPU only when the stitched output needs at most this share of free GPU memory.
GPU_STITCH_SHARE = 0.4

#: Memory the activations of one forward pass may take on the CPU (bytes).
CPU_ACTIVATION_BUDGET = 1.5 * 2**30
#: Peak activation memory of one window, in full-resolution feature maps of the first stage's
#: width (float32): measured 1.23 GB per 96^3 window at width 48 on a CPU.
FEATURE_MAPS_PER_WINDOW = 7.2


def windows_fitting_memory(first_width: int, patch_size: tuple[int, ...], requested: int) -> int:
    """``requested`` windows per pass, fewer (at least 1) when their activations exceed
    :data:`CPU_ACTIVATION_BUDGET`.

    On a CPU more windows per pass buy no speed and cost memory: at the paper's width, 4
    windows of 96^3 per pass took 17.3 s per window against 17.1 s one at a time, and 6.6
    GiB of peak memory against 2.3 (and longer per window on a loaded machine, from page
    faults on fresh activations). On a GPU the out-of-memory fallback sizes the batch instead.
    """
    per_window = FEATURE_MAPS_PER_WINDOW * first_width * math.prod(patch_size) * 4
    return max(1, min(requested, int(CPU_ACTIVATION_BUDGET // per_window)))


@dataclass(frozen=True)
class SlidingWindowConfig:
    """Window size, overlap, windows per forward pass and blending (MONAI's names)."""

    patch_size: tuple[int, int, int]
    overlap: float = 0.5
    sw_batch_size: int = 4
    blend: str = "constant"

    @classmethod
    def from_metadata(
        cls, preprocessing: dict[str, Any], inference: dict[str, Any], overlap: float | None = None
    ) -> "SlidingWindowConfig":
        """From a bundle's ``model.json``; ``overlap`` overrides the bundle's."""
        return cls(
            patch_size=tuple(int(p) for p in preprocessing["patch_size"]),  # type: ignore[arg-type]
            overlap=float(inference["overlap"] if overlap is None else overlap),
            sw_batch_size=int(inference["sw_batch_size"]),
            blend=str(inference["blend"]),
        )

    def scan_interval(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Step between windows along each axis, as MONAI computes it."""
        steps = []
        for size, roi in zip(shape, self.patch_size):
            if roi >= size:
                steps.append(roi)
            else:
                steps.append(max(int(roi * (1 - self.overlap)), 1))
        return tuple(steps)

    def window_count(self, shape: tuple[int, ...]) -> int:
        """Number of windows over an image of spatial ``shape`` (at least the patch size)."""
        return len(window_grid(shape, self))


#: One sliding window: a slice per spatial axis of the network input.
Window = tuple[slice, slice, slice]


def window_grid(shape: tuple[int, ...], config: SlidingWindowConfig) -> list[Window]:
    """The windows over an image of spatial ``shape`` in the order MONAI runs them.

    Window ``n`` of this list is the ``n``-th window of ``sliding_window_inference`` on the
    same shape and configuration: the indices that ``predict_probabilities(windows=...)`` takes.
    """
    roi = tuple(min(r, s) for r, s in zip(config.patch_size, shape))
    return [tuple(w) for w in dense_patch_slices(shape, roi, config.scan_interval(shape))]  # type: ignore[misc]


def windows_overlapping(grid: Sequence[Window], start: Sequence[int], stop: Sequence[int]) -> list[int]:
    """Indices of the windows of ``grid`` that share a voxel with the box ``start`` .. ``stop`` (exclusive).

    Every window that covers a voxel of the box is among them, so :func:`predict_probabilities`
    run on them gives the box its whole-image values.
    """
    return [
        index
        for index, window in enumerate(grid)
        if all(w.start < b and a < w.stop for w, a, b in zip(window, start, stop))
    ]


#: Axis combinations of test-time mirroring (spatial axes 2, 3, 4 of a batch): all seven non-empty ones.
MIRROR_AXES = tuple(axes for count in (1, 2, 3) for axes in itertools.combinations((2, 3, 4), count))


class WindowPredictor:
    """Logits of a batch of windows: (B, 1, X, Y, Z) -> (B, C, X, Y, Z) float32.

    Args:
        network: the segmentation network in eval mode.
        device: where the network runs.
        fast: bf16 autocast where the device computes bf16 natively (see
            :func:`~repux.accel.native_bfloat16`; emulated bf16 is far slower).
        mirror: test-time mirroring: the mean of the logits over the windows and their
            mirror images along :data:`MIRROR_AXES`, flipped back (8 forward passes).
        channels: the network's output channels when known (spares a forward pass when
            the first batch of a window subset is skipped).
    """

    def __init__(
        self,
        network: nn.Module,
        device: torch.device,
        fast: bool = False,
        mirror: bool = False,
        channels: int | None = None,
    ) -> None:
        self.network = network.to(device).eval()
        self.device = device
        self.fast = fast
        self.mirror = mirror
        self.channels = channels

    @property
    def autocast(self) -> bool:
        return self.fast and native_bfloat16(self.device)

    def to(self, device: torch.device) -> "WindowPredictor":
        """The same predictor moved to ``device``."""
        return WindowPredictor(self.network, device, self.fast, self.mirror, self.channels)

    def _logits(self, windows: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.network(windows).float()

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        windows = windows.to(self.device, non_blocking=True)
        logits = self._logits(windows)
        if self.mirror:
            for axes in MIRROR_AXES:
                logits += torch.flip(self._logits(torch.flip(windows, axes)), axes)
            logits /= len(MIRROR_AXES) + 1
        return logits


@dataclass(frozen=True)
class ExecutionPlan:
    """Where windows run (``device``), where the output is stitched, and windows per pass."""

    device: torch.device
    stitch_device: torch.device
    sw_batch_size: int

    def describe(self) -> str:
        return f"{self.sw_batch_size} window(s) per pass on {self.device}, stitching on {self.stitch_device}"

    def after_out_of_memory(self) -> "ExecutionPlan | None":
        """The next, lighter plan to try after an out-of-memory error; None when none is left."""
        cpu = torch.device("cpu")
        if self.sw_batch_size > 1:
            return replace(self, sw_batch_size=max(self.sw_batch_size // 2, 1))
        if self.stitch_device.type != "cpu":
            return replace(self, stitch_device=cpu)
        if self.device.type != "cpu":
            return replace(self, device=cpu)
        return None


def plan_execution(
    image_shape: tuple[int, ...], out_chans: int, config: SlidingWindowConfig, device: torch.device
) -> ExecutionPlan:
    """Stitch on the GPU when the output (C + 1 float32 volumes: output and weights) fits easily."""
    stitch = device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        needed = (out_chans + 2) * math.prod(image_shape) * 4
        if needed > GPU_STITCH_SHARE * free:
            stitch = torch.device("cpu")
    return ExecutionPlan(device, stitch, config.sw_batch_size)


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


Result = TypeVar("Result")


def with_memory_fallbacks(
    attempt: Callable[[WindowPredictor, ExecutionPlan], Result],
    predictor: WindowPredictor,
    plan: ExecutionPlan,
    on_retry: Callable[[str], None] | None = None,
) -> tuple[Result, ExecutionPlan]:
    """``attempt(predictor, plan)`` and the plan that worked; a CUDA (or CPU) out-of-memory
    error starts it again with :meth:`ExecutionPlan.after_out_of_memory` (``on_retry`` hears why).

    Raises:
        torch.OutOfMemoryError: even the lightest plan (one window per pass on the CPU) failed.
    """
    while True:
        predictor = predictor.to(plan.device)
        try:
            return attempt(predictor, plan), plan
        except torch.OutOfMemoryError:
            failed = plan
        # Retry outside the except block: the traceback's frames would keep the big tensors alive.
        _release_memory(failed.device)
        lighter = failed.after_out_of_memory()
        if lighter is None:
            raise torch.OutOfMemoryError(
                f"out of memory even with {failed.describe()}; free memory or use a smaller patch size"
            )
        plan = lighter
        if on_retry is not None:
            on_retry(f"out of memory with {failed.describe()}; retrying with {plan.describe()}")


def predict_probabilities(
    image: torch.Tensor,
    predictor: WindowPredictor,
    config: SlidingWindowConfig,
    plan: ExecutionPlan,
    progress: Progress | None = None,
    on_retry: Callable[[str], None] | None = None,
    windows: Collection[int] | None = None,
) -> tuple[torch.Tensor, ExecutionPlan]:
    """Softmax probabilities (C, X, Y, Z) of ``image`` (1, 1, X, Y, Z) and the plan that worked.

    Logits of overlapping windows are blended (constant or Gaussian weights), then softmax
    (in place: :func:`softmax_in_place`).
    ``progress`` gets a stage "infer" counting windows. An out-of-memory error switches to
    :meth:`ExecutionPlan.after_out_of_memory` and starts again; ``on_retry`` hears why.

    ``windows``: indices into :func:`window_grid` of the windows to run (None: all). Each
    batch of the whole-image run that holds one of them runs whole (the same batches give
    the same logits); the other batches are skipped and add nothing. A voxel covered only by
    windows that ran is exact; elsewhere the values are partial and meaningless.
    """
    grid = window_grid(tuple(image.shape[2:]), config)
    chosen = None if windows is None else _window_keys(grid, windows)
    total = len(grid) if chosen is None else len(chosen)

    def attempt(predictor: WindowPredictor, plan: ExecutionPlan) -> torch.Tensor:
        return _run_windows(image, predictor, config, plan, progress, total, chosen)

    logits, plan = with_memory_fallbacks(attempt, predictor, plan, on_retry)
    return softmax_in_place(logits[0]), plan


#: Voxels per channel that one step of :func:`softmax_in_place` works on.
SOFTMAX_SLAB_VOXELS = 1 << 21


def softmax_in_place(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the channels of (C, X, Y, Z) ``logits``, written over them, slab by slab along X.

    The stitched logits of a whole CT are the largest array of inference (C volumes on the
    model grid); ``torch.softmax`` would allocate a second one. Returns ``logits`` itself.
    """
    step = max(1, SOFTMAX_SLAB_VOXELS // max(1, logits[0, 0].numel()))
    with torch.inference_mode(logits.is_inference()):
        for start in range(0, logits.shape[1], step):
            slab = logits[:, start : start + step]
            slab.copy_(torch.softmax(slab, dim=0))
    return logits


def _window_keys(grid: Sequence[Window], windows: Collection[int]) -> set[tuple[int, ...]]:
    """The start corners of the chosen windows: how a batch's windows are recognised."""
    return {tuple(s.start for s in grid[index]) for index in windows}


class WindowCounter:
    """Reports windows done to a progress stage "infer", at most every :data:`PROGRESS_INTERVAL`
    seconds (the last window always reports)."""

    def __init__(self, progress: Progress | None, total: int, done: int = 0) -> None:
        self.progress, self.total, self.done = progress, total, done
        self.reported = time.monotonic()
        if progress is not None:
            progress.stage("infer", total, done=done)

    def add(self, count: int) -> None:
        self.done += count
        if self.progress is not None and (
            self.done >= self.total or time.monotonic() - self.reported >= PROGRESS_INTERVAL
        ):
            self.progress.update(self.done)
            self.reported = time.monotonic()


def _run_windows(
    image: torch.Tensor,
    predictor: WindowPredictor,
    config: SlidingWindowConfig,
    plan: ExecutionPlan,
    progress: Progress | None,
    total: int,
    chosen: set[tuple[int, ...]] | None = None,
) -> torch.Tensor:
    counter = WindowCounter(progress, total)

    def counted(windows: torch.Tensor, where: list[list[slice]]) -> torch.Tensor:
        if chosen is not None:
            needed = sum(tuple(s.start for s in place[2:]) in chosen for place in where)
            if not needed:
                # Stitched with weight, but zero logits add nothing; the count map is MONAI's own.
                shape = (windows.shape[0], _channels(predictor, windows), *windows.shape[2:])
                return torch.zeros(shape, device=windows.device)
        else:
            needed = windows.shape[0]
        logits = predictor(windows)
        counter.add(needed)
        return logits

    with torch.inference_mode():
        return sliding_window_inference(
            image,
            roi_size=config.patch_size,
            sw_batch_size=plan.sw_batch_size,
            predictor=counted,
            overlap=config.overlap,
            mode=config.blend,
            sw_device=plan.device,
            device=plan.stitch_device,
            with_coord=True,
        )


def _channels(predictor: WindowPredictor, windows: torch.Tensor) -> int:
    """Output channels of the predictor: as declared, else from one window."""
    if predictor.channels is None:
        predictor.channels = int(predictor(windows[:1]).shape[1])
    return predictor.channels
