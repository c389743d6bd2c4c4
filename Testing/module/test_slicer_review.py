"""The review Lib on a real MRML scene: confidence overlay, review rows, next uncertain region,
ROI re-segmentation and the ranking, with real ``repux`` jobs of the tiny model (issue 14).

Expected values come from the arrays the tests build or from the job's own files read
independently, never from the functions under test.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

import slicer
from module_helpers import add_user_segment, load_into_scene
from repux.bundle import label_preset
from repux.errors import InputError

from RepUXSegmentLib import review, segmentations
from RepUXSegmentLib.logic import RepUXLogic
from RepUXSegmentLib.runner import JobError
from RepUXSegmentLib.volumes import ijk_to_ras, image_data_from_array, voxel_array

FLARE = label_preset("flare")


def box_in_middle(volume_node, fraction=(0.3, 0.6)):
    """RAS corners of the box spanning ``fraction`` of the volume along each axis (RAS volume)."""
    dims = volume_node.GetImageData().GetDimensions()
    low = ijk_to_ras(volume_node) @ np.array([*(d * fraction[0] for d in dims), 1.0])
    high = ijk_to_ras(volume_node) @ np.array([*(d * fraction[1] for d in dims), 1.0])
    return np.minimum(low, high)[:3], np.maximum(low, high)[:3]


def roi_node(scene, low, high):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    node.SetCenter(*((low + high) / 2))
    node.SetSize(*(high - low))
    return node


def inside_mask(volume_node, low, high) -> np.ndarray:
    """(K, J, I) voxels of the volume whose centres lie in the box, from its own geometry."""
    dims = volume_node.GetImageData().GetDimensions()
    k, j, i = np.meshgrid(*[np.arange(n) for n in reversed(dims)], indexing="ij")
    ras = np.einsum("rc,...c->...r", ijk_to_ras(volume_node)[:3], np.stack([i, j, k, np.ones_like(i)], -1))
    return np.all((ras >= low - 1e-4) & (ras <= high + 1e-4), axis=-1)


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory, phantoms, tiny_bundle):
    from RepUXSegmentLib.catalog import ModelCatalog

    scene = slicer.vtkMRMLScene()
    catalog = ModelCatalog(user_dir=tmp_path_factory.mktemp("models"))
    catalog.add(tiny_bundle, "tiny")
    logic = RepUXLogic(scene, catalog)
    volume = load_into_scene(scene, phantoms["ras"][0])
    result = logic.segment_for_review(volume, "tiny", device="cpu")
    return {"scene": scene, "logic": logic, "volume": volume, "result": result}


def test_confidence_is_a_scalar_volume_on_the_ct_grid_with_confidence_colours(reviewed):
    volume, result, scene = reviewed["volume"], reviewed["result"], reviewed["scene"]
    confidence = result.confidence
    assert confidence.GetScene() is scene and confidence.IsA("vtkMRMLScalarVolumeNode")
    assert np.allclose(ijk_to_ras(confidence), ijk_to_ras(volume), atol=1e-6)
    values = voxel_array(confidence)
    assert values.shape == voxel_array(volume).shape and values.dtype == np.float32
    assert values.min() >= 1 / 5 - 1 / 255 and values.max() <= 1.0  # the chosen label has at least 1/C
    display = confidence.GetDisplayNode()
    colors = scene.GetNodeByID(display.GetColorNodeID())
    assert colors.GetName() == review.CONFIDENCE_COLORS and colors.GetNumberOfColors() == 256
    low_rgba, high_rgba = [0.0] * 4, [0.0] * 4
    colors.GetColor(0, low_rgba)
    colors.GetColor(255, high_rgba)
    assert low_rgba[0] == 1.0 and low_rgba[3] == 1.0 and high_rgba[3] == 0.0  # unsure: opaque red; sure: clear
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert [result.segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(4)] == [
        "spleen", "kidney", "liver", "pancreas"]


def test_review_rows_count_the_segments_voxels(reviewed):
    result, volume = reviewed["result"], reviewed["volume"]
    rows = review.review_rows(result.segmentation, result.confidence, result.labels, threshold=0.6)
    geometry = segmentations.reference_geometry(result.segmentation, volume)
    labels = segmentations.labelmap_array(result.segmentation, result.labels, geometry)
    voxel_ml = float(np.prod(volume.GetSpacing())) / 1000
    confidence = voxel_array(result.confidence)
    assert [row["name"] for row in rows] == ["spleen", "kidney", "liver", "pancreas"]
    for row in rows:
        organ = labels == row["label"]
        assert row["volume_ml"] == pytest.approx(organ.sum() * voxel_ml, abs=1e-4)
        assert row["low_confidence_ml"] == pytest.approx((organ & (confidence < 0.6)).sum() * voxel_ml, abs=1e-4)
        assert result.segmentation.GetSegmentation().GetSegment(row["segment_id"]).GetName() == row["name"]


def make_review_pair(scene, label_array: np.ndarray, confidence_bytes: np.ndarray, spacing=(2.0, 2.0, 2.0)):
    """A segmentation and a confidence node (K, J, I arrays) on a RAS grid with ``spacing``."""
    matrix = np.diag([*spacing, 1.0])
    matrix[:3, 3] = (10.0, -20.0, 5.0)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    volume.SetSpacing(*spacing)
    volume.SetOrigin(10.0, -20.0, 5.0)
    volume.SetAndObserveImageData(image_data_from_array(np.zeros(label_array.shape, np.int16)))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    segmentations.fill_segmentation(segmentation, label_array, matrix, FLARE, "tiny")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    confidence = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "confidence")
    confidence.SetSpacing(*spacing)
    confidence.SetOrigin(10.0, -20.0, 5.0)
    confidence.SetAndObserveImageData(image_data_from_array(confidence_bytes.astype(np.float32) / 255))
    return segmentation, confidence


def test_next_uncertain_region_visits_largest_first_never_twice_and_names_the_organs():
    scene = slicer.vtkMRMLScene()
    labels = np.zeros((20, 24, 28), np.uint8)
    labels[2:12, 2:12, 2:12] = 3  # liver
    labels[14:18, 14:20, 20:26] = 1  # spleen
    confidence = np.full(labels.shape, 250, np.uint8)
    confidence[9:14, 9:14, 9:14] = 40  # 125 voxels across the liver's edge
    confidence[15:17, 15:18, 21:24] = 60  # 18 voxels inside the spleen
    confidence[0, 23, 0] = 10  # 1 voxel of background
    segmentation, confidence_node = make_review_pair(scene, labels, confidence)
    tour = review.UncertainRegionTour(segmentation, confidence_node, FLARE)
    visits = []
    while (region := tour.next_region()) is not None:
        visits.append(region)
    assert [v["voxels"] for v in visits] == [125, 18, 1]
    assert [v["number"] for v in visits] == [1, 2, 3] and [v["left"] for v in visits] == [2, 1, 0]
    assert visits[0]["organs"] == ["background", "liver"]  # 98 background voxels, 27 liver
    assert visits[1]["organs"] == ["spleen"] and visits[2]["organs"] == ["background"]
    assert visits[0]["volume_ml"] == pytest.approx(125 * 8 / 1000)
    # The point to centre on is a voxel of the region: RAS back to (k, j, i) through the grid.
    for visit, box in zip(visits, [(slice(9, 14),) * 3, (slice(15, 17), slice(15, 18), slice(21, 24))]):
        i, j, k = np.round((np.array(visit["ras"]) - (10.0, -20.0, 5.0)) / 2.0).astype(int)
        assert confidence[k, j, i] < 128 and all(s.start <= x < s.stop for s, x in zip(box, (k, j, i)))
    assert tour.next_region() is None  # never twice
    # A new tour (e.g. after a re-segmentation) given the old one's visits starts with nothing left.
    again = review.UncertainRegionTour(segmentation, confidence_node, FLARE, visited=tour.visited)
    assert again.next_region() is None
    fresh = review.UncertainRegionTour(segmentation, confidence_node, FLARE, visited=list(tour.visited)[:0])
    assert fresh.next_region()["voxels"] == 125


def test_roi_resegmentation_keeps_every_edit_outside_the_box(reviewed, tmp_path):
    scene, logic, volume, result = reviewed["scene"], reviewed["logic"], reviewed["volume"], reviewed["result"]
    segmentation = result.segmentation
    geometry = segmentations.reference_geometry(segmentation, volume)
    whole = segmentations.labelmap_array(segmentation, result.labels, geometry)
    low, high = box_in_middle(volume)
    inside = inside_mask(volume, low, high)
    # The user's work: every voxel of the liver segment emptied (inside the box and out), and a tumor.
    liver_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
    empty = segmentations.oriented_image(np.zeros(whole.shape, np.uint8), ijk_to_ras(volume))
    logic_module = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic_module.SetBinaryLabelmapToSegment(empty, segmentation, liver_id, logic_module.MODE_REPLACE)
    add_user_segment(segmentation, "tumor", volume)
    masks_before = {sid: segmentations.segment_mask(segmentation, sid, geometry)
                    for sid in ["spleen", "kidney", "liver", "pancreas", "tumor"]}
    confidence_before = voxel_array(result.confidence)

    changed = logic.resegment_roi(volume, segmentation, roi_node(scene, low, high), device="cpu",
                                  confidence_node=result.confidence)
    after = segmentations.labelmap_array(segmentation, result.labels, geometry, ignore_unknown=True)
    # Inside the box: the whole-CT result again, byte for byte (the deleted liver is back).
    assert after[inside].tobytes() == whole[inside].tobytes()
    assert changed == int(np.count_nonzero((whole == 3) & inside))
    for segment_id, before in masks_before.items():
        now = segmentations.segment_mask(segmentation, segment_id, geometry)
        assert np.array_equal(now[~inside], before[~inside]), segment_id  # untouched outside the box
    assert np.array_equal(voxel_array(result.confidence)[~inside], confidence_before[~inside])
    assert np.abs(voxel_array(result.confidence)[inside] - confidence_before[inside]).max() <= 1 / 255 + 1e-6


def test_bad_rois_are_refused_and_the_scene_stays(reviewed):
    scene, logic, volume, result = reviewed["scene"], reviewed["logic"], reviewed["volume"], reviewed["result"]
    flat = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "flat")
    flat.SetCenter(0.0, 0.0, 0.0)
    flat.SetSize(10.0, 0.0, 10.0)
    with pytest.raises(InputError, match="zero size along A"):
        logic.resegment_roi(volume, result.segmentation, flat, device="cpu")
    geometry = segmentations.reference_geometry(result.segmentation, volume)
    before = segmentations.labelmap_array(result.segmentation, result.labels, geometry, ignore_unknown=True)
    far = roi_node(scene, np.array([5000.0, 5000.0, 5000.0]), np.array([5100.0, 5100.0, 5100.0]))
    with pytest.raises(JobError, match="holds no voxel of the image"):
        logic.resegment_roi(volume, result.segmentation, far, device="cpu")
    after = segmentations.labelmap_array(result.segmentation, result.labels, geometry, ignore_unknown=True)
    assert np.array_equal(before, after)


def test_next_case_is_loaded_in_ranking_order(reviewed, phantoms, tmp_path):
    scene, logic = reviewed["scene"], reviewed["logic"]
    ranking = tmp_path / "ranking.csv"
    order = logic.rank_cases([phantoms["ras"][0], phantoms["oblique"][0]], "tiny", ranking, device="cpu")
    with open(ranking, newline="") as stream:
        table = sorted(csv.DictReader(stream), key=lambda row: int(row["rank"]))
    assert [str(p) for p in order] == [row["path"] for row in table]
    assert [float(row["score"]) for row in table] == sorted((float(row["score"]) for row in table), reverse=True)
    first = logic.load_next_ranked_case(ranking, seen=[])
    assert first.GetScene() is scene and first.GetAttribute(review.CASE_PATH_ATTRIBUTE) == table[0]["path"]
    second = logic.load_next_ranked_case(ranking, seen=[first.GetAttribute(review.CASE_PATH_ATTRIBUTE)])
    assert second.GetAttribute(review.CASE_PATH_ATTRIBUTE) == table[1]["path"]
    assert logic.load_next_ranked_case(ranking, seen=[row["path"] for row in table]) is None
