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
  above -500 HU and a 10 mm margin), the bundle's overlap, organ-guided windows
  (:mod:`repux.infer.guided`) and the export of the organs' box only (:mod:`repux.infer.export`);
- :data:`ALL_WINDOWS`: the same with every window of the grid (``repux segment --windows all``);
- :data:`FEWER_WINDOWS`: the body crop and overlap 0.25 (the published validation setting);
- :data:`BFLOAT16`: the reference's windows in bfloat16 (``repux segment --fast``'s network),
  and :data:`DEFAULT_BFLOAT16`: all of ``repux segment --fast``, both measured only where the
  device computes bfloat16 natively;
- :data:`CPU_BACKEND_PATHS`: the reference's windows through the same rewrite exported to ONNX
  Runtime or OpenVINO (:mod:`repux.accel.backends`), in float32, in OpenVINO's bfloat16, and
  with 8-bit dense convolutions calibrated on phantoms other than the benchmark CT's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from repux.bundle import Bundle
from repux.infer import Segmenter
from repux.large_pages import LARGE_PAGES_ENV, SMALL_PAGES_ENV

__all__ = [
    "ALL_WINDOWS",
    "BFLOAT16",
    "CPU_BACKEND_PATHS",
    "DEFAULT",
    "DEFAULT_BFLOAT16",
    "FEWER_WINDOWS",
    "OPTIMIZED",
    "REFERENCE",
    "SegmentationPath",
    "build_segmenter",
    "phantom_calibration_windows",
]

#: Phantom seeds whose windows calibrate 8-bit quantization (the benchmark CT is seed 0 by default).
CALIBRATION_SEEDS = (101, 102)
#: Calibration windows drawn from each calibration phantom.
CALIBRATION_WINDOWS_PER_PHANTOM = 4


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
        fast: bfloat16 where native (``Segmenter(fast=True)``; OpenVINO's bfloat16 on that backend).
        backend: "torch", or a runtime of :data:`repux.accel.backends.BACKENDS` running the
            exported rewrite (needs ``optimized``).
        quantize: 8-bit dense convolutions on that runtime, calibrated on phantoms.
        windows: "all" (MONAI's sliding window over the whole grid) or "organs"
            (organ-guided windows, ``Segmenter(windows="organs")``).
        export_everywhere: resample every input voxel in the export (as before issue 15);
            False: only the box where a label other than background can win.
    """

    name: str
    optimized: bool
    crop: str
    overlap: float | None
    sw_batch_size: int | None
    blend: str = "constant"
    large_pages: bool = False
    fast: bool = False
    backend: str = "torch"
    quantize: bool = False
    windows: str = "all"
    export_everywhere: bool = True

    def __post_init__(self) -> None:
        if self.crop not in ("published", "body"):
            raise ValueError(f"crop {self.crop!r}: expected 'published' or 'body'")
        if self.backend != "torch" and not self.optimized:
            raise ValueError(f"backend {self.backend!r}: runs the optimized network only")
        if self.quantize and self.backend == "torch":
            raise ValueError("quantize: needs an exported backend, not torch")

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
        if self.backend != "torch":
            network += f" exported to {self.backend}" + (" with int8 dense convolutions" if self.quantize else "")
        crop = "body crop with margin" if self.crop == "body" else "published foreground crop"
        pages = (", large pages" if self.large_pages else "") + (", bfloat16" if self.fast else "")
        per_pass = "windows per pass to fit memory" if self.sw_batch_size is None else f"{self.sw_batch_size} windows per pass"
        overlap = "the bundle's overlap" if self.overlap is None else f"overlap {self.overlap}"
        windows = ", organ-guided windows" if self.windows == "organs" else ""
        export = "" if self.export_everywhere else ", export of the organs' box"
        return f"{network}, {crop}, {overlap}, {per_pass}, {self.blend} blending{windows}{export}{pages}"


REFERENCE = SegmentationPath("reference", optimized=False, crop="published", overlap=0.5, sw_batch_size=4)
OPTIMIZED = SegmentationPath(
    "optimized, same windows", optimized=True, crop="published", overlap=0.5, sw_batch_size=None, large_pages=True
)
DEFAULT = SegmentationPath(
    "repux segment",
    optimized=True,
    crop="body",
    overlap=None,
    sw_batch_size=None,
    large_pages=True,
    windows="organs",
    export_everywhere=False,
)
ALL_WINDOWS = replace(DEFAULT, name="repux segment --windows all", windows="all")
FEWER_WINDOWS = SegmentationPath(
    "optimized, body crop, overlap 0.25",
    optimized=True,
    crop="body",
    overlap=0.25,
    sw_batch_size=None,
    large_pages=True,
)
BFLOAT16 = replace(OPTIMIZED, name="optimized, same windows, bfloat16", fast=True)
DEFAULT_BFLOAT16 = replace(DEFAULT, name="repux segment --fast", fast=True)
CPU_BACKEND_PATHS = (
    replace(OPTIMIZED, name="onnxruntime", backend="onnxruntime"),
    replace(OPTIMIZED, name="openvino", backend="openvino"),
    replace(OPTIMIZED, name="openvino, bfloat16", backend="openvino", fast=True),
    replace(OPTIMIZED, name="onnxruntime, int8", backend="onnxruntime", quantize=True),
    replace(OPTIMIZED, name="openvino, int8", backend="openvino", quantize=True),
)


def phantom_calibration_windows(bundle: Bundle, seeds: tuple[int, ...] = CALIBRATION_SEEDS) -> list[np.ndarray]:
    """Network inputs for calibrating quantization: windows (1, 1, *patch) of phantoms preprocessed as the bundle says.

    :data:`CALIBRATION_WINDOWS_PER_PHANTOM` windows per phantom, at random places (seeded).
    """
    from repux.data.phantoms import make_phantom
    from repux.infer.preprocess import PreprocessingConfig, preprocess

    config = PreprocessingConfig.from_metadata(bundle.metadata.preprocessing)
    patch = config.patch_size
    windows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        image = preprocess(make_phantom(seed)[0], config).image[0].numpy()  # (1, X, Y, Z), at least the patch
        for _ in range(CALIBRATION_WINDOWS_PER_PHANTOM):
            starts = [int(rng.integers(0, size - p + 1)) for size, p in zip(image.shape[1:], patch)]
            box = tuple(slice(a, a + p) for a, p in zip(starts, patch))
            windows.append(np.ascontiguousarray(image[(slice(None), *box)][None]))
    return windows


def build_segmenter(bundle: Bundle, path: SegmentationPath, device: torch.device | str = "cpu") -> Segmenter:
    """A :class:`~repux.infer.Segmenter` of ``bundle`` that runs the way ``path`` says."""
    network = None
    if path.backend != "torch":
        from repux.accel.backends import backend_network

        network = backend_network(
            bundle.build_network(device="cpu"),
            path.backend,
            tuple(int(p) for p in bundle.metadata.preprocessing["patch_size"]),
            int(bundle.metadata.network["in_chans"]),
            quantize=path.quantize,
            calibration=phantom_calibration_windows(bundle) if path.quantize else None,
            precision="bfloat16" if path.fast else "float32",
        )
    segmenter = Segmenter(
        bundle,
        device=device,
        overlap=path.overlap,
        fast=path.fast and network is None,
        optimize=path.optimized,
        windows_per_pass=path.sw_batch_size,
        network=network,
        windows=path.windows,
        export_everywhere=path.export_everywhere,
    )
    segmenter.window = replace(segmenter.window, blend=path.blend)
    if path.crop == "published":
        # CropForeground's default selects voxels above 0 of the windowed image: above a_min.
        preprocessing = segmenter.preprocessing
        segmenter.preprocessing = replace(preprocessing, body_threshold=preprocessing.a_min, body_margin_mm=0.0)
    return segmenter
