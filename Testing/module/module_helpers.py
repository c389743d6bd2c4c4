"""Helpers shared by the module tests: tiny bundles, loading volumes into a scene, grid comparisons."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

MODULE_DIR = Path(__file__).resolve().parents[2] / "RepUXSegment"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from repux.imageio import Volume  # noqa: E402

#: A small grid for every phantom here: quick to segment with the tiny model on a CPU.
PHANTOM_SHAPE = (48, 40, 32)


def save_tiny_bundle(out_dir: Path, spacing_mm: float = 8.0, name: str = "tiny", labels: str = "flare") -> Path:
    """A RepUX-Net with feature sizes (4, 8, 16, 32) and hidden size 32 as a bundle folder."""
    import torch

    from repux.bundle import BundleMetadata, default_preprocessing, label_preset, save_bundle
    from repux.network import RepUXNet

    torch.manual_seed(0)
    preset = label_preset(labels)
    network = RepUXNet(in_chans=1, out_chans=len(preset), feat_size=(4, 8, 16, 32), hidden_size=32, ks=7)
    config = {key: value for key, value in network.config.items() if key != "arch"}
    metadata = BundleMetadata(
        name=name,
        architecture="repuxnet",
        network=config,
        labels=preset,
        description="tiny test network",
        preprocessing=default_preprocessing(spacing=(spacing_mm,) * 3, patch_size=(32, 32, 32)),
        inference={"overlap": 0.0, "sw_batch_size": 4, "blend": "constant"},
        provenance={"source": "Testing/module/conftest.py", "validation_dice": {"liver": 0.25, "mean": 0.125}},
    )
    return save_bundle(network, metadata, out_dir)


def slow_model_and_ct(folder: Path) -> tuple[Path, Path]:
    """A tiny model at 2 mm and a full-size phantom CT: segmenting it takes minutes on a CPU,
    long enough to stop the job while it runs."""
    from repux.data.phantoms import make_phantom
    from repux.imageio import write_volume

    bundle = save_tiny_bundle(folder / "slow", spacing_mm=2.0, name="slow")
    image, _ = make_phantom(11)
    return bundle, write_volume(image, folder / "big.nii.gz")


def load_into_scene(scene, path: Path, labelmap: bool = False):
    """Load a volume file into ``scene`` as Slicer does: a volume node with its storage node."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode")
    node.SetName(Path(path).name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"MRML could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def node_volume(node) -> Volume:
    """A volume node as a repux Volume (array [i, j, k], geometry from its IJK-to-RAS matrix)."""
    from RepUXSegmentLib.volumes import ijk_to_ras, voxel_array

    return Volume.from_affine(voxel_array(node).transpose(2, 1, 0), ijk_to_ras(node))


def on_grid_of(volume: Volume, reference: Volume, tol: float = 1e-3) -> np.ndarray:
    """``volume``'s array in ``reference``'s voxel order; the grids must be the same points in
    space, differing only by axis order and direction (as MRML's right-handed reading makes them)."""
    index_map = np.linalg.inv(reference.affine) @ volume.affine  # volume ijk -> reference ijk
    linear = np.round(index_map[:3, :3])
    assert np.allclose(index_map[:3, :3], linear, atol=tol), f"grids are not axis permutations: {index_map.round(4)}"
    assert sorted(np.abs(linear).sum(axis=0)) == [1, 1, 1] and sorted(np.abs(linear).sum(axis=1)) == [1, 1, 1]
    source_axis = [int(np.flatnonzero(linear[r])[0]) for r in range(3)]
    array = np.transpose(volume.array, source_axis)
    for r in range(3):
        if linear[r, source_axis[r]] < 0:
            array = np.flip(array, axis=r)
    assert array.shape == reference.shape, f"shape {array.shape} on the reference grid, expected {reference.shape}"
    corner = index_map @ np.array([0.0, 0.0, 0.0, 1.0])
    expected_corner = [0 if linear[r, source_axis[r]] > 0 else reference.shape[r] - 1 for r in range(3)]
    assert np.allclose(corner[:3], expected_corner, atol=tol), f"grids are shifted: {corner[:3]} vs {expected_corner}"
    return np.ascontiguousarray(array)


def scene_state(scene) -> list[tuple[str, str, int]]:
    """(ID, class, modification time) of every node: equal before and after = scene untouched."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [(node.GetID(), node.GetClassName(), node.GetMTime()) for node in nodes]


def add_user_segment(segmentation_node, name: str, reference_node) -> None:
    """Add a one-voxel segment ``name`` on ``reference_node``'s grid (as a user drawing one would)."""
    from RepUXSegmentLib.segmentations import BINARY_LABELMAP, oriented_image
    from RepUXSegmentLib.volumes import ijk_to_ras

    import slicer

    array = np.zeros((2, 2, 2), dtype=np.uint8)
    array[0, 0, 0] = 1
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(BINARY_LABELMAP, oriented_image(array, ijk_to_ras(reference_node)))
    segmentation_node.GetSegmentation().AddSegment(segment, name)
