"""Shared helpers of the server tests (no tests here): a real ``repux serve`` process on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from repux.serve.client import ServerClient, ServerError
from repux.serve.tokens import read_first_token

#: Seconds a server may take to answer /health after its start (torch import on a loaded machine).
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningServer:
    """A ``repux serve`` child process and where its token and work folder are."""

    process: subprocess.Popen
    url: str
    token_file: Path
    work_dir: Path
    log: Path
    cafile: str | None = None

    @property
    def token(self) -> str:
        return read_first_token(self.token_file)

    def client(self, token: str | None = None, retry_s: float = 5.0) -> ServerClient:
        return ServerClient(self.url, token or self.token, cafile=self.cafile, retry_s=retry_s)

    def job_files(self) -> list[Path]:
        """Every file under the work folder's jobs (uploads, results, records)."""
        return sorted(p for p in (self.work_dir / "jobs").rglob("*") if p.is_file())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def start_server(
    folder: Path,
    models: list[str],
    *options: str,
    port: int | None = None,
    cafile: str | None = None,
    env: dict[str, str] | None = None,
) -> RunningServer:
    """Start ``repux serve`` on 127.0.0.1 with its token file and work folder in ``folder``; wait until it answers.

    ``models``: for ``--models`` (none: the server's default). ``cafile``: the certificate to trust
    when ``options`` give ``--certfile`` (HTTPS). ``env``: extra environment variables.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    token_file, work_dir, log = folder / "tokens", folder / "work", folder / f"server-{port}-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "repux", "serve", "--port", str(port), "--token-file", str(token_file)]
    command += ["--work-dir", str(work_dir), "--device", "cpu", *(["--models", *models] if models else []), *options]
    with open(log, "w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    scheme = "https" if "--certfile" in options else "http"
    server = RunningServer(process, f"{scheme}://127.0.0.1:{port}", token_file, work_dir, log, cafile)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"repux serve exited with code {process.returncode}:\n{log.read_text(encoding='utf-8', errors='replace')}")
        try:
            if token_file.exists():
                ServerClient(server.url, "none", cafile=cafile).health()
                return server
        except ServerError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"repux serve did not answer within {START_TIMEOUT_S} s:\n{log.read_text(encoding='utf-8', errors='replace')}")


def job_processes(work_dir: Path) -> list[int]:
    """Ids of running processes whose command line names ``work_dir`` (the server's job processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if " segment " in command and str(work_dir) in command and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``condition()`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not met within {timeout} s")
