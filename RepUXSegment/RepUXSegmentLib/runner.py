"""Running ``repux`` subcommands in a separate process that reports progress as JSON lines.

The GUI process never imports torch: every model job is ``python -m repux ...`` in a child
process started in its own session (POSIX) or process group (Windows), so that Cancel can
end the child and everything it started. Output is read by two background threads into a
queue; progress callbacks, the finishing step (which may touch the MRML scene) and the
clean-up all run in the thread that calls :meth:`RepuxJob.poll`, which in Slicer is the GUI
thread (a QTimer), never in a reader thread.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Environment variable that names the Python interpreter for ``repux`` jobs explicitly.
PYTHON_ENV_VAR = "REPUX_PYTHON"

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"

#: Seconds a job gets to stop after SIGTERM (it removes its partial output) before SIGKILL.
TERMINATE_GRACE_S = 10.0
#: Lines of the job's stderr kept for the error text and the module's log.
LOG_LINES = 400


class JobError(RuntimeError):
    """A job that failed; the message is the job's own error text (e.g. ``repux segment: error: ...``)."""


class JobCancelled(RuntimeError):
    """A job that was cancelled before it finished."""


def python_executable(executable: str | os.PathLike | None = None) -> str:
    """The Python interpreter that runs ``python -m repux`` for this process.

    Order: the ``REPUX_PYTHON`` environment variable; ``executable`` or ``sys.executable``
    when it is a Python interpreter; otherwise (inside 3D Slicer ``sys.executable`` can be the
    application itself) ``PythonSlicer``, which Slicer puts on ``PATH`` and ships in its
    ``bin`` folder next to the application.

    Raises:
        FileNotFoundError: no interpreter was found.
    """
    override = os.environ.get(PYTHON_ENV_VAR)
    if override:
        return override
    exe = Path(executable or sys.executable)
    if exe.name.lower().startswith(("python", "pythonslicer")):
        return str(exe)
    suffix = ".exe" if os.name == "nt" else ""
    candidates = [shutil.which("PythonSlicer"), exe.parent / f"PythonSlicer{suffix}", exe.parent / "bin" / f"PythonSlicer{suffix}"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"{exe}: not a Python interpreter and no PythonSlicer found on PATH or next to it; "
        f"set {PYTHON_ENV_VAR} to the Python that has the repux package"
    )


def repux_search_path() -> str | None:
    """The folder that holds the ``repux`` package this process imports (for the child's PYTHONPATH)."""
    spec = importlib.util.find_spec("repux")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]).resolve().parent)


def repux_command(args: Sequence[str], python: str | None = None) -> list[str]:
    """``[python, "-m", "repux", *args]`` with the interpreter from :func:`python_executable`."""
    return [python or python_executable(), "-m", "repux", *[str(a) for a in args]]


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The child must import the same repux as this process (in Slicer: the copy shipped in the
    # extension's module folder, which is not on the interpreter's default path).
    package_parent = repux_search_path()
    if package_parent:
        parts = [package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def describe_progress(record: dict[str, Any]) -> str:
    """One line for a progress record: stage, count, loss, validation Dice, time left.

    e.g. ``train · 120/200 · loss 0.4120 · validation Dice 0.831 · 35 s left``.
    """
    parts = [str(record.get("stage") or "")]
    if record.get("total"):
        parts.append(f"{record.get('done', 0)}/{record['total']}")
    if isinstance(record.get("loss"), (int, float)):
        parts.append(f"loss {float(record['loss']):.4f}")
    if isinstance(record.get("dice"), (int, float)):
        parts.append(f"validation Dice {float(record['dice']):.3f}")
    if isinstance(record.get("eta"), (int, float)):
        parts.append(f"{int(round(record['eta']))} s left")
    return " · ".join(part for part in parts if part)


class RepuxJob:
    """A ``repux`` subcommand running in the background.

    Call :meth:`poll` regularly (or :meth:`wait`) from the thread that owns the scene: it
    delivers progress records to ``progress`` and, when the process has exited successfully,
    calls ``finish()`` whose return value becomes :attr:`result`. ``cleanup()`` runs exactly
    once, after success, failure or cancel.

    Attributes:
        state: "running", "succeeded", "failed" or "cancelled".
        records: every JSON progress record received, in order.
        latest: the last record with a ``done`` count (what a progress bar shows), or None.
        log: recent lines of the child's stderr and non-JSON stdout.
        error: the error text of a failed job (the child's own message where it gave one).
        result: what ``finish()`` returned.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        python: str | None = None,
        finish: Callable[[], Any] | None = None,
        cleanup: Callable[[], None] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        description: str = "",
    ) -> None:
        self.description = description or " ".join(["repux", *[str(a) for a in args[:1]]])
        self.state = RUNNING
        self.records: list[dict[str, Any]] = []
        self.latest: dict[str, Any] | None = None
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.error: str | None = None
        self.result: Any = None
        self.returncode: int | None = None
        self._finish = finish
        self._cleanup = cleanup
        self._progress = progress
        self._cancel_requested = False
        self._lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._open_streams = 2
        popen_options: dict[str, Any] = {}
        if os.name == "nt":
            popen_options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            popen_options["start_new_session"] = True
        try:
            self.command = repux_command(args, python)
        except BaseException:
            self._run_cleanup()
            raise
        try:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                env=_child_environment(),
                **popen_options,
            )
        except OSError as error:
            self._run_cleanup()
            raise JobError(f"cannot start {self.command[0]}: {error}") from None
        for name, stream in (("out", self.process.stdout), ("err", self.process.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    # -- reading ------------------------------------------------------------------------
    def _read(self, name: str, stream: Any) -> None:
        for line in stream:
            self._lines.put((name, line.rstrip("\n")))
        stream.close()
        self._lines.put((name, None))

    def _handle_line(self, name: str, line: str) -> None:
        record = None
        if name == "out" and line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
        if not isinstance(record, dict):
            if line.strip():
                self.log.append(line)
            return
        self.records.append(record)
        if "message" in record:
            self.log.append(str(record["message"]))
        if "done" in record:
            self.latest = record
        if self._progress is not None:
            self._progress(record)

    # -- state --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def fraction(self) -> float | None:
        """Share of the current stage done (0..1), or None while unknown."""
        if not self.latest or not self.latest.get("total"):
            return None
        return min(1.0, max(0.0, float(self.latest.get("done") or 0) / float(self.latest["total"])))

    def poll(self) -> bool:
        """Deliver pending output; finish the job if its process has ended. True while running."""
        if self.state != RUNNING:
            return False
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams -= 1
            else:
                self._handle_line(name, line)
        if self._open_streams == 0 and self.process.poll() is not None:
            self.returncode = self.process.returncode
            self._conclude()
        return self.state == RUNNING

    def _conclude(self) -> None:
        try:
            if self._cancel_requested:
                self.state = CANCELLED
                self.error = "cancelled"
            elif self.returncode != 0 or self._error_record() is not None:
                self.state = FAILED
                self.error = self._error_text()
            else:
                try:
                    self.result = self._finish() if self._finish is not None else None
                    self.state = SUCCEEDED
                except Exception as error:  # noqa: BLE001 - any failure of the import step is the job's error
                    self.state = FAILED
                    self.error = f"{self.description}: {error}"
        finally:
            self._run_cleanup()

    def _error_record(self) -> dict[str, Any] | None:
        for record in reversed(self.records):
            if record.get("stage") == "error":
                return record
        return None

    def _error_text(self) -> str:
        record = self._error_record()
        if record is not None and record.get("message"):
            return str(record["message"])
        # The repux CLI prints "repux CMD: error: MESSAGE" for user errors; a traceback's
        # last line otherwise.
        lines = [line for line in self.log if line.strip()]
        for line in reversed(lines):
            if ": error:" in line:
                return line.strip()
        tail = lines[-1].strip() if lines else "no output"
        return f"{self.description} exited with code {self.returncode}: {tail}"

    def _run_cleanup(self) -> None:
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()

    # -- control ------------------------------------------------------------------------
    def wait(self, timeout: float | None = None, interval: float = 0.05) -> Any:
        """Poll until the job ends; return :attr:`result`.

        Raises:
            JobError: the job failed (message: its error text).
            JobCancelled: the job was cancelled.
            TimeoutError: still running after ``timeout`` seconds (it keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.description}: still running after {timeout} s")
            time.sleep(interval)
        if self.state == FAILED:
            raise JobError(self.error)
        if self.state == CANCELLED:
            raise JobCancelled(f"{self.description}: cancelled")
        return self.result

    def cancel(self, grace: float = TERMINATE_GRACE_S) -> None:
        """End the job and every process it started; the scene is left as it was.

        SIGTERM first, so the job removes its partial output; SIGKILL for the whole process
        group after ``grace`` seconds, and for any child left behind once the job has exited.
        """
        if self.state != RUNNING:
            return
        self._cancel_requested = True
        _signal_tree(self.process, graceful=True)
        deadline = time.monotonic() + grace
        # Wait for the whole group, not only the child: a launcher (PythonSlicer) may exit
        # at once while the Python process it started still removes its partial output.
        while _tree_alive(self.process) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_tree(self.process, graceful=False)
        self.process.wait()
        while self.poll():
            time.sleep(0.01)


def _tree_alive(process: subprocess.Popen) -> bool:
    """True while the job's process or any process of its group is running."""
    if process.poll() is None:
        return True
    if os.name == "nt":
        return False
    try:
        os.killpg(process.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_tree(process: subprocess.Popen, graceful: bool) -> None:
    """Signal the process group of ``process`` (its own session, see RepuxJob)."""
    if os.name == "nt":
        if graceful:
            process.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
        else:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        return
    try:
        os.killpg(process.pid, signal.SIGTERM if graceful else signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group has already exited
