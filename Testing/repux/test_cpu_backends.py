"""repux.accel.backends: the optimized network exported to ONNX Runtime and OpenVINO computes the same logits.

A tiny RepUX-Net with random weights is exported, run by each runtime and compared with the
plain network on the same windows. Tolerances, and why:
- float32 on another runtime: logits to 1e-4 of their magnitude (other convolution kernels
  round differently, as in test_accelerate's whole-network checks; a wrong tap, padding or
  crop would be of order 1e-1); on a constant window to 1e-2: its deep feature maps are
  nearly constant, instance norms divide by a variance near zero, and the runtimes' own
  instance norms lose digits there (measured 7e-4 on ONNX Runtime and 1.3e-3 on OpenVINO,
  against 1e-6 for torch's rewrite);
- 8-bit dense convolutions: argmax agreement on 90 % of voxels of a random network (whose
  logits are close to one another, the hardest case), and the dense convolutions, only
  they, quantized in the exported graph.
onnx, ONNX Runtime and OpenVINO are in the test extra (and in cpu-backends); the tests
skip, saying so, only where they are not installed.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from infer_support import save_tiny_bundle
from repux.accel.backends import BackendNetwork, backend_available, backend_network, export_onnx
from repux.bench.agreement import label_dice
from repux.bench.paths import CPU_BACKEND_PATHS, OPTIMIZED, build_segmenter, phantom_calibration_windows
from repux.bundle import load_bundle
from repux.cli import main
from repux.data.phantoms import make_phantom
from repux.errors import InputError
from repux.imageio import write_volume
from repux.infer import Segmenter
from repux.network import RepUXNet

onnx = pytest.importorskip("onnx", reason="onnx is not installed (test extra)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (test extra)")

TINY = dict(in_chans=1, out_chans=3, depths=(2, 1, 1, 2), feat_size=(4, 8, 12, 16), ks=9, hidden_size=24)
WINDOW = (32, 32, 32)
needs_openvino = pytest.mark.skipif(
    not backend_available("openvino"), reason="openvino is not installed (pip install 'repux[cpu-backends]')"
)


@pytest.fixture(scope="module")
def network() -> RepUXNet:
    torch.manual_seed(0)
    return RepUXNet(**TINY).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    """Two random windows and one constant window (air), which the memo computes once."""
    generator = torch.Generator().manual_seed(1)
    varying = torch.rand((2, 1, *WINDOW), generator=generator)
    return torch.cat([varying, torch.full((1, 1, *WINDOW), 0.25)])


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).abs().max() / reference.double().abs().max())


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_backend_computes_the_plain_networks_logits(network, windows, backend) -> None:
    with torch.no_grad():
        expected = network(windows)
    exported = backend_network(network, backend, WINDOW, threads=1)
    assert isinstance(exported, BackendNetwork) and exported.backend == backend
    got = exported(windows)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert relative_error(got[:2], expected[:2]) < 1e-4
    assert relative_error(got[2:], expected[2:]) < 1e-2
    # Batches of any size: the export's batch axis is dynamic.
    assert relative_error(exported(windows[:1]), expected[:1]) < 1e-4
    # The constant window came from the memo and equals a fresh computation.
    assert torch.equal(exported(windows[2:]), got[2:])


def test_export_crops_the_depthwise_kernels_to_plain_convolutions(network, tmp_path) -> None:
    path = export_onnx(network, WINDOW, 1, tmp_path / "tiny.onnx")
    graph = onnx.load(str(path)).graph
    kinds = {node.op_type for node in graph.node}
    assert "Conv" in kinds and "InstanceNormalization" in kinds
    assert not kinds & {"DFT", "STFT"}  # direct convolutions, no FFT
    depthwise = [n for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(depthwise) == sum(TINY["depths"])
    shapes = [next(a.ints for a in n.attribute if a.name == "kernel_shape") for n in depthwise]
    # The first stage (16^3 inputs) keeps 9^3; the last (2^3 inputs) can only reach 3^3 taps.
    assert list(shapes[0]) == [9, 9, 9] and list(shapes[-1]) == [3, 3, 3]


def test_int8_quantizes_the_dense_convolutions_only(network, windows, tmp_path) -> None:
    generator = torch.Generator().manual_seed(2)
    calibration = [torch.rand((1, 1, *WINDOW), generator=generator).numpy() for _ in range(4)]
    with torch.no_grad():
        expected = network(windows[:2])
    quantized = backend_network(network, "onnxruntime", WINDOW, quantize=True, calibration=calibration, threads=1)
    got = quantized(windows[:2])
    agreement = float((got.argmax(dim=1) == expected.argmax(dim=1)).double().mean())
    assert 0.9 < agreement and relative_error(got, expected) > 1e-4  # close, and not float32 in disguise


def test_backend_network_refuses_what_it_cannot_do(network) -> None:
    with pytest.raises(ValueError, match="backend 'tensorrt'"):
        backend_network(network, "tensorrt", WINDOW)
    with pytest.raises(ValueError, match="calibration"):
        backend_network(network, "onnxruntime", WINDOW, quantize=True)
    with pytest.raises(ValueError, match="precision 'bfloat16' with backend 'onnxruntime'"):
        backend_network(network, "onnxruntime", WINDOW, precision="bfloat16")


def test_backend_path_segments_like_the_torch_path(tmp_path) -> None:
    bundle = load_bundle(save_tiny_bundle(tmp_path / "tiny", spacing=(8.0, 8.0, 8.0)))
    image, _ = make_phantom(3, shape=(64, 64, 24), spacing=(4.0, 4.0, 6.0))
    expected = build_segmenter(bundle, OPTIMIZED, "cpu").predict(image, probabilities=True)
    onnxruntime_path = next(path for path in CPU_BACKEND_PATHS if path.backend == "onnxruntime" and not path.quantize)
    segmenter = build_segmenter(bundle, onnxruntime_path, "cpu")
    assert isinstance(segmenter.predictor.network, BackendNetwork)
    got = segmenter.predict(image, probabilities=True)
    assert np.abs(got.probabilities - expected.probabilities).max() < 1e-4
    assert label_dice(expected.labels.array, got.labels.array, 5) == pytest.approx([1.0] * 4, abs=1e-3)
    calibration = phantom_calibration_windows(bundle, seeds=(5,))
    patch = tuple(bundle.metadata.preprocessing["patch_size"])
    assert len(calibration) == 4 and all(w.shape == (1, 1, *patch) and w.dtype == np.float32 for w in calibration)
    assert len({float(w.std()) for w in calibration}) > 1  # different places of the phantom


@needs_openvino
def test_segmenter_on_openvino_gives_the_torch_paths_labels(tmp_path) -> None:
    bundle = load_bundle(save_tiny_bundle(tmp_path / "tiny", spacing=(8.0, 8.0, 8.0)))
    image, _ = make_phantom(3, shape=(64, 64, 24), spacing=(4.0, 4.0, 6.0))
    expected = Segmenter(bundle, device="cpu").predict(image, probabilities=True)
    segmenter = Segmenter(bundle, device="cpu", backend="openvino")
    assert isinstance(segmenter.predictor.network, BackendNetwork)
    assert segmenter.predictor.network.description == "openvino, float32"
    got = segmenter.predict(image, probabilities=True)
    assert np.abs(got.probabilities - expected.probabilities).max() < 1e-3
    # A random network's probabilities are close to ties: a few voxels' argmax may flip.
    assert min(label_dice(expected.labels.array, got.labels.array, 5)) > 0.99


def test_segmenter_refuses_a_backend_it_cannot_run(tmp_path, capsys) -> None:
    folder = save_tiny_bundle(tmp_path / "tiny", spacing=(8.0, 8.0, 8.0))
    bundle = load_bundle(folder)
    with pytest.raises(InputError, match="--backend tensorrt: expected torch or one of onnxruntime, openvino"):
        Segmenter(bundle, device="cpu", backend="tensorrt")
    with pytest.raises(InputError, match="not with --plain-network"):
        Segmenter(bundle, device="cpu", backend="openvino", optimize=False)
    image, _ = make_phantom(3, shape=(32, 32, 16), spacing=(4.0, 4.0, 6.0))
    ct = tmp_path / "ct.nii.gz"
    write_volume(image, ct)
    out = tmp_path / "labels.nii.gz"
    code = main(["segment", str(ct), "--model", str(folder), "-o", str(out), "--backend", "openvino", "--plain-network"])
    assert code == 2 and "not with --plain-network" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_a_cached_export_is_reused_and_computes_the_same(network, windows, backend, tmp_path, monkeypatch) -> None:
    import repux.accel.backends as backends

    cache = tmp_path / "export"
    first = backend_network(network, backend, WINDOW, threads=1, cache=cache)
    assert (cache / "network.onnx").is_file() and not list(cache.glob(".*tmp*"))
    if backend == "openvino":  # OpenVINO kept its compiled network there too
        assert any(path.is_file() for path in (cache / "openvino").iterdir())

    def no_export(*_args, **_kwargs):
        raise AssertionError("exported again despite the cache")

    monkeypatch.setattr(backends, "export_onnx", no_export)
    again = backend_network(network, backend, WINDOW, threads=1, cache=cache)
    assert torch.equal(again(windows), first(windows))
    with pytest.raises(ValueError, match="cache key does not cover the calibration"):
        backend_network(network, backend, WINDOW, quantize=True, calibration=[], cache=cache)


def test_export_cache_key_follows_the_weights_and_the_window(tmp_path) -> None:
    from repux.accel.backends import export_cache_key

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    key = export_cache_key(weights, WINDOW, 1)
    assert key == export_cache_key(weights, WINDOW, 1)
    assert key != export_cache_key(weights, (48, 48, 48), 1) and key != export_cache_key(weights, WINDOW, 2)
    weights.write_bytes(b"weighty")
    assert key != export_cache_key(weights, WINDOW, 1)


def test_the_export_cache_keeps_only_the_most_recently_used(tmp_path) -> None:
    from repux.accel.backends import use_export_cache

    root = tmp_path / ".exports"
    newest, newer, older, oldest, new = (c * 32 for c in "abcde")
    (root / "user-folder").mkdir(parents=True)  # not named like an export: never deleted
    for age, name in enumerate([newest, newer, older, oldest]):
        (root / name).mkdir(parents=True)
        (root / name / "network.onnx").write_bytes(b"onnx")
        when = time.time() - 3600 * (age + 1)
        os.utime(root / name, (when, when))
    folder = use_export_cache(root, oldest, keep=3)  # used again: now the most recent
    assert folder == root / oldest and (folder / "network.onnx").is_file()
    assert sorted(p.name for p in root.iterdir()) == sorted([newer, newest, oldest, "user-folder"])
    assert use_export_cache(root, new, keep=3).is_dir()
    assert sorted(p.name for p in root.iterdir()) == sorted([new, newest, oldest, "user-folder"])


@needs_openvino
def test_repux_segment_on_openvino_keeps_its_export_in_the_models_folder(tmp_path, monkeypatch) -> None:
    folder = save_tiny_bundle(tmp_path / "tiny", spacing=(8.0, 8.0, 8.0))
    image, _ = make_phantom(3, shape=(32, 32, 16), spacing=(4.0, 4.0, 6.0))
    ct = tmp_path / "ct.nii.gz"
    write_volume(image, ct)
    monkeypatch.setenv("REPUX_MODELS_DIR", str(tmp_path / "models"))
    outputs = [tmp_path / "first.nii.gz", tmp_path / "second.nii.gz"]
    assert main(["segment", str(ct), "--model", str(folder), "-o", str(outputs[0]), "--backend", "openvino"]) == 0
    (export,) = (tmp_path / "models" / ".exports").iterdir()
    made = (export / "network.onnx").stat().st_mtime_ns
    assert main(["segment", str(ct), "--model", str(folder), "-o", str(outputs[1]), "--backend", "openvino"]) == 0
    assert (export / "network.onnx").stat().st_mtime_ns == made  # read, not written again
    from repux.imageio import read_volume

    assert np.array_equal(read_volume(outputs[0]).array, read_volume(outputs[1]).array)
