"""repux import-checkpoint: published .pth state_dicts -> bundles, weights-only loading, clear refusals."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from repux.bundle import label_preset, labels_from_json, load_bundle
from repux.cli import main
from repux.network import build_network

TINY = {"feat_size": [4, 8, 12, 16], "hidden_size": 16}

# Preprocessing of the published recipe (spec/ORIGINAL_REPUXNET.md, "Training recipe").
FLARE_SPACING = [1.0, 1.0, 1.2]
AMOS_SPACING = [1.5, 1.5, 2.0]
PUBLISHED_INTENSITY = {"a_min": -125.0, "a_max": 275.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
PUBLISHED_INFERENCE = {"overlap": 0.5, "sw_batch_size": 4, "blend": "constant"}


def tiny_network(arch: str = "repuxnet", out_chans: int = 5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"ks": 5} if arch == "repuxnet" else {}
    network = build_network(arch, in_chans=1, out_chans=out_chans, **TINY, **extra)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_var.uniform_(0.5, 2)
    return network


def run_cli(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    """The real command in its own process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "repux", "import-checkpoint", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def import_in_process(capsys: pytest.CaptureFixture, *args: str | os.PathLike) -> tuple[int, str]:
    """The same command through ``repux.cli.main`` (one process for the many refusal cases)."""
    code = main(["import-checkpoint", *map(str, args)])
    return code, capsys.readouterr().err


def assert_same_weights(bundle_dir: Path, network: torch.nn.Module) -> None:
    loaded = load_bundle(bundle_dir).state_dict()
    original = network.state_dict()
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


LAYOUTS = {
    "raw": lambda sd: sd,
    "state_dict wrapper": lambda sd: {"state_dict": sd, "epoch": 12, "best_dice": 0.9},
    "model wrapper": lambda sd: {"model": sd, "optimizer": {"lr": 1e-4}},
    "model_state_dict wrapper": lambda sd: {"model_state_dict": sd, "iteration": 500},
    "module. prefix": lambda sd: {f"module.{key}": value for key, value in sd.items()},
    "module. prefix in a wrapper": lambda sd: {"state_dict": {f"module.{key}": value for key, value in sd.items()}},
}
# Each subprocess spends seconds importing torch: two layouts (the published one and both
# unwrappings at once) go through a separate process, the rest through the same main().
IN_SUBPROCESS = ("raw", "module. prefix in a wrapper")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cli_imports_each_checkpoint_layout(tmp_path: Path, capsys: pytest.CaptureFixture, layout: str) -> None:
    network = tiny_network()
    checkpoint = tmp_path / "best_metric_model.pth"
    torch.save(LAYOUTS[layout](network.state_dict()), checkpoint)
    out = tmp_path / "bundle"

    args = [checkpoint, "--arch", "repuxnet", "--labels", "flare", "-o", out]
    if layout in IN_SUBPROCESS:
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
    else:
        code, err = import_in_process(capsys, *args)
        assert code == 0, err
    assert_same_weights(out, network)

    metadata = load_bundle(out).metadata
    config = dict(network.config)
    assert metadata.architecture == config.pop("arch")
    assert metadata.network == config
    assert metadata.labels == label_preset("flare")
    assert metadata.name == "best_metric_model"
    assert metadata.preprocessing == {
        "spacing": FLARE_SPACING,
        "orientation": "RAS",
        "intensity": PUBLISHED_INTENSITY,
        "patch_size": [96, 96, 96],
    }
    assert metadata.inference == PUBLISHED_INFERENCE
    assert metadata.provenance["source_file"] == "best_metric_model.pth"
    assert metadata.provenance["source_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert metadata.provenance["command"].startswith("repux import-checkpoint ")


class TrainerState:
    """A custom class a careless training script might pickle next to the weights."""

    def __init__(self) -> None:
        self.epoch = 3


@dataclass
class MakeDirectoryOnLoad:
    """Unpickling this runs ``os.mkdir(path)``: a stand-in for any code a pickle can carry."""

    path: str

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_cli_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_network().state_dict(), "hook": MakeDirectoryOnLoad(str(marker))}, checkpoint)

    result = run_cli(checkpoint, "--arch", "repuxnet", "--labels", "flare", "-o", tmp_path / "bundle")
    assert result.returncode == 2
    assert re.search(
        rf"{re.escape(str(checkpoint))}: refusing to load: the file is a pickle that needs code \(\S*mkdir\)",
        result.stderr,
    ), result.stderr
    assert "running code from a model file is unsafe" in result.stderr
    assert not marker.exists() and not (tmp_path / "bundle").exists()

    # The file really asks for code, without our running it: the pickle names os.mkdir
    # (posix.mkdir) and torch's own weights-only loader refuses it for that reason.
    with zipfile.ZipFile(checkpoint) as archive:
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    assert b"mkdir" in pickled
    with pytest.raises(pickle.UnpicklingError, match="mkdir"):
        torch.load(checkpoint, weights_only=True)


def test_cli_refuses_a_pickle_with_a_custom_class(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "trainer.pth"
    torch.save({"state_dict": tiny_network().state_dict(), "trainer": TrainerState()}, checkpoint)

    code, err = import_in_process(capsys, checkpoint, "--arch", "repuxnet", "--labels", "flare", "-o", tmp_path / "b")
    assert code == 2
    assert f"{checkpoint}: refusing to load: the file is a pickle that needs code" in err
    assert "TrainerState" in err
    assert "torch.save(model.state_dict(), path)" in err
    assert not (tmp_path / "b").exists()


def test_uxnet_amos_checkpoint_gets_amos_defaults(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    network = tiny_network("uxnet", out_chans=16)
    checkpoint = tmp_path / "uxnet_amos.pth"
    torch.save(network.state_dict(), checkpoint)
    code, err = import_in_process(capsys, checkpoint, "--arch", "uxnet", "--labels", "amos", "-o", tmp_path / "b")
    assert code == 0, err
    assert_same_weights(tmp_path / "b", network)
    metadata = load_bundle(tmp_path / "b").metadata
    assert metadata.architecture == "uxnet"
    assert metadata.preprocessing["spacing"] == AMOS_SPACING
    assert [label.value for label in metadata.labels] == list(range(16))


def test_options_override_the_defaults(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    network = tiny_network()
    checkpoint = tmp_path / "model.pth"
    torch.save(network.state_dict(), checkpoint)
    args = ["--arch", "repuxnet", "--labels", "flare21", "--spacing", "0.8", "0.8", "2.5", "--patch-size", "64"]
    code, err = import_in_process(capsys, checkpoint, *args, "--name", "my model", "-o", tmp_path / "b")
    assert code == 0, err
    metadata = load_bundle(tmp_path / "b").metadata
    assert metadata.name == "my model"
    assert metadata.labels == label_preset("flare21")
    assert metadata.preprocessing["spacing"] == [0.8, 0.8, 2.5]
    assert metadata.preprocessing["patch_size"] == [64, 64, 64]


def test_float16_option_halves_the_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    network = tiny_network()
    checkpoint = tmp_path / "model.pth"
    torch.save(network.state_dict(), checkpoint)
    common = [checkpoint, "--arch", "repuxnet", "--labels", "flare"]
    for out, extra in (("b32", []), ("b16", ["--float16"])):
        code, err = import_in_process(capsys, *common, "-o", tmp_path / out, *extra)
        assert code == 0, err
    size = {out: (tmp_path / out / "model.safetensors").stat().st_size for out in ("b32", "b16")}
    assert size["b16"] < 0.6 * size["b32"]
    weights = load_bundle(tmp_path / "b16").state_dict()
    key = "repuxnet_3d.stages.0.0.dwconv.weight"
    assert weights[key].dtype == torch.float32
    assert torch.equal(weights[key], network.state_dict()[key].half().float())


def test_label_file_needs_spacing_then_imports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    network = tiny_network(out_chans=3)
    checkpoint = tmp_path / "model.pth"
    torch.save(network.state_dict(), checkpoint)
    label_file = tmp_path / "labels.json"
    label_file.write_text(
        json.dumps(
            {
                "labels": [
                    {"value": 0, "name": "background", "color": [0, 0, 0]},
                    {"value": 1, "name": "liver", "color": [221, 130, 101]},
                    {"value": 2, "name": "tumour", "color": [250, 250, 0]},
                ]
            }
        )
    )
    args = [checkpoint, "--arch", "repuxnet", "--labels", label_file, "-o", tmp_path / "b"]
    code, err = import_in_process(capsys, *args)
    assert code == 2
    assert f"--spacing is required with the label file {label_file}" in err
    code, err = import_in_process(capsys, *args, "--spacing", "1", "1", "1")
    assert code == 0, err
    assert load_bundle(tmp_path / "b").labels == labels_from_json(label_file)


def test_overwrite_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first, second = tiny_network(seed=1), tiny_network(seed=2)
    out = tmp_path / "bundle"
    for i, network in enumerate((first, second)):
        torch.save(network.state_dict(), tmp_path / f"m{i}.pth")
    common = ["--arch", "repuxnet", "--labels", "flare", "-o", out]
    assert import_in_process(capsys, tmp_path / "m0.pth", *common)[0] == 0

    code, err = import_in_process(capsys, tmp_path / "m1.pth", *common)
    assert code == 2
    assert f"repux import-checkpoint: error: {out}: already exists; refusing to overwrite it (use --force)" in err
    assert_same_weights(out, first)

    code, err = import_in_process(capsys, tmp_path / "m1.pth", *common, "--force")
    assert code == 0, err
    assert_same_weights(out, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "m0.pth", "m1.pth"]


def test_label_count_must_match_the_outputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "amos16.pth"
    torch.save(tiny_network(out_chans=16).state_dict(), checkpoint)
    code, err = import_in_process(capsys, checkpoint, "--arch", "repuxnet", "--labels", "flare", "-o", tmp_path / "b")
    assert code == 2
    assert f"{checkpoint}: the network has 16 output channels but the labels give 5" in err
    assert not (tmp_path / "b").exists()


def test_wrong_architecture_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "uxnet.pth"
    torch.save(tiny_network("uxnet").state_dict(), checkpoint)
    code, err = import_in_process(capsys, checkpoint, "--arch", "repuxnet", "--labels", "flare", "-o", tmp_path / "b")
    assert code == 2
    assert re.search(rf"{re.escape(str(checkpoint))}: .*not a repuxnet network.*uxnet network", err), err


def test_checkpoint_without_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "optimizer_only.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 1e-4}}, checkpoint)
    code, err = import_in_process(capsys, checkpoint, "--arch", "repuxnet", "--labels", "flare", "-o", tmp_path / "b")
    assert code == 2
    assert f"{checkpoint}: no state_dict found" in err and "['epoch', 'optimizer']" in err


@pytest.mark.parametrize(
    "kind, message",
    [
        ("text", "not a readable PyTorch checkpoint"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("empty", "the file is empty"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, message: str) -> None:
    checkpoint = tmp_path / "model.pth"
    if kind == "truncated":
        torch.save(tiny_network().state_dict(), checkpoint)
        data = checkpoint.read_bytes()
        checkpoint.write_bytes(data[: len(data) // 2])
    else:
        checkpoint.write_text("hello, I am a text file\n" if kind == "text" else "")
    code, err = import_in_process(capsys, checkpoint, "--arch", "repuxnet", "--labels", "flare", "-o", tmp_path / "b")
    assert code == 2
    assert f"repux import-checkpoint: error: {checkpoint}: {message}" in err
    assert not (tmp_path / "b").exists()


def test_missing_checkpoint_and_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "none.pth"
    code, err = import_in_process(capsys, missing, "--arch", "repuxnet", "--labels", "flare", "-o", tmp_path / "b")
    assert code == 2 and f"{missing}: file not found" in err
    checkpoint = tmp_path / "model.pth"
    torch.save(tiny_network().state_dict(), checkpoint)
    common = [checkpoint, "--arch", "repuxnet", "--labels", "flare", "-o", tmp_path / "b"]
    code, err = import_in_process(capsys, *common, "--patch-size", "100")
    assert code == 2 and "--patch-size 100: expected 1 or 3 positive multiples of 16" in err
    code, err = import_in_process(capsys, *common, "--spacing", "1", "0", "1")
    assert code == 2 and "--spacing 1.0 0.0 1.0: expected 3 positive numbers (mm)" in err
    code, err = import_in_process(capsys, checkpoint, "--arch", "repuxnet", "--labels", "kits", "-o", tmp_path / "b")
    assert code == 2 and "--labels kits: expected a preset (flare, flare21, amos) or a JSON label file" in err
    assert not (tmp_path / "b").exists()
