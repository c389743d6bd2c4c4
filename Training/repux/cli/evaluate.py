"""``repux evaluate``: per-label Dice and 95% Hausdorff distance (mm) of label maps against references.

PRED and GT are two label-map files on the same voxel grid, or two folders whose label
maps are paired by case name (the file name without its ending).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from repux.errors import InputError

HELP = "per-label Dice and 95th-percentile Hausdorff distance (mm) of label maps against reference label maps"

_LABEL_ENDINGS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".nhdr", ".mhd")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred", metavar="PRED", help="predicted label map, or a folder of them")
    parser.add_argument("gt", metavar="GT", help="reference label map on the same grid, or a folder of them")
    parser.add_argument(
        "--labels",
        metavar="LABELS",
        help="label names: a preset (flare, flare21, amos), a bundle folder or 'demo', or a labels .json "
        "(default: the values found, named 'label N')",
    )
    parser.add_argument("-o", "--output", metavar="METRICS", help="write the scores to a .csv or .json table")
    parser.add_argument("--force", action="store_true", help="replace an existing METRICS file")


def resolve_labels(spec: str | None):
    """Foreground labels named by ``spec`` (preset, labels JSON, bundle), or None."""
    from repux.bundle import LABEL_PRESETS, label_preset, labels_from_json, load_bundle

    if spec is None:
        return None
    if spec in LABEL_PRESETS:
        labels = label_preset(spec)
    elif spec.lower().endswith(".json"):
        labels = labels_from_json(spec)
    else:
        labels = load_bundle(spec).labels
    return [label for label in labels if label.value != 0]


def case_name(path: Path) -> str:
    name = path.name
    ending = next((e for e in _LABEL_ENDINGS if name.lower().endswith(e)), "")
    return name[: len(name) - len(ending)] if ending else name


def pair_cases(pred: Path, gt: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction, reference) triples: one for two files, matched by name for two folders.

    Folders: a reference without a prediction is an error; predictions without a reference
    are named on stderr and left out.
    """
    for path in (pred, gt):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
    if pred.is_dir() != gt.is_dir():
        raise InputError(f"{pred} and {gt}: expected two label-map files or two folders, got a file and a folder")
    if not gt.is_dir():
        return [(case_name(gt), pred, gt)]

    def label_maps(folder: Path) -> dict[str, Path]:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        return {case_name(p): p for p in files if case_name(p) != p.name}

    predictions, references = label_maps(pred), label_maps(gt)
    if not references:
        raise InputError(f"{gt}: folder holds no label maps; expected files ending in {', '.join(_LABEL_ENDINGS)}")
    missing = sorted(set(references) - set(predictions))
    if missing:
        raise InputError(f"{pred}: no prediction for the reference case(s) {missing} in {gt}")
    unmatched = sorted(set(predictions) - set(references))
    if unmatched:
        print(
            f"repux evaluate: {pred}: {len(unmatched)} prediction(s) without a reference, not scored: {unmatched} "
            f"(no such case in {gt})",
            file=sys.stderr,
        )
    return [(name, predictions[name], references[name]) for name in sorted(references)]


def _refuse_table_over_inputs(args: argparse.Namespace) -> None:
    from repux.paths import refuse_outputs_over_inputs

    inputs = [Path(args.pred), Path(args.gt)]
    if args.labels:
        labels = Path(args.labels)
        inputs += [p for p in labels.iterdir() if p.is_file()] if labels.is_dir() else [labels]
    refuse_outputs_over_inputs({"score table": Path(args.output)}, inputs)


def _json_value(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    from repux.imageio import read_volume
    from repux.infer.writers import TABLE_SUFFIXES, require_suffix, write_table
    from repux.paths import check_writable

    if args.output:
        require_suffix(args.output, TABLE_SUFFIXES, "--output")
        _refuse_table_over_inputs(args)
        check_writable(args.output, "score table")
        if Path(args.output).exists() and not args.force:
            raise FileExistsError(f"{args.output}: already exists; refusing to overwrite it (use --force)")

    import numpy as np

    from repux.infer.metrics import mean_dice, score_labels  # torch from here on

    named = resolve_labels(args.labels)
    rows, by_label = [], {}
    cases = pair_cases(Path(args.pred), Path(args.gt))
    for name, pred_path, gt_path in cases:
        pred, truth = read_volume(pred_path), read_volume(gt_path)
        if named is None:
            values = set(np.unique(pred.array).tolist()) | set(np.unique(truth.array).tolist())
            labels = [(int(v), f"label {int(v)}") for v in sorted(values) if v != 0]
        else:
            labels = [(label.value, label.name) for label in named]
        scores = score_labels(pred, truth, labels, str(pred_path), str(gt_path))
        prefix = f"{name}  " if len(cases) > 1 else ""
        for score in scores:
            rows.append(score.as_row(name))
            by_label.setdefault((score.label, score.name), []).append(score)
            print(f"{prefix}{score.name:<24} Dice {_fmt(score.dice, 4):>6}  HD95 {_fmt(score.hd95_mm, 2):>7} mm")
        if len(cases) > 1:
            print(f"{prefix}mean Dice: {_fmt(mean_dice(scores), 3)}")

    if len(cases) > 1:
        print(f"mean over {len(cases)} cases:")
        for (value, name), scores in sorted(by_label.items()):
            dice = [s.dice for s in scores if not math.isnan(s.dice)]
            hd = [s.hd95_mm for s in scores if not math.isnan(s.hd95_mm)]
            mean_row = {
                "case": "mean",
                "label": value,
                "name": name,
                "dice": float(np.mean(dice)) if dice else math.nan,
                "hd95_mm": float(np.mean(hd)) if hd else math.nan,
                "pred_voxels": sum(s.pred_voxels for s in scores),
                "truth_voxels": sum(s.truth_voxels for s in scores),
            }
            rows.append(mean_row)
            print(f"  {name:<24} Dice {_fmt(mean_row['dice'], 4):>6}  HD95 {_fmt(mean_row['hd95_mm'], 2):>7} mm")
    overall = [r["dice"] for r in rows if r["case"] != "mean" and not math.isnan(r["dice"])]
    print(f"mean Dice: {_fmt(float(np.mean(overall)) if overall else math.nan, 3)}")
    if args.output:
        # JSON has no NaN: undefined scores become null there (and stay "nan" in CSV).
        if args.output.lower().endswith(".json"):
            rows = [{k: _json_value(v) for k, v in row.items()} for row in rows]
        write_table(rows, args.output, overwrite=args.force)
        print(f"wrote {args.output}")
    return 0
