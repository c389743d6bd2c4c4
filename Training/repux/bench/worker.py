"""One benchmark measurement in a fresh process, so that its wall time and peak memory are its own.

The parent calls :func:`run_task`; the child (``python -m repux.bench.worker``) reads the
task as JSON on stdin and prints its result as one JSON line on stdout. Tasks:

- ``segment``: build a :class:`~repux.bench.paths.SegmentationPath`'s segmenter and
  segment one image; wall times (loading, each engine stage), CPU time (user + system,
  all threads: steadier than wall time on a shared machine), window count, peak RSS (and
  peak CUDA memory); labels and probabilities saved as ``.npy`` when asked.
- ``patch``: the plain and the optimized network on the same random windows, in turn,
  ``reps`` times (medians taken by the caller), plus one timing per layer of each.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

__all__ = ["WorkerError", "run_task"]


class WorkerError(RuntimeError):
    """A benchmark worker process failed (the message ends with its standard error)."""


def run_task(task: dict[str, Any], env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run ``task`` in a fresh Python process with ``env`` added to this one's environment."""
    environment = {**os.environ, **(env or {})}
    completed = subprocess.run(
        [sys.executable, "-m", "repux.bench.worker"],
        input=json.dumps(task),
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        tail = completed.stderr.strip()[-2000:]
        raise WorkerError(f"benchmark worker for {task.get('kind')} failed (exit {completed.returncode}): {tail}")
    return json.loads(lines[-1])


def _peak_memory(device: Any) -> dict[str, int | None]:
    import torch

    # ru_maxrss is in kilobytes on Linux.
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cuda_peak_bytes": None}
    if device.type == "cuda":
        peak["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return peak


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _segment(task: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from repux.bench.paths import SegmentationPath, build_segmenter
    from repux.bundle import load_bundle
    from repux.imageio import read_volume
    from repux.infer import resolve_device

    device = resolve_device(task["device"])
    path = SegmentationPath.from_json(task["path"])
    volume = read_volume(task["image"])
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    bundle = load_bundle(task["bundle"])
    segmenter = build_segmenter(bundle, path, device)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    prediction = segmenter.predict(volume, probabilities=bool(task.get("probabilities_out")))
    segment_s = time.perf_counter() - start
    cpu_s = _cpu_seconds() - cpu_start
    result = {
        "path": path.to_json(),
        "device": str(device),
        "load_s": load_s,
        "segment_s": segment_s,
        "cpu_s": cpu_s,
        "stages_s": prediction.seconds,
        "windows": prediction.windows,
        "windows_total": prediction.windows_total,
        "notes": prediction.notes,
        **_peak_memory(device),
    }
    if task.get("labels_out"):
        np.save(task["labels_out"], prediction.labels.array)
    if task.get("probabilities_out"):
        np.save(task["probabilities_out"], prediction.probabilities)
    return result


def _layer_times(network: Any, x: Any) -> dict[str, float]:
    """Seconds per leaf module in one forward pass of ``network`` on ``x``."""
    times: dict[str, float] = collections.defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for name, module in network.named_modules():
        if next(module.children(), None) is not None:
            continue

        def before(_module: Any, _inputs: Any, name: str = name) -> None:
            starts[name] = time.perf_counter()

        def after(_module: Any, _inputs: Any, _output: Any, name: str = name) -> None:
            times[name] += time.perf_counter() - starts[name]

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    network(x)
    for handle in handles:
        handle.remove()
    return dict(times)


def _patch(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    from repux.accel import InferenceOptions, optimize_for_inference
    from repux.bundle import load_bundle
    from repux.infer import resolve_device

    device = resolve_device(task["device"])
    plain = load_bundle(task["bundle"]).build_network(device)
    start = time.perf_counter()
    optimized = optimize_for_inference(plain, device, InferenceOptions())
    optimize_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(int(task.get("seed", 0)))
    windows = torch.rand((int(task["batch"]), plain.in_chans, *task["patch"]), generator=generator).to(device)
    networks = {"plain": plain, "optimized": optimized}
    seconds: dict[str, list[float]] = {name: [] for name in networks}

    def timed(network: Any) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        network(windows)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        expected = plain(windows)
        start = time.perf_counter()
        got = optimized(windows)  # the first call also computes the cached kernel spectra
        first_call_s = time.perf_counter() - start
        difference = float((got - expected).abs().max())
        scale = float(expected.abs().max())
        for _ in range(int(task["reps"])):
            for name, network in networks.items():
                seconds[name].append(timed(network))
        layers = (
            {name: _layer_times(network, windows) for name, network in networks.items()} if task.get("layers") else {}
        )
    return {
        "device": str(device),
        "batch": int(task["batch"]),
        "patch": list(task["patch"]),
        "seconds": seconds,
        "optimize_s": optimize_s,
        "optimized_first_call_s": first_call_s,
        "max_logit_difference": difference,
        "max_logit": scale,
        "report": str(optimized.report),
        "layers": layers,
        **_peak_memory(device),
    }


def main() -> None:
    task = json.loads(sys.stdin.read())
    kinds = {"segment": _segment, "patch": _patch}
    if task.get("kind") not in kinds:
        raise SystemExit(f"unknown benchmark task kind {task.get('kind')!r}: expected one of {', '.join(kinds)}")
    result = kinds[task["kind"]](task)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
