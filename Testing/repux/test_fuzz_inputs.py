"""Short fuzz run over every reader of user input (hypothesis; ~30 s in all): each input ends
in success or the project's InputError, never in another exception, a hang or a file
written by a reader. ``python benchmarks/fuzz_inputs.py --examples N`` runs the long one."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fuzz_support as fz
from repux.bundle import load_bundle
from repux.bundle.labels import labels_from_json, labels_to_json
from repux.bundle.presets import label_preset
from repux.data.cases import check_cases, load_cases
from repux.data.phantoms import make_phantom
from repux.imageio import write_volume
from infer_support import save_tiny_bundle

#: Examples per target: 60 in CI (the same ones every run); the long run sets thousands, drawn at random.
EXAMPLES = int(os.environ.get("REPUX_FUZZ_EXAMPLES", "60"))
CI = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 60, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def seeds(work) -> dict[str, bytes]:
    return fz.seed_volumes(work)


def _fresh(work: Path, name: str) -> Path:
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


@CI
@given(data=st.data())
def test_volume_files_with_mutated_bytes_or_cut_short(work, seeds, data):
    name = data.draw(st.sampled_from(sorted(seeds)))
    seed = seeds[name]
    flips = data.draw(st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=6))
    truncate = data.draw(st.none() | st.integers(0, len(seed)))
    folder = _fresh(work, "bytes")
    path = fz.write_input(folder, name, fz.mutate_bytes(seed, fz.header_length(name, seed), flips, truncate))
    fz.outcome(lambda: fz.read_checked(path), folder)


#: NIfTI-1 header fields (byte offset, struct format): dims, datatype, bitpix, pixdim,
#: vox_offset, scl_slope/inter, qform/sform codes, quaternion, sform rows.
NIFTI_FIELDS = [(40 + 2 * i, "<h") for i in range(8)] + [(70, "<h"), (72, "<h")] + \
    [(76 + 4 * i, "<f") for i in range(8)] + [(108, "<f"), (112, "<f"), (116, "<f"), (252, "<h"), (254, "<h")] + \
    [(256 + 4 * i, "<f") for i in range(6)] + [(280 + 4 * i, "<f") for i in range(12)]  # fmt: skip


@CI
@given(data=st.data())
def test_volume_headers_with_mutated_fields(work, seeds, data):
    name = data.draw(st.sampled_from(sorted(seeds)))
    seed = seeds[name]
    header = fz.header_length(name, seed)
    if name.endswith((".nii", ".nii.gz")):
        changes = data.draw(st.lists(st.sampled_from(NIFTI_FIELDS), min_size=1, max_size=3))
        mutated = bytearray(seed)
        for offset, form in changes:
            if form == "<h":
                value = data.draw(st.sampled_from(fz.INTERESTING_NUMBERS).filter(lambda v: -(2**15) <= v < 2**15))
            else:
                value = data.draw(st.floats(width=32) | st.sampled_from([0.0, -1.0, 1e30, 348.0, 352.0]))
            mutated[offset : offset + struct.calcsize(form)] = struct.pack(form, value)
        mutated = bytes(mutated)
    else:
        line = data.draw(st.integers(0, 30))
        value = data.draw(st.sampled_from(fz.INTERESTING_TEXT) | st.text(max_size=30))
        mutated = fz.mutate_field(seed, header, line, value)
    folder = _fresh(work, "fields")
    path = fz.write_input(folder, name, mutated)
    fz.outcome(lambda: fz.read_checked(path), folder)


@pytest.fixture(scope="module")
def bundle_seed(work) -> Path:
    return save_tiny_bundle(work / "seed-bundle", spacing=(8.0, 8.0, 8.0))


@CI
@given(data=st.data())
def test_bundles_with_mutated_model_json(work, bundle_seed, data):
    metadata = json.loads((bundle_seed / "model.json").read_text())
    path = data.draw(st.sampled_from(fz.json_paths(metadata)))
    delete = bool(path) and data.draw(st.booleans())
    mutated = fz.replace_at(metadata, path, data.draw(fz.JSON_VALUES), delete=delete)
    weights = (bundle_seed / "model.safetensors").read_bytes()
    folder = fz.write_bundle(work / "bundles" / "b", json.dumps(mutated), weights)
    fz.outcome(lambda: load_bundle(folder), folder)


@CI
@given(data=st.data())
def test_bundles_with_mutated_safetensors_headers(work, bundle_seed, data):
    weights = (bundle_seed / "model.safetensors").read_bytes()
    length = data.draw(st.none() | st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 7, 8, 2**32, 2**63]))
    flips = data.draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6))
    truncate = data.draw(st.none() | st.integers(0, len(weights)))
    mutated = fz.mutate_safetensors(weights, length, flips, truncate)
    folder = fz.write_bundle(work / "bundles" / "w", (bundle_seed / "model.json").read_text(), mutated)
    fz.outcome(lambda: load_bundle(folder), folder)


@pytest.fixture(scope="module")
def dataset_seed(work) -> Path:
    folder = work / "seed-dataset"
    image, labels = make_phantom(3, shape=(24, 24, 16), spacing=(12.0, 12.0, 16.0), oblique=False)
    for index in range(2):
        write_volume(image, folder / "imagesTr" / f"case_{index}.nii.gz")
        write_volume(labels, folder / "labelsTr" / f"case_{index}.nii.gz")
    manifest = {
        "name": "fuzz", "labels": {"0": "background", "1": "spleen"}, "modality": {"0": "CT"},
        "training": [{"image": f"imagesTr/case_{i}.nii.gz", "label": f"labelsTr/case_{i}.nii.gz"} for i in range(2)],
    }  # fmt: skip
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder


@CI
@given(data=st.data())
def test_training_sets_with_mutated_dataset_json(work, dataset_seed, data):
    manifest = json.loads((dataset_seed / "dataset.json").read_text())
    path = data.draw(st.sampled_from(fz.json_paths(manifest)))
    new = data.draw(fz.JSON_VALUES | st.sampled_from(["/dev/zero", "/", "..", "imagesTr", "dataset.json"]))
    mutated = fz.replace_at(manifest, path, new, delete=bool(path) and data.draw(st.booleans()))
    folder = work / "datasets" / "d"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(dataset_seed, folder)
    (folder / "dataset.json").write_text(json.dumps(mutated))
    fz.outcome(lambda: check_cases(load_cases(folder), range(5)), folder)


@CI
@given(data=st.data())
def test_labels_files_with_mutated_values(work, data):
    labels = {"labels": labels_to_json(label_preset("flare"))}
    path = data.draw(st.sampled_from(fz.json_paths(labels)))
    mutated = fz.replace_at(labels, path, data.draw(fz.JSON_VALUES), delete=bool(path) and data.draw(st.booleans()))
    folder = _fresh(work, "labels")
    (folder / "labels.json").write_text(json.dumps(mutated))
    fz.outcome(lambda: labels_from_json(folder / "labels.json"), folder)


@pytest.fixture(scope="module")
def job():
    """A real job (``repux --version``, finished at once) whose line handling is fed by hand."""
    runner = fz.runner_module()
    job = runner.RepuxJob(["--version"])
    yield job
    job.wait()


@CI
@given(lines=fz.PROGRESS_LINES)
@example(lines=[("out", '{"stage": "infer", "done": 1, "total": "a"}')])
@example(lines=[("out", '{"stage": "infer", "done": 1, "total": 2, "eta": Infinity}')])
@example(lines=[("out", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")])
def test_slicer_runner_survives_any_progress_line(work, job, lines):
    fz.outcome(lambda: fz.handle_lines(job, lines), work)
