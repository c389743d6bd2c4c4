"""add_case: curated cases on disk in the layout ``repux train`` reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from module_helpers import add_user_segment, load_into_scene, on_grid_of
from repux.imageio import read_volume

from RepUXSegmentLib import trainingset
from RepUXSegmentLib.logic import RepUXLogic


@pytest.fixture
def case_inputs(scene, catalog, phantoms):
    image_path, label_path = phantoms["oblique"]
    volume = load_into_scene(scene, image_path)
    volume.SetName("CT chest/abdomen 1")
    logic = RepUXLogic(scene, catalog)
    segmentation = logic.import_labelmap(label_path, "tiny", reference_volume_node=volume)
    return logic, volume, segmentation, read_volume(image_path), read_volume(label_path)


def test_cases_are_written_with_a_valid_msd_manifest(case_inputs, tmp_path):
    logic, volume, segmentation, image, truth = case_inputs
    folder = tmp_path / "curated"
    first = logic.add_case(volume, segmentation, folder, "tiny")
    second = logic.add_case(volume, segmentation, folder, "tiny")
    assert first == "CT_chest_abdomen_1"
    assert second != first

    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["labels"] == {"0": "background", "1": "spleen", "2": "kidney", "3": "liver", "4": "pancreas"}
    assert manifest["modality"] == {"0": "CT"}
    assert manifest["numTraining"] == 2
    assert manifest["training"] == [
        {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"} for case in (first, second)
    ]
    for entry in manifest["training"]:
        saved_image, saved_label = read_volume(folder / entry["image"]), read_volume(folder / entry["label"])
        np.testing.assert_array_equal(on_grid_of(saved_image, image), image.array)
        np.testing.assert_array_equal(on_grid_of(saved_label, image), truth.array)


def test_the_manifest_is_what_the_training_data_loader_reads(case_inputs, tmp_path):
    from repux.data.cases import check_cases, load_cases

    logic, volume, segmentation, _, _ = case_inputs
    case_id = logic.add_case(volume, segmentation, tmp_path, "tiny")
    cases = load_cases(tmp_path)
    assert [case.case_id for case in cases] == [case_id]
    assert cases[0].image.resolve() == (tmp_path / "imagesTr" / f"{case_id}.nii.gz").resolve()
    check_cases(cases, [0, 1, 2, 3, 4])


def test_unknown_segment_names_are_refused_and_nothing_is_written(case_inputs, tmp_path):
    logic, volume, segmentation, _, _ = case_inputs
    logic.add_case(volume, segmentation, tmp_path, "tiny")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    manifest = (tmp_path / "dataset.json").read_bytes()
    add_user_segment(segmentation, "tumor", volume)
    with pytest.raises(ValueError, match=r"\['tumor'\].*not labels of the model"):
        logic.add_case(volume, segmentation, tmp_path, "tiny")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "dataset.json").read_bytes() == manifest


def test_existing_files_are_never_overwritten(case_inputs, tmp_path):
    logic, volume, segmentation, _, _ = case_inputs
    stray = tmp_path / "imagesTr" / "CT_chest_abdomen_1.nii.gz"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"left over from an interrupted run")
    case_id = logic.add_case(volume, segmentation, tmp_path, "tiny")
    assert case_id == "CT_chest_abdomen_1_2"
    assert stray.read_bytes() == b"left over from an interrupted run"
    with pytest.raises(FileExistsError, match="already exists"):
        trainingset.add_case(volume, segmentation, tmp_path, logic.catalog.get("tiny").labels, "tiny", case_id=case_id)


def test_an_interrupted_add_keeps_the_manifest_valid(case_inputs, tmp_path, monkeypatch):
    logic, volume, segmentation, _, _ = case_inputs
    logic.add_case(volume, segmentation, tmp_path, "tiny")
    manifest = (tmp_path / "dataset.json").read_bytes()
    written = []
    real_write = trainingset.write_volume_node

    def write_then_fail(node, path, overwrite=False):
        if written:  # the image went through; the label write is "interrupted"
            raise KeyboardInterrupt
        written.append(path)
        return real_write(node, path, overwrite)

    monkeypatch.setattr(trainingset, "write_volume_node", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        logic.add_case(volume, segmentation, tmp_path, "tiny")
    assert (tmp_path / "dataset.json").read_bytes() == manifest
    assert json.loads(manifest)["numTraining"] == 1
    # The next case does not reuse the orphaned image's id.
    monkeypatch.setattr(trainingset, "write_volume_node", real_write)
    assert logic.add_case(volume, segmentation, tmp_path, "tiny") == "CT_chest_abdomen_1_3"


def test_a_training_set_of_another_model_is_refused(case_inputs, tmp_path):
    logic, volume, segmentation, _, _ = case_inputs
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "training": []}))
    with pytest.raises(ValueError, match="differ from model tiny"):
        logic.add_case(volume, segmentation, tmp_path, "tiny")


def test_the_case_is_the_ct_the_segmentation_was_made_on(case_inputs, scene, phantoms, tmp_path):
    """Another CT selected in the module when Add case is clicked must not pair with the labels."""
    logic, volume, segmentation, image, truth = case_inputs
    other = load_into_scene(scene, phantoms["ras"][0])
    other.SetName("next CT")
    with pytest.raises(ValueError, match="was made on volume 'CT chest/abdomen 1', not on 'next CT'"):
        logic.add_case(other, segmentation, tmp_path / "set", "tiny")
    assert not (tmp_path / "set").exists()
    # Without a volume, the segmentation's own one is used.
    case = logic.add_case(None, segmentation, tmp_path / "set", "tiny")
    saved = read_volume(tmp_path / "set" / "imagesTr" / f"{case}.nii.gz")
    np.testing.assert_array_equal(on_grid_of(saved, image), image.array)


def test_a_segmentation_from_a_file_needs_a_volume_on_its_grid(scene, catalog, phantoms, tmp_path):
    logic = RepUXLogic(scene, catalog)
    segmentation = logic.import_labelmap(phantoms["oblique"][1], "tiny")  # names no volume
    with pytest.raises(ValueError, match="names no volume it was made on"):
        logic.add_case(None, segmentation, tmp_path / "set", "tiny")
    elsewhere = load_into_scene(scene, phantoms["ras"][0])
    with pytest.raises(ValueError, match=r"does not lie on volume 'ras_image' \(grid"):
        logic.add_case(elsewhere, segmentation, tmp_path / "set", "tiny")
    assert not (tmp_path / "set").exists()
    logic.add_case(load_into_scene(scene, phantoms["oblique"][0]), segmentation, tmp_path / "set", "tiny")
    assert len(trainingset.read_manifest(tmp_path / "set")["training"]) == 1
