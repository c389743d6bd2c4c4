"""Fetching a published checkpoint into a resumable ``.part`` file (torch-free).

Plain HTTP(S) is done here with urllib: a ``Range`` request continues an interrupted
download, every connect and read waits at most ``timeout`` seconds, and the proxy
variables users set (``https_proxy``, ``http_proxy``, ``no_proxy``) apply as urllib reads
them. Google Drive is not a plain file server (confirmation pages for large files, quota
and sign-in pages, folders), so its URLs go through ``gdown`` in one thin call. Either way
the result is a file that :mod:`repux.hub.install` checks and imports; a web page where a
checkpoint was expected is refused here with the way round it (download in a browser,
then ``repux models import``).
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from repux import __version__
from repux.errors import InputError
from repux.hub.registry import PublishedModel
from repux.progress import Progress

#: Seconds to wait for a connection or for the next bytes (override: --timeout or this variable).
TIMEOUT_ENV = "REPUX_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
_CHUNK = 1 << 16
_REPORT_EVERY_S = 0.5


class DownloadError(InputError):
    """A download that failed or brought something other than the checkpoint."""


class WebPageError(DownloadError):
    """A web page (quota, sign-in, confirmation) where the checkpoint was expected."""


def default_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


def browser_advice(model: PublishedModel) -> str:
    return (
        f"Download it in a web browser from {model.url} (sign in if asked), "
        f"then run: repux models import {model.name} DOWNLOADED_FILE"
    )


def looks_like_web_page(head: bytes) -> bool:
    """True for the first bytes of an HTML/XML page (a quota, sign-in or confirmation page)."""
    # A checkpoint starts with "PK" (a zip, torch >= 1.6) or a pickle opcode, never with "<".
    return head.lstrip()[:1] == b"<"


def refuse_web_page(path: Path, model: PublishedModel, what: str) -> None:
    """Raise :class:`DownloadError` when ``path`` holds a web page instead of a checkpoint."""
    with open(path, "rb") as stream:
        head = stream.read(512)
    if looks_like_web_page(head):
        raise WebPageError(
            f"model {model.name}: {what} is a web page, not the checkpoint (a PyTorch .pth file was expected); "
            "file hosts show such pages for download quotas, sign-in or confirmation. " + browser_advice(model)
        )


def download(model: PublishedModel, part: Path, progress: Progress, timeout: float) -> Path:
    """Bring the checkpoint of ``model`` into ``part`` (continuing what is there); return ``part``.

    Raises:
        DownloadError: HTTP error, no connection, stalled for ``timeout`` s, cut short, or a
            web page instead of the file. A cut or stalled download stays in ``part`` for resuming.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    if model.source_kind == "http":
        return _download_http(model, part, progress, timeout)
    return _download_google_drive(model, part, progress, timeout)


def _download_http(model: PublishedModel, part: Path, progress: Progress, timeout: float) -> Path:
    url = model.url
    have = part.stat().st_size if part.exists() else 0
    if model.size_bytes is not None and have >= model.size_bytes:
        if have == model.size_bytes:
            return part
        part.unlink()  # longer than the file can be: start over
        have = 0
    headers = {"User-Agent": f"repux/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        # A new opener each time: its ProxyHandler reads the proxy variables as they are now.
        response = urllib.request.build_opener().open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:
            # The part is as long as the file or longer; the size and hash checks decide.
            return part
        raise DownloadError(
            f"model {model.name}: {url}: HTTP {error.code} {error.reason} (expected the checkpoint file). "
            + browser_advice(model)
        ) from None
    except TimeoutError:
        raise _stalled(model, part, timeout) from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise _stalled(model, part, timeout) from None
        raise DownloadError(
            f"model {model.name}: cannot reach {url}: {error.reason}; check the network connection and, behind a "
            "proxy, the https_proxy / http_proxy variables. " + browser_advice(model)
        ) from None
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range request: the body is the whole file
        if "html" in response.headers.get("Content-Type", "").lower():
            raise WebPageError(
                f"model {model.name}: {url} answered with a web page ({response.headers.get('Content-Type')}), "
                "not the checkpoint (a PyTorch .pth file was expected). " + browser_advice(model)
            )
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else model.size_bytes
        progress.stage(f"download {model.name}", total=total, done=have)
        done, reported = have, time.monotonic()
        with open(part, "ab" if have else "wb") as out:
            while True:
                try:
                    # read1: whatever has arrived, so a stall loses none of the bytes received.
                    chunk = response.read1(_CHUNK)
                except TimeoutError:
                    out.flush()
                    raise _stalled(model, part, timeout) from None
                except (http.client.HTTPException, ConnectionError):
                    break  # reported below as a cut transfer
                if not chunk:
                    break
                if done == 0 and looks_like_web_page(chunk[:512]):
                    raise WebPageError(
                        f"model {model.name}: {url} sent a web page, not the checkpoint "
                        "(a PyTorch .pth file was expected). " + browser_advice(model)
                    )
                out.write(chunk)
                done += len(chunk)
                if time.monotonic() - reported >= _REPORT_EVERY_S:
                    progress.update(done)
                    reported = time.monotonic()
        progress.update(done)
    if total is not None and done < total:
        raise DownloadError(
            f"model {model.name}: the connection closed after {done} of {total} bytes; the part is kept in "
            f"{part}: run the same command again to resume"
        )
    return part


def _stalled(model: PublishedModel, part: Path, timeout: float) -> DownloadError:
    kept = f"; the {part.stat().st_size} bytes received are kept in {part}" if part.exists() else ""
    return DownloadError(
        f"model {model.name}: no data from {model.url} for {timeout:g} s (timeout){kept}: run the same command "
        f"again to resume, or allow longer with --timeout or {TIMEOUT_ENV}"
    )


def _download_google_drive(model: PublishedModel, part: Path, progress: Progress, timeout: float) -> Path:
    """One call into gdown (file or folder); the folder's single ``.pth`` becomes ``part``."""
    import gdown

    started, reported = False, 0.0  # a file's bytes go through repux.progress (bar or jsonl)

    def report(done: int, total: int | None) -> None:
        nonlocal started, reported
        if not started:
            progress.stage(f"download {model.name}", total=total, done=done)
            started = True
        if time.monotonic() - reported >= _REPORT_EVERY_S or done == total:
            progress.update(done)
            reported = time.monotonic()

    try:
        if model.source_kind == "google-drive-folder":
            folder = part.with_suffix(".folder")
            progress.stage(f"download {model.name}")  # gdown's own bar shows the bytes of a folder
            files = gdown.download_folder(
                url=model.url, output=str(folder), quiet=progress.mode != "bar", resume=True, timeout=timeout
            )
            checkpoints = [Path(f) for f in files or [] if str(f).endswith((".pth", ".pt"))]
            if len(checkpoints) != 1:
                raise DownloadError(
                    f"model {model.name}: the folder {model.url} holds {len(checkpoints)} .pth files "
                    f"({', '.join(p.name for p in checkpoints) or 'none'}), expected exactly one. "
                    + browser_advice(model)
                )
            os.replace(checkpoints[0], part)
        else:
            gdown.download(url=model.url, output=str(part), quiet=True, resume=True, timeout=timeout, progress=report)
    except DownloadError:
        raise
    except (gdown.exceptions.FileURLRetrievalError, gdown.exceptions.DownloadError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DownloadError(
            f"model {model.name}: the download from Google Drive failed ({first_line}). " + browser_advice(model)
        ) from None
    return part
