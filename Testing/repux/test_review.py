"""Review: confidence and entropy maps, test-time mirroring, region re-segmentation, the
review table, uncertain regions and the ranking of cases (issue 14).

Expected values come from the construction of each case (intensity bands of a per-voxel
network, cubes of known size, a box of known voxels), never from the code under test.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from repux.bundle import label_preset, load_bundle
from repux.cli import main
from repux.data.phantoms import make_phantom
from repux.imageio import Volume, read_volume, write_volume
from repux.infer import Segmenter
from repux.infer.predict import window_grid, windows_overlapping
from repux.infer.roi import RasBox
from repux.review import organ_review, uncertain_regions
from infer_support import ORGAN_HU, IntensityClassifier, analytic_volume, oblique_direction, save_tiny_bundle

RAS_IN_LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """Tiny random RepUX-Net at 2.5 mm with 32^3 windows: 27 windows over the small volumes here."""
    return save_tiny_bundle(tmp_path_factory.mktemp("model") / "tiny", spacing=(2.5, 2.5, 2.5))


def ramp_volume() -> Volume:
    """RAS, 2.5 mm (the model's: no resampling): 12 voxels of spleen HU, a 25-voxel ramp to kidney HU (its middle voxel halfway),
    12 voxels of kidney HU (along i)."""
    hu = np.concatenate([np.full(12, ORGAN_HU[1]), np.linspace(ORGAN_HU[1], ORGAN_HU[2], 25), np.full(12, ORGAN_HU[2])])
    array = np.broadcast_to(hu[:, None, None], (49, 16, 16)).astype(np.float32)
    return Volume(array, (2.5, 2.5, 2.5), (0.0, 0.0, 0.0), RAS_IN_LPS)


def test_confidence_is_certain_inside_organs_and_lowest_where_two_organs_tie(bundle):
    volume = ramp_volume()
    prediction = Segmenter(load_bundle(bundle), device="cpu", network=IntensityClassifier()).predict(
        volume, review=True
    )
    confidence = prediction.confidence.astype(float) / 255
    entropy = prediction.entropy.astype(float) / 255
    assert 0.0 <= confidence.min() and confidence.max() <= 1.0 and 0.0 <= entropy.min() and entropy.max() <= 1.0
    assert confidence.min() >= 1 / 5 - 1 / 255  # the chosen label is never below 1/C
    # Deep inside each plateau the model is sure.
    assert confidence[:8].min() > 0.99 and confidence[-8:].min() > 0.99
    assert entropy[:8].max() < 0.02 and entropy[-8:].max() < 0.02
    assert np.all(prediction.labels.array[:8] == 1) and np.all(prediction.labels.array[-8:] == 2)
    # Halfway between the two organs' intensities the two labels tie: entropy peaks, confidence is lowest.
    tie = 12 + 12  # the ramp's middle voxel
    profile_entropy, profile_confidence = entropy[:, 8, 8], confidence[:, 8, 8]
    assert abs(int(np.argmax(profile_entropy)) - tie) <= 1
    assert abs(int(np.argmin(profile_confidence)) - tie) <= 1
    assert profile_confidence.min() == pytest.approx(0.5, abs=0.05)
    assert profile_entropy.max() == pytest.approx(math.log(2) / math.log(5), abs=0.05)


def test_review_maps_are_those_of_the_probabilities_on_the_input_grid(bundle):
    image, _ = analytic_volume((30, 26, 22), (5.0, 5.0, 6.0), oblique_direction(8))
    prediction = Segmenter(load_bundle(bundle), device="cpu").predict(image, probabilities=True, review=True)
    p = prediction.probabilities.astype(np.float64)
    top = p.max(axis=0)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=0) / math.log(p.shape[0])
    assert prediction.confidence.shape == image.shape
    assert np.abs(prediction.confidence.astype(int) - np.round(top * 255)).max() <= 1
    assert np.abs(prediction.entropy.astype(int) - np.round(np.clip(entropy, 0, 1) * 255)).max() <= 1
    assert np.array_equal(prediction.labels.array, p.argmax(axis=0))


def test_flips_give_the_same_labels_with_a_mirror_symmetric_network(bundle):
    """A per-voxel network commutes with mirroring, so the flipped passes agree with the plain one;
    a network with spatial context does not, so there mirroring must change the probabilities."""
    image, _ = analytic_volume((30, 26, 22), (5.0, 5.0, 6.0), oblique_direction(8))
    bundle = load_bundle(bundle)
    plain = Segmenter(bundle, device="cpu", network=IntensityClassifier()).predict(image, review=True)
    mirrored = Segmenter(bundle, device="cpu", network=IntensityClassifier(), mirror=True).predict(image, review=True)
    assert np.array_equal(mirrored.labels.array, plain.labels.array)
    assert np.abs(mirrored.confidence.astype(int) - plain.confidence.astype(int)).max() <= 1
    small, _ = analytic_volume((16, 16, 16), (5.0, 5.0, 5.0))  # one window: 8 passes stay cheap
    context_plain = Segmenter(bundle, device="cpu").predict(small, review=True)
    context_mirrored = Segmenter(bundle, device="cpu", mirror=True).predict(small, review=True)
    assert not np.array_equal(context_mirrored.confidence, context_plain.confidence)


def test_windows_overlapping_a_box_are_exactly_those_sharing_a_voxel():
    from repux.infer.predict import SlidingWindowConfig

    config = SlidingWindowConfig(patch_size=(16, 16, 16), overlap=0.5)
    grid = window_grid((40, 32, 16), config)
    chosen = windows_overlapping(grid, (20, 0, 0), (21, 1, 1))
    # Steps of 8 along i: windows starting at 8 and 16 hold voxel 20 (0-15 and 24-39 do not).
    assert sorted(grid[i][0].start for i in chosen) == [8, 16]
    assert all(grid[i][1].start == 0 for i in chosen)


@pytest.mark.parametrize("direction", [RAS_IN_LPS, oblique_direction(9)], ids=["ras", "oblique"])
def test_roi_equals_the_whole_image_inside_the_box_bit_for_bit(bundle, direction):
    # Long along R-L, overlap 0.5: 5 x 3 x 3 windows, each voxel in up to 8; boxes of several
    # sizes and places, so that a window missing at any edge of a box shows.
    image, _ = analytic_volume((72, 30, 24), (2.5, 3.5, 4.0), direction)
    # A box runs the windows of MONAI's whole grid that reach it: the whole run to equal is --windows all's.
    segmenter = Segmenter(load_bundle(bundle), device="cpu", overlap=0.5, windows="all")
    whole = segmenter.predict(image, review=True)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1).reshape(-1, 3)
    ras = index @ image.affine[:3, :3].T + image.affine[:3, 3]
    for low, high in (([-60.0, -15.0, -10.0], [-30.0, 25.0, 30.0]), ([-7.0, -9.0, -3.0], [5.0, 4.0, 6.0]),
                      ([40.0, 10.0, -40.0], [52.0, 30.0, -28.0])):
        box = RasBox.from_corners(low, high)
        part = segmenter.predict(image, review=True, roi=box)
        inside = part.roi
        # The box's voxels: centres inside it, computed here from the geometry.
        expected = np.all((ras >= box.low - 1e-6) & (ras <= box.high + 1e-6), axis=1).reshape(image.shape)
        assert np.array_equal(inside, expected) and 0 < inside.sum() < inside.size / 4
        pairs = ((part.labels.array, whole.labels.array), (part.confidence, whole.confidence), (part.entropy, whole.entropy))
        for mine, reference in pairs:
            assert mine[inside].tobytes() == reference[inside].tobytes(), box.describe()
            assert not mine[~inside].any()
        assert part.windows < whole.windows


def _run(*argv: str) -> int:
    return main([*map(str, argv)])


@pytest.fixture(scope="module")
def case_file(tmp_path_factory) -> Path:
    image, _ = analytic_volume((40, 36, 30), (3.0, 3.5, 4.0), oblique_direction(6))
    return write_volume(image, tmp_path_factory.mktemp("case") / "case.nii.gz")


def test_roi_update_keeps_the_existing_labels_outside_the_box(bundle, case_file, tmp_path):
    whole = tmp_path / "whole.nii.gz"
    assert _run("segment", case_file, "-o", whole, "--model", bundle, "--device", "cpu", "--progress", "none") == 0
    image = read_volume(case_file)
    rng = np.random.default_rng(1)
    existing = image.with_array(rng.integers(0, 5, image.shape).astype(np.uint8))  # "edits" everywhere
    write_volume(existing, tmp_path / "edited.nii.gz")
    out, confidence = tmp_path / "updated.nii.gz", tmp_path / "confidence.nii.gz"
    box = "-45,-15,-10,-5,25,30"
    code = _run(
        "segment", case_file, "-o", out, "--model", bundle, "--device", "cpu", "--progress", "none",
        f"--roi={box}", "--update", tmp_path / "edited.nii.gz", "--confidence", confidence,
    )
    assert code == 0
    updated, reference = read_volume(out).array, read_volume(whole).array
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1).reshape(-1, 3)
    ras = index @ image.affine[:3, :3].T + image.affine[:3, 3]
    low, high = np.array([-45, -15, -10]), np.array([-5, 25, 30])
    inside = np.all((ras >= low - 1e-6) & (ras <= high + 1e-6), axis=1).reshape(image.shape)
    assert updated[~inside].tobytes() == existing.array[~inside].tobytes()
    assert updated[inside].tobytes() == reference[inside].tobytes()
    written = read_volume(confidence)
    assert written.array.dtype == np.uint8 and written.shape == image.shape
    assert np.allclose(written.affine, image.affine, atol=1e-4)


@pytest.mark.parametrize(
    "box, expected",
    [
        ("0,0,0,10,0,10", "zero size along A"),
        ("500,500,500,600,600,600", "holds no voxel of the image"),
        ("1,2,3", "expected six numbers"),
        ("a,b,c,d,e,f", "expected six numbers"),
    ],
)
def test_bad_boxes_are_refused_and_nothing_is_written(bundle, case_file, tmp_path, capsys, box, expected):
    out = tmp_path / "out.nii.gz"
    code = _run("segment", case_file, "-o", out, "--model", bundle, "--device", "cpu", "--progress", "none", f"--roi={box}")
    assert code == 2
    error = capsys.readouterr().err
    assert "repux segment: error:" in error and expected in error
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_update_on_another_grid_or_without_a_box_is_refused(bundle, case_file, tmp_path, capsys):
    other = write_volume(Volume(np.zeros((5, 5, 5), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), tmp_path / "other.nii.gz")
    out = tmp_path / "out.nii.gz"
    base = ["segment", case_file, "-o", out, "--model", bundle, "--device", "cpu", "--progress", "none"]
    assert _run(*base, "--update", other) == 2
    assert "only with --roi" in capsys.readouterr().err
    assert _run(*base, "--roi=-45,-15,-10,-5,25,30", "--update", other) == 2
    assert "differs from the input's" in capsys.readouterr().err
    assert not out.exists()


def test_review_table_counts_volumes_pieces_and_low_confidence_voxels():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[1:4, 1:4, 1:4] = 1  # 27 voxels
    labels[10:12, 10:12, 10:12] = 1  # 8 voxels, a second piece
    labels[15:19, 2:7, 2:4] = 3  # 40 voxels
    confidence = np.full(labels.shape, 255, np.uint8)
    confidence[10:12, 10:12, 10:12] = 100  # the small spleen piece is unsure (100/255 < 0.5)
    spacing = (2.0, 1.5, 3.0)  # 9 mm^3 per voxel
    rows = {row["name"]: row for row in organ_review(labels, confidence, spacing, label_preset("flare"), 0.5, "c")}
    assert rows["spleen"]["volume_ml"] == pytest.approx(35 * 9 / 1000)
    assert rows["spleen"]["components"] == 2
    assert rows["spleen"]["outside_largest_ml"] == pytest.approx(8 * 9 / 1000)
    assert rows["spleen"]["low_confidence_ml"] == pytest.approx(8 * 9 / 1000)
    assert rows["spleen"]["mean_confidence"] == pytest.approx((27 * 255 + 8 * 100) / 35 / 255, abs=1e-4)
    assert rows["liver"]["volume_ml"] == pytest.approx(40 * 9 / 1000) and rows["liver"]["components"] == 1
    assert rows["kidney"]["volume_ml"] == 0 and rows["kidney"]["components"] == 0
    # The threshold is settable: at 0.3 the unsure piece (0.39) is no longer low-confidence.
    relaxed = {row["name"]: row for row in organ_review(labels, confidence, spacing, label_preset("flare"), 0.3)}
    assert relaxed["spleen"]["low_confidence_ml"] == 0


def test_review_table_from_the_cli_matches_the_written_label_map(bundle, case_file, tmp_path):
    out, table = tmp_path / "labels.nii.gz", tmp_path / "review.json"
    assert _run("segment", case_file, "-o", out, "--model", bundle, "--device", "cpu", "--progress", "none",
                "--review", table, "--low-confidence", "0.7") == 0
    labels = read_volume(out)
    voxel_ml = float(np.prod(labels.spacing)) / 1000
    rows = json.loads(table.read_text())
    assert [row["label"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["volume_ml"] == pytest.approx(np.count_nonzero(labels.array == row["label"]) * voxel_ml, abs=1e-4)
        assert 0 <= row["low_confidence_ml"] <= row["volume_ml"]


def test_uncertain_regions_come_largest_first_with_a_centre_inside():
    confidence = np.full((30, 30, 30), 250, np.uint8)
    confidence[2:5, 2:5, 2:5] = 10  # 27 voxels
    confidence[20:28, 20:22, 20:21] = 10  # 16 voxels
    confidence[10, 10, 10] = 10  # 1 voxel
    labels = np.zeros(confidence.shape, np.uint8)
    labels[20:28, 20:22, 20:21] = 3
    labels[20:24, 20:22, 20:21] = 2
    regions = uncertain_regions(confidence, labels, (1.0, 1.0, 1.0))
    assert [r.voxels for r in regions] == [27, 16, 1]
    assert regions[0].centre == (3, 3, 3)
    assert confidence[regions[1].centre] == 10
    assert regions[1].labels == (2, 3) and regions[0].labels == (0,)
    assert [r.voxels for r in uncertain_regions(confidence, labels, (1.0, 1.0, 1.0), min_voxels=2)] == [27, 16]


def test_rank_puts_the_noisy_shifted_phantom_first_for_curation(tmp_path, capsys):
    """The demo model is sure on clean phantoms; noise plus an intensity shift makes it unsure,
    so that case is the one to curate first (the clean ones come after it)."""
    folder = tmp_path / "cases"
    folder.mkdir()
    for seed in (1, 2):
        write_volume(make_phantom(seed, shape=(48, 40, 32))[0], folder / f"clean{seed}.nii.gz")
    image = make_phantom(3, shape=(48, 40, 32))[0]
    noisy = image.array.astype(np.float32) + 150 + np.random.default_rng(0).normal(0, 80, image.shape)
    write_volume(image.with_array(noisy.astype(np.int16)), folder / "noisy.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"not a volume")
    ranking = tmp_path / "ranking.csv"
    code = _run("rank", folder, "--model", "demo", "-o", ranking, "--device", "cpu", "--overlap", "0", "--progress", "none")
    assert code == 2 and "broken.nii.gz" in capsys.readouterr().err  # the broken case fails alone
    rows = list(csv.DictReader(ranking.open()))
    assert [row["case"] for row in rows][0] == "noisy"
    assert sorted(row["case"] for row in rows[1:]) == ["clean1", "clean2"]
    assert [int(row["rank"]) for row in rows] == [1, 2, 3]
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    for row in rows:
        assert float(row["score"]) == pytest.approx(float(row["mean_entropy"]) + float(row["low_confidence_share"]), abs=1e-5)
