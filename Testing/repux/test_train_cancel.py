"""Cancel: SIGTERM (what Ctrl-C and the Slicer module's Cancel amount to) saves a checkpoint on
the way out, and that checkpoint is neither overwritten by a fresh start nor resumed with
other settings.

Real subprocesses of ``repux train`` on tiny phantoms (sizes as in test_train.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from train_support import ENV, checkpoint_iteration, records, tiny_training_setup, train_args


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_training_setup(tmp_path_factory.mktemp("resume"))


def test_sigterm_saves_a_checkpoint_that_later_runs_respect(setup, tmp_path):
    data, network = setup
    out, workdir = tmp_path / "model", tmp_path / "model.work"
    process = subprocess.Popen(
        train_args(data, network, out, iterations=40, every=100), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=ENV, text=True,
    )  # fmt: skip
    seen = []
    for line in process.stdout:
        seen.append(json.loads(line))
        if seen[-1].get("iteration", 0) >= 3 and "loss" in seen[-1]:
            break
    assert not (workdir / "checkpoint.pt").exists()  # no periodic checkpoint before 100
    process.send_signal(signal.SIGTERM)
    rest, stderr = process.communicate(timeout=120)
    seen += records(rest)
    assert process.returncode == 143, stderr  # 128 + SIGTERM, as a shell reports it
    assert seen[-1] == {"stage": "cancelled"} and "cancelled" in stderr
    cancelled = [r for r in seen if "cancelled at iteration" in r.get("message", "")]
    assert len(cancelled) == 1
    saved = checkpoint_iteration(workdir)
    assert saved == cancelled[0]["iteration"] >= 3
    assert not out.exists()

    # Neither a fresh start over the checkpoint nor a resume with other settings is allowed.
    args = train_args(data, network, out, iterations=40, every=100)
    fresh = subprocess.run(args, capture_output=True, text=True, env=ENV)
    assert fresh.returncode == 2 and "--resume" in fresh.stderr and "holds a checkpoint" in fresh.stderr
    changed = subprocess.run([*args, "--resume", "--lr", "2e-4"], capture_output=True, text=True, env=ENV)
    assert changed.returncode == 2 and "lr: checkpoint 0.0001, now 0.0002" in changed.stderr
    assert checkpoint_iteration(workdir) == saved


def test_a_validation_cut_short_runs_again_on_resume(setup, tmp_path, monkeypatch):
    from repux.train import TrainConfig, train, trainer

    data, network = setup

    def config(resume: bool) -> TrainConfig:
        return TrainConfig(
            data_dir=data, output=tmp_path / "model", network=str(network), iterations=4, val_every=2,
            checkpoint_every=100, patch_size=32, spacing=8, seed=11, resume=resume,
        )  # fmt: skip

    real_validate = trainer.validate
    calls = []

    def cancelled_on_second_call(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:  # the validation after the last iteration
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "validate", cancelled_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        train(config(resume=False))
    assert checkpoint_iteration(tmp_path / "model.work") == 4 and not (tmp_path / "model").exists()

    monkeypatch.setattr(trainer, "validate", real_validate)
    result = train(config(resume=True))
    assert [record["iteration"] for record in result.history] == [2, 4]
    assert result.iterations == 4 and (tmp_path / "model" / "model.json").exists()
