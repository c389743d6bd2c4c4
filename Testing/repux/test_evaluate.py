"""``repux evaluate``: Dice and HD95 on label maps whose scores are known analytically."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from repux.cli import main
from repux.imageio import Volume, write_volume
from repux.infer.metrics import score_labels

SPACING = (1.0, 1.0, 2.5)


def _volume(array: np.ndarray, spacing=SPACING, origin=(4.0, -7.0, 12.0)) -> Volume:
    return Volume(array.astype(np.uint8), spacing, origin, np.diag([1.0, -1.0, 1.0]))


def boxes() -> tuple[Volume, Volume]:
    """Truth: label 1 = a 20^3 box, label 2 = a 10^3 box. Prediction: label 1's box grown by 3 voxels
    along k at both ends (26 slices instead of 20); label 2 shifted by 4 voxels along i.

    Label 1: Dice = 2 * 8000 / (8000 + 10400) = 0.8696; every surface voxel of the prediction
    on its two k-faces (30 % of its surface) is 3 slices = 7.5 mm from the truth's surface,
    none is farther, so HD95 = 7.5 mm.
    Label 2: overlap 6 x 10 x 10 = 600, Dice = 2 * 600 / 2000 = 0.6.
    """
    truth = np.zeros((48, 40, 40), np.uint8)
    pred = np.zeros_like(truth)
    truth[10:30, 10:30, 10:30] = 1
    pred[10:30, 10:30, 7:33] = 1
    truth[34:44, 5:15, 5:15] = 2
    pred[38:48, 5:15, 5:15] = 2
    return _volume(pred), _volume(truth)


def test_scores_of_known_overlaps():
    pred, truth = boxes()
    scores = score_labels(pred, truth, [(1, "spleen"), (2, "kidney"), (3, "liver")])
    assert scores[0].dice == pytest.approx(16000 / 18400)
    assert scores[0].hd95_mm == pytest.approx(7.5)
    assert (scores[0].pred_voxels, scores[0].truth_voxels) == (10400, 8000)
    assert scores[1].dice == pytest.approx(0.6)
    # A label in neither map has nothing to compare: both scores undefined.
    assert math.isnan(scores[2].dice) and math.isnan(scores[2].hd95_mm)


def test_hd95_follows_the_voxel_spacing():
    pred, truth = boxes()
    unit = (1.0, 1.0, 1.0)
    isotropic = score_labels(_volume(pred.array, unit), _volume(truth.array, unit), [(1, "a"), (2, "b")])
    assert isotropic[0].hd95_mm == pytest.approx(3.0)


def test_label_in_only_one_map_scores_zero():
    truth = np.zeros((20, 20, 20), np.uint8)
    pred = truth.copy()
    pred[2:6, 2:6, 2:6] = 1
    scores = score_labels(_volume(pred), _volume(truth), [(1, "a")])
    assert scores[0].dice == 0.0 and math.isnan(scores[0].hd95_mm)


@pytest.fixture
def box_files(tmp_path) -> tuple[Path, Path]:
    pred, truth = boxes()
    write_volume(pred, tmp_path / "pred.nii.gz")
    write_volume(truth, tmp_path / "gt.nrrd")
    return tmp_path / "pred.nii.gz", tmp_path / "gt.nrrd"


def test_cli_prints_and_writes_csv(box_files, tmp_path, capsys):
    pred, gt = box_files
    table = tmp_path / "metrics.csv"
    assert main(["evaluate", str(pred), str(gt), "--labels", "flare", "-o", str(table)]) == 0
    out = capsys.readouterr().out
    assert "spleen" in out and "0.8696" in out and "7.50 mm" in out
    assert out.strip().splitlines()[-2] == "mean Dice: 0.735"  # (0.8696 + 0.6) / 2; liver, pancreas absent
    with open(table, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["name"] for r in rows] == ["spleen", "kidney", "liver", "pancreas"]
    assert float(rows[0]["dice"]) == pytest.approx(16000 / 18400)
    assert float(rows[0]["hd95_mm"]) == pytest.approx(7.5)
    assert float(rows[1]["dice"]) == pytest.approx(0.6)


def test_cli_writes_json_with_undefined_scores_as_null(box_files, tmp_path):
    pred, gt = box_files
    table = tmp_path / "metrics.json"
    assert main(["evaluate", str(pred), str(gt), "--labels", "flare", "-o", str(table)]) == 0
    rows = json.loads(table.read_text())
    assert rows[2]["name"] == "liver" and rows[2]["dice"] is None and rows[2]["hd95_mm"] is None
    assert rows[0]["dice"] == pytest.approx(16000 / 18400)
    # Refuses to replace the table without --force.
    assert main(["evaluate", str(pred), str(gt), "-o", str(table)]) == 2


def test_cli_without_labels_names_the_values_found(box_files, capsys):
    pred, gt = box_files
    assert main(["evaluate", str(pred), str(gt)]) == 0
    out = capsys.readouterr().out
    assert "label 1" in out and "label 2" in out and "label 3" not in out


def test_geometry_mismatch_is_a_clear_error(tmp_path, capsys):
    pred, truth = boxes()
    write_volume(pred, tmp_path / "pred.nii.gz")
    moved = Volume(truth.array, truth.spacing, (4.0, -7.0, 14.0), truth.direction)
    write_volume(moved, tmp_path / "gt.nii.gz")
    assert main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz")]) == 2
    error = capsys.readouterr().err
    assert "different voxel grids" in error and "origin" in error and "pred.nii.gz" in error
    write_volume(_volume(pred.array[:, :, :30]), tmp_path / "short.nii.gz")
    assert main(["evaluate", str(tmp_path / "short.nii.gz"), str(tmp_path / "pred.nii.gz")]) == 2
    assert "shape (48, 40, 30) vs (48, 40, 40)" in capsys.readouterr().err


def test_values_outside_the_labels_are_refused(box_files, tmp_path, capsys):
    pred, gt = box_files
    array = np.zeros((10, 10, 10), np.uint8)
    array[2, 2, 2] = 7
    write_volume(_volume(array), tmp_path / "seven.nii.gz")
    write_volume(_volume(np.zeros_like(array)), tmp_path / "empty.nii.gz")
    assert main(["evaluate", str(tmp_path / "seven.nii.gz"), str(tmp_path / "empty.nii.gz"), "--labels", "flare"]) == 2
    assert "label values [7]" in capsys.readouterr().err


def test_non_integer_label_map_is_refused(tmp_path, capsys):
    array = np.zeros((10, 10, 10), np.float32)
    array[1, 1, 1] = 0.5
    write_volume(Volume(array, SPACING, (0, 0, 0)), tmp_path / "soft.nrrd")
    write_volume(Volume(np.zeros((10, 10, 10), np.uint8), SPACING, (0, 0, 0)), tmp_path / "gt.nrrd")
    assert main(["evaluate", str(tmp_path / "soft.nrrd"), str(tmp_path / "gt.nrrd")]) == 2
    assert "non-integer" in capsys.readouterr().err


def test_folders_are_paired_by_case_name(tmp_path, capsys):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    pred, truth = boxes()
    write_volume(pred, pred_dir / "a.seg.nrrd")
    write_volume(truth, gt_dir / "a.nii.gz")
    write_volume(truth, pred_dir / "b.nii.gz")  # perfect
    write_volume(truth, gt_dir / "b.nii.gz")
    table = tmp_path / "m.json"
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--labels", "flare", "-o", str(table)]) == 0
    rows = json.loads(table.read_text())
    by_key = {(r["case"], r["name"]): r for r in rows}
    assert by_key[("a", "spleen")]["dice"] == pytest.approx(16000 / 18400)
    assert by_key[("b", "spleen")]["dice"] == pytest.approx(1.0)
    assert by_key[("mean", "spleen")]["dice"] == pytest.approx((16000 / 18400 + 1.0) / 2)
    capsys.readouterr()
    write_volume(truth, gt_dir / "c.nii.gz")
    assert main(["evaluate", str(pred_dir), str(gt_dir)]) == 2
    assert "no prediction for the reference case(s) ['c']" in capsys.readouterr().err
