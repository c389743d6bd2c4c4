"""What keeping the OpenVINO export between runs saves: ``repux segment --backend openvino``'s start, cold and warm.

    python benchmarks/backend_cache.py [--model demo] [--runs 2]

Each start is a fresh process that builds ``Segmenter(bundle, backend="openvino",
backend_cache=FOLDER)`` (reading the bundle, the export or its cached ONNX file, OpenVINO's
compilation or its cached blob) and runs one window, as a segmentation's first window would.
The first start fills an empty cache folder; the others find it filled. The same starts
without a cache (exported afresh, as before the cache) are timed in turn with the warm ones.
Writes ``benchmarks/results/backend_cache.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "backend_cache"

START = """
import json, sys, time
started = time.perf_counter()
import torch
from repux.bundle import load_bundle
from repux.infer import Segmenter
bundle = load_bundle(sys.argv[1])
cache = None if sys.argv[2] == "none" else __import__("pathlib").Path(sys.argv[2])
segmenter = Segmenter(bundle, device="cpu", backend="openvino", backend_cache=cache)
built = time.perf_counter()
patch = tuple(int(p) for p in bundle.metadata.preprocessing["patch_size"])
segmenter.predictor.network(torch.rand(1, 1, *patch))
print(json.dumps({"start_s": built - started, "first_window_s": time.perf_counter() - built}))
"""


def start(model: str, cache: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", START, model, cache], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--runs", type=int, default=2, help="warm and uncached starts each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="repux-export-cache-") as folder:
        cold = start(args.model, folder)
        warm, uncached = [], []
        for _ in range(args.runs):
            warm.append(start(args.model, folder))
            uncached.append(start(args.model, "none"))
    median = {name: statistics.median(r["start_s"] for r in runs) for name, runs in (("warm", warm), ("uncached", uncached))}
    results = {
        "model": args.model,
        "cold": cold,
        "warm": warm,
        "uncached": uncached,
        "median_start_s": median,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_average": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d"),
    }
    from repux.atomic import atomic_path, write_json

    write_json(results, RESULTS.with_suffix(".json"))
    lines = [
        f"# OpenVINO export kept between runs ({args.model}, {results['date']})",
        "",
        "Start of `repux segment --backend openvino` (fresh process: bundle, export or cache, compilation) and its first window, seconds.",
        "",
        "| start | start s | first window s |",
        "|---|---:|---:|",
        f"| cold (fills the cache) | {cold['start_s']:.1f} | {cold['first_window_s']:.2f} |",
        *[f"| warm (cache filled) | {r['start_s']:.1f} | {r['first_window_s']:.2f} |" for r in warm],
        *[f"| no cache (export each time) | {r['start_s']:.1f} | {r['first_window_s']:.2f} |" for r in uncached],
        "",
        f"Median start: warm {median['warm']:.1f} s against {median['uncached']:.1f} s without the cache "
        f"(**{median['uncached'] / median['warm']:.1f}x**). Load average at the end {results['machine']['load_average'][0]:.1f} "
        f"on {results['machine']['cores']} cores.",
    ]
    with atomic_path(RESULTS.with_suffix(".md"), overwrite=True) as temporary:
        Path(temporary).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
