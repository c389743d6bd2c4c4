"""The inference engine: a bundle's network applied to a volume, labels on the input's grid.

:class:`Segmenter` chains the three stages, each in its own module:
:mod:`~repux.infer.preprocess` (input -> network input on the model grid),
:mod:`~repux.infer.predict` (sliding-window probabilities) and
:mod:`~repux.infer.export` (probabilities -> labels on the input's exact voxel grid).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from repux.accel import InferenceOptions, native_bfloat16, optimize_for_inference
from repux.bundle import Bundle
from repux.errors import InputError
from repux.imageio import Volume
from repux.infer.export import to_input_grid
from repux.infer.guided import GuidedRun, growth_voxels, guided_probabilities
from repux.infer.grid import Grid
from repux.infer.predict import (
    ExecutionPlan,
    SlidingWindowConfig,
    WindowPredictor,
    plan_execution,
    predict_probabilities,
    window_grid,
    windows_fitting_memory,
    windows_overlapping,
)
from repux.infer.memory import case_memory_bytes, require_memory
from repux.infer.preprocess import Preprocessed, PreprocessingConfig, check_image, padded_shape, plan_grids, preprocess
from repux.infer.roi import RasBox, roi_voxels
from repux.infer.scan_check import scan_warnings
from repux.options import DEFAULT_WINDOWS, DEVICE_CHOICES, check_overlap, check_windows
from repux.progress import Progress



def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda``/``cuda:N`` must exist.

    Raises:
        InputError: a CUDA device was asked for and is not available, or the name is unknown.
    """
    text = str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InputError(f"--device {text}: unknown device; expected one of {', '.join(DEVICE_CHOICES)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {text}: no CUDA device is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are available")
    elif device.type != "cpu":
        raise InputError(f"--device {text}: unsupported device type; expected one of {', '.join(DEVICE_CHOICES)}")
    return device


def check_modality(bundle: Bundle, modality: str | None) -> None:
    """Refuse a bundle trained for another modality than the one the user named.

    Raises:
        InputError: ``modality`` is given and differs from the bundle's.
    """
    if modality is not None and modality.upper() != bundle.metadata.modality.upper():
        raise InputError(
            f"{bundle.path}: model {bundle.metadata.name!r} was trained on {bundle.metadata.modality}; "
            f"expected a {modality.upper()} model (--modality {modality})"
        )


@dataclass
class Prediction:
    """What :meth:`Segmenter.predict` returns.

    Attributes:
        labels: label map with the input's exact geometry (uint8, or uint16 beyond 256 labels).
        probabilities: (C, I, J, K) float32 on the input grid when asked for, else None.
        confidence, entropy: (I, J, K) uint8 review maps when asked for (see
            :mod:`repux.infer.export`: probability of the chosen label and normalised
            softmax entropy, x 255), else None.
        roi: with a region of interest, the (I, J, K) bool mask of the voxels inside it; only
            those hold results (equal to the whole-image run's), the others are 0.
        plan: the execution plan that succeeded (device, stitching device, windows per pass).
        windows: number of sliding windows run.
        windows_total: windows of the full grid (more than ``windows`` when organ-guided
            windows or a region skipped some).
        guided: what the organ-guided windows did (None when every window ran, or with a region).
        seconds: wall time per stage ("preprocess", "infer", "export").
        notes: messages worth showing (out-of-memory retries, ignored options).
        warnings: why the scan does not look like the model's training scans
            (:func:`~repux.infer.scan_check.scan_warnings`); already reported to the progress.
    """

    labels: Volume
    probabilities: np.ndarray | None
    plan: ExecutionPlan
    windows: int
    windows_total: int = 0
    guided: GuidedRun | None = None
    confidence: np.ndarray | None = None
    entropy: np.ndarray | None = None
    roi: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Segmenter:
    """Segments volumes with a bundle's network.

    Args:
        bundle: the model bundle (weights, spacing, intensity window, patch, labels).
        device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
        overlap: sliding-window overlap 0 <= overlap < 1; None keeps the bundle's.
        fast: bfloat16 where the device computes it natively (CUDA, CPUs with AMX or
            AVX-512 BF16); float32 elsewhere, with a note.
        progress: where stages and window counts are reported; None reports nothing.
        network: a module to run instead of the bundle's own (same inputs and outputs),
            e.g. a re-parameterised copy; the bundle still provides everything else.
        optimize: run the bundle's network as rewritten by
            :func:`~repux.accel.optimize_for_inference` (the same function, faster).
        windows_per_pass: windows per forward pass; None: the bundle's, fewer on a CPU when
            their activations would not fit (:func:`~repux.infer.predict.windows_fitting_memory`).
        mirror: test-time mirroring (``--tta flips``): each window's logits averaged over
            its 8 mirror images, 8 times the network's work.
        backend: "torch", or "openvino": the optimized network exported to OpenVINO
            (:mod:`repux.accel.backends`; CPU only; bfloat16 with ``fast`` where native).
        backend_cache: a folder where that export is kept between runs, in a subfolder per
            weights and window (:func:`~repux.accel.backends.export_cache_key`), the few most
            recently used kept (:func:`~repux.accel.backends.use_export_cache`); None:
            exported afresh each time.
        windows: "organs": organ-guided windows (:mod:`~repux.infer.guided`; not with a
            region of interest, which runs its own windows); "all": every window of the grid
            (MONAI's ``sliding_window_inference``).
        export_everywhere: resample every input voxel in the export, not only the box where
            the labels are not known to be background (the same labels; for comparison).
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "auto",
        overlap: float | None = None,
        fast: bool = False,
        progress: Progress | None = None,
        network: nn.Module | None = None,
        optimize: bool = True,
        windows_per_pass: int | None = None,
        mirror: bool = False,
        backend: str = "torch",
        windows: str = DEFAULT_WINDOWS,
        export_everywhere: bool = False,
        backend_cache: Path | None = None,
    ) -> None:
        check_overlap(overlap)
        self.windows = check_windows(windows)
        self.export_everywhere = export_everywhere
        self.bundle = bundle
        self.device = resolve_device(device)
        metadata = bundle.metadata
        self.preprocessing = PreprocessingConfig.from_metadata(metadata.preprocessing)
        self.window = SlidingWindowConfig.from_metadata(metadata.preprocessing, metadata.inference, overlap)
        if windows_per_pass is None and self.device.type == "cpu":
            windows_per_pass = windows_fitting_memory(
                int(metadata.network["feat_size"][0]), self.window.patch_size, self.window.sw_batch_size
            )
        if windows_per_pass is not None:
            if windows_per_pass < 1:
                raise InputError(f"windows per pass {windows_per_pass}: expected a positive number")
            self.window = replace(self.window, sw_batch_size=windows_per_pass)
        self.progress = progress if progress is not None else Progress("none")
        self.out_chans = int(metadata.network["out_chans"])
        model = network
        if backend != "torch":
            model = self._backend_network(backend, network, optimize, fast, backend_cache)
        if model is None:
            model = bundle.build_network(device="cpu")
            if optimize:
                # Exact float32 rewrites; bf16 (fast) is the WindowPredictor's, on whichever device it runs.
                model = optimize_for_inference(model, self.device, InferenceOptions(), in_place=True)
        self.predictor = WindowPredictor(model, self.device, fast, mirror=mirror, channels=self.out_chans)
        self.fast = fast

    def _backend_network(
        self, backend: str, network: nn.Module | None, optimize: bool, fast: bool, cache: Path | None
    ) -> nn.Module:
        """The bundle's network exported to ``backend`` for the sliding windows' shape.

        Raises:
            InputError: a backend that is unknown, not installed, not on a CPU, or combined
                with ``network`` or ``optimize=False``.
        """
        from repux.accel.backends import BACKENDS, backend_available, backend_network, export_cache_key, use_export_cache

        if backend not in BACKENDS:
            raise InputError(f"--backend {backend}: expected torch or one of {', '.join(BACKENDS)}")
        if self.device.type != "cpu":
            raise InputError(f"--backend {backend}: runs on the CPU only; use --device cpu or --backend torch")
        if network is not None or not optimize:
            raise InputError(f"--backend {backend}: runs the bundle's optimized network (not with --plain-network)")
        if not backend_available(backend):
            raise InputError(f"--backend {backend}: not installed; pip install 'repux[cpu-backends]'")
        in_chans = int(self.bundle.metadata.network["in_chans"])
        if cache is not None:
            cache = use_export_cache(cache, export_cache_key(self.bundle.weights_path, self.window.patch_size, in_chans))
        return backend_network(
            self.bundle.build_network(device="cpu"),
            backend,
            self.window.patch_size,
            in_chans,
            precision="bfloat16" if fast and backend == "openvino" and native_bfloat16("cpu") else "float32",
            cache=cache,
        )

    def _require_memory(self, volume: Volume, probabilities: bool, review: bool, source: str) -> None:
        """Refuse a case whose volumes cannot fit in memory, before allocating any of them."""
        grid = plan_grids(volume, self.preprocessing)[2]
        padded = padded_shape(grid.shape, self.preprocessing.patch_size)
        needed = case_memory_bytes(
            input_voxels=volume.array.size,
            input_bytes=volume.array.nbytes,
            model_voxels=int(np.prod(grid.shape, dtype=np.float64)),
            padded_voxels=int(np.prod(padded, dtype=np.float64)),
            channels=self.out_chans,
            probabilities=probabilities,
            review_maps=review,
        )
        spacing = " x ".join(f"{s:g}" for s in volume.spacing)
        model = " x ".join(str(n) for n in grid.shape)
        require_memory(needed, source, f"{spacing} mm voxels make a {model} grid at the model's spacing")

    def segment(self, volume: Volume, source: str = "image") -> Volume:
        """Labels of ``volume`` on its own voxel grid (see :meth:`predict`)."""
        return self.predict(volume, source=source).labels

    def predict(
        self,
        volume: Volume,
        probabilities: bool = False,
        source: str = "image",
        review: bool = False,
        roi: RasBox | None = None,
    ) -> Prediction:
        """Segment ``volume`` (HU); ``source`` names it in errors.

        ``review``: also the confidence and entropy maps. ``roi``: segment only the voxels in
        this box, running only the windows of the whole-image window grid that reach them;
        inside the box every result equals the whole-image run's, bit for bit.

        Raises:
            InputError: NaN/Inf or constant images, images that need more memory than is
                available, a box holding no voxel of the image (naming ``source``).
            torch.OutOfMemoryError: only when even one window on the CPU does not fit.
        """
        check_image(volume, source)
        self._require_memory(volume, probabilities, review, source)
        region = None
        if roi is not None:
            region = roi_voxels(volume.shape, volume.affine, roi, source)
        notes: list[str] = []
        warnings = scan_warnings(volume, self.bundle.metadata, source)
        for warning in warnings:
            self.progress.warning(warning, source=source)
        if self.fast and not native_bfloat16(self.device):
            notes.append(f"--fast (bf16) is not native on {self.device} here; running in float32")
        seconds: dict[str, float] = {}

        start = time.perf_counter()
        self.progress.stage("preprocess")
        prepared = preprocess(volume, self.preprocessing, self.device)
        seconds["preprocess"] = time.perf_counter() - start

        start = time.perf_counter()
        image_shape = tuple(prepared.image.shape[2:])
        plan = plan_execution(image_shape, self.out_chans, self.window, self.device)
        windows, rows, mask = None, None, None
        if region is not None:
            # The region in the reoriented input grid: an index box again (exact permutation/flip).
            mask = region.mask(volume.shape)
            reoriented = np.asarray(prepared.reorientation.apply(mask))
            present = [np.flatnonzero(reoriented.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
            low, high = [int(p[0]) for p in present], [int(p[-1]) + 1 for p in present]
            rows = range(low[0], high[0])
            start_voxel, stop_voxel = _network_input_box(prepared, low, high)
            windows = windows_overlapping(window_grid(image_shape, self.window), start_voxel, stop_voxel)

        def retried(message: str) -> None:
            notes.append(message)
            self.progress.message(message)

        guided = None
        if region is None and self.windows == "organs":
            growth = growth_voxels(self.window, prepared.model_grid.spacing)
            probs, plan, guided = guided_probabilities(
                prepared.image, self.predictor, self.window, plan, growth, self.progress, retried
            )
        else:
            probs, plan = predict_probabilities(
                prepared.image, self.predictor, self.window, plan, self.progress, retried, windows=windows
            )
        seconds["infer"] = time.perf_counter() - start

        start = time.perf_counter()
        # Map back where the probabilities already are: the GPU when they were stitched there.
        exported = to_input_grid(
            probs,
            prepared,
            keep_probabilities=probabilities,
            progress=self.progress,
            review=review,
            only_rows=rows,
            everywhere=self.export_everywhere,
        )
        seconds["export"] = time.perf_counter() - start
        total = self.window.window_count(image_shape)
        if mask is not None:
            # Rows of the box hold whole planes of results; keep only the box's voxels.
            for array in (exported.labels, exported.confidence, exported.entropy):
                if array is not None:
                    array[~mask] = 0
            if exported.probabilities is not None:
                exported.probabilities[:, ~mask] = 0.0
        return Prediction(
            labels=volume.with_array(exported.labels),
            probabilities=exported.probabilities,
            plan=plan,
            windows=guided.windows_run if guided else len(windows) if windows is not None else total,
            windows_total=total,
            guided=guided,
            confidence=exported.confidence,
            entropy=exported.entropy,
            roi=mask,
            seconds=seconds,
            notes=notes,
            warnings=warnings,
        )


def _network_input_box(prepared: Preprocessed, low: list[int], high: list[int]) -> tuple[list[int], list[int]]:
    """The voxels of the network input that the export reads for the reoriented input voxels
    ``low`` .. ``high`` (exclusive): their positions on the crop, widened by the trilinear
    neighbours, shifted by the padding and clipped to the input."""
    corners = np.array([[i, j, k, 1.0] for i in (low[0], high[0] - 1) for j in (low[1], high[1] - 1) for k in (low[2], high[2] - 1)])
    crop: Grid = prepared.crop_grid
    positions = (np.linalg.inv(crop.affine) @ prepared.input_grid.affine @ corners.T)[:3]
    shape = prepared.image.shape[2:]
    start, stop = [], []
    for axis in range(3):
        first = int(np.floor(positions[axis].min())) - 1
        last = int(np.ceil(positions[axis].max())) + 2
        first = min(max(first, 0), prepared.crop_shape[axis]) + prepared.pad_before[axis]
        last = min(max(last, 0), prepared.crop_shape[axis]) + prepared.pad_before[axis]
        start.append(max(0, min(first, shape[axis])))
        stop.append(max(0, min(last, shape[axis])))
    return start, stop
