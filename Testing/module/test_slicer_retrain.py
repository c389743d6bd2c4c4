"""Curate cases, retrain with Cancel and resume, and segment with the new model version.

Real ``repux train`` processes on two phantom cases with the tiny model, a few iterations.
"""

from __future__ import annotations

import time

import pytest

from module_helpers import load_into_scene

from RepUXSegmentLib.logic import RepUXLogic
from RepUXSegmentLib.runner import CANCELLED, JobCancelled


def test_curated_cases_retrain_into_a_new_version_that_segments(scene, catalog, phantoms, tmp_path):
    logic = RepUXLogic(scene, catalog)
    curated = tmp_path / "curated"
    volumes = {}
    for kind in ("oblique", "ras"):
        image_path, label_path = phantoms[kind]
        volumes[kind] = load_into_scene(scene, image_path)
        segmentation = logic.import_labelmap(label_path, "tiny", reference_volume_node=volumes[kind])
        logic.add_case(volumes[kind], segmentation, curated, "tiny")

    # A long run, cancelled once it has trained a few steps.
    records = []
    job = logic.retrain(curated, "tiny", None, wait=False, progress=records.append, iterations=500, val_every=2)
    deadline = time.monotonic() + 240
    while job.poll() and (job.latest or {}).get("iteration", 0) < 2:
        assert time.monotonic() < deadline, f"training did not start; log: {list(job.log)}"
        time.sleep(0.1)
    assert job.running, f"training ended before it could be cancelled: {job.state} {job.error}"
    job.cancel()
    with pytest.raises(JobCancelled):
        job.wait(timeout=60)
    assert job.state == CANCELLED
    version = catalog.user_dir / "tiny-v2"
    assert not version.exists(), "a cancelled run must not leave a bundle"
    assert (catalog.user_dir / "tiny-v2.work").is_dir(), "the checkpoint to resume from"
    assert [e.name for e in catalog.models() if e.source == "user"] == ["tiny"] and catalog.problems == []
    trained = max(r.get("iteration", 0) for r in records)

    # Resume: the same version continues where it stopped, then is registered.
    resumed = []
    entry = logic.retrain(curated, "tiny", None, progress=resumed.append, iterations=trained + 2, val_every=2, resume=True)
    assert any("resuming from" in r.get("message", "") for r in resumed)
    first_step = min(r["iteration"] for r in resumed if "iteration" in r and r.get("stage") == "train" and "loss" in r)
    assert first_step == trained + 1
    assert entry.name == "tiny-v2" and entry.path == version and entry.source == "user"
    assert "tiny-v2" in catalog.names()
    assert [label.name for label in entry.labels] == [label.name for label in catalog.get("tiny").labels]
    dice = [r["dice"] for r in resumed if r.get("stage") == "train" and r.get("dice") is not None]
    assert dice, "validation Dice is reported during training"

    # The new version is usable at once.
    segmentation = logic.segment(volumes["ras"], "tiny-v2", device="cpu")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 4
    assert segmentation.GetAttribute("RepUXSegment.Model") == "tiny-v2"

    # Another retrain of the base model becomes the next version.
    assert catalog.next_version_name("tiny") == "tiny-v3"


def test_retraining_needs_cases(scene, catalog, tmp_path):
    with pytest.raises(ValueError, match="has no cases yet"):
        RepUXLogic(scene, catalog).retrain(tmp_path / "empty", "tiny", None, iterations=1)
