"""Label maps into segmentations and back out: exact round trips, values by segment name."""

from __future__ import annotations

import numpy as np
import pytest
import slicerio

from module_helpers import add_user_segment, load_into_scene, on_grid_of
from repux.bundle import label_preset
from repux.imageio import read_volume

from RepUXSegmentLib.logic import RepUXLogic
from RepUXSegmentLib.segmentations import export_labelmap


@pytest.fixture
def imported(scene, catalog, phantoms):
    """The oblique phantom's image and its true labels loaded as a segmentation of model "tiny"."""
    image_path, label_path = phantoms["oblique"]
    volume = load_into_scene(scene, image_path)
    logic = RepUXLogic(scene, catalog)
    segmentation = logic.import_labelmap(label_path, "tiny", reference_volume_node=volume)
    return logic, volume, segmentation, read_volume(label_path)


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd"])
def test_export_gives_back_exactly_the_imported_labels(imported, tmp_path, ending):
    logic, volume, segmentation, truth = imported
    assert np.unique(truth.array).tolist() == [0, 1, 2, 3, 4]
    path = logic.export_labelmap(segmentation, tmp_path / f"labels{ending}", reference_volume_node=volume)
    exported = read_volume(path)
    np.testing.assert_array_equal(on_grid_of(exported, truth), truth.array)


def test_seg_nrrd_export_keeps_values_names_colours_and_terminology(imported, tmp_path):
    logic, volume, segmentation, truth = imported
    path = logic.export_labelmap(segmentation, tmp_path / "labels.seg.nrrd")  # grid: the segmentation's reference
    data = slicerio.read_segmentation(str(path))
    flare = {label.name: label for label in label_preset("flare")}
    assert [segment["name"] for segment in data["segments"]] == ["spleen", "kidney", "liver", "pancreas"]
    for segment in data["segments"]:
        label = flare[segment["name"]]
        assert segment["labelValue"] == label.value
        assert np.allclose(segment["color"], np.array(label.color) / 255.0, atol=1e-3)
        assert segment["terminology"]["type"] == [label.type.scheme, label.type.value, label.type.meaning]
    # slicerio gives voxels [i, j, k] and an IJK-to-LPS matrix.
    lps = np.asarray(data["ijkToLPS"], dtype=float)
    exported = truth.__class__.from_affine(np.asarray(data["voxels"]), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
    np.testing.assert_array_equal(on_grid_of(exported, truth), truth.array)


def test_values_follow_segment_names_not_their_order(imported, tmp_path):
    """Exporting with the flare21 label order moves every organ to flare21's value."""
    _, volume, segmentation, truth = imported
    flare21 = label_preset("flare21")
    path = export_labelmap(segmentation, tmp_path / "flare21.nii.gz", flare21, reference_volume_node=volume)
    exported = on_grid_of(read_volume(path), truth)
    flare_value = {label.name: label.value for label in label_preset("flare")}
    for label in flare21[1:]:
        np.testing.assert_array_equal(exported == label.value, truth.array == flare_value[label.name])

    # Reordering the segments changes nothing either.
    segments = segmentation.GetSegmentation()
    segments.SetSegmentIndex("spleen", segments.GetNumberOfSegments() - 1)
    assert segments.GetNthSegment(0).GetName() != "spleen"
    again = export_labelmap(segmentation, tmp_path / "reordered.nii.gz", label_preset("flare"), volume)
    np.testing.assert_array_equal(on_grid_of(read_volume(again), truth), truth.array)


def test_export_refuses_to_overwrite_unless_asked(imported, tmp_path):
    logic, volume, segmentation, truth = imported
    path = tmp_path / "mine.nii.gz"
    path.write_bytes(b"a file of the user's")
    with pytest.raises(FileExistsError, match="mine.nii.gz"):
        logic.export_labelmap(segmentation, path, reference_volume_node=volume)
    assert path.read_bytes() == b"a file of the user's"
    logic.export_labelmap(segmentation, path, reference_volume_node=volume, overwrite=True)
    np.testing.assert_array_equal(on_grid_of(read_volume(path), truth), truth.array)


def test_export_refuses_segments_the_model_does_not_know(imported, tmp_path):
    logic, volume, segmentation, _ = imported
    add_user_segment(segmentation, "tumor", volume)
    with pytest.raises(ValueError, match=r"\['tumor'\].*not labels of the model"):
        logic.export_labelmap(segmentation, tmp_path / "labels.nii.gz", reference_volume_node=volume)
    assert not (tmp_path / "labels.nii.gz").exists()


def test_export_refuses_unknown_endings_and_needs_a_model(imported, scene, tmp_path):
    logic, volume, segmentation, _ = imported
    with pytest.raises(ValueError, match=r"labels\.png: unsupported file ending"):
        logic.export_labelmap(segmentation, tmp_path / "labels.png")
    foreign = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn by hand")
    with pytest.raises(ValueError, match="not made by a RepUX model"):
        logic.export_labelmap(foreign, tmp_path / "labels.nii.gz", reference_volume_node=volume)


def test_export_onto_another_reference_grid(imported, scene, phantoms, tmp_path):
    """The reference volume decides the grid: here every other voxel, starting 1, 0, 3 voxels in."""
    from RepUXSegmentLib.volumes import ijk_to_ras, labelmap_node_from_array, voxel_array

    logic, volume, segmentation, _ = imported
    truth = voxel_array(load_into_scene(scene, phantoms["oblique"][1], labelmap=True))  # (K, J, I), MRML order
    step = np.array([[2, 0, 0, 1], [0, 2, 0, 0], [0, 0, 2, 3], [0, 0, 0, 1]], dtype=float)
    expected = truth[3::2, 0::2, 1::2]
    reference = labelmap_node_from_array(np.zeros_like(expected), ijk_to_ras(volume) @ step, "coarse")
    scene.AddNode(reference)
    path = logic.export_labelmap(segmentation, tmp_path / "coarse.nrrd", reference_volume_node=reference)
    exported = voxel_array(load_into_scene(scene, path, labelmap=True))
    np.testing.assert_array_equal(exported, expected)


def test_import_refuses_values_the_model_does_not_have(scene, catalog, phantoms, tmp_path):
    from repux.imageio import write_volume

    truth = read_volume(phantoms["ras"][1])
    bad = truth.with_array(np.where(truth.array == 4, 9, truth.array).astype(np.uint8))
    path = write_volume(bad, tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match=r"bad\.nii\.gz: holds label values \[9\]"):
        RepUXLogic(scene, catalog).import_labelmap(path, "tiny")
    assert scene.GetNumberOfNodes() == 0


def test_transforms_follow_the_volume_and_mismatches_are_refused(scene, catalog, phantoms, tmp_path):
    volume = load_into_scene(scene, phantoms["ras"][0])
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(moved.GetID())
    logic = RepUXLogic(scene, catalog)
    segmentation = logic.import_labelmap(phantoms["ras"][1], "tiny", reference_volume_node=volume)
    assert segmentation.GetTransformNodeID() == moved.GetID()
    logic.export_labelmap(segmentation, tmp_path / "ok.nii.gz", reference_volume_node=volume)
    other = load_into_scene(scene, phantoms["ras"][0])  # the same grid, but not under the transform
    with pytest.raises(ValueError, match="under different transforms; harden the transforms first"):
        logic.export_labelmap(segmentation, tmp_path / "bad.nii.gz", reference_volume_node=other)
    assert not (tmp_path / "bad.nii.gz").exists()


def test_a_label_file_alone_brings_its_own_grid(scene, catalog, phantoms, tmp_path):
    logic = RepUXLogic(scene, catalog)
    segmentation = logic.import_labelmap(phantoms["oblique"][1], "tiny")
    assert segmentation.GetScene() is scene and scene.GetNumberOfNodes() == 2  # the node and its display
    truth = read_volume(phantoms["oblique"][1])
    path = logic.export_labelmap(segmentation, tmp_path / "alone.nii.gz")  # on the stored reference geometry
    np.testing.assert_array_equal(on_grid_of(read_volume(path), truth), truth.array)


def test_repeated_exports_do_not_keep_copies_of_the_ct(scene, catalog, tmp_path):
    """The reference geometry is made from the CT (a copy of its voxels): it must be freed."""
    import psutil

    from repux.data.phantoms import make_phantom
    from repux.imageio import write_volume

    image, label = make_phantom(5, shape=(256, 256, 96), oblique=False, orientation="RAS")
    ct_bytes = image.array.astype(np.int16).nbytes  # 12.6 MB as MRML holds it (short)
    volume = load_into_scene(scene, write_volume(image, tmp_path / "ct.nrrd"))
    logic = RepUXLogic(scene, catalog)
    segmentation = logic.import_labelmap(write_volume(label, tmp_path / "labels.nrrd"), "tiny", reference_volume_node=volume)
    logic.export_labelmap(segmentation, tmp_path / "warm.nrrd", reference_volume_node=volume)
    process = psutil.Process()
    before = process.memory_info().rss
    for number in range(20):
        logic.export_labelmap(segmentation, tmp_path / f"export{number}.nrrd", reference_volume_node=volume)
    growth = process.memory_info().rss - before
    assert growth < ct_bytes, f"20 exports grew the process by {growth / 1e6:.0f} MB (one CT: {ct_bytes / 1e6:.0f} MB)"
