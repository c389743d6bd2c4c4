"""The inference engine: agreement with a direct network call, geometry, devices and out-of-memory fallbacks."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from repux.bundle import load_bundle
from repux.errors import InputError
from repux.imageio import Volume, read_volume, write_volume
from repux.accel import OptimizedNetwork
from repux.infer import ExecutionPlan, Segmenter, SlidingWindowConfig, check_image, resolve_device
from repux.infer.predict import (
    CPU_ACTIVATION_BUDGET,
    FEATURE_MAPS_PER_WINDOW,
    softmax_in_place,
    windows_fitting_memory,
)
from repux.infer.preprocess import PreprocessingConfig, padded_shape
from repux.progress import Progress
from infer_support import (
    IntensityClassifier,
    analytic_volume,
    dice,
    oblique_direction,
    reorient_volume,
    save_tiny_bundle,
)


@pytest.fixture(scope="module")
def bundle_2mm(tmp_path_factory):
    """Tiny RepUX-Net bundle: 2 mm voxels, 32^3 windows."""
    return load_bundle(save_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", spacing=(2.0, 2.0, 2.0)))


@pytest.fixture(scope="module")
def bundle_4mm(tmp_path_factory):
    """Tiny RepUX-Net bundle: 4 mm voxels, 32^3 windows (small inputs fit one or a few windows)."""
    return load_bundle(save_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny4", spacing=(4.0, 4.0, 4.0)))


def _window(hu: np.ndarray) -> torch.Tensor:
    # The published CT window, written out here independently of the engine.
    return torch.from_numpy(np.clip((hu.astype(np.float32) + 125.0) / 400.0, 0.0, 1.0))


def _ras_volume(array: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Volume:
    # RAS axes in LPS terms: i towards R (-x LPS), j towards A (-y LPS), k towards S.
    return Volume(array, spacing, (12.0, -30.0, 7.0), np.diag([-1.0, -1.0, 1.0]))


def test_engine_equals_direct_forward_on_one_window(bundle_2mm):
    rng = np.random.default_rng(1)
    hu = rng.uniform(-120, 260, size=(32, 32, 32)).astype(np.int16)  # all body: nothing cropped
    volume = _ras_volume(hu)
    prediction = Segmenter(bundle_2mm, device="cpu").predict(volume, probabilities=True)
    network = bundle_2mm.build_network()
    with torch.inference_mode():
        logits = network(_window(hu)[None, None])[0]
    expected = torch.softmax(logits, dim=0)
    assert prediction.windows == 1
    assert prediction.labels.same_geometry(volume)
    np.testing.assert_array_equal(prediction.labels.array, expected.argmax(0).numpy())
    np.testing.assert_allclose(prediction.probabilities, expected.numpy(), atol=1e-5)


def test_engine_equals_direct_forward_on_padded_odd_shape(bundle_2mm):
    rng = np.random.default_rng(2)
    hu = rng.uniform(-120, 260, size=(29, 23, 17)).astype(np.int16)
    volume = _ras_volume(hu)
    labels = Segmenter(bundle_2mm, device="cpu").segment(volume)
    # Pad by hand to the 32^3 patch, centred, with the window of the image's minimum.
    padded = torch.full((32, 32, 32), float(_window(np.array([hu.min()]))[0]))
    starts = [(32 - n) // 2 for n in hu.shape]
    box = tuple(slice(s, s + n) for s, n in zip(starts, hu.shape))
    padded[box] = _window(hu)
    with torch.inference_mode():
        logits = bundle_2mm.build_network()(padded[None, None])[0]
    np.testing.assert_array_equal(labels.array, logits.argmax(0)[box].numpy())


def test_many_windows_equal_one_forward_of_a_per_voxel_network(bundle_2mm):
    image, _ = analytic_volume((60, 50, 40), (2.0, 2.0, 2.0), np.diag([-1.0, -1.0, 1.0]))
    stream = io.StringIO()
    segmenter = Segmenter(
        bundle_2mm, device="cpu", overlap=0.5, progress=Progress("jsonl", stream), network=IntensityClassifier()
    )
    prediction = segmenter.predict(image)
    # The classifier needs no context: stitching must reproduce one pass over the whole image.
    with torch.inference_mode():
        direct = IntensityClassifier()(_window(image.array)[None, None])[0].argmax(0).numpy()
    np.testing.assert_array_equal(prediction.labels.array, direct)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    infer = [r for r in records if r["stage"] == "infer"]
    assert infer[-1]["done"] == infer[-1]["total"] == prediction.windows > 8
    assert [r["stage"] for r in records if "done" in r and r["done"] == 0] == ["preprocess", "infer", "export"]


@pytest.fixture(scope="module")
def odd_image_and_labels(bundle_4mm):
    """An odd-shaped, anisotropic RAS image (spacing unlike the model's) and its engine labels."""
    image, _ = analytic_volume((41, 33, 19), (3.1, 2.7, 5.3), np.diag([-1.0, -1.0, 1.0]))
    return image, Segmenter(bundle_4mm, device="cpu").segment(image).array


@pytest.mark.parametrize(
    "permutation, flips",
    [((0, 1, 2), (True, True, False)), ((2, 0, 1), (False, True, True)), ((1, 2, 0), (True, False, True))],
)
def test_permuted_and_flipped_inputs_give_identical_labels(
    bundle_4mm, odd_image_and_labels, tmp_path, permutation, flips
):
    image, reference = odd_image_and_labels
    stored = reorient_volume(image, permutation, flips)
    path = tmp_path / "reoriented.nrrd"
    write_volume(stored, path)
    variant = read_volume(path)
    labels = Segmenter(bundle_4mm, device="cpu").segment(variant)
    assert labels.same_geometry(variant)
    # Undo the storage order: flip back, then the inverse permutation.
    back = labels.array
    for t in range(3):
        if flips[t]:
            back = np.flip(back, t)
    back = np.transpose(back, np.argsort(permutation))
    assert len(np.unique(reference)) > 2
    np.testing.assert_array_equal(back, reference)


@pytest.mark.parametrize("degrees, organ", [(12.0, 1), (35.0, 4)])
def test_oblique_input_gives_the_physical_labels(bundle_2mm, degrees, organ):
    # One organ on a straight and on an oblique grid (other spacing, shape and centre):
    # both label maps must match the analytic truth on their own voxels.
    segmenter = Segmenter(bundle_2mm, device="cpu", network=IntensityClassifier(organ))
    straight = analytic_volume((75, 61, 57), (2.5, 2.5, 3.0), np.diag([-1.0, -1.0, 1.0]), organs=(organ,))
    direction = oblique_direction(degrees) @ np.diag([1.0, -1.0, 1.0])
    oblique = analytic_volume((71, 65, 45), (2.4, 2.6, 3.5), direction, (3.0, -2.0, 4.0), (organ,))
    for image, truth in (straight, oblique):
        labels = segmenter.segment(image)
        assert labels.same_geometry(image)
        assert set(np.unique(labels.array)) == {0, organ}
        assert dice(labels.array == organ, truth.array == organ) >= 0.99


def test_probabilities_sum_to_one_and_give_the_labels(bundle_4mm):
    image, _ = analytic_volume((37, 31, 23), (4.0, 4.0, 5.0), oblique_direction(20.0))
    prediction = Segmenter(bundle_4mm, device="cpu").predict(image, probabilities=True)
    probabilities = prediction.probabilities
    assert probabilities.shape == (5, *image.shape)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=0), prediction.labels.array)


def test_outside_the_body_crop_is_background(bundle_2mm):
    # Air everywhere but one body block: the random network sees only the block and its margin.
    hu = np.full((64, 64, 40), -1000, dtype=np.int16)
    hu[20:40, 24:44, 10:30] = 50
    volume = _ras_volume(hu)
    segmenter = Segmenter(bundle_2mm, device="cpu")
    labels = segmenter.segment(volume).array
    margin = int(np.ceil(segmenter.preprocessing.body_margin_mm / 2.0))
    kept = np.zeros_like(labels, dtype=bool)
    kept[20 - margin : 40 + margin, 24 - margin : 44 + margin, 10 - margin : 30 + margin] = True
    assert not labels[~kept].any()


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((20, 20, 20), 40, dtype=np.int16), "every voxel has the value 40"),
        (np.where(np.arange(8000).reshape(20, 20, 20) == 5, np.nan, 0.0), "1 of 8000 voxels are NaN or infinite"),
        (np.where(np.arange(8000).reshape(20, 20, 20) < 3, np.inf, 0.0), "3 of 8000 voxels are NaN or infinite"),
    ],
)
def test_bad_images_are_refused_with_the_reason(bundle_2mm, array, message):
    volume = _ras_volume(array)
    with pytest.raises(InputError, match=message) as error:
        check_image(volume, "scan.nii.gz")
    assert "scan.nii.gz" in str(error.value)
    with pytest.raises(InputError, match=message):
        Segmenter(bundle_2mm, device="cpu").segment(volume, source="scan.nii.gz")


def test_image_without_negative_values_gets_a_warning(bundle_2mm):
    image, _ = analytic_volume((30, 30, 20), (4.0, 4.0, 5.0))
    shifted = image.with_array((image.array.astype(np.int32) + 1024).astype(np.uint16))  # unsigned, no rescale
    prediction = Segmenter(bundle_2mm, device="cpu", network=IntensityClassifier()).predict(shifted, source="raw.nrrd")
    assert any("raw.nrrd: no negative voxel values (minimum 24)" in warning for warning in prediction.warnings)
    assert Segmenter(bundle_2mm, device="cpu", network=IntensityClassifier()).predict(image).warnings == []


def test_padded_shape_is_a_multiple_of_16_and_at_least_the_patch():
    assert padded_shape((30, 33, 100), (32, 32, 32)) == (32, 48, 112)
    assert padded_shape((5, 64, 65), (96, 48, 32)) == (96, 64, 80)


def test_window_count_matches_the_windows_monai_runs():
    config = SlidingWindowConfig(patch_size=(32, 32, 32), overlap=0.5, sw_batch_size=3)
    seen = []

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        seen.append(windows.shape[0])
        return windows

    from monai.inferers import sliding_window_inference

    image = torch.zeros(1, 1, 80, 48, 32)
    sliding_window_inference(image, config.patch_size, config.sw_batch_size, predictor, overlap=config.overlap)
    assert config.window_count((80, 48, 32)) == sum(seen) == 4 * 2 * 1


def test_intensity_window_and_clip():
    config = PreprocessingConfig.from_metadata(
        {
            "spacing": [1, 1, 1],
            "orientation": "RAS",
            "intensity": {"a_min": -125, "a_max": 275, "b_min": 0, "b_max": 1, "clip": True},
            "patch_size": [32, 32, 32],
        }
    )
    values = config.window(torch.tensor([-1000.0, -125.0, 75.0, 275.0, 3000.0]))
    np.testing.assert_allclose(values.numpy(), [0.0, 0.0, 0.5, 1.0, 1.0])


class OutOfMemoryOnce(nn.Module):
    """Runs the wrapped network, but the first call fails like an exhausted GPU."""

    def __init__(self, network: nn.Module, when=lambda calls, batch: calls == 1) -> None:
        super().__init__()
        self.network = network
        self.when = when
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.when(self.calls, x.shape[0]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.network(x)


def _many_window_volume() -> Volume:
    image, _ = analytic_volume((40, 36, 24), (3.0, 3.0, 4.0), np.diag([-1.0, -1.0, 1.0]))
    return image


def test_out_of_memory_is_retried_with_fewer_windows_per_pass(bundle_4mm, odd_image_and_labels):
    image, expected = odd_image_and_labels
    flaky = OutOfMemoryOnce(bundle_4mm.build_network())
    prediction = Segmenter(bundle_4mm, device="cpu", network=flaky).predict(image)
    assert flaky.calls == 2
    assert prediction.plan.sw_batch_size == 1  # the bundle's 2, halved once
    assert any("out of memory with 2 window(s)" in note for note in prediction.notes)
    np.testing.assert_array_equal(prediction.labels.array, expected)


def test_out_of_memory_at_every_batch_above_one_ends_at_one_window(tmp_path):
    bundle = load_bundle(save_tiny_bundle(tmp_path / "b8", spacing=(2.0, 2.0, 2.0), sw_batch_size=8))
    volume = _many_window_volume()
    expected = Segmenter(bundle, device="cpu", network=IntensityClassifier()).segment(volume).array
    picky = OutOfMemoryOnce(IntensityClassifier(), when=lambda calls, batch: batch > 1)
    prediction = Segmenter(bundle, device="cpu", network=picky).predict(volume)
    assert prediction.windows > 8
    assert prediction.plan.sw_batch_size == 1
    assert len([n for n in prediction.notes if "out of memory" in n]) == 3  # 8 -> 4 -> 2 -> 1
    np.testing.assert_array_equal(prediction.labels.array, expected)


def test_out_of_memory_with_nothing_left_to_try_is_an_error(bundle_2mm):
    hopeless = OutOfMemoryOnce(IntensityClassifier(), when=lambda calls, batch: True)
    with pytest.raises(torch.OutOfMemoryError, match="even with 1 window"):
        Segmenter(bundle_2mm, device="cpu", network=hopeless).segment(_many_window_volume())


def test_segmenter_runs_the_optimized_network_unless_told_not_to(bundle_4mm, odd_image_and_labels):
    image, _ = odd_image_and_labels
    optimized = Segmenter(bundle_4mm, device="cpu")
    plain = Segmenter(bundle_4mm, device="cpu", optimize=False)
    assert isinstance(optimized.predictor.network, OptimizedNetwork)
    assert not isinstance(plain.predictor.network, OptimizedNetwork)
    fast = optimized.predict(image, probabilities=True)
    slow = plain.predict(image, probabilities=True)
    assert np.abs(fast.probabilities - slow.probabilities).max() < 1e-4
    np.testing.assert_array_equal(fast.labels.array, slow.labels.array)


@pytest.mark.parametrize("inference", [True, False])
def test_softmax_in_place_equals_softmax_and_allocates_no_second_volume(monkeypatch, inference):
    monkeypatch.setattr("repux.infer.predict.SOFTMAX_SLAB_VOXELS", 7 * 5)  # 3 voxels of X per slab, ragged end
    torch.manual_seed(0)
    source = torch.randn(4, 10, 7, 5) * 20
    expected = torch.softmax(source, dim=0)
    with torch.inference_mode(inference):
        logits = source.clone()
    result = softmax_in_place(logits)
    assert result.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)


def test_windows_per_pass_fit_the_cpu_memory_budget(bundle_4mm):
    # The paper's width (48) at 96^3: one window per pass; 8 channels: the 4 asked for.
    assert windows_fitting_memory(48, (96, 96, 96), 4) == 1
    assert windows_fitting_memory(8, (96, 96, 96), 4) == 4
    assert windows_fitting_memory(512, (160, 160, 160), 4) == 1
    per_window = FEATURE_MAPS_PER_WINDOW * 16 * 96**3 * 4
    assert windows_fitting_memory(16, (96, 96, 96), 8) == int(CPU_ACTIVATION_BUDGET // per_window)
    # A tiny bundle keeps its own windows per pass; an explicit number wins; 0 is refused.
    assert Segmenter(bundle_4mm, device="cpu").window.sw_batch_size == bundle_4mm.metadata.inference["sw_batch_size"]
    assert Segmenter(bundle_4mm, device="cpu", windows_per_pass=3).window.sw_batch_size == 3
    with pytest.raises(InputError, match="windows per pass 0"):
        Segmenter(bundle_4mm, device="cpu", windows_per_pass=0)


def test_out_of_memory_fallback_order_on_a_gpu():
    cuda = torch.device("cuda")
    plan = ExecutionPlan(cuda, cuda, 4)
    steps = []
    while plan is not None:
        steps.append((plan.device.type, plan.stitch_device.type, plan.sw_batch_size))
        plan = plan.after_out_of_memory()
    assert steps == [
        ("cuda", "cuda", 4),
        ("cuda", "cuda", 2),
        ("cuda", "cuda", 1),
        ("cuda", "cpu", 1),
        ("cpu", "cpu", 1),
    ]


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="--device tpu"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")


def test_overlap_out_of_range_is_refused(bundle_2mm):
    with pytest.raises(InputError, match="--overlap 1.0"):
        Segmenter(bundle_2mm, device="cpu", overlap=1.0)
