"""The commands with inputs and outputs a new user gets wrong: an output that is an input,
outputs that cannot be written, out-of-distribution scans, cases that fail unexpectedly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from repux.cli import main
from repux.data.phantoms import make_phantom
from repux.imageio import read_volume, write_volume
from infer_support import save_tiny_bundle, write_dicom_series


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return save_tiny_bundle(tmp_path_factory.mktemp("model") / "tiny", spacing=(8.0, 8.0, 8.0))


@pytest.fixture()
def ct(tmp_path) -> Path:
    image, _ = make_phantom(7, shape=(41, 37, 23), spacing=(6.0, 6.0, 8.0))
    return write_volume(image, tmp_path / "in" / "case7.nii.gz")


def segment(*argv) -> int:
    return main(["segment", *map(str, argv)])


def _unchanged(path: Path, before: bytes) -> bool:
    return path.read_bytes() == before


@pytest.mark.parametrize("flag", ["-o", "--probabilities"])
def test_output_that_is_the_input_is_refused_even_with_force(bundle, ct, tmp_path, capsys, flag):
    before = ct.read_bytes()
    other = ["-o", tmp_path / "labels.nii.gz"] if flag == "--probabilities" else []
    # The same file named another way: a relative path with '..', and a symbolic link.
    link = tmp_path / "link.nii.gz"
    link.symlink_to(ct)
    relative = os.path.relpath(ct.parent / ".." / "in" / ct.name)
    for name in (ct, relative, link):
        code = segment(ct, flag, name, *other, "--model", bundle, "--force", "--progress", "none")
        error = capsys.readouterr().err
        assert code == 2, error
        assert "is the input" in error and str(ct.name) in error, error
        assert _unchanged(ct, before)
    assert not (tmp_path / "labels.nii.gz").exists()


def test_output_folder_that_holds_the_inputs_is_refused(bundle, ct, capsys):
    before = ct.read_bytes()
    code = segment(ct.parent, "-o", ct.parent, "--model", bundle, "--force", "--progress", "none")
    error = capsys.readouterr().err
    assert code == 2 and "is the input" in error and "case7.nii.gz" in error, error
    assert _unchanged(ct, before)


def test_two_outputs_on_one_path_are_refused(bundle, ct, tmp_path, capsys):
    same = tmp_path / "out.nii.gz"
    code = segment(ct, "-o", same, "--probabilities", same, "--model", bundle, "--progress", "none")
    error = capsys.readouterr().err
    assert code == 2 and "both the label map and the probabilities" in error, error
    assert not same.exists()


def test_evaluate_table_that_is_the_labels_file_is_refused(ct, tmp_path, capsys):
    import json

    from repux.bundle import label_preset
    from repux.bundle.labels import labels_to_json

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": labels_to_json(label_preset("flare"))}))
    before = labels.read_bytes()
    code = main(["evaluate", str(ct), str(ct), "--labels", str(labels), "-o", str(labels), "--force"])
    error = capsys.readouterr().err
    assert code == 2 and "is the input" in error, error
    assert labels.read_bytes() == before


def _bundle_with_provenance(source: Path, target: Path, **provenance) -> Path:
    import json
    import shutil

    shutil.copytree(source, target)
    metadata = json.loads((target / "model.json").read_text())
    metadata["provenance"].update(provenance)
    (target / "model.json").write_text(json.dumps(metadata))
    return target


def _records(text: str) -> list[dict]:
    import json

    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_ct_without_air_gets_a_warning_on_stderr_and_in_jsonl(bundle, tmp_path, capsys):
    """A head CT windowed to soft tissue (no voxel near -1000 HU) is not what an abdominal model saw."""
    image, _ = make_phantom(7, shape=(41, 37, 23), spacing=(6.0, 6.0, 8.0))
    no_air = write_volume(image.with_array(np.clip(image.array, -30, 385)), tmp_path / "head.nii.gz")
    assert segment(no_air, "-o", tmp_path / "a.nii.gz", "--model", bundle, "--progress", "none") == 0
    error = capsys.readouterr().err
    assert "warning:" in error and "head.nii.gz" in error and "-30" in error and "air" in error, error
    assert segment(no_air, "-o", tmp_path / "b.nii.gz", "--model", bundle, "--progress", "jsonl") == 0
    warnings = [r for r in _records(capsys.readouterr().out) if r["stage"] == "warning"]
    assert len(warnings) == 1 and "air" in warnings[0]["message"] and warnings[0]["source"].endswith("head.nii.gz")
    # A CT with air gets no warning.
    assert segment(write_volume(image, tmp_path / "ok.nii.gz"), "-o", tmp_path / "c.nii.gz", "--model", bundle,
                   "--progress", "jsonl") == 0  # fmt: skip
    assert not [r for r in _records(capsys.readouterr().out) if r["stage"] == "warning"]


def test_field_of_view_outside_the_training_range_is_warned_about(bundle, tmp_path, capsys):
    """The CT covers 41 x 6, 37 x 6, 23 x 8 = 246 x 222 x 184 mm; a model trained on 355-466 mm wide scans warns."""
    image, _ = make_phantom(7, shape=(41, 37, 23), spacing=(6.0, 6.0, 8.0), oblique=False, orientation="RAS")
    ct = write_volume(image, tmp_path / "ras.nii.gz")
    recorded = _bundle_with_provenance(
        bundle, tmp_path / "recorded", training_extent_mm={"min": [355.0, 279.0, 247.0], "max": [466.0, 399.0, 346.0]}
    )
    assert segment(ct, "-o", tmp_path / "a.nii.gz", "--model", recorded, "--progress", "jsonl") == 0
    warnings = [r["message"] for r in _records(capsys.readouterr().out) if r["stage"] == "warning"]
    assert len(warnings) == 1 and "field of view 246 x 222 x 184 mm" in warnings[0], warnings
    wide = _bundle_with_provenance(
        bundle, tmp_path / "wide", training_extent_mm={"min": [200.0, 200.0, 150.0], "max": [400.0, 400.0, 300.0]}
    )
    assert segment(ct, "-o", tmp_path / "b.nii.gz", "--model", wide, "--progress", "jsonl") == 0
    assert not [r for r in _records(capsys.readouterr().out) if r["stage"] == "warning"]


def test_bad_training_extent_in_model_json_is_refused(bundle, tmp_path):
    from repux.bundle import BundleError, load_bundle

    broken = _bundle_with_provenance(bundle, tmp_path / "broken", training_extent_mm={"min": [1, 2], "max": "x"})
    with pytest.raises(BundleError, match="training_extent_mm"):
        load_bundle(broken)


def test_demo_bundle_says_it_is_for_synthetic_phantoms_only(bundle, ct, tmp_path, capsys):
    from repux.bundle import load_bundle

    shipped = load_bundle("demo").metadata
    assert shipped.synthetic_only
    assert "synthetic phantoms only" in shipped.usage_warning and "not for real scans" in shipped.usage_warning
    assert load_bundle(bundle).metadata.usage_warning is None

    demo_like = _bundle_with_provenance(bundle, tmp_path / "demo-like", synthetic_only=True)
    assert segment(ct, "-o", tmp_path / "a.nii.gz", "--model", demo_like, "--progress", "none") == 0
    assert "warning:" in (error := capsys.readouterr().err) and "synthetic phantoms only" in error, error
    assert main(["demo", "-o", str(tmp_path / "demo"), "--model", str(demo_like), "--progress", "jsonl"]) == 0
    warnings = [r for r in _records(capsys.readouterr().out) if r["stage"] == "warning"]
    assert warnings and "synthetic phantoms only" in warnings[0]["message"]


def test_case_that_cannot_fit_in_memory_is_refused_with_the_figure(bundle, tmp_path, capsys):
    """40^3 voxels of 1 m: a 40 m cube, 5000^3 voxels on the 8 mm model grid (terabytes)."""
    from repux.imageio import Volume

    array = np.full((40, 40, 40), -1000, np.int16)
    array[10:30, 10:30, 10:30] = 40
    huge = write_volume(Volume(array, (1000.0, 1000.0, 1000.0), (0.0, 0.0, 0.0)), tmp_path / "huge.nii.gz")
    code = segment(huge, "-o", tmp_path / "out" / "labels.nii.gz", "--model", bundle, "--progress", "none")
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error, error
    assert "huge.nii.gz" in error and "needs about" in error and "GB of memory" in error, error
    assert not (tmp_path / "out").exists()


def test_an_output_name_too_long_for_the_file_system_is_refused_before_any_work(bundle, tmp_path, capsys):
    """249 + len(".nrrd") bytes fit the 255-byte limit for the input; 249 + len(".nii.gz") do not for its output."""
    image, _ = make_phantom(7, shape=(41, 37, 23), spacing=(6.0, 6.0, 8.0))
    inputs, outputs = tmp_path / "cases", tmp_path / "labels"
    write_volume(image, inputs / "a.nii.gz")
    write_volume(image, inputs / ("x" * 249 + ".nrrd"))
    code = segment(inputs, "-o", outputs, "--model", bundle, "--progress", "none")
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error, error
    assert "x" * 249 + ".nii.gz: a name of 256 bytes" in error and "at most 255" in error, error
    assert not outputs.exists()


def test_unexpected_error_in_one_case_of_a_batch_does_not_stop_the_others(bundle, tmp_path, capsys, monkeypatch):
    """The disk fills up while one case's labels are written: that case fails, the others are done."""
    import errno

    from repux.infer import writers

    image, _ = make_phantom(7, shape=(41, 37, 23), spacing=(6.0, 6.0, 8.0))
    inputs = tmp_path / "cases"
    for name in ("a", "full", "z"):
        write_volume(image, inputs / f"{name}.nii.gz")
    real_write = writers.write_label_map

    def write_or_fill_the_disk(labels, path, *args, **kwargs):
        if Path(path).name == "full.nii.gz":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(labels, path, *args, **kwargs)

    monkeypatch.setattr(writers, "write_label_map", write_or_fill_the_disk)
    outputs = tmp_path / "labels"
    code = segment(inputs, "-o", outputs, "--model", bundle, "--progress", "none")
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error, error
    assert "1 of 3 case(s) failed" in error and "full.nii.gz: OSError" in error and "No space left" in error, error
    assert sorted(p.name for p in outputs.iterdir()) == ["a.nii.gz", "z.nii.gz"]


def _run_without_torch(*argv, cwd: Path | None = None) -> tuple[int, str, bool]:
    """(exit code, stderr, whether torch was imported) of ``repux ARGV`` in a fresh interpreter."""
    script = (
        "import sys\nfrom repux.cli import main\ncode = main(sys.argv[1:])\n"
        "print('torch' in sys.modules)\nsys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    return done.returncode, done.stderr, done.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize(
    "options, expected",
    [
        (["-o", "{tmp}/file.nii.gz/out.nii.gz"], "file.nii.gz is a file, not a folder"),
        (["-o", "{tmp}/folder.nii.gz"], "is a folder; expected a file name"),
        (["-o", "{tmp}/l.nii.gz", "--overlap", "1.5"], "--overlap 1.5: expected a number 0 <= overlap < 1"),
        (["-o", "{tmp}/l.nii.gz", "--device", "tpu"], "--device tpu: unknown device"),
        (["-o", "{tmp}/l.nii.gz", "--probabilities", "{tmp}/p.png"], "p.png: unsupported file ending"),
        (["-o", "{tmp}/l.nii.gz", "--volumes", "{tmp}/v.txt"], "v.txt: unsupported file ending"),
        (["-o", "{tmp}/l.nii.gz", "--volumes", "{tmp}/file.nii.gz/v.csv"], "is a file, not a folder"),
    ],
    ids=["parent-is-a-file", "output-is-a-folder", "overlap", "device", "probabilities-ending", "volumes-ending",
         "volumes-parent"],
)  # fmt: skip
def test_segment_refuses_bad_outputs_and_options_before_torch_and_reading(bundle, ct, tmp_path, options, expected):
    (tmp_path / "file.nii.gz").write_bytes(b"not a folder")
    (tmp_path / "folder.nii.gz").mkdir()
    argv = [o.replace("{tmp}", str(tmp_path)) for o in options]
    code, error, torch_loaded = _run_without_torch("segment", ct, *argv, "--model", bundle, "--progress", "none")
    assert code == 2 and expected in error and "Traceback" not in error, error
    assert not torch_loaded


def test_segment_batch_with_a_case_output_in_the_way_is_refused_before_any_case(bundle, ct, tmp_path):
    outputs = tmp_path / "labels"
    (outputs / "case7.nii.gz").mkdir(parents=True)
    code, error, torch_loaded = _run_without_torch("segment", ct.parent, "-o", outputs, "--model", bundle, "--force")
    assert code == 2 and "case7.nii.gz: is a folder" in error, error
    assert not torch_loaded


def test_demo_and_evaluate_refuse_unwritable_outputs_before_torch(bundle, ct, tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    code, error, torch_loaded = _run_without_torch("demo", "-o", tmp_path / "file", "--model", bundle)
    assert code == 2 and "file: is a file; expected a folder" in error, error
    assert not torch_loaded
    code, error, torch_loaded = _run_without_torch("demo", "-o", tmp_path / "d", "--device", "gpu9")
    assert code == 2 and "--device gpu9" in error and not torch_loaded, error
    code, error, torch_loaded = _run_without_torch("evaluate", ct, ct, "-o", tmp_path / "file" / "m.csv")
    assert code == 2 and "is a file, not a folder" in error and not torch_loaded, error


def test_evaluate_names_the_predictions_that_have_no_reference(tmp_path, capsys):
    from repux.imageio import Volume

    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    volume = Volume(labels, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    for folder, names in ((pred_dir, ("a", "extra1", "extra2")), (gt_dir, ("a",))):
        for name in names:
            write_volume(volume, folder / f"{name}.nii.gz")
    assert main(["evaluate", str(pred_dir), str(gt_dir)]) == 0
    captured = capsys.readouterr()
    assert "2 prediction(s) without a reference, not scored: ['extra1', 'extra2']" in captured.err, captured.err
    assert "extra1" not in captured.out


def test_two_dicom_series_are_listed_with_description_and_slice_count_and_one_is_chosen(bundle, tmp_path, capsys):
    image, _ = make_phantom(21, shape=(36, 32, 20), spacing=(7.0, 7.0, 9.0), oblique=False, orientation="LPS")
    thin, _ = make_phantom(21, shape=(36, 32, 12), spacing=(7.0, 7.0, 15.0), oblique=False, orientation="LPS")
    folder = tmp_path / "study"
    write_dicom_series(image, folder, "1.2.826.0.1.3680043.2.1125.9.1", "ABDOMEN 9mm", "a")
    write_dicom_series(thin, folder, "1.2.826.0.1.3680043.2.1125.9.2", "SCOUT 15mm", "b")
    code = segment(folder, "-o", tmp_path / "l.nii.gz", "--model", bundle, "--progress", "none")
    error = capsys.readouterr().err
    assert code == 2, error
    assert "1.2.826.0.1.3680043.2.1125.9.1 ('ABDOMEN 9mm', 20 slices)" in error, error
    assert "1.2.826.0.1.3680043.2.1125.9.2 ('SCOUT 15mm', 12 slices)" in error and "--series" in error, error
    code = segment(folder, "-o", tmp_path / "l.nii.gz", "--model", bundle, "--series", "1.2.826.0.1.3680043.2.1125.9.2",
                   "--progress", "none")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert read_volume(tmp_path / "l.nii.gz").shape == (36, 32, 12)
    code = segment(folder, "-o", tmp_path / "m.nii.gz", "--model", bundle, "--series", "9.9", "--progress", "none")
    error = capsys.readouterr().err
    assert code == 2 and "--series 9.9" in error and "ABDOMEN 9mm" in error, error


def test_itk_warnings_about_folders_without_dicom_do_not_reach_the_terminal(bundle, ct, tmp_path):
    """A folder of NIfTI cases is searched for DICOM series first; ITK's 'No Series were found' stays quiet."""
    done = subprocess.run(
        [sys.executable, "-m", "repux", "segment", str(ct.parent), "-o", str(tmp_path / "out"), "--model", str(bundle),
         "--progress", "none"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr and "No Series" not in done.stderr, done.stderr


def test_demo_runs_again_into_its_own_folder_but_not_over_other_files(bundle, tmp_path, capsys):
    import json

    out = tmp_path / "demo"
    argv = ["demo", "-o", str(out), "--model", str(bundle), "--seed", "5", "--progress", "none"]
    assert main(argv) == 0
    first = json.loads((out / "demo.json").read_text())
    assert first["written_by"] == "repux demo" and first["seed"] == 5
    assert main(argv) == 0, capsys.readouterr().err  # its own folder: no complaint, no --force
    assert "already exist" not in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(argv) == 2
    assert "already exist" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
