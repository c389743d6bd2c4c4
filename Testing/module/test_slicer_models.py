"""Published models in the module's logic: listed with their size, downloaded through the runner
from a loopback server, cancelled, and imported from a hand-downloaded file (no network)."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from module_helpers import PHANTOM_SHAPE, load_into_scene

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "repux"))  # the loopback server of the package tests
from hub_support import (
    HTML,
    SLOW,
    CheckpointServer,
    Route,
    published_checkpoint,
    registry_entry,
    small_network,
    write_registry,
)  # noqa: E402

from RepUXSegmentLib.catalog import ModelCatalog  # noqa: E402
from RepUXSegmentLib.logic import RepUXLogic  # noqa: E402
from RepUXSegmentLib.runner import CANCELLED, JobError  # noqa: E402
from repux.hub.registry import REGISTRY_ENV  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    network = small_network()
    checkpoint = published_checkpoint(network)
    slow_network = small_network(feat_size=[16, 32, 48, 64], hidden_size=64, seed=1)
    server = CheckpointServer()
    server.routes.update(
        {
            "/tiny.pth": Route(checkpoint),
            "/slow.pth": Route(published_checkpoint(slow_network), SLOW),
            "/page": Route(checkpoint, HTML),
        }
    )
    registry = write_registry(
        tmp_path_factory.mktemp("site") / "registry.json",
        [
            registry_entry(
                "tiny",
                server.url("/tiny.pth"),
                network,
                sha256=hashlib.sha256(checkpoint).hexdigest(),
                size_bytes=len(checkpoint),
            ),
            registry_entry("slow", server.url("/slow.pth"), slow_network),
            registry_entry("page", server.url("/page"), network),
        ],
    )
    server.registry, server.checkpoint = registry, checkpoint
    yield server
    server.close()


@pytest.fixture
def logic(tmp_path, server, monkeypatch, scene) -> RepUXLogic:
    monkeypatch.setenv(REGISTRY_ENV, str(server.registry))  # the job processes inherit it
    return RepUXLogic(scene, catalog=ModelCatalog(user_dir=tmp_path / "models"))


def test_published_models_are_listed_with_their_size_until_installed(logic, server):
    available = {model.name: model for model in logic.catalog.available()}
    assert set(available) == {"tiny", "slow", "page"}
    assert available["tiny"].size_text == f"{len(server.checkpoint) / 1e3:.1f} kB"
    assert available["slow"].size_text == "size unknown"
    assert "Download: " in available["tiny"].card_text() and server.url("/tiny.pth") in available["tiny"].card_text()
    assert "tiny" not in logic.catalog.names()  # nothing is downloaded without a call


def test_download_runs_as_a_job_and_the_model_segments(logic, server, phantoms, scene):
    records = []
    job = logic.download_model("tiny", wait=False, progress=records.append)
    entry = job.wait(timeout=300)
    assert entry.name == "tiny" and entry.source == "user" and entry.path == logic.catalog.user_dir / "tiny"
    assert entry.metadata.provenance["source_sha256"] == hashlib.sha256(server.checkpoint).hexdigest()
    downloads = [r for r in records if r.get("stage") == "download tiny" and "done" in r]
    assert downloads[-1]["done"] == downloads[-1]["total"] == len(server.checkpoint)
    assert records[-1] == {"stage": "done"}
    assert "tiny" not in [model.name for model in logic.catalog.available()]

    volume = load_into_scene(scene, phantoms["ras"][0])
    segmentation = logic.segment(volume, "tiny", device="cpu")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 4
    assert volume.GetImageData().GetDimensions() == PHANTOM_SHAPE


def test_cancel_of_a_download_installs_nothing_and_keeps_the_part(logic):
    job = logic.download_model("slow", wait=False)
    deadline = time.monotonic() + 120
    while job.poll() and not (job.latest and job.latest.get("done")):
        assert time.monotonic() < deadline, list(job.log)
        time.sleep(0.05)
    job.cancel()
    while job.poll():  # cancel() only asks; the end is seen by polling
        time.sleep(0.05)
    assert job.state == CANCELLED
    part = logic.catalog.user_dir / ".downloads" / "slow.part"
    assert 0 < part.stat().st_size < job.latest["total"]
    assert "slow" not in logic.catalog.names() and not (logic.catalog.user_dir / "slow").exists()
    assert [p.name for p in logic.catalog.user_dir.iterdir()] == [".downloads"]


def test_a_hand_downloaded_file_is_imported_and_a_web_page_refused(logic, server, tmp_path):
    download = tmp_path / "best_metric_model.pth"
    download.write_bytes(server.checkpoint)
    entry = logic.import_model_file("tiny", download, labels="flare21")
    assert entry.name == "tiny" and download.is_file()
    assert [label.name for label in entry.labels][1:] == ["liver", "kidney", "spleen", "pancreas"]
    np.testing.assert_array_equal(entry.metadata.network["feat_size"], [4, 8, 12, 16])

    page = tmp_path / "drive.html"
    page.write_text("<!DOCTYPE html><html>Google Drive - Virus scan warning</html>")
    with pytest.raises(JobError, match=r"^model page: .*drive\.html is a web page, not the checkpoint"):
        logic.import_model_file("page", page)
    with pytest.raises(JobError, match=r"model page: http://127\.0\.0\.1:\d+/page answered with a web page"):
        logic.download_model("page")
    assert "page" not in logic.catalog.names()
