"""``repux demo``: segment a fresh synthetic CT with the demo model and score it against its truth.

Writes, into the output folder: ``ct.nii.gz`` (the phantom CT), ``truth.nii.gz`` (its organ
labels), ``segmentation.nii.gz`` and ``segmentation.seg.nrrd`` (the model's labels; the
latter loads in 3D Slicer as a segmentation), ``overlay.png`` (axial, coronal and sagittal
slices through the organs' centre). Prints the Dice of every organ and ends with
``mean Dice: X.XXX`` (mean over the organs, background excluded).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from repux.errors import InputError
from repux.progress import PROGRESS_MODES

HELP = "segment a fresh synthetic CT with the demo model and print per-organ Dice against its truth"

#: Phantom seed of the demo. Training sets draw their case seeds at random from 0..2**31-1
#: (``write_phantom_dataset``, listed in their dataset.json); the demo model's list lacks 1000.
DEFAULT_SEED = 1000
DEFAULT_OUTPUT = "repux-demo"
FILES = {
    "ct": "ct.nii.gz",
    "truth": "truth.nii.gz",
    "labels": "segmentation.nii.gz",
    "segmentation": "segmentation.seg.nrrd",
    "overlay": "overlay.png",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", default=DEFAULT_OUTPUT, metavar="OUT_DIR", help=f"output folder (default ./{DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"phantom seed (default {DEFAULT_SEED}, not used in training)"
    )
    parser.add_argument(
        "--model", default="demo", metavar="BUNDLE", help="bundle folder, or 'demo' (default: the shipped demo model)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--progress", default="bar", choices=PROGRESS_MODES, help="bar, jsonl or none")
    parser.add_argument("--force", action="store_true", help="replace existing demo files")


def run(args: argparse.Namespace) -> int:
    from repux.options import check_device_name
    from repux.paths import check_writable

    out = Path(args.output)
    check_device_name(args.device)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; expected a folder for the demo's files")
    paths = {key: out / name for key, name in FILES.items()}
    for path in paths.values():
        check_writable(path)
    if not args.force:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing)}: already exist(s); refusing to overwrite (use --force)")

    import numpy as np

    from repux.bundle import load_bundle  # torch from here on
    from repux.data.phantoms import make_phantom
    from repux.imageio import write_volume
    from repux.infer import Segmenter
    from repux.infer.metrics import mean_dice, score_labels
    from repux.infer.overlay import render_overlay
    from repux.infer.writers import write_label_map
    from repux.progress import Progress

    progress = Progress(args.progress)
    bundle = load_bundle(args.model)
    if bundle.metadata.usage_warning:
        progress.warning(bundle.metadata.usage_warning)
    segmenter = Segmenter(bundle, device=args.device, progress=progress)

    progress.stage("phantom")
    image, truth = make_phantom(args.seed)
    prediction = segmenter.predict(image, source=f"phantom (seed {args.seed})")
    labels = prediction.labels
    write_volume(image, paths["ct"], overwrite=args.force)
    write_volume(truth, paths["truth"], overwrite=args.force)
    write_label_map(labels, paths["labels"], bundle.labels, overwrite=args.force)
    write_label_map(labels, paths["segmentation"], bundle.labels, overwrite=args.force)
    # The slices go through the centre of the true organs, whatever the model found.
    organs = np.argwhere(truth.array > 0)
    centre = (truth.affine @ np.append(organs.mean(axis=0), 1.0))[:3] if organs.size else None
    render_overlay(image, labels, bundle.labels, paths["overlay"], centre_ras=centre, overwrite=args.force)

    organ_labels = [(label.value, label.name) for label in bundle.labels if label.value != 0]
    scores = score_labels(labels, truth, organ_labels, "segmentation", "phantom truth", hausdorff=False)
    mean = mean_dice(scores)
    dice = {score.name: score.dice for score in scores}
    progress.finish("done", outputs=[str(p) for p in paths.values()], dice=dice, mean_dice=mean)
    if args.progress != "jsonl":
        print(f"phantom seed {args.seed}, model {bundle.metadata.name!r}; files in {out}/")
        for score in scores:
            shown = "absent" if math.isnan(score.dice) else f"{score.dice:.3f}"
            print(f"  {score.name:<20} Dice {shown}")
        print(f"mean Dice: {mean:.3f}")
    return 0
