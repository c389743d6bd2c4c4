"""Organ-guided windows: the grown organs get exactly the full grid's values, no organ falls
back to the full grid, and the windows run are the ones the design says."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from repux.bundle import load_bundle
from repux.imageio import Volume
from repux.infer import Segmenter
from repux.infer.guided import GuidedRun, covering_windows, growth_voxels, guided_probabilities
from repux.infer.predict import ExecutionPlan, SlidingWindowConfig, WindowPredictor, predict_probabilities, window_grid
from repux.infer.preprocess import PreprocessingConfig, preprocess
from repux.progress import Progress
from infer_support import AIR, ORGAN_HU, IntensityClassifier, analytic_volume, save_tiny_bundle

CPU = torch.device("cpu")
SPACING = (8.0, 8.0, 8.0)


class BlurredClassifier(nn.Module):
    """:class:`IntensityClassifier` of the input averaged over 3^3 voxels (zero padding at the
    window's edge): a network whose output near a window's edge depends on where the window is."""

    def __init__(self) -> None:
        super().__init__()
        self.blur = nn.Conv3d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.blur.weight, 1.0 / 27)
        self.classify = IntensityClassifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.blur(x))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Tiny bundle: 8 mm voxels, 16^3 windows at overlap 0.5, 2 windows per pass."""
    folder = tmp_path_factory.mktemp("guided") / "tiny"
    return load_bundle(save_tiny_bundle(folder, spacing=SPACING, patch=(16, 16, 16), overlap=0.5))


def _tall_phantom(organs: tuple[int, ...] = (1, 2, 3, 4)) -> Volume:
    """The analytic phantom in a 400 mm tall field of view: the organs fill its middle only."""
    image, _ = analytic_volume((22, 17, 50), SPACING, np.diag([-1.0, -1.0, 1.0]), organs=organs)
    return image


def _network_input(bundle, volume: Volume) -> torch.Tensor:
    return preprocess(volume, PreprocessingConfig.from_metadata(bundle.metadata.preprocessing)).image


def _config(bundle, per_pass: int = 2) -> SlidingWindowConfig:
    metadata = bundle.metadata
    config = SlidingWindowConfig.from_metadata(metadata.preprocessing, metadata.inference)
    return SlidingWindowConfig(config.patch_size, config.overlap, per_pass, config.blend)


def _guided(image, network, config, everywhere=False, growth=None) -> tuple[torch.Tensor, GuidedRun]:
    plan = ExecutionPlan(CPU, CPU, config.sw_batch_size)
    growth = growth_voxels(config, SPACING) if growth is None else growth
    probabilities, _, run = guided_probabilities(image, WindowPredictor(network, CPU), config, plan, growth, everywhere=everywhere)
    return probabilities, run


def test_grown_organs_equal_the_full_grid_bit_for_bit(bundle):
    image = _network_input(bundle, _tall_phantom())
    config = _config(bundle)
    network = BlurredClassifier()
    guided, run = _guided(image, network, config)
    full, full_run = _guided(image, network, config, everywhere=True)
    assert full_run.windows_run == full_run.windows_total == len(window_grid(tuple(image.shape[2:]), config))
    assert run.organs_found and run.windows_run < run.windows_total
    # Every voxel within the growth of an organ (of the full grid's labels) is exact.
    organs = (full.argmax(dim=0) > 0).numpy()
    growth = growth_voxels(config, SPACING)
    grown = torch.nn.functional.max_pool3d(
        torch.from_numpy(organs)[None, None].float(), [2 * g + 1 for g in growth], stride=1, padding=list(growth)
    )[0, 0].bool()
    assert bool(run.exact[grown].all()) and not bool(run.exact.all())
    exact = run.exact
    assert torch.equal(guided[:, exact], full[:, exact])
    # Outside, the windows that ran decide: here still background, so the labels agree everywhere.
    assert torch.equal(guided.argmax(dim=0), full.argmax(dim=0))
    # The full schedule blends like MONAI's sliding window (float rounding of another summation order).
    monai, _ = predict_probabilities(image, WindowPredictor(network, CPU), config, ExecutionPlan(CPU, CPU, 2))
    torch.testing.assert_close(full, monai, rtol=0, atol=1e-5)


def test_no_organ_found_runs_the_full_grid(bundle):
    image = _network_input(bundle, _tall_phantom(organs=()))
    config = _config(bundle)
    guided, run = _guided(image, BlurredClassifier(), config)
    full, _ = _guided(image, BlurredClassifier(), config, everywhere=True)
    assert not run.organs_found
    assert run.windows_run == run.windows_total and bool(run.exact.all())
    assert torch.equal(guided, full)
    assert not bool((guided.argmax(dim=0) > 0).any())


@pytest.mark.parametrize("per_pass, expected", [(1, 5), (2, 6)])
def test_windows_run_are_the_covering_ones_and_those_near_the_organ(per_pass, expected):
    # Along x, 16^3 windows at overlap 0.5 start at 0, 8, ..., 48 (7 windows); pass 1 keeps
    # 0, 16, 32, 48. One organ voxel block at x 2..3, grown by 8 + 3 voxels, reaches the
    # windows starting at 0 and 8 only: pass 2 adds window 1, in a block of its own (1 per
    # pass: 5 windows) or with window 3 (2 per pass: 6).
    image = torch.zeros((1, 1, 64, 16, 16))
    image[..., 2:4, 6:9, 6:9] = (ORGAN_HU[2] + 125.0) / 400.0
    config = SlidingWindowConfig((16, 16, 16), 0.5, per_pass)
    assert [w[0].start for w in window_grid((64, 16, 16), config)] == [0, 8, 16, 24, 32, 40, 48]
    probabilities, run = _guided(image, IntensityClassifier(), config, growth=(11, 11, 11))
    assert (run.windows_run, run.windows_total) == (expected, 7)
    assert bool((probabilities.argmax(dim=0)[2:4, 6:9, 6:9] == 2).all())
    assert int((probabilities.argmax(dim=0) > 0).sum()) == 2 * 3 * 3


def test_covering_windows_cover_every_axis_at_any_overlap():
    for overlap in (0.25, 0.5, 0.75):
        config = SlidingWindowConfig((16, 16, 16), overlap, 1)
        grid = window_grid((70, 40, 16), config)
        kept = covering_windows(grid)
        covered = np.zeros((70, 40, 16), dtype=bool)
        for index in kept:
            covered[grid[index]] = True
        assert covered.all(), overlap
        if overlap == 0.5:
            starts = sorted({w[0].start for w in grid})
            assert sorted({grid[i][0].start for i in kept}) == starts[::2] + ([starts[-1]] if len(starts) % 2 == 0 else [])


def test_segment_default_reports_guided_windows_and_agrees_with_all_windows(bundle):
    volume = _tall_phantom()
    stream = io.StringIO()
    network = BlurredClassifier()
    guided = Segmenter(bundle, device="cpu", network=network, progress=Progress("jsonl", stream)).predict(volume)
    every = Segmenter(bundle, device="cpu", network=network, windows="all").predict(volume)
    assert guided.guided is not None and every.guided is None
    assert guided.windows < guided.windows_total == every.windows == every.windows_total
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    message = [r for r in records if "organ-guided windows" in r.get("message", "")]
    assert message and message[0]["windows"] == guided.windows and message[0]["windows_total"] == guided.windows_total
    infer = [r for r in records if r.get("stage") == "infer" and "done" in r]
    assert infer[-1]["done"] == infer[-1]["total"] == guided.windows
    np.testing.assert_array_equal(guided.labels.array, every.labels.array)
    assert (guided.labels.array > 0).any() and AIR < 0


def test_segment_command_windows_option(tmp_path, capsys):
    from repux.cli import main
    from repux.cli.segment import configure
    from repux.imageio import write_volume

    # The bundle's own tiny RepUX-Net needs 32^3 windows (its encoder halves 5 times).
    bundle = save_tiny_bundle(tmp_path / "tiny32", spacing=SPACING, patch=(32, 32, 32), overlap=0.5)
    ct = write_volume(_tall_phantom(), tmp_path / "ct.nii.gz")
    base = ["segment", str(ct), "--model", str(bundle), "--device", "cpu", "--progress", "jsonl"]
    for mode, guided in (("organs", True), ("all", False)):
        assert main([*base, "-o", str(tmp_path / f"{mode}.nii.gz"), "--windows", mode]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert any("organ-guided windows" in r.get("message", "") for r in records) == guided
    parser = argparse.ArgumentParser()
    configure(parser)
    assert parser.parse_args([str(ct), "-o", "x.nii.gz"]).windows == "organs"  # the default
    with pytest.raises(SystemExit):
        main([*base, "-o", str(tmp_path / "bad.nii.gz"), "--windows", "some"])
