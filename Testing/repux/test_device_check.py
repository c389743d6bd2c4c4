"""benchmarks/device_check.sh, shrunk to the CPU: the prepared GPU check runs end to end and writes its report.

The real run needs a CUDA GPU; this runs the same script with ``--shrunk`` (a small CT, the
demo model, a small network's training iterations) as a real subprocess, about a minute on
2 cores, and reads what it wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_shrunk_device_check_writes_the_gpu_report(tmp_path) -> None:
    report = tmp_path / "RESULTS-gpu.md"
    completed = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--shrunk", "--python", sys.executable, "--out", str(report)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "speedup" in completed.stdout and "BFR-AdamW / AdamW per iteration" in completed.stdout
    text = report.read_text()
    for heading in ("## Segmentation", "## Agreement with trained weights", "## Where each stage ran", "## Training iterations"):
        assert heading in text
    assert "Still on the host:" in text and "shrunk run on the CPU" in text
    results = json.loads(report.with_suffix(".json").read_text())
    (demo,) = results["agreement"]
    reference, optimized = demo["runs"][:2]
    assert reference["path"]["name"] == "reference" and min(optimized["dice"]) > 0.99
    medians = results["training"]["median_s"]
    assert set(medians) == {"AdamW", "BFR-AdamW"} and all(seconds > 0 for seconds in medians.values())


def test_device_check_refuses_unknown_options_and_missing_wheels(tmp_path) -> None:
    script = str(ROOT / "benchmarks" / "device_check.sh")
    unknown = subprocess.run(["bash", script, "--turbo"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown option --turbo" in unknown.stderr
    # A copy in a folder without .whl/ (the script finds the repository from its own place).
    (tmp_path / "benchmarks").mkdir()
    copy = tmp_path / "benchmarks" / "device_check.sh"
    copy.write_text(Path(script).read_text())
    missing = subprocess.run(["bash", str(copy)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and ".whl/requirements.txt is missing" in missing.stderr
