"""repux models check: label order against abdominal anatomy, on phantoms, in any orientation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from repux.bundle import label_preset, load_bundle, save_bundle
from repux.bundle.labels import Label
from repux.cli import main
from repux.data.phantoms import make_phantom
from repux.hub.label_check import check_labels
from repux.imageio import write_volume


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PIR"])
def test_true_labels_are_consistent_and_flare21_names_on_them_look_swapped(orientation):
    ct, truth = make_phantom(11, orientation=orientation)  # label values in the "flare" order
    check = check_labels(truth, label_preset("flare"), ct)
    assert check.consistent and len(check.results) == 8, check.report()
    swapped = check_labels(truth, label_preset("flare21"), ct)
    assert not swapped.consistent
    assert [(a.value, a.name, b.value, b.name) for a, b in swapped.swaps] == [(1, "liver", 3, "spleen")]
    assert swapped.fixed_names == [label.name for label in label_preset("flare")]
    failed = {text for text, ok in swapped.results if not ok}
    assert "liver lies mostly on the patient's right" in failed and "spleen lies on the patient's left" in failed
    assert "kidneys lie on both sides" not in failed  # the kidney label is right in both orders


def test_right_and_left_kidney_swapped_are_found():
    """AMOS names right and left kidney apart: split the phantom's kidneys by side, then swap names."""
    ct, truth = make_phantom(12, orientation="LPS", oblique=False)
    labels = truth.array.copy()
    i = np.arange(labels.shape[0])[:, None, None]
    x_ras = -(truth.origin[0] + i * truth.spacing[0])  # LPS grid: RAS x = -LPS x
    kidney = labels == 2
    midline = np.mean(-(truth.origin[0] + np.argwhere(ct.array > -300)[:, 0] * truth.spacing[0]))
    labels[kidney & (np.broadcast_to(x_ras, labels.shape) > midline)] = 2  # right kidney
    labels[kidney & (np.broadcast_to(x_ras, labels.shape) <= midline)] = 5  # left kidney
    names = {1: "spleen", 2: "right kidney", 3: "liver", 4: "pancreas", 5: "left kidney"}
    right = [Label(0, "background", (0, 0, 0))] + [Label(v, n, (1, 2, 3)) for v, n in names.items()]
    assert check_labels(truth.with_array(labels), right, ct).consistent
    names[2], names[5] = names[5], names[2]
    wrong = [Label(0, "background", (0, 0, 0))] + [Label(v, n, (1, 2, 3)) for v, n in names.items()]
    check = check_labels(truth.with_array(labels), wrong, ct)
    assert [(a.name, b.name) for a, b in check.swaps] == [("left kidney", "right kidney")], check.report()


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory) -> Path:
    ct, _ = make_phantom(1001, spacing=(4.0, 4.0, 4.0), orientation="PIR")  # the demo's spacing: quick
    return write_volume(ct, tmp_path_factory.mktemp("ct") / "ct.nii.gz")


def test_check_cli_passes_the_demo_and_catches_a_bundle_with_swapped_names(phantom_ct, tmp_path, capsys):
    assert main(["models", "check", "demo", str(phantom_ct), "--device", "cpu", "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "labels are consistent with the anatomy" in out and "FAIL" not in out

    demo = load_bundle("demo")
    swapped = dataclasses.replace(demo.metadata, labels=label_preset("flare21"))  # liver and spleen names exchanged
    save_bundle(demo.state_dict(), swapped, tmp_path / "swapped")
    code = main(
        ["models", "check", str(tmp_path / "swapped"), str(phantom_ct), "--device", "cpu", "--progress", "none"]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "labels look swapped: 1 'liver' <-> 3 'spleen'" in out
    assert "the label order of preset 'flare' fits this CT: import the checkpoint with --labels flare" in out


def test_check_refuses_a_missing_ct(tmp_path, capsys):
    assert main(["models", "check", "demo", str(tmp_path / "none.nii.gz"), "--progress", "none"]) == 2
    assert "none.nii.gz" in capsys.readouterr().err
