"""The two ways of segmenting a CT that the benchmark compares.

:data:`REFERENCE` is the published code's way: the plain float32 network, MONAI sliding
windows over the whole resampled volume (no crop), 4 windows per pass, overlap 0.5,
constant blending. :data:`OPTIMIZED` is the project's: the network rewritten by
:func:`repux.accel.optimize_for_inference` (same function), the model grid cropped to the
body, overlap 0.25 (the published validation setting), one window per pass (a quarter of
the activation memory at the same speed), and large memory pages for big tensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from repux.accel import InferenceOptions, optimize_for_inference
from repux.bundle import Bundle
from repux.infer import Segmenter

__all__ = ["FEWER_WINDOWS", "OPTIMIZED", "REFERENCE", "SegmentationPath", "build_segmenter", "windows_per_pass"]

#: Environment that makes PyTorch back tensors of 2 MB and more by transparent huge pages:
#: 512 times fewer page faults when the CPU allocator hands out fresh activations (read
#: once, at the first allocation of the process, so it belongs to the worker's environment).
LARGE_PAGES_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}

#: Memory the activations of one forward pass may take (bytes).
ACTIVATION_BUDGET = 1.5 * 2**30
#: Peak activation memory of one window in full-resolution feature maps of the first stage's
#: width (float32): measured 1.23 GB per 96^3 window at width 48 on a CPU.
FEATURE_MAPS_PER_WINDOW = 7.2


def windows_per_pass(first_width: int, patch_size: tuple[int, ...], requested: int) -> int:
    """``requested`` windows per pass, fewer (at least 1) when their activations exceed the budget."""
    per_window = FEATURE_MAPS_PER_WINDOW * first_width * math.prod(patch_size) * 4
    return max(1, min(requested, int(ACTIVATION_BUDGET // per_window)))


@dataclass(frozen=True)
class SegmentationPath:
    """One way of running a bundle on a CT.

    Attributes:
        name: names the path in reports.
        optimized: run :func:`~repux.accel.optimize_for_inference`'s rewrite of the network.
        crop_to_body: crop the model grid to the body's box (else the whole grid is windowed).
        overlap: sliding-window overlap.
        sw_batch_size: windows per forward pass; None: the bundle's, fewer when they would not
            fit :data:`ACTIVATION_BUDGET` (:func:`windows_per_pass`).
        blend: "constant" or "gaussian".
        large_pages: run the worker with :data:`LARGE_PAGES_ENV`.
    """

    name: str
    optimized: bool
    crop_to_body: bool
    overlap: float
    sw_batch_size: int | None
    blend: str = "constant"
    large_pages: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SegmentationPath":
        return cls(**data)

    def describe(self) -> str:
        network = "optimize_for_inference" if self.optimized else "plain float32 network"
        crop = "crop to body" if self.crop_to_body else "no crop"
        pages = ", large pages" if self.large_pages else ""
        per_pass = "windows per pass to fit memory" if self.sw_batch_size is None else f"{self.sw_batch_size} windows per pass"
        return f"{network}, {crop}, overlap {self.overlap}, {per_pass}, {self.blend} blending{pages}"


REFERENCE = SegmentationPath("reference", optimized=False, crop_to_body=False, overlap=0.5, sw_batch_size=4)
OPTIMIZED = SegmentationPath(
    "optimized", optimized=True, crop_to_body=False, overlap=0.5, sw_batch_size=None, large_pages=True
)
FEWER_WINDOWS = SegmentationPath(
    "optimized, body crop, overlap 0.25",
    optimized=True,
    crop_to_body=True,
    overlap=0.25,
    sw_batch_size=None,
    large_pages=True,
)


def build_segmenter(bundle: Bundle, path: SegmentationPath, device: torch.device | str = "cpu") -> Segmenter:
    """A :class:`~repux.infer.Segmenter` of ``bundle`` that runs the way ``path`` says."""
    network = bundle.build_network(device="cpu")
    if path.optimized:
        network = optimize_for_inference(network, device, InferenceOptions())
    segmenter = Segmenter(bundle, device=device, overlap=path.overlap, network=network)
    per_pass = path.sw_batch_size
    if per_pass is None:
        first_width = int(bundle.metadata.network["feat_size"][0])
        per_pass = windows_per_pass(first_width, segmenter.window.patch_size, segmenter.window.sw_batch_size)
    segmenter.window = replace(segmenter.window, sw_batch_size=per_pass, blend=path.blend)
    if not path.crop_to_body:
        # Every voxel counts as body: the crop box is the whole model grid.
        segmenter.preprocessing = replace(segmenter.preprocessing, body_threshold=-math.inf)
    return segmenter
