"""The server's jobs: a folder each, a queue, and one worker per device running ``repux segment``.

Each job runs as its own ``python -m repux segment ... --progress jsonl`` process, the very
command a user types: the same engine, checks, messages and atomic outputs, and a crash or an
out-of-memory kill ends that job only. Cancel and the time limit send SIGTERM to the job's
process group (the CLI removes its partial output), then SIGKILL after a grace period.

Layout of the work folder (private, mode 0700)::

    jobs/<id>/job.json       the job's record (state, owner fingerprint, model, options)
    jobs/<id>/records.jsonl  its progress records, as the CLI printed them
    jobs/<id>/input.<ext>    the upload (deleted when the job ends)
    jobs/<id>/result.<ext>   the result (deleted after download or the retention time)

Job ids are random hex strings made here; no string from a client becomes part of a path.
A job record survives a restart: queued jobs are queued again, a job that was running when
the server died is reported ``lost`` (never silently dropped).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from repux.atomic import write_json

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, LOST = "queued", "running", "succeeded", "failed", "cancelled", "lost"
FINISHED = (SUCCEEDED, FAILED, CANCELLED, LOST)
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
#: Seconds a job gets to remove its partial output after SIGTERM before SIGKILL.
TERMINATE_GRACE_S = 10.0
#: Lines of a job's stderr kept for its error text.
STDERR_TAIL = 40


@dataclass
class Limits:
    """What one server accepts: sizes in bytes, times in seconds."""

    max_upload_bytes: int = 2 * 1024**3
    max_queued_per_token: int = 4
    max_jobs: int = 64
    job_time_limit_s: float = 3600.0
    retention_s: float = 3600.0


@dataclass
class Job:
    """One segmentation job. ``owner``: fingerprint of the token that submitted it."""

    id: str
    owner: str
    model: str
    filename: str
    input_suffix: str
    output_suffix: str
    options: dict[str, Any]
    state: str = QUEUED
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    downloaded: bool = False
    device: str | None = None

    @property
    def input_name(self) -> str:
        return "input" + self.input_suffix

    @property
    def result_name(self) -> str:
        return "result" + self.output_suffix


class JobManager:
    """Jobs, their folders, the queue and the workers.

    Args:
        work_dir: private folder for uploads, results and job records.
        models: served model name -> bundle folder.
        devices: one worker per entry ("cpu", "cuda:0", ...).
        limits: sizes and times.
        python: interpreter for the job processes (default: this one).
    """

    def __init__(
        self,
        work_dir: str | os.PathLike,
        models: dict[str, Path],
        devices: list[str],
        limits: Limits,
        python: str | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.jobs_dir = self.work_dir / "jobs"
        self.models = models
        self.devices = devices
        self.limits = limits
        self.python = python or sys.executable
        self._jobs: dict[str, Job] = {}
        self._records: dict[str, list[dict[str, Any]]] = {}
        self._queue: deque[str] = deque()
        self._processes: dict[str, subprocess.Popen] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Condition(threading.RLock())
        self._stopping = False
        self._threads: list[threading.Thread] = []
        #: Uploads in progress per owner: they count against the limits before they are jobs.
        self._uploads: dict[str, int] = {}

    # -- start and stop ---------------------------------------------------------------
    def start(self) -> list[str]:
        """Load the jobs of an earlier run and start the workers; return notes for the log."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work_dir, 0o700)
        notes = self._recover()
        for device in self.devices:
            thread = threading.Thread(target=self._work, args=(device,), name=f"repux-worker-{device}", daemon=True)
            thread.start()
            self._threads.append(thread)
        sweeper = threading.Thread(target=self._sweep_forever, name="repux-retention", daemon=True)
        sweeper.start()
        return notes

    def _recover(self) -> list[str]:
        notes, queued = [], []
        for folder in sorted(self.jobs_dir.iterdir()):
            record = folder / "job.json"
            if not JOB_ID.match(folder.name):
                continue  # not a job's folder: never the server's to remove
            if not record.is_file():
                shutil.rmtree(folder, ignore_errors=True)  # an upload that never became a job
                continue
            job = Job(**json.loads(record.read_text(encoding="utf-8")))
            self._jobs[job.id] = job
            self._records[job.id] = self._read_records(folder)
            if job.state == RUNNING:
                self._end(job, LOST, "the server stopped while this job ran; its result was lost; submit it again")
                notes.append(f"job {job.id}: lost (it was running when the server stopped)")
            elif job.state == QUEUED:
                queued.append(job)
        for job in sorted(queued, key=lambda j: j.created):
            self._queue.append(job.id)
            self._cancel[job.id] = threading.Event()
        if queued:
            notes.append(f"{len(queued)} queued job(s) from the last run queued again")
        return notes

    @staticmethod
    def _read_records(folder: Path) -> list[dict[str, Any]]:
        path = folder / "records.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return records

    def stop(self) -> None:
        """Stop the workers; a running job is ended and queued again for the next start."""
        with self._lock:
            self._stopping = True
            running = list(self._processes.items())
            self._lock.notify_all()
        for job_id, process in running:
            _terminate(process)
        for thread in self._threads:
            thread.join(timeout=TERMINATE_GRACE_S + 5)

    # -- submitting -------------------------------------------------------------------
    def folder(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def new_job_folder(self) -> tuple[str, Path]:
        job_id = uuid.uuid4().hex
        folder = self.folder(job_id)
        folder.mkdir(mode=0o700)
        return job_id, folder

    def admission_error(self, owner: str) -> tuple[int, str] | None:
        """(HTTP status, message) when a new job of ``owner`` cannot be taken now, else None.

        Uploads still arriving count as jobs, so parallel uploads cannot pass a limit (or fill the disk).
        """
        with self._lock:
            if self._stopping:
                return 503, "the server is shutting down; try again later"
            active = [job.owner for job in self._jobs.values() if job.state in (QUEUED, RUNNING)]
            total = len(active) + sum(self._uploads.values())
            if total >= self.limits.max_jobs:
                return 503, f"the server has {total} jobs queued, running or uploading (its limit); try again later"
            mine = active.count(owner) + self._uploads.get(owner, 0)
            if mine >= self.limits.max_queued_per_token:
                return 429, (
                    f"this token has {mine} jobs queued, running or uploading (limit {self.limits.max_queued_per_token}); "
                    "wait for one to finish"
                )
        return None

    def begin_upload(self, owner: str) -> tuple[int, str] | None:
        """Reserve a place for an upload of ``owner`` (released by :meth:`end_upload`), or say why not."""
        with self._lock:
            refusal = self.admission_error(owner)
            if refusal is None:
                self._uploads[owner] = self._uploads.get(owner, 0) + 1
            return refusal

    def end_upload(self, owner: str) -> None:
        with self._lock:
            self._uploads[owner] -= 1
            if not self._uploads[owner]:
                del self._uploads[owner]

    def submit(self, job: Job) -> tuple[int, str] | None:
        """Queue ``job``, whose folder holds its input already; or return why not (see :meth:`admission_error`).

        Checked and queued under one lock, so concurrent submissions never pass a limit together.
        """
        with self._lock:
            refusal = self.admission_error(job.owner)
            if refusal is not None:
                return refusal
            self._jobs[job.id] = job
            self._records[job.id] = []
            self._cancel[job.id] = threading.Event()
            self._save(job)
            self._queue.append(job.id)
            self._lock.notify_all()
        return None

    # -- reading ----------------------------------------------------------------------
    def get(self, job_id: str, owner: str) -> Job | None:
        """The job, when it exists and belongs to ``owner`` (others' jobs do not exist for a caller)."""
        job = self._jobs.get(job_id) if JOB_ID.match(job_id) else None
        return job if job is not None and job.owner == owner else None

    def owned(self, owner: str) -> list[Job]:
        return [job for job in self._jobs.values() if job.owner == owner]

    def records(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._records.get(job_id, [])[max(since, 0) :])

    def status(self, job: Job) -> dict[str, Any]:
        with self._lock:
            position = self._queue.index(job.id) if job.id in self._queue else None
            records = self._records.get(job.id, [])
            latest = next((r for r in reversed(records) if "done" in r), None)
            count = len(records)
        status = asdict(job)
        status.pop("owner")
        status.update(queue_position=position, records=count, latest=latest)
        return status

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {state: sum(1 for j in self._jobs.values() if j.state == state) for state in (QUEUED, RUNNING)}

    # -- changing ---------------------------------------------------------------------
    def cancel(self, job: Job) -> None:
        """Request the end of a queued or running job; returns at once (the worker ends it)."""
        with self._lock:
            if job.id in self._queue:
                self._queue.remove(job.id)
                self._end(job, CANCELLED, "cancelled")
                return
            event = self._cancel.get(job.id)
            process = self._processes.get(job.id)
        if event is not None:
            event.set()
        if process is not None:
            threading.Thread(target=_terminate, args=(process,), daemon=True).start()

    def delete(self, job: Job) -> None:
        """Cancel the job if needed and remove it and its files (a running job's files go when it stops)."""
        if job.state in (QUEUED, RUNNING):
            self.cancel(job)
        with self._lock:
            self._jobs.pop(job.id, None)
            self._records.pop(job.id, None)
            running = job.id in self._processes
        if not running:
            shutil.rmtree(self.folder(job.id), ignore_errors=True)

    def result_downloaded(self, job: Job) -> None:
        """Delete the result once it has been sent whole."""
        job.downloaded = True
        (self.folder(job.id) / job.result_name).unlink(missing_ok=True)
        if job.id in self._jobs:
            self._save(job)

    def _save(self, job: Job) -> None:
        write_json(asdict(job), self.folder(job.id) / "job.json")

    def _end(self, job: Job, state: str, error: str | None) -> None:
        """Record a final state and free the files nobody can use any more."""
        job.state, job.error, job.finished = state, error, time.time()
        folder = self.folder(job.id)
        for path in folder.iterdir() if folder.is_dir() else []:
            if path.name in ("job.json", "records.jsonl") or (state == SUCCEEDED and path.name == job.result_name):
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if job.id in self._jobs and folder.is_dir():
            self._save(job)
        else:
            shutil.rmtree(folder, ignore_errors=True)  # deleted while it ran

    # -- working ----------------------------------------------------------------------
    def _next(self) -> Job | None:
        with self._lock:
            while not self._stopping and not self._queue:
                self._lock.wait()
            if self._stopping:
                return None
            job = self._jobs[self._queue.popleft()]
            job.state, job.started = RUNNING, time.time()
            self._save(job)
            return job

    def _work(self, device: str) -> None:
        while (job := self._next()) is not None:
            job.device = device
            try:
                self._run(job, device)
            except Exception as error:  # noqa: BLE001 - one job's failure must not end the worker
                with self._lock:
                    self._processes.pop(job.id, None)
                    self._end(job, FAILED, f"the server could not run the job: {error}")

    def _command(self, job: Job, device: str) -> list[str]:
        folder = self.folder(job.id)
        command = [self.python, "-m", "repux", "segment", str(folder / job.input_name), "-o", str(folder / job.result_name)]
        command += ["--model", str(self.models[job.model]), "--device", device, "--progress", "jsonl"]
        if job.options.get("overlap") is not None:
            command += ["--overlap", repr(float(job.options["overlap"]))]
        if job.options.get("fast"):
            command.append("--fast")
        if job.options.get("modality"):
            command += ["--modality", str(job.options["modality"])]
        return command

    def _run(self, job: Job, device: str) -> None:
        folder = self.folder(job.id)
        cancel = self._cancel[job.id]
        stderr = open(folder / "stderr.log", "w+", encoding="utf-8")  # noqa: SIM115 - read back below
        try:
            with self._lock:
                if cancel.is_set():
                    self._end(job, CANCELLED, "cancelled")
                    return
                process = subprocess.Popen(
                    self._command(job, device),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    encoding="utf-8",
                    errors="replace",
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
                self._processes[job.id] = process
            timed_out = threading.Event()
            timer = threading.Timer(self.limits.job_time_limit_s, lambda: (timed_out.set(), _terminate(process)))
            timer.daemon = True
            timer.start()
            # Messages name the client's file, not the server's folder.
            names = {str(folder / job.input_name): job.filename, str(folder) + os.sep: ""}
            with open(folder / "records.jsonl", "a", encoding="utf-8") as log:
                for line in process.stdout:  # type: ignore[union-attr]
                    record = _record(line, names)
                    if record is None:
                        continue
                    with self._lock:
                        if job.id in self._records:  # else deleted while it runs
                            self._records[job.id].append(record)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            process.wait()
            timer.cancel()
            stderr.seek(0)
            tail = stderr.read().splitlines()[-STDERR_TAIL:]
        finally:
            stderr.close()
        with self._lock:
            self._processes.pop(job.id, None)
            if self._stopping and not cancel.is_set():
                # Ended by the server's shutdown, not by the user: run it again at the next start.
                job.state, job.started = QUEUED, None
                if job.id in self._jobs:
                    self._save(job)
                return
            records = self._records.get(job.id, [])
            error_record = next((r for r in reversed(records) if r.get("stage") == "error"), None)
            if cancel.is_set():
                self._end(job, CANCELLED, "cancelled")
            elif timed_out.is_set():
                self._end(job, FAILED, f"the job ran longer than the server's time limit ({self.limits.job_time_limit_s:g} s)")
            elif process.returncode == 0 and error_record is None and (folder / job.result_name).is_file():
                self._end(job, SUCCEEDED, None)
            else:
                self._end(job, FAILED, _error_text(error_record, tail, process.returncode, names))

    def _sweep_forever(self) -> None:
        while not self._stopping:
            self.sweep()
            time.sleep(min(60.0, max(self.limits.retention_s / 4, 0.5)))

    def sweep(self, now: float | None = None) -> None:
        """Delete the jobs that ended more than the retention time ago, with their files."""
        now = time.time() if now is None else now
        with self._lock:
            old = [j for j in self._jobs.values() if j.state in FINISHED and j.finished and now - j.finished > self.limits.retention_s]
        for job in old:
            self.delete(job)


def _record(line: str, names: dict[str, str]) -> dict[str, Any] | None:
    """A progress record of the job, with the server's folder taken out of its texts."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    # The client writes its own outputs; the server's paths are nobody's business.
    record.pop("outputs", None)
    return {key: _strip(value, names) for key, value in record.items()}


def _strip(value: Any, names: dict[str, str]) -> Any:
    """``value`` with each server path of ``names`` replaced by what the client calls it."""
    if isinstance(value, str):
        for path, shown in names.items():
            value = value.replace(path, shown)
        return value
    if isinstance(value, list):
        return [_strip(item, names) for item in value]
    return value


def _error_text(record: dict[str, Any] | None, stderr_tail: list[str], returncode: int, names: dict[str, str]) -> str:
    if record is not None and record.get("message"):
        return _strip(str(record["message"]), names)
    for line in reversed(stderr_tail):
        if ": error:" in line:
            return _strip(line.split(": error:", 1)[1].strip(), names)
    if returncode < 0:
        return f"the job process was killed by signal {-returncode} (out of memory?)"
    last = next((line for line in reversed(stderr_tail) if line.strip()), "no output")
    return f"the job process exited with code {returncode}: {_strip(last, names)}"


def _die_with_parent() -> None:
    """In the job process (Linux): receive SIGTERM when the server dies, so no job outlives it."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _terminate(process: subprocess.Popen, grace: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM to the job's process group, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
