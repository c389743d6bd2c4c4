"""Organ-guided windows and the box export with the demo model, each against the full way in the same run.

    python benchmarks/export_speed.py                    # quick CT and benchmark CT, CPU: ~5 minutes on 2 busy cores
    python benchmarks/export_speed.py --ct quick --repeats 3

For each CT (phantom seed 0: the quick CT of ``repux bench --quick``, 256 x 256 x 100 voxels
of 1.6 x 1.6 x 3.0 mm, and the benchmark CT, 512 x 512 x 200 of 0.8 x 0.8 x 1.5 mm; both
slightly oblique), with the demo model on this process's device:

- windows: MONAI's sliding window over the whole grid (``--windows all``), the organ-guided
  windows (``--windows organs``) and the organ-guided schedule run in full; windows run of
  the full grid, seconds, per-label Dice of the guided labels against the full grid's (on
  the input grid), and inside the voxels whose every window ran (the grown organs and more):
  whether the probabilities equal the full schedule's bit for bit, and how many labels differ
  from MONAI's full grid there;
- export of the guided probabilities to the input grid: the export as it was before issue 15
  (:func:`export_before`: every input voxel resampled, ``argmax`` over the channel axis,
  the cast on the host), resampling every input voxel with today's code (``everywhere``) and
  the box export, labels only and with the review maps, taken in turn ``--repeats`` times
  (medians), and whether their outputs are equal.

Writes ``benchmarks/results/export_speed.json`` and ``benchmarks/results/export_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from repux.bench.agreement import label_dice
from repux.bench.suite import machine_description
from repux.bundle import load_bundle
from repux.data.phantoms import make_phantom
from repux.infer import Segmenter
from repux.infer.export import to_input_grid
from repux.infer.grid import resample_chunks
from repux.infer.guided import growth_voxels, guided_probabilities
from repux.infer.predict import plan_execution, predict_probabilities
from repux.infer.preprocess import preprocess

HERE = Path(__file__).resolve().parent
CTS = {"quick": ((256, 256, 100), (1.6, 1.6, 3.0)), "benchmark": ((512, 512, 200), (0.8, 0.8, 1.5))}


def export_before(probabilities: torch.Tensor, prepared) -> np.ndarray:
    """Labels as the export computed them before issue 15, for the "before" timing: every input
    voxel resampled, ``argmax`` over the channel axis (int64), cast to the label type on the host."""
    crop = prepared.unpad(probabilities).float()
    labels = np.zeros(prepared.input_grid.shape, dtype=np.uint8)
    for rows, chunk in resample_chunks(crop, prepared.crop_grid, prepared.input_grid, mode="linear", fill=0.0):
        chunk[0] += 1.0 - chunk.sum(dim=0)
        labels[rows] = chunk.argmax(dim=0).cpu().numpy().astype(labels.dtype)
    return np.ascontiguousarray(prepared.reorientation.invert(labels))


def _timed(run):
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def measure(name: str, segmenter: Segmenter, repeats: int) -> dict:
    shape, spacing = CTS[name]
    ct, _ = make_phantom(0, shape=shape, spacing=spacing)
    prepared = preprocess(ct, segmenter.preprocessing, segmenter.device)
    image = prepared.image
    plan = plan_execution(tuple(image.shape[2:]), segmenter.out_chans, segmenter.window, segmenter.device)
    growth = growth_voxels(segmenter.window, prepared.model_grid.spacing)
    predictor, window = segmenter.predictor, segmenter.window
    monai_s, (monai, _) = _timed(lambda: predict_probabilities(image, predictor, window, plan))
    guided_s, (guided, _, run) = _timed(lambda: guided_probabilities(image, predictor, window, plan, growth))
    schedule_s, (schedule, _, _) = _timed(lambda: guided_probabilities(image, predictor, window, plan, growth, everywhere=True))
    exact = run.exact.to(guided.device)
    labels = {key: to_input_grid(p, prepared).labels for key, p in (("monai", monai), ("guided", guided), ("schedule", schedule))}
    channels = guided.shape[0]
    windows = {
        "windows_run": run.windows_run,
        "windows_total": run.windows_total,
        "organs_found": run.organs_found,
        "infer_s": {"monai_all_windows": monai_s, "organ_guided": guided_s, "guided_schedule_in_full": schedule_s},
        "dice_guided_vs_all_windows": label_dice(labels["monai"], labels["guided"], channels),
        "dice_guided_vs_schedule_in_full": label_dice(labels["schedule"], labels["guided"], channels),
        "exact_voxels_share": float(exact.float().mean()),
        "exact_region_bitwise_equal_to_schedule": bool(torch.equal(guided[:, exact], schedule[:, exact])),
        "exact_region_labels_differing_from_all_windows": int(
            (guided.argmax(dim=0)[exact] != monai.argmax(dim=0)[exact]).sum()
        ),
        "exact_region_max_probability_difference_from_all_windows": float((guided[:, exact] - monai[:, exact]).abs().max()),
    }
    keys = ("labels_before", "labels_everywhere", "labels_box", "review_everywhere", "review_box")
    seconds: dict[str, list[float]] = {key: [] for key in keys}
    outputs = {}
    for _ in range(repeats):
        elapsed, before = _timed(lambda: export_before(guided, prepared))
        seconds["labels_before"].append(elapsed)
        for key in keys[1:]:
            review, everywhere = key.startswith("review"), key.endswith("everywhere")
            elapsed, outputs[key] = _timed(lambda: to_input_grid(guided, prepared, review=review, everywhere=everywhere))
            seconds[key].append(elapsed)
    medians = {key: statistics.median(values) for key, values in seconds.items()}
    export = {
        "seconds": seconds,
        "median_s": medians,
        "speedup_labels_vs_before": medians["labels_before"] / medians["labels_box"],
        "speedup_labels": medians["labels_everywhere"] / medians["labels_box"],
        "speedup_review": medians["review_everywhere"] / medians["review_box"],
        "labels_equal": bool(np.array_equal(outputs["labels_box"].labels, outputs["labels_everywhere"].labels)),
        "labels_equal_to_before": bool(np.array_equal(outputs["labels_box"].labels, before)),
        "review_equal": all(
            np.array_equal(getattr(outputs["review_box"], field), getattr(outputs["review_everywhere"], field))
            for field in ("labels", "confidence", "entropy")
        ),
    }
    return {"ct": name, "shape": shape, "spacing": spacing, "network_input": list(image.shape[2:]), "windows": windows, "export": export}


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# Organ-guided windows and the box export (demo model)",
        "",
        f"Command: `{results['command']}` ({results['date']}). Device {machine['device']}; {machine['cpu']}, "
        f"{machine['cores']} cores; load average at start {[round(v, 2) for v in machine['load_average']]}, "
        f"at end {[round(v, 2) for v in results['load_average_end']]} (shared machine: compare within a row).",
        "",
        "| CT | windows run | infer s: all windows / guided | lowest Dice vs all windows | exact voxels | bitwise = full schedule there | labels differing from all windows there |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for entry in results["cts"]:
        w = entry["windows"]
        lines.append(
            f"| {entry['ct']} {tuple(entry['shape'])} | {w['windows_run']} of {w['windows_total']} "
            f"| {w['infer_s']['monai_all_windows']:.1f} / {w['infer_s']['organ_guided']:.1f} "
            f"| {min(w['dice_guided_vs_all_windows']):.4f} | {w['exact_voxels_share']:.0%} "
            f"| {w['exact_region_bitwise_equal_to_schedule']} | {w['exact_region_labels_differing_from_all_windows']} |"
        )
    lines += [
        "",
        "| CT | export | every voxel s | box s | speed-up | same output |",
        "|---|---|---:|---:|---:|---|",
    ]
    for entry in results["cts"]:
        e = entry["export"]
        m = e["median_s"]
        lines.append(
            f"| {entry['ct']} | labels, before issue 15 / box | {m['labels_before']:.2f} | {m['labels_box']:.2f} "
            f"| **{e['speedup_labels_vs_before']:.2f}** | {e['labels_equal_to_before']} |"
        )
        lines.append(
            f"| {entry['ct']} | labels | {m['labels_everywhere']:.2f} | {m['labels_box']:.2f} | **{e['speedup_labels']:.2f}** | {e['labels_equal']} |"
        )
        lines.append(
            f"| {entry['ct']} | labels + review maps | {m['review_everywhere']:.2f} | {m['review_box']:.2f} "
            f"| **{e['speedup_review']:.2f}** | {e['review_equal']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ct", choices=(*CTS, "both"), default="both")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    segmenter = Segmenter(load_bundle("demo"), device=args.device)
    names = list(CTS) if args.ct == "both" else [args.ct]
    results = {
        "command": "python benchmarks/export_speed.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_description(str(segmenter.device)),
        "cts": [measure(name, segmenter, args.repeats) for name in names],
        "load_average_end": list(os.getloadavg()),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "export_speed.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    text = markdown(results)
    (HERE / "results" / "export_speed.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
