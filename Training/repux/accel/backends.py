"""Other CPU runtimes for the optimized network: ONNX Runtime and OpenVINO, optionally 8-bit.

:func:`backend_network` exports :func:`~.optimize.optimize_for_inference`'s rewrite of a
network to ONNX for one window shape and returns a :class:`BackendNetwork`: an
``nn.Module`` with the network's call ((B, C_in, D, H, W) -> (B, C_out, D, H, W) float32
logits) that a :class:`~repux.infer.predict.WindowPredictor` runs like any other network.
Windows holding one value are computed once (:class:`~.constant_inputs.ConstantInputMemo`),
as in the torch path.

What is exported is the exact rewrite with the depthwise kernels as direct convolutions
(the FFT is not an ONNX operator) and contiguous activations (channels-last is a PyTorch
memory format; the runtimes pick their own layouts). ``quantize=True`` adds 8-bit
post-training quantization of the dense convolutions (ONNX Runtime's static quantizer,
QDQ format, per-channel weights), calibrated on windows the caller provides (phantoms).

An export costs 10-45 s (the trace, and OpenVINO's compilation), so a caller that runs the
same network again passes a ``cache`` folder (:func:`export_cache_key` names one per weights
and window shape): the ONNX file is written there once, atomically, and OpenVINO keeps its
compiled network there (its ``CACHE_DIR``); later builds read both instead.
:func:`use_export_cache` picks that folder in a cache of many and deletes all but the most
recently used few, so the exports of replaced or removed models do not pile up.

The runtimes are the optional extra ``cpu-backends`` (``pip install repux[cpu-backends]``);
:func:`backend_available` says whether one is installed. The optimized network runs on the
CPU only here: the runtimes' GPU builds are not part of that extra.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from repux.atomic import atomic_path

from .constant_inputs import ConstantInputMemo
from .depthwise import DepthwiseConv3d
from .kernel_support import centre_crop
from .optimize import InferenceOptions, optimize_for_inference

__all__ = [
    "BACKENDS",
    "BackendNetwork",
    "backend_available",
    "backend_network",
    "export_cache_key",
    "export_onnx",
    "quantize_dense_convolutions",
    "use_export_cache",
]

#: Runtimes :func:`backend_network` can use, and the module each needs.
BACKENDS = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
#: ONNX opset of the export (InstanceNormalization, Conv, ConvTranspose: all old operators).
ONNX_OPSET = 17
#: What the export keeps of the rewrites: exact, and expressible in ONNX.
EXPORT_OPTIONS = InferenceOptions(depthwise="direct", channels_last=False, reuse_constant_windows=False)


def backend_available(backend: str) -> bool:
    """Whether ``backend``'s runtime (and ``onnx``, which the export needs) is installed."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return all(importlib.util.find_spec(name) is not None for name in (BACKENDS[backend], "onnx"))


def _fixed_depthwise(network: nn.Module, example: torch.Tensor) -> None:
    """Replace each :class:`~.depthwise.DepthwiseConv3d` by the plain Conv3d it runs for ``example``.

    The exporter cannot follow a kernel cropped at run time (its shape is unknown to the
    trace), so the crop for this window shape is made once, here.
    """
    sizes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            sizes[name] = tuple(inputs[0].shape[2:])

        return hook

    # Shapes only: a copy on the meta device computes no values.
    shapes_only = copy.deepcopy(network).to("meta")
    for name, module in shapes_only.named_modules():
        if isinstance(module, DepthwiseConv3d):
            module.register_forward_pre_hook(record(name))
    shapes_only(example.to("meta"))
    for name, size in sizes.items():
        parent_name, _, child = name.rpartition(".")
        depthwise = network.get_submodule(name)
        _, kernel = depthwise.plan(size)
        weight = centre_crop(depthwise.weight, kernel)
        conv = nn.Conv3d(
            weight.shape[0], weight.shape[0], kernel, padding=tuple(k // 2 for k in kernel),
            groups=weight.shape[0], bias=depthwise.bias is not None,
        )
        conv.weight.data.copy_(weight)
        if depthwise.bias is not None:
            conv.bias.data.copy_(depthwise.bias)
        setattr(network.get_submodule(parent_name) if parent_name else network, child, conv)


def export_onnx(network: nn.Module, window: tuple[int, ...], in_chans: int, path: Path) -> Path:
    """Write the exact rewrite of ``network`` for windows of spatial shape ``window`` to ``path``.

    The batch axis is dynamic; the spatial shape is fixed (the depthwise kernels are cropped
    to the taps that reach a window of that shape).
    """
    rewritten = optimize_for_inference(network, "cpu", EXPORT_OPTIONS).network
    example = torch.zeros((1, in_chans, *window))
    with torch.no_grad(), warnings.catch_warnings():
        # The trace's warnings are about Python checks of shapes, fixed for one window shape
        # by design, and the TorchScript exporter's deprecation notice.
        warnings.simplefilter("ignore")
        _fixed_depthwise(rewritten, example)
        torch.onnx.export(
            rewritten,
            (example,),
            str(path),
            input_names=["windows"],
            output_names=["logits"],
            dynamic_axes={"windows": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return path


def export_cache_key(weights: Path, window: tuple[int, ...], in_chans: int) -> str:
    """A name for the export of the network in ``weights`` (a file) for windows of shape ``window``.

    It changes with the weights' bytes, the window, the input channels and the versions of
    everything that shapes the export (repux, torch, the ONNX opset).
    """
    import repux

    digest = hashlib.sha256()
    with open(weights, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    recipe = {"window": list(window), "in_chans": in_chans, "opset": ONNX_OPSET, "repux": repux.__version__, "torch": torch.__version__}
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    return digest.hexdigest()[:32]


#: Exports a cache keeps, the most recently used: each is as large as the weights or more
#: (the ONNX file, and OpenVINO's compiled network), hundreds of MB at the paper's width.
EXPORTS_KEPT = 4


def use_export_cache(root: Path, key: str, keep: int = EXPORTS_KEPT) -> Path:
    """The folder ``root/key`` (see :func:`export_cache_key`), marked as used now; of the others
    in ``root`` (folders named like a key; nothing else is touched) only the ``keep - 1`` most
    recently used are kept.

    An export is used when its folder's time is set, here; one that another process is
    writing was used just now, so it is never the one deleted.
    """
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)
    # Only folders named as export_cache_key names them: nothing else in ``root`` is ours to delete.
    others = [p for p in root.iterdir() if p.is_dir() and p != folder and re.fullmatch(r"[0-9a-f]{32}", p.name)]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[max(keep - 1, 0) :]:
        trash = root / f".{old.name}.removing-{uuid.uuid4().hex[:8]}"
        try:  # renamed first, so no half-deleted export is ever read under its key
            os.replace(old, trash)
        except OSError:  # another process pruned it, or (Windows) has it open: left for the next run
            continue
        shutil.rmtree(trash, ignore_errors=True)
    return folder


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over a list of (1, C, D, H, W) windows."""

    def __init__(self, windows: Iterable[np.ndarray]) -> None:
        self._windows = iter([{"windows": np.ascontiguousarray(w, dtype=np.float32)} for w in windows])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._windows, None)


def _dense_convolutions(model_path: Path) -> list[str]:
    """Names of the Conv nodes whose group is 1 (the depthwise ones are left in float32)."""
    import onnx

    names = []
    for node in onnx.load(str(model_path)).graph.node:
        if node.op_type != "Conv":
            continue
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        if group == 1:
            names.append(node.name)
    return names


def quantize_dense_convolutions(model_path: Path, calibration: Iterable[np.ndarray], out_path: Path) -> Path:
    """8-bit copy of an exported model: dense convolutions in int8 (QDQ), the rest float32.

    Activations are quantized per tensor (unsigned, ranges from ``calibration`` windows by
    min-max), weights per output channel (signed, symmetric).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(model_path),
        str(out_path),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_quantize=_dense_convolutions(model_path),
        op_types_to_quantize=["Conv"],
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out_path


def _onnxruntime_runner(model_path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return lambda windows: session.run(["logits"], {"windows": windows})[0]


def _openvino_runner(
    model_path: Path, threads: int, precision: str, cache: Path | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    import openvino

    core = openvino.Core()
    # Latency hint: one request uses every core. The precision hint is set explicitly
    # because OpenVINO silently computes in bf16 on CPUs with AVX-512 BF16 or AMX.
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": precision,
    }
    if cache is not None:
        # Compiled from the file's path, a cached blob (keyed by the file and this config) is
        # imported without reading or compiling the model again.
        config["CACHE_DIR"] = str(cache)
        compiled = core.compile_model(str(model_path), "CPU", config)
    else:
        compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
    request = compiled.create_infer_request()

    def run(windows: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: windows})[compiled.output(0)])

    return run


def _runner(
    backend: str, model_path: Path, threads: int, precision: str, compiled_cache: Path | None
) -> Callable[[np.ndarray], np.ndarray]:
    if backend == "onnxruntime":
        return _onnxruntime_runner(model_path, threads)
    return _openvino_runner(model_path, threads, "f32" if precision == "float32" else "bf16", compiled_cache)


class BackendNetwork(nn.Module):
    """A network exported to another runtime, behind the torch network's call.

    Forward: (B, C_in, D, H, W) float32 (any device; computed on the CPU) -> (B, C_out, D, H, W)
    float32 on the input's device. Constant windows are computed once.

    Attributes:
        backend: "onnxruntime" or "openvino".
        description: the runtime, precision and quantization, for reports.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], backend: str, description: str) -> None:
        super().__init__()
        self._run = run
        self.backend = backend
        self.description = description
        self.constant_inputs = ConstantInputMemo()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        windows = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self._run(windows)).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.constant_inputs(self._logits, x)


def backend_network(
    network: nn.Module,
    backend: str,
    window: tuple[int, ...],
    in_chans: int = 1,
    quantize: bool = False,
    calibration: Iterable[np.ndarray] | None = None,
    precision: str = "float32",
    threads: int | None = None,
    workdir: Path | None = None,
    cache: Path | None = None,
) -> BackendNetwork:
    """``network`` (a RepUX-Net or 3D UX-Net, float32) running on ``backend`` for windows of shape ``window``.

    Args:
        network: the plain network (left unchanged; its exact rewrite is exported).
        backend: "onnxruntime" or "openvino".
        window: spatial window shape (D, H, W), the sliding window's patch size.
        in_chans: input channels.
        quantize: int8 dense convolutions, calibrated on ``calibration`` (required then).
        calibration: (1, in_chans, *window) float32 windows, preprocessed like the network's inputs.
        precision: OpenVINO's inference precision, "float32" or "bfloat16" (ONNX Runtime: float32 only).
        threads: compute threads (default: torch's).
        workdir: where the ONNX files go (default: a temporary folder removed once loaded).
        cache: a folder for this network and window (see :func:`export_cache_key`): its ONNX
            file is read from there, or exported there once; OpenVINO keeps its compiled
            network there. Not with ``quantize``, whose calibration the key does not cover.

    Raises:
        ImportError: the backend's runtime is not installed (the ``cpu-backends`` extra).
        ValueError: unknown backend or precision, or ``quantize`` without calibration windows.
    """
    if not backend_available(backend):
        raise ImportError(f"backend {backend!r} needs {BACKENDS[backend]} and onnx: pip install 'repux[cpu-backends]'")
    if precision not in ("float32", "bfloat16") or (backend == "onnxruntime" and precision != "float32"):
        raise ValueError(f"precision {precision!r} with backend {backend!r}: expected float32 (or bfloat16 on openvino)")
    if quantize and calibration is None:
        raise ValueError("quantize=True needs calibration windows")
    if quantize and cache is not None:
        raise ValueError("quantize=True with a cache: the cache key does not cover the calibration")
    threads = threads or torch.get_num_threads()
    description = f"{backend}, {precision}" + (", int8 dense convolutions" if quantize else "")
    if cache is not None:
        model_path = cache / "network.onnx"
        if not model_path.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_path(model_path, overwrite=True) as temporary:
                export_onnx(network, tuple(window), in_chans, Path(temporary))
        return BackendNetwork(_runner(backend, model_path, threads, precision, cache / "openvino"), backend, description)
    with tempfile.TemporaryDirectory(prefix="repux-onnx-", dir=workdir) as folder:
        model_path = export_onnx(network, tuple(window), in_chans, Path(folder) / "network.onnx")
        if quantize:
            model_path = quantize_dense_convolutions(model_path, calibration, Path(folder) / "network-int8.onnx")
        run = _runner(backend, model_path, threads, precision, None)  # loaded: the files may go
    return BackendNetwork(run, backend, description)
