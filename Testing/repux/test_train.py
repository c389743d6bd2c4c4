"""``repux train`` end to end through the real command line: a tiny RepUX-Net on tiny phantoms.

Every run is a real subprocess on real NIfTI files; the exported bundle is read back with
``load_bundle``. Sizes keep each run to a few seconds on two shared cores: widths
(4, 8, 16, 32), 9^3 kernels (FFT path), 32^3 patches at 8 mm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from repux.bundle import load_bundle, save_bundle
from repux.bundle.metadata import BundleMetadata, default_preprocessing
from repux.bundle.presets import label_preset
from repux.data.phantoms import write_phantom_dataset
from repux.imageio import read_volume, write_volume
from repux.network import build_network

TINY_NETWORK = {"arch": "repuxnet", "feat_size": [4, 8, 16, 32], "hidden_size": 32, "ks": 9}
FAST = ["--patch-size", "32", "--spacing", "8", "--progress", "jsonl"]


def run_repux(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # One thread per process: the test machine's cores are shared, and oversubscribed
    # OpenMP threads make each step several times slower.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "repux", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def jsonl(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_phantom_dataset(5, tmp_path_factory.mktemp("data") / "phantoms", seed=3, shape=(40, 40, 28))


@pytest.fixture(scope="module")
def network_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("net") / "tiny.json"
    path.write_text(json.dumps(TINY_NETWORK))
    return path


def test_trains_from_scratch_and_exports_a_bundle_with_provenance(dataset, network_json, tmp_path):
    out = tmp_path / "model"
    args = ["train", str(dataset), "-o", str(out), "--network", str(network_json), "--iterations", "4"]
    args += ["--val-every", "2", "--seed", "5", *FAST]
    result = run_repux(*args)
    assert result.returncode == 0, result.stderr

    records = jsonl(result.stdout)  # every line is one JSON object
    steps = [r for r in records if r["stage"] == "train" and "iteration" in r and "loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    assert all(r["total"] == 4 and np.isfinite(r["loss"]) and r["eta"] is not None for r in steps)
    assert steps[0]["dice"] is None and 0 <= steps[-1]["dice"] <= 1  # after the first validation
    assert records[-1]["stage"] == "done" and records[-1]["bundle"] == str(out)

    bundle = load_bundle(out)
    meta = bundle.metadata
    assert [label.name for label in meta.labels] == [label.name for label in label_preset("flare")]
    assert meta.preprocessing["spacing"] == [8.0, 8.0, 8.0] and meta.preprocessing["patch_size"] == [32, 32, 32]
    assert meta.network["feat_size"] == [4, 8, 16, 32] and meta.network["ks"] == 9
    prov = meta.provenance
    manifest = json.loads((dataset / "dataset.json").read_text())
    ids = {Path(entry["image"]).name.removesuffix(".nii.gz") for entry in manifest["training"]}
    cases = prov["training_cases"]
    assert cases["count"] == 5 and set(cases["train"]) | set(cases["validation"]) == ids
    assert len(cases["validation"]) == 1 and not set(cases["train"]) & set(cases["validation"])
    assert prov["training_data"] == str(dataset.resolve())
    assert prov["optimizer"]["name"] == "bfr-adamw" and prov["optimizer"]["alpha"] == 1.0
    assert prov["optimizer"]["lr"] == 1e-4 and prov["optimizer"]["weight_decay"] == 0.01
    assert prov["iterations"] == 4 and prov["seed"] == 5 and prov["exported_iteration"] in (2, 4)
    assert "--iterations 4" in prov["command"] and prov["command"].startswith("repux train")
    assert set(prov["validation_dice"]) <= {"spleen", "kidney", "liver", "pancreas", "mean"}
    assert "mean" in prov["validation_dice"] and 0 <= prov["validation_dice_with_background"] <= 1
    assert "background excluded" in prov["selection"]

    # The exported network is the best validated one, and it runs.
    workdir = tmp_path / "model.work"
    best = load_file(str(workdir / "best.safetensors"))
    assert all(torch.equal(best[k], v) for k, v in bundle.state_dict().items())
    logits = bundle.build_network()(torch.zeros(1, 1, 32, 32, 32))
    assert logits.shape == (1, 5, 32, 32, 32)

    # A second run must not silently replace the bundle or the earlier run's checkpoint.
    again = run_repux(*args)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["stage"] == "error"


def test_refuses_a_bad_case_before_training(dataset, network_json, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    label_path = data / "labelsTr" / "phantom_002.nii.gz"
    label = read_volume(label_path)
    array = label.array.copy()
    array[:2, :2, :2] = 9
    write_volume(label.with_array(array), label_path, overwrite=True)

    out = tmp_path / "model"
    result = run_repux("train", str(data), "-o", str(out), "--network", str(network_json), "--iterations", "2", *FAST)
    assert result.returncode == 2
    assert "phantom_002" in result.stderr and "9" in result.stderr and "outside the allowed values 0-4" in result.stderr
    assert "phantom_001" not in result.stderr
    assert not out.exists() and not (tmp_path / "model.work" / "checkpoint.pt").exists()
    assert not any(r.get("stage") == "train" for r in jsonl(result.stdout))


def tiny_bundle(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = {k: v for k, v in TINY_NETWORK.items() if k != "arch"}
    network = build_network("repuxnet", **config, out_chans=5)
    metadata = BundleMetadata(
        name="tiny",
        architecture="repuxnet",
        network={k: v for k, v in network.config.items() if k != "arch"},
        labels=label_preset("flare"),
        preprocessing=default_preprocessing((8.0, 8.0, 8.0), (32, 32, 32)),
    )
    return save_bundle(network, metadata, folder)


def test_fine_tunes_a_bundle_to_other_labels_mapping_rows_by_name(dataset, tmp_path):
    source = load_bundle(tiny_bundle(tmp_path / "source"))
    # flare21 orders the same organs differently: liver, kidney, spleen, pancreas.
    out = tmp_path / "tuned"
    result = run_repux(
        "train", str(dataset), "-o", str(out), "--model", str(source.path), "--labels", "flare21",
        "--iterations", "1", "--val-fraction", "0", "--progress", "jsonl",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tuned = load_bundle(out)
    assert [label.name for label in tuned.labels] == ["background", "liver", "kidney", "spleen", "pancreas"]
    prov = tuned.metadata.provenance
    assert prov["head_mapping"] == {name: name for name in ["background", "liver", "kidney", "spleen", "pancreas"]}
    assert prov["source"].endswith(f"bundle {source.path}") and prov["training_cases"]["validation"] == []
    assert tuned.metadata.preprocessing == source.metadata.preprocessing  # the bundle's spacing and patch

    old, new = source.state_dict(), tuned.state_dict()
    # One AdamW step moves a weight by about lr = 1e-4: rows must sit next to their source row.
    for key in ("out.conv.conv.weight", "out.conv.conv.bias"):
        for new_row, old_row in enumerate([0, 3, 2, 1, 4]):
            assert torch.allclose(new[key][new_row], old[key][old_row], atol=3e-4), (key, new_row)
        assert not torch.allclose(new[key][1], old[key][1], atol=3e-4)  # liver is not spleen's row
