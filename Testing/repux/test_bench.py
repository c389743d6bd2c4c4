"""repux.bench: agreement measures, the two segmentation paths, the worker process and ``repux bench``.

Bundles are tiny (random weights, 8 mm voxels, 32^3 windows) so that every path runs in
seconds; the paper-width timing itself lives in benchmarks/segment_speed.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from infer_support import save_tiny_bundle
from repux.accel import OptimizedNetwork
from repux.bench import agreement
from repux.bench.agreement import label_dice, max_probability_difference
from repux.bench.paths import (
    ACTIVATION_BUDGET,
    FEATURE_MAPS_PER_WINDOW,
    FEWER_WINDOWS,
    OPTIMIZED,
    REFERENCE,
    SegmentationPath,
    build_segmenter,
    windows_per_pass,
)
from repux.bench.report import render_markdown
from repux.bench.suite import QUICK, run_benchmark, summary_line
from repux.bench.worker import WorkerError, run_task
from repux.bundle import load_bundle
from repux.cli import main
from repux.data.phantoms import make_phantom
from repux.imageio import write_volume


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return save_tiny_bundle(tmp_path_factory.mktemp("bench") / "tiny", spacing=(8.0, 8.0, 8.0))


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    """A phantom CT of 64 x 64 x 24 voxels (4 x 4 x 6 mm) and its NIfTI file."""
    image, _ = make_phantom(3, shape=(64, 64, 24), spacing=(4.0, 4.0, 6.0))
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    write_volume(image, path)
    return image, path


# ---------------------------------------------------------------- agreement


def test_label_dice_counts_each_label_and_empty_labels_agree() -> None:
    reference = np.array([0, 1, 1, 1, 2, 2, 0, 0])
    other = np.array([0, 1, 1, 0, 2, 1, 0, 0])
    # label 1: reference has 3 voxels, other 3, 2 shared -> 4/6; label 2: 2 vs 1, 1 shared -> 2/3;
    # label 3: absent from both.
    assert label_dice(reference.reshape(2, 4), other.reshape(2, 4), labels=4) == pytest.approx([4 / 6, 2 / 3, 1.0])
    assert label_dice(reference, reference, labels=3) == [1.0, 1.0]
    with pytest.raises(ValueError, match="same shape"):
        label_dice(reference, other[:4], labels=3)


def test_max_probability_difference_reads_files_in_chunks(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(agreement, "CHUNK_VOXELS", 7)
    a = np.random.default_rng(0).random((3, 5, 4)).astype(np.float32)
    b = a.copy()
    b[2, 4, 3] += 0.25  # in the last chunk
    b[0, 1, 1] -= 0.125
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    assert max_probability_difference(tmp_path / "a.npy", tmp_path / "b.npy") == pytest.approx(0.25, abs=1e-6)
    b[1, 0, 0] = np.nan
    np.save(tmp_path / "b.npy", b)
    assert math.isnan(max_probability_difference(tmp_path / "a.npy", tmp_path / "b.npy"))
    np.save(tmp_path / "c.npy", a[:2])
    with pytest.raises(ValueError, match="same shape"):
        max_probability_difference(tmp_path / "a.npy", tmp_path / "c.npy")


# ---------------------------------------------------------------- paths


def test_paths_configure_the_segmenter(tiny_bundle) -> None:
    bundle = load_bundle(tiny_bundle)
    reference = build_segmenter(bundle, REFERENCE, "cpu")
    assert not isinstance(reference.predictor.network, OptimizedNetwork)
    assert reference.preprocessing.body_threshold == -math.inf
    assert (reference.window.overlap, reference.window.sw_batch_size, reference.window.blend) == (0.5, 4, "constant")
    optimized = build_segmenter(bundle, OPTIMIZED, "cpu")
    assert isinstance(optimized.predictor.network, OptimizedNetwork)
    assert optimized.window.overlap == 0.5 and optimized.preprocessing.body_threshold == -math.inf
    fewer = build_segmenter(bundle, FEWER_WINDOWS, "cpu")
    assert fewer.preprocessing.body_threshold > -1000 and fewer.window.overlap == 0.25
    # A tiny network's windows fit the memory budget: the bundle's 2 per pass are kept.
    assert optimized.window.sw_batch_size == fewer.window.sw_batch_size == 2
    assert SegmentationPath.from_json(OPTIMIZED.to_json()) == OPTIMIZED
    assert "crop to body" in FEWER_WINDOWS.describe() and "no crop" in OPTIMIZED.describe()


def test_windows_per_pass_fit_the_activation_budget() -> None:
    # The paper's width (48) at 96^3: one window per pass; 8 channels: the 4 asked for.
    assert windows_per_pass(48, (96, 96, 96), 4) == 1
    assert windows_per_pass(8, (96, 96, 96), 4) == 4
    assert windows_per_pass(512, (160, 160, 160), 4) == 1
    per_window = FEATURE_MAPS_PER_WINDOW * 16 * 96**3 * 4
    assert windows_per_pass(16, (96, 96, 96), 8) == int(ACTIVATION_BUDGET // per_window)


def test_optimized_path_gives_the_reference_labels(tiny_bundle, small_ct) -> None:
    image, _ = small_ct
    bundle = load_bundle(tiny_bundle)
    expected = build_segmenter(bundle, REFERENCE, "cpu").predict(image, probabilities=True)
    got = build_segmenter(bundle, OPTIMIZED, "cpu").predict(image, probabilities=True)
    assert np.abs(got.probabilities - expected.probabilities).max() < 1e-4
    assert label_dice(expected.labels.array, got.labels.array, 5) == pytest.approx([1.0] * 4, abs=1e-3)


# ---------------------------------------------------------------- worker and suite


def test_worker_segments_in_its_own_process(tiny_bundle, small_ct, tmp_path) -> None:
    image, path = small_ct
    task = {
        "kind": "segment",
        "bundle": str(tiny_bundle),
        "image": str(path),
        "path": FEWER_WINDOWS.to_json(),
        "device": "cpu",
        "labels_out": str(tmp_path / "labels.npy"),
        "probabilities_out": None,
    }
    result = run_task(task)
    assert result["windows"] >= 1 and result["segment_s"] > 0 and result["cpu_s"] > 0
    assert result["peak_rss_bytes"] > 50 * 2**20 and result["cuda_peak_bytes"] is None
    in_process = build_segmenter(load_bundle(tiny_bundle), FEWER_WINDOWS, "cpu").segment(image)
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), in_process.array)
    with pytest.raises(WorkerError, match="unknown benchmark task kind"):
        run_task({"kind": "nonsense"})


def test_quick_suite_reports_speed_and_agreement(tiny_bundle, tmp_path) -> None:
    settings = replace(
        QUICK, device="cpu", ct_shape=(48, 48, 16), ct_spacing=(6.0, 6.0, 9.0), models=(str(tiny_bundle),)
    )
    results = run_benchmark(settings, tmp_path, command="test")
    (entry,) = results["agreement"]
    reference, optimized, fewer = entry["runs"]
    assert reference["windows"] == optimized["windows"] >= fewer["windows"] >= 1
    assert reference["dice"] == [1.0] * 4 and reference["speedup"] == 1.0
    assert min(optimized["dice"]) > 0.99  # the same windows: the same labels
    assert all(0.0 <= d <= 1.0 for d in fewer["dice"])
    summary = results["summary"]
    chosen = [run for run in entry["runs"][1:] if run["path"]["name"] == summary["path"]][0]
    assert summary["agreement"] == min(chosen["dice"]) >= 0.995
    assert summary["speedup"] == pytest.approx(reference["end_to_end_s"] / chosen["end_to_end_s"])
    line = summary_line(results)
    assert line.startswith("speedup ") and " agreement " in line
    markdown = render_markdown(results)
    assert markdown.rstrip().endswith("```") and line in markdown
    assert "no GPU figures" in markdown or torch.cuda.is_available()
    json.dumps(results)  # the raw results are JSON-able


# ---------------------------------------------------------------- command line


def test_bench_cli_refuses_bad_arguments_before_any_work(tmp_path, capsys) -> None:
    assert main(["bench", "--quick", "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    existing = tmp_path / "RESULTS.md"
    existing.write_text("keep me")
    assert main(["bench", "--quick", "--output", str(existing)]) == 2
    assert "use --force" in capsys.readouterr().err and existing.read_text() == "keep me"
    assert main(["bench", "--patch-reps", "0"]) == 2
    assert "--patch-reps 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--timing-slices", "9:3"])
    assert "K0 < K1" in capsys.readouterr().err
