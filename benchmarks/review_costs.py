"""What review costs, as ratios against plain inference measured in the same run.

    python benchmarks/review_costs.py                 # both parts, CPU: about 15 minutes on 2 busy cores
    python benchmarks/review_costs.py --part roi      # only the ROI part
    python benchmarks/review_costs.py --device cuda --model /path/to/bundle --seed 11

One phantom CT (``repux.data.phantoms``) per part, one process; every path runs
``--repeats`` times and the median wall time counts (the machine may be shared). Each
part's ratios are against a reference measured in the same run of that part.

Part ``costs`` (``--model``, default the demo model):

- ``plain``: labels only (``Segmenter.predict``);
- ``confidence``: labels plus the confidence and entropy maps (``--confidence``);
- ``tta_flips``: labels with test-time mirroring (``--tta flips``, 8 passes per window).

Part ``roi``: a box around the phantom's liver (``--roi``) against the whole CT. What a box
saves is decided by the window grid: the demo model's 48^3 windows of 4 mm (192 mm,
stepping 96 mm) all reach a phantom liver of about 190 x 160 x 135 mm, so this part uses the
paper's geometry (1.5 mm voxels, 96^3 windows, overlap 0.5) with a narrow RepUX-Net
(widths 8-32, random weights: the time depends on the grid, not on the weights) so that a
CPU run takes minutes. On this phantom the liver's box still reaches every window (the
phantom's liver is large for its body); a 60 mm box in the liver, a region to correct, shows
what a small box saves. It also checks that the liver box's labels equal the whole run's.

Writes ``benchmarks/results/review_costs.json`` (a part run alone keeps the other's results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import tempfile

import numpy as np
import torch

from repux.bundle import BundleMetadata, default_preprocessing, label_preset, load_bundle, save_bundle
from repux.data.phantoms import make_phantom
from repux.infer import Segmenter
from repux.infer.roi import RasBox

HERE = Path(__file__).resolve().parent
LIVER = 3  # the phantom's label value for the liver (FLARE order)
MARGIN_MM = 5.0
#: Side of the second box (mm), centred in the liver's box: a region to correct.
SMALL_BOX_MM = 60.0


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


def paper_geometry_bundle(folder: Path) -> Path:
    """A narrow RepUX-Net bundle (random weights) with the paper's 1.5 mm voxels, 96^3 windows, overlap 0.5."""
    from repux.network import RepUXNet

    torch.manual_seed(0)
    labels = label_preset("flare")
    network = RepUXNet(in_chans=1, out_chans=len(labels), feat_size=(8, 16, 24, 32), hidden_size=64, ks=7)
    config = {key: value for key, value in network.config.items() if key != "arch"}
    metadata = BundleMetadata(
        name="paper-geometry-narrow",
        architecture="repuxnet",
        network=config,
        labels=labels,
        preprocessing=default_preprocessing(spacing=(1.5, 1.5, 1.5), patch_size=(96, 96, 96)),
        inference={"overlap": 0.5, "sw_batch_size": 1, "blend": "constant"},
    )
    return save_bundle(network, metadata, folder)


def run_paths(runs: dict, repeats: int) -> tuple[dict, dict]:
    seconds, results = {}, {}
    for name, run in runs.items():
        seconds[name], results[name] = timed(run, repeats)
        print(f"{name}: {seconds[name]:.2f} s ({results[name].windows} windows)", flush=True)
    return seconds, results


def costs_part(args: argparse.Namespace) -> dict:
    image, _ = make_phantom(args.seed, shape=tuple(args.shape))
    bundle = load_bundle(args.model)
    plain = Segmenter(bundle, device=args.device)
    mirrored = Segmenter(bundle, device=args.device, mirror=True)
    plain.predict(image)  # warm-up: first-call allocations and kernel selection
    seconds, results = run_paths(
        {
            "plain": lambda: plain.predict(image),
            "confidence": lambda: plain.predict(image, review=True),
            "tta_flips": lambda: mirrored.predict(image),
        },
        args.repeats,
    )
    return {
        "model": bundle.metadata.name,
        "phantom": {"seed": args.seed, "shape": list(image.shape), "spacing_mm": [round(s, 3) for s in image.spacing]},
        "windows": {name: result.windows for name, result in results.items()},
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "ratio_to_plain": {name: round(value / seconds["plain"], 3) for name, value in seconds.items()},
    }


def roi_part(args: argparse.Namespace) -> dict:
    image, label = make_phantom(args.seed, shape=tuple(args.shape))
    box = liver_box(label)
    centre = (box.low + box.high) / 2
    small = RasBox.from_corners(centre - SMALL_BOX_MM / 2, centre + SMALL_BOX_MM / 2)
    with tempfile.TemporaryDirectory() as folder:
        segmenter = Segmenter(load_bundle(paper_geometry_bundle(Path(folder) / "bundle")), device=args.device)
    seconds, results = run_paths(
        {
            "whole": lambda: segmenter.predict(image),
            "roi_liver": lambda: segmenter.predict(image, roi=box),
            "roi_60mm_in_liver": lambda: segmenter.predict(image, roi=small),
        },
        args.repeats,
    )
    whole, part = results["whole"], results["roi_liver"]
    inside = part.roi
    return {
        "model": "RepUX-Net widths 8-32 at the paper's geometry: 1.5 mm, 96^3 windows, overlap 0.5, 1 window per pass",
        "phantom": {"seed": args.seed, "shape": list(image.shape), "spacing_mm": [round(s, 3) for s in image.spacing]},
        "liver_box_mm": {"low": box.low.round(2).tolist(), "high": box.high.round(2).tolist()},
        "box_voxels_share": round(float(inside.mean()), 4),
        "small_box_mm": {"low": small.low.round(2).tolist(), "high": small.high.round(2).tolist()},
        "windows": {name: result.windows for name, result in results.items()},
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "ratio_to_whole": {name: round(value / seconds["whole"], 3) for name, value in seconds.items()},
        # The network's share of the work, independent of the machine's load.
        "windows_ratio_to_whole": {name: round(r.windows / whole.windows, 3) for name, r in results.items()},
        "roi_labels_equal_whole_inside_box": bool(np.array_equal(part.labels.array[inside], whole.labels.array[inside])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "costs", "roi"), default="all")
    parser.add_argument("--model", default="demo", help="bundle of the costs part (default demo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 80, 64), help="phantom voxels (default 96 80 64)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output", default=str(HERE / "results" / "review_costs.json"))
    args = parser.parse_args()

    output = Path(args.output)
    report = json.loads(output.read_text(encoding="utf-8")) if output.exists() else {}
    report["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": args.device,
        "note": "shared machine, busy with other work (other engineers' tests and jobs) during the runs: absolute "
        "times are noisy; each part's ratios are against its reference measured in the same run",
    }
    report["repeats"] = args.repeats
    if args.part in ("all", "costs"):
        report["costs"] = costs_part(args)
    if args.part in ("all", "roi"):
        report["roi"] = roi_part(args)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({part: report[part].get("ratio_to_plain") or report[part].get("ratio_to_whole")
                      for part in ("costs", "roi") if part in report}))


if __name__ == "__main__":
    main()
