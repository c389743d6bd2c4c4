"""The benchmark's results as Markdown (``benchmarks/RESULTS.md``)."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

from repux.bench.agreement import AGREEMENT_BAR

__all__ = ["render_markdown"]

#: Layers listed in the per-layer table (the slowest of the plain network).
LAYERS_SHOWN = 16


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _region(value: Any) -> str:
    if value is None:
        return "the whole CT"
    ranges = ", ".join(f"{axis} {a}:{b}" for axis, (a, b) in zip("ijk", value))
    return f"the region {ranges} of the CT (voxel indices; a documented crop)"


def _machine(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    gpu = machine["gpu"] or "none at hand: no GPU figures were measured"
    return [
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
        f"vector capability {machine['cpu_capability']}, native bf16 on the CPU: {machine['native_bfloat16_cpu']}",
        f"- GPU: {gpu}; measured on: {machine['device']}",
        f"- torch {machine['torch']}, Python {machine['python']}",
        f"- load average at start {machine['load_average']}, at end {machine.get('load_average_end')} "
        "(other jobs shared the machine: compare ratios within this run, not absolute times across runs)",
    ]


def _group(layer: str) -> str:
    if "dwconv" in layer:
        return "encoder large depthwise convs"
    if "norm" in layer:
        return "normalisations"
    if "conv" in layer:
        return "dense convs (decoder, stem, downsampling)"
    return "other"


def _layer_table(layers: dict[str, dict[str, float]]) -> list[str]:
    plain, optimized = layers["plain"], layers["optimized"]
    lines = ["| layer | plain s | optimized s |", "|---|---:|---:|"]
    for name in sorted(plain, key=lambda n: -plain[n])[:LAYERS_SHOWN]:
        lines.append(f"| {name} | {plain[name]:.2f} | {optimized.get('network.' + name, 0.0):.2f} |")
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, seconds in plain.items():
        groups[_group(name)][0] += seconds
    for name, seconds in optimized.items():
        groups[_group(name.removeprefix("network."))][1] += seconds
    lines += ["", "| group | plain s | optimized s |", "|---|---:|---:|"]
    for group, (a, b) in sorted(groups.items(), key=lambda item: -item[1][0]):
        lines.append(f"| {group} | {a:.2f} | {b:.2f} |")
    return lines


def _memory(run: dict[str, Any]) -> str:
    text = _gib(run["peak_rss_bytes"])
    if run["cuda_peak_bytes"] is not None:
        text += f" (CUDA {_gib(run['cuda_peak_bytes'])})"
    return text


def _windows(run: dict[str, Any]) -> str:
    """Windows run, and "of N" windows of the full grid when some were skipped."""
    total = run.get("windows_total") or run["windows"]
    return str(run["windows"]) if total == run["windows"] else f"{run['windows']} of {total}"


def _run_rows(runs: list[dict[str, Any]], lead: str) -> list[str]:
    rows = []
    for run in runs:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in run["stages_s"].items())
        rows.append(
            f"| {lead} | {run['path']['name']} | {_windows(run)} | {_seconds(run['end_to_end_s'])} "
            f"| **{run['speedup']:.2f}** | {_seconds(run['cpu_s'])} | {_memory(run)} | load {run['load_s']:.1f}, {stages} |"
        )
    return rows


_RUN_HEADER = [
    "| {lead} | path | windows | end to end s | speed-up | CPU s | peak RSS GiB | stages s |",
    "|---|---|---:|---:|---:|---:|---:|---|",
]


def _patch_rows(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    lines = [
        f"Per patch: one 96^3 window through the plain and the optimized network in turn, "
        f"{settings['patch_reps']} times each (medians).",
        "",
        "| large kernels | plain s | optimized s | speed-up | largest logit difference | rewrite s | first call s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["timing"]:
        patch = entry["patch"]
        plain_s, opt_s = patch["median_s"]["plain"], patch["median_s"]["optimized"]
        lines.append(
            f"| {entry['kernels']} | {_seconds(plain_s)} | {_seconds(opt_s)} | {plain_s / opt_s:.2f} "
            f"| {patch['max_logit_difference']:.1e} (of {patch['max_logit']:.1f}) | {patch['optimize_s']:.1f} "
            f"| {patch['optimized_first_call_s']:.1f} |"
        )
    return lines + [""]


def _timing(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    lines = [f"## Speed at the '{settings['timing_preset']}' width (random weights)", ""]
    if all(entry["patch"] for entry in results["timing"]):
        lines += _patch_rows(results)
    lines += [
        f"End to end on {_region(settings['timing_region'])}: loading the bundle, then preprocessing, "
        "sliding windows and export to the input grid, each path in a fresh process.",
        "",
        *(line.format(lead="large kernels") for line in _RUN_HEADER),
    ]
    for entry in results["timing"]:
        lines += _run_rows(entry["runs"], entry["kernels"])
    for entry in results["timing"]:
        if entry["patch"] and entry["patch"]["layers"]:
            lines += ["", f"Per layer, one 96^3 window ({entry['kernels']} kernels):", ""]
            lines += _layer_table(entry["patch"]["layers"])
    return lines


def _agreement(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    lines = [
        "## Agreement with trained weights",
        "",
        f"Input: {_region(settings['agreement_region'])}. Dice between each path's label map and the "
        "reference's (1.0 where both leave a label out), and the largest difference of any probability "
        "on the input grid (from a run of each path that keeps them). Times, peak RSS and labels are of a "
        "second run that keeps only the labels, as `repux segment` does.",
        "",
    ]
    for entry in results["agreement"]:
        network = entry["network"]
        runs = entry["runs"]
        names = [run["path"]["name"] for run in runs[1:]]
        lines += [
            f"### {entry['model']} (feat_size {network.get('feat_size')}, ks {network.get('ks')}, "
            f"spacing {entry['spacing']} mm, patch {entry['patch_size']})",
            "",
            "| label | reference voxels | " + " | ".join(f"Dice: {name}" for name in names) + " |",
            "|---|---:|" + "---:|" * len(names),
        ]
        for index, (name, voxels) in enumerate(zip(entry["labels"][1:], entry["label_voxels"])):
            lines.append(f"| {name} | {voxels} | " + " | ".join(f"{run['dice'][index]:.4f}" for run in runs[1:]) + " |")
        lines.append(
            "| largest probability difference | | "
            + " | ".join(f"{run['max_probability_difference']:.4f}" for run in runs[1:])
            + " |"
        )
        lines += ["", *(line.format(lead="model") for line in _RUN_HEADER)]
        lines += _run_rows(runs, entry["model"]) + [""]
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The whole report; ends with the summary line."""
    settings = results["settings"]
    summary = results["summary"]
    lines = [
        "# Segmentation speed and memory" + (" (quick)" if settings["quick"] else ""),
        "",
        f"Command: `{results['command']}` ({time.strftime('%Y-%m-%d')}, {results['wall_s'] / 60:.0f} min).",
        "",
        f"Benchmark CT: `make_phantom({settings['seed']}, shape={tuple(settings['ct_shape'])}, "
        f"spacing={tuple(settings['ct_spacing'])})`.",
        "",
        "## Machine",
        "",
        *_machine(results),
        "",
        "## Paths",
        "",
        *(f"- {name}: {text}" for name, text in results["paths"].items()),
        "",
    ]
    if results.get("timing"):
        lines += _timing(results) + [""]
    if results.get("agreement"):
        lines += _agreement(results)
    speedup, agreement = summary["speedup"], summary["agreement"]
    if summary["qualified"]:
        chosen = (
            f"Fastest timed path whose labels agree with the reference's (lowest per-label Dice >= "
            f"{AGREEMENT_BAR} on every trained bundle): **{summary['path']}**."
        )
    elif math.isnan(agreement):
        chosen = f"No trained bundle measured agreement: **{summary['path']}** (the reference's windows) is reported."
    else:
        chosen = (
            f"No timed path reached Dice {AGREEMENT_BAR} on every label: **{summary['path']}** "
            "(the reference's windows) is reported."
        )
    where = summary.get("speedup_measured_on", {}).get(summary["path"], "timing")
    measured = "at the timed width" if where == "timing" else f"with the {where} model on the agreement CT"
    lines += [
        "## Summary",
        "",
        chosen + f" Its end-to-end speed-up (measured {measured}) and agreement:",
        "",
        "```",
        f"speedup {speedup:.2f} agreement {agreement:.4f}",
        "```",
        "",
    ]
    return "\n".join(lines)
