"""The export resamples only the box the labels need, and gives the labels (and review maps,
probabilities) of resampling every input voxel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repux.bundle import load_bundle
from repux.infer import Segmenter
from repux.infer.export import argmax_labels, resampled_box, to_input_grid
from repux.infer.predict import ExecutionPlan, predict_probabilities
from repux.infer.preprocess import preprocess
from repux.imageio import Volume
from infer_support import BODY, ORGAN_HU, IntensityClassifier, analytic_volume, oblique_direction, save_tiny_bundle

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Tiny bundle at 4 mm (the network is replaced by intensity bands below)."""
    return load_bundle(save_tiny_bundle(tmp_path_factory.mktemp("export") / "tiny", spacing=(4.0, 4.0, 4.0)))


def _probabilities(segmenter: Segmenter, image):
    prepared = preprocess(image, segmenter.preprocessing)
    plan = ExecutionPlan(CPU, CPU, segmenter.window.sw_batch_size)
    probabilities, _ = predict_probabilities(prepared.image, segmenter.predictor, segmenter.window, plan)
    return probabilities, prepared


def _block_organ() -> tuple[Volume, None]:
    """A 33 x 31 x 27 mm block of organ 2 in soft tissue, in voxels 8 times finer than the
    model's along i and j: flat faces along the model's axes, beyond which the trilinear
    export still gives the organ for up to half a model voxel (4 input voxels)."""
    array = np.full((110, 104, 40), BODY, dtype=np.int16)
    array[22:88, 21:83, 10:28] = ORGAN_HU[2]
    return Volume(array, (0.5, 0.5, 1.5), (5.0, -7.0, 3.0), np.diag([-1.0, -1.0, 1.0])), None


CASES = {
    # Oblique (20 degrees) and anisotropic voxels: the trilinear export goes through grid_sample.
    "oblique anisotropic": analytic_volume(
        (52, 46, 27), (2.7, 3.1, 5.5), oblique_direction(20.0) @ np.diag([1.0, -1.0, 1.0]), organs=(1, 3)
    ),
    # Axis-aligned, other voxels than the model's: the separable export; organs cut by the field of view.
    "organs at the edge": analytic_volume((34, 30, 16), (2.5, 2.5, 3.5), np.diag([-1.0, -1.0, 1.0]), (30.0, -12.0, 8.0)),
    # Voxels four times finer than the model's around one organ: the trilinear support
    # reaches several input voxels beyond the organ's last model voxel.
    "fine voxels": analytic_volume((70, 64, 44), (1.0, 1.0, 1.5), np.diag([-1.0, -1.0, 1.0]), (-35.0, -10.0, -5.0), (2,)),
    "flat organ faces": _block_organ(),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_box_export_equals_resampling_every_voxel(bundle, case):
    image, _ = CASES[case]
    segmenter = Segmenter(bundle, device="cpu", network=IntensityClassifier(), windows="all")
    probabilities, prepared = _probabilities(segmenter, image)
    everywhere = to_input_grid(probabilities, prepared, everywhere=True)
    labels = to_input_grid(probabilities, prepared).labels
    organs = everywhere.labels > 0
    assert organs.any() and (labels == 0).any()
    if case == "organs at the edge":
        edges = [organs.take(index, axis=axis).any() for axis in range(3) for index in (0, -1)]
        assert sum(edges) >= 2
    np.testing.assert_array_equal(labels, everywhere.labels)
    # Only a box was resampled for the labels: smaller than the grid, holding every organ voxel.
    crop = prepared.unpad(probabilities)
    box = resampled_box(crop, prepared, labels_only=True)
    assert 0 < np.prod([len(r) for r in box]) < organs.size
    reoriented = np.asarray(prepared.reorientation.apply(organs))
    inside = np.zeros_like(reoriented)
    inside[tuple(slice(r.start, r.stop) for r in box)] = True
    assert reoriented[~inside].sum() == 0
    # The review maps and the probabilities: what resampling every voxel gives, bit for bit.
    full = to_input_grid(probabilities, prepared, keep_probabilities=True, review=True, everywhere=True)
    boxed = to_input_grid(probabilities, prepared, keep_probabilities=True, review=True)
    for name in ("labels", "probabilities", "confidence", "entropy"):
        np.testing.assert_array_equal(getattr(boxed, name), getattr(full, name), err_msg=name)


def test_no_organ_exports_background_without_resampling(bundle):
    image, _ = analytic_volume((30, 26, 14), (3.0, 3.0, 4.0), np.diag([-1.0, -1.0, 1.0]), organs=())
    segmenter = Segmenter(bundle, device="cpu", network=IntensityClassifier(), windows="all")
    probabilities, prepared = _probabilities(segmenter, image)
    crop = prepared.unpad(probabilities)
    assert all(len(r) == 0 for r in resampled_box(crop, prepared, labels_only=True))
    assert not to_input_grid(probabilities, prepared).labels.any()
    assert not to_input_grid(probabilities, prepared, everywhere=True).labels.any()


def test_segmenter_export_modes_agree(bundle):
    image, _ = CASES["oblique anisotropic"]
    fast = Segmenter(bundle, device="cpu", network=IntensityClassifier(), windows="all").predict(image, review=True)
    slow = Segmenter(bundle, device="cpu", network=IntensityClassifier(), windows="all", export_everywhere=True).predict(
        image, review=True
    )
    np.testing.assert_array_equal(fast.labels.array, slow.labels.array)
    np.testing.assert_array_equal(fast.confidence, slow.confidence)
    np.testing.assert_array_equal(fast.entropy, slow.entropy)


def test_argmax_labels_is_argmax_with_first_index_on_ties():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand((6, 40, 30), generator=generator)
    values[3, :10] = values[1, :10]  # exact ties between channels 1 and 3
    values[:, 10:12] = 0.5  # all channels tied
    labels, top = argmax_labels(values)
    assert labels.dtype == torch.uint8
    assert torch.equal(labels.long(), values.argmax(dim=0))
    assert torch.equal(top, values.max(dim=0).values)
