"""``repux models``: the published models: list, pull (download), import a file, remove, verify, check labels.

Models live in one folder shared with the Slicer module (``$REPUX_MODELS_DIR``, else
``~/.repux/models``; see :mod:`repux.hub.folders`). ``check`` exits 1 when the labels
contradict the anatomy; every refusal exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from repux.hub.folders import MODELS_DIR_ENV
from repux.progress import PROGRESS_MODES

HELP = "published models: list, pull (download), import a downloaded file, remove, verify, check label order"

ACTIONS = ("list", "pull", "import", "remove", "verify", "check")


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--models-dir",
            type=Path,
            metavar="DIR",
            help=f"the models folder (default: ${MODELS_DIR_ENV}, else ~/.repux/models; the variable wins)",
        )
        return sub

    listing = action("list", "published, shipped and installed models with their state")
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")

    pull = action("pull", "download a published model once, check it and install it as a bundle")
    pull.add_argument("name", metavar="NAME", help="a model of the registry (see repux models list)")
    pull.add_argument("--timeout", type=float, metavar="S", help="seconds without data before giving up (default 60)")
    pull.add_argument("--force", action="store_true", help="download and install again over an installed copy")
    _labels_option(pull)
    _progress_option(pull)

    imported = action("import", "install a checkpoint file downloaded by hand (e.g. on another computer)")
    imported.add_argument("name", metavar="NAME", help="the registry model the file is")
    imported.add_argument("file", type=Path, metavar="FILE", help="the downloaded .pth file (left where it is)")
    imported.add_argument("--force", action="store_true", help="replace an installed copy")
    _labels_option(imported)
    _progress_option(imported)

    removed = action("remove", "delete an installed model (and any partial download of it)")
    removed.add_argument("name", metavar="NAME")

    verified = action("verify", "check an installed model's files and its agreement with the registry")
    verified.add_argument("name", metavar="NAME")

    check = action("check", "segment a CT and check the label order against abdominal anatomy (exit 1: swapped)")
    check.add_argument("name", metavar="NAME", help="an installed or shipped model, or a bundle folder")
    check.add_argument("ct", type=Path, metavar="CT", help="an abdominal CT (.nii.gz, .nrrd, .mha, DICOM folder)")
    check.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    _progress_option(check)


def _labels_option(parser: argparse.ArgumentParser) -> None:
    from repux.bundle.presets import LABEL_PRESETS

    parser.add_argument(
        "--labels",
        choices=LABEL_PRESETS,
        help="label order instead of the registry's (e.g. flare21 when 'repux models check' finds liver "
        "and spleen swapped)",
    )


def _progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        default="bar",
        choices=PROGRESS_MODES,
        help="bar (terminal), jsonl (one JSON object per line) or none",
    )


def run(args: argparse.Namespace) -> int:
    from repux.hub.folders import models_dir

    folder = models_dir(args.models_dir)
    if args.action in ("list", "remove", "verify"):
        return {"list": _list, "remove": _remove, "verify": _verify}[args.action](args, folder)
    from repux.progress import Progress

    progress = Progress(args.progress)
    with progress.reporting_outcome():
        code = {"pull": _pull, "import": _import, "check": _check}[args.action](args, folder, progress)
        progress.finish()
    return code


def _list(args: argparse.Namespace, folder: Path) -> int:
    from repux.hub.listing import model_rows

    rows = model_rows(folder)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("name", "architecture", "modality", "state", "size", "source")
    widths = {c: max([len(c)] + [len(str(row[c])) for row in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
    print(f"models folder: {folder}")
    return 0


def _registry_model(name: str):
    from repux.hub.registry import load_registry

    return load_registry().get(name)


def _pull(args: argparse.Namespace, folder: Path, progress) -> int:
    from repux.errors import InputError
    from repux.hub.download import default_timeout
    from repux.hub.install import pull

    if args.timeout is not None and not args.timeout > 0:
        raise InputError(f"--timeout {args.timeout}: expected a positive number of seconds")
    model = _registry_model(args.name)
    how = _command(["repux", "models", "pull", model.name], args)
    bundle = pull(model, folder, progress, args.timeout or default_timeout(), args.force, args.labels, how)
    print(f"{model.name}: installed in {bundle}", file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    return 0


def _import(args: argparse.Namespace, folder: Path, progress) -> int:
    from repux.hub.install import install_file

    model = _registry_model(args.name)
    how = _command(["repux", "models", "import", model.name, str(args.file)], args)
    bundle = install_file(model, args.file, folder, progress, how=how, force=args.force, labels=args.labels)
    print(f"{model.name}: installed in {bundle}", file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    return 0


def _command(words: list[str], args: argparse.Namespace) -> str:
    """The command as a user would retype it, for the bundle's provenance."""
    import shlex

    if args.labels:
        words += ["--labels", args.labels]
    return shlex.join(words + (["--force"] if args.force else []))


def _remove(args: argparse.Namespace, folder: Path) -> int:
    from repux.hub.install import remove

    print(f"{args.name}: removed {remove(args.name, folder)}")
    return 0


def _verify(args: argparse.Namespace, folder: Path) -> int:
    from repux.hub.install import verify
    from repux.hub.registry import load_registry

    registry = load_registry()
    model = registry.get(args.name) if args.name in registry.names() else None
    for line in verify(args.name, folder, model):
        print(line)
    if model is None:
        print(f"{args.name}: not in the registry; checked as a bundle only")
    return 0


def _check(args: argparse.Namespace, folder: Path, progress) -> int:
    from repux.bundle import LABEL_PRESETS, SHIPPED_MODELS_DIR, label_preset, load_bundle
    from repux.errors import InputError
    from repux.hub.label_check import check_labels
    from repux.imageio import read_volume
    from repux.infer.engine import Segmenter

    installed = folder / args.name
    if (installed / "model.json").is_file():
        bundle = load_bundle(installed)
    elif Path(args.name).exists() or (SHIPPED_MODELS_DIR / args.name).exists():
        bundle = load_bundle(args.name)
    else:
        raise InputError(
            f"model {args.name}: not installed in {folder} and not a bundle folder; "
            f"install it first (repux models pull {args.name}) or pass a bundle folder"
        )
    ct = read_volume(args.ct)
    labels = Segmenter(bundle, device=args.device, progress=progress).segment(ct, source=str(args.ct))
    result = check_labels(labels, bundle.labels, ct)
    out = sys.stderr if args.progress == "jsonl" else sys.stdout
    print(f"{args.name} on {args.ct}:", file=out)
    print(result.report(), file=out)
    if result.fixed_names is not None:
        matching = [p for p in LABEL_PRESETS if [label.name for label in label_preset(p)] == result.fixed_names]
        if matching:
            print(
                f"the label order of preset {matching[0]!r} fits this CT: import the checkpoint with --labels {matching[0]}",
                file=out,
            )
    if args.progress == "jsonl":
        progress.message(
            "label check", consistent=result.consistent, swapped=[[a.name, b.name] for a, b in result.swaps]
        )
    return 0 if result.consistent else 1
