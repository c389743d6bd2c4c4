"""The shipped demo model: it loads, is what its card says, and segments an unseen phantom.

The thresholds come from what the model showed on its own validation split (mean organ
Dice 0.86; pancreas, the hardest, 0.79) minus a margin for one case's variation: a
mean below 0.75 or an organ below 0.6 on a phantom it never saw means the shipped weights
or the inference path broke, not bad luck.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from repux.bundle import load_bundle
from repux.bundle.store import SHIPPED_MODELS_DIR
from repux.cli.demo import DEFAULT_SEED
from repux.imageio import read_volume

ORGANS = ("spleen", "kidney", "liver", "pancreas")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_demo_bundle_is_small_labelled_and_synthetic() -> None:
    bundle = load_bundle("demo")
    weights = SHIPPED_MODELS_DIR / "demo" / "model.safetensors"
    assert weights.stat().st_size <= 10 * 1024 * 1024
    assert [label.name for label in bundle.labels] == ["background", *ORGANS]
    assert bundle.metadata.architecture == "repuxnet" and bundle.metadata.network["ks"] == 21
    assert "synthetic" in bundle.metadata.description.lower()
    provenance = bundle.metadata.provenance
    assert provenance["synthetic_only"] is True
    assert provenance["optimizer"]["name"] == "bfr-adamw"
    # The unseen demo phantom is not among the training phantoms' seeds.
    assert "--seed 7" in provenance["training_data"] and "--seed 0" in provenance["training_data"]


def test_demo_segments_an_unseen_phantom(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "repux", "demo", "-o", str(out), "--progress", "none"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr
    truth = read_volume(out / "truth.nii.gz").array
    labels = read_volume(out / "segmentation.nii.gz").array
    scores = {name: _dice(labels == value, truth == value) for value, name in enumerate(ORGANS, start=1)}
    assert min(scores.values()) > 0.6, scores
    mean = float(np.mean(list(scores.values())))
    assert mean > 0.75, scores
    # The printed summary agrees with the files.
    assert done.stdout.strip().splitlines()[-1] == f"mean Dice: {mean:.3f}"
    assert f"seed {DEFAULT_SEED}" in done.stdout
