"""A job started by another program stops when that program is gone or asks it to stop.

The Slicer module (``RepUXSegmentLib.runner``) starts every ``repux`` job with two
environment variables:

- ``REPUX_PARENT_PID``: the process that waits for the job. If it crashes or is killed, the
  job would otherwise run on until it next writes progress into the closed pipe, which a
  long silent stage (loading a model, one large window on a CPU, validation) may not do for
  minutes.
- ``REPUX_CANCEL_FILE``: a path the parent creates to ask the job to stop. This works on
  every platform and through launchers (PythonSlicer starts the real Python as its child),
  where a signal sent to the direct child may not arrive; on Windows it is the only
  graceful way, since a GUI application cannot send console control events.

A daemon thread checks both every :data:`CHECK_INTERVAL_S` seconds and then interrupts the
main thread with the SIGTERM handler, so the job unwinds as it does on SIGTERM or Ctrl-C:
every ``finally`` runs, partial outputs are removed, a training run keeps its last checkpoint.
Nothing here imports torch.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from pathlib import Path

PARENT_PID_ENV = "REPUX_PARENT_PID"
CANCEL_FILE_ENV = "REPUX_CANCEL_FILE"
#: Seconds between two checks: the job notices within this time (plus the running operation).
CHECK_INTERVAL_S = 0.5


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when there is none.

    The start time tells a process apart from a later one that got the same PID.
    """
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # it exists, but its details are hidden from us
        return 0.0


def stop_reason(parent_pid: int | None, parent_started: float | None, cancel_file: Path | None) -> str | None:
    """Why the job should stop now (the cancel file exists, the parent is gone), or None.

    ``parent_started``: the parent's start time when the job began (None: it was gone then).
    """
    if cancel_file is not None and cancel_file.exists():
        return f"cancel requested ({cancel_file} exists)"
    if parent_pid is not None and (parent_started is None or process_start_time(parent_pid) != parent_started):
        return f"the process that started this job (PID {parent_pid}) is gone"
    return None


def _interrupt_main_thread() -> None:
    # Runs the SIGTERM handler that repux.progress.cancel_on_sigterm installed (a
    # KeyboardInterrupt in the main thread); without one, a plain KeyboardInterrupt.
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        _thread.interrupt_main()
    else:
        _thread.interrupt_main(signal.SIGTERM)


def watch_for_stop(interval: float = CHECK_INTERVAL_S) -> threading.Thread | None:
    """Start the watchdog when the environment names a parent or a cancel file.

    Returns the thread (a daemon), or None when this process was not started as a job.
    A parent that is already gone when this is called stops the job at the first check.
    """
    pid_text = os.environ.get(PARENT_PID_ENV, "").strip()
    cancel_text = os.environ.get(CANCEL_FILE_ENV, "").strip()
    parent_pid = int(pid_text) if pid_text.isdigit() else None
    cancel_file = Path(cancel_text) if cancel_text else None
    if parent_pid is None and cancel_file is None:
        return None
    parent_started = process_start_time(parent_pid) if parent_pid is not None else None

    def watch() -> None:
        while True:
            time.sleep(interval)
            reason = stop_reason(parent_pid, parent_started, cancel_file)
            if reason is not None:
                try:
                    print(f"repux: stopping: {reason}", file=sys.stderr, flush=True)
                except (OSError, ValueError):
                    pass  # stderr went with the parent
                _interrupt_main_thread()
                return

    thread = threading.Thread(target=watch, name="repux-watchdog", daemon=True)
    thread.start()
    return thread
