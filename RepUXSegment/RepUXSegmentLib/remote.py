"""Segmenting on a ``repux serve`` server: a job with the same interface as :class:`.runner.ProcessJob`.

The HTTP work (upload, progress, download, cancel) runs in a background thread and needs
only the standard library (no torch in Slicer's process). As with a local job, progress
callbacks, the finishing step (which touches the scene) and the clean-up run in the thread
that calls :meth:`RemoteJob.poll`; :meth:`RemoteJob.cancel` returns at once and ``poll()``
reports the end.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repux.bundle.metadata import BundleMetadata
from repux.errors import InputError
from repux.serve.client import ServerClient, ServerError
from repux.serve.tokens import read_first_token

from .catalog import ModelEntry
from .runner import CANCELLED, FAILED, RUNNING, SUCCEEDED, ProcessJob

#: Keyword options a server job takes (the others are the server's to choose).
SERVER_OPTIONS = ("overlap", "fast", "modality")
#: The label-map format asked of the server (read back with the same reader as a local job's).
RESULT_SUFFIX = ".nrrd"


@dataclass(frozen=True)
class ServerSettings:
    """Where the server is and how to prove access: ``url`` (http(s)://HOST:PORT), ``token``,
    and ``cafile``, a certificate to trust for a server with a self-signed one."""

    url: str
    token: str
    cafile: str | None = None

    @classmethod
    def from_token_file(cls, url: str, token_file: str | os.PathLike, cafile: str | None = None) -> "ServerSettings":
        """Settings with the token read from the first line of ``token_file``."""
        return cls(url, read_first_token(token_file), cafile)

    def client(self, retry_s: float = 30.0) -> ServerClient:
        try:
            return ServerClient(self.url, self.token, cafile=self.cafile, timeout=30.0, retry_s=retry_s)
        except ValueError as error:
            raise InputError(str(error)) from None


def test_connection(settings: ServerSettings) -> dict[str, Any]:
    """The server's ``version``, ``devices``, ``limits`` and ``models`` (their catalog cards).

    Raises:
        InputError: no answer, or an error answer (401: the token is not accepted); the
            message names the server and the reason.
    """
    client = settings.client(retry_s=0.0)
    try:
        info = client.info()
        info["models"] = client.models()
    except ServerError as error:
        raise InputError(str(error)) from None
    return info


def model_entry(settings: ServerSettings, name: str) -> ModelEntry:
    """The catalog entry of a model the server serves (its labels with terminology, from its ``model.json``)."""
    answer = settings.client().model(name)
    metadata = BundleMetadata.from_json(answer["metadata"], f"{settings.url} model {name}")
    return ModelEntry(name, Path(name), "server", metadata)


class RemoteJob(ProcessJob):
    """A segmentation running on a server; the same attributes and methods as :class:`.runner.ProcessJob`.

    Args:
        settings: the server.
        input_path: the CT to upload (NRRD or NIfTI).
        output_path: where the label map is saved (atomically) when the job succeeds.
        model: the server's name of the model.
        options: ``overlap``, ``fast``, ``modality`` (see :data:`SERVER_OPTIONS`).
        finish, cleanup, progress, description: as for :class:`.runner.ProcessJob`.

    Attributes (besides ProcessJob's): ``entry``, the model's catalog entry as the server
    describes it (set before the upload); ``job_id``, the server's id once submitted.
    """

    def __init__(
        self,
        settings: ServerSettings,
        input_path: str | os.PathLike,
        output_path: str | os.PathLike,
        model: str,
        options: dict[str, Any] | None = None,
        *,
        finish: Callable[[], Any] | None = None,
        cleanup: Callable[[], None] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        description: str = "",
    ) -> None:
        # ProcessJob's state, without its process: everything here happens over HTTP.
        self._init_state([], description or f"repux segment on {settings.url}", finish, cleanup, progress)
        self.entry: ModelEntry | None = None
        self.job_id: str | None = None
        options = {key: value for key, value in (options or {}).items() if value is not None and value is not False}
        unknown = sorted(set(options) - set(SERVER_OPTIONS))
        if unknown:
            self._run_cleanup()
            raise InputError(f"options {unknown}: not available on a server; expected only {list(SERVER_OPTIONS)}")
        self.command = ["repux", "segment", str(input_path), "--server", settings.url, "--model", model]
        self.command += [f"--{key}={value}" for key, value in options.items()]
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._client = settings.client()
        thread = threading.Thread(
            target=self._talk, args=(settings, Path(input_path), Path(output_path), model, options), daemon=True
        )
        thread.start()

    @property
    def pid(self) -> None:
        """No local process: the work runs on the server."""
        return None

    # -- the background thread ----------------------------------------------------------
    def _talk(self, settings: ServerSettings, input_path: Path, output_path: Path, model: str, options: dict) -> None:
        try:
            self._events.put(("entry", model_entry(settings, model)))
            if self._cancel_requested:
                self._events.put(("end", (CANCELLED, "cancelled")))
                return
            job = self._client.submit(input_path, model, RESULT_SUFFIX, filename=input_path.name, **options)
            self.job_id = job["id"]
            self._events.put(("log", f"server job {self.job_id} on {self._client.url}"))
            for record in self._client.follow(self.job_id, should_stop=lambda: self._cancel_requested):
                self._events.put(("record", record))
            if self._cancel_requested:
                self._client.delete(self.job_id)  # stops the server's job and frees its files
                self._events.put(("end", (CANCELLED, "cancelled")))
                return
            status = self._client.status(self.job_id)
            if status["state"] != SUCCEEDED:
                self._events.put(("end", (FAILED, f"{self.description}: {status.get('error') or status['state']}")))
                return
            self._client.download(self.job_id, output_path, overwrite=True)
            self._client.delete(self.job_id)
            self._events.put(("end", (SUCCEEDED, None)))
        except Exception as error:  # noqa: BLE001 - whatever ends the exchange is the job's error, reported by poll()
            self._events.put(("end", (CANCELLED, "cancelled") if self._cancel_requested else (FAILED, f"{self.description}: {error}")))

    # -- the polling thread -------------------------------------------------------------
    def poll(self) -> bool:
        """Deliver pending progress; finish the job when the server's work has ended. True while running."""
        if self.state != RUNNING:
            return False
        while True:
            try:
                kind, value = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "entry":
                self.entry = value
            elif kind == "log":
                self.log.append(value)
            elif kind == "record":
                # Exactly what a local job does with the same line of its child's output.
                self._handle_line("out", json.dumps(value))
            else:
                self._end(*value)
                break
        return self.state == RUNNING

    def _end(self, state: str, error: str | None) -> None:
        try:
            if state == SUCCEEDED and self._finish is not None:
                try:
                    self.result = self._finish()
                except Exception as failure:  # noqa: BLE001 - any failure of the import step is the job's error
                    state, error = FAILED, f"{self.description}: {failure}"
            self.state, self.error = state, error
        finally:
            self._run_cleanup()

    def cancel(self, grace: float = 0.0) -> None:
        """Ask for the end of the job and return at once; :meth:`poll` reports ``cancelled``.

        The background thread stops following the job and deletes it on the server, which ends
        its process and removes its files. ``grace`` is unused (the server has its own).
        """
        if self.state == RUNNING:
            self._cancel_requested = True  # read by the background thread between requests
