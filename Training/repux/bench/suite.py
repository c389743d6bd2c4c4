"""The speed and memory benchmark: reference and optimized paths on the same CT, in one run.

Steps (each measured path runs in its own process, see :mod:`.worker`):

1. the benchmark CT: ``make_phantom(seed, shape, spacing)`` (512 x 512 x 200 voxels of
   0.8 x 0.8 x 1.5 mm), written as NIfTI;
2. speed at a network preset's width with random weights (default: the paper's), with
   dense large kernels and with kernels zero outside the centre (as the published training
   leaves them): per-patch time of the plain and the optimized network taken in turn on
   the same windows, and end-to-end segmentation by each timed path
   (:mod:`~repux.bench.paths`). On a CPU the reference at the paper's width would take
   over an hour on the whole CT, so a region of it stands in (:data:`CPU_TIMING_REGION`,
   recorded in the report);
3. agreement with trained weights (bundles given by name or path): every path on the CT,
   per-label Dice between its label map and the reference's, largest probability difference.

Where the device computes bfloat16 natively (a CUDA GPU, a CPU with AMX or AVX-512 BF16) the
bfloat16 paths (:data:`~.paths.BFLOAT16`, :data:`~.paths.DEFAULT_BFLOAT16`) are timed and
compared too.

The headline (:func:`summarize`) is the fastest timed path whose labels agree with the
reference's at :data:`AGREEMENT_BAR` on every trained bundle.

``quick`` shrinks it to a few minutes on 2 cores: a half-resolution CT, dense kernels only,
no per-patch timing, and a region of four windows timed by the reference, the exact
optimized path and what ``repux segment`` does.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from repux.bench.agreement import AGREEMENT_BAR, label_dice, max_probability_difference
from repux.bench.paths import (
    ALL_WINDOWS,
    BFLOAT16,
    DEFAULT,
    DEFAULT_BFLOAT16,
    FEWER_WINDOWS,
    OPTIMIZED,
    REFERENCE,
    SegmentationPath,
)
from repux.bench.worker import run_task

__all__ = ["BenchmarkSettings", "FULL", "QUICK", "Region", "region_text", "run_benchmark", "summary_line"]

#: Voxel index ranges (i, j, k) of a CT: ((i0, i1), (j0, j1), (k0, k1)).
Region = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

#: Region of the 512 x 512 x 200 CT timed at the paper's width on a CPU: 72 mm of the
#: abdomen (one window high), all of the field of view along i and half of it along j, so
#: that the crops have air to remove as on a whole CT. 15 windows for the reference.
CPU_TIMING_REGION: Region = ((0, 512), (0, 256), (76, 124))
#: The same 72 mm in the quick run's half-resolution CT, 115 x 115 mm in-plane at the body's
#: edge along i (air, then body): four windows for the reference.
QUICK_TIMING_REGION: Region = ((40, 112), (60, 132), (38, 62))


@dataclass(frozen=True)
class BenchmarkSettings:
    """What the benchmark runs.

    Attributes:
        quick: the reduced version (named in reports).
        device: "cpu", "cuda", "cuda:N" or "auto".
        seed: phantom and random-weight seed.
        ct_shape, ct_spacing: the phantom CT's grid (voxels, mm).
        timing_preset: network preset timed with random weights (None: no such timing).
        timing_region: region of the CT used for that timing (None: the whole CT).
        timing_kernels: large kernels timed: "dense" and/or "centre" (zero outside the centre).
        timing_paths: paths timed end to end with random weights (the reference first).
        models: trained bundles (names or folders) for agreement (and their own speed).
        agreement_region: region of the CT for agreement (None: the whole CT).
        patch_reps: per-patch timings of each network (medians reported; 0: none).
        paths: the paths compared on trained bundles (the reference first).
    """

    quick: bool = False
    device: str = "auto"
    seed: int = 0
    ct_shape: tuple[int, int, int] = (512, 512, 200)
    ct_spacing: tuple[float, float, float] = (0.8, 0.8, 1.5)
    timing_preset: str | None = "paper"
    timing_region: Region | None = CPU_TIMING_REGION
    timing_kernels: tuple[str, ...] = ("dense", "centre")
    timing_paths: tuple[SegmentationPath, ...] = (REFERENCE, OPTIMIZED, DEFAULT, FEWER_WINDOWS)
    models: tuple[str, ...] = ("demo",)
    agreement_region: Region | None = None
    patch_reps: int = 3
    paths: tuple[SegmentationPath, ...] = (REFERENCE, OPTIMIZED, DEFAULT, ALL_WINDOWS, FEWER_WINDOWS)


FULL = BenchmarkSettings()
#: The same field of view at half the resolution along each axis.
QUICK = BenchmarkSettings(
    quick=True,
    ct_shape=(256, 256, 100),
    ct_spacing=(1.6, 1.6, 3.0),
    timing_region=QUICK_TIMING_REGION,
    timing_kernels=("dense",),
    timing_paths=(REFERENCE, OPTIMIZED, DEFAULT),
    patch_reps=0,
)


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_description(device: str) -> dict[str, Any]:
    """CPU model, cores, load, torch build and accelerator, for the report."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device,
    }
    from repux.accel import native_bfloat16

    info["native_bfloat16_cpu"] = native_bfloat16("cpu")
    return info


def _crop_region(volume: Any, region: Region | None) -> Any:
    """The voxels of ``region`` of ``volume``, with their true position in space."""
    from repux.imageio import Volume

    if region is None:
        return volume
    for (start, stop), size, axis in zip(region, volume.shape, "ijk"):
        if not 0 <= start < stop <= size:
            raise ValueError(f"region {start}:{stop} along {axis} outside the CT's {size} voxels")
    starts = np.array([start for start, _ in region], dtype=float)
    offset = np.asarray(volume.direction, dtype=float) @ (np.asarray(volume.spacing) * starts)
    return Volume(
        np.ascontiguousarray(volume.array[tuple(slice(a, b) for a, b in region)]),
        volume.spacing,
        tuple(float(v) for v in np.asarray(volume.origin) + offset),
        volume.direction,
    )


def region_text(region: Region | None) -> str:
    """``i0:i1,j0:j1,k0:k1``, or "all"."""
    return "all" if region is None else ",".join(f"{a}:{b}" for a, b in region)


def _random_bundle(preset: str, kernels: str, seed: int, folder: Path) -> Path:
    """A bundle of the preset's network with random weights; ``kernels`` "dense" or "centre"."""
    import torch

    from repux.bundle import BundleMetadata, label_preset, save_bundle
    from repux.network import NETWORK_PRESETS, build_network, large_kernel_convs

    torch.manual_seed(seed)
    config = dict(NETWORK_PRESETS[preset])
    arch = config.pop("arch")
    labels = label_preset("flare")
    network = build_network(arch, **config, out_chans=len(labels))
    if kernels == "centre":
        with torch.no_grad():
            for _, conv in large_kernel_convs(network):
                centre = conv.kernel_size[0] // 2
                kept = conv.weight[..., centre, centre, centre].clone()
                conv.weight.zero_()
                conv.weight[..., centre, centre, centre] = kept
    described = dict(network.config)
    described.pop("arch")
    metadata = BundleMetadata(
        name=f"random-{preset}-{kernels}",
        architecture=arch,
        network=described,
        labels=labels,
        description=f"random weights ({kernels} large kernels) for timing only",
    )
    return save_bundle(network, metadata, folder / f"{preset}-{kernels}", force=True)


def _segment(
    bundle: Path | str, image: Path, path: SegmentationPath, device: str, out: Path | None, stem: str, probabilities: bool
) -> dict[str, Any]:
    """One path's end-to-end run in a worker; with ``out``, its labels (and probabilities) are kept there."""
    task = {
        "kind": "segment",
        "bundle": str(bundle),
        "image": str(image),
        "path": path.to_json(),
        "device": device,
        "labels_out": str(out / f"{stem}-labels.npy") if out else None,
        "probabilities_out": str(out / f"{stem}-probabilities.npy") if out and probabilities else None,
    }
    _log(f"{path.name}: {image.name} with {bundle}" + (", keeping the probabilities" if probabilities else ""))
    result = run_task(task, env=path.environment())
    result["end_to_end_s"] = result["load_s"] + result["segment_s"]
    _log(
        f"  {result['windows']} of {result['windows_total']} windows, {result['end_to_end_s']:.1f} s, "
        f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    return result


def _run_paths(
    bundle: Path | str, image: Path, paths: tuple[SegmentationPath, ...], device: str, out: Path | None
) -> list[dict[str, Any]]:
    """Every path on ``image`` (the reference first); speed-ups relative to the reference.

    With ``out``, each path first runs keeping its probabilities there for the comparison
    (which makes the export resample every class everywhere), then again keeping only its
    labels, as ``repux segment`` does: that second run is the one timed and compared by label.
    """
    runs = []
    for index, path in enumerate(paths):
        with_probabilities = _segment(bundle, image, path, device, out, f"path{index}", True) if out else None
        run = _segment(bundle, image, path, device, out, f"path{index}", False)
        if with_probabilities:
            run["with_probabilities"] = {key: with_probabilities[key] for key in ("end_to_end_s", "peak_rss_bytes")}
        runs.append(run)
    for run in runs:
        run["speedup"] = runs[0]["end_to_end_s"] / run["end_to_end_s"]
    return runs


def _timing(settings: BenchmarkSettings, image: Path, work: Path) -> list[dict[str, Any]]:
    results = []
    for kernels in settings.timing_kernels:
        bundle = _random_bundle(settings.timing_preset, kernels, settings.seed, work)
        entry: dict[str, Any] = {"kernels": kernels, "patch": None}
        if settings.patch_reps > 0:
            _log(f"per-patch timing, {settings.timing_preset} width, {kernels} kernels")
            entry["patch"] = _patch_timing(bundle, kernels, settings)
        entry["runs"] = _run_paths(bundle, image, settings.timing_paths, settings.device, None)
        results.append(entry)
    return results


def _patch_timing(bundle: Path, kernels: str, settings: BenchmarkSettings) -> dict[str, Any]:
    """The plain and the optimized network on the same 96^3 windows, in turn (per-layer times for dense kernels)."""
    task = {
        "kind": "patch",
        "bundle": str(bundle),
        "device": settings.device,
        "patch": [96, 96, 96],
        "batch": 1,
        "reps": settings.patch_reps,
        "layers": kernels == "dense",
        "seed": settings.seed,
    }
    patch = run_task(task)
    patch["median_s"] = {name: statistics.median(times) for name, times in patch["seconds"].items()}
    return patch


def _agreement(settings: BenchmarkSettings, image: Path, work: Path) -> list[dict[str, Any]]:
    from repux.bundle import load_bundle

    results = []
    for model in settings.models:
        bundle = load_bundle(model)
        labels = len(bundle.labels)
        out = Path(tempfile.mkdtemp(prefix="agreement-", dir=work))
        runs = _run_paths(bundle.path, image, settings.paths, settings.device, out)
        reference_labels = np.load(out / "path0-labels.npy")
        for index, run in enumerate(runs):
            other = np.load(out / f"path{index}-labels.npy")
            run["dice"] = label_dice(reference_labels, other, labels)
            run["max_probability_difference"] = max_probability_difference(
                out / "path0-probabilities.npy", out / f"path{index}-probabilities.npy"
            )
            _log(f"  {run['path']['name']}: Dice per label {[round(d, 4) for d in run['dice']]}")
        results.append(
            {
                "model": model,
                "bundle": str(bundle.path),
                "network": bundle.metadata.network,
                "spacing": bundle.metadata.preprocessing["spacing"],
                "patch_size": bundle.metadata.preprocessing["patch_size"],
                "labels": [label.name for label in bundle.labels],
                "label_voxels": [int((reference_labels == value).sum()) for value in range(1, labels)],
                "runs": runs,
            }
        )
        for file in out.iterdir():
            file.unlink()
        out.rmdir()
    return results


def run_benchmark(settings: BenchmarkSettings, work: Path, command: str = "") -> dict[str, Any]:
    """Run every step of the benchmark in ``work`` (a scratch folder); the results as a dict."""
    from repux.accel import native_bfloat16
    from repux.data.phantoms import make_phantom
    from repux.imageio import write_volume
    from repux.infer import resolve_device

    device = str(resolve_device(settings.device))
    settings = replace(settings, device=device)
    if native_bfloat16(device):  # measured only where it is a speed-up
        bfloat16 = (BFLOAT16, DEFAULT_BFLOAT16)
        settings = replace(settings, paths=settings.paths + bfloat16, timing_paths=settings.timing_paths + bfloat16)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": command,
        "settings": {
            **asdict(settings),
            "paths": [path.to_json() for path in settings.paths],
            "timing_paths": [path.to_json() for path in settings.timing_paths],
        },
        "machine": machine_description(device),
        "paths": {path.name: path.describe() for path in settings.paths + settings.timing_paths},
    }
    _log(f"benchmark CT: phantom seed {settings.seed}, {settings.ct_shape} voxels of {settings.ct_spacing} mm")
    ct, _ = make_phantom(settings.seed, shape=settings.ct_shape, spacing=settings.ct_spacing)
    images = {}
    for role, region, needed in (
        ("timing", settings.timing_region, settings.timing_preset is not None),
        ("agreement", settings.agreement_region, bool(settings.models)),
    ):
        if not needed:
            continue
        name = "ct" if region is None else "ct-region-" + region_text(region).replace(":", "-").replace(",", "_")
        images[role] = work / f"{name}.nii.gz"
        if not images[role].exists():
            write_volume(_crop_region(ct, region), images[role], overwrite=True)
    del ct
    if settings.timing_preset is not None:
        results["timing"] = _timing(settings, images["timing"], work)
    if settings.models:
        results["agreement"] = _agreement(settings, images["agreement"], work)
    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["wall_s"] = time.perf_counter() - started
    results["summary"] = summarize(results)
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The headline: the fastest timed path whose labels agree with the reference's.

    Agreement of a path is its lowest per-label Dice over the trained bundles; a path
    qualifies at :data:`AGREEMENT_BAR`. Speed-ups are end to end: at the timed width with
    the first timed kernels for the paths timed there, else on the first trained bundle
    (organ-guided windows only mean something with trained weights: a random network's
    "organs" are anywhere); ``speedup_measured_on`` says which for each path.
    When no path qualifies (or no bundle measured agreement), the first path after the
    reference, which computes the reference's windows exactly, is reported.
    """
    names = [path["name"] for path in results["settings"]["paths"]]
    agreement = {
        name: min(
            (d for entry in results.get("agreement", []) for d in entry["runs"][index]["dice"]),
            default=math.nan,
        )
        for index, name in enumerate(names)
    }
    speedups: dict[str, float] = {}
    measured_on: dict[str, str] = {}
    sources = [("timing", results["timing"][0]["runs"])] if results.get("timing") else []
    sources += [(entry["model"], entry["runs"]) for entry in results.get("agreement", [])[:1]]
    for source, runs in sources:
        for run in runs[1:]:
            if run["path"]["name"] not in speedups:
                speedups[run["path"]["name"]] = run["speedup"]
                measured_on[run["path"]["name"]] = source
    qualified = [name for name in speedups if agreement.get(name, math.nan) >= AGREEMENT_BAR]
    chosen = max(qualified, key=speedups.__getitem__) if qualified else next(iter(speedups))
    return {
        "path": chosen,
        "speedup": speedups[chosen],
        "agreement": agreement.get(chosen, math.nan),
        "qualified": bool(qualified),
        "agreement_per_path": agreement,
        "speedup_per_path": speedups,
        "speedup_measured_on": measured_on,
    }


def summary_line(results: dict[str, Any]) -> str:
    """``speedup X.XX agreement Y.YYYY`` (the last line ``repux bench`` prints)."""
    summary = results["summary"]
    return f"speedup {summary['speedup']:.2f} agreement {summary['agreement']:.4f}"
