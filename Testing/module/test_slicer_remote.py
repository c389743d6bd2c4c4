"""RepUXLogic through a real ``repux serve`` process on loopback: same segmentation as a local job,
test connection, a Cancel that returns at once and leaves nothing on either side."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import slicer
from module_helpers import load_into_scene, scene_state
from repux.errors import InputError

from RepUXSegmentLib.logic import RepUXLogic
from RepUXSegmentLib.remote import RemoteJob, ServerSettings
from RepUXSegmentLib.runner import CANCELLED, RUNNING, SUCCEEDED, JobCancelled
from RepUXSegmentLib.segmentations import labelmap_array, reference_geometry, segment_tag

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "repux"))
from serve_support import job_processes, start_server, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bundle):
    running = start_server(tmp_path_factory.mktemp("server"), [str(tiny_bundle)])
    yield running
    running.stop()


@pytest.fixture
def settings(server) -> ServerSettings:
    return ServerSettings.from_token_file(server.url, server.token_file)


@pytest.fixture
def work(tmp_path) -> Path:
    """The logic's folder for temporary files (the catalog's models are elsewhere in tmp_path)."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def test_connection_reports_version_and_model_cards(server, settings, catalog):
    logic = RepUXLogic(slicer.vtkMRMLScene(), catalog)
    info = logic.test_connection(settings.url, settings.token)
    assert info["version"] and info["devices"] == ["cpu"]
    card = info["models"][0]
    assert card["name"] == "tiny" and [label["name"] for label in card["labels"]] == ["spleen", "kidney", "liver", "pancreas"]
    local = catalog.get("tiny").card()
    assert {k: v for k, v in local.items() if k not in ("path", "source")} == {k: v for k, v in card.items() if k != "source"}
    with pytest.raises(InputError, match="HTTP 401"):
        logic.test_connection(settings.url, "wrong")
    with pytest.raises(InputError, match="no answer"):
        logic.test_connection("http://127.0.0.1:9", settings.token)


def test_server_segmentation_equals_the_local_one(server, settings, catalog, phantoms, work):
    scene = slicer.vtkMRMLScene()
    logic = RepUXLogic(scene, catalog, temp_dir=work)
    volume = load_into_scene(scene, phantoms["oblique"][0])
    local = logic.segment(volume, "tiny", device="cpu")
    records = []
    job = logic.segment(volume, "tiny", server=settings, wait=False, progress=records.append)
    assert isinstance(job, RemoteJob) and job.state == RUNNING
    remote = job.wait(timeout=120)
    assert job.state == SUCCEEDED and job.result is remote and remote is not local
    assert any(r.get("stage") == "infer" and r.get("done") == r.get("total") for r in records)
    assert job.fraction == 1.0 or job.latest["stage"] in ("export", "write")

    labels = catalog.get("tiny").labels
    geometry = reference_geometry(local, volume)
    remote_labels = labelmap_array(remote, labels, geometry)
    np.testing.assert_array_equal(remote_labels, labelmap_array(local, labels, geometry))
    assert len(np.unique(remote_labels)) > 1
    segmentation = remote.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["spleen", "kidney", "liver", "pancreas"]
    assert "SCT^10200004^Liver" in segment_tag(segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver")), "TerminologyEntry")
    assert list(work.iterdir()) == []  # the upload and the result are gone locally
    assert server.job_files() == []  # and on the server


def test_cancel_returns_at_once_and_leaves_both_sides_clean(server, settings, catalog, phantoms, work):
    scene = slicer.vtkMRMLScene()
    logic = RepUXLogic(scene, catalog, temp_dir=work)
    volume = load_into_scene(scene, phantoms["ras"][0])
    before = scene_state(scene)
    # A dense overlap: many windows, so the job is still running when Cancel comes.
    job = logic.segment(volume, "tiny", server=settings, wait=False, overlap=0.9)
    wait_until(lambda: not job.poll() or (job.latest or {}).get("stage") == "infer", 120, interval=0.05, what="job computing")
    assert job.state == RUNNING
    job.cancel()
    assert job.state == RUNNING  # cancel() asked for the end and returned; poll() reports it
    wait_until(lambda: not job.poll(), 30, interval=0.05, what="cancel reported")
    assert job.state == CANCELLED
    with pytest.raises(JobCancelled):
        job.wait()
    assert scene_state(scene) == before
    assert list(work.iterdir()) == []
    wait_until(lambda: not job_processes(server.work_dir) and server.job_files() == [], 30, what="server job ended and removed")
    assert server.client()._json("GET", "/v1/jobs")["jobs"] == []


def test_options_a_server_cannot_take_are_refused_before_anything_starts(settings, catalog, phantoms, work):
    scene = slicer.vtkMRMLScene()
    logic = RepUXLogic(scene, catalog, temp_dir=work)
    volume = load_into_scene(scene, phantoms["ras"][0])
    with pytest.raises(InputError, match="plain_network"):
        logic.segment(volume, "tiny", server=settings, plain_network=True)
    assert list(work.iterdir()) == []
