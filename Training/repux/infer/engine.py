"""The inference engine: a bundle's network applied to a volume, labels on the input's grid.

:class:`Segmenter` chains the three stages, each in its own module:
:mod:`~repux.infer.preprocess` (input -> network input on the model grid),
:mod:`~repux.infer.predict` (sliding-window probabilities) and
:mod:`~repux.infer.export` (probabilities -> labels on the input's exact voxel grid).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from repux.accel import InferenceOptions, native_bfloat16, optimize_for_inference
from repux.bundle import Bundle
from repux.errors import InputError
from repux.imageio import Volume
from repux.infer.export import to_input_grid
from repux.infer.predict import (
    ExecutionPlan,
    SlidingWindowConfig,
    WindowPredictor,
    plan_execution,
    predict_probabilities,
    windows_fitting_memory,
)
from repux.infer.memory import case_memory_bytes, require_memory
from repux.infer.preprocess import PreprocessingConfig, check_image, padded_shape, plan_grids, preprocess
from repux.infer.scan_check import scan_warnings
from repux.options import DEVICE_CHOICES, check_overlap
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
        plan: the execution plan that succeeded (device, stitching device, windows per pass).
        windows: number of sliding windows.
        seconds: wall time per stage ("preprocess", "infer", "export").
        notes: messages worth showing (out-of-memory retries, ignored options).
        warnings: why the scan does not look like the model's training scans
            (:func:`~repux.infer.scan_check.scan_warnings`); already reported to the progress.
    """

    labels: Volume
    probabilities: np.ndarray | None
    plan: ExecutionPlan
    windows: int
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
        backend: "torch", or "openvino": the optimized network exported to OpenVINO
            (:mod:`repux.accel.backends`; CPU only; bfloat16 with ``fast`` where native).
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
        backend: str = "torch",
    ) -> None:
        check_overlap(overlap)
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
            model = self._backend_network(backend, network, optimize, fast)
        if model is None:
            model = bundle.build_network(device="cpu")
            if optimize:
                # Exact float32 rewrites; bf16 (fast) is the WindowPredictor's, on whichever device it runs.
                model = optimize_for_inference(model, self.device, InferenceOptions())
        self.predictor = WindowPredictor(model, self.device, fast)
        self.fast = fast

    def _backend_network(self, backend: str, network: nn.Module | None, optimize: bool, fast: bool) -> nn.Module:
        """The bundle's network exported to ``backend`` for the sliding windows' shape.

        Raises:
            InputError: a backend that is unknown, not installed, not on a CPU, or combined
                with ``network`` or ``optimize=False``.
        """
        from repux.accel.backends import BACKENDS, backend_available, backend_network

        if backend not in BACKENDS:
            raise InputError(f"--backend {backend}: expected torch or one of {', '.join(BACKENDS)}")
        if self.device.type != "cpu":
            raise InputError(f"--backend {backend}: runs on the CPU only; use --device cpu or --backend torch")
        if network is not None or not optimize:
            raise InputError(f"--backend {backend}: runs the bundle's optimized network (not with --plain-network)")
        if not backend_available(backend):
            raise InputError(f"--backend {backend}: not installed; pip install 'repux[cpu-backends]'")
        metadata = self.bundle.metadata
        return backend_network(
            self.bundle.build_network(device="cpu"),
            backend,
            self.window.patch_size,
            int(metadata.network["in_chans"]),
            precision="bfloat16" if fast and backend == "openvino" and native_bfloat16("cpu") else "float32",
        )

    def _require_memory(self, volume: Volume, probabilities: bool, source: str) -> None:
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
        )
        spacing = " x ".join(f"{s:g}" for s in volume.spacing)
        model = " x ".join(str(n) for n in grid.shape)
        require_memory(needed, source, f"{spacing} mm voxels make a {model} grid at the model's spacing")

    def segment(self, volume: Volume, source: str = "image") -> Volume:
        """Labels of ``volume`` on its own voxel grid (see :meth:`predict`)."""
        return self.predict(volume, source=source).labels

    def predict(self, volume: Volume, probabilities: bool = False, source: str = "image") -> Prediction:
        """Segment ``volume`` (HU); ``source`` names it in errors.

        Raises:
            InputError: NaN/Inf or constant images, or images that need more memory than is
                available (naming ``source``).
            torch.OutOfMemoryError: only when even one window on the CPU does not fit.
        """
        check_image(volume, source)
        self._require_memory(volume, probabilities, source)
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
        plan = plan_execution(tuple(prepared.image.shape[2:]), self.out_chans, self.window, self.device)

        def retried(message: str) -> None:
            notes.append(message)
            self.progress.message(message)

        probs, plan = predict_probabilities(prepared.image, self.predictor, self.window, plan, self.progress, retried)
        seconds["infer"] = time.perf_counter() - start

        start = time.perf_counter()
        # Map back where the probabilities already are: the GPU when they were stitched there.
        labels, kept = to_input_grid(probs, prepared, keep_probabilities=probabilities, progress=self.progress)
        seconds["export"] = time.perf_counter() - start
        return Prediction(
            labels=volume.with_array(labels),
            probabilities=kept,
            plan=plan,
            windows=self.window.window_count(tuple(prepared.image.shape[2:])),
            seconds=seconds,
            notes=notes,
            warnings=warnings,
        )
