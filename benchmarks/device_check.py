"""The GPU measurements of ``benchmarks/device_check.sh``: segmentation speed at the paper's width, training iterations.

    python benchmarks/device_check.py --out benchmarks/RESULTS-gpu.md [--shrunk]

On one CUDA GPU (the default): the benchmark CT (512 x 512 x 200 voxels of 0.8 x 0.8 x 1.5 mm)
segmented whole, each path in its own process (``repux.bench``): the reference (plain
float32 network, published crop, 4 windows per pass, overlap 0.5), the exact rewrite with
the same windows, ``repux segment``'s own path, and the last two in bfloat16, with random
dense kernels at the paper's width;
then the same paths and ``repux segment``'s own (organ-guided windows, box export) on the
demo model for agreement (per-label Dice against the reference);
then a few training iterations (forward, backward, optimizer step, bf16 autocast as the
trainer does on CUDA) of the paper-width network on a 2 x 96^3 batch with BFR-AdamW and with
AdamW, in turn. ``--shrunk`` runs the same steps on the CPU at a size that takes about a
minute (a small CT, the demo model's paths only, the small preset's training on 32^3
patches): it checks the script, not the speed.

What each stage runs on is listed in the report: every stage of inference but reading,
writing and the few host steps named in :data:`HOST_STEPS` runs on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from repux.atomic import atomic_path
from repux.bench.paths import DEFAULT, OPTIMIZED, REFERENCE
from repux.bench.report import render_markdown
from repux.bench.suite import FULL, run_benchmark, summary_line

#: Steps of ``repux segment`` that stay on the host when the device is a GPU (as the code is
#: today; predict.py, guided.py and export.py decide the last two).
HOST_STEPS = (
    "reading and writing the files (ITK)",
    "the exact axis reorientation of the input (a numpy transpose/flip) and its inverse on the labels",
    "the padded network input is assembled on the host after resampling, windowing and cropping on the GPU; "
    "MONAI slices each window there and copies it to the GPU",
    "the organ-guided windows' choice of pass-2 windows reads pass 1's organ mask on the host (one bool "
    "per voxel of the model grid)",
)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_iterations(device: torch.device, preset: str, patch: int, iterations: int) -> dict:
    """Seconds per training iteration (forward, DiceCE loss, backward, step) with BFR-AdamW and AdamW.

    The same network and batch for both; the optimizers take turns, one iteration each, so
    that load drift hits both alike. bf16 autocast on CUDA, as the trainer; on a CPU the
    large kernels run by FFT, as the trainer does there.
    """
    from monai.losses import DiceCELoss

    from repux.bfr import BFRAdamW, bfr_param_groups
    from repux.network import NETWORK_PRESETS, build_network
    from repux.train.fft_conv import use_fft_kernels

    torch.manual_seed(0)
    config = dict(NETWORK_PRESETS[preset])
    network = build_network(config.pop("arch"), **config, out_chans=14).to(device).train()
    if device.type == "cpu":
        use_fft_kernels(network)
    images = torch.rand((2, 1, patch, patch, patch), device=device)
    labels = torch.randint(0, 14, (2, 1, patch, patch, patch), device=device)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizers = {
        "AdamW": torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=0.01),
        "BFR-AdamW": BFRAdamW(bfr_param_groups(network), lr=1e-4, weight_decay=0.01),
    }
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    for index in range(iterations + 1):  # the first round warms up (kernel choice, allocator)
        for name, optimizer in optimizers.items():
            _synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_function(network(images), labels)
            loss.backward()
            optimizer.step()
            _synchronize(device)
            if index > 0:
                seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "preset": preset,
        "batch": [2, 1, patch, patch, patch],
        "iterations": iterations,
        "seconds": seconds,
        "median_s": medians,
        "bfr_over_adamw": medians["BFR-AdamW"] / medians["AdamW"],
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def _training_markdown(training: dict) -> list[str]:
    lines = [
        "## Training iterations",
        "",
        f"Network preset `{training['preset']}`, batch {tuple(training['batch'])}, {training['iterations']} timed "
        "iterations per optimizer after one warm-up, taken in turn (forward, DiceCE loss, backward, step).",
        "",
        "| optimizer | median s per iteration | all s |",
        "|---|---:|---|",
    ]
    for name, median in training["median_s"].items():
        lines.append(f"| {name} | {median:.3f} | {', '.join(f'{s:.3f}' for s in training['seconds'][name])} |")
    lines += ["", f"BFR-AdamW / AdamW per iteration: **{training['bfr_over_adamw']:.3f}**"]
    if training["peak_cuda_bytes"] is not None:
        lines.append(f"Peak CUDA memory: {training['peak_cuda_bytes'] / 2**30:.1f} GiB")
    return lines


def _stages_markdown(device: torch.device) -> list[str]:
    where = "the GPU" if device.type == "cuda" else f"{device} (shrunk run)"
    return [
        "## Where each stage ran",
        "",
        f"On {where}: resampling to the model grid, the intensity window and the body crop "
        "(`preprocess(..., device)`), sliding windows (bf16 autocast on the bfloat16 path), stitching "
        "(on the GPU when the stitched logits fit in 40 % of its free memory), softmax, resampling "
        "the probabilities to the input grid (the organs' box only), argmax and the cast of the labels to "
        "bytes (export runs where the probabilities are).",
        "",
        "Still on the host:",
        "",
        *[f"- {step}" for step in HOST_STEPS],
        "",
        "Organ-guided windows are timed on the demo model (`repux segment`: with random weights the "
        "network's organs are anywhere). Not in this check: CUDA graphs and torch.compile (not tried).",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Markdown report (RESULTS-gpu.md)")
    parser.add_argument("--json", help="every measurement as JSON (default: next to --out)")
    parser.add_argument("--shrunk", action="store_true", help="a minute on the CPU: checks the script, not the speed")
    parser.add_argument("--iterations", type=int, default=3, help="timed training iterations per optimizer")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.shrunk:
        device = torch.device("cpu")
        settings = replace(
            FULL,
            device="cpu",
            # 96 x 96 x 72 mm: one 96^3 window of the random bundle's 1 mm grid, one of the demo's.
            ct_shape=(48, 48, 24),
            ct_spacing=(2.0, 2.0, 3.0),
            timing_preset=None,  # the demo's runs time the paths end to end
            paths=(REFERENCE, OPTIMIZED, DEFAULT),
            patch_reps=0,
        )
        training_preset, patch = "small", 32
    else:
        if not torch.cuda.is_available():
            print("device_check: no CUDA device here; use --shrunk on a CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        settings = replace(
            FULL,
            device="cuda",
            timing_region=None,  # the whole CT
            timing_kernels=("dense",),
            timing_paths=(REFERENCE, OPTIMIZED, DEFAULT),  # the bfloat16 paths are added where native
            paths=(REFERENCE, OPTIMIZED, DEFAULT),
            patch_reps=3,
        )
        training_preset, patch = "paper", 96
    mode = "shrunk, on the CPU" if args.shrunk else "on the GPU"
    with tempfile.TemporaryDirectory(prefix="repux-device-check-") as work:
        results = run_benchmark(settings, Path(work), command=f"benchmarks/device_check.sh ({mode})")
    print(f"[device_check] segmentation done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    results["training"] = training_iterations(device, training_preset, patch, args.iterations)
    results["host_steps"] = list(HOST_STEPS)
    results["check_wall_s"] = time.perf_counter() - started
    results["platform"] = platform.platform()

    markdown = render_markdown(results).rstrip().split("\n")
    title = "# GPU check" if not args.shrunk else "# GPU check (shrunk run on the CPU: not a speed measurement)"
    body = [title, "", f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {results['check_wall_s']:.0f} s in all.", ""]
    body += [line.replace("# Segmentation speed and memory", "## Segmentation", 1) if i == 0 else line for i, line in enumerate(markdown)]
    body += ["", *_stages_markdown(device), "", *_training_markdown(results["training"]), ""]
    with atomic_path(args.out, overwrite=True) as temporary:
        Path(temporary).write_text("\n".join(body))
    json_path = args.json or str(Path(args.out).with_suffix(".json"))
    with atomic_path(json_path, overwrite=True) as temporary:
        Path(temporary).write_text(json.dumps(results, indent=1))
    print(summary_line(results))
    print(f"training: BFR-AdamW / AdamW per iteration {results['training']['bfr_over_adamw']:.3f}")
    print(f"report written to {args.out} ({results['check_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
