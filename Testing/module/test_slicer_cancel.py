"""Cancel of a running segmentation: the whole process tree ends and the scene is untouched."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from module_helpers import add_user_segment, load_into_scene, save_tiny_bundle, scene_state
from repux.imageio import write_volume

from RepUXSegmentLib.catalog import ModelCatalog
from RepUXSegmentLib.logic import RepUXLogic
from RepUXSegmentLib.runner import CANCELLED, JobCancelled

def group_members(pgid: int) -> list[int]:
    """PIDs of the running processes in process group ``pgid`` (from Linux's /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def test_cancel_ends_the_process_tree_and_leaves_the_scene_as_it_was(tmp_path, scene):
    from repux.data.phantoms import make_phantom

    # A job that takes minutes: a full-size phantom and a model at 2 mm with overlapping windows.
    slow = save_tiny_bundle(tmp_path / "slow", spacing_mm=2.0, name="slow")
    catalog = ModelCatalog(user_dir=tmp_path / "models")
    catalog.add(slow, "slow")
    image, _ = make_phantom(11)
    volume = load_into_scene(scene, write_volume(image, tmp_path / "big.nii.gz"))
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "previous result")
    add_user_segment(target, "liver", volume)
    before = scene_state(scene)

    # Like PythonSlicer, a launcher that starts the real Python as its child (not exec):
    # cancelling only the direct child would leave Python running.
    launcher = tmp_path / "launcher" / "python"
    launcher.parent.mkdir()
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)

    work = tmp_path / "work"
    work.mkdir()
    logic = RepUXLogic(scene, catalog, python=str(launcher), temp_dir=work)
    job = logic.segment(volume, "slow", device="cpu", wait=False, segmentation_node=target, overlap=0.5)
    deadline = time.monotonic() + 240
    while job.poll() and not (job.latest and job.latest.get("stage") == "infer" and job.latest.get("total")):
        assert time.monotonic() < deadline, f"inference did not start; log: {list(job.log)}"
        time.sleep(0.1)
    assert job.running, f"the job ended before it could be cancelled: {job.state} {job.error}"
    members = group_members(job.pid)
    assert len(members) >= 2, f"expected the launcher and Python in the job's group, found {members}"

    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 30
    assert job.state == CANCELLED
    assert group_members(job.pid) == []
    for pid in members:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(JobCancelled):
        job.wait()
    assert scene_state(scene) == before
    assert [target.GetSegmentation().GetNthSegment(i).GetName() for i in range(target.GetSegmentation().GetNumberOfSegments())] == ["liver"]
    assert list(work.iterdir()) == []
