"""repux.bench: agreement measures, the two segmentation paths, the worker process and ``repux bench``.

Bundles are tiny (random weights, 8 mm voxels, 32^3 windows) so that every path runs in
seconds; the paper-width timing itself lives in benchmarks/segment_speed.py.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from infer_support import save_tiny_bundle
from repux.accel import OptimizedNetwork, native_bfloat16
from repux.bench import agreement
from repux.bench.agreement import AGREEMENT_BAR, label_dice, max_probability_difference
from repux.bench.paths import (
    BFLOAT16,
    DEFAULT,
    DEFAULT_BFLOAT16,
    FEWER_WINDOWS,
    OPTIMIZED,
    REFERENCE,
    SegmentationPath,
    build_segmenter,
)
from repux.bench.report import render_markdown
from repux.bench.suite import QUICK, run_benchmark, summarize, summary_line
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
    assert reference.preprocessing.body_threshold == reference.preprocessing.a_min
    assert reference.preprocessing.body_margin_mm == 0
    assert (reference.window.overlap, reference.window.sw_batch_size, reference.window.blend) == (0.5, 4, "constant")
    optimized = build_segmenter(bundle, OPTIMIZED, "cpu")
    assert isinstance(optimized.predictor.network, OptimizedNetwork)
    assert optimized.window.overlap == 0.5 and optimized.preprocessing == reference.preprocessing
    fewer = build_segmenter(bundle, FEWER_WINDOWS, "cpu")
    assert fewer.preprocessing.body_threshold > -1000 and fewer.window.overlap == 0.25
    default = build_segmenter(bundle, DEFAULT, "cpu")
    assert default.preprocessing.body_threshold > -1000 and default.window.overlap == bundle.metadata.inference["overlap"]
    # A tiny network's windows fit the memory budget: the bundle's 2 per pass are kept.
    assert optimized.window.sw_batch_size == fewer.window.sw_batch_size == 2
    assert SegmentationPath.from_json(OPTIMIZED.to_json()) == OPTIMIZED
    assert "body crop" in FEWER_WINDOWS.describe() and "published foreground crop" in OPTIMIZED.describe()
    assert "the bundle's overlap" in DEFAULT.describe()
    with pytest.raises(ValueError, match="crop 'none'"):
        SegmentationPath("x", optimized=True, crop="none", overlap=0.5, sw_batch_size=1)


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
    # The quick settings, shrunk: a small CT, the small preset timed on a one-window region.
    settings = replace(
        QUICK,
        device="cpu",
        ct_shape=(48, 48, 16),
        ct_spacing=(6.0, 6.0, 9.0),
        models=(str(tiny_bundle),),
        timing_preset="small",
        timing_region=((8, 24), (8, 24), (4, 12)),
    )
    results = run_benchmark(settings, tmp_path, command="test")
    (timed,) = results["timing"]
    assert timed["kernels"] == "dense" and timed["patch"] is None
    # The bfloat16 paths are added where the CPU computes bfloat16 natively (AVX-512 BF16, AMX).
    extra = [BFLOAT16.name, DEFAULT_BFLOAT16.name] if native_bfloat16("cpu") else []
    assert [run["path"]["name"] for run in timed["runs"]] == [REFERENCE.name, OPTIMIZED.name, DEFAULT.name, *extra]
    assert timed["runs"][0]["windows"] == timed["runs"][1]["windows"] >= 1
    (entry,) = results["agreement"]
    reference, optimized, default, all_windows, fewer = entry["runs"][:5]
    assert [run["path"]["name"] for run in entry["runs"][5:]] == extra
    assert reference["windows"] == optimized["windows"] >= 1 and fewer["windows"] <= all_windows["windows"]
    # Each trained-bundle path runs twice: keeping its probabilities for the comparison, then
    # timed keeping only its labels (as repux segment does); random-weight timing runs once.
    assert all(run["with_probabilities"]["end_to_end_s"] > 0 for run in entry["runs"])
    assert not any("with_probabilities" in run for run in timed["runs"])
    # Organ-guided windows run at most the full grid, which the same crop with all windows runs.
    assert default["windows"] <= default["windows_total"] == all_windows["windows"] == all_windows["windows_total"]
    assert reference["dice"] == [1.0] * 4 and reference["speedup"] == 1.0
    assert min(optimized["dice"]) > 0.99  # the same windows: the same labels
    assert all(0.0 <= d <= 1.0 for d in fewer["dice"] + default["dice"])
    # The headline: the fastest timed path whose labels agree on the trained bundle, with its
    # speed-up at the timed width.
    reference_s = timed["runs"][0]["end_to_end_s"]
    speedups = {run["path"]["name"]: reference_s / run["end_to_end_s"] for run in timed["runs"][1:]}
    lowest_dice = {run["path"]["name"]: min(run["dice"]) for run in entry["runs"]}
    agreeing = [name for name in speedups if lowest_dice[name] >= AGREEMENT_BAR]
    assert OPTIMIZED.name in agreeing
    summary = results["summary"]
    assert summary["qualified"] and summary["path"] == max(agreeing, key=speedups.__getitem__)
    assert summary["agreement"] == lowest_dice[summary["path"]]
    assert summary["speedup"] == pytest.approx(speedups[summary["path"]])
    line = summary_line(results)
    assert line == f"speedup {summary['speedup']:.2f} agreement {summary['agreement']:.4f}"
    markdown = render_markdown(results)
    assert markdown.rstrip().endswith("```") and line in markdown
    assert "the region i 8:24, j 8:24, k 4:12 of the CT" in markdown
    assert "no GPU figures" in markdown or torch.cuda.is_available()
    json.dumps(results)  # the raw results are JSON-able


def test_summary_falls_back_to_the_exact_path_when_nothing_agrees() -> None:
    def runs(*speedups: float, dice: float | None = None) -> list[dict]:
        names = [REFERENCE.name, OPTIMIZED.name, FEWER_WINDOWS.name]
        return [
            {"path": {"name": name}, "speedup": speedup, **({"dice": [dice or 1.0, dice or 1.0]} if dice else {})}
            for name, speedup in zip(names, speedups)
        ]

    settings = {"paths": [{"name": n} for n in (REFERENCE.name, OPTIMIZED.name, FEWER_WINDOWS.name)]}
    agreement = runs(1.0, 1.2, 3.0, dice=0.9)
    agreement[1]["dice"] = [0.999, 0.9999]
    results = {"settings": settings, "timing": [{"runs": runs(1.0, 1.5, 4.0)}], "agreement": [{"model": "tiny", "runs": agreement}]}
    summary = summarize(results)
    # The faster path disagrees (0.9): the exact one is chosen, with its timed speed-up.
    assert (summary["path"], summary["speedup"], summary["agreement"]) == (OPTIMIZED.name, 1.5, 0.999)
    agreement[1]["dice"] = [0.99, 0.99]
    summary = summarize(results)
    assert not summary["qualified"] and summary["path"] == OPTIMIZED.name and summary["agreement"] == 0.99
    agreement[2]["dice"] = [0.996, 1.0]
    assert summarize(results)["path"] == FEWER_WINDOWS.name
    # A path measured only on the trained bundle (organ-guided windows) competes with its speed-up there.
    settings["paths"].append({"name": DEFAULT.name})
    agreement.append({"path": {"name": DEFAULT.name}, "speedup": 5.0, "dice": [0.999, 1.0]})
    summary = summarize(results)
    assert (summary["path"], summary["speedup"]) == (DEFAULT.name, 5.0)
    assert summary["speedup_measured_on"] == {OPTIMIZED.name: "timing", FEWER_WINDOWS.name: "timing", DEFAULT.name: "tiny"}


# ---------------------------------------------------------------- command line


def test_bench_cli_refuses_bad_arguments_before_any_work(tmp_path, capsys) -> None:
    assert main(["bench", "--quick", "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    existing = tmp_path / "RESULTS.md"
    existing.write_text("keep me")
    assert main(["bench", "--quick", "--output", str(existing)]) == 2
    assert "use --force" in capsys.readouterr().err and existing.read_text() == "keep me"
    assert main(["bench", "--patch-reps", "-1"]) == 2
    assert "--patch-reps -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--timing-region", "0:9,9:3,0:4"])
    assert "start < stop" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--agreement-region", "0:9"])
    assert "I0:I1,J0:J1,K0:K1" in capsys.readouterr().err


def test_repux_asks_for_large_pages_unless_told_otherwise(monkeypatch, capsys) -> None:
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert main(["bench", "--patch-reps", "-1"]) == 2
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert main(["bench", "--patch-reps", "-1"]) == 2
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    # Workers state their pages explicitly: the reference's cannot inherit repux's choice.
    assert REFERENCE.environment() == {"THP_MEM_ALLOC_ENABLE": "0"}
    assert OPTIMIZED.environment() == DEFAULT.environment() == {"THP_MEM_ALLOC_ENABLE": "1"}
