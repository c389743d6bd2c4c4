"""Cancel of a running segmentation: the whole process tree ends and the scene is untouched."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from module_helpers import add_user_segment, load_into_scene, scene_state, slow_model_and_ct

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
    # A job that takes minutes: a full-size phantom and a model at 2 mm with overlapping windows.
    slow, ct = slow_model_and_ct(tmp_path)
    catalog = ModelCatalog(user_dir=tmp_path / "models")
    catalog.add(slow, "slow")
    volume = load_into_scene(scene, ct)
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
    # Cancel only asks: the GUI thread that calls it must not wait for the job.
    assert time.monotonic() - started < 1.0
    assert job.cancelling
    with pytest.raises(JobCancelled):
        job.wait(timeout=60)
    assert job.state == CANCELLED
    assert group_members(job.pid) == []
    for pid in members:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert scene_state(scene) == before
    assert [target.GetSegmentation().GetNthSegment(i).GetName() for i in range(target.GetSegmentation().GetNumberOfSegments())] == ["liver"]
    assert list(work.iterdir()) == []


def wait_for_infer(job, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while job.poll() and not (job.latest and job.latest.get("stage") == "infer" and job.latest.get("total")):
        assert time.monotonic() < deadline, f"inference did not start; log: {list(job.log)}"
        time.sleep(0.1)
    assert job.running, f"the job ended too early: {job.state} {job.error}"


def test_the_cancel_file_alone_stops_the_job_cleanly(tmp_path):
    """The graceful stop that works on Windows too (no signal): the job's watchdog sees the
    cancel file, the job unwinds and removes its partial output."""
    from RepUXSegmentLib.runner import RepuxJob

    bundle, ct = slow_model_and_ct(tmp_path)
    output = tmp_path / "out" / "labels.nii.gz"
    job = RepuxJob(["segment", ct, "-o", output, "--model", bundle, "--device", "cpu", "--overlap", "0.5", "--progress", "jsonl"])
    wait_for_infer(job)
    job.cancel_file.touch()  # what cancel() does first; no SIGTERM follows here
    started = time.monotonic()
    while job.poll():
        assert time.monotonic() - started < 30, "the job did not notice its cancel file"
        time.sleep(0.1)
    assert job.returncode != 0 and job.state != "succeeded"
    assert any("cancel requested" in line for line in job.log), list(job.log)
    assert not output.exists()
    assert not output.parent.exists() or not any(output.parent.iterdir())
    assert group_members(job.pid) == []


PARENT_SCRIPT = """
import sys, time
sys.path.insert(0, {module_dir!r})
from RepUXSegmentLib.runner import RepuxJob
job = RepuxJob(["segment", {ct!r}, "-o", {output!r}, "--model", {bundle!r}, "--device", "cpu", "--overlap", "0.5", "--progress", "none"])
print(job.pid, flush=True)
while job.poll():
    time.sleep(0.2)
"""


def test_a_silent_job_stops_soon_after_its_parent_is_killed(tmp_path):
    """Slicer crashes while a job is in a long stage that writes nothing (no broken pipe to
    notice): the job must see within seconds that its parent is gone, and leave no output."""
    import subprocess

    from module_helpers import MODULE_DIR

    bundle, ct = slow_model_and_ct(tmp_path)
    output = tmp_path / "out" / "labels.nii.gz"
    script = PARENT_SCRIPT.format(module_dir=str(MODULE_DIR), ct=str(ct), output=str(output), bundle=str(bundle))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    job_pid = int(parent.stdout.readline())
    time.sleep(8)  # into the long silent stage: reading, preprocessing, windows
    assert group_members(job_pid), "the job ended before its parent was killed"
    parent.kill()
    parent.wait()
    killed = time.monotonic()
    while group_members(job_pid):
        assert time.monotonic() - killed < 20, "the job runs on after its parent was killed"
        time.sleep(0.2)
    assert not output.exists()
    assert not output.parent.exists() or not any(output.parent.iterdir())
