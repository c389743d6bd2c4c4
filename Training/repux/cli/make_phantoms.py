"""``repux make-phantoms N OUT_DIR``: write a dataset of synthetic abdominal CT phantoms."""

from __future__ import annotations

import argparse

from repux.progress import PROGRESS_HELP, PROGRESS_MODES

HELP = "write N synthetic abdominal CT phantoms with FLARE organ labels as an MSD-style dataset folder"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("n", type=int, metavar="N", help="number of phantoms")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed: the same seed, the same cases (default 0)")
    parser.add_argument(
        "--shape", type=int, nargs=3, metavar=("I", "J", "K"), help="voxels along i, j, k (default: the body's extent)"
    )
    parser.add_argument(
        "--spacing", type=float, nargs=3, metavar=("SI", "SJ", "SK"),
        help="mm along i, j, k (default: ~170-200 voxels across the body, 2-3 mm slices)",
    )  # fmt: skip
    parser.add_argument(
        "--orientation", metavar="CODE",
        help="axis code of every phantom, e.g. LPS, RAS, PIR (default: random per phantom)",
    )  # fmt: skip
    parser.add_argument("--no-oblique", action="store_true", help="axis-aligned grids only (no 2-10 degree tilt)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it is a phantom dataset this command wrote")
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="bar", help=PROGRESS_HELP)


def run(args: argparse.Namespace) -> int:
    from repux.data.phantoms import direction_from_code, write_phantom_dataset
    from repux.progress import Progress

    settings = {"oblique": not args.no_oblique}
    if args.shape:
        settings["shape"] = tuple(args.shape)
    if args.spacing:
        settings["spacing"] = tuple(args.spacing)
    if args.orientation:
        direction_from_code(args.orientation)  # refuse a bad code before any work
        settings["orientation"] = args.orientation.upper()
    progress = Progress(args.progress)
    out = write_phantom_dataset(
        args.n, args.out_dir, seed=args.seed, overwrite=args.force, progress=progress, **settings
    )
    progress.message(f"wrote {args.n} phantoms to {out}")
    progress.finish(output=str(out))
    return 0
