"""Data-parallel training: ``torchrun --nproc_per_node 2`` runs the same ``repux train`` command
on two CPU processes (gloo backend); the ranks end with identical weights and rank 0 alone
writes the bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from repux.bundle import load_bundle
from repux.data.phantoms import write_phantom_dataset
from repux.train.distributed import weights_digest

TINY_NETWORK = {"arch": "repuxnet", "feat_size": [4, 8, 16, 32], "hidden_size": 32, "ks": 9}


def test_two_processes_keep_identical_weights(tmp_path):
    data = write_phantom_dataset(5, tmp_path / "phantoms", seed=21, shape=(40, 40, 28))
    network = tmp_path / "tiny.json"
    network.write_text(json.dumps(TINY_NETWORK))
    out, workdir = tmp_path / "model", tmp_path / "model.work"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "repux", "train", str(data), "-o", str(out), "--network", str(network), "--device", "cpu",
        "--iterations", "3", "--val-every", "3", "--patch-size", "32", "--spacing", "8", "--progress", "jsonl",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    digests = [(workdir / f"weights-rank{rank}.sha256").read_text().strip() for rank in (0, 1)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]

    # Only rank 0 reports: one "done" record and each iteration once.
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["stage"] for r in records].count("done") == 1
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3]

    bundle = load_bundle(out)
    assert bundle.metadata.provenance["optimizer"]["processes"] == 2
    assert bundle.metadata.provenance["iterations"] == 3
    # The exported weights are the ranks' weights: a network built from them has the same digest.
    exported = bundle.build_network().state_dict()
    assert weights_digest(exported) == digests[0]
    assert all(torch.isfinite(v).all() for v in exported.values() if v.is_floating_point())
