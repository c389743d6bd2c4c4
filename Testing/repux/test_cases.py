"""Curated-case datasets: both folder layouts, NIfTI and NRRD, and every refusal with its message."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from repux.data.cases import Case, CaseError, check_cases, load_cases
from repux.imageio import Volume, write_volume

SHAPE = (10, 9, 6)


def pair(seed: int, spacing=(1.5, 1.5, 3.0), values=(0, 1, 2, 3, 4)):
    """A small random CT-like image and a label with the given values (each present)."""
    rng = np.random.default_rng(seed)
    image = Volume(rng.integers(-1000, 1000, SHAPE).astype(np.int16), spacing, (10.0, -20.0, 5.0), np.eye(3))
    label = np.resize(np.asarray(values, dtype=np.uint8), SHAPE)
    rng.shuffle(label.reshape(-1))
    return image, image.with_array(label)


def write_pair(folder, image_name, label_name, seed=0, **kwargs):
    image, label = pair(seed, **kwargs)
    write_volume(image, folder / image_name)
    write_volume(label, folder / label_name)
    return image, label


def msd_folder(root, entries):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"name": "test", "training": entries}))
    return root


# ---- layouts ------------------------------------------------------------------------------
def test_msd_manifest_with_relative_paths(tmp_path):
    labels = {}
    for n, case in enumerate(["liver_7", "liver_3"]):
        _, labels[case] = write_pair(tmp_path, f"imagesTr/{case}.nii.gz", f"labelsTr/{case}.nii.gz", seed=n)
    msd_folder(
        tmp_path,
        [
            {"image": "./imagesTr/liver_7.nii.gz", "label": "./labelsTr/liver_7.nii.gz"},
            {"image": "imagesTr/liver_3.nii.gz", "label": "labelsTr/liver_3.nii.gz"},
        ],
    )
    cases = load_cases(tmp_path)
    assert [c.case_id for c in cases] == ["liver_3", "liver_7"]
    assert cases[1] == Case("liver_7", tmp_path / "imagesTr/liver_7.nii.gz", tmp_path / "labelsTr/liver_7.nii.gz")
    assert all(c.image.is_file() and c.label.is_file() for c in cases)

    summary = check_cases(cases, range(5))
    assert summary.count == 2 and summary.shapes == [SHAPE, SHAPE]
    assert summary.spacings == [(1.5, 1.5, 3.0)] * 2
    for value in range(5):
        expected = sum(int((lab.array == value).sum()) for lab in labels.values())
        assert summary.label_voxels[value] == expected
        assert summary.cases_with_label[value] == 2
    assert summary.missing_labels == []
    assert check_cases(cases, range(7)).missing_labels == [5, 6]
    assert "2 cases" in str(summary) and "label 4" in str(summary)


def test_nnunet_layout_with_channel_suffix_plain_names_and_nrrd(tmp_path):
    write_pair(tmp_path, "imagesTr/case_002_0000.nii.gz", "labelsTr/case_002.nii.gz", seed=1)
    write_pair(tmp_path, "imagesTr/case_001.nrrd", "labelsTr/case_001.nrrd", seed=2)
    (tmp_path / "imagesTr" / ".case_009.tmp-1234.nii.gz").write_bytes(b"half written")  # ignored
    (tmp_path / "labelsTr" / "notes.txt").write_text("not a volume")  # ignored
    cases = load_cases(tmp_path)
    assert cases == [
        Case("case_001", tmp_path / "imagesTr/case_001.nrrd", tmp_path / "labelsTr/case_001.nrrd"),
        Case("case_002", tmp_path / "imagesTr/case_002_0000.nii.gz", tmp_path / "labelsTr/case_002.nii.gz"),
    ]
    assert check_cases(cases, [0, 1, 2, 3, 4]).count == 2


def test_float_label_with_whole_values_is_accepted(tmp_path):
    image, label = pair(3)
    write_volume(image, tmp_path / "imagesTr/a_0000.nii.gz")
    write_volume(label.with_array(label.array.astype(np.float32)), tmp_path / "labelsTr/a.nii.gz")
    summary = check_cases(load_cases(tmp_path), range(5))
    assert summary.cases_with_label == {v: 1 for v in range(5)}


# ---- refusals while finding cases -----------------------------------------------------------
def test_missing_folder(tmp_path):
    expected = f"{tmp_path / 'nowhere'}: no such folder; expected a dataset folder"
    with pytest.raises(CaseError, match=re.escape(expected)):
        load_cases(tmp_path / "nowhere")
    (tmp_path / "file.nii.gz").write_bytes(b"")
    with pytest.raises(CaseError, match="is not a folder"):
        load_cases(tmp_path / "file.nii.gz")


def test_folder_without_either_layout(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(CaseError, match=r"has no dataset.json and no labelsTr/; expected a dataset.json \(MSD\)"):
        load_cases(tmp_path)


def test_manifest_that_is_not_json(tmp_path):
    (tmp_path / "dataset.json").write_text('{"training": [\n  {"image": "a.nii.gz",}\n]}')
    with pytest.raises(CaseError, match=r"dataset.json: not valid JSON \(.* at line 2, column"):
        load_cases(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"name": "x"}, "has no 'training' list"),
        ({"training": []}, "has an empty 'training' list"),
        ({"training": {"image": "a"}}, "has 'training' as a dict"),
        ([1, 2], "has no 'training' list"),
    ],
)
def test_manifest_without_a_training_list(tmp_path, content, message):
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    with pytest.raises(CaseError, match=f"{message}; expected 'training': a list of"):
        load_cases(tmp_path)


def test_manifest_entries_pointing_to_missing_or_odd_files_are_all_reported(tmp_path):
    write_pair(tmp_path, "imagesTr/a.nii.gz", "labelsTr/a.nii.gz")
    (tmp_path / "imagesTr" / "b.png").write_bytes(b"png")
    msd_folder(
        tmp_path,
        [
            {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"},
            {"image": "imagesTr/gone.nii.gz", "label": "labelsTr/gone.nii.gz"},
            {"image": "imagesTr/b.png", "label": "labelsTr/a.nii.gz"},
            {"image": "imagesTr/a.nii.gz"},
        ],
    )
    with pytest.raises(CaseError) as raised:
        load_cases(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'dataset.json'}: 4 problem(s) in the training list:")
    gone = tmp_path / "imagesTr/gone.nii.gz"
    assert f"training entry 1 image 'imagesTr/gone.nii.gz': no such file ({gone})" in message
    assert "training entry 1 label 'labelsTr/gone.nii.gz': no such file" in message
    assert "training entry 2 image 'imagesTr/b.png': not a volume file" in message
    assert "training entry 3 is {'image': 'imagesTr/a.nii.gz'}; expected" in message


def test_manifest_listing_a_case_twice(tmp_path):
    write_pair(tmp_path, "imagesTr/a.nii.gz", "labelsTr/a.nii.gz")
    entry = {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}
    msd_folder(tmp_path, [entry, entry])
    with pytest.raises(CaseError, match="training entry 1: case 'a' is also entry 0"):
        load_cases(tmp_path)


def test_nnunet_images_without_labels_labels_without_images_and_extra_channels(tmp_path):
    write_pair(tmp_path, "imagesTr/good_0000.nii.gz", "labelsTr/good.nii.gz")
    write_pair(tmp_path, "imagesTr/lonely_0000.nii.gz", "labelsTr/orphan.nii.gz")
    write_pair(tmp_path, "imagesTr/good_0001.nii.gz", "labelsTr/good.nrrd")
    with pytest.raises(CaseError) as raised:
        load_cases(tmp_path)
    message = str(raised.value)
    assert f"{tmp_path}: 4 problem(s) in the imagesTr/labelsTr layout:" in message
    assert "good_0001.nii.gz: channel 0001; only single-channel CT (_0000) is supported" in message
    assert "case 'good' also has label" in message
    assert "labelsTr: no label for lonely_0000.nii.gz" in message
    assert "imagesTr: no image for orphan.nii.gz" in message


def test_nnunet_folders_without_images(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(CaseError, match=r"imagesTr: holds no images \(.nii.gz"):
        load_cases(tmp_path)


# ---- refusals while checking cases ----------------------------------------------------------
def test_every_bad_case_is_reported_with_its_file_and_values(tmp_path):
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    write_pair(tmp_path, "imagesTr/good_0000.nii.gz", "labelsTr/good.nii.gz", seed=1)
    # Geometry mismatch: the label has another spacing and shape.
    image, _ = pair(2)
    write_volume(image, images / "shifted_0000.nii.gz")
    _, other = pair(2, spacing=(1.0, 1.0, 3.0))
    write_volume(Volume(other.array[:, :, :5].copy(), other.spacing, other.origin), labels / "shifted.nii.gz")
    # Label values out of range.
    write_pair(tmp_path, "imagesTr/extra_0000.nii.gz", "labelsTr/extra.nii.gz", seed=3, values=(0, 1, 7, 9))
    # A 2-D image.
    flat = sitk.GetImageFromArray(np.zeros((9, 10), dtype=np.int16))
    sitk.WriteImage(flat, str(images / "flat_0000.nii.gz"))
    write_volume(pair(4)[1], labels / "flat.nii.gz")
    # A label that is not whole numbers.
    image, label = pair(5)
    write_volume(image, images / "blurred_0000.nii.gz")
    write_volume(label.with_array(label.array.astype(np.float32) * 0.5), labels / "blurred.nii.gz")

    cases = load_cases(tmp_path)
    assert len(cases) == 5
    with pytest.raises(CaseError) as raised:
        check_cases(cases, range(5))
    lines = str(raised.value).splitlines()
    assert lines[0] == "4 of 5 cases cannot be used for training:"
    assert len(lines) == 5 and not any(line.strip().startswith("good:") for line in lines)
    by_case = {line.strip().split(":")[0]: line for line in lines[1:]}
    assert set(by_case) == {"blurred", "extra", "flat", "shifted"}
    shifted = f"label {labels / 'shifted.nii.gz'} does not match image {images / 'shifted_0000.nii.gz'}"
    assert shifted in by_case["shifted"]
    assert "shape (10, 9, 5) vs image (10, 9, 6)" in by_case["shifted"]
    assert "spacing (1.0, 1.0, 3.0) vs image (1.5, 1.5, 3.0)" in by_case["shifted"]
    assert f"{labels / 'extra.nii.gz'}: label values 7, 9 are outside the allowed values 0-4" in by_case["extra"]
    assert f"{images / 'flat_0000.nii.gz'}: is 2-D" in by_case["flat"] and "expected a 3-D volume" in by_case["flat"]
    assert f"{labels / 'blurred.nii.gz'}: label values are not whole numbers (0.5, 1.5)" in by_case["blurred"]


def test_file_gone_after_loading_and_allowed_values_listed(tmp_path):
    write_pair(tmp_path, "imagesTr/a_0000.nii.gz", "labelsTr/a.nii.gz", values=(0, 2, 5))
    cases = load_cases(tmp_path)
    (tmp_path / "imagesTr" / "a_0000.nii.gz").unlink()
    with pytest.raises(CaseError, match=r"a: .*a_0000.nii.gz: no such file or folder"):
        check_cases(cases, [0, 2, 5])
    write_volume(pair(0)[0], tmp_path / "imagesTr" / "a_0000.nii.gz")
    with pytest.raises(CaseError, match="label values 5 are outside the allowed values 0, 2, 3"):
        check_cases(cases, [0, 2, 3])


def test_no_cases_to_check():
    with pytest.raises(CaseError, match="no cases to check"):
        check_cases([], range(5))
