"""Resume: a run killed with SIGKILL continues from its last checkpoint and ends where an
uninterrupted run with the same seed ends.

Real subprocesses of ``repux train`` on tiny phantoms (sizes as in test_train.py).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from repux.bundle import load_bundle
from train_support import ENV, checkpoint_iteration, records, tiny_training_setup, train_args


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_training_setup(tmp_path_factory.mktemp("resume"))


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended (rc {process.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def test_resume_after_sigkill_continues_and_matches_an_uninterrupted_run(setup, tmp_path):
    data, network = setup
    out, workdir = tmp_path / "model", tmp_path / "model.work"
    args = train_args(data, network, out, iterations=10, every=2)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    wait_for(workdir / "checkpoint.pt", process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed_at = checkpoint_iteration(workdir)
    assert killed_at in range(2, 10, 2) and not out.exists()

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    lines = records(resumed.stdout)
    steps = [r["iteration"] for r in lines if r["stage"] == "train" and "loss" in r]
    assert steps == list(range(killed_at + 1, 11))
    assert any(f"at iteration {killed_at}" in r.get("message", "") for r in lines)

    reference_out = tmp_path / "reference"
    reference = subprocess.run(train_args(data, network, reference_out, 10, 2), capture_output=True, text=True, env=ENV)
    assert reference.returncode == 0, reference.stderr

    got, want = load_bundle(out), load_bundle(reference_out)
    assert got.metadata.provenance["iterations"] == want.metadata.provenance["iterations"] == 10
    assert got.metadata.provenance["validation_dice"] == want.metadata.provenance["validation_dice"]
    got_weights, want_weights = got.state_dict(), want.state_dict()
    assert all(torch.equal(got_weights[key], want_weights[key]) for key in want_weights)
    # The optimizer went on from its saved state: step counts are the full run's.
    state = torch.load(workdir / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 10
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {10.0}
