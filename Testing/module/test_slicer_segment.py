"""RepUXLogic.segment on a real MRML scene with a real ``repux segment`` process.

Expected names, colours and codes come from the label preset and from Slicer's terminology
facts (shared/spec/TERMINOLOGY.md), not from the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import vtk

import slicer
from module_helpers import MODULE_DIR, add_user_segment, load_into_scene, node_volume, on_grid_of, scene_state
from repux.imageio import read_volume

from RepUXSegmentLib.logic import RepUXLogic
from RepUXSegmentLib.runner import JobError, SUCCEEDED
from RepUXSegmentLib.segmentations import labelmap_array, reference_geometry, segment_tag
from RepUXSegmentLib.volumes import ijk_to_ras, write_volume_node

# From TERMINOLOGY.md: Slicer's General Anatomy codes and recommended colours.
EXPECTED_TYPES = {
    "spleen": ("78961009", "Spleen", (157, 108, 162)),
    "kidney": ("64033007", "Kidney", (185, 102, 83)),
    "liver": ("10200004", "Liver", (221, 130, 101)),
    "pancreas": ("15776009", "Pancreas", (249, 180, 111)),
}
FLARE_ORDER = ["spleen", "kidney", "liver", "pancreas"]


def segments_of(node):
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]


def matrix_of(oriented_image) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    oriented_image.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, phantoms, tiny_bundle):
    """Two jobs run at once on one scene (shared by the checks below): the oblique, non-RAS
    phantom into a new segmentation, and the RAS phantom into an existing one."""
    from RepUXSegmentLib.catalog import ModelCatalog

    scene = slicer.vtkMRMLScene()
    catalog = ModelCatalog(user_dir=tmp_path_factory.mktemp("models"))
    catalog.add(tiny_bundle, "tiny")
    logic = RepUXLogic(scene, catalog)
    volume = load_into_scene(scene, phantoms["oblique"][0])
    ras_volume = load_into_scene(scene, phantoms["ras"][0])
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my result")
    add_user_segment(existing, "tumor", ras_volume)
    records = []
    job = logic.segment(volume, "tiny", device="cpu", wait=False, progress=records.append)
    update_job = logic.segment(ras_volume, "tiny", device="cpu", wait=False, segmentation_node=existing)
    node = job.wait(timeout=300)
    updated = update_job.wait(timeout=300)
    return {
        "scene": scene, "volume": volume, "node": node, "job": job, "records": records, "catalog": catalog,
        "ras_volume": ras_volume, "existing": existing, "updated": updated,
    }


def test_segments_carry_the_models_names_colours_and_terminology(segmented):
    segments = segments_of(segmented["node"])
    assert [s.GetName() for s in segments] == FLARE_ORDER
    for segment in segments:
        code, meaning, rgb = EXPECTED_TYPES[segment.GetName()]
        assert np.allclose(segment.GetColor(), np.array(rgb) / 255.0, atol=1e-6)
        entry = segment_tag(segment, "TerminologyEntry")
        parts = entry.split("~")
        assert len(parts) == 7
        assert parts[0] == "Segmentation category and type - 3D Slicer General Anatomy list"
        assert parts[1] == "SCT^123037004^Anatomical Structure"
        assert parts[2] == f"SCT^{code}^{meaning}"
        assert parts[3] == "^^"
        assert parts[4] == "Anatomic codes - DICOM master list"


def test_segmentation_is_on_the_oblique_input_grid(segmented):
    scene, volume, node = segmented["scene"], segmented["volume"], segmented["node"]
    assert node.GetScene() is scene
    role = node.GetReferenceImageGeometryReferenceRole()
    assert node.GetNodeReference(role).GetID() == volume.GetID()
    # Every segment's labelmap lies exactly on the volume's voxels.
    expected_matrix = ijk_to_ras(volume)
    dims = volume.GetImageData().GetDimensions()
    for segment in segments_of(node):
        internal = node.GetBinaryLabelmapInternalRepresentation(segment.GetName())
        assert np.allclose(matrix_of(internal), expected_matrix, atol=1e-6)
        extent = internal.GetExtent()
        assert (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1) == dims
    # The oblique PIL phantom really is oblique and not RAS in the scene.
    direction = expected_matrix[:3, :3] / np.linalg.norm(expected_matrix[:3, :3], axis=0)
    assert not np.allclose(np.abs(direction), np.eye(3), atol=1e-3)


def test_segments_hold_what_the_model_predicts_on_that_grid(segmented, tmp_path, tiny_bundle):
    """The imported labels equal an in-process prediction of the same bundle on the same input."""
    from repux.bundle import load_bundle
    from repux.infer import Segmenter

    volume, node, catalog = segmented["volume"], segmented["node"], segmented["catalog"]
    written = write_volume_node(volume, tmp_path / "input.nrrd")
    predicted = Segmenter(load_bundle(tiny_bundle), device="cpu").segment(read_volume(written))
    labels = catalog.get("tiny").labels
    imported = labelmap_array(node, labels, reference_geometry(node, volume))
    imported_volume = node_volume(volume).with_array(imported.transpose(2, 1, 0))
    agreement = np.mean(on_grid_of(imported_volume, predicted) == predicted.array)
    assert agreement > 0.999, f"only {agreement:.4%} of voxels agree"


def test_progress_reaches_done_and_temporary_files_go(segmented):
    job, records = segmented["job"], segmented["records"]
    assert job.state == SUCCEEDED
    assert records == job.records
    assert records[-1]["stage"] == "done"
    infer = [r for r in records if r.get("stage") == "infer" and r.get("total")]
    assert infer and infer[-1]["done"] == infer[-1]["total"]
    # The job's temporary folder (input.nrrd, labels.nrrd) was removed.
    input_file = Path(job.command[job.command.index("segment") + 1])
    assert not input_file.parent.exists()


def test_the_scene_gains_only_the_segmentation_and_its_display(segmented):
    scene, volume, node = segmented["scene"], segmented["volume"], segmented["node"]
    classes = sorted(scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes()))
    assert classes == sorted(
        ["vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode"] * 2
        + ["vtkMRMLSegmentationNode"] * 2
        + ["vtkMRMLSegmentationDisplayNode"]  # only the new node gets one; "my result" had none
    )
    assert node.GetName() == f"{volume.GetName()} segmentation"


def test_an_existing_segmentation_is_updated_in_place(segmented):
    target, ras_volume = segmented["existing"], segmented["ras_volume"]
    assert segmented["updated"] is target
    assert [s.GetName() for s in segments_of(target)] == FLARE_ORDER
    # Axis-aligned RAS input: the grid is the volume's too.
    internal = target.GetBinaryLabelmapInternalRepresentation("liver")
    assert np.allclose(matrix_of(internal), ijk_to_ras(ras_volume), atol=1e-6)
    role = target.GetReferenceImageGeometryReferenceRole()
    assert target.GetNodeReference(role).GetID() == ras_volume.GetID()


def test_a_failing_job_leaves_the_scene_as_it_was_and_keeps_the_error(scene, catalog, phantoms, tmp_path):
    # A bundle whose model.json is fine but whose weights are not a safetensors file: the
    # catalog accepts it (it reads JSON only); the repux process must refuse it.
    broken = catalog.user_dir / "broken"
    broken.mkdir()
    (broken / "model.json").write_bytes((catalog.get("tiny").path / "model.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"not weights")
    volume = load_into_scene(scene, phantoms["ras"][0])
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "keep me")
    add_user_segment(target, "tumor", volume)
    before = scene_state(scene)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(JobError) as raised:
        RepUXLogic(scene, catalog, temp_dir=work).segment(volume, "broken", device="cpu", segmentation_node=target)
    assert "model.safetensors" in str(raised.value)
    assert scene_state(scene) == before
    assert [s.GetName() for s in segments_of(target)] == ["tumor"]
    assert list(work.iterdir()) == []


def test_bad_arguments_are_refused_before_anything_runs(scene, catalog, phantoms):
    volume = load_into_scene(scene, phantoms["ras"][0])
    logic = RepUXLogic(scene, catalog)
    with pytest.raises(ValueError, match="device 'gpu'"):
        logic.segment(volume, "tiny", device="gpu")
    with pytest.raises(ValueError, match="model 'nope'.*tiny"):
        logic.segment(volume, "nope")
    other_scene = slicer.vtkMRMLScene()
    elsewhere = other_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError, match="not in this logic's scene"):
        logic.segment(volume, "tiny", segmentation_node=elsewhere)


def test_the_calling_process_never_imports_torch(phantoms, tiny_bundle, tmp_path):
    """The GUI side (this lib) segments without importing torch or MONAI itself."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(MODULE_DIR)!r})
        import slicer
        from RepUXSegmentLib.catalog import ModelCatalog
        from RepUXSegmentLib.logic import RepUXLogic
        from RepUXSegmentLib.volumes import read_volume_node
        scene = slicer.vtkMRMLScene()
        volume = read_volume_node({str(phantoms["ras"][0])!r})
        scene.AddNode(volume)
        node = RepUXLogic(scene, ModelCatalog({str(tmp_path / "models")!r})).segment(volume, {str(tiny_bundle)!r}, device="cpu")
        print(json.dumps({{"segments": node.GetSegmentation().GetNumberOfSegments(),
                          "heavy": sorted(m for m in ("torch", "monai") if m in sys.modules)}}))
        """
    )
    env = dict(os.environ)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary == {"segments": 4, "heavy": []}
