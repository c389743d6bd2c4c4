"""``repux rank``: order unlabeled CTs by the model's uncertainty, the most worth curating first.

Each case is segmented once (the same inference as ``repux segment``, with its review maps)
and scored by :func:`repux.review.uncertainty_score`: the mean normalised entropy inside
the predicted organs plus the share of organ voxels whose confidence is below
``--low-confidence``. The table lists the cases by decreasing score; a case that cannot be
read or segmented fails alone (named at the end, exit 2), the others are ranked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from repux.errors import InputError
from repux.options import DEVICE_HELP, FAST_HELP
from repux.progress import PROGRESS_HELP, PROGRESS_MODES

HELP = "order unlabeled CTs by the model's uncertainty (most uncertain first): which case to curate next"

#: Columns of the ranking table, in order.
RANK_COLUMNS = ("rank", "case", "path", "score", "mean_entropy", "low_confidence_share", "organ_voxels")


def configure(parser: argparse.ArgumentParser) -> None:
    from repux.options import LOW_CONFIDENCE, LOW_CONFIDENCE_HELP, TTA_HELP

    parser.add_argument(
        "inputs", nargs="+", metavar="CASE", help="CT images, DICOM series folders, or folders of such cases"
    )
    parser.add_argument("-o", "--output", required=True, metavar="RANKING", help="the ranking table (.csv or .json)")
    parser.add_argument("--model", default="demo", metavar="BUNDLE", help="bundle folder, or 'demo' (default)")
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    parser.add_argument(
        "--overlap", type=float, default=None, metavar="F", help="sliding-window overlap 0..<1 (default: the bundle's)"
    )
    parser.add_argument("--fast", action="store_true", help=FAST_HELP)
    parser.add_argument(
        "--tta", choices=("none", "flips"), default="none", help=TTA_HELP
    )
    parser.add_argument(
        "--low-confidence",
        type=float,
        default=LOW_CONFIDENCE,
        metavar="T",
        help=LOW_CONFIDENCE_HELP,
    )
    parser.add_argument("--progress", default="bar", choices=PROGRESS_MODES, help=PROGRESS_HELP)
    parser.add_argument("--force", action="store_true", help="replace an existing RANKING file")


def rank_rows(scores: list[dict]) -> list[dict]:
    """Rows of :data:`RANK_COLUMNS` by decreasing score (equal scores: by case name)."""
    ordered = sorted(scores, key=lambda row: (-row["score"], row["case"]))
    return [{"rank": index, **{key: row[key] for key in RANK_COLUMNS[1:]}} for index, row in enumerate(ordered, 1)]


def run(args: argparse.Namespace) -> int:
    from repux.progress import Progress

    progress = Progress(args.progress)
    with progress.reporting_outcome():
        return _run(args, progress)


def _run(args: argparse.Namespace, progress) -> int:
    from repux.cli.segment import case_name, find_inputs
    from repux.imageio import read_volume
    from repux.infer.writers import TABLE_SUFFIXES, require_suffix, write_table
    from repux.options import check_device_name, check_overlap
    from repux.paths import check_writable, refuse_outputs_over_inputs
    from repux.review import uncertainty_score

    check_device_name(args.device)
    check_overlap(args.overlap)
    if not 0.0 < args.low_confidence <= 1.0:
        raise InputError(f"--low-confidence {args.low_confidence}: expected a number in (0, 1]")
    require_suffix(args.output, TABLE_SUFFIXES, "the ranking")
    images = find_inputs(args.inputs)
    refuse_outputs_over_inputs({"ranking": Path(args.output)}, [p for p in images if p.is_file()])
    check_writable(Path(args.output), "ranking")
    if Path(args.output).exists() and not args.force:
        raise FileExistsError(f"{args.output}: already exists; refusing to overwrite it (use --force)")

    from repux.bundle import load_bundle  # torch from here on
    from repux.infer import Segmenter

    bundle = load_bundle(args.model)
    segmenter = Segmenter(
        bundle, device=args.device, overlap=args.overlap, fast=args.fast, progress=progress, mirror=args.tta == "flips"
    )
    scores, failed = [], []
    for index, image_path in enumerate(images, start=1):
        name = case_name(image_path)
        progress.message(f"case {index}/{len(images)}: {name}", case=name, index=index, cases=len(images))
        try:
            progress.stage("read")
            image = read_volume(image_path)
            prediction = segmenter.predict(image, review=True, source=str(image_path))
        except InputError as error:
            failed.append(str(error))
            progress.message(f"failed {name}: {error}", case=name, failed=True)
            continue
        except Exception as error:  # noqa: BLE001 - one case's failure must not stop the ranking
            failed.append(f"{image_path}: {type(error).__name__}: {error}")
            progress.message(f"failed {name}: {type(error).__name__}: {error}", case=name, failed=True)
            continue
        score = uncertainty_score(prediction.labels.array, prediction.confidence, prediction.entropy, args.low_confidence)
        scores.append({"case": name, "path": str(image_path), **score})
    if scores:
        write_table(rank_rows(scores), args.output, overwrite=args.force)
        progress.message(f"wrote {args.output}")
    if failed:
        raise InputError(f"{len(failed)} of {len(images)} case(s) failed:\n  " + "\n  ".join(failed))
    progress.finish("done", outputs=[str(args.output)])
    return 0
