"""Shared helpers of the model-hub tests (no tests here): a loopback file server and a registry.

- :class:`CheckpointServer`: a real HTTP server on 127.0.0.1 (a thread) that serves byte
  strings by path (also as an HTTP proxy: absolute URLs are served by their path), honours ``Range: bytes=N-`` (206), and can misbehave per path: cut the
  first transfer half-way, answer with a web page, stall after a quarter, or trickle slowly.
- :func:`published_checkpoint`: a small network saved as the authors save theirs (a raw
  state_dict written with ``torch.save``), as bytes.
- :func:`write_registry`: a registry file in the shipped format whose URLs point at the server.
"""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: Widths of the served network: big enough to segment, small enough for a quick test.
SMALL_NETWORK = {"feat_size": [4, 8, 12, 16], "hidden_size": 16, "ks": 5}
SPACING_MM = [8.0, 8.0, 8.0]
PATCH = [32, 32, 32]

OK, CUT, HTML, STALL, SLOW = "ok", "cut", "html", "stall", "slow"


@dataclass
class Route:
    body: bytes
    behaviour: str = OK
    content_type: str = "application/octet-stream"
    served: int = 0  # transfers started


@dataclass
class CheckpointServer:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        server_state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                server_state.requests.append((self.path, self.headers.get("Range")))
                # As a proxy the server gets absolute URLs ("GET http://host/x.pth"): serve their path.
                path = "/" + self.path.split("/", 3)[3] if self.path.startswith("http://") else self.path
                route = server_state.routes.get(path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                route.served += 1
                if route.behaviour == HTML:
                    page = b"<!DOCTYPE html><html><body>Google Drive - quota exceeded</body></html>"
                    self._headers(200, "text/html; charset=utf-8", len(page))
                    self.wfile.write(page)
                    return
                start = 0
                range_header = self.headers.get("Range")
                if range_header and range_header.startswith("bytes="):
                    start = int(range_header[6:].split("-")[0])
                    if start >= len(route.body):
                        self.send_error(416, "Range Not Satisfiable")
                        return
                body = route.body[start:]
                status = 206 if start else 200
                extra = {"Content-Range": f"bytes {start}-{len(route.body) - 1}/{len(route.body)}"} if start else {}
                self._headers(status, route.content_type, len(body), extra)
                if route.behaviour == CUT and route.served == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if route.behaviour == STALL:
                    self.wfile.write(body[: len(body) // 4])
                    self.wfile.flush()
                    server_state.release.wait(60)
                    self.close_connection = True
                    return
                if route.behaviour == SLOW:
                    for offset in range(0, len(body), 4096):
                        if server_state.release.is_set():
                            break
                        self.wfile.write(body[offset : offset + 4096])
                        self.wfile.flush()
                        time.sleep(0.05)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_CONNECT(self) -> None:  # noqa: N802 - as an HTTPS proxy: record the tunnel asked for, refuse it
                server_state.requests.append((f"CONNECT {self.path}", None))
                self.send_error(403, "Forbidden by the test proxy")

            def _headers(self, status: int, content_type: str, length: int, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def small_network(arch: str = "repuxnet", out_chans: int = 5, seed: int = 0, **overrides: Any):
    import torch

    from repux.network import build_network

    torch.manual_seed(seed)
    widths = {**SMALL_NETWORK, **overrides}
    if arch != "repuxnet":
        widths.pop("ks")
    network = build_network(arch, in_chans=1, out_chans=out_chans, **widths)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):  # not the identity statistics of a fresh network
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.uniform_(-0.1, 0.1)
    return network.eval()


def published_checkpoint(network=None, extra: dict | None = None) -> bytes:
    """``torch.save(network.state_dict())`` as bytes (``extra``: more objects saved beside it)."""
    import torch

    network = network if network is not None else small_network()
    state = network.state_dict() if extra is None else {"state_dict": network.state_dict(), **extra}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def registry_entry(name: str, url: str, network=None, labels: str = "flare", **fields: Any) -> dict[str, Any]:
    """One registry entry in the shipped format for the served network."""
    network = network if network is not None else small_network()
    config = {key: value for key, value in network.config.items() if key != "arch"}
    config = json.loads(json.dumps(config))
    entry = {
        "name": name,
        "title": f"test model {name}",
        "architecture": network.config["arch"],
        "network": config,
        "labels": labels,
        "label_note": "",
        "modality": "CT",
        "preprocessing": {
            "spacing": SPACING_MM,
            "orientation": "RAS",
            "intensity": {"a_min": -125.0, "a_max": 275.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
            "patch_size": PATCH,
            "overlap": 0.5,
        },
        "source": {"url": url, "kind": "http", "page": "http://127.0.0.1/"},
        "size_bytes": None,
        "sha256": None,
        "reported_dice": None,
        "license": None,
        "license_note": "",
        "citation": "test",
        "importable": True,
    }
    entry.update(fields)
    return entry


def write_registry(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"format_version": 1, "models": entries}, indent=2))
    return path
