"""The ways of segmenting a CT that the benchmark compares.

:data:`REFERENCE` is the published code's way: the plain float32 network; the model grid
cropped to the foreground as the published transforms do (MONAI's CropForeground on the
windowed image: the box of voxels above the intensity window's lower bound, no margin);
MONAI sliding windows, 4 per pass, overlap 0.5, constant blending. The others run the
network rewritten by
:func:`repux.accel.optimize_for_inference` (the same function), as many windows per pass as
fit in memory, and large memory pages for big tensors:

- :data:`OPTIMIZED`: the reference's windows exactly (the same crop, overlap 0.5), so only
  float rounding separates its result from the reference's;
- :data:`DEFAULT`: what ``repux segment`` does: the model grid cropped to the body (voxels
  above -500 HU and a 10 mm margin), the bundle's overlap;
- :data:`FEWER_WINDOWS`: the body crop and overlap 0.25 (the published validation setting);
- :data:`BFLOAT16`: the reference's windows in bfloat16 (``repux segment --fast``), measured
  only where the device computes bfloat16 natively.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from repux.bundle import Bundle
from repux.infer import Segmenter
from repux.large_pages import LARGE_PAGES_ENV, SMALL_PAGES_ENV

__all__ = ["BFLOAT16", "DEFAULT", "FEWER_WINDOWS", "OPTIMIZED", "REFERENCE", "SegmentationPath", "build_segmenter"]


@dataclass(frozen=True)
class SegmentationPath:
    """One way of running a bundle on a CT.

    Attributes:
        name: names the path in reports.
        optimized: run :func:`~repux.accel.optimize_for_inference`'s rewrite of the network.
        crop: "published" (the foreground box of the windowed image, no margin) or "body"
            (the engine's body box with its margin).
        overlap: sliding-window overlap; None: the bundle's.
        sw_batch_size: windows per forward pass; None: the segmenter's choice (the bundle's,
            fewer on a CPU when they would not fit in memory).
        blend: "constant" or "gaussian".
        large_pages: run the worker with transparent huge pages (:mod:`repux.large_pages`).
        fast: bfloat16 where native (``Segmenter(fast=True)``).
    """

    name: str
    optimized: bool
    crop: str
    overlap: float | None
    sw_batch_size: int | None
    blend: str = "constant"
    large_pages: bool = False
    fast: bool = False

    def __post_init__(self) -> None:
        if self.crop not in ("published", "body"):
            raise ValueError(f"crop {self.crop!r}: expected 'published' or 'body'")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SegmentationPath":
        return cls(**data)

    def environment(self) -> dict[str, str]:
        """Environment variables of this path's worker process."""
        return LARGE_PAGES_ENV if self.large_pages else SMALL_PAGES_ENV

    def describe(self) -> str:
        network = "optimize_for_inference" if self.optimized else "plain float32 network"
        crop = "body crop with margin" if self.crop == "body" else "published foreground crop"
        pages = (", large pages" if self.large_pages else "") + (", bfloat16" if self.fast else "")
        per_pass = "windows per pass to fit memory" if self.sw_batch_size is None else f"{self.sw_batch_size} windows per pass"
        overlap = "the bundle's overlap" if self.overlap is None else f"overlap {self.overlap}"
        return f"{network}, {crop}, {overlap}, {per_pass}, {self.blend} blending{pages}"


REFERENCE = SegmentationPath("reference", optimized=False, crop="published", overlap=0.5, sw_batch_size=4)
OPTIMIZED = SegmentationPath(
    "optimized, same windows", optimized=True, crop="published", overlap=0.5, sw_batch_size=None, large_pages=True
)
DEFAULT = SegmentationPath(
    "repux segment", optimized=True, crop="body", overlap=None, sw_batch_size=None, large_pages=True
)
FEWER_WINDOWS = SegmentationPath(
    "optimized, body crop, overlap 0.25",
    optimized=True,
    crop="body",
    overlap=0.25,
    sw_batch_size=None,
    large_pages=True,
)
BFLOAT16 = replace(OPTIMIZED, name="optimized, same windows, bfloat16", fast=True)


def build_segmenter(bundle: Bundle, path: SegmentationPath, device: torch.device | str = "cpu") -> Segmenter:
    """A :class:`~repux.infer.Segmenter` of ``bundle`` that runs the way ``path`` says."""
    segmenter = Segmenter(
        bundle,
        device=device,
        overlap=path.overlap,
        fast=path.fast,
        optimize=path.optimized,
        windows_per_pass=path.sw_batch_size,
    )
    segmenter.window = replace(segmenter.window, blend=path.blend)
    if path.crop == "published":
        # CropForeground's default selects voxels above 0 of the windowed image: above a_min.
        preprocessing = segmenter.preprocessing
        segmenter.preprocessing = replace(preprocessing, body_threshold=preprocessing.a_min, body_margin_mm=0.0)
    return segmenter
