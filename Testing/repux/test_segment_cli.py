"""``repux segment``: formats and geometry of the outputs, Slicer segmentations, batches, bad input, cancelling."""

from __future__ import annotations

import csv
import gzip
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from repux.cli import main
from repux.data.phantoms import make_phantom
from repux.imageio import Volume, read_volume, write_volume
from infer_support import save_tiny_bundle, write_dicom_series

# Facts from Slicer's General Anatomy terminology (spec/TERMINOLOGY.md), written out here.
FLARE_SEGMENTS = {
    1: ("spleen", "78961009", "Spleen", (157, 108, 162)),
    2: ("kidney", "64033007", "Kidney", (185, 102, 83)),
    3: ("liver", "10200004", "Liver", (221, 130, 101)),
    4: ("pancreas", "15776009", "Pancreas", (249, 180, 111)),
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """Tiny bundle at 8 mm: the small phantoms below fit one 32^3 window."""
    return save_tiny_bundle(tmp_path_factory.mktemp("model") / "tiny", spacing=(8.0, 8.0, 8.0))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """An oblique phantom CT (6 x 6 x 8 mm voxels, odd shape) as NIfTI."""
    image, _ = make_phantom(7, shape=(41, 37, 23), spacing=(6.0, 6.0, 8.0))
    path = tmp_path_factory.mktemp("input") / "case7.nii.gz"
    write_volume(image, path)
    return path


def segment(*argv: str) -> int:
    return main(["segment", *map(str, argv)])


def leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted write would leave (atomic writes use hidden '.*.tmp-*' names)."""
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha", ".seg.nrrd"])
def test_label_map_has_the_input_geometry_in_every_format(bundle, phantom, tmp_path, ending):
    output = tmp_path / f"labels{ending}"
    assert segment(phantom, "-o", output, "--model", bundle, "--progress", "none") == 0
    image = read_volume(phantom)
    if ending == ".seg.nrrd":
        segmentation = slicerio.read_segmentation(str(output))
        voxels = segmentation["voxels"]
        np.testing.assert_allclose(segmentation["ijkToLPS"], image.affine_lps, atol=1e-4)
        assert voxels.shape == image.shape
    else:
        labels = read_volume(output)
        assert labels.same_geometry(image)
        assert labels.array.dtype == np.uint8
        voxels = labels.array
    assert set(np.unique(voxels)) <= {0, 1, 2, 3, 4}
    assert leftovers(tmp_path) == []


def test_slicer_segmentation_has_names_colours_and_terminology(bundle, phantom, tmp_path):
    seg_path, nii_path = tmp_path / "labels.seg.nrrd", tmp_path / "labels.nii.gz"
    assert segment(phantom, "-o", seg_path, "--model", bundle, "--progress", "none") == 0
    segmentation = slicerio.read_segmentation(str(seg_path))
    segments = {s["labelValue"]: s for s in segmentation["segments"]}
    assert sorted(segments) == [1, 2, 3, 4]  # every organ of the model, found or not
    for value, (name, code, meaning, colour) in FLARE_SEGMENTS.items():
        segment_info = segments[value]
        assert segment_info["name"] == name
        np.testing.assert_allclose(np.array(segment_info["color"]) * 255, colour, atol=0.01)
        terminology = segment_info["terminology"]
        assert terminology["contextName"] == "Segmentation category and type - 3D Slicer General Anatomy list"
        assert terminology["category"] == ["SCT", "123037004", "Anatomical Structure"]
        assert terminology["type"] == ["SCT", code, meaning]
    # Voxels: the same labels as the plain label map of the same run.
    assert segment(phantom, "-o", nii_path, "--model", bundle, "--progress", "none") == 0
    labels = read_volume(nii_path).array
    for value in FLARE_SEGMENTS:
        np.testing.assert_array_equal(slicerio.segment_mask(segmentation, segments[value]), labels == value)


def test_progress_jsonl_reports_every_stage(bundle, phantom, tmp_path, capsys):
    assert segment(phantom, "-o", tmp_path / "l.nii.gz", "--model", bundle, "--progress", "jsonl") == 0
    records = read_jsonl(capsys.readouterr().out)
    stages = [r["stage"] for r in records if r.get("done") == 0]
    assert stages == ["read", "preprocess", "infer", "export", "write"]
    infer = [r for r in records if r["stage"] == "infer"]
    assert infer[-1]["done"] == infer[-1]["total"] >= 1
    assert records[-1] == {"stage": "done", "outputs": [str(tmp_path / "l.nii.gz")], "skipped": []}


def test_existing_output_is_kept_without_force(bundle, phantom, tmp_path, capsys):
    output = tmp_path / "labels.nii.gz"
    output.write_bytes(b"the user's own file")
    assert segment(phantom, "-o", output, "--model", bundle, "--progress", "none") == 2
    assert "already exists" in capsys.readouterr().err
    assert output.read_bytes() == b"the user's own file"
    assert segment(phantom, "-o", output, "--model", bundle, "--progress", "none", "--force") == 0
    assert read_volume(output).same_geometry(read_volume(phantom))


def test_probabilities_file_is_4d_on_the_input_grid(bundle, phantom, tmp_path):
    labels_path, probabilities_path = tmp_path / "labels.nii.gz", tmp_path / "probabilities.nii.gz"
    options = ["--model", bundle, "--probabilities", probabilities_path, "--progress", "none"]
    assert segment(phantom, "-o", labels_path, *options) == 0
    image = read_volume(phantom)
    stored = sitk.ReadImage(str(probabilities_path))
    assert stored.GetDimension() == 4
    assert stored.GetSize() == (*image.shape, 5)
    np.testing.assert_allclose(stored.GetSpacing()[:3], image.spacing, atol=1e-5)
    np.testing.assert_allclose(stored.GetOrigin()[:3], image.origin, atol=1e-4)
    np.testing.assert_allclose(np.array(stored.GetDirection()).reshape(4, 4)[:3, :3], image.direction, atol=1e-5)
    probabilities = sitk.GetArrayFromImage(stored).transpose(0, 3, 2, 1)  # (C, I, J, K)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probabilities.argmax(axis=0), read_volume(labels_path).array)


def _case_folder(folder: Path) -> Path:
    folder.mkdir()
    for seed in (11, 12):
        image, _ = make_phantom(seed, shape=(33, 29, 21), spacing=(7.0, 7.0, 9.0))
        write_volume(image, folder / f"case{seed}.nrrd")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_of_cases_skips_cases_already_done(bundle, tmp_path, capsys):
    inputs, outputs = _case_folder(tmp_path / "cases"), tmp_path / "labels"
    assert segment(inputs, "-o", outputs, "--model", bundle, "--progress", "jsonl", "--format", ".seg.nrrd") == 0
    assert sorted(p.name for p in outputs.iterdir()) == ["case11.seg.nrrd", "case12.seg.nrrd"]
    capsys.readouterr()
    first_done = (outputs / "case11.seg.nrrd").stat().st_mtime_ns
    (outputs / "case12.seg.nrrd").unlink()
    table = tmp_path / "volumes.csv"
    options = ["--model", bundle, "--progress", "jsonl", "--format", ".seg.nrrd", "--volumes", table]
    assert segment(inputs, "-o", outputs, *options) == 0
    records = read_jsonl(capsys.readouterr().out)
    assert records[-1]["skipped"] == ["case11"]
    assert records[-1]["outputs"] == [str(outputs / "case12.seg.nrrd")]
    assert any(r.get("skipped") is True and r.get("case") == "case11" for r in records)
    assert (outputs / "case11.seg.nrrd").stat().st_mtime_ns == first_done
    # The table covers both cases, the skipped one from its existing file.
    with open(table, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["case"], r["name"]) for r in rows] == [
        (case, name) for case in ("case11", "case12") for name in ("spleen", "kidney", "liver", "pancreas")
    ]
    for row in rows:
        labels = read_volume(outputs / f"{row['case']}.seg.nrrd")
        voxels = int(np.count_nonzero(labels.array == int(row["label"])))
        assert int(row["voxels"]) == voxels
        assert float(row["volume_ml"]) == pytest.approx(voxels * np.prod(labels.spacing) / 1000.0, rel=1e-4)


def test_volume_table_as_json(bundle, phantom, tmp_path):
    table = tmp_path / "volumes.json"
    assert segment(phantom, "-o", tmp_path / "l.nrrd", "--model", bundle, "--volumes", table, "--progress", "none") == 0
    rows = json.loads(table.read_text())
    labels = read_volume(tmp_path / "l.nrrd")
    assert [r["label"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["case"] == "case7"
        assert row["voxels"] == int(np.count_nonzero(labels.array == row["label"]))


def test_dicom_series_folder_input(bundle, tmp_path):
    image, _ = make_phantom(21, shape=(36, 32, 20), spacing=(7.0, 7.0, 9.0), oblique=False)
    dicom = tmp_path / "series"
    write_dicom_series(image, dicom)
    output = tmp_path / "labels.nii.gz"
    assert segment(dicom, "-o", output, "--model", bundle, "--progress", "none") == 0
    read_back = read_volume(dicom)
    assert read_back.shape == image.shape
    assert read_volume(output).same_geometry(read_back)


def _truncated(folder: Path) -> Path:
    path = folder / "cut.nii.gz"
    write_volume(Volume(np.zeros((20, 20, 20), np.int16), (1, 1, 1), (0, 0, 0)), path)
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))
    return path


def _two_d(folder: Path) -> Path:
    path = folder / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(400, dtype=np.int16).reshape(20, 20)), str(path))
    return path


def _four_d(folder: Path) -> Path:
    path = folder / "series.nii.gz"
    frames = [sitk.GetImageFromArray(np.full((20, 20, 20), t * 100 - 500, dtype=np.int16)) for t in range(3)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    return path


def _nan(folder: Path) -> Path:
    path = folder / "nan.nrrd"
    array = np.linspace(-1000, 400, 8000, dtype=np.float32).reshape(20, 20, 20)
    array[3, 4, 5] = np.nan
    write_volume(Volume(array, (5, 5, 5), (0, 0, 0)), path)
    return path


def _constant(folder: Path) -> Path:
    path = folder / "flat.mha"
    write_volume(Volume(np.full((20, 20, 20), -1000, np.int16), (5, 5, 5), (0, 0, 0)), path)
    return path


def _not_an_image(folder: Path) -> Path:
    path = folder / "report.nii.gz"
    path.write_text("this is not a NIfTI file")
    return path


@pytest.mark.parametrize(
    "make_input, expected",
    [
        (_truncated, "cannot be read"),
        (_two_d, "expected a 3-D volume"),
        (_four_d, "expected a 3-D volume"),
        (_nan, "NaN or infinite"),
        (_constant, "every voxel has the value -1000"),
        (_not_an_image, "cannot be read"),
        (lambda folder: folder / "missing.nii.gz", "no such file"),
    ],
    ids=["truncated", "2d", "4d", "nan", "constant", "not-an-image", "missing"],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(bundle, tmp_path, capsys, make_input, expected):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = make_input(inputs)
    outputs = tmp_path / "out"
    outputs.mkdir()
    options = ["--model", bundle, "--volumes", outputs / "v.csv", "--progress", "none"]
    code = segment(path, "-o", outputs / "labels.seg.nrrd", *options)
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("repux segment: error: ")
    assert str(path) in error and expected in error
    assert list(outputs.iterdir()) == []


def test_bad_case_in_a_folder_fails_the_run_but_not_the_other_cases(bundle, tmp_path, capsys):
    inputs = _case_folder(tmp_path / "cases")
    _constant(inputs)
    outputs = tmp_path / "labels"
    assert segment(inputs, "-o", outputs, "--model", bundle, "--progress", "none") == 2
    error = capsys.readouterr().err
    assert "1 of 3 case(s) failed" in error and "flat.mha" in error
    assert sorted(p.name for p in outputs.iterdir()) == ["case11.nii.gz", "case12.nii.gz"]


def test_model_for_another_modality_is_refused(bundle, phantom, tmp_path, capsys):
    options = ["--model", bundle, "--modality", "MR", "--progress", "none"]
    assert segment(phantom, "-o", tmp_path / "l.nii.gz", *options) == 2
    error = capsys.readouterr().err
    assert "trained on CT" in error and "--modality MR" in error
    assert not (tmp_path / "l.nii.gz").exists()


def test_model_whose_labels_do_not_fit_its_outputs_is_refused(bundle, phantom, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((bundle / "model.safetensors").read_bytes())
    metadata = json.loads((bundle / "model.json").read_text())
    metadata["labels"] = metadata["labels"][:4]  # 4 labels for 5 output channels
    (broken / "model.json").write_text(json.dumps(metadata))
    assert segment(phantom, "-o", tmp_path / "l.nii.gz", "--model", broken, "--progress", "none") == 2
    error = capsys.readouterr().err
    assert "model.json" in error and "labels" in error
    assert not (tmp_path / "l.nii.gz").exists()


@pytest.mark.parametrize(
    "output, expected",
    [("labels.png", "not a label-map file name"), ("labels.nii.gz", "one output file for 2 inputs")],
)
def test_output_name_that_does_not_fit_is_refused(bundle, phantom, tmp_path, capsys, output, expected):
    second = tmp_path / "second.nii.gz"
    second.write_bytes(phantom.read_bytes())
    inputs = [phantom] if output.endswith(".png") else [phantom, second]
    assert segment(*inputs, "-o", tmp_path / output, "--model", bundle, "--progress", "none") == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / output).exists()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_cancelling_mid_inference_leaves_no_output(tmp_path, signal_number):
    # 2 mm model voxels over a 6 mm phantom: hundreds of windows, so the kill lands mid-inference.
    bundle = save_tiny_bundle(tmp_path / "fine", spacing=(2.0, 2.0, 2.0), sw_batch_size=1)
    image, _ = make_phantom(8, shape=(48, 40, 32), spacing=(6.0, 6.0, 8.0))
    source = tmp_path / "ct.nii.gz"
    write_volume(image, source)
    outputs = tmp_path / "out"
    outputs.mkdir()
    command = [
        sys.executable, "-m", "repux", "segment", str(source), "-o", str(outputs / "labels.seg.nrrd"),
        "--model", str(bundle), "--probabilities", str(outputs / "p.nii.gz"),
        "--volumes", str(outputs / "v.csv"), "--progress", "jsonl",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = []
    try:
        for line in process.stdout:
            records.append(json.loads(line))
            if records[-1]["stage"] == "infer" and records[-1]["done"] >= 1:
                break
        assert records and records[-1]["stage"] == "infer", process.stderr.read()
        assert records[-1]["done"] < records[-1]["total"]
        process.send_signal(signal_number)
        rest, error = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal_number, error  # 143 for SIGTERM, 130 for Ctrl-C
    assert "cancelled" in error
    assert json.loads(rest.splitlines()[-1]) == {"stage": "cancelled"}
    assert list(outputs.iterdir()) == []


@pytest.mark.parametrize("command", ["segment", "evaluate", "demo"])
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert f"usage: repux {command}" in capsys.readouterr().out
