"""A client of ``repux serve`` that needs only the Python standard library (Slicer's GUI process uses it).

:class:`ServerClient` is one method per API call; errors are :class:`ServerError` with the
server's own message. :func:`segment_on_server` is ``repux segment --server``: the same cases,
outputs and progress records as a local run, computed by the server.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from repux.atomic import atomic_path

if TYPE_CHECKING:
    import argparse

    from repux.progress import Progress

#: Job states after which nothing changes any more.
FINISHED_STATES = ("succeeded", "failed", "cancelled", "lost")
#: Seconds between two progress requests while a job runs.
POLL_INTERVAL_S = 0.5
_CHUNK = 1 << 20


class ServerError(RuntimeError):
    """An error answer of the server (``status``: HTTP code) or no answer at all (``status`` None).

    ``detail``: the server's own message (for a bad volume: the CLI's message, naming the upload).
    """

    def __init__(self, message: str, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status, self.detail = status, detail


class ServerClient:
    """Calls to one server.

    Args:
        url: ``http://host:port`` or ``https://host:port``.
        token: the access token (sent as ``Authorization: Bearer``).
        cafile: certificate (PEM) to trust for HTTPS, e.g. the server's own self-signed one.
        timeout: seconds one request may take (a download of a large result: per read).
        retry_s: seconds a status request keeps retrying an unreachable server before giving up.
    """

    def __init__(
        self, url: str, token: str, cafile: str | None = None, timeout: float = 60.0, retry_s: float = 30.0
    ) -> None:
        parsed = urllib.parse.urlsplit(url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"server URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url = f"{parsed.scheme}://{parsed.netloc}"
        self.token = token
        self.timeout = timeout
        self.retry_s = retry_s
        self._https = parsed.scheme == "https"
        self._host, self._port = parsed.hostname, parsed.port
        self._context = ssl.create_default_context(cafile=cafile) if self._https else None

    # -- transport --------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout, context=self._context)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _open(
        self, method: str, path: str, query: dict[str, Any] | None = None, body: BinaryIO | None = None, length: int = 0
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request; return the connection and a successful response (else raise ServerError)."""
        if query:
            path += "?" + urllib.parse.urlencode({k: _query_value(v) for k, v in query.items() if v is not None})
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(length)})
        connection = self._connection()
        try:
            try:
                connection.request(method, path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                if body is None:
                    raise
                # The server may refuse an upload (413, 401) before reading it; its answer is waiting.
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ServerError(f"{self.url}: no answer ({_reason(error)}); is the server running and reachable?") from None
        if response.status >= 400:
            raw = response.read()
            connection.close()
            try:
                message = json.loads(raw).get("error") or raw.decode("utf-8", "replace")
            except (ValueError, AttributeError):
                message = raw.decode("utf-8", "replace")[:500] or response.reason
            raise ServerError(f"{self.url}: {message} (HTTP {response.status})", response.status, message)
        return connection, response

    def _json(self, method: str, path: str, query: dict[str, Any] | None = None, retry: bool = False) -> dict[str, Any]:
        deadline = time.monotonic() + (self.retry_s if retry else 0.0)
        while True:
            try:
                connection, response = self._open(method, path, query)
                break
            except ServerError as error:
                if error.status is not None or time.monotonic() >= deadline:
                    if error.status is None and retry:
                        raise ServerError(f"{error} (no answer for {self.retry_s:g} s)") from None
                    raise
                time.sleep(1.0)
        try:
            return json.loads(response.read())
        finally:
            connection.close()

    # -- the API ----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def info(self) -> dict[str, Any]:
        """Server name, version, devices, model names and limits."""
        return self._json("GET", "/v1/info")

    def models(self) -> list[dict[str, Any]]:
        """The catalog cards of the served models."""
        return self._json("GET", "/v1/models")["models"]

    def model(self, name: str) -> dict[str, Any]:
        """``{"card": ..., "metadata": ...}`` of one served model (``metadata``: its ``model.json``)."""
        return self._json("GET", f"/v1/models/{_quote(name)}")

    def submit(self, path: str | os.PathLike, model: str, output: str = ".seg.nrrd", filename: str | None = None, **options: Any) -> dict[str, Any]:
        """Upload the CT at ``path`` and queue a job; return its status (``id``, ``state``, ...)."""
        path = Path(path)
        query = {"model": model, "output": output, "filename": filename or path.name, **options}
        with open(path, "rb") as body:
            connection, response = self._open("POST", "/v1/jobs", query, body, path.stat().st_size)
        try:
            return json.loads(response.read())
        finally:
            connection.close()

    def status(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{_quote(job_id)}", retry=True)

    def progress(self, job_id: str, since: int = 0) -> dict[str, Any]:
        """Records from index ``since`` on, ``next`` (the index to ask from next), ``state`` and ``error``."""
        return self._json("GET", f"/v1/jobs/{_quote(job_id)}/progress", {"since": since}, retry=True)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{_quote(job_id)}/cancel")

    def delete(self, job_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/jobs/{_quote(job_id)}")

    def download(self, job_id: str, destination: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save the job's result at ``destination``, atomically (no partial file on a broken transfer)."""
        with atomic_path(destination, overwrite=overwrite) as tmp:
            connection, response = self._open("GET", f"/v1/jobs/{_quote(job_id)}/result")
            try:
                expected = int(response.getheader("Content-Length") or -1)
                with open(tmp, "wb") as stream:
                    shutil.copyfileobj(response, stream, _CHUNK)
                    received = stream.tell()
            except (OSError, http.client.HTTPException) as error:
                raise ServerError(f"{self.url}: download of job {job_id} broke off ({_reason(error)})") from None
            finally:
                connection.close()
            if expected >= 0 and received != expected:
                raise ServerError(f"{self.url}: download of job {job_id} broke off after {received} of {expected} bytes")
        return Path(destination)

    def follow(self, job_id: str, should_stop: Callable[[], bool] = lambda: False) -> Iterator[dict[str, Any]]:
        """Yield the job's progress records as they come; end when the job has finished (or ``should_stop()``)."""
        since = 0
        while True:
            answer = self.progress(job_id, since)
            since = answer["next"]
            yield from answer["records"]
            if answer["state"] in FINISHED_STATES or should_stop():
                return
            time.sleep(POLL_INTERVAL_S)


def _query_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _quote(text: str) -> str:
    return urllib.parse.quote(str(text), safe="")


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


# -- repux segment --server -----------------------------------------------------------
def segment_on_server(args: "argparse.Namespace", progress: "Progress") -> int:
    """``repux segment`` with the work done by ``args.server``: same cases, outputs and records.

    Raises:
        InputError: an option the server cannot honour, or a case that failed (its message).
    """
    from repux.cli.segment import finish_batch, plan_cases, record_failure
    from repux.errors import InputError
    from repux.infer.writers import LABEL_SUFFIXES, output_suffix
    from repux.options import DEFAULT_WINDOWS
    from repux.serve.tokens import read_first_token

    local_only = ("probabilities", "volumes", "plain_network", "confidence", "entropy", "review", "roi", "update")
    unsupported = [f"--{name.replace('_', '-')}" for name in local_only if getattr(args, name)]
    if args.device != "auto":
        unsupported.append("--device")
    if args.tta != "none":
        unsupported.append("--tta")
    if getattr(args, "windows", DEFAULT_WINDOWS) != DEFAULT_WINDOWS:
        unsupported.append("--windows")
    if unsupported:
        raise InputError(f"{', '.join(unsupported)}: not available with --server (the server chooses its device and outputs)")
    if not args.token_file:
        raise InputError("--server: needs --token-file FILE (the server's token on its first line)")
    client = ServerClient(args.server, read_first_token(args.token_file), cafile=args.server_cafile, retry_s=args.server_timeout)
    cases, single_file = plan_cases(args)
    if single_file and not args.force and cases[0].labels.exists():
        raise FileExistsError(f"{cases[0].labels}: already exists; refusing to overwrite it (use --force)")
    try:
        limit = client.info()["limits"]["max_upload_bytes"]
    except ServerError as error:
        raise InputError(str(error)) from None

    written, skipped, failed = [], [], []
    for index, case in enumerate(cases, start=1):
        if case.labels.exists() and not args.force:
            skipped.append(case.name)
            progress.message(f"skipped {case.name}: {case.labels} exists", case=case.name, skipped=True)
            continue
        progress.message(f"case {index}/{len(cases)}: {case.name} (on {client.url})", case=case.name, index=index, cases=len(cases))
        try:
            _segment_case(client, case.image, case.labels, output_suffix(case.labels, LABEL_SUFFIXES), args, progress, limit)
        except ServerError as error:
            raise InputError(str(error)) from None  # the server is gone or refuses: no case can be done
        except InputError as error:
            if single_file:
                raise
            record_failure(progress, case.name, str(error), failed)
            continue
        written.append(str(case.labels))
        progress.message(f"wrote {case.labels}", case=case.name, output=str(case.labels))
    return finish_batch(progress, len(cases), written, skipped, failed)


def _segment_case(client: ServerClient, image: Path, output: Path, suffix: str, args, progress: "Progress", limit: int) -> None:
    import tempfile

    from repux.errors import InputError
    from repux.imageio import read_volume, volume_suffix, write_volume

    options = {"overlap": args.overlap, "fast": args.fast or None, "modality": args.modality}
    with tempfile.TemporaryDirectory(prefix="repux-upload-") as folder:
        upload = image
        if not image.is_file() or volume_suffix(image) not in (".nii.gz", ".nii", ".nrrd", ".mha"):
            # DICOM folders and detached headers travel as one NRRD file.
            upload = write_volume(read_volume(image), Path(folder) / "input.nrrd")
        size = upload.stat().st_size
        if size > limit:
            raise ServerError(f"{image}: {size} bytes is more than the server takes ({limit} bytes)", 413)
        try:
            job = client.submit(upload, args.model, suffix, filename=upload.name, **options)
        except ServerError as error:
            if error.status == 400 and error.detail:
                raise InputError(_local_names(error.detail, upload.name, image)) from None
            raise
    job_id = job["id"]
    try:
        for record in client.follow(job_id):
            # The server's case header, file names and final record are replaced by the local ones.
            if record.get("stage") != "done" and not {"output", "cases"} & record.keys():
                progress.replay(record)
        status = client.status(job_id)
        if status["state"] == "failed":
            raise InputError(_local_names(status.get("error") or "failed", upload.name, image))
        if status["state"] != "succeeded":
            raise ServerError(f"{client.url}: job {job_id} for {image} {status['state']}: {status.get('error')}")
        client.download(job_id, output, overwrite=args.force)
    except KeyboardInterrupt:
        _forget(client, job_id)
        raise
    _forget(client, job_id)


def _local_names(message: str, uploaded: str, image: Path) -> str:
    """The server's message about the upload named as the local CLI would name it (the input's path)."""
    return message.replace(uploaded, str(image))


def _forget(client: ServerClient, job_id: str) -> None:
    """Delete the job on the server (cancelling it if it still runs); a server that is gone has nothing to delete."""
    try:
        client.delete(job_id)
    except ServerError:
        pass
