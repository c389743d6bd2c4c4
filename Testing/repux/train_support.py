"""Shared set-up of the tests that run ``repux train`` as a real subprocess and stop it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from repux.data.phantoms import write_phantom_dataset

TINY_NETWORK = {"arch": "repuxnet", "feat_size": [4, 8, 16, 32], "hidden_size": 32, "ks": 9}
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def tiny_training_setup(root: Path) -> tuple[Path, Path]:
    """Four tiny phantoms and a tiny network config under ``root``: (dataset folder, config .json)."""
    data = write_phantom_dataset(4, root / "phantoms", seed=8, shape=(40, 40, 28))
    network = root / "tiny.json"
    network.write_text(json.dumps(TINY_NETWORK))
    return data, network


def train_args(data: Path, network: Path, out: Path, iterations: int, every: int) -> list[str]:
    return [
        sys.executable, "-m", "repux", "train", str(data), "-o", str(out), "--network", str(network),
        "--iterations", str(iterations), "--checkpoint-every", str(every), "--val-every", "4",
        "--patch-size", "32", "--spacing", "8", "--seed", "11", "--progress", "jsonl",
    ]  # fmt: skip


def checkpoint_iteration(workdir: Path) -> int:
    return int(torch.load(workdir / "checkpoint.pt", weights_only=True)["iteration"])


def records(text: str) -> list[dict]:
    """The JSON objects of a ``--progress jsonl`` output."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]
