"""``repux import-checkpoint``: turn a published RepUX-Net / 3D UX-Net ``.pth`` into a bundle folder."""

from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path

from repux.bundle.presets import LABEL_PRESETS

HELP = "import a published RepUX-Net / 3D UX-Net .pth checkpoint as a model bundle (weights-only loading)"

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="MODEL.pth", type=Path, help="the checkpoint (a state_dict)")
    parser.add_argument("--arch", required=True, choices=("repuxnet", "uxnet"), help="network architecture")
    parser.add_argument(
        "--labels",
        required=True,
        metavar="PRESET|LABELS.json",
        help=f"label preset ({', '.join(LABEL_PRESETS)}: flare = 3D UX-Net order 1 spleen 2 kidney 3 liver "
        "4 pancreas; flare21 = challenge order 1 liver 2 kidney 3 spleen 4 pancreas; amos = 15 organs) "
        'or a JSON label file {"labels": [{"value", "name", "color", "terminology"}, ...]}',
    )
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="BUNDLE", help="bundle folder to create")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    parser.add_argument(
        "--spacing",
        nargs=3,
        type=float,
        metavar=("X", "Y", "Z"),
        help="voxel spacing the model was trained at, mm, RAS order (default: FLARE 1.0 1.0 1.2, "
        "AMOS 1.5 1.5 2.0; required with a label file)",
    )
    parser.add_argument(
        "--patch-size",
        nargs="+",
        type=int,
        metavar="N",
        default=[96],
        help="sliding-window size in voxels: one side for a cube, or three (multiples of 16; default 96)",
    )
    parser.add_argument("--name", help="model name (default: the checkpoint's file name without its ending)")
    parser.add_argument("--description", default="", help="free text stored in model.json")
    parser.add_argument(
        "--float16", action="store_true", help="store the weights as float16 (half the size; read back as float32)"
    )


def _command_line(args: argparse.Namespace) -> str:
    """The command as a user would retype it, recorded in the bundle's provenance."""
    words = ["repux", "import-checkpoint", str(args.checkpoint), "--arch", args.arch, "--labels", args.labels]
    words += ["-o", str(args.output)]
    if args.spacing:
        words += ["--spacing", *map(str, args.spacing)]
    words += ["--patch-size", *map(str, args.patch_size)]
    for flag, value in (("--name", args.name), ("--description", args.description)):
        if value:
            words += [flag, value]
    words += [flag for flag, on in (("--float16", args.float16), ("--force", args.force)) if on]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    from repux.bundle import PRESET_SPACING, import_checkpoint, label_preset, labels_from_json
    from repux.errors import InputError

    if args.labels in LABEL_PRESETS:
        labels = label_preset(args.labels)
        spacing = args.spacing or PRESET_SPACING[args.labels]
    elif Path(args.labels).is_file():
        labels = labels_from_json(args.labels)
        if not args.spacing:
            raise InputError(
                f"--spacing is required with the label file {args.labels} "
                "(the voxel spacing in mm the model was trained at; there is no preset default)"
            )
        spacing = args.spacing
    else:
        raise InputError(
            f"--labels {args.labels}: expected a preset ({', '.join(LABEL_PRESETS)}) or a JSON label file; "
            "no such preset or file"
        )
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        raise InputError(f"--spacing {' '.join(map(str, spacing))}: expected 3 positive numbers (mm)")
    if len(args.patch_size) not in (1, 3) or any(p <= 0 or p % 16 for p in args.patch_size):
        raise InputError(
            f"--patch-size {' '.join(map(str, args.patch_size))}: expected 1 or 3 positive multiples of 16"
        )
    patch_size = args.patch_size * 3 if len(args.patch_size) == 1 else args.patch_size

    out = import_checkpoint(
        args.checkpoint,
        args.arch,
        labels,
        args.output,
        spacing=spacing,
        patch_size=patch_size,
        name=args.name,
        description=args.description,
        command=_command_line(args),
        force=args.force,
        weights_dtype="float16" if args.float16 else "float32",
    )
    print(f"wrote bundle {out} ({len(labels)} labels, {args.arch})")
    return 0
