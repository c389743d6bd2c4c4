"""``repux demo`` with a test bundle (the shipped demo model is tested by the lead), and its overlay picture."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import slicerio
from PIL import Image

from repux.bundle import label_preset
from repux.cli import main
from repux.cli.demo import DEFAULT_OUTPUT, DEFAULT_SEED, FILES
from repux.data.phantoms import make_phantom
from repux.imageio import Volume, read_volume
from repux.infer.overlay import PANEL_HEIGHT, render_overlay
from infer_support import save_tiny_bundle

SEED = 5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return save_tiny_bundle(tmp_path_factory.mktemp("model") / "tiny", spacing=(8.0, 8.0, 8.0))


def test_demo_writes_its_files_and_prints_dice(bundle, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--model", str(bundle), "--seed", str(SEED), "--progress", "none"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES.values())

    ct, truth, labels = (read_volume(out / FILES[key]) for key in ("ct", "truth", "labels"))
    assert truth.same_geometry(ct) and labels.same_geometry(ct)
    np.testing.assert_array_equal(truth.array, make_phantom(SEED)[1].array)

    # Every organ's printed Dice, recomputed here from the written files.
    assert re.fullmatch(r"mean Dice: \d\.\d{3}", lines[-1])
    printed = {}
    for line in lines:
        match = re.fullmatch(r"\s+(\w+)\s+Dice (\d\.\d{3})", line)
        if match:
            printed[match.group(1)] = float(match.group(2))
    assert list(printed) == ["spleen", "kidney", "liver", "pancreas"]
    for value, name in enumerate(printed, start=1):
        p, t = labels.array == value, truth.array == value
        assert printed[name] == pytest.approx(2 * np.sum(p & t) / (np.sum(p) + np.sum(t)), abs=5e-4)
    assert float(lines[-1].split()[-1]) == pytest.approx(np.mean(list(printed.values())), abs=1e-3)

    segmentation = slicerio.read_segmentation(str(out / FILES["segmentation"]))
    assert [s["name"] for s in segmentation["segments"]] == ["spleen", "kidney", "liver", "pancreas"]
    np.testing.assert_array_equal(segmentation["voxels"], labels.array)
    with Image.open(out / FILES["overlay"]) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB" and picture.height > PANEL_HEIGHT


def test_demo_refuses_to_overwrite_without_force(bundle, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / FILES["overlay"]).write_bytes(b"keep me")
    assert main(["demo", "-o", str(out), "--model", str(bundle), "--progress", "none"]) == 2
    assert "overlay.png" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["overlay.png"]
    assert (out / FILES["overlay"]).read_bytes() == b"keep me"


def test_demo_defaults():
    from repux.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.output, args.seed, args.model) == (DEFAULT_OUTPUT, DEFAULT_SEED, "demo")
    assert DEFAULT_SEED == 1000  # the seed the README documents


def _coloured(panel: np.ndarray) -> np.ndarray:
    """Pixels that are not grey: where a label is drawn."""
    return (panel[..., 0] != panel[..., 1]) | (panel[..., 1] != panel[..., 2])


def test_overlay_shows_slicer_orientations(tmp_path):
    # A cube stored in LPS order (not RAS). The label fills the octant towards patient
    # right, anterior and superior (negative i, j and positive k in LPS) up to the centre.
    n, spacing = 41, 2.0
    ct = np.full((n, n, n), 40, np.int16)
    labels = np.zeros((n, n, n), np.uint8)
    c = n // 2
    labels[: c + 3, : c + 3, c - 2 :] = 1
    volume = Volume(ct, (spacing,) * 3, (0.0, 0.0, 0.0), np.eye(3))
    centre_ras = volume.affine @ np.array([c, c, c, 1.0])
    path = render_overlay(volume, volume.with_array(labels), label_preset("flare"), tmp_path / "o.png", centre_ras[:3])
    picture = np.asarray(Image.open(path).convert("RGB"))
    # Three square panels of PANEL_HEIGHT, 10 px apart, below a 14 px caption row.
    for index, view in enumerate(("axial", "coronal", "sagittal")):
        left = 10 + index * (PANEL_HEIGHT + 10)
        panel = picture[14 : 14 + PANEL_HEIGHT, left : left + PANEL_HEIGHT]
        rows, columns = np.nonzero(_coloured(panel))
        assert rows.size > 0, view
        # Right (axial, coronal) or anterior (sagittal) on the left; anterior or superior on top.
        assert rows.mean() < PANEL_HEIGHT / 2 and columns.mean() < PANEL_HEIGHT / 2, view
        assert not _coloured(panel[-20:, -20:]).any(), view
