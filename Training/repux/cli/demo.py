"""``repux demo``: segment a fresh synthetic CT with the demo model and score it against its truth.

Writes, into the output folder: ``ct.nii.gz`` (the phantom CT), ``truth.nii.gz`` (its organ
labels), ``segmentation.nii.gz`` and ``segmentation.seg.nrrd`` (the model's labels; the
latter loads in 3D Slicer as a segmentation), ``overlay.png`` (axial, coronal and sagittal
slices through the organs' centre), ``demo.json`` (seed, model and Dice). Prints the Dice
of every organ and ends with ``mean Dice: X.XXX`` (mean over the organs, background excluded).

Run again into its own folder (one that holds the demo's files and nothing else), the
demo replaces its files without asking; files of any other origin need ``--force``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from repux.errors import InputError
from repux.options import DEVICE_HELP
from repux.progress import PROGRESS_HELP, PROGRESS_MODES

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
    "summary": "demo.json",
}
#: ``demo.json`` "written_by": marks a folder as the demo's own, which a later demo replaces unasked.
WRITTEN_BY = "repux demo"


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
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    parser.add_argument("--progress", default="bar", choices=PROGRESS_MODES, help=PROGRESS_HELP)
    parser.add_argument("--force", action="store_true", help="replace existing demo files")


def _is_own_folder(out: Path) -> bool:
    """Whether ``out`` is a folder an earlier demo wrote: its ``demo.json`` and demo files only."""
    try:
        marked = json.loads((out / FILES["summary"]).read_text(encoding="utf-8")).get("written_by") == WRITTEN_BY
        return marked and {p.name for p in out.iterdir()} <= set(FILES.values())
    except (OSError, ValueError, AttributeError):
        return False


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
    overwrite = args.force or _is_own_folder(out)
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing)}: already exist(s); refusing to overwrite (use --force)")

    import numpy as np

    from repux.atomic import write_json
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
    write_volume(image, paths["ct"], overwrite=overwrite)
    write_volume(truth, paths["truth"], overwrite=overwrite)
    write_label_map(labels, paths["labels"], bundle.labels, overwrite=overwrite)
    write_label_map(labels, paths["segmentation"], bundle.labels, overwrite=overwrite)
    # The slices go through the centre of the true organs, whatever the model found.
    organs = np.argwhere(truth.array > 0)
    centre = (truth.affine @ np.append(organs.mean(axis=0), 1.0))[:3] if organs.size else None
    render_overlay(image, labels, bundle.labels, paths["overlay"], centre_ras=centre, overwrite=overwrite)

    organ_labels = [(label.value, label.name) for label in bundle.labels if label.value != 0]
    scores = score_labels(labels, truth, organ_labels, "segmentation", "phantom truth", hausdorff=False)
    mean = mean_dice(scores)
    dice = {score.name: score.dice for score in scores}
    summary = {"written_by": WRITTEN_BY, "seed": args.seed, "model": bundle.metadata.name, "dice": dice}
    write_json({**summary, "mean_dice": mean}, paths["summary"], overwrite=overwrite)
    progress.finish("done", outputs=[str(p) for p in paths.values()], dice=dice, mean_dice=mean)
    if args.progress != "jsonl":
        print(f"phantom seed {args.seed}, model {bundle.metadata.name!r}; files in {out}/")
        for score in scores:
            shown = "absent" if math.isnan(score.dice) else f"{score.dice:.3f}"
            print(f"  {score.name:<20} Dice {shown}")
        print(f"mean Dice: {mean:.3f}")
    return 0
