"""What a ``repux serve`` round trip costs beyond the segmentation itself, on loopback.

One run, one CT (a phantom, 512 x 512 x 300 voxels by default, written as uncompressed NRRD
as the Slicer module uploads it), one model, the same device:

1. local: ``repux segment CT -o labels.seg.nrrd`` in a fresh process (the reference);
2. client: ``repux segment CT -o labels.seg.nrrd --server URL`` against a server started
   beforehand (a long-running service: its start is not counted);
3. phases: the same job through the API step by step: upload (with the server's volume
   check), queue wait, compute (the server's ``repux segment`` process), download.

The server runs each job as its own ``repux segment`` process, so "compute" contains the same
process start and model load as the local run. The paths run interleaved, ``--repeats`` times
each, with the server started once beforehand. Results: a table in
``benchmarks/results/server_overhead.md`` and the figures in ``server_overhead.json``.

    python benchmarks/server_overhead.py                       # demo model, CPU
    python benchmarks/server_overhead.py --device cuda:0 --shape 512 512 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "Testing" / "repux"))

from serve_support import start_server  # noqa: E402 - the tests' loopback server starter, one way to start it

from repux import __version__  # noqa: E402
from repux.data.phantoms import make_phantom  # noqa: E402
from repux.imageio import read_volume, to_sitk  # noqa: E402


def timed_segment(argv: list[str]) -> float:
    """Wall seconds of one ``python -m repux segment ...`` process (it must succeed)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "repux", "segment", *argv, "--progress", "none"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"repux segment failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - start


def phases(client, image: Path, model: str, output: Path) -> dict[str, float]:
    """Seconds of upload, queue wait, compute and download of one job (status polled every 50 ms)."""
    t0 = time.perf_counter()
    job = client.submit(image, model, ".seg.nrrd")
    t1 = time.perf_counter()
    started = finished = None
    while True:
        state = client.status(job["id"])["state"]
        now = time.perf_counter()
        if state != "queued" and started is None:
            started = now
        if state in ("succeeded", "failed", "cancelled", "lost"):
            finished = now
            break
        time.sleep(0.05)
    if state != "succeeded":
        raise SystemExit(f"server job {state}: {client.status(job['id']).get('error')}")
    client.download(job["id"], output)
    t2 = time.perf_counter()
    client.delete(job["id"])
    return {"upload": t1 - t0, "queue": started - t1, "compute": finished - started, "download": t2 - finished, "total": t2 - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), metavar=("I", "J", "K"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path, interleaved (medians reported)")
    parser.add_argument("--output", default=str(HERE / "results" / "server_overhead.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="repux-server-bench-") as folder:
        folder = Path(folder)
        image, _ = make_phantom(0, shape=tuple(args.shape))
        ct = folder / "ct.nrrd"
        sitk.WriteImage(to_sitk(image), str(ct), useCompression=False)  # as the Slicer module uploads
        size_mb = ct.stat().st_size / 1024**2
        load_start = os.getloadavg()

        server = start_server(folder / "server", [args.model], "--device", args.device, "--max-upload-mb", str(4 * size_mb + 64))
        local_runs, client_runs, phase_runs = [], [], []
        try:
            # Interleaved, so that load from other jobs on the machine falls on every path alike.
            for _ in range(args.repeats):
                argv = [str(ct), "-o", str(folder / "local.seg.nrrd"), "--model", args.model, "--force"]
                local_runs.append(timed_segment([*argv, "--device", args.device]))
                argv = [str(ct), "-o", str(folder / "client.seg.nrrd"), "--model", args.model, "--force"]
                client_runs.append(timed_segment([*argv, "--server", server.url, "--token-file", str(server.token_file)]))
                (folder / "phases.seg.nrrd").unlink(missing_ok=True)
                phase_runs.append(phases(server.client(retry_s=60), ct, args.model, folder / "phases.seg.nrrd"))
        finally:
            server.stop()
        local = read_volume(folder / "local.seg.nrrd").array
        identical = all(np.array_equal(local, read_volume(folder / n).array) for n in ("client.seg.nrrd", "phases.seg.nrrd"))
    local_s, client_s = float(np.median(local_runs)), float(np.median(client_runs))
    steps = {key: float(np.median([run[key] for run in phase_runs])) for key in phase_runs[0]}

    beyond = float(np.median([run["total"] - run["compute"] for run in phase_runs]))  # upload, queue, download, polling
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "repux": __version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "shape": list(args.shape),
        "upload_mb": round(size_mb, 1),
        "model": args.model,
        "device": args.device,
        "repeats": args.repeats,
        "local_runs_s": local_runs,
        "client_runs_s": client_runs,
        "phase_runs_s": phase_runs,
        "local_s": local_s,
        "client_s": client_s,
        "client_over_local": client_s / local_s,
        "phases_s": steps,
        "beyond_compute_over_compute": beyond / steps["compute"],
        "identical_labels": identical,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    output.write_text(report(results))
    print(report(results))
    return 0


def report(r: dict) -> str:
    p = r["phases_s"]
    shape = " x ".join(str(s) for s in r["shape"])
    return f"""# Server round trip against a local run

`python benchmarks/server_overhead.py --device {r['device']} --model {r['model']} --shape {' '.join(map(str, r['shape']))}` ({r['date']}, repux {r['repux']}, Python {r['python']}, {r['cpu_count']} CPUs, load average {r['load_average_start'][0]:.1f} at start, {r['load_average_end'][0]:.1f} at end: other jobs shared the machine; compare within this run).

CT: `make_phantom(0, shape=({', '.join(map(str, r['shape']))}))`, {shape} voxels, uploaded as uncompressed NRRD ({r['upload_mb']} MiB), server on 127.0.0.1.

Medians of {r['repeats']} interleaved runs per path (each run in the JSON file).

| path | seconds | against local | runs s |
|---|---:|---:|---|
| local `repux segment` (reference) | {r['local_s']:.1f} | **1.00** | {', '.join(f'{t:.1f}' for t in r['local_runs_s'])} |
| `repux segment --server` (CLI client, end to end) | {r['client_s']:.1f} | **{r['client_over_local']:.3f}** | {', '.join(f'{t:.1f}' for t in r['client_runs_s'])} |

The same job through the API, phase by phase (medians):

| upload + volume check | queue wait | compute (server's `repux segment` process) | download | total |
|---:|---:|---:|---:|---:|
| {p['upload']:.2f} | {p['queue']:.2f} | {p['compute']:.1f} | {p['download']:.2f} | {p['total']:.1f} |

Time beyond compute: **{100 * r['beyond_compute_over_compute']:.1f} %** of compute. Labels identical to the local run: {r['identical_labels']}.
"""


if __name__ == "__main__":
    sys.exit(main())
