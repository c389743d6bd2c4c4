"""``repux train --patience``: stop when the validation Dice stops improving, and stay stopped on resume.

Real subprocesses on tiny phantoms. The learning rate is so small (1e-30, no weight decay)
that no weight changes in float32, so every validation gives exactly the first one's Dice:
"not better" is certain, and the iteration where training must stop is known in advance.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from repux.bundle import load_bundle
from train_support import ENV, checkpoint_iteration, records, tiny_training_setup, train_args

FROZEN = ["--lr", "1e-30", "--weight-decay", "0", "--val-every", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_training_setup(tmp_path_factory.mktemp("patience"))


def run(args: list[str]) -> list[dict]:
    result = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    return records(result.stdout)


def steps(lines: list[dict]) -> list[int]:
    return [r["iteration"] for r in lines if r["stage"] == "train" and "loss" in r]


def test_stops_when_validation_stops_improving_and_resume_respects_it(setup, tmp_path):
    data, network = setup
    out, workdir = tmp_path / "model", tmp_path / "model.work"
    base = [*train_args(data, network, out, iterations=20, every=20), *FROZEN]

    # Best at the first validation (2); 4 and 6 are equal, not better: 6 - 2 >= 4 stops.
    lines = run([*base, "--patience", "4"])
    assert steps(lines) == list(range(1, 7))
    assert any(r.get("stopped_early") for r in lines)
    prov = load_bundle(out).metadata.provenance
    assert (prov["iterations"], prov["exported_iteration"], prov["stopped_early"], prov["patience"]) == (6, 2, True, 4)
    assert checkpoint_iteration(workdir) == 6  # saved at the stop although the interval is 20

    # Resumed with the same patience, the run is already over: no step is taken.
    again = run([*base, "--patience", "4", "--resume", "--force"])
    assert steps(again) == [] and load_bundle(out).metadata.provenance["iterations"] == 6

    # A larger patience continues from the checkpoint: validations at 8 and 10, stop at 10.
    longer = run([*base, "--patience", "8", "--resume", "--force"])
    assert steps(longer) == list(range(7, 11))
    prov = load_bundle(out).metadata.provenance
    assert (prov["iterations"], prov["exported_iteration"], prov["stopped_early"]) == (10, 2, True)


def test_without_patience_runs_every_iteration(setup, tmp_path):
    data, network = setup
    out = tmp_path / "model"
    lines = run([*train_args(data, network, out, iterations=8, every=8), *FROZEN])
    assert steps(lines) == list(range(1, 9))
    prov = load_bundle(out).metadata.provenance
    assert (prov["iterations"], prov["stopped_early"], prov["patience"]) == (8, False, None)


def test_refuses_a_patience_below_one(setup, tmp_path):
    data, network = setup
    args = [*train_args(data, network, tmp_path / "model", iterations=4, every=4), "--patience", "0"]
    result = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 2 and "--patience 0" in result.stderr
    assert not (tmp_path / "model").exists()
