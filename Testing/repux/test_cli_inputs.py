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
from infer_support import save_tiny_bundle


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
