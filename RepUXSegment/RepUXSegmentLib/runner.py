"""Model jobs (``python -m repux ...``) and installs (``python -m pip ...``) in child processes.

The GUI process never imports torch: every model job is a child Python, started without a
console window (Windows) in its own process session (POSIX) or group (Windows). Output is
read by two background threads into a queue; progress callbacks, the finishing step (which
may touch the MRML scene) and the clean-up all run in the thread that calls
:meth:`ProcessJob.poll`, which in Slicer is the GUI thread (a QTimer), never in a reader
thread. Nothing here blocks that thread for longer than it takes to read the queue.

Stopping a job: :meth:`ProcessJob.cancel` only asks, and returns at once. It creates the
job's cancel file, which the child's watchdog (``repux.supervision``) notices within half a
second on every platform, and on POSIX it also sends SIGTERM to the job's process group;
either way the child unwinds like Ctrl-C and removes its partial output. Whatever of the
process tree is still running when the grace period is over is killed by :meth:`poll`.
A child also stops by itself when the process that started it is gone (a crash, a kill),
because the watchdog watches ``REPUX_PARENT_PID`` too.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from repux.supervision import CANCEL_FILE_ENV, PARENT_PID_ENV

#: Environment variable that names the Python interpreter for ``repux`` jobs explicitly.
PYTHON_ENV_VAR = "REPUX_PYTHON"

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"

#: Seconds a job gets to stop after Cancel (it removes its partial output) before it is killed.
TERMINATE_GRACE_S = 10.0
#: Lines of the job's stderr kept for the error text and the module's log.
LOG_LINES = 400


#: The module's running jobs by kind ("segment", "retrain", ...). Kept here, in a module that
#: Slicer's "Reload" of the scripted module does not re-import, so that a retrain started
#: before a reload is found and shown again by the new widget.
background_jobs: dict[str, "ProcessJob"] = {}


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


def _child_environment(cancel_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The child must import the same repux as this process (in Slicer: the copy shipped in the
    # extension's module folder, which is not on the interpreter's default path).
    package_parent = repux_search_path()
    if package_parent:
        parts = [package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_PID_ENV] = str(os.getpid())
    env[CANCEL_FILE_ENV] = str(cancel_file)
    return env


def _hidden_process_options() -> dict[str, Any]:
    """Popen options: no console window and a process group of its own (Windows, as
    ``slicer.util.launchConsoleProcess`` hides it), a session of its own (POSIX)."""
    if os.name != "nt":
        return {"start_new_session": True}
    startup = subprocess.STARTUPINFO()  # type: ignore[attr-defined]
    startup.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # type: ignore[attr-defined]
    startup.wShowWindow = subprocess.SW_HIDE  # type: ignore[attr-defined]
    return {"startupinfo": startup, "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (a job's record may hold anything: it is input)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def describe_progress(record: dict[str, Any]) -> str:
    """One line for a progress record: stage, count, loss, validation Dice, time left.

    e.g. ``train · 120/200 · loss 0.4120 · validation Dice 0.831 · 35 s left``. Fields that
    are missing or not finite numbers are left out.
    """
    parts = [str(record.get("stage") or "")]
    done, total = _number(record.get("done")), _number(record.get("total"))
    if total:
        parts.append(f"{int(done or 0)}/{int(total)}")
    loss, dice, eta = (_number(record.get(key)) for key in ("loss", "dice", "eta"))
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if dice is not None:
        parts.append(f"validation Dice {dice:.3f}")
    if eta is not None:
        parts.append(f"{int(round(eta))} s left")
    return " · ".join(part for part in parts if part)


class ProcessJob:
    """A child process running in the background that may report progress as JSON lines.

    Call :meth:`poll` regularly (or :meth:`wait`) from the thread that owns the scene: it
    delivers progress records to ``progress`` and, when the process has exited successfully,
    calls ``finish()`` whose return value becomes :attr:`result`. ``cleanup()`` runs exactly
    once, after success, failure or cancel.

    Attributes:
        command: the child's command line.
        state: "running", "succeeded", "failed" or "cancelled".
        records: every JSON progress record received, in order.
        latest: the last record with a ``done`` count (what a progress bar shows), or None.
        log: recent lines of the child's stderr and non-JSON stdout.
        warnings: messages of ``{"stage": "warning"}`` records (shown to the user as they come).
        error: the error text of a failed job (the child's own message where it gave one).
        result: what ``finish()`` returned.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        finish: Callable[[], Any] | None = None,
        cleanup: Callable[[], None] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        description: str = "",
    ) -> None:
        self._init_state(command, description or " ".join(str(word) for word in command[:1]), finish, cleanup, progress)
        self._kill_at: float | None = None
        self._killed = False
        self._lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._open_streams = 2
        self._control_dir = Path(tempfile.mkdtemp(prefix="repux-job-"))
        self.cancel_file = self._control_dir / "cancel"
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
                env=_child_environment(self.cancel_file),
                **_hidden_process_options(),
            )
        except OSError as error:
            self._run_cleanup()
            raise JobError(f"cannot start {self.command[0]}: {error}") from None
        for name, stream in (("out", self.process.stdout), ("err", self.process.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _init_state(
        self,
        command: Sequence[str],
        description: str,
        finish: Callable[[], Any] | None,
        cleanup: Callable[[], None] | None,
        progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        """What every job has, whatever runs it (a child process here, a server in ``remote``)."""
        self.command = [str(word) for word in command]
        self.description = description
        self.state = RUNNING
        self.records: list[dict[str, Any]] = []
        self.latest: dict[str, Any] | None = None
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.warnings: list[str] = []
        self.error: str | None = None
        self.result: Any = None
        self.returncode: int | None = None
        self._finish = finish
        self._cleanup = cleanup
        self._progress = progress
        self._cancel_requested = False
        self._control_dir: Path | None = None

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
            except (json.JSONDecodeError, RecursionError):  # not a record: a line of the log
                record = None
        if not isinstance(record, dict):
            if line.strip():
                self.log.append(line)
            return
        self.records.append(record)
        if "message" in record:
            self.log.append(str(record["message"]))
            if record.get("stage") == "warning":
                self.warnings.append(str(record["message"]))
        if _number(record.get("done")) is not None and (record.get("total") is None or _number(record.get("total"))):
            self.latest = record  # only a record with a count a progress bar can show
        if self._progress is not None:
            self._progress(record)

    # -- state --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def cancelling(self) -> bool:
        """True between :meth:`cancel` and the end of the job."""
        return self._cancel_requested and self.state == RUNNING

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def fraction(self) -> float | None:
        """Share of the current stage done (0..1), or None while unknown."""
        if not self.latest or not _number(self.latest.get("total")):
            return None
        return min(1.0, max(0.0, float(self.latest["done"]) / float(self.latest["total"])))

    def poll(self) -> bool:
        """Deliver pending output; finish the job if its process has ended. True while running.

        After :meth:`cancel`, this also kills what is left of the job's process tree once the
        grace period is over.
        """
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
        if self._cancel_requested and not self._killed and time.monotonic() >= (self._kill_at or 0.0):
            _kill_tree(self.process)
            self._killed = True
        if self._open_streams == 0 and self.process.poll() is not None:
            if self._cancel_requested and not self._killed and _tree_alive(self.process):
                # A launcher (PythonSlicer) may exit at once while the Python process it
                # started still removes its partial output: wait for the whole group.
                return True
            self.returncode = self.process.returncode
            if self._cancel_requested:
                _kill_tree(self.process)  # anything the job left behind
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
        if self._control_dir is not None:
            shutil.rmtree(self._control_dir, ignore_errors=True)
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()

    # -- control ------------------------------------------------------------------------
    def wait(self, timeout: float | None = None, interval: float = 0.05) -> Any:
        """Poll until the job ends; return :attr:`result`. Blocks: not for the GUI thread.

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
        """Ask the job and every process it started to stop; returns at once.

        The job removes its partial output and exits; :meth:`poll` kills what is still
        running ``grace`` seconds later, and reports the job as cancelled once it has ended.
        The scene is left as it was.
        """
        if self.state != RUNNING or self._cancel_requested:
            return
        self._cancel_requested = True
        self._kill_at = time.monotonic() + grace
        try:
            self.cancel_file.touch()
        except OSError:
            pass  # the signal below (POSIX) and the kill after the grace period still stop it
        _terminate_tree(self.process)


class RepuxJob(ProcessJob):
    """A ``repux`` subcommand (``python -m repux ARGS``) running in the background.

    Args:
        args: the subcommand and its arguments, e.g. ``["segment", "ct.nrrd", "-o", ...]``.
        python: the interpreter (default: :func:`python_executable`).
        finish, cleanup, progress, description: see :class:`ProcessJob`.
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
        try:
            command = repux_command(args, python)
        except BaseException:
            if cleanup is not None:
                cleanup()
            raise
        super().__init__(
            command,
            finish=finish,
            cleanup=cleanup,
            progress=progress,
            description=description or " ".join(["repux", *[str(a) for a in args[:1]]]),
        )


def pip_install_job(requirements_file: str | os.PathLike, python: str | None = None) -> ProcessJob:
    """``python -m pip install -r requirements_file`` in the background (pip's lines go to ``log``)."""
    command = [python or python_executable(), "-m", "pip", "install", "--disable-pip-version-check"]
    return ProcessJob([*command, "-r", str(requirements_file)], description="pip install")


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


def _terminate_tree(process: subprocess.Popen) -> None:
    """Ask the job's process group to stop (POSIX: SIGTERM; Windows: the cancel file alone)."""
    if os.name == "nt":
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group has already exited


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill the job's process and everything it started."""
    if os.name == "nt":
        if process.poll() is None:
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(process.pid)],
                capture_output=True,
                check=False,
                creationflags=subprocess.CREATE_NO_WINDOW,  # type: ignore[attr-defined]
            )
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group has already exited
