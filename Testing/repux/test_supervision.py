"""The job watchdog: when a job started by the Slicer module must stop by itself."""

from __future__ import annotations

import os
import subprocess
import sys

from repux.supervision import process_start_time, stop_reason


def test_a_live_parent_and_no_cancel_file_let_the_job_run(tmp_path):
    started = process_start_time(os.getpid())
    assert started is not None and started > 0
    assert stop_reason(os.getpid(), started, tmp_path / "cancel") is None


def test_the_cancel_file_stops_the_job(tmp_path):
    (tmp_path / "cancel").touch()
    assert "cancel requested" in stop_reason(os.getpid(), process_start_time(os.getpid()), tmp_path / "cancel")


def test_a_parent_that_has_exited_stops_the_job():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start_time(child.pid)
    child.wait()
    assert process_start_time(child.pid) is None
    assert "is gone" in stop_reason(child.pid, started, None)
    # Gone before the job looked at it (the parent crashed while the job started).
    assert "is gone" in stop_reason(child.pid, None, None)


def test_another_process_that_reuses_the_parents_pid_is_not_the_parent():
    # Same PID, another start time: the parent is gone even though the PID is in use.
    assert "is gone" in stop_reason(os.getpid(), process_start_time(os.getpid()) - 60.0, None)
