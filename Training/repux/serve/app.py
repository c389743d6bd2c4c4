"""The HTTP API of ``repux serve`` (FastAPI), version 1.

Every path but ``GET /health`` needs ``Authorization: Bearer TOKEN``; a job is visible to the
token that submitted it only. Errors are JSON ``{"error": MESSAGE}`` with 400 (bad request or
volume: the CLI's own message), 401, 404, 409 (not in a state for that), 413 (upload too
large), 429 (this token's queue is full), 503 (server full or stopping).

Uploads are raw request bodies (``Content-Type: application/octet-stream``) with the options
in the query string, so a client needs nothing but an HTTP library. The size is checked from
``Content-Length`` before a byte of the body is read, and again while it streams in.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from repux import __version__
from repux.errors import InputError
from repux.serve.jobs import FINISHED, QUEUED, RUNNING, SUCCEEDED, Job, JobManager
from repux.serve.tokens import TokenStore

API_VERSION = 1
#: Endings of an uploaded CT (one file; a detached NRRD header cannot travel alone).
INPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Endings of a result: Slicer segmentation or label map.
OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
_MODALITY = re.compile(r"^[A-Za-z]{1,16}$")
_SHOWN_NAME = re.compile(r"[^A-Za-z0-9._ -]")


class ApiError(Exception):
    """An error answer: HTTP ``status`` and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServedModel:
    """A model the server offers: its bundle folder, catalog card (without the server's path) and ``model.json``."""

    path: Path
    card: dict[str, Any]
    metadata: dict[str, Any]


def shown_name(filename: str) -> str:
    """The last part of a client's file name with odd characters replaced: for messages only."""
    last = re.split(r"[\\/]", filename or "")[-1]
    return _SHOWN_NAME.sub("_", last)[:200] or "upload"


def input_suffix(filename: str) -> str:
    lower = filename.lower()
    for suffix in INPUT_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise ApiError(400, f"{shown_name(filename)}: not a CT file name this server takes; expected one of {', '.join(INPUT_SUFFIXES)}")


def check_volume(path: Path, shown: str) -> None:
    """The checks ``repux segment`` makes on reading an input, with its messages naming ``shown``.

    Raises:
        ApiError: 400 with the CLI's message.
    """
    from repux.imageio import read_volume
    from repux.infer.preprocess import check_image

    try:
        check_image(read_volume(path), str(path))
    except InputError as error:
        raise ApiError(400, str(error).replace(str(path), shown)) from None


def create_app(manager: JobManager, tokens: TokenStore, models: dict[str, ServedModel]) -> FastAPI:
    """The API over ``manager``; ``tokens`` decide who may call it."""
    app = FastAPI(title="repux serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)

    @app.middleware("http")
    async def _require_token(request: Request, call_next):
        # Before routing and parameter checks: without a valid token, every path but /health
        # (unknown ones too) answers 401 and nothing about the API.
        if request.url.path != "/health":
            try:
                owner(request)
            except ApiError as error:
                return await _api_error(request, error)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=400)

    def owner(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = tokens.owner(token.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            raise ApiError(401, "missing or invalid token; send the header 'Authorization: Bearer TOKEN'")
        return found

    def owned_job(job_id: str, who: str = Depends(owner)) -> Job:
        job = manager.get(job_id, who)
        if job is None:
            raise ApiError(404, f"job {job_id[:40]}: no such job")
        return job

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    def info(_who: str = Depends(owner)) -> dict[str, Any]:
        limits = manager.limits
        return {
            "name": "repux",
            "version": __version__,
            "api": API_VERSION,
            "devices": manager.devices,
            "models": sorted(models),
            "limits": {
                "max_upload_bytes": limits.max_upload_bytes,
                "max_queued_per_token": limits.max_queued_per_token,
                "job_time_limit_s": limits.job_time_limit_s,
                "retention_s": limits.retention_s,
            },
            "jobs": manager.counts(),
            "input_suffixes": list(INPUT_SUFFIXES),
            "output_suffixes": list(OUTPUT_SUFFIXES),
        }

    @app.get("/v1/models")
    def list_models(_who: str = Depends(owner)) -> dict[str, Any]:
        return {"models": [models[name].card for name in sorted(models)]}

    @app.get("/v1/models/{name}")
    def model(name: str, _who: str = Depends(owner)) -> dict[str, Any]:
        """The card and the bundle's ``model.json`` (labels with terminology, for the client's import)."""
        if name not in models:
            raise ApiError(404, f"model {name[:80]!r}: not served here; expected one of {sorted(models)}")
        return {"card": models[name].card, "metadata": models[name].metadata}

    @app.post("/v1/jobs", status_code=201)
    async def submit(
        request: Request,
        model: str,
        filename: str,
        output: str = ".seg.nrrd",
        overlap: float | None = None,
        fast: bool = False,
        modality: str | None = None,
        who: str = Depends(owner),
    ) -> dict[str, Any]:
        # Everything that needs no body is checked before the body is read.
        if model not in models:
            raise ApiError(400, f"model {model[:80]!r}: not served here; expected one of {sorted(models)}")
        if output not in OUTPUT_SUFFIXES:
            raise ApiError(400, f"output {output[:40]!r}: expected one of {', '.join(OUTPUT_SUFFIXES)}")
        if overlap is not None and not 0.0 <= overlap < 1.0:
            raise ApiError(400, f"overlap {overlap}: expected a number in [0, 1)")
        if modality is not None and not _MODALITY.match(modality):
            raise ApiError(400, f"modality {modality[:40]!r}: expected a short name of letters (e.g. CT)")
        suffix = input_suffix(filename)
        shown = shown_name(filename)
        limit = manager.limits.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, f"{shown}: upload of {length} bytes is larger than this server takes ({limit} bytes)")
        refusal = manager.begin_upload(who)
        if refusal is not None:
            raise ApiError(*refusal)

        job_id, folder = manager.new_job_folder()
        job = Job(job_id, who, model, shown, suffix, output, {"overlap": overlap, "fast": fast, "modality": modality})
        try:
            try:
                await _receive(request, folder / job.input_name, limit, shown)
                await run_in_threadpool(check_volume, folder / job.input_name, shown)
            finally:
                manager.end_upload(who)
            refusal = manager.submit(job)  # the server may have begun stopping meanwhile
            if refusal is not None:
                raise ApiError(*refusal)
        except BaseException:
            await run_in_threadpool(_remove_tree, folder)
            raise
        return manager.status(job)

    @app.get("/v1/jobs")
    def list_jobs(who: str = Depends(owner)) -> dict[str, Any]:
        return {"jobs": [manager.status(job) for job in sorted(manager.owned(who), key=lambda j: j.created)]}

    @app.get("/v1/jobs/{job_id}")
    def status(job: Job = Depends(owned_job)) -> dict[str, Any]:
        return manager.status(job)

    @app.get("/v1/jobs/{job_id}/progress")
    def progress(since: int = 0, job: Job = Depends(owned_job)) -> dict[str, Any]:
        records = manager.records(job.id, since)
        return {"records": records, "next": max(since, 0) + len(records), "state": job.state, "error": job.error}

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202)
    def cancel(job: Job = Depends(owned_job)) -> dict[str, Any]:
        if job.state not in (QUEUED, RUNNING):
            raise ApiError(409, f"job {job.id}: already {job.state}; nothing to cancel")
        manager.cancel(job)
        return manager.status(job)

    @app.get("/v1/jobs/{job_id}/result")
    def result(job: Job = Depends(owned_job)) -> FileResponse:
        if job.state != SUCCEEDED:
            detail = f": {job.error}" if job.error else ""
            raise ApiError(409, f"job {job.id}: {job.state}{detail}; no result to download")
        path = manager.folder(job.id) / job.result_name
        if job.downloaded or not path.is_file():
            raise ApiError(404, f"job {job.id}: the result was downloaded already or has expired, and is deleted")
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=Path(job.filename).name.split(".")[0] + job.output_suffix,
            background=BackgroundTask(manager.result_downloaded, job),
        )

    @app.delete("/v1/jobs/{job_id}")
    def delete(job: Job = Depends(owned_job)) -> dict[str, Any]:
        state = job.state
        manager.delete(job)
        return {"id": job.id, "deleted": True, "was": state if state in FINISHED else "cancelled"}

    return app


async def _receive(request: Request, path: Path, limit: int, shown: str) -> None:
    """Stream the request body to ``path`` (mode 0600), stopping at ``limit`` bytes."""
    received = 0
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise ApiError(413, f"{shown}: upload is larger than this server takes ({limit} bytes)")
            stream.write(chunk)
    if received == 0:
        raise ApiError(400, f"{shown}: empty upload; expected the CT file as the request body")


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
