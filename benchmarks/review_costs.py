"""What review costs, as ratios against plain inference measured in the same run.

    python benchmarks/review_costs.py                 # demo model, CPU, a few minutes
    python benchmarks/review_costs.py --device cuda --model /path/to/bundle --seed 11

One phantom CT (``repux.data.phantoms``), one model, one process; every path runs
``--repeats`` times and the median wall time counts (the machine may be shared):

- ``plain``: labels only (``Segmenter.predict``);
- ``confidence``: labels plus the confidence and entropy maps (``--confidence``);
- ``tta_flips``: labels with test-time mirroring (``--tta flips``, 8 passes per window);
- ``roi_liver``: labels inside a box around the phantom's liver (``--roi``), against
  ``plain`` on the whole CT; also checks that the box's labels equal the whole run's.

Writes ``benchmarks/results/review_costs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from repux.bundle import load_bundle
from repux.data.phantoms import make_phantom
from repux.infer import Segmenter
from repux.infer.roi import RasBox

HERE = Path(__file__).resolve().parent
LIVER = 3  # the phantom's label value for the liver (FLARE order)
MARGIN_MM = 5.0


def liver_box(label) -> RasBox:
    """The RAS bounding box of the liver's voxel centres, grown by :data:`MARGIN_MM`."""
    index = np.argwhere(label.array == LIVER)
    ras = (label.affine[:3, :3] @ index.T + label.affine[:3, 3:4]).T
    return RasBox.from_corners(ras.min(axis=0) - MARGIN_MM, ras.max(axis=0) + MARGIN_MM)


def timed(run, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 80, 64), help="phantom voxels (default 96 80 64)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output", default=str(HERE / "results" / "review_costs.json"))
    args = parser.parse_args()

    image, label = make_phantom(args.seed, shape=tuple(args.shape))
    bundle = load_bundle(args.model)
    plain = Segmenter(bundle, device=args.device)
    mirrored = Segmenter(bundle, device=args.device, mirror=True)
    box = liver_box(label)
    plain.predict(image)  # warm-up: first-call allocations and kernel selection

    runs = {
        "plain": lambda: plain.predict(image),
        "confidence": lambda: plain.predict(image, review=True),
        "tta_flips": lambda: mirrored.predict(image),
        "roi_liver": lambda: plain.predict(image, roi=box),
    }
    seconds, results = {}, {}
    for name, run in runs.items():
        seconds[name], results[name] = timed(run, args.repeats)
        print(f"{name}: {seconds[name]:.2f} s ({results[name].windows} windows)", flush=True)
    whole, part = results["plain"], results["roi_liver"]
    inside = part.roi
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "note": "shared machine, busy with other work during the run: absolute times are noisy; "
            "ratios are against plain inference measured in the same run",
        },
        "model": bundle.metadata.name,
        "phantom": {"seed": args.seed, "shape": list(image.shape), "spacing_mm": [round(s, 3) for s in image.spacing]},
        "liver_box_mm": {"low": box.low.round(2).tolist(), "high": box.high.round(2).tolist()},
        "box_voxels_share": round(float(inside.mean()), 4),
        "windows": {name: results[name].windows for name in runs},
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "ratio_to_plain": {name: round(value / seconds["plain"], 3) for name, value in seconds.items()},
        "roi_labels_equal_whole_inside_box": bool(np.array_equal(part.labels.array[inside], whole.labels.array[inside])),
        "repeats": args.repeats,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report["ratio_to_plain"]))


if __name__ == "__main__":
    main()
