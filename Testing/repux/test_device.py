"""The inference and training parts on the device named by ``REPUX_TEST_DEVICE`` (default: the CPU).

``benchmarks/device_check.sh`` runs this file with ``REPUX_TEST_DEVICE=cuda`` on a GPU
machine; CI runs it on the CPU. Each test compares the device's result with the CPU's (or,
on the CPU, with the plain network's), so that a stage that runs wrongly on the device
fails here. Tolerances: float32 logits to 1e-4 of their magnitude (cuDNN's convolutions
round differently; TF32 is switched off for the comparison), labels of a whole segmentation
to Dice 0.999, bfloat16 argmax to 97 % of voxels (as test_accelerate), one optimizer step
to 1e-5 of the weights' change.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from infer_support import save_tiny_bundle, tiny_network
from repux.accel import InferenceOptions, native_bfloat16, optimize_for_inference
from repux.bench.agreement import label_dice
from repux.bfr import BFRAdamW, bfr_param_groups
from repux.bundle import load_bundle
from repux.data.phantoms import make_phantom
from repux.infer import Segmenter

DEVICE = torch.device(os.environ.get("REPUX_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip(f"REPUX_TEST_DEVICE={DEVICE}: no CUDA device here", allow_module_level=True)


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 matrix products and convolutions on CUDA (TF32 would round to 10 bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double().cpu(), reference.double().cpu()
    return float((value - reference).abs().max() / reference.abs().max())


def windows() -> torch.Tensor:
    return torch.rand((2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))


def test_optimized_network_on_the_device_computes_the_plain_networks_logits() -> None:
    network = tiny_network()
    with torch.inference_mode():
        expected = network(windows())
        got = optimize_for_inference(network, DEVICE)(windows().to(DEVICE))
    assert got.device.type == DEVICE.type and got.dtype == torch.float32
    assert relative_error(got, expected) < 1e-4


@pytest.mark.skipif(not native_bfloat16(DEVICE), reason=f"bfloat16 is not native on {DEVICE} here")
def test_bfloat16_on_the_device_keeps_the_argmax() -> None:
    network = tiny_network()
    with torch.inference_mode():
        expected = network(windows()).argmax(dim=1)
        fast = optimize_for_inference(network, DEVICE, InferenceOptions(precision="bfloat16"))
        assert fast.autocast_dtype == torch.bfloat16
        got = fast(windows().to(DEVICE)).argmax(dim=1).cpu()
    assert float((got == expected).double().mean()) > 0.97


def test_segmenting_on_the_device_gives_the_cpus_labels(tmp_path) -> None:
    bundle = load_bundle(save_tiny_bundle(tmp_path / "tiny"))
    image, _ = make_phantom(3, shape=(64, 64, 24), spacing=(4.0, 4.0, 6.0))
    expected = Segmenter(bundle, device="cpu").predict(image)
    prediction = Segmenter(bundle, device=DEVICE).predict(image)
    # Windows ran on the device and the logits were stitched there (so softmax and export ran there too).
    assert prediction.plan.device.type == prediction.plan.stitch_device.type == DEVICE.type
    assert prediction.labels.array.shape == image.shape and prediction.labels.array.dtype == np.uint8
    assert prediction.labels.affine.tolist() == image.affine.tolist()
    assert label_dice(expected.labels.array, prediction.labels.array, 5) == pytest.approx([1.0] * 4, abs=1e-3)


def test_bfr_adamw_steps_on_the_device_match_the_cpus() -> None:
    # The same gradients on both devices (a backward pass would differ by rounding, and
    # Adam's first steps are about lr * sign(gradient): a near-zero gradient could flip).
    generator = torch.Generator().manual_seed(1)
    gradients = [
        [torch.randn(p.shape, generator=generator) for p in tiny_network().parameters()] for _ in range(3)
    ]
    changes = {}
    for device in (torch.device("cpu"), DEVICE):
        network = tiny_network().train().to(device)
        optimizer = BFRAdamW(bfr_param_groups(network), lr=1e-3)
        before = torch.cat([p.detach().flatten().cpu() for p in network.parameters()])
        for step in gradients:
            for parameter, gradient in zip(network.parameters(), step):
                parameter.grad = gradient.to(device)
            optimizer.step()
        changes[device.type] = torch.cat([p.detach().flatten().cpu() for p in network.parameters()]) - before
    assert float(changes["cpu"].abs().max()) > 0  # the steps moved the weights
    assert relative_error(changes[DEVICE.type], changes["cpu"]) < 1e-5
