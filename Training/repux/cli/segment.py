"""``repux segment``: label maps (or Slicer segmentations) of CTs with a model bundle.

One input and an output file name with a label-map ending: one case. Several inputs, or a
folder of cases, and an output folder: one output per case, named after the input, and
cases whose outputs exist already are skipped (reported) unless ``--force``.

Review options (their own block below: ``configure_review``, ``plan_review``,
``review_prediction``): confidence and entropy maps, the per-organ review table, test-time
mirroring, and re-segmentation of a box (``--roi``) into an existing label map (``--update``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from repux.errors import InputError
from repux.options import DEFAULT_WINDOWS, DEVICE_HELP, FAST_HELP, WINDOW_MODES, WINDOWS_HELP
from repux.progress import PROGRESS_HELP, PROGRESS_MODES

if TYPE_CHECKING:
    import numpy as np

    from repux.infer.roi import RasBox
    from repux.progress import Progress

HELP = "segment CTs with a RepUX-Net model bundle: label maps, Slicer segmentations, organ volumes"

#: Label-map endings (the first is the default for output folders).
FORMATS = (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha")
PROBABILITIES_SUFFIX = ".nii.gz"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="CT image (.nii.gz, .nii, .nrrd, .mha), DICOM series folder, or a folder of such cases",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTPUT",
        help=f"label map file for one input ({', '.join(FORMATS)}; .seg.nrrd = Slicer segmentation), "
        "or a folder for several",
    )
    parser.add_argument("--model", default="demo", metavar="BUNDLE", help="bundle folder, or 'demo' (default)")
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    parser.add_argument(
        "--overlap", type=float, default=None, metavar="F", help="sliding-window overlap 0..<1 (default: the bundle's)"
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help=FAST_HELP,
    )
    parser.add_argument("--windows", choices=WINDOW_MODES, default=DEFAULT_WINDOWS, help=WINDOWS_HELP)
    parser.add_argument(
        "--backend",
        choices=("torch", "openvino"),
        default="torch",
        help="CPU runtime of the optimized network: torch (default) or openvino (exported the first time for a "
        "model, ~10-45 s, and kept in the models folder's .exports; faster windows on a CPU, see the README's "
        "Speed section; needs the cpu-backends extra)",
    )
    parser.add_argument(
        "--plain-network",
        action="store_true",
        help="run the bundle's network as it is, without the exact speed rewrites of repux.accel",
    )
    parser.add_argument(
        "--probabilities",
        metavar="PATH",
        help="also write softmax probabilities: one 4-D float32 file per case (4th index = label value); "
        f"a file for one input, a folder for several ({PROBABILITIES_SUFFIX} files)",
    )
    parser.add_argument(
        "--volumes", metavar="TABLE", help="write organ volumes (mL) per case and label to a .csv or .json table"
    )
    parser.add_argument(
        "--format", default=FORMATS[0], choices=FORMATS, help="label-map format in an output folder (default .nii.gz)"
    )
    parser.add_argument(
        "--series", metavar="UID", help="the DICOM series to read from a folder holding several (Series Instance UID)"
    )
    parser.add_argument("--modality", metavar="NAME", help="refuse a bundle trained on another modality (e.g. CT)")
    parser.add_argument(
        "--progress",
        default="bar",
        choices=PROGRESS_MODES,
        help=PROGRESS_HELP,
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing outputs (default: refuse, or skip done cases)"
    )
    server = parser.add_argument_group("on a server (repux serve)")
    server.add_argument("--server", metavar="URL", help="segment on this repux server (http(s)://HOST:PORT) instead of here")
    server.add_argument("--token-file", metavar="FILE", help="file whose first line is the server's access token")
    server.add_argument("--server-cafile", metavar="PEM", help="certificate to trust for an https server (e.g. its self-signed one)")
    server.add_argument(
        "--server-timeout", type=float, default=30.0, metavar="S", help="seconds to keep retrying an unreachable server (default 30)"
    )
    configure_review(parser)


@dataclass
class Case:
    """One input and where its outputs go."""

    name: str
    image: Path
    labels: Path
    probabilities: Path | None
    confidence: Path | None = None
    entropy: Path | None = None


def case_name(path: Path) -> str:
    """The input's name without its volume ending (a DICOM folder keeps its name)."""
    from repux.imageio import volume_suffix

    suffix = volume_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.is_file() else path.name


def _is_dicom_series(folder: Path) -> bool:
    from repux.imageio import dicom_series

    return bool(dicom_series(folder))


def find_inputs(inputs: list[str]) -> list[Path]:
    """Image files and DICOM series folders named by ``inputs`` (folders of cases expanded)."""
    from repux.imageio import volume_suffix

    found: list[Path] = []
    for text in inputs:
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_file() or _is_dicom_series(path):
            found.append(path)
            continue
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        cases = [p for p in entries if (p.is_file() and volume_suffix(p)) or (p.is_dir() and _is_dicom_series(p))]
        if not cases:
            raise InputError(
                f"{path}: folder holds no CT images and no DICOM series; expected .nii.gz, .nii, .nrrd, .mha files "
                "or DICOM series folders"
            )
        found.extend(cases)
    return found


def plan_cases(args: argparse.Namespace) -> tuple[list[Case], bool]:
    """The cases and whether the output is a single file (else a folder)."""
    from repux.infer.writers import LABEL_SUFFIXES, PROBABILITY_SUFFIXES, output_suffix, require_suffix

    images = find_inputs(args.inputs)
    output = Path(args.output)
    single_file = bool(output_suffix(output, LABEL_SUFFIXES))
    if single_file:
        if len(images) != 1:
            raise InputError(
                f"{output}: one output file for {len(images)} inputs; expected an output folder (a path without "
                f"a label-map ending) for several inputs"
            )
        probabilities = None
        if args.probabilities:
            require_suffix(args.probabilities, PROBABILITY_SUFFIXES, "--probabilities with one input")
            probabilities = Path(args.probabilities)
        return [Case(case_name(images[0]), images[0], output, probabilities)], True
    if (output.exists() and not output.is_dir()) or (not output.exists() and output.suffix):
        raise InputError(
            f"{output}: not a label-map file name ({', '.join(FORMATS)}) nor a folder; "
            "expected one of those endings, or a folder (without a file ending, or existing)"
        )
    if args.probabilities and output_suffix(args.probabilities, PROBABILITY_SUFFIXES):
        raise InputError(f"--probabilities {args.probabilities}: expected a folder when the output is a folder")
    cases, seen = [], {}
    for image in images:
        name = case_name(image)
        if name in seen:
            raise InputError(f"{image} and {seen[name]}: two inputs named {name!r}; their outputs would collide")
        seen[name] = image
        probabilities = Path(args.probabilities) / f"{name}{PROBABILITIES_SUFFIX}" if args.probabilities else None
        cases.append(Case(name, image, output / f"{name}{args.format}", probabilities))
    return cases, False


def _outputs(case: Case) -> list[Path]:
    return [p for p in (case.probabilities, case.confidence, case.entropy, case.labels) if p is not None]


def check_outputs(cases: list[Case], args: argparse.Namespace) -> None:
    """Refuse outputs with a wrong ending, that cannot be written, that are inputs (CT images,
    the bundle's files) or that collide; torch-free, before any image is read."""
    from repux.infer.writers import TABLE_SUFFIXES, require_suffix
    from repux.paths import check_writable, refuse_outputs_over_inputs

    if args.volumes:
        require_suffix(args.volumes, TABLE_SUFFIXES, "--volumes")

    outputs: dict[str, Path] = {}
    for case in cases:
        outputs[f"label map of {case.name}"] = case.labels
        if case.probabilities is not None:
            outputs[f"probabilities of {case.name}"] = case.probabilities
        if case.confidence is not None:
            outputs[f"confidence of {case.name}"] = case.confidence
        if case.entropy is not None:
            outputs[f"entropy of {case.name}"] = case.entropy
    if args.volumes:
        outputs["volume table"] = Path(args.volumes)
    if args.review:
        outputs["review table"] = Path(args.review)
    if len(cases) == 1:  # one case: "the label map", "the probabilities"
        outputs = {what.replace(f" of {cases[0].name}", ""): path for what, path in outputs.items()}
    model = Path(args.model)
    inputs = [case.image for case in cases if case.image.is_file()]
    inputs += [p for p in model.iterdir() if p.is_file()] if model.is_dir() else []
    inputs += [Path(args.update)] if args.update else []
    refuse_outputs_over_inputs(outputs, inputs)
    for what, path in outputs.items():
        check_writable(path, what)


def run(args: argparse.Namespace) -> int:
    from repux.progress import Progress

    progress = Progress(args.progress)
    with progress.reporting_outcome():
        if args.server:
            from repux.serve.client import segment_on_server

            return segment_on_server(args, progress)
        return _run(args, progress)


def _run(args: argparse.Namespace, progress: Progress) -> int:
    from repux.imageio import read_volume
    from repux.infer.writers import label_volumes, write_label_map, write_probabilities, write_table
    from repux.options import check_device_name, check_overlap

    check_device_name(args.device)
    check_overlap(args.overlap)
    cases, single_file = plan_cases(args)
    box = plan_review(cases, args, single_file)
    check_outputs(cases, args)
    for table in (args.volumes, args.review):
        if table and Path(table).exists() and not args.force:
            raise FileExistsError(f"{table}: already exists; refusing to overwrite it (use --force)")
    if single_file and not args.force:
        for path in _outputs(cases[0]):
            if path.exists():
                raise FileExistsError(f"{path}: already exists; refusing to overwrite it (use --force)")

    from repux.bundle import load_bundle  # torch from here on
    from repux.hub.folders import EXPORTS_SUBDIR, models_dir
    from repux.infer import Segmenter, check_modality

    bundle = load_bundle(args.model)
    check_modality(bundle, args.modality)
    if bundle.metadata.usage_warning:
        progress.warning(bundle.metadata.usage_warning)
    segmenter = Segmenter(
        bundle,
        device=args.device,
        overlap=args.overlap,
        fast=args.fast,
        progress=progress,
        optimize=not args.plain_network,
        mirror=args.tta == "flips",
        backend=args.backend,
        windows=args.windows,
        backend_cache=models_dir() / EXPORTS_SUBDIR,
    )

    rows, review_rows, written, skipped, failed = [], [], [], [], []
    for index, case in enumerate(cases, start=1):
        existing = [p for p in _outputs(case) if p.exists()]
        if existing and not args.force:
            if len(existing) < len(_outputs(case)):
                failed.append(f"{case.name}: {existing[0]} exists but not all outputs do; use --force to redo the case")
                continue
            skipped.append(case.name)
            progress.message(f"skipped {case.name}: {case.labels} exists", case=case.name, skipped=True)
            if args.volumes:
                rows += label_volumes(read_volume(case.labels), bundle.labels, case.name)
            if args.review:
                review_rows += skipped_case_review(case, args, bundle.labels, progress)
            continue
        try:
            progress.stage("read")
            progress.message(f"case {index}/{len(cases)}: {case.name}", case=case.name, index=index, cases=len(cases))
            image = read_volume(case.image, series=args.series)
            # Refused before the inference, not after it.
            update_labels = read_update(image, args, bundle.labels) if args.update else None
            prediction = segmenter.predict(
                image,
                probabilities=case.probabilities is not None,
                source=str(case.image),
                review=wants_review_maps(case, args),
                roi=box,
            )
            case_review = review_prediction(prediction, image, case, args, bundle.labels, update_labels)
            progress.stage("write")
            if case.probabilities is not None:
                write_probabilities(prediction.probabilities, image, case.probabilities, overwrite=args.force)
            write_label_map(prediction.labels, case.labels, bundle.labels, overwrite=args.force)
        except InputError as error:
            if single_file:
                raise
            record_failure(progress, case.name, str(error), failed)
            continue
        except Exception as error:  # noqa: BLE001 - one case's failure, whatever it is, must not stop the others
            if single_file:
                raise
            record_failure(progress, case.name, f"{case.image}: {type(error).__name__}: {error}", failed)
            continue
        for note in prediction.notes:
            progress.message(note, case=case.name)
        written.append(str(case.labels))
        progress.message(f"wrote {case.labels}", case=case.name, output=str(case.labels))
        if args.volumes:
            rows += label_volumes(prediction.labels, bundle.labels, case.name)
        review_rows += case_review

    if args.volumes:
        write_table(rows, args.volumes, overwrite=args.force)
        progress.message(f"wrote {args.volumes}")
    if args.review:
        write_table(review_rows, args.review, overwrite=args.force)
        progress.message(f"wrote {args.review}")
    return finish_batch(progress, len(cases), written, skipped, failed)


def record_failure(progress: Progress, case_name: str, message: str, failed: list[str]) -> None:
    """One case of a batch could not be done: note it and say so; the batch goes on."""
    failed.append(message)
    progress.message(f"failed {case_name}: {message}", case=case_name, failed=True)


def finish_batch(progress: Progress, count: int, written: list[str], skipped: list[str], failed: list[str]) -> int:
    """End a batch of ``count`` cases: an error listing the failed ones (exit 2), else ``done``.

    Raises:
        InputError: one or more cases failed (each line names the case and why).
    """
    if failed:
        raise InputError(f"{len(failed)} of {count} case(s) failed:\n  " + "\n  ".join(failed))
    if skipped:
        progress.message(f"skipped {len(skipped)} case(s) whose outputs exist (use --force to redo them)")
    progress.finish("done", outputs=written, skipped=skipped)
    return 0


# -- review: confidence maps, review table, test-time mirroring, region re-segmentation ----------


def configure_review(parser: argparse.ArgumentParser) -> None:
    """The review options of ``repux segment``."""
    from repux.options import LOW_CONFIDENCE, LOW_CONFIDENCE_HELP, TTA_HELP

    group = parser.add_argument_group("review")
    group.add_argument(
        "--confidence",
        metavar="PATH",
        help="also write the confidence map: the probability of the chosen label per voxel, on the input's "
        "grid, as uint8 (probability = value / 255); a file for one input, a folder for several",
    )
    group.add_argument(
        "--entropy",
        metavar="PATH",
        help="also write the softmax entropy / log(number of labels) per voxel (0 certain .. 1 all labels "
        "equal), uint8, value / 255; a file for one input, a folder for several",
    )
    group.add_argument(
        "--review",
        metavar="TABLE",
        help="write a per-organ review table (.csv or .json): volume_ml, components, outside_largest_ml, "
        "mean_confidence, low_confidence_ml",
    )
    group.add_argument(
        "--low-confidence",
        type=float,
        default=LOW_CONFIDENCE,
        metavar="T",
        help=LOW_CONFIDENCE_HELP,
    )
    group.add_argument(
        "--tta",
        choices=("none", "flips"),
        default="none",
        help=TTA_HELP,
    )
    group.add_argument(
        "--roi",
        metavar="R0,A0,S0,R1,A1,S1",
        help="segment only the voxels inside this box (two opposite corners, RAS mm; write --roi=-10,... when "
        "the first number is negative); only the sliding windows reaching it run, and inside it the result "
        "equals the whole-image result; outside it the output is 0 (or --update's values)",
    )
    group.add_argument(
        "--update",
        metavar="LABELS",
        help="with --roi and one input: an existing label map on the input's grid; the output is this map "
        "with the box replaced (voxels outside the box keep their values)",
    )


def plan_review(cases: list[Case], args: argparse.Namespace, single_file: bool) -> "RasBox | None":
    """Check the review options and name each case's review outputs; the parsed --roi box or None."""
    from repux.infer.roi import RasBox
    from repux.infer.writers import PROBABILITY_SUFFIXES, TABLE_SUFFIXES, output_suffix, require_suffix

    if not 0.0 < args.low_confidence <= 1.0:
        raise InputError(f"--low-confidence {args.low_confidence}: expected a number in (0, 1]")
    if args.review:
        require_suffix(args.review, TABLE_SUFFIXES, "--review")
    for option in ("confidence", "entropy"):
        value = getattr(args, option)
        if not value:
            continue
        if single_file:
            require_suffix(value, PROBABILITY_SUFFIXES, f"--{option} with one input")
            setattr(cases[0], option, Path(value))
            continue
        if output_suffix(value, PROBABILITY_SUFFIXES):
            raise InputError(f"--{option} {value}: expected a folder when the output is a folder")
        for case in cases:
            setattr(case, option, Path(value) / f"{case.name}{PROBABILITIES_SUFFIX}")
    if args.update:
        if not args.roi:
            raise InputError(f"--update {args.update}: only with --roi (the box to replace); expected --roi too")
        if not single_file:
            raise InputError(f"--update {args.update}: only with one input and one output file")
        if not Path(args.update).is_file():
            raise FileNotFoundError(f"--update {args.update}: no such file")
    return RasBox.parse(args.roi) if args.roi else None


def wants_review_maps(case: Case, args: argparse.Namespace) -> bool:
    return bool(args.review) or case.confidence is not None or case.entropy is not None


def read_update(image, args: argparse.Namespace, label_list) -> "np.ndarray":
    """The --update label map's voxels, refused unless it lies on ``image``'s grid and holds the model's values."""
    import numpy as np

    from repux.imageio import read_volume

    existing = read_volume(args.update)
    if existing.shape != image.shape or not np.allclose(existing.affine, image.affine, atol=1e-3):
        raise InputError(
            f"--update {args.update}: grid {existing.shape} / {np.round(existing.affine, 3).tolist()} differs from "
            f"the input's {image.shape} / {np.round(image.affine, 3).tolist()}; expected a label map of this input"
        )
    known = {label.value for label in label_list}
    unknown = sorted(int(v) for v in np.unique(existing.array) if int(v) not in known)
    if unknown:
        raise InputError(f"--update {args.update}: label values {unknown}; expected the model's values {sorted(known)}")
    return existing.array


def review_prediction(prediction, image, case: Case, args: argparse.Namespace, label_list, existing=None) -> list[dict]:
    """Merge a --roi result into ``existing`` (the --update voxels), write the review maps,
    return the case's review rows."""
    import numpy as np

    from repux.imageio import write_volume
    from repux.review import organ_review

    if existing is not None:
        merged = np.where(prediction.roi, prediction.labels.array, existing.astype(prediction.labels.array.dtype))
        prediction.labels = prediction.labels.with_array(merged)
    for path, values in ((case.confidence, prediction.confidence), (case.entropy, prediction.entropy)):
        if path is not None:
            write_volume(image.with_array(values), path, overwrite=args.force)
    if not args.review:
        return []
    labels = prediction.labels.array
    if prediction.roi is not None:
        # Only the box was segmented: the table describes the box.
        labels = np.where(prediction.roi, labels, 0).astype(labels.dtype)
    return organ_review(labels, prediction.confidence, image.spacing, label_list, args.low_confidence, case.name)


def skipped_case_review(case: Case, args: argparse.Namespace, label_list, progress: "Progress") -> list[dict]:
    """Review rows of a case skipped because its outputs exist: from its files, when its
    confidence map is one of them; else none (reported)."""
    from repux.imageio import read_volume
    from repux.review import organ_review

    if case.confidence is None:
        progress.message(f"{case.name}: no review rows (skipped, and no --confidence map to read them from)")
        return []
    labels, confidence = read_volume(case.labels), read_volume(case.confidence)
    return organ_review(labels.array, confidence.array, labels.spacing, label_list, args.low_confidence, case.name)
