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


# Boxes in patient RAS mm (x to the patient's right, y anterior, z superior), a textbook
# arrangement of the 15 AMOS organs.
AMOS_BOXES = {
    "spleen": ((-90, -60), (-40, 0), (40, 70)),
    "right kidney": ((30, 50), (-60, -40), (10, 40)),
    "left kidney": ((-50, -30), (-60, -40), (15, 45)),
    "gallbladder": ((30, 45), (20, 35), (20, 35)),
    "esophagus": ((-10, 0), (-30, -20), (80, 98)),
    "liver": ((20, 90), (-20, 40), (40, 90)),
    "stomach": ((-60, -10), (0, 40), (45, 75)),
    "aorta": ((-10, 0), (-40, -30), (-40, 78)),
    "inferior vena cava": ((10, 20), (-40, -30), (-40, 78)),
    "pancreas": ((-50, 20), (-20, -10), (25, 35)),
    "right adrenal gland": ((30, 45), (-55, -40), (42, 52)),
    "left adrenal gland": ((-45, -30), (-55, -40), (47, 57)),
    "duodenum": ((20, 35), (-15, 0), (15, 30)),
    "urinary bladder": ((-15, 15), (0, 20), (-95, -75)),
    "prostate/uterus": ((-10, 10), (-20, -5), (-98, -90)),
}


def amos_scene(names: dict[str, str] | None = None):
    """A CT (body box) and labels of the AMOS preset drawn from AMOS_BOXES, on a 2 mm RAS grid;
    ``names`` maps an organ to the box it is drawn in (a deliberate mix-up)."""
    from repux.imageio import Volume

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-100.0, -80.0, -100.0)  # voxel (i, j, k) at RAS (-100 + 2i, -80 + 2j, -100 + 2k)
    shape = (101, 81, 101)
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[5:96, 5:76, :] = 20  # the body, centred on x = 0, y = 0
    labels = np.zeros(shape, dtype=np.uint8)
    for label in label_preset("amos")[1:]:
        box = AMOS_BOXES[(names or {}).get(label.name, label.name)]
        index = [slice(int((lo - o) / 2), int((hi - o) / 2)) for (lo, hi), o in zip(box, (-100, -80, -100))]
        labels[tuple(index)] = label.value
    return Volume.from_affine(ct, affine), Volume.from_affine(labels, affine)


def test_the_amos_organs_in_place_pass_every_rule():
    ct, labels = amos_scene()
    check = check_labels(labels, label_preset("amos"), ct)
    assert check.consistent, check.report()
    assert len(check.results) == 19 and not check.missing  # all rules but the two about one 'kidney' label


@pytest.mark.parametrize(
    "a, b",
    [("aorta", "inferior vena cava"), ("liver", "stomach"), ("urinary bladder", "esophagus"), ("gallbladder", "spleen")],
)
def test_two_amos_organs_drawn_in_each_others_place_are_named(a, b):
    ct, labels = amos_scene({a: b, b: a})
    check = check_labels(labels, label_preset("amos"), ct)
    assert not check.consistent
    assert [{x.name, y.name} for x, y in check.swaps] == [{a, b}], check.report()


def test_a_rotation_of_three_labels_is_reported_as_unexplained():
    ct, labels = amos_scene({"liver": "spleen", "spleen": "stomach", "stomach": "liver"})
    check = check_labels(labels, label_preset("amos"), ct)
    assert not check.consistent and check.swaps == []
    assert "no swap of two labels explains it" in check.report()
