"""The long fuzz run over every reader of user input; writes benchmarks/results/fuzz_inputs.json.

    python benchmarks/fuzz_inputs.py --examples 2000

Runs the targets of ``Testing/repux/test_fuzz_inputs.py`` (volume files, bundles, training
manifests, the Slicer runner's progress lines) with ``--examples`` random inputs each
(hypothesis; CI runs 60 fixed ones), and records how many inputs were tried, how they
ended (read, refused with the project's error, or a finding: another exception, a hang
past the time limit, a file written by a reader), every distinct finding, the peak memory
of the process and the time taken.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "Testing" / "repux"
#: The memory the run may reach (peak resident set, MB): torch and the readers' buffers, no more.
MEMORY_BOUND_MB = 4096


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="inputs per target (default 1000)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz_inputs.json")
    args = parser.parse_args(argv)

    os.environ["REPUX_FUZZ_EXAMPLES"] = str(args.examples)
    sys.path.insert(0, str(TESTS))
    import fuzz_support
    import pytest

    started = time.monotonic()
    quiet = ["-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    status = pytest.main([*quiet, str(TESTS / "test_fuzz_inputs.py")])
    seconds = time.monotonic() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tried = sum(fuzz_support.COUNTS.values())
    report = {
        "examples_per_target": args.examples,
        "inputs_tried": tried,
        "outcomes": dict(fuzz_support.COUNTS),
        "findings": dict(fuzz_support.FINDINGS),
        "pytest_exit_status": int(status),
        "peak_memory_mb": round(peak_mb, 1),
        "memory_bound_mb": MEMORY_BOUND_MB,
        "seconds": round(seconds, 1),
        "time_limit_per_input_s": fuzz_support.TIME_LIMIT_S,
        "note": "findings: inputs that ended in anything but success or the project's own error type",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    within_memory = peak_mb <= MEMORY_BOUND_MB
    return 0 if status == 0 and within_memory else 1


if __name__ == "__main__":
    sys.exit(main())
