"""Per-window time of the optimized network on torch, ONNX Runtime and OpenVINO, float32, bf16 and int8.

    python benchmarks/cpu_backends.py [--width demo|paper] [--reps 2] [--out benchmarks/results/cpu_backends-WIDTH.json]

``demo``: the shipped demo model (48^3 windows); ``paper``: the paper's widths with random
dense kernels (96^3 windows). Each variant is built once (export to ONNX and the runtime's
compilation: ``build_s``), then every variant runs the same window in turn, ``--reps``
rounds (medians reported), so that load on a shared machine hits all alike. The logits are
compared with torch's float32 rewrite (largest difference, and the share of voxels whose
argmax differs). int8 is calibrated on phantom windows (seeds 101, 102), not the timed window.
End-to-end times and label agreement are ``repux bench --cpu-backends``'s.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from repux.accel import InferenceOptions, native_bfloat16, optimize_for_inference
from repux.accel.backends import backend_network
from repux.atomic import atomic_path
from repux.bench.paths import phantom_calibration_windows
from repux.bench.suite import machine_description
from repux.bundle import load_bundle

HERE = Path(__file__).resolve().parent


def _network(width: str) -> tuple[torch.nn.Module, tuple[int, ...], object]:
    """The network, its window and a bundle (for calibration) of ``width``."""
    if width == "demo":
        bundle = load_bundle("demo")
        return bundle.build_network("cpu").eval(), tuple(bundle.metadata.preprocessing["patch_size"]), bundle
    import tempfile

    from repux.bench.suite import _random_bundle

    bundle = load_bundle(_random_bundle("paper", "dense", 0, Path(tempfile.mkdtemp(prefix="repux-cpu-backends-"))))
    return bundle.build_network("cpu").eval(), tuple(bundle.metadata.preprocessing["patch_size"]), bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", choices=("demo", "paper"), default="demo")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--variants", help="comma-separated variant names to run (default: all; torch float32 always)")
    parser.add_argument("--out", help="JSON results (default benchmarks/results/cpu_backends-WIDTH.json)")
    args = parser.parse_args()
    out = Path(args.out or HERE / "results" / f"cpu_backends-{args.width}.json")

    network, window, bundle = _network(args.width)
    window_input = phantom_calibration_windows(bundle, seeds=(7,))[0]
    x = torch.from_numpy(window_input)
    calibration = functools.cache(lambda: phantom_calibration_windows(bundle))
    builders = {
        "torch float32": lambda: optimize_for_inference(network),
        "onnxruntime float32": lambda: backend_network(network, "onnxruntime", window),
        "openvino float32": lambda: backend_network(network, "openvino", window),
        "onnxruntime int8": lambda: backend_network(network, "onnxruntime", window, quantize=True, calibration=calibration()),
        "openvino int8": lambda: backend_network(network, "openvino", window, quantize=True, calibration=calibration()),
    }
    if native_bfloat16("cpu"):
        builders["torch bfloat16"] = lambda: optimize_for_inference(network, "cpu", InferenceOptions(precision="bfloat16"))
        builders["openvino bfloat16"] = lambda: backend_network(network, "openvino", window, precision="bfloat16")
    if args.variants:
        wanted = {"torch float32", *(name.strip() for name in args.variants.split(","))}
        unknown = wanted - set(builders)
        if unknown:
            parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(builders)}")
        builders = {name: build for name, build in builders.items() if name in wanted}
    machine = machine_description("cpu")
    built, build_s = {}, {}
    for name, build in builders.items():
        start = time.perf_counter()
        built[name] = build()
        build_s[name] = time.perf_counter() - start
        print(f"[cpu_backends] built {name} in {build_s[name]:.1f} s", file=sys.stderr, flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in built}
    outputs = {}
    with torch.inference_mode():
        for name, variant in built.items():  # warm-up (first-call kernel choice, spectra)
            outputs[name] = variant(x)
        for _ in range(args.reps):
            for name, variant in built.items():
                start = time.perf_counter()
                variant(x)
                seconds[name].append(time.perf_counter() - start)
    reference = outputs["torch float32"]
    results = {
        "command": " ".join(["python", "benchmarks/cpu_backends.py", *sys.argv[1:]]),
        "width": args.width,
        "window": list(window),
        "machine": {**machine, "load_average_end": list(os.getloadavg())},
        "variants": {
            name: {
                "build_s": build_s[name],
                "seconds": seconds[name],
                "median_s": statistics.median(seconds[name]),
                "speedup_vs_torch_float32": statistics.median(seconds["torch float32"]) / statistics.median(seconds[name]),
                "max_logit_difference": float((outputs[name] - reference).abs().max()),
                "argmax_differs": float((outputs[name].argmax(1) != reference.argmax(1)).double().mean()),
            }
            for name in built
        },
        "max_logit": float(reference.abs().max()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, overwrite=True) as temporary:
        Path(temporary).write_text(json.dumps(results, indent=1))
    for name, entry in results["variants"].items():
        print(
            f"{name}: {entry['median_s']:.2f} s per window ({entry['speedup_vs_torch_float32']:.2f}x), "
            f"build {entry['build_s']:.1f} s, logits within {entry['max_logit_difference']:.1e}, "
            f"argmax differs on {entry['argmax_differs']:.2%}"
        )
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
