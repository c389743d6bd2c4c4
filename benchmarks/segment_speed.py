"""Speed, memory and agreement of the optimized segmentation path against the published way.

Runs ``repux bench`` (see ``repux bench --help``) and writes the report to
``benchmarks/RESULTS.md`` and every measurement to ``benchmarks/segment_speed.json``:

    python benchmarks/segment_speed.py                  # paper width + trained bundles (~40 min on 2 CPU cores)
    python benchmarks/segment_speed.py --quick          # under 5 minutes
    python benchmarks/segment_speed.py --device cuda --model demo --model /path/to/paper-width-bundle

Every path segments the same phantom CT (512 x 512 x 200 voxels of 0.8 x 0.8 x 1.5 mm), each
in its own process: the reference the published way (plain float32 network, crop to the
foreground, sliding windows 4 per pass, overlap 0.5, constant blending), and the project's
paths (``repux.accel.optimize_for_inference`` with the reference's windows, what
``repux segment`` does, and fewer windows); see ``repux.bench.paths``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from repux.cli import main

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    sys.exit(
        main(
            [
                "bench",
                "--output",
                str(HERE / "RESULTS.md"),
                "--json",
                str(HERE / "segment_speed.json"),
                "--force",
                *sys.argv[1:],
            ]
        )
    )
