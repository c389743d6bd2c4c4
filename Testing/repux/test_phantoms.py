"""Synthetic CT phantoms: grid geometry, reproducibility, anatomy, CT numbers, patient-space
consistency across orientations, the dataset writer and the ``repux make-phantoms`` command."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from repux.data.cases import check_cases, load_cases
from repux.data.phantoms import (
    PHANTOM_LABELS,
    code_from_direction,
    direction_from_code,
    make_phantom,
    write_phantom_dataset,
)
from repux.errors import InputError
from repux.imageio import read_volume, to_sitk

SPLEEN, KIDNEY, LIVER, PANCREAS = 1, 2, 3, 4
ORGANS = (SPLEEN, KIDNEY, LIVER, PANCREAS)


@pytest.fixture(scope="module")
def phantoms():
    """Default-sized phantoms of a few seeds (the ones training and the demo use)."""
    return {seed: make_phantom(seed) for seed in range(3)}


def voxel_mm(volume, index):
    """LPS mm of voxel indices (N, 3)."""
    affine = volume.affine_lps
    return np.asarray(index, dtype=float) @ affine[:3, :3].T + affine[:3, 3]


def organ_points(label, value):
    return voxel_mm(label, np.argwhere(label.array == value))


def volume_ml(label, value):
    return float((label.array == value).sum() * np.prod(label.spacing) / 1000)


def tilt_degrees(direction, axes):
    """Rotation angle between a direction matrix and an axis-aligned one."""
    relative = np.asarray(direction) @ np.asarray(axes).T
    return float(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))))


def canonical(volume):
    """Array of an axis-aligned volume reordered to LPS index order, and the LPS mm of its first voxel."""
    direction = np.asarray(volume.direction)
    assert np.array_equal(np.abs(direction), np.abs(direction).round()), "not axis-aligned"
    order = [int(np.argmax(np.abs(direction[row]))) for row in range(3)]
    array = np.transpose(volume.array, order)
    corner = np.zeros(3)
    for row, axis in enumerate(order):
        if direction[row, axis] < 0:
            array = np.flip(array, row)
            corner[axis] = volume.shape[axis] - 1
    return array, voxel_mm(volume, corner[None])[0]


# ---- orientation codes ----------------------------------------------------------------
def test_direction_codes_round_trip_for_all_48_orientations():
    codes = set()
    for pairs in itertools.permutations(["LR", "PA", "SI"]):
        for letters in itertools.product(*pairs):
            code = "".join(letters)
            direction = direction_from_code(code)
            assert np.allclose(direction.T @ direction, np.eye(3))
            assert code_from_direction(direction) == code
            codes.add(code)
    assert len(codes) == 48
    assert np.array_equal(direction_from_code("LPS"), np.eye(3))  # ITK's identity
    assert np.array_equal(direction_from_code("ras"), np.diag([-1.0, -1.0, 1.0]))


@pytest.mark.parametrize("code", ["LLS", "XYZ", "LP", "LPSR"])
def test_bad_orientation_code_is_refused(code):
    with pytest.raises(InputError, match=f"orientation '{code}'.*R/L, A/P and S/I"):
        direction_from_code(code)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seed": -1}, "seed -1: expected a non-negative integer"),
        ({"seed": 1.5}, "seed 1.5"),
        ({"seed": 0, "shape": (1, 20, 20)}, r"shape \(1, 20, 20\): expected three integers >= 2"),
        ({"seed": 0, "shape": (20, 20)}, r"shape \(20, 20\)"),
        ({"seed": 0, "spacing": (0, 1, 1)}, r"spacing \(0, 1, 1\): expected three positive numbers"),
        ({"seed": 0, "orientation": "LLS"}, "orientation 'LLS'"),
        ({"seed": 0, "orientation": np.ones((3, 3))}, "orthonormal columns"),
    ],
)
def test_bad_phantom_settings_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        make_phantom(**kwargs)


# ---- grid geometry ------------------------------------------------------------------------
def test_grid_is_exactly_as_asked():
    image, label = make_phantom(5, shape=(40, 36, 32), spacing=(3.0, 3.5, 4.0), orientation="PIR", oblique=False)
    assert image.shape == (40, 36, 32) and label.shape == (40, 36, 32)
    assert image.spacing == (3.0, 3.5, 4.0)
    assert np.array_equal(image.direction, direction_from_code("PIR"))
    assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
    assert image.same_geometry(label)

    tilted, _ = make_phantom(5, shape=(40, 36, 32), spacing=(3.0, 3.5, 4.0), orientation="PIR")
    assert tilted.shape == (40, 36, 32) and tilted.spacing == (3.0, 3.5, 4.0)
    assert np.allclose(tilted.direction.T @ tilted.direction, np.eye(3), atol=1e-12)
    assert code_from_direction(tilted.direction) == "PIR"
    assert 2 - 1e-6 <= tilt_degrees(tilted.direction, direction_from_code("PIR")) <= 10 + 1e-6

    # A matrix is used as given, oblique or not.
    c, s = np.cos(0.3), np.sin(0.3)
    matrix = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ direction_from_code("RAI")
    given, _ = make_phantom(5, shape=(24, 24, 20), spacing=(8.0, 8.0, 8.0), orientation=matrix)
    assert np.allclose(given.direction, matrix, atol=1e-12)


def test_default_grid_is_small_and_shaped_like_a_scan(phantoms):
    shapes = set()
    for image, label in phantoms.values():
        direction = np.asarray(image.direction)
        assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-12)
        assert image.same_geometry(label)
        assert np.prod(image.shape) < 4_000_000 and max(image.shape) <= 220
        # The grid axis closest to superior-inferior carries the slices.
        slice_axis = int(np.argmax(np.abs(direction[2])))
        inplane = [image.spacing[a] for a in range(3) if a != slice_axis]
        assert 2.0 <= image.spacing[slice_axis] <= 3.0
        assert inplane[0] == pytest.approx(inplane[1]) and 1.6 <= inplane[0] <= 2.5
        shapes.add(image.shape)
    assert len(shapes) == len(phantoms)


def test_random_orientations_include_permuted_flipped_and_oblique_headers():
    codes, slice_axes = set(), set()
    for seed in range(10):
        image, _ = make_phantom(seed, spacing=(8.0, 8.0, 8.0))
        code = code_from_direction(image.direction)
        axes = direction_from_code(code)
        assert 2 - 1e-6 <= tilt_degrees(image.direction, axes) <= 10 + 1e-6
        codes.add(code)
        slice_axes.add(int(np.argmax(np.abs(axes[2]))))

        flat, _ = make_phantom(seed, spacing=(8.0, 8.0, 8.0), oblique=False)
        assert np.array_equal(flat.direction, axes)  # the same permutation, untilted
    assert len(codes) >= 6 and codes - {"RAS"}
    assert any(set(code) & set("RAI") for code in codes)  # flipped axes, not just permuted ones
    assert slice_axes == {0, 1, 2}


@pytest.mark.parametrize("spacing, slice_axis", [((4.0, 4.0, 6.0), 2), ((6.0, 4.0, 4.0), 0), ((4.0, 7.0, 4.0), 1)])
def test_random_orientation_puts_slices_along_the_largest_spacing(spacing, slice_axis):
    image, _ = make_phantom(3, spacing=spacing, oblique=False)
    assert int(np.argmax(np.abs(image.direction[2]))) == slice_axis


def test_shape_alone_gets_a_spacing_that_covers_the_body():
    image, label = make_phantom(8, shape=(48, 40, 32), oblique=False)
    assert image.shape == (48, 40, 32)
    assert int(np.argmax(np.abs(image.direction[2]))) == 2  # fewest voxels: the slice axis
    slice_axis = 2
    for axis in range(3):
        for end in (0, -1):
            face = np.take(image.array, end, axis=axis)
            assert not np.take(label.array, end, axis=axis).any(), "an organ is cut by the field of view"
            if axis != slice_axis:
                assert (face < -500).all(), "the body is cut by the field of view"


# ---- reproducibility ------------------------------------------------------------------------
def test_same_seed_gives_identical_phantoms_and_other_seeds_differ():
    first = make_phantom(21, spacing=(5.0, 5.0, 5.0))
    again = make_phantom(21, spacing=(5.0, 5.0, 5.0))
    other = make_phantom(22, spacing=(5.0, 5.0, 5.0))
    for a, b in zip(first, again):
        assert np.array_equal(a.array, b.array) and a.same_geometry(b)
        assert a.origin == b.origin and np.array_equal(a.direction, b.direction)
    assert not first[0].same_geometry(other[0])
    assert all(abs(volume_ml(first[1], v) - volume_ml(other[1], v)) > 1 for v in ORGANS)


# ---- anatomy ---------------------------------------------------------------------------------
# Bounds from adult anatomy (CT volumetry): liver ~1.0-2.5 L, spleen ~0.1-0.4 L, both
# kidneys ~200-450 mL, pancreas ~40-120 mL.
VOLUME_BOUNDS = {LIVER: (1000, 2500), SPLEEN: (100, 400), KIDNEY: (200, 450), PANCREAS: (40, 120)}


def test_all_organs_present_with_plausible_volumes(phantoms):
    for seed, (_, label) in phantoms.items():
        assert set(np.unique(label.array)) == set(PHANTOM_LABELS), seed
        for value, (low, high) in VOLUME_BOUNDS.items():
            assert low <= volume_ml(label, value) <= high, (seed, PHANTOM_LABELS[value], volume_ml(label, value))


def test_organs_sit_where_they_belong(phantoms):
    # LPS mm: x grows to the patient's left, y to posterior, z to superior.
    for seed, (image, label) in phantoms.items():
        centre = {value: organ_points(label, value).mean(axis=0) for value in ORGANS}
        bone_x = np.median(voxel_mm(image, np.argwhere(image.array > 400))[:, 0])  # spine (ribs are symmetric)
        components, count = ndimage.label(label.array == KIDNEY)
        sizes = np.bincount(components.ravel())[1:]
        two = np.argsort(sizes)[-2:] + 1
        kidneys = [voxel_mm(label, np.argwhere(components == c)).mean(axis=0) for c in two]
        right, left = sorted(kidneys, key=lambda p: p[0])
        assert right[0] < bone_x - 30 and left[0] > bone_x + 30, seed  # one kidney each side of the spine
        assert min(sizes[two - 1]) > 0.3 * sizes.sum(), seed

        assert centre[LIVER][0] < bone_x < centre[SPLEEN][0], seed  # liver right, spleen left
        assert centre[LIVER][0] < centre[PANCREAS][0] < centre[SPLEEN][0], seed
        assert centre[KIDNEY][1] > centre[PANCREAS][1] and centre[KIDNEY][1] > centre[LIVER][1], seed  # kidneys behind
        assert centre[SPLEEN][1] > centre[PANCREAS][1], seed  # spleen posterior
        assert centre[LIVER][2] > centre[KIDNEY][2], seed  # liver in the upper abdomen
        assert volume_ml(label, LIVER) == max(volume_ml(label, v) for v in ORGANS)

        # The pancreas is elongated across the midline, mostly left-right.
        points = organ_points(label, PANCREAS)
        values, vectors = np.linalg.eigh(np.cov(points.T))
        assert values[-1] > 4 * values[-2] and abs(vectors[0, -1]) > 0.7, seed
        assert points[:, 0].min() < bone_x < points[:, 0].max(), seed


def test_ct_numbers_overlap_so_only_shape_and_position_separate_organs(phantoms):
    for seed, (image, label) in phantoms.items():
        ranges = {}
        for value in ORGANS:
            inside = ndimage.binary_erosion(label.array == value)
            values = image.array[inside].astype(float)
            ranges[value] = np.percentile(values, [5, 95])
            assert 0 < np.median(values) < 120, (seed, value)
        for a, b in itertools.combinations(ORGANS, 2):
            assert ranges[a][0] < ranges[b][1] and ranges[b][0] < ranges[a][1], (seed, a, b, ranges)

        spleen = image.array[ndimage.binary_erosion(label.array == SPLEEN, iterations=2)]
        assert 5 < spleen.std() < 30, seed  # noise of a CT, plus a little texture
        corners = image.array[np.ix_(*[[0, n - 1] for n in image.shape])]
        assert (corners < -950).all(), seed  # air around the patient
        assert image.array.max() > 500, seed  # bone
        # Gas in stomach or bowel: darker than lung, inside the body outline of its slice.
        within_slice = np.zeros((3, 3, 3), dtype=bool)
        slice_axis = int(np.argmax(np.abs(image.direction[2])))
        np.moveaxis(within_slice, slice_axis, 0)[1] = ndimage.generate_binary_structure(2, 1)
        body = ndimage.binary_fill_holes(image.array > -500, structure=within_slice)
        gas = (image.array < -960) & ndimage.binary_erosion(body, iterations=5)
        assert gas.sum() > 100, seed


# ---- patient space --------------------------------------------------------------------------
def test_same_seed_is_the_same_patient_in_any_axis_aligned_orientation():
    image_a, label_a = make_phantom(31, spacing=(4.0, 4.0, 4.0), orientation="LPS", oblique=False)
    image_b, label_b = make_phantom(31, spacing=(4.0, 4.0, 4.0), orientation="PIR", oblique=False)
    assert image_a.shape != image_b.shape  # really another grid order
    labels_a, corner_a = canonical(label_a)
    labels_b, corner_b = canonical(label_b)
    assert np.allclose(corner_a, corner_b, atol=1e-6)
    assert labels_a.shape == labels_b.shape
    assert (labels_a != labels_b).mean() < 1e-4
    for value in ORGANS:
        assert np.allclose(organ_points(label_a, value).mean(0), organ_points(label_b, value).mean(0), atol=1e-3)


def test_same_seed_is_the_same_patient_on_an_oblique_grid():
    _, straight = make_phantom(32, spacing=(3.0, 3.0, 3.0), orientation="RAS", oblique=False)
    _, tilted = make_phantom(32, spacing=(3.0, 3.0, 3.0), orientation="ILP", oblique=True)
    assert tilt_degrees(tilted.direction, direction_from_code("ILP")) >= 2
    for value in ORGANS:
        assert np.linalg.norm(organ_points(straight, value).mean(0) - organ_points(tilted, value).mean(0)) < 1.5
        assert volume_ml(tilted, value) == pytest.approx(volume_ml(straight, value), rel=0.06)
    # Resampled onto the straight grid, the tilted label covers the same organs.
    resampled = sitk.GetArrayFromImage(
        sitk.Resample(to_sitk(tilted), to_sitk(straight), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    ).transpose(2, 1, 0)
    for value in ORGANS:
        a, b = straight.array == value, resampled == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85, PHANTOM_LABELS[value]


# ---- dataset folder and command line ------------------------------------------------------
SMALL = {"shape": (48, 48, 32), "oblique": False}


def test_dataset_is_written_complete_and_loads_as_cases(tmp_path):
    out = write_phantom_dataset(2, tmp_path / "phantoms", seed=4, **SMALL)
    assert out == tmp_path / "phantoms"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantoms"]  # no temporaries left
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["labels"] == {"0": "background", "1": "spleen", "2": "kidney", "3": "liver", "4": "pancreas"}
    assert manifest["modality"] == {"0": "CT"} and manifest["numTraining"] == 2
    assert manifest["training"] == [
        {"image": "imagesTr/phantom_000.nii.gz", "label": "labelsTr/phantom_000.nii.gz"},
        {"image": "imagesTr/phantom_001.nii.gz", "label": "labelsTr/phantom_001.nii.gz"},
    ]
    generator = manifest["generator"]
    assert generator["seed"] == 4 and generator["settings"] == {"shape": [48, 48, 32], "oblique": False}
    assert len(set(generator["case_seeds"])) == 2

    # Every case can be regenerated from its recorded seed and settings.
    image, label = make_phantom(generator["case_seeds"][1], **SMALL)
    written = read_volume(out / "imagesTr" / "phantom_001.nii.gz")
    assert np.array_equal(written.array, image.array) and written.same_geometry(image)
    assert np.array_equal(read_volume(out / "labelsTr" / "phantom_001.nii.gz").array, label.array)

    cases = load_cases(out)
    assert [c.case_id for c in cases] == ["phantom_000", "phantom_001"]
    summary = check_cases(cases, PHANTOM_LABELS)
    assert summary.count == 2 and all(summary.cases_with_label[v] == 2 for v in ORGANS)

    # A smaller dataset of the same seed is the start of the larger one.
    one = write_phantom_dataset(1, tmp_path / "one", seed=4, **SMALL)
    first = read_volume(out / "imagesTr" / "phantom_000.nii.gz")
    assert np.array_equal(read_volume(one / "imagesTr" / "phantom_000.nii.gz").array, first.array)


def test_dataset_writer_refuses_to_overwrite_and_bad_settings(tmp_path):
    out = write_phantom_dataset(1, tmp_path / "phantoms", seed=1, **SMALL)
    before = (out / "dataset.json").read_text()
    with pytest.raises(FileExistsError, match="already exists"):
        write_phantom_dataset(1, out, seed=2, **SMALL)
    assert (out / "dataset.json").read_text() == before
    write_phantom_dataset(1, out, seed=2, overwrite=True, **SMALL)
    assert json.loads((out / "dataset.json").read_text())["generator"]["seed"] == 2

    with pytest.raises(InputError, match="number of phantoms 0"):
        write_phantom_dataset(0, tmp_path / "none")
    with pytest.raises(InputError, match=r"phantom settings \['colour'\]: unknown"):
        write_phantom_dataset(1, tmp_path / "none", colour="red")
    with pytest.raises(InputError, match="orientation 'QQQ'"):
        write_phantom_dataset(1, tmp_path / "none", orientation="QQQ")
    assert not (tmp_path / "none").exists()


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "repux", "make-phantoms", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_make_phantoms_command(tmp_path):
    out = tmp_path / "cli"
    shape = ("--shape", 40, 40, 32)
    done = run_cli(2, out, "--seed", 5, *shape, "--orientation", "lps", "--no-oblique", "--progress", "jsonl")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert records[0] == {"stage": "phantoms", "done": 0, "total": 2, "eta": None}
    assert [r["done"] for r in records if r["stage"] == "phantoms" and "done" in r] == [0, 1, 2]
    assert records[-1] == {"stage": "done", "output": str(out)}
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["generator"]["seed"] == 5
    assert manifest["generator"]["settings"] == {"oblique": False, "shape": [40, 40, 32], "orientation": "LPS"}
    image = read_volume(out / "imagesTr" / "phantom_000.nii.gz")
    assert image.shape == (40, 40, 32) and np.allclose(image.direction, np.eye(3))

    refused = run_cli(1, out, *shape)
    assert refused.returncode == 2
    assert "repux make-phantoms: error:" in refused.stderr and "already exists" in refused.stderr
    assert json.loads((out / "dataset.json").read_text()) == manifest

    replaced = run_cli(1, out, "--seed", 6, *shape, "--force", "--progress", "none")
    assert replaced.returncode == 0 and replaced.stdout == ""
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1

    bad = run_cli(1, tmp_path / "bad", "--orientation", "XYZ")
    assert bad.returncode == 2 and "orientation 'XYZ'" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_force_replaces_only_a_phantom_dataset_the_tool_wrote(tmp_path, monkeypatch):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a phantom dataset written by repux make-phantoms"):
        write_phantom_dataset(1, precious, overwrite=True, **SMALL)
    assert (precious / "notes.txt").read_text() == "x"

    # A dataset.json of another origin is not the tool's marker.
    (precious / "dataset.json").write_text(json.dumps({"name": "mine", "training": []}))
    with pytest.raises(FileExistsError, match="not a phantom dataset"):
        write_phantom_dataset(1, precious, overwrite=True, **SMALL)

    # The tool's own dataset with a file the user added is not replaced either.
    ours = write_phantom_dataset(1, tmp_path / "ours", seed=1, **SMALL)
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_phantom_dataset(1, ours, overwrite=True, **SMALL)
    assert (ours / "notes.txt").read_text() == "mine"

    # The current folder (or one above it) is never replaced, and never a traceback.
    monkeypatch.chdir(precious)
    for target in (".", "..", "./"):
        with pytest.raises(FileExistsError, match="refusing"):
            write_phantom_dataset(1, target, overwrite=True, **SMALL)
    assert (precious / "notes.txt").read_text() == "x"


def test_make_phantoms_force_on_a_user_folder_or_dot_is_a_clear_error(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x")
    refused = run_cli(1, precious, "--force", "--progress", "none")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "repux make-phantoms: error:" in refused.stderr and "not a phantom dataset" in refused.stderr
    assert (precious / "notes.txt").read_text() == "x"
    dot = subprocess.run(
        [sys.executable, "-m", "repux", "make-phantoms", "1", ".", "--force", "--progress", "none"],
        capture_output=True, text=True, timeout=120, cwd=precious,
    )  # fmt: skip
    assert dot.returncode == 2 and "Traceback" not in dot.stderr, dot.stderr
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
