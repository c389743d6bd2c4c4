"""``repux serve``: an HTTP server that segments CTs for clients (Slicer, ``repux segment --server``).

Access needs a token from ``--token-file`` (created with one random token at the first start,
readable by its owner only). Without ``--certfile``/``--keyfile`` the server listens on this
computer only (127.0.0.1) unless ``--host`` names another address; reach it through an SSH
tunnel, or give it a certificate.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from repux.errors import InputError
from repux.serve.tokens import DEFAULT_TOKEN_FILE

HELP = "serve segmentation over HTTP(S) to Slicer and 'repux segment --server': tokens, a job queue, one worker per GPU"

DEFAULT_PORT = 8765
DEFAULT_WORK_DIR = Path("~/.repux/server-work")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="models to serve: names in the models folder or shipped, or bundle folders "
        "(default: every shipped and installed model, as 'repux models list' shows them)",
    )
    parser.add_argument(
        "--device",
        action="append",
        metavar="DEVICE",
        help="a device to run jobs on, one job at a time each (repeat for several: --device cuda:0 --device cuda:1); "
        "default: every CUDA GPU, else the CPU",
    )
    parser.add_argument("--certfile", help="TLS certificate (PEM): serve HTTPS")
    parser.add_argument("--keyfile", help="TLS private key (PEM) of --certfile")
    parser.add_argument(
        "--token-file", default=str(DEFAULT_TOKEN_FILE), metavar="PATH", help=f"accepted tokens, one per line (default {DEFAULT_TOKEN_FILE})"
    )
    parser.add_argument("--add-token", action="store_true", help="add a new random token to --token-file, print it and exit")
    parser.add_argument("--revoke-token", metavar="TOKEN", help="remove TOKEN from --token-file and exit")
    parser.add_argument(
        "--work-dir", default=str(DEFAULT_WORK_DIR), metavar="DIR", help=f"private folder for uploads and results (default {DEFAULT_WORK_DIR})"
    )
    parser.add_argument("--max-upload-mb", type=float, default=2048, help="largest upload accepted, MiB (default 2048)")
    parser.add_argument("--max-queued", type=int, default=4, help="jobs one token may have queued or running (default 4)")
    parser.add_argument("--max-jobs", type=int, default=64, help="jobs queued or running in all (default 64)")
    parser.add_argument("--job-time-limit", type=float, default=3600, metavar="S", help="seconds a job may run (default 3600)")
    parser.add_argument(
        "--retention", type=float, default=3600, metavar="S", help="seconds a finished job's result is kept if not downloaded (default 3600)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _devices(requested: list[str] | None) -> list[str]:
    if requested:
        return requested
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{index}" for index in range(count)] or ["cpu"]


def _model_folders(names: list[str] | None) -> list[tuple[str, Path, str]]:
    """(served name, bundle folder, source) of each model: those named, or every shipped and installed one."""
    from repux.hub.folders import models_dir
    from repux.hub.listing import bundle_folders, shipped_models_dir

    shipped, installed = shipped_models_dir(), models_dir()
    if names is None:
        found = {path.name: (path, "shipped") for path in bundle_folders(shipped)}
        for path in bundle_folders(installed):
            found.setdefault(path.name, (path, "installed"))
        return [(name, path, source) for name, (path, source) in found.items()]
    chosen = []
    for name in names:
        looks = [(Path(name).expanduser(), "server")]
        if Path(name).name == name:  # a plain name: the models folder, then the shipped models, then ./name
            looks = [(installed / name, "installed"), *([(shipped / name, "shipped")] if shipped else []), *looks]
        match = next(((folder, source) for folder, source in looks if (folder / "model.json").is_file()), None)
        if match is None:
            raise InputError(
                f"--models {name}: not a model in {installed}, not shipped, and not a bundle folder with model.json"
            )
        folder, source = match
        chosen.append((name if source != "server" else folder.resolve().name, folder.resolve(), source))
    return chosen


def _served_models(names: list[str] | None) -> dict:
    from repux.bundle import load_bundle
    from repux.bundle.card import model_card
    from repux.serve.app import ServedModel

    served = {}
    for name, folder, source in _model_folders(names):
        try:
            bundle = load_bundle(folder)
        except InputError as error:
            if names is not None:
                raise
            print(f"repux serve: not serving {folder}: {error}", file=sys.stderr, flush=True)
            continue
        if name in served:
            raise InputError(f"--models: two models named {name!r}; expected distinct folder names")
        card = model_card(name, folder, source, bundle.metadata)
        card.pop("path")  # the server's folders are not the client's business
        served[name] = ServedModel(folder, card, bundle.metadata.to_json())
    if not served:
        raise InputError("no model to serve: install one ('repux models pull NAME') or name bundle folders with --models")
    return served


def run(args: argparse.Namespace) -> int:
    from repux.serve.tokens import TokenStore

    tokens = TokenStore(args.token_file)
    if args.add_token:
        print(tokens.add())
        print(f"added to {tokens.path}; clients send it as 'Authorization: Bearer TOKEN'", file=sys.stderr)
        return 0
    if args.revoke_token:
        tokens.revoke(args.revoke_token)
        print(f"revoked; {tokens.path} lists {len(tokens.tokens())} token(s); a running server applies this at once", file=sys.stderr)
        return 0
    if bool(args.certfile) != bool(args.keyfile):
        raise InputError("--certfile and --keyfile: give both for HTTPS, or neither")
    for option in ("certfile", "keyfile"):
        value = getattr(args, option)
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"--{option} {value}: no such file")
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: expected 1..65535")
    if min(args.max_upload_mb, args.max_queued, args.max_jobs, args.job_time_limit, args.retention) <= 0:
        raise InputError("--max-upload-mb, --max-queued, --max-jobs, --job-time-limit, --retention: expected positive values")

    created = tokens.ensure()
    if created is not None:
        print(
            f"repux serve: created {tokens.path} with a new access token (shown once):\n\n    {created}\n\n"
            f"Clients send it as 'Authorization: Bearer TOKEN': in Slicer paste it into the module's server token, "
            f"or copy the file and use 'repux segment --server URL --token-file FILE'.",
            file=sys.stderr,
            flush=True,
        )
    if not args.certfile and not _is_loopback(args.host):
        print(
            f"repux serve: WARNING: listening on {args.host} without TLS: tokens and CTs cross the network unencrypted. "
            "Give --certfile/--keyfile, or keep the default 127.0.0.1 and connect through an SSH tunnel.",
            file=sys.stderr,
            flush=True,
        )
    return _serve(args, tokens)


def _serve(args: argparse.Namespace, tokens) -> int:
    import uvicorn

    from repux.serve.app import create_app
    from repux.serve.jobs import JobManager, Limits

    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 1024**2),
        max_queued_per_token=args.max_queued,
        max_jobs=args.max_jobs,
        job_time_limit_s=args.job_time_limit,
        retention_s=args.retention,
    )
    models = _served_models(args.models)
    import repux.infer.preprocess  # noqa: F401 - the upload checks' imports, before the first upload waits for them
    work_dir = Path(args.work_dir).expanduser()
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    manager = JobManager(work_dir, {name: m.path for name, m in models.items()}, _devices(args.device), limits)
    for note in manager.start():
        print(f"repux serve: {note}", file=sys.stderr, flush=True)
    scheme = "https" if args.certfile else "http"
    print(
        f"repux serve: {scheme}://{args.host}:{args.port} · models {', '.join(models)} · devices {', '.join(manager.devices)}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        create_app(manager, tokens, models),
        host=args.host,
        port=args.port,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="warning",
        access_log=False,  # no request lines (they name jobs) in the server's output
        server_header=False,
    )
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM: the normal way to stop a server
    finally:
        manager.stop()
    print(f"repux serve: stopped; {manager.counts()['queued']} queued job(s) will run after the next start", file=sys.stderr)
    return 0
